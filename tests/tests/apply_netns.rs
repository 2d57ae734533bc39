//! Root tests: programming real pod netns with both iptables flavours, using Istio's plugin goldens as literal
//! rulesets. Every test checks the host's iptables are untouched.

use std::collections::BTreeMap;
use std::path::Path;

use cni_plugin::apply::{self, ApplyError, BackendKind, Family, FamilyOutcome, Flavour};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::NetnsError;
use cni_plugin::rules::{RouteSetup, Ruleset, TproxyRoute};
use meshcni_tests::netns::{
    by_table, host_snapshot, istio_by_table, istio_lines, plugin_golden, v6_of, PodNet, TestNetns,
    POD_V4, POD_V6,
};

const FLAVOURS: [Flavour; 2] = [Flavour::Legacy, Flavour::Nft];

fn choice(f: Flavour) -> BackendChoice {
    match f {
        Flavour::Legacy => BackendChoice::Legacy,
        Flavour::Nft => BackendChoice::Nft,
    }
}

fn other(f: Flavour) -> Flavour {
    match f {
        Flavour::Legacy => Flavour::Nft,
        Flavour::Nft => Flavour::Legacy,
    }
}

fn v4(golden: &str) -> Ruleset {
    Ruleset {
        v4: plugin_golden(golden),
        v6: None,
        routes: RouteSetup::default(),
    }
}

/// The normalised save of a netns that received only `rs` (the reference for "exactly one copy").
fn reference_save(flavour: Flavour, family: Family, rs: &Ruleset) -> String {
    let ns = TestNetns::new("ref");
    apply::apply_ruleset(ns.path(), choice(flavour), rs).unwrap();
    ns.save(flavour, family)
}

/// Number of `-A` lines in a restore payload.
fn rule_count(payload: &str) -> usize {
    payload
        .lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
        .count()
}

#[test]
fn rules_land_in_the_pod_netns_and_not_on_the_host() {
    for flavour in FLAVOURS {
        let host_before = host_snapshot();
        let ns = TestNetns::new("land");
        let rs = v4("basic");
        let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(p.backend, flavour.kind());
        assert_eq!(p.v4, FamilyOutcome::Applied);
        assert_eq!(p.v6, None);
        assert!(p.sandbox.private, "{:?}", p.sandbox);
        if Path::new("/etc/nsswitch.conf").exists() {
            assert!(p.sandbox.nsswitch_hidden, "{:?}", p.sandbox);
        }
        if Path::new("/run/xtables.lock").is_file() {
            assert!(p.sandbox.lock_redirected, "{:?}", p.sandbox);
        }

        let save = ns.save(flavour, Family::V4);
        let ours = istio_lines(&save);
        assert_eq!(ours.len(), rule_count(&rs.v4), "{save}");
        assert!(save.contains(":ISTIO_OUTPUT -\n"), "{save}");
        assert!(save.contains("-A OUTPUT -j ISTIO_OUTPUT"), "{save}");
        assert!(
            save.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
            "{save}"
        );
        // Nothing in the other flavour, nothing in IPv6.
        assert!(istio_lines(&ns.save(other(flavour), Family::V4)).is_empty());
        assert!(istio_lines(&ns.save(flavour, Family::V6)).is_empty());
        assert_eq!(
            host_snapshot(),
            host_before,
            "{flavour:?} changed the host's iptables"
        );
    }
}

#[test]
fn every_plugin_golden_applies_with_both_flavours() {
    for flavour in FLAVOURS {
        for golden in [
            "basic",
            "tproxy",
            "dns",
            "include-exclude-ip",
            "include-exclude-ports",
        ] {
            let ns = TestNetns::new("gold");
            let rs = v4(golden);
            let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs)
                .unwrap_or_else(|e| panic!("{flavour:?} {golden}: {e}"));
            assert_eq!(p.v4, FamilyOutcome::Applied);
            let save = ns.save(flavour, Family::V4);
            // Every rule landed once; tproxy's rules in built-in chains that jump nowhere are counted apart.
            let expected = rule_count(&rs.v4);
            let builtin_non_istio = save
                .lines()
                .filter(|l| l.starts_with("-A ") && !l.contains("ISTIO_"))
                .count();
            assert_eq!(
                istio_lines(&save).len() + builtin_non_istio,
                expected,
                "{flavour:?} {golden}: {save}"
            );
        }
    }
}

#[test]
fn a_second_apply_leaves_exactly_one_copy() {
    for flavour in FLAVOURS {
        let host_before = host_snapshot();
        let ns = TestNetns::new("twice");
        let rs = v4("tproxy");
        let first = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(first.v4, FamilyOutcome::Applied);
        let after_first = ns.save(flavour, Family::V4);
        let second = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(second.v4, FamilyOutcome::Unchanged);
        assert_eq!(ns.save(flavour, Family::V4), after_first);
        let third = apply::apply_ruleset(ns.path(), BackendChoice::Auto, &rs).unwrap();
        assert_eq!(
            third.backend,
            flavour.kind(),
            "auto-detection follows the rules in place"
        );
        assert_eq!(third.v4, FamilyOutcome::Unchanged);
        assert_eq!(ns.save(flavour, Family::V4), after_first);
        assert_eq!(after_first, reference_save(flavour, Family::V4, &rs));
        assert_eq!(host_snapshot(), host_before);
    }
}

#[test]
fn a_different_ruleset_replaces_the_previous_one() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("replace");
        // Someone else's rules in the same tables must survive.
        ns.iptables(
            flavour,
            Family::V4,
            &[
                "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN",
            ],
        );
        ns.iptables(
            flavour,
            Family::V4,
            &[
                "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN",
            ],
        );
        let foreign = ["-A OUTPUT -p udp -m udp --dport 9999 -j RETURN"];

        let mut previous = None;
        // (TPROXY last: see `leaving_tproxy_removes_istio_chains_and_jumps` for what leaving it cannot remove.)
        for golden in ["basic", "include-exclude-ports", "dns", "basic", "tproxy"] {
            let rs = v4(golden);
            let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
            let expected = if previous.is_none() {
                FamilyOutcome::Applied
            } else {
                FamilyOutcome::Replaced
            };
            assert_eq!(p.v4, expected, "{flavour:?} {previous:?} -> {golden}");
            let save = ns.save(flavour, Family::V4);
            // Exactly what a fresh netns gets from this ruleset (chains, rules, order), plus the foreign rules.
            let reference = reference_save(flavour, Family::V4, &rs);
            assert_eq!(
                istio_by_table(&save),
                istio_by_table(&reference),
                "{flavour:?} {previous:?} -> {golden}"
            );
            let non_istio = |s: &str| -> BTreeMap<String, Vec<String>> {
                by_table(s)
                    .into_iter()
                    .map(|(t, lines)| {
                        let l: Vec<String> = lines
                            .into_iter()
                            .filter(|l| {
                                l.starts_with("-A ")
                                    && !l.contains("ISTIO_")
                                    && !foreign.contains(&l.as_str())
                            })
                            .collect();
                        (t, l)
                    })
                    .filter(|(_, l)| !l.is_empty())
                    .collect()
            };
            assert_eq!(
                non_istio(&save),
                non_istio(&reference),
                "{flavour:?} {previous:?} -> {golden}"
            );
            assert_eq!(
                save.lines().filter(|l| foreign.contains(l)).count(),
                2,
                "foreign rules must stay: {save}"
            );
            previous = Some(golden);
        }
    }
}

/// Leaving TPROXY for REDIRECT removes every ISTIO_* chain and every jump to one. Rules the previous ruleset put
/// directly in built-in chains without a jump (TPROXY's MARK/CONNMARK in mangle OUTPUT/PREROUTING) cannot be told
/// apart from anyone else's once the ruleset that made them is unknown, so they stay, as with Istio (whose
/// cleanup only knows the new rules). Without the ISTIO_DIVERT/ISTIO_TPROXY chains they mark nothing we route.
#[test]
fn leaving_tproxy_removes_istio_chains_and_jumps() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("leave");
        apply::apply_ruleset(ns.path(), choice(flavour), &v4("tproxy")).unwrap();
        let rs = v4("basic");
        let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(p.v4, FamilyOutcome::Replaced);
        let save = ns.save(flavour, Family::V4);
        assert_eq!(
            istio_by_table(&save),
            istio_by_table(&reference_save(flavour, Family::V4, &rs)),
            "{flavour:?}: {save}"
        );
        // And going back to TPROXY leaves exactly one copy of its built-in rules.
        let tproxy = v4("tproxy");
        assert_eq!(
            apply::apply_ruleset(ns.path(), choice(flavour), &tproxy)
                .unwrap()
                .v4,
            FamilyOutcome::Replaced
        );
        assert_eq!(
            by_table(&ns.save(flavour, Family::V4)).get("mangle"),
            by_table(&reference_save(flavour, Family::V4, &tproxy)).get("mangle"),
            "{flavour:?}"
        );
    }
}

#[test]
fn the_host_netns_is_refused() {
    let host_before = host_snapshot();
    let rs = v4("basic");
    for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
        for flavour in FLAVOURS {
            let e = apply::apply_ruleset(Path::new(path), choice(flavour), &rs).unwrap_err();
            assert!(
                matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
                "{path}: {e}"
            );
            assert!(e.to_string().contains(path), "{e}");
        }
    }
    // init's netns: refused as the host's, or cannot even be opened (hardened /proc).
    let e =
        apply::apply_ruleset(Path::new("/proc/1/ns/net"), BackendChoice::Auto, &rs).unwrap_err();
    assert!(matches!(e, ApplyError::Netns(_)), "{e}");
    assert!(e.to_string().contains("/proc/1/ns/net"), "{e}");
    assert_eq!(host_snapshot(), host_before);
}

#[test]
fn a_vanished_netns_is_a_clear_error() {
    let ns = TestNetns::new("gone");
    let path = ns.path().to_path_buf();
    drop(ns);
    let e = apply::apply_ruleset(&path, BackendChoice::Auto, &v4("basic")).unwrap_err();
    assert!(matches!(e, ApplyError::Netns(_)), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // A file that is not a netns.
    let e = apply::apply_ruleset(
        Path::new("/etc/hostname"),
        BackendChoice::Auto,
        &v4("basic"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::Netns(NetnsError::NotNetns { .. })
                | ApplyError::Netns(NetnsError::Open { .. })
        ),
        "{e}"
    );
}

#[test]
fn ipv6_rules_land_in_ip6tables_with_the_loopback_address() {
    for flavour in FLAVOURS {
        let host_before = host_snapshot();
        let ns = TestNetns::new("v6");
        let basic = plugin_golden("basic");
        let rs = Ruleset {
            v4: basic.clone(),
            v6: Some(v6_of(&basic)),
            routes: RouteSetup {
                ipv6_loopback_addr: true,
                tproxy: None,
            },
        };
        let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(
            (p.v4, p.v6),
            (FamilyOutcome::Applied, Some(FamilyOutcome::Applied))
        );
        let save6 = ns.save(flavour, Family::V6);
        assert_eq!(istio_lines(&save6).len(), rule_count(&basic), "{save6}");
        assert!(
            save6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
            "{save6}"
        );
        assert_eq!(
            istio_lines(&ns.save(flavour, Family::V4)).len(),
            rule_count(&basic)
        );

        let p2 = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(
            (p2.v4, p2.v6),
            (FamilyOutcome::Unchanged, Some(FamilyOutcome::Unchanged))
        );
        assert_eq!(ns.save(flavour, Family::V6), save6);
        let lo = ns.ip(&["-6", "addr", "show", "dev", "lo"]);
        assert_eq!(lo.matches("inet6 ::6/128").count(), 1, "{lo}");
        assert_eq!(host_snapshot(), host_before);
    }
}

#[test]
fn a_failed_ipv6_restore_leaves_no_ipv4_rule() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("rollback");
        let basic = plugin_golden("basic");
        // Valid text, refused by the kernel/binary: an IPv4 address in an IPv6 rule.
        let rs = Ruleset {
            v4: basic.clone(),
            v6: Some(basic.clone()),
            routes: RouteSetup::default(),
        };
        let e = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap_err();
        assert!(e.to_string().contains("ip6tables"), "{e}");
        assert!(
            istio_lines(&ns.save(flavour, Family::V4)).is_empty(),
            "IPv4 rules left after {e}"
        );
        assert!(istio_lines(&ns.save(flavour, Family::V6)).is_empty());
        assert!(!ns.save(flavour, Family::V4).contains(":ISTIO_"));

        // Also after a successful first ADD: the failing one removes everything of ours.
        apply::apply_ruleset(ns.path(), choice(flavour), &v4("dns")).unwrap();
        assert!(!istio_lines(&ns.save(flavour, Family::V4)).is_empty());
        apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap_err();
        let save = ns.save(flavour, Family::V4);
        assert!(!save.contains("ISTIO_"), "{save}");
    }
}

#[test]
fn failed_routes_leave_no_rule() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("routefail");
        // IPv6 off on lo: ip6tables works, adding ::6/128 to lo does not.
        ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1"))
            .unwrap();
        let basic = plugin_golden("basic");
        let rs = Ruleset {
            v4: basic.clone(),
            v6: Some(v6_of(&basic)),
            routes: RouteSetup {
                ipv6_loopback_addr: true,
                tproxy: None,
            },
        };
        let e = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap_err();
        assert!(matches!(e, ApplyError::Routes(_)), "{e}");
        assert!(e.to_string().contains("::6"), "{e}");
        for family in [Family::V4, Family::V6] {
            let save = ns.save(flavour, family);
            assert!(
                !save.contains("ISTIO_"),
                "{family:?} rules left after {e}: {save}"
            );
        }
    }
}

#[test]
fn tproxy_routes_are_present_once_after_two_applies() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("tproxy");
        let tproxy = plugin_golden("tproxy");
        let rs = Ruleset {
            v4: tproxy.clone(),
            v6: Some(v6_of(&tproxy)),
            routes: RouteSetup {
                ipv6_loopback_addr: true,
                tproxy: Some(TproxyRoute {
                    mark: 1337,
                    table: 133,
                    ipv6: true,
                }),
            },
        };
        let p1 = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(p1.routes.present, Vec::<String>::new(), "{p1:?}");
        let p2 = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert!(p2.routes.added.is_empty(), "{p2:?}");
        assert_eq!(p2.routes.present.len(), p1.routes.added.len());
        for fam in ["-4", "-6"] {
            let rules = ns.ip(&[fam, "rule", "show"]);
            assert_eq!(
                rules
                    .lines()
                    .filter(|l| l.contains("fwmark 0x539 lookup 133"))
                    .count(),
                1,
                "{fam}: {rules}"
            );
            let routes = ns.ip(&[fam, "route", "show", "table", "133"]);
            assert_eq!(
                routes
                    .lines()
                    .filter(|l| l.starts_with("local default dev lo"))
                    .count(),
                1,
                "{fam}: {routes}"
            );
        }
    }
}

#[test]
fn auto_detection_follows_existing_rules() {
    // Nothing anywhere: nft, as Istio.
    let fresh = TestNetns::new("auto");
    let p = apply::apply_ruleset(fresh.path(), BackendChoice::Auto, &v4("basic")).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
    assert!(!istio_lines(&fresh.save(Flavour::Nft, Family::V4)).is_empty());

    // Someone's legacy rules: legacy.
    let legacy = TestNetns::new("auto");
    legacy.iptables(
        Flavour::Legacy,
        Family::V4,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let p = apply::apply_ruleset(legacy.path(), BackendChoice::Auto, &v4("basic")).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesLegacy);
    assert!(!istio_lines(&legacy.save(Flavour::Legacy, Family::V4)).is_empty());
    assert!(istio_lines(&legacy.save(Flavour::Nft, Family::V4)).is_empty());

    // Legacy rules only in IPv6 count too when we program IPv6.
    let legacy6 = TestNetns::new("auto");
    legacy6.iptables(
        Flavour::Legacy,
        Family::V6,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let basic = plugin_golden("basic");
    let rs = Ruleset {
        v4: basic.clone(),
        v6: Some(v6_of(&basic)),
        routes: RouteSetup::default(),
    };
    let p = apply::apply_ruleset(legacy6.path(), BackendChoice::Auto, &rs).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesLegacy);

    // An empty legacy table is not "rules" (Istio's own kernel probe leaves one behind).
    let empty_legacy = TestNetns::new("auto");
    empty_legacy.iptables(
        Flavour::Legacy,
        Family::V4,
        &["-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"],
    );
    empty_legacy.iptables(
        Flavour::Legacy,
        Family::V4,
        &["-t", "nat", "-D", "INPUT", "-p", "255", "-j", "RETURN"],
    );
    let p = apply::apply_ruleset(empty_legacy.path(), BackendChoice::Auto, &v4("basic")).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);

    // nft rules and no legacy ones: nft; the override wins over detection.
    let nft = TestNetns::new("auto");
    nft.iptables(
        Flavour::Nft,
        Family::V4,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let p = apply::apply_ruleset(nft.path(), BackendChoice::Auto, &v4("basic")).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
    let p = apply::apply_ruleset(legacy.path(), BackendChoice::Nft, &v4("basic")).unwrap();
    assert_eq!(
        (p.backend, p.v4),
        (BackendKind::IptablesNft, FamilyOutcome::Applied)
    );
}

#[test]
fn addresses_are_listed_ipv4_first() {
    let net = PodNet::new("addrs", true);
    let addrs = apply::netns_addresses(net.pod.path()).unwrap();
    let pos4 = addrs
        .iter()
        .position(|a| *a == std::net::IpAddr::V4(POD_V4));
    let pos6 = addrs
        .iter()
        .position(|a| *a == std::net::IpAddr::V6(POD_V6));
    assert!(pos4.is_some() && pos6.is_some(), "{addrs:?}");
    assert!(pos4 < pos6, "{addrs:?}");
    assert!(
        addrs.contains(&std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        "{addrs:?}"
    );
}

#[test]
fn program_fails_without_a_pod_ip() {
    let ns = TestNetns::new("noip");
    let redirect = cni_plugin::redirect::Redirect::from_pod(&Default::default()).unwrap();
    let e = apply::program(ns.path(), BackendChoice::Auto, &redirect).unwrap_err();
    assert!(matches!(e, ApplyError::NoPodIp { .. }), "{e}");
    assert!(
        e.to_string().contains(&ns.path().display().to_string()),
        "{e}"
    );
    assert!(istio_lines(&ns.save(Flavour::Nft, Family::V4)).is_empty());
    assert!(istio_lines(&ns.save(Flavour::Legacy, Family::V4)).is_empty());
}

#[test]
fn program_renders_and_applies_the_redirect() {
    let net = PodNet::new("program", false);
    let redirect = cni_plugin::redirect::Redirect::from_pod(&Default::default()).unwrap();
    let p = apply::program(net.pod.path(), BackendChoice::Nft, &redirect).unwrap();
    assert_eq!((p.v4, p.v6), (FamilyOutcome::Applied, None));
    assert!(!istio_lines(&net.pod.save(Flavour::Nft, Family::V4)).is_empty());
    let p = apply::program(net.pod.path(), BackendChoice::Nft, &redirect).unwrap();
    assert_eq!(p.v4, FamilyOutcome::Unchanged);
}

#[test]
fn the_lock_file_is_removed() {
    let ns = TestNetns::new("lock");
    let p = apply::apply_ruleset(ns.path(), BackendChoice::Legacy, &v4("basic")).unwrap();
    let prefix = format!("meshcni-xtables-{}-", p.netns.ino);
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
