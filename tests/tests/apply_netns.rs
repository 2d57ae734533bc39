//! Root tests: programming real pod netns with both iptables flavours, using Istio's plugin goldens as literal
//! rulesets. Every test checks the host's iptables are untouched.

use std::collections::BTreeMap;
use std::path::Path;

use cni_plugin::apply::{self, ApplyError, BackendKind, Family, FamilyOutcome, Flavour};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::NetnsError;
use cni_plugin::rules::{RouteSetup, Ruleset, TproxyRoute};
use meshcni_tests::netns::{
    basic_dual_stack_ruleset, by_table, host_snapshot, istio_by_table, istio_lines, plugin_golden,
    v6_of, PodNet, TestNetns, POD_V4, POD_V6,
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
        let rs = basic_dual_stack_ruleset();
        let p = apply::apply_ruleset(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(
            (p.v4, p.v6),
            (FamilyOutcome::Applied, Some(FamilyOutcome::Applied))
        );
        let save6 = ns.save(flavour, Family::V6);
        assert_eq!(istio_lines(&save6).len(), rule_count(&rs.v4), "{save6}");
        assert!(
            save6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
            "{save6}"
        );
        assert_eq!(
            istio_lines(&ns.save(flavour, Family::V4)).len(),
            rule_count(&rs.v4)
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
        let rs = basic_dual_stack_ruleset();
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

// ---- The fast path, the prepared programming and auto detection without saves ----

/// The redirect of a pod with no annotations (Istio's defaults).
fn default_redirect() -> cni_plugin::redirect::Redirect {
    cni_plugin::redirect::Redirect::from_pod(&Default::default()).unwrap()
}

/// The same with `ISTIO_DUAL_STACK=true` on the proxy: IPv6 rules whenever the netns has an IPv6 address.
fn dual_stack_redirect() -> cni_plugin::redirect::Redirect {
    let mut pi = cni_plugin::pod::PodInfo::default();
    pi.proxy_env
        .insert("ISTIO_DUAL_STACK".to_string(), "true".to_string());
    let r = cni_plugin::redirect::Redirect::from_pod(&pi).unwrap();
    assert!(r.dual_stack());
    r
}

/// The command lines of the processes whose network namespace is the one at `path` (by nsfs identity).
fn processes_in(path: &Path) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(path).unwrap();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(ns) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if ns.ino() == target.ino() && ns.dev() == target.dev() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    out
}

/// Polls `f` every 10 ms until it returns `Some`, for at most 10 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn lock_files_of(netns: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(netns).unwrap().ino();
    let prefix = format!("meshcni-xtables-{ino}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn no_istio_anywhere(ns: &TestNetns) {
    for flavour in FLAVOURS {
        for family in [Family::V4, Family::V6] {
            let save = ns.save(flavour, family);
            assert!(
                !save.contains("ISTIO_"),
                "{flavour:?} {family:?} holds rules: {save}"
            );
        }
    }
}

#[test]
fn a_second_program_into_the_same_netns_is_unchanged_with_one_copy() {
    for flavour in FLAVOURS {
        let host_before = host_snapshot();
        let net = PodNet::new("again", true);
        let redirect = dual_stack_redirect();
        let first = apply::program(net.pod.path(), choice(flavour), &redirect).unwrap();
        assert_eq!(first.backend, flavour.kind());
        assert_eq!(
            (first.v4, first.v6),
            (FamilyOutcome::Applied, Some(FamilyOutcome::Applied))
        );
        let v4 = net.pod.save(flavour, Family::V4);
        let v6 = net.pod.save(flavour, Family::V6);
        assert!(!istio_lines(&v4).is_empty() && !istio_lines(&v6).is_empty());

        // Legacy: the tables now exist, the state is read in advance; nft: the restore fails on `-N` and the
        // state is read then. Either way: nothing changes, no second copy.
        let second = apply::program(net.pod.path(), choice(flavour), &redirect).unwrap();
        assert_eq!(
            (second.v4, second.v6),
            (FamilyOutcome::Unchanged, Some(FamilyOutcome::Unchanged)),
            "{flavour:?}"
        );
        let third = apply::program(net.pod.path(), BackendChoice::Auto, &redirect).unwrap();
        assert_eq!(
            third.backend,
            flavour.kind(),
            "auto follows the rules in place"
        );
        assert_eq!(third.v4, FamilyOutcome::Unchanged);
        assert_eq!(net.pod.save(flavour, Family::V4), v4, "{flavour:?}");
        assert_eq!(net.pod.save(flavour, Family::V6), v6, "{flavour:?}");
        assert!(istio_lines(&net.pod.save(other(flavour), Family::V4)).is_empty());
        assert!(lock_files_of(net.pod.path()).is_empty());
        assert!(processes_in(net.pod.path()).is_empty());
        assert_eq!(host_snapshot(), host_before);
    }
}

/// The tproxy golden whose nat table cannot load (TPROXY is a mangle-only target): iptables-legacy commits the
/// mangle table (chains and rules in built-in chains) before the nat table fails; iptables-nft fails as a whole.
fn tproxy_failing_in_nat() -> Ruleset {
    let tproxy = plugin_golden("tproxy");
    let (mangle, nat) = tproxy.split_at(tproxy.find("* nat").unwrap());
    let nat = nat.replacen(
        "COMMIT",
        "-A ISTIO_OUTPUT -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x539/0xffffffff\nCOMMIT",
        1,
    );
    Ruleset {
        v4: format!("{mangle}{nat}"),
        v6: None,
        routes: RouteSetup::default(),
    }
}

#[test]
fn a_failure_in_a_later_table_rolls_back_the_earlier_ones() {
    let bad = tproxy_failing_in_nat();
    for flavour in FLAVOURS {
        // Into a fresh netns.
        let ns = TestNetns::new("laterfail");
        let e = apply::apply_ruleset(ns.path(), choice(flavour), &bad).unwrap_err();
        assert!(
            e.to_string().contains("iptables") && !matches!(e, ApplyError::RollbackFailed { .. }),
            "{flavour:?}: {e}"
        );
        no_istio_anywhere(&ns);
        // Nor the ruleset's rules in built-in chains (CONNMARK/MARK in mangle), which jump to no ISTIO_ chain.
        let mangle = by_table(&ns.save(flavour, Family::V4))
            .remove("mangle")
            .unwrap_or_default();
        assert!(
            mangle.iter().all(|l| !l.starts_with("-A ")),
            "{flavour:?}: {mangle:?}"
        );

        // Over rules of ours already there: the failed ADD leaves none either.
        let ns = TestNetns::new("laterfail");
        apply::apply_ruleset(ns.path(), choice(flavour), &v4("basic")).unwrap();
        let e = apply::apply_ruleset(ns.path(), choice(flavour), &bad).unwrap_err();
        assert!(!matches!(e, ApplyError::RollbackFailed { .. }), "{e}");
        no_istio_anywhere(&ns);
        assert!(processes_in(ns.path()).is_empty());
    }
}

#[test]
fn auto_detection_without_legacy_tables_picks_nft_and_leaves_legacy_untouched() {
    let net = PodNet::new("autoprep", true);
    let legacy_tables = |ns: &TestNetns| {
        ns.run(|| {
            [Family::V4, Family::V6].map(|f| {
                std::fs::read_to_string(apply::iptables::legacy_tables_file(f)).unwrap_or_default()
            })
        })
    };
    assert_eq!(legacy_tables(&net.pod), [String::new(), String::new()]);
    let p = apply::program(net.pod.path(), BackendChoice::Auto, &dual_stack_redirect()).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
    assert_eq!(p.v6, Some(FamilyOutcome::Applied));
    // No legacy table was created on the way (a save or restore of legacy would have).
    assert_eq!(legacy_tables(&net.pod), [String::new(), String::new()]);

    // Legacy rules (in IPv6 only, with an IPv6 address in the netns): legacy, through the prepared path too.
    let net = PodNet::new("autoprep", true);
    net.pod.iptables(
        Flavour::Legacy,
        Family::V6,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let p = apply::program(net.pod.path(), BackendChoice::Auto, &default_redirect()).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesLegacy);
    assert!(!istio_lines(&net.pod.save(Flavour::Legacy, Family::V4)).is_empty());
    assert!(istio_lines(&net.pod.save(Flavour::Nft, Family::V4)).is_empty());

    // Legacy tables that exist but hold no rule: nft, as before.
    let net = PodNet::new("autoprep", false);
    net.pod
        .iptables(Flavour::Legacy, Family::V4, &["-t", "nat", "-L", "-n"]);
    assert!(legacy_tables(&net.pod)[0].contains("nat"));
    let p = apply::program(net.pod.path(), BackendChoice::Auto, &default_redirect()).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
}

#[test]
fn abort_kills_the_waiting_restores_and_leaves_nothing() {
    for (choice, expect) in [
        (BackendChoice::Legacy, "iptables-legacy-restore"),
        (BackendChoice::Nft, "iptables-nft-restore"),
        (BackendChoice::Auto, "iptables-nft-restore"),
    ] {
        let host_before = host_snapshot();
        let net = PodNet::new("abort", true);
        let path = net.pod.path();
        let prepared = apply::Prepared::start(path, choice);
        // Both restores (IPv4 and IPv6: the netns has an IPv6 address) start and wait for their input.
        let procs = wait_for("the restores to start", || {
            let p = processes_in(path);
            (p.len() >= 2).then_some(p)
        });
        assert!(
            procs.iter().any(|(_, c)| c.contains(expect))
                && procs
                    .iter()
                    .any(|(_, c)| c.contains(&expect.replace("iptables", "ip6tables"))),
            "{choice:?}: {procs:?}"
        );
        assert_eq!(lock_files_of(path).len(), 1);
        prepared.abort();
        assert_eq!(processes_in(path), vec![], "{choice:?}");
        for (pid, _) in &procs {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{choice:?}: pid {pid} is still there (not reaped)"
            );
        }
        assert!(lock_files_of(path).is_empty());
        no_istio_anywhere(&net.pod);
        assert_eq!(host_snapshot(), host_before);
    }
}

#[test]
fn dropping_a_preparation_at_any_moment_leaves_nothing() {
    let net = PodNet::new("dropearly", true);
    let path = net.pod.path();
    for i in 0..20u64 {
        let prepared = apply::Prepared::start(path, BackendChoice::Auto);
        // From "at once" to "well after the restores started".
        std::thread::sleep(std::time::Duration::from_micros(i * i * 100));
        drop(prepared);
        assert_eq!(processes_in(path), vec![], "after {i}");
        assert!(lock_files_of(path).is_empty(), "after {i}");
    }
    no_istio_anywhere(&net.pod);
    // And the netns can still be programmed afterwards.
    let p = apply::program(path, BackendChoice::Auto, &default_redirect()).unwrap();
    assert_eq!(p.v4, FamilyOutcome::Applied);
}

#[test]
fn preparation_errors_are_reported_by_program_and_ignored_by_abort() {
    let ns = TestNetns::new("vanish");
    let path = ns.path().to_path_buf();
    drop(ns);
    // A pod that is not redirected: its vanished netns does not matter.
    apply::Prepared::start(&path, BackendChoice::Auto).abort();
    drop(apply::Prepared::start(&path, BackendChoice::Auto));
    // A redirected one: the netns error, naming the path.
    let e = apply::Prepared::start(&path, BackendChoice::Auto)
        .program(&default_redirect())
        .unwrap_err();
    assert!(e.is_netns(), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // The host's netns is refused on the prepared path too, before anything runs in it.
    let e = apply::Prepared::start(Path::new("/proc/self/ns/net"), BackendChoice::Nft)
        .program(&default_redirect())
        .unwrap_err();
    assert!(
        matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
        "{e}"
    );
}

// ---- The real binary: a pod that is not redirected never needs its netns; nft falling back to legacy ----

mod binary {
    use super::*;
    use meshcni_tests::apiserver::{sample_pod, ApiServer};
    use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
    use serde_json::json;

    struct Fixture {
        srv: ApiServer,
        run_dir: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let srv = ApiServer::start().expect("start API stub");
        let run_dir = std::env::temp_dir().join(format!(
            "meshcni-applyns-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&run_dir).unwrap();
        srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
            .unwrap();
        Fixture { srv, run_dir }
    }

    fn add(fx: &Fixture, pod: &str, netns: &Path, path_var: Option<String>) -> PluginOutput {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "cni_agent_run_dir": fx.run_dir, "plugin_log_level": "debug",
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.200.0.2/24"}], "dns": {}}
        });
        let mut inv = Invocation::new(plugin_bin())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", netns.display().to_string())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            )
            .stdin(serde_json::to_vec(&conf).unwrap());
        if let Some(p) = path_var {
            inv = inv.env("PATH", p);
        }
        inv.run()
    }

    #[test]
    fn a_non_injected_pod_with_a_vanished_netns_succeeds() {
        let fx = fixture("vanished");
        fx.srv
            .add_pod(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "plain", "namespace": "default"},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}}))
            .unwrap();
        fx.srv.add_pod(sample_pod("default", "injected")).unwrap();
        let ns = TestNetns::new("vanished");
        let path = ns.path().to_path_buf();
        drop(ns);
        let out = add(&fx, "plain", &path, None);
        assert!(out.success, "{out:?}");
        assert_eq!(out.json()["ips"][0]["address"], "10.200.0.2/24");
        // An injected pod needs it: the netns error (code 102), naming the path.
        let out = add(&fx, "injected", &path, None);
        assert!(!out.success, "{out:?}");
        assert_eq!(out.error_code(), Some(102), "{out:?}");
        assert!(
            out.json()["msg"]
                .as_str()
                .unwrap_or_default()
                .contains(&path.display().to_string()),
            "{out:?}"
        );
    }

    /// `iptables-nft-restore`/`-save` that fail as on a kernel without nf_tables.
    fn broken_nft_dir(fx: &Fixture) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = fx.run_dir.join("broken-nft");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["iptables-nft-restore", "iptables-nft-save"] {
            let p = dir.join(name);
            std::fs::write(
                &p,
                "#!/bin/sh\necho 'iptables v1.8.9 (nf_tables): Failed to initialize nft: Protocol not supported' >&2\nexit 1\n",
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    #[test]
    fn auto_falls_back_to_legacy_when_nft_does_not_work() {
        let fx = fixture("nftbroken");
        fx.srv.add_pod(sample_pod("default", "injected")).unwrap();
        let net = PodNet::new("nftbroken", false);
        let path_var = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            broken_nft_dir(&fx).display()
        );
        let out = add(&fx, "injected", net.pod.path(), Some(path_var));
        assert!(out.success, "{out:?}");
        assert!(
            out.stderr
                .contains("iptables-nft does not work in this netns"),
            "{}",
            out.stderr
        );
        assert!(!istio_lines(&net.pod.save(Flavour::Legacy, Family::V4)).is_empty());
        assert!(istio_lines(&net.pod.save(Flavour::Nft, Family::V4)).is_empty());
        assert!(processes_in(net.pod.path()).is_empty());
    }
}
