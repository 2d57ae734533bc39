//! Reading a test netns's nftables state with Debian's `nft` (the tests may run it; the plugin never does): which
//! of Istio's `inet istio-proxy-{nat,mangle,raw}` tables exist, their rules as comparable lines, the whole ruleset without
//! counters.

use cni_plugin::rules::nftables::NftTable;

use crate::netns::TestNetns;

/// Every table in `ns`, as `nft list tables` names them (`inet istio-proxy-nat`, `ip nat`, ...).
pub fn tables(ns: &TestNetns) -> Vec<String> {
    ns.must("nft", &["list", "tables"])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_string)
        .collect()
}

/// The names of Istio's tables in `ns` (family inet: `istio-proxy-nat`, `-mangle`, `-raw`), in listing order.
pub fn istio_tables(ns: &TestNetns) -> Vec<String> {
    tables(ns)
        .into_iter()
        .filter_map(|t| {
            t.strip_prefix("inet ")
                .filter(|n| NftTable::ALL.iter().any(|ours| ours.name() == *n))
                .map(str::to_string)
        })
        .collect()
}

/// `nft --stateless list ruleset` in `ns`: the whole ruleset, counters without their values, so two listings
/// of the same rules compare equal whatever traffic went through them.
pub fn ruleset(ns: &TestNetns) -> String {
    ns.must("nft", &["--stateless", "list", "ruleset"])
}

/// The rules of Istio's tables in `ns`, one line each: `<table> <chain>: <rule as nft lists it>`, counters
/// without values; tables in listing order, chains and rules in their order. Chain declarations (`type ...
/// hook ...;`) are not rules.
pub fn istio_rules(ns: &TestNetns) -> Vec<String> {
    let mut out = Vec::new();
    for table in istio_tables(ns) {
        let listing = ns.must("nft", &["--stateless", "list", "table", "inet", &table]);
        out.extend(rules_of_listing(&table, &listing));
    }
    out
}

/// The rule lines of one table's listing (see [`istio_rules`]).
pub fn rules_of_listing(table: &str, listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chain: Option<&str> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(c) = line
            .strip_prefix("chain ")
            .and_then(|c| c.strip_suffix(" {"))
        {
            chain = Some(c);
        } else if line == "}" {
            chain = None;
        } else if let Some(c) = chain {
            if !line.is_empty() && !line.starts_with("type ") {
                out.push(format!("{table} {c}: {line}"));
            }
        }
    }
    out
}

/// Whether an nft rule line matches on an IPv4 address or uses IPv4 TPROXY (`ip saddr|daddr`, `tproxy ip`).
pub fn names_ipv4(rule: &str) -> bool {
    rule.contains("ip saddr") || rule.contains("ip daddr") || rule.contains("tproxy ip to")
}

/// Whether an nft rule line matches on an IPv6 address or uses IPv6 TPROXY (`ip6 ...`, `tproxy ip6`).
pub fn names_ipv6(rule: &str) -> bool {
    rule.contains("ip6 ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_becomes_rule_lines() {
        let listing = "table inet istio-proxy-nat {\n\tchain output {\n\t\ttype nat hook output priority \
                       -100; policy accept;\n\t\tcounter jump istio-output\n\t}\n\n\tchain istio-output {\n\t\t\
                       oifname \"lo\" ip6 saddr ::6 counter return\n\t\tip daddr 127.0.0.1 counter return\n\t}\n}\n";
        let rules = rules_of_listing("istio-proxy-nat", listing);
        assert_eq!(
            rules,
            [
                "istio-proxy-nat output: counter jump istio-output",
                "istio-proxy-nat istio-output: oifname \"lo\" ip6 saddr ::6 counter return",
                "istio-proxy-nat istio-output: ip daddr 127.0.0.1 counter return",
            ]
        );
        assert!(names_ipv6(&rules[1]) && !names_ipv4(&rules[1]));
        assert!(names_ipv4(&rules[2]) && !names_ipv6(&rules[2]));
        assert!(!names_ipv4(&rules[0]) && !names_ipv6(&rules[0]));
    }
}
