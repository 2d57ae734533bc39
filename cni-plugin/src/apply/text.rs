//! iptables-save / iptables-restore text, parsed into tables, chains and rules; what of it is ours; the
//! transactions that remove it. Pure: no I/O.
//!
//! "Ours" is what Istio owns in a pod netns: chains named `ISTIO_*`, rules anywhere that jump to them, and the rules
//! of a ruleset that sit directly in built-in chains (TPROXY's `CONNMARK`/`MARK` rules, excluded interfaces'
//! `RETURN`). Rules are compared as the text iptables-save prints: a rule only has one canonical form for a given
//! binary and kernel, and that form is obtained by loading the ruleset into a scratch netns (see `iptables.rs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::rules::iptables::Table as KnownTable;

/// Prefix of the chains Istio creates.
pub const OWN_CHAIN_PREFIX: &str = "ISTIO_";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} {text:?}: {reason}")]
pub struct TextError {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// How a rule was added (restore input knows `-I`; save output only has `-A`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOp {
    Append,
    Insert(Option<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub op: RuleOp,
    /// Everything after the chain name (and the insert position), verbatim.
    pub spec: String,
    /// The `-j`/`-g` target, if any.
    pub target: Option<String>,
}

impl Rule {
    fn jumps_to_own_chain(&self) -> bool {
        self.target
            .as_deref()
            .is_some_and(|t| t.starts_with(OWN_CHAIN_PREFIX))
    }
}

/// One `*table` ... `COMMIT` block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub name: String,
    /// User-defined chains (`:X - [0:0]` in save output, `-N X` in restore input), in order.
    pub chains: Vec<String>,
    pub rules: Vec<Rule>,
    /// The block's lines between `*table` and `COMMIT`, as given (restore input is replayed verbatim).
    pub lines: Vec<String>,
}

/// A parsed save output or restore input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tables {
    pub tables: Vec<Table>,
}

/// Built-in chains of the table named `table`, if iptables knows the table.
pub fn builtin_chains(table: &str) -> Option<&'static [&'static str]> {
    KnownTable::from_name(table).map(KnownTable::builtin_chains)
}

fn is_builtin(table: &str, chain: &str) -> bool {
    KnownTable::from_name(table).is_some_and(|t| t.has_builtin_chain(chain))
}

/// Splits a rule line into words the way iptables-restore does: whitespace separated, double quotes group.
fn words(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                if start.is_none() {
                    start = Some(i);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(st) = start.take() {
                    out.push(&s[st..i]);
                }
            }
            _ => {
                if start.is_none() {
                    start = Some(i);
                }
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if let Some(st) = start {
        out.push(&s[st..]);
    }
    Ok(out)
}

/// The remainder of `s` after its first `n` words (and the whitespace that follows them).
fn after_words(s: &str, n: usize) -> &str {
    let mut rest = s.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = rest[end..].trim_start();
    }
    rest
}

fn target_of(ws: &[&str]) -> Option<String> {
    ws.windows(2)
        .rfind(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1].trim_matches(|c| c == '"' || c == '\'').to_string())
}

impl Tables {
    /// Parses iptables-save output or iptables-restore input. Only what these formats contain is accepted:
    /// comments, `*table`, `:chain policy [counters]`, `-N chain`, `-A chain spec`, `-I chain [pos] spec`, `COMMIT`.
    pub fn parse(text: &str) -> Result<Tables, TextError> {
        let mut tables: Vec<Table> = Vec::new();
        let mut current: Option<Table> = None;
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let err = |reason: &str| TextError {
                line: idx + 1,
                text: line.to_string(),
                reason: reason.to_string(),
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if current.is_some() {
                    return Err(err("a table starts before the previous one was committed"));
                }
                let name = name.trim();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(err("invalid table name"));
                }
                if builtin_chains(name).is_none() {
                    return Err(err("unknown table"));
                }
                if tables.iter().any(|t| t.name == name) {
                    return Err(err("table given twice"));
                }
                current = Some(Table {
                    name: name.to_string(),
                    ..Table::default()
                });
                continue;
            }
            let Some(table) = current.as_mut() else {
                return Err(err("content outside of a table"));
            };
            if line == "COMMIT" {
                if let Some(t) = current.take() {
                    tables.push(t);
                }
                continue;
            }
            let ws = words(line).map_err(|r| err(&r))?;
            if let Some(decl) = line.strip_prefix(':') {
                let dw = words(decl).map_err(|r| err(&r))?;
                let (Some(chain), Some(policy)) = (dw.first(), dw.get(1)) else {
                    return Err(err("chain declaration without a policy"));
                };
                if *policy == "-" {
                    if is_builtin(&table.name, chain) {
                        return Err(err("built-in chain declared as user-defined"));
                    }
                    table.chains.push(chain.to_string());
                } else if !is_builtin(&table.name, chain) {
                    return Err(err("policy on a chain that is not built in"));
                }
                table.lines.push(line.to_string());
                continue;
            }
            match ws.first().copied() {
                Some("-N" | "--new-chain") => {
                    let [_, chain] = ws.as_slice() else {
                        return Err(err("-N takes exactly one chain name"));
                    };
                    if is_builtin(&table.name, chain) {
                        return Err(err("cannot create a built-in chain"));
                    }
                    table.chains.push(chain.to_string());
                }
                Some("-A" | "--append") => {
                    let Some(chain) = ws.get(1) else {
                        return Err(err("-A without a chain"));
                    };
                    table.rules.push(Rule {
                        chain: chain.to_string(),
                        op: RuleOp::Append,
                        spec: after_words(line, 2).to_string(),
                        target: target_of(&ws),
                    });
                }
                Some("-I" | "--insert") => {
                    let Some(chain) = ws.get(1) else {
                        return Err(err("-I without a chain"));
                    };
                    let pos = ws.get(2).and_then(|p| p.parse::<u32>().ok());
                    let skip = if pos.is_some() { 3 } else { 2 };
                    table.rules.push(Rule {
                        chain: chain.to_string(),
                        op: RuleOp::Insert(pos),
                        spec: after_words(line, skip).to_string(),
                        target: target_of(&ws),
                    });
                }
                _ => return Err(err("not a chain declaration, -N, -A, -I or COMMIT")),
            }
            table.lines.push(line.to_string());
        }
        if let Some(t) = current {
            return Err(TextError {
                line: text.lines().count(),
                text: format!("*{}", t.name),
                reason: "table is not terminated by COMMIT".into(),
            });
        }
        Ok(Tables { tables })
    }

    /// Checks a restore input that we are about to program: every rule's chain exists (built in, or created by
    /// the input itself), every created chain is an `ISTIO_*` chain, nothing is given twice.
    pub fn validate_payload(&self) -> Result<(), String> {
        for t in &self.tables {
            let mut seen = BTreeSet::new();
            for c in &t.chains {
                if !c.starts_with(OWN_CHAIN_PREFIX) {
                    return Err(format!(
                        "table {}: chain {c:?} is not an {OWN_CHAIN_PREFIX}* chain",
                        t.name
                    ));
                }
                if !seen.insert(c.as_str()) {
                    return Err(format!("table {}: chain {c:?} created twice", t.name));
                }
            }
            for r in &t.rules {
                if !is_builtin(&t.name, &r.chain) && !seen.contains(r.chain.as_str()) {
                    return Err(format!(
                        "table {}: rule in chain {:?}, which is neither built in nor created: {}",
                        t.name, r.chain, r.spec
                    ));
                }
                if r.spec.is_empty() {
                    return Err(format!("table {}: empty rule in chain {}", t.name, r.chain));
                }
            }
        }
        Ok(())
    }

    /// Does any table hold at least one rule?
    pub fn has_rules(&self) -> bool {
        self.tables.iter().any(|t| !t.rules.is_empty())
    }

    /// The rules that sit in built-in chains, as (table, chain, spec).
    pub fn builtin_rules(&self) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for t in &self.tables {
            for r in &t.rules {
                if is_builtin(&t.name, &r.chain) {
                    out.insert((t.name.clone(), r.chain.clone(), r.spec.clone()));
                }
            }
        }
        out
    }
}

/// What of ours a table holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OwnedTable {
    /// `ISTIO_*` chains and their rules, in order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Our rules in the other chains (built in, or someone else's), per chain, in order.
    pub hooks: BTreeMap<String, Vec<String>>,
}

impl OwnedTable {
    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.hooks.values().all(Vec::is_empty)
    }
}

/// What of ours a whole ruleset holds, per table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owned {
    pub tables: BTreeMap<String, OwnedTable>,
}

impl Owned {
    /// Collects ours from a save output. `also_ours` are rules of built-in chains that count as ours even though
    /// they jump to no `ISTIO_*` chain (the canonical form of the built-in rules of the ruleset we program).
    pub fn from_save(save: &Tables, also_ours: &BTreeSet<(String, String, String)>) -> Owned {
        let mut tables = BTreeMap::new();
        for t in &save.tables {
            let mut owned = OwnedTable::default();
            for c in &t.chains {
                if c.starts_with(OWN_CHAIN_PREFIX) {
                    owned.chains.insert(c.clone(), Vec::new());
                }
            }
            for r in &t.rules {
                if r.chain.starts_with(OWN_CHAIN_PREFIX) {
                    owned
                        .chains
                        .entry(r.chain.clone())
                        .or_default()
                        .push(r.spec.clone());
                } else if r.jumps_to_own_chain()
                    || also_ours.contains(&(t.name.clone(), r.chain.clone(), r.spec.clone()))
                {
                    owned
                        .hooks
                        .entry(r.chain.clone())
                        .or_default()
                        .push(r.spec.clone());
                }
            }
            if !owned.is_empty() {
                tables.insert(t.name.clone(), owned);
            }
        }
        Owned { tables }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Restore lines, per table, that remove all of this: our rules in other chains deleted one by one (their
    /// save form is valid `-D` input), then our chains flushed, then deleted.
    pub fn removal(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (table, owned) in &self.tables {
            let mut lines = Vec::new();
            for (chain, specs) in &owned.hooks {
                for spec in specs {
                    lines.push(format!("-D {chain} {spec}"));
                }
            }
            for chain in owned.chains.keys() {
                lines.push(format!("-F {chain}"));
            }
            for chain in owned.chains.keys() {
                lines.push(format!("-X {chain}"));
            }
            out.insert(table.clone(), lines);
        }
        out
    }
}

/// One restore transaction per table: first `before` (removal of what was there), then the payload's own lines,
/// then COMMIT. Tables only in `before` come after the payload's tables.
pub fn compose(before: &BTreeMap<String, Vec<String>>, payload: Option<&Tables>) -> String {
    let mut out = String::new();
    let mut done = BTreeSet::new();
    for t in payload.map(|p| p.tables.as_slice()).unwrap_or_default() {
        out.push_str(&format!("*{}\n", t.name));
        for l in before.get(&t.name).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
        for l in &t.lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        done.insert(t.name.as_str());
    }
    for (table, lines) in before {
        if done.contains(table.as_str()) || lines.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin golden from Istio's compatibility corpus (`shared/compat/istio`, found by walking up from the
    /// crate, or `MESHCNI_COMPAT_DIR`).
    fn golden(name: &str) -> String {
        let dir = crate::compat::istio_dir();
        let path = dir.join("plugin").join(format!("{name}.txt.golden"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// What iptables-legacy-save 1.8.9 printed for the tproxy golden's mangle table (on a pod netns that also
    /// holds a foreign rule in OUTPUT).
    const SAVED: &str = "# Generated by iptables-save v1.8.9 on Sat Nov 21 23:55:26 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN
-A OUTPUT -p udp -m comment --comment \"someone else\" -j ACCEPT
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
# Completed on Sat Nov 21 23:55:26 2026
";

    #[test]
    fn parses_restore_input_with_inserts() {
        let tproxy = golden("tproxy");
        let t = Tables::parse(&tproxy).unwrap();
        assert_eq!(
            t.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["mangle", "nat"]
        );
        let mangle = &t.tables[0];
        assert_eq!(
            mangle.chains,
            ["ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_INBOUND"]
        );
        let ins = mangle
            .rules
            .iter()
            .find(|r| r.op == RuleOp::Insert(Some(2)))
            .unwrap();
        assert_eq!(ins.chain, "ISTIO_INBOUND");
        assert_eq!(ins.spec, "-p tcp -s 127.0.0.6/32 -i lo -j RETURN");
        assert_eq!(ins.target.as_deref(), Some("RETURN"));
        t.validate_payload().unwrap();
        // Lines are kept verbatim for replay.
        assert_eq!(mangle.lines[0], "-N ISTIO_DIVERT");
        assert_eq!(
            mangle.lines.len(),
            tproxy.lines().take_while(|l| *l != "COMMIT").count() - 1
        );
    }

    #[test]
    fn parses_save_output_and_finds_ours() {
        let t = Tables::parse(SAVED).unwrap();
        let owned = Owned::from_save(&t, &BTreeSet::new());
        let m = &owned.tables["mangle"];
        assert_eq!(
            m.chains.keys().collect::<Vec<_>>(),
            ["ISTIO_DIVERT", "ISTIO_INBOUND", "ISTIO_TPROXY"]
        );
        assert_eq!(m.chains["ISTIO_DIVERT"].len(), 2);
        // Only the jump is ours without more knowledge; the foreign rule is never ours.
        assert_eq!(m.hooks["PREROUTING"], ["-p tcp -j ISTIO_INBOUND"]);
        assert!(!m.hooks.contains_key("OUTPUT"));

        let also: BTreeSet<_> = [(
            "mangle".to_string(),
            "OUTPUT".to_string(),
            "-o lo -p tcp -m mark --mark 0x539 -j RETURN".to_string(),
        )]
        .into();
        let owned = Owned::from_save(&t, &also);
        assert_eq!(
            owned.tables["mangle"].hooks["OUTPUT"],
            ["-o lo -p tcp -m mark --mark 0x539 -j RETURN"]
        );
        let removal = owned.removal();
        assert_eq!(
            removal["mangle"],
            [
                "-D OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN",
                "-D PREROUTING -p tcp -j ISTIO_INBOUND",
                "-F ISTIO_DIVERT",
                "-F ISTIO_INBOUND",
                "-F ISTIO_TPROXY",
                "-X ISTIO_DIVERT",
                "-X ISTIO_INBOUND",
                "-X ISTIO_TPROXY",
            ]
        );
    }

    #[test]
    fn quoted_words_stay_together() {
        let t = Tables::parse(SAVED).unwrap();
        let foreign = t.tables[0]
            .rules
            .iter()
            .find(|r| r.spec.contains("someone else"))
            .unwrap();
        assert_eq!(foreign.target.as_deref(), Some("ACCEPT"));
        assert_eq!(
            words("-m comment --comment \"a -j ISTIO_X\" -j RETURN").unwrap(),
            [
                "-m",
                "comment",
                "--comment",
                "\"a -j ISTIO_X\"",
                "-j",
                "RETURN"
            ]
        );
        assert!(words("-m comment --comment \"open").is_err());
    }

    #[test]
    fn empty_state_owns_nothing() {
        let t = Tables::parse("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
            .unwrap();
        assert!(!t.has_rules());
        assert!(Owned::from_save(&t, &BTreeSet::new()).is_empty());
        assert!(Tables::parse("").unwrap().tables.is_empty());
    }

    #[test]
    fn compose_merges_removal_and_payload_per_table() {
        let payload = Tables::parse("* nat\n-N ISTIO_A\n-A OUTPUT -j ISTIO_A\nCOMMIT\n").unwrap();
        let mut before = BTreeMap::new();
        before.insert("nat".to_string(), vec!["-D OUTPUT -j ISTIO_A".to_string()]);
        before.insert(
            "raw".to_string(),
            vec!["-F ISTIO_B".to_string(), "-X ISTIO_B".to_string()],
        );
        assert_eq!(
            compose(&before, Some(&payload)),
            "*nat\n-D OUTPUT -j ISTIO_A\n-N ISTIO_A\n-A OUTPUT -j ISTIO_A\nCOMMIT\n\
             *raw\n-F ISTIO_B\n-X ISTIO_B\nCOMMIT\n"
        );
        assert_eq!(compose(&BTreeMap::new(), None), "");
    }

    #[test]
    fn malformed_input_is_refused_with_its_line() {
        for (text, reason) in [
            ("*nat\n-A OUTPUT -j X\n", "not terminated"),
            ("-A OUTPUT -j X\n", "outside of a table"),
            ("*bogus\nCOMMIT\n", "unknown table"),
            ("*nat\n-Z OUTPUT\nCOMMIT\n", "not a chain declaration"),
            ("*nat\nCOMMIT\n*nat\nCOMMIT\n", "twice"),
            ("*nat\n*raw\nCOMMIT\n", "before the previous"),
            ("*nat\n:ISTIO_X ACCEPT [0:0]\nCOMMIT\n", "not built in"),
        ] {
            let e = Tables::parse(text).unwrap_err();
            assert!(e.to_string().contains(reason), "{text:?}: {e}");
        }
        let e = Tables::parse("*nat\nCOMMIT\n*nat\nCOMMIT\n").unwrap_err();
        assert_eq!(e.line, 3);
    }

    #[test]
    fn payload_validation() {
        let ok = Tables::parse(
            "*nat\n-N ISTIO_A\n-A ISTIO_A -j RETURN\n-I OUTPUT 1 -j ISTIO_A\nCOMMIT\n",
        )
        .unwrap();
        ok.validate_payload().unwrap();
        let undeclared = Tables::parse("*nat\n-A ISTIO_A -j RETURN\nCOMMIT\n").unwrap();
        assert!(undeclared
            .validate_payload()
            .unwrap_err()
            .contains("ISTIO_A"));
        let foreign = Tables::parse("*nat\n-N KUBE_X\nCOMMIT\n").unwrap();
        assert!(foreign.validate_payload().unwrap_err().contains("KUBE_X"));
        let twice = Tables::parse("*nat\n-N ISTIO_A\n-N ISTIO_A\nCOMMIT\n").unwrap();
        assert!(twice.validate_payload().unwrap_err().contains("twice"));
    }

    #[test]
    fn every_plugin_golden_is_a_valid_payload() {
        for name in [
            "basic",
            "tproxy",
            "dns",
            "include-exclude-ip",
            "include-exclude-ports",
        ] {
            let text = golden(name);
            let t = Tables::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            t.validate_payload()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(t.has_rules(), "{name}");
        }
    }
}
