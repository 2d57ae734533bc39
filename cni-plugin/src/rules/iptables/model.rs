//! The one iptables model: address families, tables and their built-in chains, built-in targets. The renderer
//! (`rules::iptables`) writes payloads with it and the backends (`apply::iptables`, `apply::text`) read
//! iptables-save output back with it, so both agree on what is built in and what is ours.

use std::fmt;

/// An address family: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The tools' base name: `iptables`, `ip6tables`.
    pub fn tool_base(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The tables iptables knows. Ordered by name: Istio writes its tables sorted by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
    Security,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Filter,
        Table::Mangle,
        Table::Nat,
        Table::Raw,
        Table::Security,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
            Table::Security => "security",
        }
    }

    /// The table named `name` (as in `*nat`), if iptables knows it.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The chains that exist in this table without `-N`.
    pub fn builtin_chains(self) -> &'static [&'static str] {
        match self {
            Table::Filter | Table::Security => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            Table::Raw => &["PREROUTING", "OUTPUT"],
        }
    }

    pub fn has_builtin_chain(self, chain: &str) -> bool {
        self.builtin_chains().contains(&chain)
    }
}

/// Targets that are not chains.
pub const BUILTIN_TARGETS: [&str; 3] = ["ACCEPT", "RETURN", "DROP"];

/// Istio's `BuiltInChainsAndTargetsMap`: a name that is a built-in chain of any table, or a built-in target, is
/// never created with `-N`.
pub fn is_builtin_chain_or_target(name: &str) -> bool {
    BUILTIN_TARGETS.contains(&name) || Table::ALL.iter().any(|t| t.has_builtin_chain(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_istios() {
        for name in [
            "INPUT",
            "OUTPUT",
            "FORWARD",
            "PREROUTING",
            "POSTROUTING",
            "ACCEPT",
            "RETURN",
            "DROP",
        ] {
            assert!(is_builtin_chain_or_target(name), "{name}");
        }
        for name in ["ISTIO_OUTPUT", "REDIRECT", "TPROXY", "input"] {
            assert!(!is_builtin_chain_or_target(name), "{name}");
        }
    }

    #[test]
    fn tables_by_name_in_istios_order() {
        for t in Table::ALL {
            assert_eq!(Table::from_name(t.as_str()), Some(t));
        }
        assert_eq!(Table::from_name("bogus"), None);
        let mut sorted = Table::ALL;
        sorted.sort_by_key(|t| t.as_str());
        assert_eq!(sorted, Table::ALL);
        assert!(Table::Raw.has_builtin_chain("OUTPUT") && !Table::Raw.has_builtin_chain("INPUT"));
    }
}
