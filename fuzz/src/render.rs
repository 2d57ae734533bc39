//! The renderer invariant, for both renderers of a [`CaptureConfig`]:
//!
//! - every whitespace-separated token of the iptables-restore payloads and of the nft script is a word of a string
//!   literal in the renderer's source (read at compile time, tests excluded), a number (every number is a typed
//!   port, id, mark, index or priority), a list of numbers, or the rendering of a typed value of the configuration
//!   (CIDR, interface name, group name, DNS server) or of the renderer's own fixed addresses; optionally with a
//!   punctuation fragment of a literal before or after it (`:15001`, `1337/0xffffffff`, `53,`);
//! - in the typed nftables ruleset, every interface, prefix, port, uid, gid, mark and zone is one of the
//!   configuration's (or a fixed value of the renderer), every jump goes to a chain the table declares, and
//!   every rule's chain is declared;
//! - the IPv4 payload names only IPv4 addresses and the IPv6 payload only IPv6 ones; the IPv6 payload exists
//!   exactly when IPv6 is enabled; the payloads are well-formed restore blocks (`* table` ... `COMMIT`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::OnceLock;

use cni_plugin::rules::iptables::Table;
use cni_plugin::rules::nftables::{self, Expr, Iface, NftRuleset, Ports, Prefix, Verdict};
use cni_plugin::rules::{
    render_iptables, CaptureConfig, IpRanges, OwnerGroup, OwnerGroups, PortSelector,
};
use ipnet::IpNet;

/// Fixed values of the renderers (their private constants): the passthrough source of inbound connections, the
/// IPv6 loopback, the DNS ports, the outbound mark and the DNS conntrack zones. A change there fails here loudly.
const FIXED_PREFIXES: [&str; 3] = ["127.0.0.6/32", "::6/128", "::1/128"];
const DNS_PORT: u16 = 53;
const DNS_LISTENER_PORT: u16 = 15053;
const OUTBOUND_MARK: u32 = 1338;
const DNS_ZONES: [u16; 2] = [1, 2];

/// The words of a renderer's string literals (placeholders removed), and the punctuation fragments that stand
/// next to a placeholder or alone (`:`, `/0xffffffff`, `,`).
#[derive(Debug, Default)]
pub struct Literals {
    words: HashSet<String>,
    fragments: Vec<String>,
}

impl Literals {
    /// From Rust source files: every string literal outside comments and outside the `#[cfg(test)] mod tests`.
    pub fn of_sources(sources: &[&str]) -> Self {
        let mut out = Literals::default();
        for src in sources {
            let tests = src
                .match_indices("#[cfg(test)]")
                .find(|(i, m)| src[i + m.len()..].trim_start().starts_with("mod tests"));
            let code = tests.map_or(*src, |(i, _)| &src[..i]);
            for lit in string_literals(code) {
                out.add_literal(&lit);
            }
        }
        out.fragments.sort();
        out.fragments.dedup();
        out
    }

    fn add_literal(&mut self, lit: &str) {
        for word in without_placeholders(lit).split_whitespace() {
            if word.contains('\0') {
                for frag in word.split('\0').filter(|f| !f.is_empty()) {
                    self.words.insert(frag.to_string());
                    self.fragments.push(frag.to_string());
                }
            } else {
                self.words.insert(word.to_string());
                if word.chars().all(|c| c.is_ascii_punctuation()) {
                    self.fragments.push(word.to_string());
                }
            }
        }
    }

    /// Is `word` one of the literal words?
    pub fn has_word(&self, word: &str) -> bool {
        self.words.contains(word)
    }

    /// Is `tok` a literal word, or a value (see [`is_value`]) with at most one fragment on each side?
    pub fn allows(&self, tok: &str, values: &HashSet<String>) -> bool {
        if self.words.contains(tok) || is_value(tok, values) {
            return true;
        }
        let suffixed = |rest: &str| {
            self.fragments.iter().any(|s| {
                rest.len() > s.len()
                    && rest.ends_with(s.as_str())
                    && is_value(&rest[..rest.len() - s.len()], values)
            })
        };
        self.fragments.iter().any(|p| {
            tok.strip_prefix(p.as_str())
                .is_some_and(|rest| is_value(rest, values) || suffixed(rest))
        }) || suffixed(tok)
    }
}

/// A typed value's rendering: a number, a comma list of numbers, or one of `values`.
fn is_value(tok: &str, values: &HashSet<String>) -> bool {
    let number = |t: &str| {
        let digits = t.strip_prefix('-').unwrap_or(t);
        !digits.is_empty() && digits.len() <= 10 && digits.bytes().all(|b| b.is_ascii_digit())
    };
    values.contains(tok) || number(tok) || (tok.contains(',') && tok.split(',').all(number))
}

/// `{}`, `{name}`, `{:04x}` become `\0`; `{{` and `}}` become braces; a brace that opens no placeholder stays.
fn without_placeholders(lit: &str) -> String {
    let mut out = String::new();
    let mut rest = lit;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") || rest.starts_with("}}") {
            out.push(c);
            rest = &rest[2..];
            continue;
        }
        if c == '{' {
            if let Some(end) = rest.find('}') {
                let inner = &rest[1..end];
                if inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:.?#".contains(c))
                {
                    out.push('\0');
                    rest = &rest[end + 1..];
                    continue;
                }
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The string literals of Rust source (normal, raw and byte strings; escapes resolved), comments skipped.
fn string_literals(src: &str) -> Vec<String> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == 'r' && matches!(next, Some('#' | '"')) && (i == 0 || !ident(b[i - 1])) {
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                i += 1;
                continue;
            }
            j += 1;
            let start = j;
            while j < b.len()
                && !(b[j] == '"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&'#')))
            {
                j += 1;
            }
            out.push(b[start..j.min(b.len())].iter().collect());
            i = j + 1 + hashes;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                    match b.get(i) {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('r') => s.push('\r'),
                        Some('0') => s.push('\0'),
                        Some('\n') => {
                            while b.get(i + 1).is_some_and(|c| c.is_whitespace()) {
                                i += 1;
                            }
                        }
                        Some(other) => s.push(*other),
                        None => {}
                    }
                } else {
                    s.push(b[i]);
                }
                i += 1;
            }
            out.push(s);
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '"') is skipped; a lifetime ('a) is not a literal.
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The words of the iptables renderer (rules/iptables: the builder and the table model).
pub fn iptables_literals() -> &'static Literals {
    static L: OnceLock<Literals> = OnceLock::new();
    L.get_or_init(|| {
        Literals::of_sources(&[
            include_str!("../../cni-plugin/src/rules/iptables/mod.rs"),
            include_str!("../../cni-plugin/src/rules/iptables/model.rs"),
        ])
    })
}

/// The words of the nftables renderer (rules/nftables.rs).
pub fn nftables_literals() -> &'static Literals {
    static L: OnceLock<Literals> = OnceLock::new();
    L.get_or_init(|| {
        Literals::of_sources(&[include_str!("../../cni-plugin/src/rules/nftables.rs")])
    })
}

fn nets(cfg: &CaptureConfig) -> Vec<IpNet> {
    let mut nets = cfg.outbound_ip_ranges_exclude.clone();
    if let IpRanges::Only(list) = &cfg.outbound_ip_ranges_include {
        nets.extend(list);
    }
    nets.push(IpNet::V4(cfg.host_ipv4_loopback_cidr));
    nets
}

fn groups(cfg: &CaptureConfig) -> Vec<OwnerGroup> {
    let mut groups = cfg.owner_groups_exclude.clone();
    if let OwnerGroups::Only(list) = &cfg.owner_groups_include {
        groups.extend(list.iter().cloned());
    }
    groups
}

/// The renderings of the configuration's typed values that are not numbers.
fn typed_values(cfg: &CaptureConfig) -> HashSet<String> {
    let mut v: HashSet<String> = nets(cfg).iter().map(IpNet::to_string).collect();
    v.extend(FIXED_PREFIXES.iter().map(|s| s.to_string()));
    for iface in cfg
        .exclude_interfaces
        .iter()
        .chain(&cfg.reroute_virtual_interfaces)
    {
        v.insert(iface.to_string());
    }
    v.extend(groups(cfg).iter().map(OwnerGroup::to_string));
    for s in cfg.dns_servers_v4.iter().chain(&cfg.dns_servers_v6) {
        let len = if s.addr().is_ipv4() { 32 } else { 128 };
        v.insert(format!("{s}/{len}"));
    }
    v
}

/// Checks both renderers' output for `cfg` (which must be valid); panics with what is wrong.
pub fn check_capture(cfg: &CaptureConfig) {
    let values = typed_values(cfg);
    let rs = render_iptables(cfg);
    assert_eq!(
        rs.v6.is_some(),
        cfg.enable_ipv6,
        "IPv6 payload iff IPv6 is enabled"
    );
    assert_eq!(
        rs.routes,
        cfg.route_setup(),
        "routes are the configuration's"
    );
    check_restore(&rs.v4, false, &values);
    if let Some(v6) = &rs.v6 {
        check_restore(v6, true, &values);
    }
    let nft = nftables::render(cfg);
    check_nft_typed(&nft, cfg);
    let script = nft.to_string();
    let lit = nftables_literals();
    for line in script.lines() {
        for tok in line.split_whitespace() {
            assert!(
                lit.allows(tok, &values),
                "nft token {tok:?} is neither a word of the renderer nor a typed value\nline: {line}\nconfig: {cfg:#?}"
            );
        }
    }
    let expected_lines: usize = nft
        .tables
        .iter()
        .map(|t| 2 + t.chains.len() + t.rules.len())
        .sum();
    assert_eq!(
        script.lines().count(),
        expected_lines,
        "one line per command:\n{script}"
    );
}

/// One family's iptables-restore payload.
fn check_restore(text: &str, ipv6: bool, values: &HashSet<String>) {
    let lit = iptables_literals();
    let mut table: Option<&str> = None;
    for line in text.lines() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            toks.join(" "),
            line,
            "a line is its tokens, single-spaced: {line:?}"
        );
        match (table, toks.as_slice()) {
            (None, ["*", name]) => {
                assert!(
                    Table::ALL.iter().any(|t| t.as_str() == *name),
                    "unknown table {name:?}"
                );
                table = Some(name);
            }
            (Some(_), ["COMMIT"]) => table = None,
            (Some(_), ["-N", chain]) => {
                assert!(lit.has_word(chain), "chain {chain:?} is not the renderer's")
            }
            (Some(_), [op, ..]) if *op == "-A" || *op == "-I" => {}
            _ => panic!("not a restore line here: {line:?} (in table {table:?})\n{text}"),
        }
        for (i, tok) in toks.iter().enumerate() {
            assert!(
                lit.allows(tok, values),
                "iptables token {tok:?} is neither a word of the renderer nor a typed value\nline: {line}"
            );
            // An address is the value of -s/-d (an interface may be named 10.0.0.1, after -i/-o).
            let is_addr_opt = i > 0 && matches!(toks[i - 1], "-s" | "-d");
            let addr = tok
                .parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| tok.parse::<IpAddr>());
            if let (true, Ok(addr)) = (is_addr_opt, addr) {
                assert_eq!(
                    addr.is_ipv6(),
                    ipv6,
                    "address {tok} in the IPv{} payload\nline: {line}\n{text}",
                    if ipv6 { 6 } else { 4 }
                );
            }
        }
    }
    assert_eq!(table, None, "unterminated table block:\n{text}");
}

/// The typed nftables ruleset: every value in it is the configuration's or a fixed one of the renderer.
fn check_nft_typed(nft: &NftRuleset, cfg: &CaptureConfig) {
    let nets = nets(cfg);
    let fixed: Vec<IpNet> = FIXED_PREFIXES
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let ifaces: Vec<_> = cfg
        .exclude_interfaces
        .iter()
        .chain(&cfg.reroute_virtual_interfaces)
        .collect();
    let mut ports = vec![
        cfg.proxy_port,
        cfg.inbound_capture_port,
        cfg.inbound_tunnel_port,
        DNS_PORT,
        DNS_LISTENER_PORT,
    ];
    if let PortSelector::Only(p) = &cfg.inbound_ports_include {
        ports.extend(p);
    }
    ports.extend(&cfg.inbound_ports_exclude);
    ports.extend(&cfg.outbound_ports_include);
    ports.extend(&cfg.outbound_ports_exclude);
    let marks = [cfg.inbound_tproxy_mark, OUTBOUND_MARK];
    let mut gids: Vec<OwnerGroup> = cfg.proxy_gids.iter().map(|g| OwnerGroup::Id(*g)).collect();
    gids.extend(groups(cfg));
    for spec in &nft.tables {
        let declared = |c| spec.chains.iter().any(|d| d.chain == c);
        assert_eq!(
            spec.rules_in_final_order().len(),
            spec.rules.len(),
            "final order keeps every rule of {}",
            spec.table
        );
        for rule in &spec.rules {
            assert!(
                declared(rule.chain),
                "rule in undeclared chain {}",
                rule.chain
            );
            for e in &rule.exprs {
                let ok = match e {
                    Expr::Iifname(Iface::Named(n)) | Expr::Oifname(Iface::Named(n)) => {
                        ifaces.contains(&n)
                    }
                    Expr::Port {
                        ports: Ports::One(p),
                        ..
                    } => ports.contains(p),
                    Expr::Port {
                        ports: Ports::Set(set),
                        ..
                    } => set.iter().all(|p| ports.contains(p)),
                    Expr::Addr {
                        prefix: Prefix::Net(n),
                        ..
                    } => nets.contains(n) || fixed.contains(n),
                    Expr::Addr {
                        prefix: Prefix::Host(s),
                        ..
                    } => cfg
                        .dns_servers_v4
                        .iter()
                        .chain(&cfg.dns_servers_v6)
                        .any(|d| d == s),
                    Expr::SkUid { uid, .. } => cfg.proxy_uids.contains(uid),
                    Expr::SkGid { group, .. } => gids.contains(group),
                    Expr::Mark { mark, .. } | Expr::CtMark(mark) | Expr::SetMark(mark) => {
                        marks.contains(mark)
                    }
                    Expr::SetCtZone(z) => DNS_ZONES.contains(z),
                    Expr::Redirect(p) => {
                        [cfg.proxy_port, cfg.inbound_capture_port, DNS_LISTENER_PORT].contains(p)
                    }
                    Expr::Tproxy { port, .. } => *port == cfg.inbound_capture_port,
                    Expr::Verdict(Verdict::Jump(target)) => declared(*target),
                    _ => true,
                };
                assert!(ok, "nft expression `{e}` ({e:?}) is not from the configuration\nin: {}\nconfig: {cfg:#?}", spec.rule_command(rule));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_read_from_source() {
        let l = Literals::of_sources(&[r##"
            // "not-a-literal" in a comment
            fn f() { words!("-p tcp --dport {} -j {}", a, b); let c = '"'; let r = r#"raw "x""#; }
            fn g<'a>() -> &'a str { write!(f, "{{ type {} ; }}") ; format!("{}/0xffffffff", m) }
            #[cfg(test)]
            mod tests { fn t() { "10.0.0.0/8" } }
        "##]);
        for w in [
            "-p",
            "tcp",
            "--dport",
            "-j",
            "raw",
            "\"x\"",
            "{",
            "type",
            ";",
            "}",
            "/0xffffffff",
        ] {
            assert!(l.has_word(w), "{w} missing from {l:?}");
        }
        for w in ["not-a-literal", "10.0.0.0/8", "{}", "\""] {
            assert!(!l.has_word(w), "{w} wrongly taken from {l:?}");
        }
        let values: HashSet<String> = ["eth0".to_string()].into();
        assert!(l.allows("1337/0xffffffff", &values));
        assert!(l.allows("eth0", &values));
        assert!(l.allows("80,443", &values));
        assert!(!l.allows("eth1", &values));
        assert!(!l.allows("0xffffffff", &values));
    }

    #[test]
    fn the_renderers_words_do_not_include_values() {
        let ipt = iptables_literals();
        for w in [
            "-A",
            "ISTIO_OUTPUT",
            "COMMIT",
            "nat",
            "--uid-owner",
            "REDIRECT",
        ] {
            assert!(ipt.has_word(w), "{w}");
        }
        let nft = nftables_literals();
        for w in ["add", "rule", "inet", "skuid", "istio-output", "priority"] {
            assert!(nft.has_word(w), "{w}");
        }
        assert!(!ipt.has_word("eth0") && !nft.has_word("10.0.0.0/8"));
    }

    #[test]
    #[should_panic(expected = "neither a word of the renderer nor a typed value")]
    fn raw_text_in_a_rule_is_caught() {
        let values: HashSet<String> = ["eth0".to_string()].into();
        check_restore(
            "* nat\n-A ISTIO_OUTPUT -o eth0;x -j RETURN\nCOMMIT\n",
            false,
            &values,
        );
    }

    #[test]
    #[should_panic(expected = "in the IPv4 payload")]
    fn an_address_of_the_other_family_is_caught() {
        let values: HashSet<String> = ["fd00::/8".to_string()].into();
        check_restore(
            "* nat\n-A ISTIO_OUTPUT -d fd00::/8 -j RETURN\nCOMMIT\n",
            false,
            &values,
        );
    }

    #[test]
    #[should_panic(expected = "is not from the configuration")]
    fn a_value_the_configuration_does_not_have_is_caught() {
        let with = CaptureConfig {
            exclude_interfaces: vec!["eth0".parse().expect("name")],
            ..CaptureConfig::default()
        };
        check_nft_typed(&nftables::render(&with), &CaptureConfig::default());
    }

    #[test]
    fn every_capture_case_satisfies_the_invariant() {
        let json = cni_plugin::compat::read(cni_plugin::rules::capture_cases::CASES_FILE);
        let json = String::from_utf8(json).expect("utf-8");
        for case in cni_plugin::rules::capture_cases::parse(&json).expect("cases") {
            check_capture(&case.config);
        }
    }
}
