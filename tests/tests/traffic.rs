//! Root tests with real traffic through the rules: a pod netns joined to a peer netns (the outside world) by a
//! veth, the capture of Istio's plugin cases programmed with each backend, listeners standing in for Envoy (15001 outbound, 15006 inbound, as uid
//! 1337) that report SO_ORIGINAL_DST, and clients connecting as the app (uid 1000) or as the proxy (uid 1337).

use std::net::{IpAddr, SocketAddr};

use cni_plugin::apply;
use cni_plugin::config::BackendChoice;
use meshcni_tests::netns::{plugin_target, PodNet};
use meshcni_tests::netprobe;
use meshcni_tests::traffic::{assert_landed, As, ListenOpts, Listener, Probe, Proto};

const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The sidecar's and the app's listeners in the pod, and a server in the peer, for one IP family.
struct World {
    _listeners: Vec<Listener>,
}

fn start_world(probe: &Probe, net: &PodNet, v6: bool, tproxy: bool) -> World {
    let any: IpAddr = if v6 {
        "::".parse().unwrap()
    } else {
        "0.0.0.0".parse().unwrap()
    };
    let proxy = ListenOpts::user(PROXY_UID);
    let inbound_opts = if tproxy { proxy.transparent() } else { proxy };
    let peer_ip: IpAddr = if v6 {
        net.addrs.peer_v6.unwrap().into()
    } else {
        net.addrs.peer_v4.into()
    };
    World {
        _listeners: vec![
            probe.listen(&net.pod, "outbound", sa(any, 15001), proxy),
            probe.listen(&net.pod, "inbound", sa(any, 15006), inbound_opts),
            probe.listen(&net.pod, "health", sa(any, 15021), proxy),
            probe.listen(&net.pod, "app", sa(any, 8080), ListenOpts::user(APP_UID)),
            probe.listen(&net.peer, "peer", sa(peer_ip, 80), ListenOpts::root()),
        ],
    }
}

/// The REDIRECT checks of the basic golden, for one family.
fn check_redirect(probe: &Probe, net: &PodNet, pod: IpAddr, peer: IpAddr, localhost: IpAddr) {
    // The app's outbound connection is captured by the proxy, with the real destination preserved.
    let r = probe.must_connect(&net.pod, sa(peer, 80), As::User(APP_UID));
    assert_landed(&r, "outbound", Some(sa(peer, 80)));
    // The proxy's own outbound connection goes out for real.
    let r = probe.must_connect(&net.pod, sa(peer, 80), As::User(PROXY_UID));
    assert_landed(&r, "peer", None);
    assert_eq!(r.peer.map(|p| p.ip()), Some(pod), "{r:?}");
    // Inbound from outside is captured on 15006 with the pod's address and port as original destination.
    let r = probe.must_connect(&net.peer, sa(pod, 8080), As::Root);
    assert_landed(&r, "inbound", Some(sa(pod, 8080)));
    // ... except the excluded health port.
    let r = probe.must_connect(&net.peer, sa(pod, 15021), As::Root);
    assert_landed(&r, "health", None);
    // Localhost is never captured.
    let r = probe.must_connect(&net.pod, sa(localhost, 8080), As::User(APP_UID));
    assert_landed(&r, "app", None);
}

fn basic_golden_redirects_real_traffic(backend: BackendChoice) {
    let probe = netprobe!();
    let net = PodNet::new("traffic", false);
    let _world = start_world(&probe, &net, false, false);
    let (pod, peer) = (
        IpAddr::from(net.addrs.pod_v4),
        IpAddr::from(net.addrs.peer_v4),
    );

    // Baseline: without rules nothing is captured (so the checks below can fail).
    assert_landed(
        &probe.must_connect(&net.pod, sa(peer, 80), As::User(APP_UID)),
        "peer",
        None,
    );
    assert_landed(
        &probe.must_connect(&net.peer, sa(pod, 8080), As::Root),
        "app",
        None,
    );

    let rs = plugin_target("basic", false);
    apply::program(net.pod.path(), backend, &rs).unwrap();
    check_redirect(&probe, &net, pod, peer, "127.0.0.1".parse().unwrap());
    // A second ADD changes nothing in the behaviour.
    apply::program(net.pod.path(), backend, &rs).unwrap();
    check_redirect(&probe, &net, pod, peer, "127.0.0.1".parse().unwrap());
}

#[test]
fn basic_golden_redirects_real_traffic_legacy() {
    basic_golden_redirects_real_traffic(BackendChoice::Legacy);
}

#[test]
fn basic_golden_redirects_real_traffic_nft() {
    basic_golden_redirects_real_traffic(BackendChoice::Nft);
}

#[test]
fn basic_golden_redirects_real_traffic_nftables() {
    basic_golden_redirects_real_traffic(BackendChoice::Nftables);
}

fn ipv6_pod_redirects_real_traffic(backend: BackendChoice) {
    let probe = netprobe!();
    let net = PodNet::new("traffic6", true);
    let _world = start_world(&probe, &net, true, false);
    let rs = plugin_target("basic", true);
    apply::program(net.pod.path(), backend, &rs).unwrap();
    check_redirect(
        &probe,
        &net,
        net.addrs.pod_v6.unwrap().into(),
        net.addrs.peer_v6.unwrap().into(),
        "::1".parse().unwrap(),
    );
}

#[test]
fn ipv6_pod_redirects_real_traffic_legacy() {
    ipv6_pod_redirects_real_traffic(BackendChoice::Legacy);
}

#[test]
fn ipv6_pod_redirects_real_traffic_nft() {
    ipv6_pod_redirects_real_traffic(BackendChoice::Nft);
}

#[test]
fn ipv6_pod_redirects_real_traffic_nftables() {
    ipv6_pod_redirects_real_traffic(BackendChoice::Nftables);
}

fn tproxy_golden_keeps_the_original_destination(backend: BackendChoice) {
    let probe = netprobe!();
    let net = PodNet::new("tproxy", false);
    let _world = start_world(&probe, &net, false, true);
    let (pod, peer) = (
        IpAddr::from(net.addrs.pod_v4),
        IpAddr::from(net.addrs.peer_v4),
    );
    let rs = plugin_target("tproxy", false);
    apply::program(net.pod.path(), backend, &rs).unwrap();
    // Inbound: delivered to the transparent listener on 15006 without NAT: the accepted socket's own address
    // is the original destination.
    let r = probe.must_connect(&net.peer, sa(pod, 8080), As::Root);
    assert_landed(&r, "inbound", None);
    assert_eq!(r.local, Some(sa(pod, 8080)), "{r:?}");
    assert_eq!(r.peer.map(|p| p.ip()), Some(peer), "{r:?}");
    // Excluded port: not intercepted.
    assert_landed(
        &probe.must_connect(&net.peer, sa(pod, 15021), As::Root),
        "health",
        None,
    );
    // Outbound still uses REDIRECT in TPROXY mode.
    let r = probe.must_connect(&net.pod, sa(peer, 80), As::User(APP_UID));
    assert_landed(&r, "outbound", Some(sa(peer, 80)));
    assert_landed(
        &probe.must_connect(&net.pod, sa(peer, 80), As::User(PROXY_UID)),
        "peer",
        None,
    );
}

#[test]
fn tproxy_golden_keeps_the_original_destination_legacy() {
    tproxy_golden_keeps_the_original_destination(BackendChoice::Legacy);
}

#[test]
fn tproxy_golden_keeps_the_original_destination_nft() {
    tproxy_golden_keeps_the_original_destination(BackendChoice::Nft);
}

#[test]
fn tproxy_golden_keeps_the_original_destination_nftables() {
    tproxy_golden_keeps_the_original_destination(BackendChoice::Nftables);
}

fn dns_golden_captures_dns(backend: BackendChoice) {
    let probe = netprobe!();
    let net = PodNet::new("dns", false);
    let any: IpAddr = "0.0.0.0".parse().unwrap();
    let peer = IpAddr::from(net.addrs.peer_v4);
    let proxy = ListenOpts::user(PROXY_UID);
    // Like Istio's DNS proxy, the UDP listener binds localhost: replies must leave from the address REDIRECT
    // sent the query to (127.0.0.1), or conntrack cannot map them back to the real server's address.
    let localhost: IpAddr = "127.0.0.1".parse().unwrap();
    let _listeners = [
        probe.listen(&net.pod, "dns-udp", sa(localhost, 15053), proxy.udp()),
        probe.listen(&net.pod, "dns-tcp", sa(any, 15053), proxy),
        probe.listen(&net.pod, "outbound", sa(any, 15001), proxy),
        probe.listen(
            &net.peer,
            "peer-dns-udp",
            sa(peer, 53),
            ListenOpts::root().udp(),
        ),
        probe.listen(&net.peer, "peer-dns-tcp", sa(peer, 53), ListenOpts::root()),
    ];
    let rs = plugin_target("dns", false);
    apply::program(net.pod.path(), backend, &rs).unwrap();
    let udp = |user| {
        probe
            .connect_with(&net.pod, sa(peer, 53), user, Proto::Udp)
            .unwrap_or_else(|e| panic!("{user:?} udp: {e}"))
    };
    // The app's DNS goes to the agent's DNS proxy on 15053, over UDP and TCP.
    assert_landed(&udp(As::User(APP_UID)), "dns-udp", None);
    let r = probe.must_connect(&net.pod, sa(peer, 53), As::User(APP_UID));
    assert_landed(&r, "dns-tcp", Some(sa(peer, 53)));
    // The proxy's own DNS reaches the real server.
    assert_landed(&udp(As::User(PROXY_UID)), "peer-dns-udp", None);
    let r = probe.must_connect(&net.pod, sa(peer, 53), As::User(PROXY_UID));
    assert_landed(&r, "peer-dns-tcp", None);
}

#[test]
fn dns_golden_captures_dns_legacy() {
    dns_golden_captures_dns(BackendChoice::Legacy);
}

#[test]
fn dns_golden_captures_dns_nft() {
    dns_golden_captures_dns(BackendChoice::Nft);
}

#[test]
fn dns_golden_captures_dns_nftables() {
    dns_golden_captures_dns(BackendChoice::Nftables);
}

#[test]
fn probes_refuse_the_host_netns() {
    let probe = netprobe!();
    let out = cni_plugin::apply::exec::run(
        probe.path(),
        &[
            "connect",
            "--netns",
            "/proc/self/ns/net",
            "--addr",
            "127.0.0.1:9",
        ],
        &[],
        None,
        std::time::Duration::from_secs(10),
    )
    .unwrap_err();
    assert!(out.to_string().contains("host"), "{out}");
}
