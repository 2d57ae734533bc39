//! The real `istio-cni` binary end to end, with real traffic (root). Every check: the HTTPS API stub serves a pod
//! (annotations, proxy env, securityContext), a fresh pod netns joined by a veth to a peer netns (the outside
//! world), an ADD of the built binary with the conflist entry a node would have (`iptables_backend` "legacy" or
//! "nft", or `native_nftables: true`) and a prevResult carrying the pod's address, then connections through the
//! rules: listeners standing in
//! for Envoy (15001 outbound, 15006 inbound, 15021 health, 15053 DNS, as the proxy's uid) report which socket
//! accepted and SO_ORIGINAL_DST, clients connect as the app (uid 1000) or as the proxy.
//!
//! Each check runs for every backend ([`for_each_backend`]), each in its own netns pair; the rules must land where
//! the entry says ([`Landing`]: an iptables flavour, or the native backend's `inet istio-proxy-*` tables) and
//! nowhere else. A "not captured" check always sits next to a "captured" one in
//! the same netns (or a baseline before the ADD), so rules that do nothing cannot pass. One API stub per test;
//! netns, listeners and the run dir go away on drop, also when a check fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use cni_plugin::apply::{Family, Flavour};
use meshcni_tests::apiserver::sample_pod;
use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use meshcni_tests::e2e::{for_each_case, StubCluster};
use meshcni_tests::netns::{
    host_snapshot, istio_by_table, istio_lines, require_root, PodNet, TestNetns, PEER_V4, POD_V4,
};
use meshcni_tests::netprobe;
use meshcni_tests::nft;
use meshcni_tests::traffic::{assert_landed, As, ListenOpts, Listener, Probe, Proto, Report};
use serde_json::{json, Value};

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
/// An OpenShift-style proxy uid/gid (`securityContext.runAsUser`/`runAsGroup`).
const CUSTOM_PROXY_UID: u32 = 1_000_670_000;
/// A second address of the peer, outside the pod's subnet (reached through the pod's default route), and a
/// range holding it but not the peer's link address.
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const OTHER_RANGE: &str = "10.201.0.0/24";
/// Ports served in the peer.
const PEER_PORT: u16 = 80;
const PEER_OTHER_PORT: u16 = 5555;
/// The app's port in the pod, and a port nothing listens on (a redirect still lands on 15006).
const APP_PORT: u16 = 8080;
const OTHER_APP_PORT: u16 = 9090;
/// Bound on one plugin run (the lookup itself is bounded by `pod_lookup_timeout_seconds`).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);

const PROXY_ENV_DNS: (&str, &str) = ("ISTIO_META_DNS_CAPTURE", "true");

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn localhost_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// The firewall backend the conflist entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `iptables_backend: "legacy"`.
    Legacy,
    /// `iptables_backend: "nft"`.
    Nft,
    /// `native_nftables: true` (Istio's key): the native backend over netlink.
    Nftables,
}

const BACKENDS: [Backend; 3] = [Backend::Legacy, Backend::Nft, Backend::Nftables];

impl Backend {
    /// A short name, for pod names and messages.
    fn slug(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::Nftables => "nftables",
        }
    }

    /// The keys of the conflist entry that select this backend.
    fn entry(self) -> Value {
        match self {
            Backend::Legacy => json!({"iptables_backend": "legacy"}),
            Backend::Nft => json!({"iptables_backend": "nft"}),
            Backend::Nftables => json!({"native_nftables": true}),
        }
    }

    fn landing(self) -> Landing {
        match self {
            Backend::Legacy => Landing::Iptables(Flavour::Legacy),
            Backend::Nft => Landing::Iptables(Flavour::Nft),
            Backend::Nftables => Landing::Nftables,
        }
    }
}

/// Where a pod's rules land: the rules of one iptables flavour (read with its `-save`), or the native backend's
/// `inet istio-proxy-*` tables (read with `nft list table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    Iptables(Flavour),
    Nftables,
}

/// Runs `check` once per backend. All always run (a failure with one does not hide another's result); then the
/// test fails naming every backend that failed. Fixtures are dropped while unwinding, so nothing leaks.
fn for_each_backend(check: impl FnMut(Backend)) {
    require_root();
    for_each_case(BACKENDS, |b| format!("{} ({})", b.slug(), b.entry()), check);
}

/// One test's "cluster" ([`StubCluster`]), serving the pods of the tests here.
struct Cluster(StubCluster);

impl std::ops::Deref for Cluster {
    type Target = StubCluster;

    fn deref(&self) -> &StubCluster {
        &self.0
    }
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        Cluster(StubCluster::new(tag))
    }

    /// Serves `pod` (renamed `<tag>-<backend>`) and creates its netns pair with the addresses of `stack`.
    fn pod(&self, tag: &str, backend: Backend, pod: Value, stack: Stack) -> TestPod<'_> {
        let name = format!("{tag}-{}", backend.slug());
        self.pod_with(&name, backend.entry(), backend.landing(), pod, stack)
    }

    /// Like [`Cluster::pod`], with the keys merged into the entry (`{}`: none, the default backend) and where the
    /// rules must land.
    fn pod_with(
        &self,
        name: &str,
        entry: Value,
        landing: Landing,
        mut pod: Value,
        stack: Stack,
    ) -> TestPod<'_> {
        pod["metadata"]["name"] = json!(name);
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .expect("pod has a namespace")
            .to_string();
        self.srv.add_pod(pod).unwrap();
        let net = PodNet::new(name, stack != Stack::V4);
        // The peer also owns an address outside the pod's subnet ("another destination").
        net.peer
            .ip(&["addr", "add", &format!("{OTHER_V4}/32"), "dev", "eth0"]);
        if stack == Stack::V6 {
            // A single-stack IPv6 pod (its IPv4 default route goes with the address).
            net.pod
                .ip(&["addr", "del", &format!("{POD_V4}/24"), "dev", "eth0"]);
        }
        let mut ips = Vec::new();
        let mut routes = Vec::new();
        if stack != Stack::V6 {
            ips.push(json!({"address": format!("{}/24", net.addrs.pod_v4), "gateway": net.addrs.peer_v4, "interface": 0}));
            routes.push(json!({"dst": "0.0.0.0/0", "gw": net.addrs.peer_v4}));
        }
        if let (Some(pod_v6), Some(peer_v6)) = (net.addrs.pod_v6, net.addrs.peer_v6) {
            ips.push(
                json!({"address": format!("{pod_v6}/64"), "gateway": peer_v6, "interface": 0}),
            );
            routes.push(json!({"dst": "::/0", "gw": peer_v6}));
        }
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": net.pod.path()}],
            "ips": ips,
            "routes": routes,
            "dns": {}
        });
        TestPod {
            cluster: self,
            net,
            namespace,
            name: name.to_string(),
            entry,
            landing,
            prev,
        }
    }
}

/// The pod's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    V4,
    /// IPv6 only.
    V6,
    /// IPv4 first, then IPv6 (the order the kernel lists them in).
    Dual,
}

/// An injected pod, with its annotations, proxy env and proxy uid/gid.
fn injected(annotations: &[(&str, &str)], env: &[(&str, &str)], proxy_id: Option<u32>) -> Value {
    let mut pod = sample_pod("default", "web");
    for (k, v) in annotations {
        pod["metadata"]["annotations"][*k] = json!(v);
    }
    let proxy = pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "istio-proxy")
        .expect("sample pod has istio-proxy");
    if !env.is_empty() {
        proxy["env"] = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
    }
    if let Some(id) = proxy_id {
        proxy["securityContext"] = json!({"runAsUser": id, "runAsGroup": id});
    }
    pod
}

/// A pod without a sidecar.
fn plain_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "plain", "namespace": "default", "labels": {"app": "plain"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

/// One pod of a test: its netns pair, its name in the stub, the backend keys of its entry, where its rules must
/// land, its prevResult.
struct TestPod<'a> {
    cluster: &'a Cluster,
    net: PodNet,
    namespace: String,
    name: String,
    entry: Value,
    landing: Landing,
    prev: Value,
}

impl TestPod<'_> {
    fn invocation(&self, command: &str, netns: &str) -> Invocation {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "cni_agent_run_dir": self.cluster.run_dir, "plugin_log_level": "debug",
            "pod_lookup_timeout_seconds": 5, "prevResult": self.prev,
        });
        for (k, v) in self
            .entry
            .as_object()
            .expect("the entry's keys are an object")
        {
            conf[k] = v.clone();
        }
        Invocation::new(plugin_bin())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{}", self.name))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=ctr-{}",
                    self.namespace, self.name, self.name
                ),
            )
            .stdin(serde_json::to_vec(&conf).unwrap())
    }

    fn run(&self, command: &str) -> PluginOutput {
        self.invocation(command, &self.net.pod.path().display().to_string())
            .run_with_timeout(PLUGIN_TIMEOUT)
    }

    /// ADD; asserts success and that the answer is the prevResult, unchanged.
    fn add(&self) {
        let before = self.cluster.srv.pod_requests(&self.namespace, &self.name);
        let out = self.run("ADD");
        assert!(out.success, "ADD of {} failed: {out:?}", self.name);
        assert_eq!(out.json(), self.prev, "ADD must print the prevResult");
        assert_eq!(
            self.cluster.srv.pod_requests(&self.namespace, &self.name),
            before + 1,
            "ADD looks the pod up exactly once"
        );
    }

    /// DEL; asserts success and an empty stdout.
    fn del(&self, netns: &str) {
        let out = self
            .invocation("DEL", netns)
            .run_with_timeout(PLUGIN_TIMEOUT);
        assert!(out.success, "DEL (CNI_NETNS={netns:?}) failed: {out:?}");
        assert_eq!(out.stdout.trim(), "", "DEL prints nothing");
    }

    /// Istio's rule lines of one family where this pod's rules land: the `-A` lines of the flavour's
    /// `ip(6)tables-save`; for native nftables the rules of our tables (one inet table serves both families)
    /// that name an address of the family (`ip`/`ip6 saddr|daddr`, `tproxy ip`/`ip6`).
    fn rules(&self, family: Family) -> Vec<String> {
        match self.landing {
            Landing::Iptables(flavour) => iptables_rules(&self.net.pod, flavour, family),
            Landing::Nftables => {
                let names = match family {
                    Family::V4 => nft::names_ipv4,
                    Family::V6 => nft::names_ipv6,
                };
                nft::istio_rules(&self.net.pod)
                    .into_iter()
                    .filter(|r| names(r))
                    .collect()
            }
        }
    }

    /// Every Istio rule where this pod's rules land (both families).
    fn all_rules(&self) -> Vec<String> {
        match self.landing {
            Landing::Iptables(flavour) => [Family::V4, Family::V6]
                .into_iter()
                .flat_map(|f| iptables_rules(&self.net.pod, flavour, f))
                .collect(),
            Landing::Nftables => nft::istio_rules(&self.net.pod),
        }
    }

    /// Rules of `family` landed where the entry says, and nothing of ours anywhere else: no Istio rule in an
    /// iptables flavour other than the configured one (none at all for native nftables), and no `istio-proxy-*`
    /// nftables table unless the backend is native nftables.
    fn assert_rules_in_backend_only(&self, family: Family) {
        let ours = self.rules(family);
        assert!(!ours.is_empty(), "no {family:?} rule in {:?}", self.landing);
        assert_nothing_of_ours_except(&self.net.pod, Some(self.landing));
    }

    fn assert_no_rules_at_all(&self) {
        assert_nothing_of_ours_except(&self.net.pod, None);
    }

    fn pod_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.net.addrs.pod_v6.unwrap().into()
        } else {
            self.net.addrs.pod_v4.into()
        }
    }

    fn peer_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.net.addrs.peer_v6.unwrap().into()
        } else {
            self.net.addrs.peer_v4.into()
        }
    }
}

/// Istio's `-A` lines in one flavour and family of `ns`.
fn iptables_rules(ns: &TestNetns, flavour: Flavour, family: Family) -> Vec<String> {
    istio_lines(&ns.save(flavour, family))
}

/// No Istio rule and no Istio nftables table in `ns` except where `landing` says.
#[track_caller]
fn assert_nothing_of_ours_except(ns: &TestNetns, landing: Option<Landing>) {
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        if landing == Some(Landing::Iptables(flavour)) {
            continue;
        }
        for family in [Family::V4, Family::V6] {
            let save = ns.save(flavour, family);
            assert!(
                !save.contains("ISTIO"),
                "{flavour:?} {family:?} has Istio rules (ours land in {landing:?}):\n{save}"
            );
        }
    }
    if landing != Some(Landing::Nftables) {
        let tables = nft::istio_tables(ns);
        assert!(
            tables.is_empty(),
            "nftables tables of ours (ours land in {landing:?}): {tables:?}\n{}",
            nft::ruleset(ns)
        );
    }
}

/// Options of the stand-ins for the sidecar, the app and the outside world.
#[derive(Debug, Clone, Copy)]
struct WorldOpts {
    v6: bool,
    proxy_uid: u32,
    tproxy: bool,
}

impl Default for WorldOpts {
    fn default() -> Self {
        WorldOpts {
            v6: false,
            proxy_uid: PROXY_UID,
            tproxy: false,
        }
    }
}

/// In the pod: Envoy's outbound (15001) and inbound (15006, transparent for TPROXY) listeners and the health
/// port (15021) as the proxy's uid, the app on 8080 as uid 1000; in the peer: servers on 80 and 5555 (all
/// addresses of the family).
fn start_world(probe: &Probe, net: &PodNet, o: WorldOpts) -> Vec<Listener> {
    let any: IpAddr = if o.v6 {
        "::".parse().unwrap()
    } else {
        "0.0.0.0".parse().unwrap()
    };
    let proxy = ListenOpts::user(o.proxy_uid);
    let inbound = if o.tproxy { proxy.transparent() } else { proxy };
    vec![
        probe.listen(&net.pod, "outbound", sa(any, 15001), proxy),
        probe.listen(&net.pod, "inbound", sa(any, 15006), inbound),
        probe.listen(&net.pod, "health", sa(any, 15021), proxy),
        probe.listen(
            &net.pod,
            "app",
            sa(any, APP_PORT),
            ListenOpts::user(APP_UID),
        ),
        probe.listen(&net.peer, "peer", sa(any, PEER_PORT), ListenOpts::root()),
        probe.listen(
            &net.peer,
            "peer-other-port",
            sa(any, PEER_OTHER_PORT),
            ListenOpts::root(),
        ),
    ]
}

/// Asserts the connection reached the peer for real (not NATed) at `dst`, coming from the pod's address.
#[track_caller]
fn assert_reached_peer(r: &Report, name: &str, dst: SocketAddr, from: IpAddr) {
    assert_landed(r, name, None);
    assert_eq!(r.local, Some(dst), "{r:?}");
    assert_eq!(r.peer.map(|p| p.ip()), Some(from), "{r:?}");
}

/// Asserts the app's connection to `dst` is captured by the outbound listener with `dst` as original destination.
#[track_caller]
fn assert_captured_outbound(probe: &Probe, pod: &TestPod, dst: SocketAddr, user: As) {
    let r = probe.must_connect(&pod.net.pod, dst, user);
    assert_landed(&r, "outbound", Some(dst));
}

/// Baseline before any ADD: outbound reaches the peer, inbound reaches the app (so the checks after can fail).
fn assert_nothing_captured(probe: &Probe, pod: &TestPod, v6: bool) {
    let (pod_ip, peer_ip) = (pod.pod_ip(v6), pod.peer_ip(v6));
    let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
    assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
    let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
    assert_landed(&r, "app", None);
}

/// The default sidecar's behaviour for one family: app outbound captured, proxy bypasses, inbound redirected
/// except the health port, localhost untouched.
fn assert_default_capture(probe: &Probe, pod: &TestPod, v6: bool, localhost: IpAddr) {
    let (pod_ip, peer_ip) = (pod.pod_ip(v6), pod.peer_ip(v6));
    assert_captured_outbound(probe, pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
    let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(PROXY_UID));
    assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
    let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
    assert_landed(&r, "inbound", Some(sa(pod_ip, APP_PORT)));
    let r = probe.must_connect(&pod.net.peer, sa(pod_ip, 15021), As::Root);
    assert_landed(&r, "health", None);
    let r = probe.must_connect(&pod.net.pod, sa(localhost, APP_PORT), As::User(APP_UID));
    assert_landed(&r, "app", None);
}

#[test]
fn default_sidecar_captures_outbound_and_inbound() {
    let cluster = Cluster::new("basic");
    let probe = netprobe!();
    let host_before = host_snapshot();
    for_each_backend(|backend| {
        let pod = cluster.pod("basic", backend, injected(&[], &[], None), Stack::V4);
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        assert_nothing_captured(&probe, &pod, false);
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        // An IPv4 pod gets no ip6tables rule and no ::6 on lo.
        assert!(pod.rules(Family::V6).is_empty());
        let lo = pod.net.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
        assert!(!lo.contains("::6/128"), "{lo}");
        assert_default_capture(&probe, &pod, false, localhost_v4());
    });
    assert_eq!(host_snapshot(), host_before, "the host's own rules changed");
}

#[test]
fn exclude_outbound_ip_ranges_reach_the_peer() {
    let cluster = Cluster::new("exip");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let peer_cidr = format!("{PEER_V4}/32");
        let pod = cluster.pod(
            "exip",
            backend,
            injected(
                &[(
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    &peer_cidr,
                )],
                &[],
                None,
            ),
            Stack::V4,
        );
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let (pod_ip, peer_ip) = (pod.pod_ip(false), pod.peer_ip(false));
        // Baseline: the other address is the peer too.
        let r = probe.must_connect(&pod.net.pod, sa(OTHER_V4, PEER_PORT), As::User(APP_UID));
        assert_reached_peer(&r, "peer", sa(OTHER_V4, PEER_PORT), pod_ip);
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
        assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
        assert_captured_outbound(&probe, &pod, sa(OTHER_V4, PEER_PORT), As::User(APP_UID));
        // Inbound is not affected by an outbound exclusion.
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "inbound", Some(sa(pod_ip, APP_PORT)));
    });
}

#[test]
fn exclude_outbound_ports_reach_the_peer() {
    let cluster = Cluster::new("export");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "export",
            backend,
            injected(
                &[(
                    "traffic.sidecar.istio.io/excludeOutboundPorts",
                    &PEER_OTHER_PORT.to_string(),
                )],
                &[],
                None,
            ),
            Stack::V4,
        );
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let (pod_ip, peer_ip) = (pod.pod_ip(false), pod.peer_ip(false));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let r = probe.must_connect(
            &pod.net.pod,
            sa(peer_ip, PEER_OTHER_PORT),
            As::User(APP_UID),
        );
        assert_reached_peer(&r, "peer-other-port", sa(peer_ip, PEER_OTHER_PORT), pod_ip);
        assert_captured_outbound(&probe, &pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
    });
}

#[test]
fn exclude_inbound_ports_reach_the_app() {
    let cluster = Cluster::new("exin");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "exin",
            backend,
            injected(
                &[(
                    "traffic.sidecar.istio.io/excludeInboundPorts",
                    &APP_PORT.to_string(),
                )],
                &[],
                None,
            ),
            Stack::V4,
        );
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let pod_ip = pod.pod_ip(false);
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "app", None);
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, OTHER_APP_PORT), As::Root);
        assert_landed(&r, "inbound", Some(sa(pod_ip, OTHER_APP_PORT)));
        // The always-excluded health port stays excluded next to the annotation's ports.
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, 15021), As::Root);
        assert_landed(&r, "health", None);
        assert_captured_outbound(
            &probe,
            &pod,
            sa(pod.peer_ip(false), PEER_PORT),
            As::User(APP_UID),
        );
    });
}

#[test]
fn include_outbound_ip_ranges_limit_capture_to_that_range() {
    let cluster = Cluster::new("inip");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "inip",
            backend,
            injected(
                &[(
                    "traffic.sidecar.istio.io/includeOutboundIPRanges",
                    OTHER_RANGE,
                )],
                &[],
                None,
            ),
            Stack::V4,
        );
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let (pod_ip, peer_ip) = (pod.pod_ip(false), pod.peer_ip(false));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        // Inside the range: captured. Outside (the peer's link address): reaches the peer.
        assert_captured_outbound(&probe, &pod, sa(OTHER_V4, PEER_PORT), As::User(APP_UID));
        let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
        assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
        // Inbound is still captured.
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "inbound", Some(sa(pod_ip, APP_PORT)));
    });
}

#[test]
fn custom_proxy_uid_bypasses_and_1337_is_captured() {
    let cluster = Cluster::new("uid");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "uid",
            backend,
            injected(&[], &[], Some(CUSTOM_PROXY_UID)),
            Stack::V4,
        );
        let _world = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                proxy_uid: CUSTOM_PROXY_UID,
                ..WorldOpts::default()
            },
        );
        let (pod_ip, peer_ip) = (pod.pod_ip(false), pod.peer_ip(false));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let dst = sa(peer_ip, PEER_PORT);
        let r = probe.must_connect(&pod.net.pod, dst, As::User(CUSTOM_PROXY_UID));
        assert_reached_peer(&r, "peer", dst, pod_ip);
        assert_captured_outbound(&probe, &pod, dst, As::User(PROXY_UID));
        assert_captured_outbound(&probe, &pod, dst, As::User(APP_UID));
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "inbound", Some(sa(pod_ip, APP_PORT)));
    });
}

/// DNS stand-ins: the proxy's DNS listener on 15053 (UDP bound to 127.0.0.1 as Istio's DNS proxy, so conntrack
/// maps the answer back; TCP on all addresses) and real DNS servers on port 53 of the peer's link address.
fn start_dns(probe: &Probe, net: &PodNet, v6: bool) -> Vec<Listener> {
    let proxy = ListenOpts::user(PROXY_UID);
    let (any, localhost, peer): (IpAddr, IpAddr, IpAddr) = if v6 {
        (
            "::".parse().unwrap(),
            "::1".parse().unwrap(),
            net.addrs.peer_v6.unwrap().into(),
        )
    } else {
        (
            "0.0.0.0".parse().unwrap(),
            localhost_v4(),
            net.addrs.peer_v4.into(),
        )
    };
    vec![
        probe.listen(&net.pod, "dns-udp", sa(localhost, 15053), proxy.udp()),
        probe.listen(&net.pod, "dns-tcp", sa(any, 15053), proxy),
        probe.listen(
            &net.peer,
            "peer-dns-udp",
            sa(peer, 53),
            ListenOpts::root().udp(),
        ),
        probe.listen(&net.peer, "peer-dns-tcp", sa(peer, 53), ListenOpts::root()),
    ]
}

fn udp(probe: &Probe, pod: &TestPod, dst: SocketAddr, user: As) -> Report {
    probe
        .connect_with(&pod.net.pod, dst, user, Proto::Udp)
        .unwrap_or_else(|e| panic!("UDP {user:?} -> {dst}: {e}"))
}

#[test]
fn dns_capture_sends_the_apps_dns_to_15053() {
    let cluster = Cluster::new("dns");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "dns",
            backend,
            injected(&[], &[PROXY_ENV_DNS], None),
            Stack::V4,
        );
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let _dns = start_dns(&probe, &pod.net, false);
        let (pod_ip, dns) = (pod.pod_ip(false), sa(pod.peer_ip(false), 53));
        assert_landed(
            &udp(&probe, &pod, dns, As::User(APP_UID)),
            "peer-dns-udp",
            None,
        );
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        // The app's DNS, UDP and TCP, goes to the proxy's DNS listener.
        assert_landed(&udp(&probe, &pod, dns, As::User(APP_UID)), "dns-udp", None);
        let r = probe.must_connect(&pod.net.pod, dns, As::User(APP_UID));
        assert_landed(&r, "dns-tcp", Some(dns));
        // The proxy's own queries reach the real server.
        let r = udp(&probe, &pod, dns, As::User(PROXY_UID));
        assert_reached_peer(&r, "peer-dns-udp", dns, pod_ip);
        let r = probe.must_connect(&pod.net.pod, dns, As::User(PROXY_UID));
        assert_reached_peer(&r, "peer-dns-tcp", dns, pod_ip);
        // Other outbound traffic is captured as usual.
        assert_captured_outbound(
            &probe,
            &pod,
            sa(pod.peer_ip(false), PEER_PORT),
            As::User(APP_UID),
        );
    });
}

#[test]
fn without_dns_capture_dns_is_not_captured() {
    let cluster = Cluster::new("nodns");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod("nodns", backend, injected(&[], &[], None), Stack::V4);
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        let _dns = start_dns(&probe, &pod.net, false);
        let (pod_ip, dns) = (pod.pod_ip(false), sa(pod.peer_ip(false), 53));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let rules = pod.all_rules();
        assert!(
            !rules.iter().any(|l| l.contains("15053")),
            "DNS rules without ISTIO_META_DNS_CAPTURE: {rules:?}"
        );
        // UDP DNS reaches the server; TCP to port 53 is ordinary outbound traffic for the sidecar.
        let r = udp(&probe, &pod, dns, As::User(APP_UID));
        assert_reached_peer(&r, "peer-dns-udp", dns, pod_ip);
        assert_captured_outbound(&probe, &pod, dns, As::User(APP_UID));
    });
}

#[test]
fn ipv6_pod_is_captured_with_ip6tables() {
    let cluster = Cluster::new("v6");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod("v6", backend, injected(&[], &[], None), Stack::V6);
        let _world = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                v6: true,
                ..WorldOpts::default()
            },
        );
        assert_nothing_captured(&probe, &pod, true);
        pod.add();
        pod.assert_rules_in_backend_only(Family::V6);
        // Istio always programs IPv4 too.
        assert!(!pod.rules(Family::V4).is_empty());
        // The proxy's inbound passthrough from ::6 (Istio's InboundPassthroughClusterIpv6) is not captured.
        let v6 = pod.rules(Family::V6);
        let want = match pod.landing {
            Landing::Iptables(_) => "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN",
            Landing::Nftables => {
                "istio-proxy-nat istio-output: oifname \"lo\" ip6 saddr ::6 counter return"
            }
        };
        assert!(v6.iter().any(|l| l == want), "no {want:?} in {v6:?}");
        let lo = pod.net.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
        assert_eq!(lo.matches("inet6 ::6/128").count(), 1, "{lo}");
        assert_default_capture(&probe, &pod, true, "::1".parse().unwrap());
    });
}

#[test]
fn tproxy_inbound_keeps_the_original_destination() {
    let cluster = Cluster::new("tproxy");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "tproxy",
            backend,
            injected(
                &[("sidecar.istio.io/interceptionMode", "TPROXY")],
                &[],
                None,
            ),
            Stack::V4,
        );
        let _world = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                tproxy: true,
                ..WorldOpts::default()
            },
        );
        let (pod_ip, peer_ip) = (pod.pod_ip(false), pod.peer_ip(false));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        let v4 = pod.rules(Family::V4);
        let tproxy = |l: &String| match pod.landing {
            Landing::Iptables(_) => l.contains("-j TPROXY") && l.contains("--on-port 15006"),
            Landing::Nftables => {
                l.starts_with("istio-proxy-mangle ") && l.contains("tproxy ip to :15006")
            }
        };
        assert!(v4.iter().any(tproxy), "no TPROXY rule: {v4:?}");
        let rules = pod.net.pod.ip(&["-4", "rule", "show"]);
        assert_eq!(
            rules.matches("fwmark 0x539 lookup 133").count(),
            1,
            "{rules}"
        );
        let table = pod.net.pod.ip(&["-4", "route", "show", "table", "133"]);
        assert!(table.contains("local default dev lo"), "{table}");
        // Inbound: the transparent listener accepts with the original destination as its own address, and
        // sees the real client address (no NAT at all).
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "inbound", None);
        assert_eq!(r.local, Some(sa(pod_ip, APP_PORT)), "{r:?}");
        assert_eq!(r.peer.map(|p| p.ip()), Some(peer_ip), "{r:?}");
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, 15021), As::Root);
        assert_landed(&r, "health", None);
        // Outbound is still REDIRECTed to 15001; the proxy bypasses.
        assert_captured_outbound(&probe, &pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
        let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(PROXY_UID));
        assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
    });
}

/// Everything the plugin may have put in the pod netns: both families of every iptables flavour, the whole
/// nftables ruleset (without counter values), policy rules, every routing table, lo's addresses.
fn netns_state(pod: &TestPod) -> String {
    let ns = &pod.net.pod;
    [
        ns.save(Flavour::Legacy, Family::V4),
        ns.save(Flavour::Legacy, Family::V6),
        ns.save(Flavour::Nft, Family::V4),
        ns.save(Flavour::Nft, Family::V6),
        nft::ruleset(ns),
        ns.ip(&["-4", "rule", "show"]),
        ns.ip(&["-6", "rule", "show"]),
        ns.ip(&["-4", "route", "show", "table", "all"]),
        ns.ip(&["-6", "route", "show", "table", "all"]),
        ns.ip(&["addr", "show", "dev", "lo"]),
    ]
    .join("\n----\n")
}

/// No Istio line (chain or rule) appears twice in a table (an nftables rule twice in a chain): one copy of the
/// ruleset.
fn assert_one_copy(pod: &TestPod, family: Family) {
    let (lines, listing) = match pod.landing {
        Landing::Iptables(flavour) => {
            let save = pod.net.pod.save(flavour, family);
            let lines = istio_by_table(&save)
                .into_iter()
                .flat_map(|(table, lines)| lines.into_iter().map(move |l| format!("{table} {l}")))
                .collect::<Vec<_>>();
            (lines, save)
        }
        Landing::Nftables => (pod.all_rules(), nft::ruleset(&pod.net.pod)),
    };
    let mut seen = std::collections::BTreeSet::new();
    for l in &lines {
        assert!(seen.insert(l), "{family:?}: twice: {l}\n{listing}");
    }
}

#[test]
fn second_add_keeps_one_copy_and_del_succeeds() {
    let cluster = Cluster::new("twice");
    let probe = netprobe!();
    let cases: [(&str, Value, Stack); 3] = [
        ("twice", injected(&[], &[], None), Stack::V4),
        (
            "twice-tp",
            injected(
                &[("sidecar.istio.io/interceptionMode", "TPROXY")],
                &[PROXY_ENV_DNS],
                None,
            ),
            Stack::V4,
        ),
        ("twice-v6", injected(&[], &[PROXY_ENV_DNS], None), Stack::V6),
    ];
    for_each_backend(|backend| {
        for (tag, spec, stack) in &cases {
            let v6 = *stack == Stack::V6;
            let pod = cluster.pod(tag, backend, spec.clone(), *stack);
            pod.add();
            let first = netns_state(&pod);
            let family = if v6 { Family::V6 } else { Family::V4 };
            pod.assert_rules_in_backend_only(family);
            assert_one_copy(&pod, Family::V4);
            assert_one_copy(&pod, Family::V6);
            pod.add();
            assert_eq!(
                netns_state(&pod),
                first,
                "{tag}: a second ADD changed the netns"
            );
            // Still working after the second ADD.
            let tproxy = *tag == "twice-tp";
            let _world = start_world(
                &probe,
                &pod.net,
                WorldOpts {
                    v6,
                    tproxy,
                    ..WorldOpts::default()
                },
            );
            assert_captured_outbound(
                &probe,
                &pod,
                sa(pod.peer_ip(v6), PEER_PORT),
                As::User(APP_UID),
            );
            let r = probe.must_connect(&pod.net.peer, sa(pod.pod_ip(v6), APP_PORT), As::Root);
            let orig = (!tproxy).then(|| sa(pod.pod_ip(v6), APP_PORT));
            assert_landed(&r, "inbound", orig);
            // DEL succeeds, twice, and with an empty CNI_NETNS (the runtime's cleanup after the netns is gone).
            let path = pod.net.pod.path().display().to_string();
            pod.del(&path);
            pod.del(&path);
            pod.del("");
        }
    });
}

#[test]
fn non_injected_pod_gets_no_rule_and_no_capture() {
    let cluster = Cluster::new("plain");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod("plain", backend, plain_pod(), Stack::V4);
        let _world = start_world(&probe, &pod.net, WorldOpts::default());
        pod.add();
        pod.assert_no_rules_at_all();
        assert_nothing_captured(&probe, &pod, false);
        let peer = sa(pod.peer_ip(false), PEER_PORT);
        let r = probe.must_connect(&pod.net.pod, peer, As::User(PROXY_UID));
        assert_reached_peer(&r, "peer", peer, pod.pod_ip(false));
        let r = probe.must_connect(&pod.net.peer, sa(pod.pod_ip(false), 15021), As::Root);
        assert_landed(&r, "health", None);
    });
}

#[test]
fn ipv6_dns_capture_sends_the_apps_dns_to_15053() {
    let cluster = Cluster::new("v6dns");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "v6dns",
            backend,
            injected(&[], &[PROXY_ENV_DNS], None),
            Stack::V6,
        );
        let _world = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                v6: true,
                ..WorldOpts::default()
            },
        );
        let _dns = start_dns(&probe, &pod.net, true);
        let (pod_ip, dns) = (pod.pod_ip(true), sa(pod.peer_ip(true), 53));
        let r = udp(&probe, &pod, dns, As::User(APP_UID));
        assert_reached_peer(&r, "peer-dns-udp", dns, pod_ip);
        pod.add();
        pod.assert_rules_in_backend_only(Family::V6);
        assert_landed(&udp(&probe, &pod, dns, As::User(APP_UID)), "dns-udp", None);
        let r = probe.must_connect(&pod.net.pod, dns, As::User(APP_UID));
        assert_landed(&r, "dns-tcp", Some(dns));
        let r = udp(&probe, &pod, dns, As::User(PROXY_UID));
        assert_reached_peer(&r, "peer-dns-udp", dns, pod_ip);
    });
}

#[test]
fn ipv6_tproxy_inbound_keeps_the_original_destination() {
    let cluster = Cluster::new("v6tp");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "v6tp",
            backend,
            injected(
                &[("sidecar.istio.io/interceptionMode", "TPROXY")],
                &[],
                None,
            ),
            Stack::V6,
        );
        let _world = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                v6: true,
                tproxy: true,
                ..WorldOpts::default()
            },
        );
        let (pod_ip, peer_ip) = (pod.pod_ip(true), pod.peer_ip(true));
        pod.add();
        pod.assert_rules_in_backend_only(Family::V6);
        let rules = pod.net.pod.ip(&["-6", "rule", "show"]);
        assert_eq!(
            rules.matches("fwmark 0x539 lookup 133").count(),
            1,
            "{rules}"
        );
        let r = probe.must_connect(&pod.net.peer, sa(pod_ip, APP_PORT), As::Root);
        assert_landed(&r, "inbound", None);
        assert_eq!(r.local, Some(sa(pod_ip, APP_PORT)), "{r:?}");
        assert_eq!(r.peer.map(|p| p.ip()), Some(peer_ip), "{r:?}");
        assert_captured_outbound(&probe, &pod, sa(peer_ip, PEER_PORT), As::User(APP_UID));
        let r = probe.must_connect(&pod.net.pod, sa(peer_ip, PEER_PORT), As::User(PROXY_UID));
        assert_reached_peer(&r, "peer", sa(peer_ip, PEER_PORT), pod_ip);
    });
}

/// Istio's `getLocalIP`: a dual-stack pod gets IPv6 rules only with `ISTIO_DUAL_STACK` (else the first address,
/// IPv4, decides: the iptables backends then leave IPv6 traffic alone, as Istio's iptables mode does; the
/// nftables ruleset, family-less where it names no address, still captures it, as Istio's nftables mode does).
#[test]
fn dual_stack_pod_is_captured_in_both_families_with_istio_dual_stack() {
    let cluster = Cluster::new("dual");
    let probe = netprobe!();
    for_each_backend(|backend| {
        let pod = cluster.pod(
            "dual",
            backend,
            injected(&[], &[("ISTIO_DUAL_STACK", "true")], None),
            Stack::Dual,
        );
        let _world4 = start_world(&probe, &pod.net, WorldOpts::default());
        let _world6 = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                v6: true,
                ..WorldOpts::default()
            },
        );
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        pod.assert_rules_in_backend_only(Family::V6);
        assert_default_capture(&probe, &pod, false, localhost_v4());
        assert_default_capture(&probe, &pod, true, "::1".parse().unwrap());
        drop((_world4, _world6, pod));

        let pod = cluster.pod("single", backend, injected(&[], &[], None), Stack::Dual);
        let _world6 = start_world(
            &probe,
            &pod.net,
            WorldOpts {
                v6: true,
                ..WorldOpts::default()
            },
        );
        pod.add();
        pod.assert_rules_in_backend_only(Family::V4);
        assert!(pod.rules(Family::V6).is_empty());
        match pod.landing {
            Landing::Iptables(_) => assert_nothing_captured(&probe, &pod, true),
            // Istio's nftables ruleset names a family only where it names an address: its family-less rules
            // (`jump istio-redirect`, the inbound capture, the owner and loopback returns) capture IPv6 in the
            // same inet tables, with no IPv6 rule at all, as Istio's own nftables mode does (see its
            // kube-virt-interfaces golden: `enable_ipv6` off, `istio-output counter jump istio-redirect`).
            Landing::Nftables => assert_default_capture(&probe, &pod, true, "::1".parse().unwrap()),
        }
    });
}

/// The default entry (no `iptables_backend`) and "auto" detect the flavour per pod netns, as Istio does.
#[test]
fn auto_backend_detects_the_flavour_per_netns() {
    let cluster = Cluster::new("auto");
    let probe = netprobe!();
    require_root();
    // A fresh netns: iptables-nft.
    let pod = cluster.pod_with(
        "auto-default",
        json!({}),
        Landing::Iptables(Flavour::Nft),
        injected(&[], &[], None),
        Stack::V4,
    );
    let world = start_world(&probe, &pod.net, WorldOpts::default());
    pod.add();
    pod.assert_rules_in_backend_only(Family::V4);
    assert_default_capture(&probe, &pod, false, localhost_v4());
    drop((world, pod));
    // A netns where iptables-legacy already holds a rule: legacy.
    let pod = cluster.pod_with(
        "auto-legacy",
        json!({"iptables_backend": "auto"}),
        Landing::Iptables(Flavour::Legacy),
        injected(&[], &[], None),
        Stack::V4,
    );
    pod.net.pod.iptables(
        Flavour::Legacy,
        Family::V4,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "1", "-j", "ACCEPT",
        ],
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    pod.add();
    pod.assert_rules_in_backend_only(Family::V4);
    assert_default_capture(&probe, &pod, false, localhost_v4());
}

/// `iptables_backend: "nftables"` selects the native backend too (the other spelling of `native_nftables`).
#[test]
fn iptables_backend_nftables_is_the_native_backend() {
    let cluster = Cluster::new("nftkey");
    let probe = netprobe!();
    require_root();
    let pod = cluster.pod_with(
        "nftkey",
        json!({"iptables_backend": "nftables"}),
        Landing::Nftables,
        injected(&[], &[], None),
        Stack::V4,
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    assert_nothing_captured(&probe, &pod, false);
    pod.add();
    pod.assert_rules_in_backend_only(Family::V4);
    assert_eq!(
        nft::istio_tables(&pod.net.pod),
        ["istio-proxy-nat"],
        "{}",
        nft::ruleset(&pod.net.pod)
    );
    assert_default_capture(&probe, &pod, false, localhost_v4());
}

/// The CNI error of a failed ADD: its code and message (`msg`).
fn add_error(out: &PluginOutput) -> (Option<u64>, String) {
    assert!(!out.success, "ADD succeeded: {out:?}");
    let msg = out.json()["msg"].as_str().unwrap_or_default().to_string();
    (out.error_code(), msg)
}

/// On a kernel without netfilter netlink (no nf_tables at all) the native backend's ADD fails with a CNI error
/// naming the backend and what the kernel lacks, and leaves nothing. Provoked for real: the plugin runs under
/// `meshcni-no-nfnetlink`, whose seccomp filter answers `socket(AF_NETLINK, _, NETLINK_NETFILTER)` with
/// `EPROTONOSUPPORT` as such a kernel does. The same wrapper around an iptables-legacy ADD (which needs no
/// netfilter netlink) succeeds and captures: the filter takes away nf_tables and nothing else.
#[test]
fn without_nf_tables_the_native_add_fails_naming_the_backend() {
    let cluster = Cluster::new("nonft");
    let probe = netprobe!();
    require_root();
    let wrapped = |pod: &TestPod| {
        let mut inv = pod.invocation("ADD", &pod.net.pod.path().display().to_string());
        inv.env.push((
            "MESHCNI_WRAPPED".to_string(),
            plugin_bin().display().to_string(),
        ));
        inv.bin = env!("CARGO_BIN_EXE_meshcni-no-nfnetlink").into();
        inv.run_with_timeout(PLUGIN_TIMEOUT)
    };

    let pod = cluster.pod(
        "nonft",
        Backend::Nftables,
        injected(&[], &[], None),
        Stack::V4,
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    let out = wrapped(&pod);
    let (code, msg) = add_error(&out);
    assert_eq!(code, Some(103), "{out:?}");
    assert!(
        msg.contains("nftables: the kernel has no nf_tables support (netfilter netlink socket: EPROTONOSUPPORT"),
        "{msg}"
    );
    assert!(msg.contains("default/nonft-nftables"), "{msg}");
    pod.assert_no_rules_at_all();
    assert_nothing_captured(&probe, &pod, false);
    drop((_world, pod));

    let pod = cluster.pod(
        "nonft",
        Backend::Legacy,
        injected(&[], &[], None),
        Stack::V4,
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    let out = wrapped(&pod);
    assert!(out.success, "iptables-legacy under the filter: {out:?}");
    pod.assert_rules_in_backend_only(Family::V4);
    assert_default_capture(&probe, &pod, false, localhost_v4());
}

/// `nft -i` inside a netns, holding a table of its own (`flags owner`: only its socket may change or delete it)
/// while it runs; killed (by its pid) when dropped, and the kernel drops the table with its socket.
struct OwnedTable {
    child: std::process::Child,
}

impl OwnedTable {
    fn hold(ns: &TestNetns, table: &str) -> OwnedTable {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = ns
            .run(|| {
                Command::new("nft")
                    .arg("-i")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .unwrap_or_else(|e| panic!("cannot start nft -i: {e}"));
        let stdin = child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "add table inet {table} {{ flags owner; }}").expect("write to nft -i");
        stdin.flush().expect("flush nft -i");
        let held = OwnedTable { child };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !nft::tables(ns).contains(&format!("inet {table}")) {
            assert!(
                std::time::Instant::now() < deadline,
                "nft -i did not create {table}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        held
    }
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A batch the kernel refuses in its middle, through the real binary: after a first ADD (REDIRECT: table nat),
/// another process holds `inet istio-proxy-raw` as its own (`flags owner`). The next ADD (TPROXY with DNS
/// capture: nat, mangle, raw) must replace all three in one batch; the kernel accepts the deletion of nat, then
/// refuses that of raw (EPERM), so the whole transaction goes: the ADD fails naming the backend and the table,
/// the first ADD's rules are there exactly as before and still capture, no mangle table, the other process's
/// table untouched.
#[test]
fn a_batch_refused_in_its_middle_changes_nothing_through_the_plugin() {
    let cluster = Cluster::new("owned");
    let probe = netprobe!();
    require_root();
    let pod = cluster.pod(
        "owned",
        Backend::Nftables,
        injected(&[], &[], None),
        Stack::V4,
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    pod.add();
    let before = nft::ruleset(&pod.net.pod);
    assert_eq!(nft::istio_tables(&pod.net.pod), ["istio-proxy-nat"]);
    let _owner = OwnedTable::hold(&pod.net.pod, "istio-proxy-raw");
    let with_owner = nft::ruleset(&pod.net.pod);

    let tproxy = injected(
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        &[PROXY_ENV_DNS],
        None,
    );
    let mut tproxy = tproxy;
    tproxy["metadata"]["name"] = json!(pod.name);
    cluster.srv.add_pod(tproxy).unwrap();
    let out = pod.run("ADD");
    let (code, msg) = add_error(&out);
    assert_eq!(code, Some(103), "{out:?}");
    assert!(
        msg.contains(
            "nftables: the kernel refused the deletion of table inet istio-proxy-raw: EPERM"
        ),
        "{msg}"
    );
    assert_eq!(
        nft::ruleset(&pod.net.pod),
        with_owner,
        "the refused batch changed the ruleset"
    );
    assert!(with_owner.starts_with(&before), "{with_owner}");
    assert_eq!(
        nft::istio_tables(&pod.net.pod),
        ["istio-proxy-nat", "istio-proxy-raw"]
    );
    // No TPROXY route either, and the REDIRECT rules still capture.
    let rules = pod.net.pod.ip(&["-4", "rule", "show"]);
    assert!(!rules.contains("lookup 133"), "{rules}");
    assert_default_capture(&probe, &pod, false, localhost_v4());
}

/// The batch's last message refused by the kernel, through the real binary: the `nft_refuse_last` shim (preloaded
/// into the plugin) renames the chain of the batch's last rule, so the kernel refuses exactly that message
/// (ENOENT) and with it the whole transaction. Into a fresh netns: the ADD fails naming the backend and the rule,
/// and no table of ours exists, nothing is captured. Over the rules of an earlier ADD (REDIRECT; the new capture
/// adds DNS capture, so its batch deletes nat and ends with the rules of a new raw table): the earlier ruleset
/// stays exactly as it was and still captures, no raw table. Native nftables never leaves a mix: nothing on a
/// first ADD, the previous rules on a repeated one. Without the shim the same ADDs succeed (the control).
#[test]
fn a_batch_refused_at_its_last_message_leaves_nothing_or_the_previous_rules() {
    let cluster = Cluster::new("lastmsg");
    let probe = netprobe!();
    require_root();
    let shim = meshcni_tests::preload::nft_refuse_last();
    let marker = cluster.run_dir.join("preload-marker");
    let preloaded = |pod: &TestPod| {
        let _ = std::fs::remove_file(&marker);
        let out = pod
            .invocation("ADD", &pod.net.pod.path().display().to_string())
            .env("LD_PRELOAD", shim.display().to_string())
            .env("MESHCNI_PRELOAD_MARKER", marker.display().to_string())
            .run_with_timeout(PLUGIN_TIMEOUT);
        let fired = std::fs::read_to_string(&marker).unwrap_or_default();
        (out, fired)
    };
    // The marker names the message the shim changed: the one before BATCH_END, i.e. the last.
    let assert_last = |fired: &str, chain: &str| {
        let (index, count) = fired
            .trim()
            .strip_prefix("message ")
            .and_then(|l| l.split_once(": chain "))
            .and_then(|(pos, c)| (c == chain).then_some(pos))
            .and_then(|pos| pos.split_once(" of "))
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("the shim did not fire once on chain {chain}: {fired:?}"));
        assert_eq!(index + 2, count, "not the last message: {fired}");
    };

    let pod = cluster.pod(
        "lastmsg",
        Backend::Nftables,
        injected(&[], &[], None),
        Stack::V4,
    );
    let _world = start_world(&probe, &pod.net, WorldOpts::default());
    let (out, fired) = preloaded(&pod);
    let (code, msg) = add_error(&out);
    assert_eq!(code, Some(103), "{out:?}");
    assert!(
        msg.contains("nftables: the kernel refused rule \"add rule inet istio-proxy-nat ")
            && msg.ends_with(": ENOENT: No such file or directory"),
        "{msg}"
    );
    assert!(msg.contains("default/lastmsg-nftables"), "{msg}");
    assert_last(&fired, "istio-output");
    pod.assert_no_rules_at_all();
    assert_nothing_captured(&probe, &pod, false);
    // The control: the same ADD without the shim.
    pod.add();
    assert_default_capture(&probe, &pod, false, localhost_v4());
    let before = nft::ruleset(&pod.net.pod);
    assert_eq!(nft::istio_tables(&pod.net.pod), ["istio-proxy-nat"]);

    let mut dns = injected(&[], &[PROXY_ENV_DNS], None);
    dns["metadata"]["name"] = json!(pod.name);
    cluster.srv.add_pod(dns).unwrap();
    let (out, fired) = preloaded(&pod);
    let (code, msg) = add_error(&out);
    assert_eq!(code, Some(103), "{out:?}");
    assert!(
        msg.contains("nftables: the kernel refused rule \"add rule inet istio-proxy-raw "),
        "{msg}"
    );
    assert_last(&fired, "istio-output-dns");
    assert_eq!(
        nft::ruleset(&pod.net.pod),
        before,
        "the refused batch changed the ruleset"
    );
    assert_default_capture(&probe, &pod, false, localhost_v4());
    // The control: without the shim the DNS capture replaces the rules (raw table and all).
    pod.add();
    assert_eq!(
        nft::istio_tables(&pod.net.pod),
        ["istio-proxy-nat", "istio-proxy-raw"]
    );
}
