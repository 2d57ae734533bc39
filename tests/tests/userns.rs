//! Pods with their own user namespace (`hostUsers: false`), for real (root): a pod netns owned by a child user
//! namespace mapping pod ids 0-65535 to host 200000.. ([`UsernsPodNet`]), the stand-in sidecar and the app
//! running inside that user namespace as pod uids 1337 and 1000.
//!
//! - the kernel refuses owner rules written from the host's user namespace into such a netns (the failure the
//!   plugin had), and accepts them from inside it ([`exec::spawn_in_userns`]), where the saves then equal the
//!   canonical save of a scratch netns of the host's user namespace (what the plugin compares with);
//! - the real `istio-cni` binary, ADD through the API stub, on every backend of [`BACKENDS`]: the app's outbound
//!   connection is captured with its original destination, the proxy's own connection bypasses, inbound is
//!   redirected, for IPv4 and IPv6; a repeated ADD leaves the same rules, still capturing. Native nftables needs
//!   no user-namespace switch for this: its `meta skuid` written from the host's user namespace is mapped
//!   through the netns's owner, so it already means the pod's uid 1337 (the traffic checks prove it).
//!
//! A "not captured" check always sits next to a "captured" one (and a baseline before the ADD), so rules that
//! do nothing cannot pass. Netns, listeners, the holder process and the run dir go away on drop, also when a
//! check fails; the host's rules are compared before and after.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use cni_plugin::apply::exec::{self, spawn_in_userns};
use cni_plugin::apply::iptables::XTABLES_LOCKFILE_ENV;
use cni_plugin::apply::{sandbox, Family, Flavour, IptablesEnv};
use cni_plugin::netns::{run_in_scratch_netns, Netns, Userns, PROCESS_USERNS_PATH};
use cni_plugin::rules::render_iptables;
use meshcni_tests::apiserver::sample_pod;
use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use meshcni_tests::e2e::{for_each_case, StubCluster};
use meshcni_tests::netns::{
    by_table, host_snapshot, normalize_save, plugin_capture, require_root, TestNetns,
};
use meshcni_tests::netprobe;
use meshcni_tests::traffic::{assert_landed, As, ListenOpts, Listener, Probe, Report};
use meshcni_tests::userns::{host_id, host_uid_of, userns_of, UsernsNetns, UsernsPodNet, ID_COUNT};
use serde_json::{json, Value};

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
const PEER_PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// An owner rule as the plugin's rules have them, alone.
const OWNER_RULE: [&str; 10] = [
    "-t",
    "nat",
    "-A",
    "OUTPUT",
    "-m",
    "owner",
    "--uid-owner",
    "1337",
    "-j",
    "RETURN",
];

/// A firewall backend as a conflist entry selects it, and how to list what it programmed.
struct Backend {
    name: &'static str,
    /// Keys merged into the plugin's conflist entry (a JSON object).
    entry: &'static str,
    /// Commands run inside the pod netns (from the host's user namespace) that list its rules; ours show as
    /// `ISTIO` chains (any case).
    list: &'static [&'static [&'static str]],
    /// The outcome the plugin logs for a repeated ADD of the same rules: the iptables backends compare and
    /// leave them (`Unchanged`), native nftables replaces them in one transaction (`Replaced`).
    repeated: &'static str,
}

/// Every backend the plugin has. Another one is one more entry.
const BACKENDS: &[Backend] = &[
    Backend {
        name: "iptables-legacy",
        entry: r#"{"iptables_backend": "legacy"}"#,
        list: &[&["iptables-legacy-save"], &["ip6tables-legacy-save"]],
        repeated: "Unchanged",
    },
    Backend {
        name: "iptables-nft",
        entry: r#"{"iptables_backend": "nft"}"#,
        list: &[&["iptables-nft-save"], &["ip6tables-nft-save"]],
        repeated: "Unchanged",
    },
    Backend {
        name: "native nftables",
        entry: r#"{"native_nftables": true}"#,
        // Without counter values: a listing after traffic equals one before.
        list: &[&["nft", "--stateless", "list", "ruleset"]],
        repeated: "Replaced",
    },
];

impl Backend {
    fn entry(&self) -> serde_json::Map<String, Value> {
        match serde_json::from_str(self.entry) {
            Ok(Value::Object(m)) => m,
            other => panic!(
                "{}: entry {} is not a JSON object: {other:?}",
                self.name, self.entry
            ),
        }
    }

    /// What the backend lists in `ns`, normalised (no timestamps nor counters).
    fn listing(&self, ns: &TestNetns) -> String {
        self.list
            .iter()
            .map(|cmd| normalize_save(&ns.must(cmd[0], &cmd[1..])))
            .collect()
    }

    /// What the backend lists in `ns`, in a form two listings of the same rules compare equal in: an iptables
    /// save per table (iptables-legacy-save prints tables in the order they were first used), an nft listing
    /// line by line as it is (nft lists in a fixed order), under its command.
    fn comparable(&self, ns: &TestNetns) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for cmd in self.list {
            let text = normalize_save(&ns.must(cmd[0], &cmd[1..]));
            if cmd[0] == "nft" {
                out.insert(cmd.join(" "), text.lines().map(str::to_string).collect());
            } else {
                out.extend(by_table(&text));
            }
        }
        assert!(!out.is_empty(), "{}: nothing listed", self.name);
        out
    }

    fn slug(&self) -> String {
        self.name.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    }
}

/// Runs `check` once per backend; all run, then the test fails naming every backend that failed.
fn for_each_backend(check: impl FnMut(&Backend)) {
    require_root();
    for_each_case(BACKENDS, |b| b.name.to_string(), check);
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The user namespace owning `ns` (panics when it is ours).
fn owner_of(ns: &TestNetns) -> Userns {
    Netns::open(ns.path())
        .and_then(|n| n.owner_userns())
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{} is not owned by another user namespace", ns.name()))
}

/// Where a tool runs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    /// The host's user namespace: how the plugin ran its tools before the fix.
    HostUserns,
    /// The netns's own user namespace, in the plugin's sandbox with the netns file as the lock: how it runs them now.
    PodUserns,
}

/// Runs `binary args` inside `ns` from `from`; returns stdout or the error's message.
fn tool(
    ns: &TestNetns,
    from: From,
    binary: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    let bin = exec::find_binary(binary).unwrap_or_else(|e| panic!("{e}"));
    let result = match from {
        From::HostUserns => ns.run(|| exec::run(&bin, args, &[], stdin, TOOL_TIMEOUT)),
        From::PodUserns => {
            let owner = owner_of(ns);
            // The plugin's lock for the legacy tools: the netns file itself, as its tools name it.
            let lock = std::path::Path::new(IptablesEnv::LEGACY_LOCK);
            ns.run(|| {
                sandbox::enter(Some(lock));
                let env = [(XTABLES_LOCKFILE_ENV, lock.as_os_str())];
                spawn_in_userns(&bin, args, &env, stdin.is_some(), Some(owner.as_fd()))
                    .and_then(|r| r.finish(stdin, TOOL_TIMEOUT))
            })
        }
    };
    result.map_err(|e| e.to_string())
}

/// The plugin's rules for Istio's "basic" plugin case (owner matches for the proxy's uid and gid 1337).
fn payload(family: Family) -> String {
    let rs = render_iptables(&plugin_capture("basic", true));
    match family {
        Family::V4 => rs.v4,
        Family::V6 => rs.v6.expect("rendered with IPv6 enabled"),
    }
}

#[test]
fn host_userns_owner_rules_are_refused_and_pod_userns_ones_load_and_save_alike() {
    require_root();
    let host_before = host_snapshot();
    let cases = [Flavour::Legacy, Flavour::Nft]
        .into_iter()
        .flat_map(|fl| [(fl, Family::V4), (fl, Family::V6)]);
    for_each_case(
        cases,
        |c| format!("{c:?}"),
        |(fl, fam)| owner_rules_in_a_pod_userns(fl, fam),
    );
    assert_eq!(host_snapshot(), host_before, "the host's own rules changed");
}

fn owner_rules_in_a_pod_userns(flavour: Flavour, family: Family) {
    let pod = UsernsNetns::new("uns-direct");
    let ns = pod.netns();
    let single = flavour.restore_binary(family).replace("-restore", "");
    let restore = flavour.restore_binary(family);
    let save = flavour.save_binary(family);
    let text = payload(family);

    // Without the fix: the kernel refuses an owner rule written from the host's user namespace (EINVAL), and
    // so the plugin's whole ruleset; the same rule without the owner match is accepted.
    let e = tool(ns, From::HostUserns, &single, &OWNER_RULE, None)
        .expect_err("owner rule from the host userns");
    assert!(e.contains("Invalid argument"), "{e}");
    let e = tool(ns, From::HostUserns, &restore, &["--noflush"], Some(&text))
        .expect_err("the plugin's ruleset from the host userns");
    assert!(e.contains("failed"), "{e}");
    tool(
        ns,
        From::HostUserns,
        &single,
        &["-t", "nat", "-A", "OUTPUT", "-j", "RETURN"],
        None,
    )
    .unwrap_or_else(|e| panic!("a rule without owner match: {e}"));
    tool(
        ns,
        From::HostUserns,
        &single,
        &["-t", "nat", "-D", "OUTPUT", "-j", "RETURN"],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let empty = normalize_save(&tool(ns, From::HostUserns, &save, &[], None).unwrap());
    assert!(
        !empty.contains("ISTIO") && !empty.contains("owner"),
        "{empty}"
    );

    // With it: from inside the pod's user namespace, with the plugin's lock (the netns file) and sandbox.
    tool(ns, From::PodUserns, &restore, &["--noflush"], Some(&text))
        .unwrap_or_else(|e| panic!("the ruleset from the pod userns: {e}"));
    let host_view = normalize_save(&tool(ns, From::HostUserns, &save, &[], None).unwrap());
    let pod_view = normalize_save(&tool(ns, From::PodUserns, &save, &[], None).unwrap());
    assert!(
        host_view.contains("--uid-owner 1337"),
        "saves show the pod's uid: {host_view}"
    );
    assert_eq!(
        by_table(&host_view),
        by_table(&pod_view),
        "host and pod userns saves differ"
    );
    // The canonical save the plugin compares with: the same payload in a scratch netns of the host's userns.
    let bin_restore = exec::find_binary(&restore).unwrap();
    let bin_save = exec::find_binary(&save).unwrap();
    let canonical = run_in_scratch_netns(|| {
        exec::run(&bin_restore, &["--noflush"], &[], Some(&text), TOOL_TIMEOUT)?;
        exec::run(&bin_save, &[], &[], None, TOOL_TIMEOUT)
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        by_table(&normalize_save(&canonical)),
        by_table(&pod_view),
        "the pod netns's save differs from the canonical one"
    );
}

#[test]
fn probes_run_inside_the_pod_userns_as_pod_uids() {
    require_root();
    let probe = netprobe!();
    let pod = UsernsPodNet::new("uns-probe", false);
    let any: IpAddr = "0.0.0.0".parse().unwrap();
    let app = probe.listen(
        &pod.net.pod,
        "app",
        sa(any, APP_PORT),
        ListenOpts::user(APP_UID),
    );
    let proxy = probe.listen(
        &pod.net.pod,
        "outbound",
        sa(any, 15001),
        ListenOpts::user(PROXY_UID),
    );
    for (l, uid) in [(&app, APP_UID), (&proxy, PROXY_UID)] {
        assert_eq!(host_uid_of(l.pid()), [host_id(uid); 4], "{}", l.name);
        assert_eq!(userns_of(l.pid()), pod.userns(), "{}", l.name);
    }
    let r = probe.must_connect(&pod.net.peer, sa(pod.net.addrs.pod_v4, APP_PORT), As::Root);
    assert_landed(&r, "app", None);
    assert_eq!(
        r.uid, APP_UID,
        "the listener sees itself as the pod's uid: {r:?}"
    );
    let r = probe.must_connect(
        &pod.net.pod,
        sa(pod.net.addrs.pod_v4, 15001),
        As::User(APP_UID),
    );
    assert_eq!((r.name.as_str(), r.uid), ("outbound", PROXY_UID), "{r:?}");
}

/// An injected pod with `hostUsers: false`, its netns pair, and the ADD of the plugin for one backend.
struct UsernsPod<'a> {
    cluster: &'a StubCluster,
    net: UsernsPodNet,
    backend: &'a Backend,
    name: String,
    prev: Value,
}

impl<'a> UsernsPod<'a> {
    fn new(cluster: &'a StubCluster, backend: &'a Backend) -> UsernsPod<'a> {
        let name = format!("uns-{}", backend.slug());
        let mut pod = sample_pod("default", &name);
        pod["spec"]["hostUsers"] = json!(false);
        // Dual-stack rules (ip6tables too) need the proxy's ISTIO_DUAL_STACK, as with Istio.
        let proxy = pod["spec"]["containers"]
            .as_array_mut()
            .and_then(|cs| cs.iter_mut().find(|c| c["name"] == "istio-proxy"))
            .expect("sample pod has istio-proxy");
        proxy["env"] = json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]);
        cluster.srv.add_pod(pod).unwrap();
        let net = UsernsPodNet::new(&name, true);
        let a = net.net.addrs;
        let (pod_v6, peer_v6) = (a.pod_v6.unwrap(), a.peer_v6.unwrap());
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": net.net.pod.path()}],
            "ips": [
                {"address": format!("{}/24", a.pod_v4), "gateway": a.peer_v4, "interface": 0},
                {"address": format!("{pod_v6}/64"), "gateway": peer_v6, "interface": 0},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": a.peer_v4}, {"dst": "::/0", "gw": peer_v6}],
            "dns": {}
        });
        UsernsPod {
            cluster,
            net,
            backend,
            name,
            prev,
        }
    }

    fn add(&self) -> PluginOutput {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "cni_agent_run_dir": self.cluster.run_dir, "plugin_log_level": "debug",
            "pod_lookup_timeout_seconds": 5, "prevResult": self.prev,
        });
        for (k, v) in self.backend.entry() {
            conf[k] = v;
        }
        let out = Invocation::new(plugin_bin())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("ctr-{}", self.name))
            .env("CNI_NETNS", self.net.net.pod.path().display().to_string())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=ctr-{}",
                    self.name, self.name
                ),
            )
            .stdin(serde_json::to_vec(&conf).unwrap())
            .run_with_timeout(PLUGIN_TIMEOUT);
        assert!(out.success, "ADD of {} failed: {out:?}", self.name);
        assert_eq!(out.json(), self.prev, "ADD must print the prevResult");
        out
    }
}

/// The outcome fields of the plugin's "rules programmed" log line.
fn programmed(out: &PluginOutput) -> (String, String) {
    out.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "rules programmed")
        .map(|v| {
            let f = &v["fields"];
            (
                f["v4"].as_str().unwrap_or("").to_string(),
                f["v6"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_else(|| panic!("no 'rules programmed' log line: {}", out.stderr))
}

/// In the pod (inside its user namespace): Envoy's outbound and inbound listeners as pod uid 1337, the app as
/// pod uid 1000; in the peer: a server on port 80.
fn start_world(probe: &Probe, net: &UsernsPodNet, v6: bool) -> Vec<Listener> {
    let any: IpAddr = if v6 { "::" } else { "0.0.0.0" }.parse().unwrap();
    let pod = &net.net.pod;
    let world = vec![
        probe.listen(pod, "outbound", sa(any, 15001), ListenOpts::user(PROXY_UID)),
        probe.listen(pod, "inbound", sa(any, 15006), ListenOpts::user(PROXY_UID)),
        probe.listen(pod, "app", sa(any, APP_PORT), ListenOpts::user(APP_UID)),
        probe.listen(
            &net.net.peer,
            "peer",
            sa(any, PEER_PORT),
            ListenOpts::root(),
        ),
    ];
    for l in &world[..3] {
        assert_eq!(
            userns_of(l.pid()),
            net.userns(),
            "{} runs in the pod's user namespace",
            l.name
        );
    }
    world
}

#[track_caller]
fn assert_reached_peer(r: &Report, dst: SocketAddr, from: IpAddr) {
    assert_landed(r, "peer", None);
    assert_eq!(r.local, Some(dst), "{r:?}");
    assert_eq!(r.peer.map(|p| p.ip()), Some(from), "{r:?}");
}

fn addrs(net: &UsernsPodNet, v6: bool) -> (IpAddr, IpAddr) {
    let a = net.net.addrs;
    if v6 {
        (a.pod_v6.unwrap().into(), a.peer_v6.unwrap().into())
    } else {
        (a.pod_v4.into(), a.peer_v4.into())
    }
}

#[test]
fn add_into_a_pod_userns_captures_the_app_and_lets_the_proxy_bypass() {
    let cluster = StubCluster::new("uns");
    let probe = netprobe!();
    let host_before = host_snapshot();
    for_each_backend(|backend| {
        let pod = UsernsPod::new(&cluster, backend);
        let _world: Vec<Listener> = [false, true]
            .into_iter()
            .flat_map(|v6| start_world(&probe, &pod.net, v6))
            .collect();
        let (pod_ns, peer_ns) = (&pod.net.net.pod, &pod.net.net.peer);
        // Baseline: nothing captured yet.
        for v6 in [false, true] {
            let (pod_ip, peer_ip) = addrs(&pod.net, v6);
            let r = probe.must_connect(pod_ns, sa(peer_ip, PEER_PORT), As::User(APP_UID));
            assert_reached_peer(&r, sa(peer_ip, PEER_PORT), pod_ip);
            let r = probe.must_connect(peer_ns, sa(pod_ip, APP_PORT), As::Root);
            assert_landed(&r, "app", None);
        }
        let before = backend.listing(pod_ns);
        assert!(!before.to_ascii_uppercase().contains("ISTIO"), "{before}");

        let out = pod.add();
        assert_eq!(
            programmed(&out),
            ("Applied".into(), "Some(Applied)".into()),
            "{}",
            out.stderr
        );
        let rules = backend.listing(pod_ns);
        let comparable = backend.comparable(pod_ns);
        assert!(
            rules.to_ascii_uppercase().contains("ISTIO"),
            "no rules of ours: {rules}"
        );
        for v6 in [false, true] {
            let (pod_ip, peer_ip) = addrs(&pod.net, v6);
            // The app (pod uid 1000) is captured, with its original destination.
            let r = probe.must_connect(pod_ns, sa(peer_ip, PEER_PORT), As::User(APP_UID));
            assert_landed(&r, "outbound", Some(sa(peer_ip, PEER_PORT)));
            // The proxy (pod uid 1337) bypasses: the owner match means the pod's uid.
            let r = probe.must_connect(pod_ns, sa(peer_ip, PEER_PORT), As::User(PROXY_UID));
            assert_reached_peer(&r, sa(peer_ip, PEER_PORT), pod_ip);
            // Inbound is redirected to the proxy.
            let r = probe.must_connect(peer_ns, sa(pod_ip, APP_PORT), As::Root);
            assert_landed(&r, "inbound", Some(sa(pod_ip, APP_PORT)));
        }

        // A repeated ADD leaves the same rules (the iptables backends find them in place).
        let again = pod.add();
        let r = backend.repeated;
        assert_eq!(
            programmed(&again),
            (r.to_string(), format!("Some({r})")),
            "{}",
            again.stderr
        );
        assert_eq!(
            backend.comparable(pod_ns),
            comparable,
            "a repeated ADD changed the rules"
        );
        // And they still capture the app, not the proxy.
        let (pod_ip, peer_ip) = addrs(&pod.net, false);
        let r = probe.must_connect(pod_ns, sa(peer_ip, PEER_PORT), As::User(APP_UID));
        assert_landed(&r, "outbound", Some(sa(peer_ip, PEER_PORT)));
        let r = probe.must_connect(pod_ns, sa(peer_ip, PEER_PORT), As::User(PROXY_UID));
        assert_reached_peer(&r, sa(peer_ip, PEER_PORT), pod_ip);
    });
    assert_eq!(host_snapshot(), host_before, "the host's own rules changed");
}

/// A tool run inside a pod's user namespace, as the plugin runs iptables there: unmapped host root (65534
/// inside), only the ambient network capabilities of [`exec::TOOL_CAPS`], and host root for files: it opens a
/// 0600 file of host root and creates files as host root.
#[test]
fn a_tool_in_a_pod_userns_is_host_root_for_files_with_net_caps_only() {
    let pod = UsernsNetns::new("uns-exec");
    let owner = owner_of(pod.netns());
    let dir = std::env::temp_dir().join(format!("meshcni-userns-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lock = dir.join("lock");
    std::fs::write(&lock, "lock-ok\n").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sh = exec::find_binary("sh").unwrap();
    let script = "cat /proc/self/uid_map; id -u; id -g; \
                  grep -E '^Cap(Eff|Amb)' /proc/self/status; readlink /proc/self/ns/user; cat \"$LOCK\"; \
                  : > \"$LOCK.new\" && echo created";
    let out = spawn_in_userns(
        &sh,
        &["-c", script],
        &[("LOCK", lock.as_os_str())],
        false,
        Some(owner.as_fd()),
    )
    .and_then(|r| r.finish(None, TOOL_TIMEOUT));
    let created = std::fs::metadata(dir.join("lock.new"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.unwrap();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let map: Vec<u32> = lines[0]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(map, [0, host_id(0), ID_COUNT], "{out}");
    assert_eq!(
        &lines[1..3],
        ["65534", "65534"],
        "unmapped host root: {out}"
    );
    let caps = format!(
        "{:016x}",
        exec::TOOL_CAPS.iter().fold(0u64, |m, c| m | 1 << c)
    );
    assert_eq!(lines[3], format!("CapEff:\t{caps}"), "{out}");
    assert_eq!(lines[4], format!("CapAmb:\t{caps}"), "{out}");
    assert_eq!(lines[5], format!("user:[{}]", pod.userns().ino), "{out}");
    assert_eq!(
        lines[6], "lock-ok",
        "the 0600 lock file of host root opens: {out}"
    );
    assert_eq!(lines[7], "created", "{out}");
    let created = created.unwrap();
    assert_eq!(
        (created.uid(), created.gid()),
        (0, 0),
        "files it creates are host root's"
    );
}

/// The plugin's tools pick the user namespace of the netns they run in: the pod's on a thread in the pod
/// netns, ours on our own thread and in a scratch netns (the canonical runs).
#[test]
fn tools_follow_the_owner_of_the_thread_netns() {
    let pod = UsernsNetns::new("uns-follow");
    let sh = exec::find_binary("sh").unwrap();
    let userns_of_child = || {
        exec::spawn_in_owning_userns(&sh, &["-c", "readlink /proc/self/ns/user"], &[], false)
            .and_then(|r| r.finish(None, TOOL_TIMEOUT))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        pod.netns().run(userns_of_child),
        format!("user:[{}]", pod.userns().ino)
    );
    let ours = std::fs::read_link(PROCESS_USERNS_PATH)
        .unwrap()
        .display()
        .to_string();
    assert_eq!(userns_of_child(), ours);
    assert_eq!(run_in_scratch_netns(userns_of_child).unwrap(), ours);
}
