//! Root tests: programming real pod netns with both iptables flavours through the one programming path
//! (`apply::program`), with the capture configurations of Istio's plugin cases. Every test checks the host's
//! iptables are untouched.

use std::collections::BTreeMap;
use std::path::Path;

use cni_plugin::apply::{self, ApplyError, BackendKind, Family, FamilyOutcome, Flavour, Target};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::NetnsError;
use meshcni_tests::netns::{
    by_table, host_snapshot, iptables_payload, istio_by_table, istio_lines, plugin_target, PodNet,
    TestNetns, POD_V4, POD_V6,
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

/// The capture of a plugin case, IPv4 only: rendered, it is the case's golden.
fn v4(case: &str) -> Target {
    plugin_target(case, false)
}

/// The normalised save of a netns that received only `rs` (the reference for "exactly one copy").
fn reference_save(flavour: Flavour, family: Family, rs: &Target) -> String {
    let ns = TestNetns::new("ref");
    apply::program(ns.path(), choice(flavour), rs).unwrap();
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
        let p = apply::program(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(p.backend, flavour.kind());
        assert_eq!(p.v4, FamilyOutcome::Applied);
        assert_eq!(p.v6, None);
        let sandbox = p
            .sandbox
            .as_ref()
            .expect("the iptables backends run in a sandbox");
        assert!(sandbox.private, "{sandbox:?}");
        if Path::new("/etc/nsswitch.conf").exists() {
            assert!(sandbox.nsswitch_hidden, "{sandbox:?}");
        }
        // Only the legacy tools take the xtables lock: only for them is the pod's lock bound over the node's.
        if Path::new("/run/xtables.lock").is_file() {
            assert_eq!(
                sandbox.lock_redirected,
                flavour == Flavour::Legacy,
                "{flavour:?}: {sandbox:?}"
            );
        }

        let save = ns.save(flavour, Family::V4);
        let ours = istio_lines(&save);
        assert_eq!(ours.len(), rule_count(&iptables_payload(&rs)), "{save}");
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
            let p = apply::program(ns.path(), choice(flavour), &rs)
                .unwrap_or_else(|e| panic!("{flavour:?} {golden}: {e}"));
            assert_eq!(p.v4, FamilyOutcome::Applied);
            let save = ns.save(flavour, Family::V4);
            // Every rule landed once; tproxy's rules in built-in chains that jump nowhere are counted apart.
            let expected = rule_count(&iptables_payload(&rs));
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
        let first = apply::program(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(first.v4, FamilyOutcome::Applied);
        let after_first = ns.save(flavour, Family::V4);
        let second = apply::program(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(second.v4, FamilyOutcome::Unchanged);
        assert_eq!(ns.save(flavour, Family::V4), after_first);
        let third = apply::program(ns.path(), BackendChoice::Auto, &rs).unwrap();
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
            let p = apply::program(ns.path(), choice(flavour), &rs).unwrap();
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
        apply::program(ns.path(), choice(flavour), &v4("tproxy")).unwrap();
        let rs = v4("basic");
        let p = apply::program(ns.path(), choice(flavour), &rs).unwrap();
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
            apply::program(ns.path(), choice(flavour), &tproxy)
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
            let e = apply::program(Path::new(path), choice(flavour), &rs).unwrap_err();
            assert!(
                matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
                "{path}: {e}"
            );
            assert!(e.to_string().contains(path), "{e}");
        }
    }
    // init's netns: refused as the host's, or cannot even be opened (hardened /proc).
    let e = apply::program(Path::new("/proc/1/ns/net"), BackendChoice::Auto, &rs).unwrap_err();
    assert!(matches!(e, ApplyError::Netns(_)), "{e}");
    assert!(e.to_string().contains("/proc/1/ns/net"), "{e}");
    assert_eq!(host_snapshot(), host_before);
}

#[test]
fn a_vanished_netns_is_a_clear_error() {
    let ns = TestNetns::new("gone");
    let path = ns.path().to_path_buf();
    drop(ns);
    let e = apply::program(&path, BackendChoice::Auto, &v4("basic")).unwrap_err();
    assert!(matches!(e, ApplyError::Netns(_)), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // A file that is not a netns.
    let e = apply::program(
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
        let rs = plugin_target("basic", true);
        let p = apply::program(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(
            (p.v4, p.v6),
            (FamilyOutcome::Applied, Some(FamilyOutcome::Applied))
        );
        let save6 = ns.save(flavour, Family::V6);
        assert_eq!(
            istio_lines(&save6).len(),
            rule_count(&iptables_payload(&rs)),
            "{save6}"
        );
        assert!(
            save6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
            "{save6}"
        );
        assert_eq!(
            istio_lines(&ns.save(flavour, Family::V4)).len(),
            rule_count(&iptables_payload(&rs))
        );

        let p2 = apply::program(ns.path(), choice(flavour), &rs).unwrap();
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
fn failed_routes_leave_no_rule() {
    for flavour in FLAVOURS {
        let ns = TestNetns::new("routefail");
        // IPv6 off on lo: ip6tables works, adding ::6/128 to lo does not.
        ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1"))
            .unwrap();
        let rs = plugin_target("basic", true);
        let e = apply::program(ns.path(), choice(flavour), &rs).unwrap_err();
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
        let rs = plugin_target("tproxy", true);
        let p1 = apply::program(ns.path(), choice(flavour), &rs).unwrap();
        assert_eq!(p1.routes.present, Vec::<String>::new(), "{p1:?}");
        let p2 = apply::program(ns.path(), choice(flavour), &rs).unwrap();
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
    let p = apply::program(fresh.path(), BackendChoice::Auto, &v4("basic")).unwrap();
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
    let p = apply::program(legacy.path(), BackendChoice::Auto, &v4("basic")).unwrap();
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
    let p = apply::program(
        legacy6.path(),
        BackendChoice::Auto,
        &plugin_target("basic", true),
    )
    .unwrap();
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
    let p = apply::program(empty_legacy.path(), BackendChoice::Auto, &v4("basic")).unwrap();
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
    let p = apply::program(nft.path(), BackendChoice::Auto, &v4("basic")).unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
    let p = apply::program(legacy.path(), BackendChoice::Nft, &v4("basic")).unwrap();
    assert_eq!(
        (p.backend, p.v4),
        (BackendKind::IptablesNft, FamilyOutcome::Applied)
    );
}

#[test]
fn addresses_are_listed_ipv4_first() {
    let net = PodNet::new("addrs", true);
    let netns = cni_plugin::netns::Netns::open(net.pod.path()).unwrap();
    let addrs = netns.run(apply::addresses).unwrap().unwrap();
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
    let e =
        apply::program(ns.path(), BackendChoice::Auto, &Target::Redirect(redirect)).unwrap_err();
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
    let p = apply::program(
        net.pod.path(),
        BackendChoice::Nft,
        &Target::Redirect(redirect.clone()),
    )
    .unwrap();
    assert_eq!((p.v4, p.v6), (FamilyOutcome::Applied, None));
    assert!(!istio_lines(&net.pod.save(Flavour::Nft, Family::V4)).is_empty());
    let p = apply::program(
        net.pod.path(),
        BackendChoice::Nft,
        &Target::Redirect(redirect.clone()),
    )
    .unwrap();
    assert_eq!(p.v4, FamilyOutcome::Unchanged);
}

/// Holds an exclusive `flock` on `path` until dropped, as a running iptables-legacy holds its xtables lock.
struct HeldLock {
    _file: std::fs::File,
}

impl HeldLock {
    fn take(path: &Path) -> HeldLock {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: flock only reads the fd, open for the call.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        HeldLock { _file: f }
    }
}

#[test]
fn the_legacy_tools_lock_the_pod_netns_file_not_the_nodes_lock() {
    // The node's lock held (kube-proxy in the middle of a sync) does not hold up a pod: its lock is its own. (A
    // restore waits for a held lock; the tool timeout would end this one.)
    let ns = TestNetns::new("lock");
    let node_lock = Path::new("/run/xtables.lock");
    let node = node_lock.is_file().then(|| HeldLock::take(node_lock));
    let start = std::time::Instant::now();
    let p = apply::program(ns.path(), BackendChoice::Legacy, &v4("basic")).unwrap();
    assert_eq!(p.v4, FamilyOutcome::Applied);
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    drop(node);

    // The pod's netns file held (another tool programming this pod): the legacy restore waits for it, and goes
    // through once it is released.
    let ns = TestNetns::new("lock");
    let held = HeldLock::take(ns.path());
    const HOLD: std::time::Duration = std::time::Duration::from_millis(400);
    let release = std::thread::spawn(move || {
        std::thread::sleep(HOLD);
        drop(held);
    });
    let start = std::time::Instant::now();
    let p = apply::program(ns.path(), BackendChoice::Legacy, &v4("basic")).unwrap();
    let took = start.elapsed();
    release.join().unwrap();
    assert_eq!(p.v4, FamilyOutcome::Applied);
    assert!(
        took >= HOLD,
        "the restore did not wait for the pod's lock: {took:?}"
    );

    // iptables-nft takes no xtables lock: the pod's lock held changes nothing for it.
    let ns = TestNetns::new("lock");
    let _held = HeldLock::take(ns.path());
    let p = apply::program(ns.path(), BackendChoice::Nft, &v4("basic")).unwrap();
    assert_eq!(p.v4, FamilyOutcome::Applied);
}

// ---- Programming from a redirect, and auto detection without saves ----

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

fn files_starting_with(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
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
        let first = apply::program(
            net.pod.path(),
            choice(flavour),
            &Target::Redirect(redirect.clone()),
        )
        .unwrap();
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
        let second = apply::program(
            net.pod.path(),
            choice(flavour),
            &Target::Redirect(redirect.clone()),
        )
        .unwrap();
        assert_eq!(
            (second.v4, second.v6),
            (FamilyOutcome::Unchanged, Some(FamilyOutcome::Unchanged)),
            "{flavour:?}"
        );
        let third = apply::program(
            net.pod.path(),
            BackendChoice::Auto,
            &Target::Redirect(redirect.clone()),
        )
        .unwrap();
        assert_eq!(
            third.backend,
            flavour.kind(),
            "auto follows the rules in place"
        );
        assert_eq!(third.v4, FamilyOutcome::Unchanged);
        assert_eq!(net.pod.save(flavour, Family::V4), v4, "{flavour:?}");
        assert_eq!(net.pod.save(flavour, Family::V6), v6, "{flavour:?}");
        assert!(istio_lines(&net.pod.save(other(flavour), Family::V4)).is_empty());
        assert!(processes_in(net.pod.path()).is_empty());
        assert_eq!(host_snapshot(), host_before);
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
    let p = apply::program(
        net.pod.path(),
        BackendChoice::Auto,
        &Target::Redirect(dual_stack_redirect()),
    )
    .unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
    assert_eq!(p.v6, Some(FamilyOutcome::Applied));
    // No legacy table was created on the way (a save or restore of legacy would have).
    assert_eq!(legacy_tables(&net.pod), [String::new(), String::new()]);

    // Legacy rules in IPv6 only, with an IPv6 address in the netns: they count for a pod whose rules include IPv6
    // (dual stack), not for an IPv4-only pod (Istio detects per family it programs).
    for (redirect, expected) in [
        (dual_stack_redirect(), BackendKind::IptablesLegacy),
        (default_redirect(), BackendKind::IptablesNft),
    ] {
        let net = PodNet::new("autoprep", true);
        net.pod.iptables(
            Flavour::Legacy,
            Family::V6,
            &[
                "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
            ],
        );
        let p = apply::program(
            net.pod.path(),
            BackendChoice::Auto,
            &Target::Redirect(redirect),
        )
        .unwrap();
        assert_eq!(p.backend, expected);
        let (ours, not_ours) = match expected {
            BackendKind::IptablesLegacy => (Flavour::Legacy, Flavour::Nft),
            _ => (Flavour::Nft, Flavour::Legacy),
        };
        assert!(!istio_lines(&net.pod.save(ours, Family::V4)).is_empty());
        assert!(istio_lines(&net.pod.save(not_ours, Family::V4)).is_empty());
    }

    // Legacy tables that exist but hold no rule: nft, as before.
    let net = PodNet::new("autoprep", false);
    net.pod
        .iptables(Flavour::Legacy, Family::V4, &["-t", "nat", "-L", "-n"]);
    assert!(legacy_tables(&net.pod)[0].contains("nat"));
    let p = apply::program(
        net.pod.path(),
        BackendChoice::Auto,
        &Target::Redirect(default_redirect()),
    )
    .unwrap();
    assert_eq!(p.backend, BackendKind::IptablesNft);
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
        std::fs::create_dir_all(run_dir.join("tmp")).unwrap();
        srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
            .unwrap();
        Fixture { srv, run_dir }
    }

    /// The plugin runs of `fx` left nothing in their temp dir (they create no file there).
    fn plugin_left_no_file(fx: &Fixture) {
        let left = files_starting_with(&fx.run_dir.join("tmp"), "");
        assert!(left.is_empty(), "{left:?}");
    }

    fn add(fx: &Fixture, pod: &str, netns: &Path, path_var: Option<String>) -> PluginOutput {
        add_with(fx, pod, netns, path_var, "auto")
    }

    fn add_with(
        fx: &Fixture,
        pod: &str,
        netns: &Path,
        path_var: Option<String>,
        backend: &str,
    ) -> PluginOutput {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "cni_agent_run_dir": fx.run_dir, "plugin_log_level": "debug", "iptables_backend": backend,
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
            // A file the plugin made in its temp dir would show in this fixture's (see `plugin_left_no_file`).
            .env("TMPDIR", fx.run_dir.join("tmp").display().to_string())
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

    /// A directory of fault-injecting stand-ins for `names`, each running `script` (a `sh` body; `$REAL` is the
    /// real binary of the same name, `$DIR` the directory, for a marker file), and the PATH that puts it first.
    fn faulty_tools(fx: &Fixture, tag: &str, names: &[String], script: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let dir = fx.run_dir.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        for name in names {
            let real = cni_plugin::apply::exec::find_binary(name).unwrap();
            let p = dir.join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\nREAL='{}'\nDIR='{}'\n{script}\n",
                    real.display(),
                    dir.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            dir.display()
        )
    }

    fn pod_with(
        name: &str,
        annotations: serde_json::Value,
        proxy_env: serde_json::Value,
    ) -> serde_json::Value {
        let mut pod = sample_pod("default", name);
        for (k, v) in annotations.as_object().unwrap() {
            pod["metadata"]["annotations"][k] = v.clone();
        }
        pod["spec"]["containers"][1]["env"] = proxy_env;
        pod
    }

    /// The IPv6 restore fails after the IPv4 one succeeded (an injected fault): the ADD fails and the IPv4 rules
    /// are removed again, also over rules of ours from an earlier ADD.
    #[test]
    fn a_failed_ipv6_restore_leaves_no_ipv4_rule() {
        for flavour in FLAVOURS {
            let backend = match flavour {
                Flavour::Legacy => "legacy",
                Flavour::Nft => "nft",
            };
            let fx = fixture("v6fail");
            fx.srv
                .add_pod(pod_with(
                    "dual",
                    json!({}),
                    json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]),
                ))
                .unwrap();
            let net = PodNet::new("v6fail", true);
            let ok = add_with(&fx, "dual", net.pod.path(), None, backend);
            assert!(ok.success, "{ok:?}");
            assert!(!istio_lines(&net.pod.save(flavour, Family::V6)).is_empty());
            let path_var = faulty_tools(
                &fx,
                "v6fail",
                &[flavour.restore_binary(Family::V6)],
                // Every restore that adds rules fails; removals (the rollback) pass through.
                "in=$(mktemp)\ncat > \"$in\"\nif grep -q '^-A ' \"$in\"; then\n  : > \"$DIR/injected\"\n  rm -f \"$in\"\n  echo 'ip6tables-restore: line 2 failed (injected)' >&2\n  exit 1\nfi\n\"$REAL\" \"$@\" < \"$in\"\nrc=$?\nrm -f \"$in\"\nexit $rc",
            );
            // A different capture, so the IPv4 rules are replaced (not left unchanged) before IPv6 fails.
            fx.srv.remove_pod("default", "dual");
            fx.srv
                .add_pod(pod_with(
                    "dual",
                    json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "7777"}),
                    json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]),
                ))
                .unwrap();
            let out = add_with(&fx, "dual", net.pod.path(), Some(path_var), backend);
            assert!(!out.success, "{flavour:?}: {out:?}");
            let msg = out.json()["msg"].as_str().unwrap_or_default().to_string();
            assert!(
                msg.contains("ip6tables") && msg.contains("injected"),
                "{msg}"
            );
            no_istio_anywhere(&net.pod);
            plugin_left_no_file(&fx);
            assert!(processes_in(net.pod.path()).is_empty());
        }
    }

    /// A restore fault half-way through the TPROXY ruleset (tables mangle, then nat), for each flavour: the
    /// stand-in `script` (which touches `$DIR/fired` when the fault fired) makes the ADD fail with a message holding
    /// `says`, into a fresh netns and over the rules of an earlier ADD (another capture), and the netns then holds
    /// nothing of ours, not even the ruleset's rules in built-in chains (TPROXY's marks in mangle). The stated
    /// guarantee of the iptables backends: a failed ADD leaves no rule of ours, never the previous ruleset nor a
    /// mix (a repeated ADD replaces the previous rules table by table, so a fault in a later table finds the
    /// earlier tables replaced already: all of it goes). Without the stand-in the same ADD works (the control).
    fn assert_halfway_fault_leaves_nothing(tag: &str, script: &str, says: &str) {
        for flavour in FLAVOURS {
            let backend = match flavour {
                Flavour::Legacy => "legacy",
                Flavour::Nft => "nft",
            };
            let fx = fixture(tag);
            fx.srv
                .add_pod(pod_with(
                    "tproxy",
                    json!({"sidecar.istio.io/interceptionMode": "TPROXY"}),
                    json!([]),
                ))
                .unwrap();
            fx.srv.add_pod(sample_pod("default", "basic")).unwrap();
            let path_var = faulty_tools(&fx, tag, &[flavour.restore_binary(Family::V4)], script);
            let fired = fx.run_dir.join(tag).join("fired");
            let assert_nothing_left = |net: &PodNet, out: &PluginOutput| {
                assert!(!out.success, "{flavour:?}: {out:?}");
                assert!(
                    fired.exists(),
                    "{flavour:?}: the fault did not fire: {out:?}"
                );
                let msg = out.json()["msg"].as_str().unwrap_or_default().to_string();
                assert!(
                    msg.contains(says)
                        && !msg.contains("removing the rules already applied failed"),
                    "{flavour:?}: {msg}"
                );
                no_istio_anywhere(&net.pod);
                for (table, lines) in by_table(&net.pod.save(flavour, Family::V4)) {
                    assert!(
                        lines.iter().all(|l| !l.starts_with("-A ")),
                        "{flavour:?}: rules left in {table}: {lines:?}"
                    );
                }
                assert!(processes_in(net.pod.path()).is_empty());
                plugin_left_no_file(&fx);
            };

            let net = PodNet::new(tag, false);
            let out = add_with(
                &fx,
                "tproxy",
                net.pod.path(),
                Some(path_var.clone()),
                backend,
            );
            assert_nothing_left(&net, &out);

            std::fs::remove_file(&fired).unwrap();
            let net = PodNet::new(tag, false);
            let ok = add_with(&fx, "basic", net.pod.path(), None, backend);
            assert!(ok.success, "{ok:?}");
            assert!(!istio_lines(&net.pod.save(flavour, Family::V4)).is_empty());
            let out = add_with(&fx, "tproxy", net.pod.path(), Some(path_var), backend);
            assert_nothing_left(&net, &out);

            let ok = add_with(&fx, "tproxy", net.pod.path(), None, backend);
            assert!(ok.success, "{flavour:?}: control: {ok:?}");
            assert!(!istio_lines(&net.pod.save(flavour, Family::V4)).is_empty());
        }
    }

    /// iptables-restore that dies after committing part of its input, as a restore killed or crashing half-way
    /// would: the stand-in feeds the real restore the input up to its middle `-A` line (closing that table with
    /// `COMMIT`), which the kernel takes, then exits 1 (all of mangle and part of nat are in the netns then).
    #[test]
    fn a_restore_dying_after_committing_part_of_its_input_leaves_nothing() {
        // Restores that add rules commit their first half and die; removals (the rollback) pass through.
        let script = "in=$(mktemp)\ncat > \"$in\"\nif grep -q '^-A ' \"$in\"; then\n  keep=$(( ($(grep -c '^-A ' \"$in\") + 1) / 2 ))\n  awk -v keep=\"$keep\" '{ print } /^-A / { n++ } n == keep && /^-A / { print \"COMMIT\"; exit }' \"$in\" > \"$in.part\"\n  \"$REAL\" \"$@\" < \"$in.part\" && : > \"$DIR/fired\"\n  rm -f \"$in\" \"$in.part\"\n  echo 'iptables-restore: killed after committing part of its input (injected)' >&2\n  exit 1\nfi\n\"$REAL\" \"$@\" < \"$in\"\nrc=$?\nrm -f \"$in\"\nexit $rc";
        assert_halfway_fault_leaves_nothing(
            "halfway",
            script,
            "killed after committing part of its input (injected)",
        );
    }

    /// iptables-restore fails in the nat table after the mangle table was loaded (a TPROXY target injected into
    /// nat, which the kernel refuses): legacy commits table by table, nft as a whole.
    #[test]
    fn a_failure_in_a_later_table_rolls_back_the_earlier_ones() {
        // Every restore that adds rules gets the bad rule in nat; removals (the rollback) pass through.
        let script = "in=$(mktemp)\ncat > \"$in\"\nif grep -q '^-A ' \"$in\"; then\n  : > \"$DIR/fired\"\n  sed -i '/^\\* nat$/,/^COMMIT$/ s|^COMMIT$|-A ISTIO_OUTPUT -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x539/0xffffffff\\nCOMMIT|' \"$in\"\nfi\n\"$REAL\" \"$@\" < \"$in\"\nrc=$?\nrm -f \"$in\"\nexit $rc";
        assert_halfway_fault_leaves_nothing("laterfail", script, "iptables");
    }
}
