//! Root tests of the native nftables backend: our netlink batch against `nft -f` of Istio's own script, in real,
//! fresh netns. For every capture-nftables case, `nft list ruleset` after our apply must equal the listing after
//! `nft -f <golden>` in another netns; a second apply must leave one copy; a batch refused in its middle must
//! leave the ruleset as it was. The host's ruleset is only read, to check it is untouched.

use std::path::{Path, PathBuf};
use std::process::Command;

use cni_plugin::apply::nftables::{self, NftError};
use cni_plugin::compat::istio_dir as compat_dir;
use cni_plugin::rules::capture_cases::{self, CaptureCase, CASES_FILE};
use cni_plugin::rules::nftables::{
    render, Expr, NftChain, NftRule, NftRuleset, NftTable, Position, Verdict,
};
use meshcni_tests::netns::{must, TestNetns};

/// Group names used by the corpus that a host need not have, with the gids both sides resolve them to.
const GROUPS: [(&str, u32); 2] = [("ftp", 42101), ("java", 42102)];

fn gid_of(name: &str) -> Option<u32> {
    GROUPS.iter().find(|(n, _)| *n == name).map(|&(_, g)| g)
}

fn cases() -> Vec<CaptureCase> {
    let path = compat_dir().join(CASES_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    capture_cases::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden_path(case: &CaptureCase) -> PathBuf {
    let file = case
        .nftables_golden
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no nftables golden", case.name));
    compat_dir().join("capture-nftables").join(file)
}

/// A temp file that is removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, content: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("mcni-{tag}-{}", std::process::id()));
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// /etc/group plus [`GROUPS`], for `nft` to resolve the corpus's group names as our applier does.
fn group_file() -> TempFile {
    let mut content = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for (name, gid) in GROUPS {
        content.push_str(&format!("{name}:x:{gid}:\n"));
    }
    TempFile::new("group", &content)
}

/// `nft -f <script>` inside the netns, in a private mount namespace where /etc/group has [`GROUPS`].
fn nft_load(ns: &TestNetns, script: &Path, groups: &Path) {
    let cmd = format!(
        "mount --bind {} /etc/group && exec nft -f {}",
        groups.display(),
        script.display()
    );
    ns.must(
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &cmd],
    );
}

fn listing(ns: &TestNetns) -> String {
    ns.must("nft", &["list", "ruleset"])
}

/// The kernel's expressions as `nft` reads them back: catches differences the listing could hide. The rule
/// handles after each rule's `inet TABLE CHAIN` line are dropped: they count creations, and we create the rules
/// in their final order where `nft -f` follows the script's order.
fn expressions(ns: &TestNetns) -> String {
    let dump = ns.must("nft", &["--debug=netlink", "list", "ruleset"]);
    let mut out = String::with_capacity(dump.len());
    for line in dump.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let keep = match words.as_slice() {
            ["inet", _, _, handles @ ..] if handles.iter().all(|h| h.parse::<u64>().is_ok()) => 3,
            _ => words.len(),
        };
        out.push_str(&words[..keep].join(" "));
        out.push('\n');
    }
    out
}

fn apply_in(ns: &TestNetns, ruleset: &NftRuleset) -> Result<nftables::NftApplied, NftError> {
    ns.run(|| nftables::apply_with_groups(ruleset, &gid_of))
}

fn host_ruleset() -> String {
    must(Command::new("nft").args(["list", "ruleset"]))
}

#[test]
fn every_golden_applies_like_nft_and_twice_leaves_one_copy() {
    let host_before = host_ruleset();
    let groups = group_file();
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let golden_ns = TestNetns::new("nftg");
        nft_load(&golden_ns, &golden_path(case), &groups.0);
        let want = listing(&golden_ns);
        let want_exprs = expressions(&golden_ns);
        assert!(
            want.contains("table inet istio-proxy-nat"),
            "{}: {want}",
            case.name
        );

        let ours = TestNetns::new("nfto");
        let ruleset = render(&case.config);
        let applied = apply_in(&ours, &ruleset).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(applied.tables, ruleset.tables.len(), "{}", case.name);
        let got = listing(&ours);
        if got != want {
            failures.push(format!(
                "{}: listing differs\n--- nft -f golden\n{want}\n--- ours\n{got}",
                case.name
            ));
            continue;
        }
        let got_exprs = expressions(&ours);
        if got_exprs != want_exprs {
            failures.push(format!(
                "{}: expressions differ\n--- nft -f golden\n{want_exprs}\n--- ours\n{got_exprs}",
                case.name
            ));
            continue;
        }
        // A second apply (a second ADD) replaces the rules: one copy.
        apply_in(&ours, &ruleset).unwrap_or_else(|e| panic!("{} (second): {e}", case.name));
        let again = listing(&ours);
        if again != want {
            failures.push(format!(
                "{}: second apply\n--- want\n{want}\n--- got\n{again}",
                case.name
            ));
        }
        let tables = ours.run(nftables::programmed_tables).unwrap();
        let expected: Vec<NftTable> = ruleset.tables.iter().map(|t| t.table).collect();
        assert_eq!(tables, expected, "{}", case.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from nft -f:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(cases.len(), 28);
    assert_eq!(host_ruleset(), host_before, "the host's ruleset changed");
}

/// The richest case, with a rule jumping to a chain that does not exist in its table added in the middle.
fn broken_ruleset() -> NftRuleset {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "tproxy")
        .expect("tproxy case");
    let mut ruleset = render(&case.config);
    let nat = &mut ruleset.tables[0];
    assert_eq!(nat.table, NftTable::Nat);
    let middle = nat.rules.len() / 2;
    nat.rules.insert(
        middle,
        NftRule {
            chain: NftChain::IstioOutput,
            position: Position::Append,
            exprs: vec![
                Expr::Counter,
                Expr::Verdict(Verdict::Jump(NftChain::IstioDivert)),
            ],
        },
    );
    ruleset
}

#[test]
fn a_batch_refused_in_its_middle_changes_nothing() {
    let broken = broken_ruleset();

    // Into an empty netns: still empty.
    let ns = TestNetns::new("nftf");
    let err = apply_in(&ns, &broken).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            NftError::Refused {
                errno: nix::errno::Errno::ENOENT,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.starts_with("nftables: "), "{msg}");
    assert!(
        msg.contains(
            "rule \"add rule inet istio-proxy-nat istio-output counter jump istio-divert\""
        ),
        "{msg}"
    );
    assert_eq!(listing(&ns), "");
    assert_eq!(ns.run(nftables::programmed_tables).unwrap(), []);

    // Over a previous ruleset: exactly the previous one.
    let previous = render(
        &cases()
            .into_iter()
            .find(|c| c.name == "ipv6-inbound-ports")
            .expect("case")
            .config,
    );
    apply_in(&ns, &previous).unwrap();
    let before = listing(&ns);
    assert!(before.contains("table inet istio-proxy-nat"), "{before}");
    apply_in(&ns, &broken).unwrap_err();
    assert_eq!(listing(&ns), before);
}

#[test]
fn an_unknown_group_is_refused_before_anything_is_sent() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "outbound-owner-groups")
        .expect("case");
    let ns = TestNetns::new("nftu");
    let err = ns
        .run(|| nftables::apply_with_groups(&render(&case.config), &|_| None))
        .unwrap_err();
    assert!(
        matches!(&err, NftError::UnknownGroup { name, .. } if name == "java"),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("nftables: group \"java\""),
        "{err}"
    );
    assert_eq!(listing(&ns), "");
}

#[test]
fn an_empty_ruleset_sends_nothing() {
    let ns = TestNetns::new("nfte");
    let applied = apply_in(&ns, &NftRuleset::default()).unwrap();
    assert_eq!(applied, nftables::NftApplied::default());
    assert_eq!(listing(&ns), "");
}
