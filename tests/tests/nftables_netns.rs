//! Root tests of the native nftables backend through the one programming path (`apply::program`), with the
//! capture configurations of Istio's plugin cases, in real fresh netns: the guarantees `apply_netns.rs` checks
//! for the iptables backends. A second program leaves exactly what a fresh netns gets from one; a different
//! capture replaces the previous one completely (no table of it left); failed routes leave no table of ours;
//! the host netns is refused. Every test checks the host's rules (iptables and nftables) are untouched.

use std::path::Path;

use cni_plugin::apply::{self, ApplyError, BackendKind, Family, FamilyOutcome, Flavour, Target};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::NetnsError;
use meshcni_tests::netns::{host_snapshot, plugin_target, require_root, TestNetns};
use meshcni_tests::nft;

const NATIVE: BackendChoice = BackendChoice::Nftables;

/// The capture of a plugin case, IPv4 only.
fn v4(case: &str) -> Target {
    plugin_target(case, false)
}

fn program(ns: &TestNetns, target: &Target) -> apply::Programmed {
    let p = apply::program(ns.path(), NATIVE, target).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.backend, BackendKind::Nftables);
    assert!(p.sandbox.is_none(), "native nftables needs no sandbox");
    p
}

/// `nft list ruleset` (without counter values) of a fresh netns that got only `target`: the reference for
/// "exactly one copy" and "completely replaced".
fn reference(target: &Target) -> String {
    let ns = TestNetns::new("nftref");
    program(&ns, target);
    nft::ruleset(&ns)
}

/// The tables of ours a capture has: nat always, mangle with TPROXY, raw with DNS capture.
fn tables_of(target: &Target) -> Vec<String> {
    let ns = TestNetns::new("nfttab");
    program(&ns, target);
    nft::istio_tables(&ns)
}

/// No rule of Istio's in any iptables flavour or family of `ns`.
fn assert_no_iptables_rules(ns: &TestNetns) {
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        for family in [Family::V4, Family::V6] {
            let save = ns.save(flavour, family);
            assert!(!save.contains("ISTIO"), "{flavour:?} {family:?}: {save}");
        }
    }
}

#[test]
fn a_second_program_leaves_exactly_one_copy() {
    require_root();
    let host_before = host_snapshot();
    for (case, ipv6) in [("basic", false), ("tproxy", true), ("dns", true)] {
        let target = plugin_target(case, ipv6);
        let ns = TestNetns::new("nfttwice");
        let outcomes = |o: FamilyOutcome| (o, ipv6.then_some(o));
        let first = program(&ns, &target);
        assert_eq!(
            (first.v4, first.v6),
            outcomes(FamilyOutcome::Applied),
            "{case}"
        );
        let once = nft::ruleset(&ns);
        let second = program(&ns, &target);
        assert_eq!(
            (second.v4, second.v6),
            outcomes(FamilyOutcome::Replaced),
            "{case}"
        );
        assert!(second.routes.added.is_empty(), "{case}: {second:?}");
        let twice = nft::ruleset(&ns);
        assert_eq!(twice, once, "{case}: a second program changed the ruleset");
        assert_eq!(
            twice,
            reference(&target),
            "{case}: not what a fresh netns gets"
        );
        assert!(
            twice.contains("table inet istio-proxy-nat"),
            "{case}: {twice}"
        );
        assert_no_iptables_rules(&ns);
    }
    assert_eq!(host_snapshot(), host_before, "the host's rules changed");
}

#[test]
fn a_different_capture_replaces_the_previous_one_completely() {
    require_root();
    let host_before = host_snapshot();
    let ns = TestNetns::new("nftreplace");
    // Someone else's tables, one of our family with a name like ours, must survive untouched.
    for cmd in [
        "add table inet istio-proxy-other",
        "add chain inet istio-proxy-other output { type filter hook output priority 0; }",
        "add rule inet istio-proxy-other output udp dport 9999 counter return",
        "add table ip nat",
        "add chain ip nat OUTPUT { type nat hook output priority -100; }",
        "add rule ip nat OUTPUT udp dport 9999 counter return",
    ] {
        ns.must("nft", &[cmd]);
    }
    let foreign_listing = nft::ruleset(&ns);
    // TPROXY with DNS capture has all three tables; REDIRECT has only nat.
    let sequence = [
        "basic",
        "tproxy",
        "basic",
        "dns",
        "tproxy",
        "include-exclude-ports",
    ];
    let mut previous: Option<&str> = None;
    for case in sequence {
        let target = v4(case);
        let p = program(&ns, &target);
        let expected = if previous.is_none() {
            FamilyOutcome::Applied
        } else {
            FamilyOutcome::Replaced
        };
        assert_eq!(p.v4, expected, "{previous:?} -> {case}");
        // Exactly a fresh netns's ruleset after the foreign tables (nft lists tables in creation order).
        assert_eq!(
            nft::ruleset(&ns),
            format!("{foreign_listing}{}", reference(&target)),
            "{previous:?} -> {case}"
        );
        assert_eq!(nft::istio_tables(&ns), tables_of(&target));
        previous = Some(case);
    }
    // Leaving TPROXY leaves no mangle table (iptables cannot tell its built-in chain rules from anyone's).
    program(&ns, &v4("tproxy"));
    assert!(nft::istio_tables(&ns).contains(&"istio-proxy-mangle".to_string()));
    program(&ns, &v4("basic"));
    assert_eq!(nft::istio_tables(&ns), ["istio-proxy-nat"]);
    assert_no_iptables_rules(&ns);
    assert_eq!(host_snapshot(), host_before, "the host's rules changed");
}

#[test]
fn failed_routes_leave_no_table_of_ours() {
    require_root();
    for (case, prior) in [("basic", None), ("tproxy", Some("basic"))] {
        let ns = TestNetns::new("nftroutefail");
        if let Some(prior) = prior {
            program(&ns, &v4(prior));
            assert!(!nft::istio_tables(&ns).is_empty());
        }
        // IPv6 off on lo: the IPv6 rules load, adding ::6/128 to lo does not.
        ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1"))
            .unwrap();
        let e = apply::program(ns.path(), NATIVE, &plugin_target(case, true)).unwrap_err();
        assert!(matches!(e, ApplyError::Routes(_)), "{case}: {e}");
        assert!(e.to_string().contains("::6"), "{case}: {e}");
        assert_eq!(
            nft::istio_tables(&ns),
            Vec::<String>::new(),
            "{case}: tables left after {e}:\n{}",
            nft::ruleset(&ns)
        );
        assert_no_iptables_rules(&ns);
    }
}

#[test]
fn the_host_netns_is_refused() {
    require_root();
    let host_before = host_snapshot();
    for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
        let e = apply::program(Path::new(path), NATIVE, &v4("basic")).unwrap_err();
        assert!(
            matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
            "{path}: {e}"
        );
        assert!(e.to_string().contains(path), "{e}");
    }
    assert_eq!(host_snapshot(), host_before, "the host's rules changed");
}
