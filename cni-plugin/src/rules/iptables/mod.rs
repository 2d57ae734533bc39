//! The iptables renderer: Istio's `tools/istio-iptables` capture (`Run()`) and rule builder (`BuildV4Restore`,
//! `BuildV6Restore`), as iptables-restore payloads.
//!
//! Rules are assembled from tokens, and a token is either a `&'static str` written in this file or the rendering
//! of a typed, validated value (port, CIDR, interface name, id, mark). No runtime string is pasted into a rule.
//! The order of rules, of `-N` lines and of tables is Istio's, so the payloads equal Istio's byte for byte.
//! Istio's state checks, guardrails and cleanup commands are not part of the payloads: applying is the
//! caller's business.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub mod model;

use model::is_builtin_chain_or_target;
pub use model::{Family, Table};

use super::{
    CaptureConfig, DnsServer, InterceptionMode, InterfaceName, OwnerGroup, OwnerGroups,
    PortSelector, Ranges, Ruleset,
};

/// Mark of packets from the outbound proxy to the app by pod IP, in TPROXY mode (Istio's `OutboundMark`).
const OUTBOUND_MARK: u32 = 1338;
/// The agent's DNS listener.
const DNS_LISTENER_PORT: u16 = 15053;
const DNS_PORT: u16 = 53;
/// Source of the proxy's inbound passthrough connections.
const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The chains the rules live in or jump to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chain {
    Prerouting,
    Output,
    IstioInbound,
    IstioOutput,
    IstioOutputDns,
    IstioDivert,
    IstioTproxy,
    IstioRedirect,
    IstioInRedirect,
    IstioDrop,
}

impl Chain {
    pub fn as_str(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
            Chain::IstioInbound => "ISTIO_INBOUND",
            Chain::IstioOutput => "ISTIO_OUTPUT",
            Chain::IstioOutputDns => "ISTIO_OUTPUT_DNS",
            Chain::IstioDivert => "ISTIO_DIVERT",
            Chain::IstioTproxy => "ISTIO_TPROXY",
            Chain::IstioRedirect => "ISTIO_REDIRECT",
            Chain::IstioInRedirect => "ISTIO_IN_REDIRECT",
            Chain::IstioDrop => "ISTIO_DROP",
        }
    }
}

/// A typed value that fills a `{}` slot of a rule template. Implemented only for validated types, never for
/// strings: the fixed words of a rule are the template's, written in this file.
trait Token {
    fn token(&self) -> String;
}

impl Token for u16 {
    fn token(&self) -> String {
        self.to_string()
    }
}

impl Token for u32 {
    fn token(&self) -> String {
        self.to_string()
    }
}

impl Token for Chain {
    fn token(&self) -> String {
        self.as_str().to_string()
    }
}

impl Token for IpNet {
    fn token(&self) -> String {
        self.to_string()
    }
}

impl Token for &InterfaceName {
    fn token(&self) -> String {
        self.as_str().to_string()
    }
}

impl Token for &OwnerGroup {
    fn token(&self) -> String {
        self.to_string()
    }
}

/// A comma-separated port list (`-m multiport --dports`).
struct PortList<'a>(&'a [u16]);

impl Token for PortList<'_> {
    fn token(&self) -> String {
        let ports: Vec<String> = self.0.iter().map(u16::to_string).collect();
        ports.join(",")
    }
}

/// A TPROXY mark with its all-ones mask.
struct MarkMask(u32);

impl Token for MarkMask {
    fn token(&self) -> String {
        format!("{}/0xffffffff", self.0)
    }
}

/// A DNS server as a host prefix (`/32` or `/128`), in the server's own spelling.
struct HostPrefix<'a>(&'a DnsServer);

impl Token for HostPrefix<'_> {
    fn token(&self) -> String {
        let len = if self.0.addr().is_ipv4() { 32 } else { 128 };
        format!("{}/{len}", self.0)
    }
}

/// Number of `{}` words in a template (space-separated) (evaluated at compile time by [`words!`]).
const fn slots(template: &str) -> usize {
    let b = template.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        let starts_word = i == 0 || b[i - 1] == b' ';
        let ends_word = i + 2 == b.len() || b[i + 2] == b' ';
        if b[i] == b'{' && b[i + 1] == b'}' && starts_word && ends_word {
            n += 1;
        }
        i += 1;
    }
    n
}

/// The words of a rule template, each `{}` replaced by the next value.
fn fill(template: &'static str, values: &[&dyn Token]) -> Vec<String> {
    let mut values = values.iter().peekable();
    template
        .split_whitespace()
        .map(|w| match (w, values.next_if(|_| w == "{}")) {
            (_, Some(v)) => v.token(),
            (w, None) => w.to_string(),
        })
        .collect()
}

/// `words!("-p tcp --dport {} -j RETURN", port)`: a rule's words from a literal template and typed values. The
/// number of values must equal the number of `{}` slots; this is checked when compiling.
macro_rules! words {
    (@one $v:expr) => { () };
    ($template:literal $(, $v:expr)* $(,)?) => {{
        const _: () = assert!(
            slots($template) == <[()]>::len(&[$(words!(@one $v)),*]),
            "rule template and values differ in number"
        );
        fill($template, &[$(&$v as &dyn Token),*])
    }};
}

/// A rule: its table and chain (for the `-N` lines) and its words, starting with `-A CHAIN` or `-I CHAIN N`.
#[derive(Debug, Clone)]
struct Rule {
    table: Table,
    chain: Chain,
    params: Vec<String>,
}

/// Collects rules per family in the order they are added (Istio's `IptablesRuleBuilder`).
struct Builder {
    ipv6: bool,
    v4: Vec<Rule>,
    v6: Vec<Rule>,
}

impl Builder {
    fn new(ipv6: bool) -> Self {
        Builder {
            ipv6,
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }

    fn push(
        &mut self,
        family: Family,
        table: Table,
        chain: Chain,
        mut params: Vec<String>,
        args: Vec<String>,
    ) {
        params.extend(args);
        let rule = Rule {
            table,
            chain,
            params,
        };
        match family {
            Family::V4 => self.v4.push(rule),
            Family::V6 if self.ipv6 => self.v6.push(rule),
            Family::V6 => {}
        }
    }

    /// One family only (Istio's `AppendRuleV4`/`AppendRuleV6`).
    fn append_to(&mut self, family: Family, table: Table, chain: Chain, args: Vec<String>) {
        self.push(family, table, chain, words!("-A {}", chain), args);
    }

    /// One family only (Istio's `InsertRuleV4`/`InsertRuleV6`).
    fn insert_to(
        &mut self,
        family: Family,
        table: Table,
        chain: Chain,
        pos: u32,
        args: Vec<String>,
    ) {
        self.push(family, table, chain, words!("-I {} {}", chain, pos), args);
    }

    /// Both families, same words.
    fn append(&mut self, table: Table, chain: Chain, args: Vec<String>) {
        self.append_to(Family::V4, table, chain, args.clone());
        self.append_to(Family::V6, table, chain, args);
    }

    /// Both families, words depending on the family (Istio's `AppendVersionedRule`).
    fn append_versioned(
        &mut self,
        table: Table,
        chain: Chain,
        args: impl Fn(Family) -> Vec<String>,
    ) {
        self.append_to(Family::V4, table, chain, args(Family::V4));
        self.append_to(Family::V6, table, chain, args(Family::V6));
    }

    /// Both families, same words.
    fn insert(&mut self, table: Table, chain: Chain, pos: u32, args: Vec<String>) {
        self.insert_to(Family::V4, table, chain, pos, args.clone());
        self.insert_to(Family::V6, table, chain, pos, args);
    }
}

/// The iptables-restore payload of one family (Istio's `buildRestore`): per table, sorted by name, the `-N` of
/// every non-built-in chain that has rules (in order of first rule), then of every jumped-to chain not yet
/// created, then the rules in order; tables without rules are left out.
fn restore(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    let mut seen: HashSet<(&str, Table)> = HashSet::new();
    for r in rules {
        let chain = r.chain.as_str();
        if seen.insert((chain, r.table)) && !is_builtin_chain_or_target(chain) {
            tables
                .entry(r.table)
                .or_default()
                .push(format!("-N {chain}"));
        }
    }
    for r in rules {
        if let [.., jump, target] = r.params.as_slice() {
            if jump == "-j"
                && seen.insert((target.as_str(), r.table))
                && !is_builtin_chain_or_target(target)
            {
                tables
                    .entry(r.table)
                    .or_default()
                    .push(format!("-N {target}"));
            }
        }
    }
    for r in rules {
        tables.entry(r.table).or_default().push(r.params.join(" "));
    }
    let mut out = String::new();
    for (table, lines) in tables {
        out.push_str("* ");
        out.push_str(table.as_str());
        out.push('\n');
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Renders the iptables-restore payloads (and the routes that go with them) for a capture configuration.
pub fn render_iptables(cfg: &CaptureConfig) -> Ruleset {
    let b = build(cfg);
    Ruleset {
        v4: restore(&b.v4),
        v6: cfg.enable_ipv6.then(|| restore(&b.v6)),
        routes: cfg.route_setup(),
    }
}

impl Ranges {
    fn of_family(&self, family: Family) -> &[IpNet] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// Per-family addresses of Istio's versioned rules.
impl Family {
    /// The loopback range that is never captured.
    fn loopback(self, cfg: &CaptureConfig) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(cfg.host_ipv4_loopback_cidr),
            Family::V6 => IpNet::V6(Ipv6Net::from(Ipv6Addr::LOCALHOST)),
        }
    }

    /// The source address of the proxy's inbound passthrough connections.
    fn passthrough(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(Ipv4Net::from(PASSTHROUGH_V4)),
            Family::V6 => IpNet::V6(Ipv6Net::from(PASSTHROUGH_V6)),
        }
    }
}

/// The rule builder fed as Istio's `IptablesConfigurator.Run` feeds it.
fn build(cfg: &CaptureConfig) -> Builder {
    use Chain::*;
    use Table::*;

    let mut b = Builder::new(cfg.enable_ipv6);
    let tproxy = cfg.interception_mode == InterceptionMode::Tproxy;
    let exclude = Ranges::split(&cfg.outbound_ip_ranges_exclude);
    let include = Ranges::of(&cfg.outbound_ip_ranges_include);
    let tunnel = cfg.inbound_tunnel_port;

    // "Redirect DNS" without "capture all" and without any server captures nothing.
    let redirect_dns = cfg.redirect_dns
        && (cfg.capture_all_dns
            || !cfg.dns_servers_v4.is_empty()
            || !cfg.dns_servers_v6.is_empty());

    // Excluded interfaces are never captured.
    for iface in &cfg.exclude_interfaces {
        b.append(Nat, Prerouting, words!("-i {} -j RETURN", iface));
        b.append(Nat, Output, words!("-o {} -j RETURN", iface));
    }
    if tproxy {
        for iface in &cfg.exclude_interfaces {
            b.append(Mangle, Prerouting, words!("-i {} -j RETURN", iface));
            b.append(Mangle, Output, words!("-o {} -j RETURN", iface));
        }
    }
    // Inbound traffic of virtual interfaces is not captured as inbound.
    for iface in &cfg.reroute_virtual_interfaces {
        b.insert(Nat, Prerouting, 1, words!("-i {} -j RETURN", iface));
    }

    if cfg.drop_invalid {
        b.append(
            Mangle,
            Prerouting,
            words!("-m conntrack --ctstate INVALID -j {}", IstioDrop),
        );
        b.append(Mangle, IstioDrop, words!("-j DROP"));
    }

    b.append(
        Nat,
        IstioInbound,
        words!("-p tcp --dport {} -j RETURN", tunnel),
    );
    b.append(
        Nat,
        IstioRedirect,
        words!("-p tcp -j REDIRECT --to-ports {}", cfg.proxy_port),
    );
    b.append(
        Nat,
        IstioInRedirect,
        words!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_capture_port),
    );

    inbound(&mut b, cfg, tproxy);

    b.append(Nat, Output, words!("-j {}", IstioOutput));

    for &port in &cfg.outbound_ports_exclude {
        b.append(
            Nat,
            IstioOutput,
            words!("-p tcp --dport {} -j RETURN", port),
        );
        b.append(
            Nat,
            IstioOutput,
            words!("-p udp --dport {} -j RETURN", port),
        );
    }

    b.append_versioned(Nat, IstioOutput, |f| {
        words!("-o lo -s {} -j RETURN", f.passthrough())
    });

    let loopback_included = include.has_loopback();
    for &uid in &cfg.proxy_uids {
        // The proxy calling its own pod through a service address goes back through the inbound listener
        // (but, with DNS capture, not DNS: the agent talks to the DNS server directly).
        if redirect_dns {
            let ports = [DNS_PORT, tunnel];
            b.append_versioned(Nat, IstioOutput, |f| {
                words!(
                    "-o lo ! -d {} -p tcp -m multiport ! --dports {} -m owner --uid-owner {} -j {}",
                    f.loopback(cfg),
                    PortList(&ports),
                    uid,
                    IstioInRedirect
                )
            });
        } else {
            b.append_versioned(Nat, IstioOutput, |f| {
                words!(
                    "-o lo ! -d {} -p tcp ! --dport {} -m owner --uid-owner {} -j {}",
                    f.loopback(cfg),
                    tunnel,
                    uid,
                    IstioInRedirect
                )
            });
        }
        // The app calling itself over lo is left alone, unless loopback is explicitly captured; with DNS capture,
        // TCP DNS to a local server is still captured.
        if !loopback_included {
            if redirect_dns {
                b.append(
                    Nat,
                    IstioOutput,
                    words!(
                        "-o lo -p tcp ! --dport {} -m owner ! --uid-owner {} -j RETURN",
                        DNS_PORT,
                        uid
                    ),
                );
            } else {
                b.append(
                    Nat,
                    IstioOutput,
                    words!("-o lo -m owner ! --uid-owner {} -j RETURN", uid),
                );
            }
        }
        // The proxy's own traffic is never captured.
        b.append(
            Nat,
            IstioOutput,
            words!("-m owner --uid-owner {} -j RETURN", uid),
        );
    }

    for &gid in &cfg.proxy_gids {
        b.append_versioned(Nat, IstioOutput, |f| {
            words!(
                "-o lo ! -d {} -p tcp ! --dport {} -m owner --gid-owner {} -j {}",
                f.loopback(cfg),
                tunnel,
                gid,
                IstioInRedirect
            )
        });
        if !loopback_included {
            if redirect_dns {
                b.append(
                    Nat,
                    IstioOutput,
                    words!(
                        "-o lo -p tcp ! --dport {} -m owner ! --gid-owner {} -j RETURN",
                        DNS_PORT,
                        gid
                    ),
                );
            } else {
                b.append(
                    Nat,
                    IstioOutput,
                    words!("-o lo -m owner ! --gid-owner {} -j RETURN", gid),
                );
            }
        }
        b.append(
            Nat,
            IstioOutput,
            words!("-m owner --gid-owner {} -j RETURN", gid),
        );
    }

    owner_groups(&mut b, cfg);

    if redirect_dns {
        dns(&mut b, cfg);
    }

    // Traffic to loopback (Envoy-aware apps, container to container) is not captured.
    b.append_versioned(Nat, IstioOutput, |f| {
        words!("-d {} -j RETURN", f.loopback(cfg))
    });

    for family in [Family::V4, Family::V6] {
        for &net in exclude.of_family(family) {
            b.append_to(family, Nat, IstioOutput, words!("-d {} -j RETURN", net));
        }
    }

    for &port in &cfg.outbound_ports_include {
        b.append(
            Nat,
            IstioOutput,
            words!("-p tcp --dport {} -j {}", port, IstioRedirect),
        );
    }

    for family in [Family::V4, Family::V6] {
        outbound_include(&mut b, cfg, family, &include);
    }

    if tproxy {
        tproxy_marks(&mut b, cfg);
    }
    b
}

/// Inbound capture (Istio's `handleInboundPortsInclude`).
fn inbound(b: &mut Builder, cfg: &CaptureConfig, tproxy: bool) {
    use Chain::*;
    use Table::*;

    if cfg.inbound_ports_include.is_empty() {
        return;
    }
    let table = if tproxy {
        // Inbound packets are marked and diverted to the loopback interface, where TPROXY hands them to Envoy.
        b.append(
            Mangle,
            IstioDivert,
            words!("-j MARK --set-mark {}", cfg.inbound_tproxy_mark),
        );
        b.append(Mangle, IstioDivert, words!("-j ACCEPT"));
        for family in [Family::V4, Family::V6] {
            b.append_to(
                family,
                Mangle,
                IstioTproxy,
                words!(
                    "! -d {} -p tcp -j TPROXY --tproxy-mark {} --on-port {}",
                    family.loopback(cfg),
                    MarkMask(cfg.inbound_tproxy_mark),
                    cfg.inbound_capture_port
                ),
            );
        }
        Mangle
    } else {
        Nat
    };
    b.append(table, Prerouting, words!("-p tcp -j {}", IstioInbound));

    match &cfg.inbound_ports_include {
        PortSelector::All => {
            for &port in &cfg.inbound_ports_exclude {
                b.append(
                    table,
                    IstioInbound,
                    words!("-p tcp --dport {} -j RETURN", port),
                );
            }
            if tproxy {
                // Established connections go straight to the proxy's socket; new ones through TPROXY.
                b.append(
                    Mangle,
                    IstioInbound,
                    words!(
                        "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j {}",
                        IstioDivert
                    ),
                );
                b.append(Mangle, IstioInbound, words!("-p tcp -j {}", IstioTproxy));
            } else {
                b.append(Nat, IstioInbound, words!("-p tcp -j {}", IstioInRedirect));
            }
        }
        PortSelector::Only(ports) => {
            for &port in ports {
                if tproxy {
                    b.append(
                        Mangle,
                        IstioInbound,
                        words!(
                            "-p tcp --dport {} -m conntrack --ctstate RELATED,ESTABLISHED -j {}",
                            port,
                            IstioDivert
                        ),
                    );
                    b.append(
                        Mangle,
                        IstioInbound,
                        words!("-p tcp --dport {} -j {}", port, IstioTproxy),
                    );
                } else {
                    b.append(
                        Nat,
                        IstioInbound,
                        words!("-p tcp --dport {} -j {}", port, IstioInRedirect),
                    );
                }
            }
        }
    }
}

/// Capture by owner group (Istio's `handleCaptureByOwnerGroup`): with `*`, the excluded groups return; with a
/// list, every packet whose group is none of them returns, in one rule.
fn owner_groups(b: &mut Builder, cfg: &CaptureConfig) {
    use Chain::*;
    use Table::*;

    match &cfg.owner_groups_include {
        OwnerGroups::All => {
            for group in &cfg.owner_groups_exclude {
                b.append(
                    Nat,
                    IstioOutput,
                    words!("-m owner --gid-owner {} -j RETURN", group),
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut rule = Vec::new();
            for group in groups {
                rule.extend(words!("-m owner ! --gid-owner {}", group));
            }
            rule.extend(words!("-j RETURN"));
            b.append(Nat, IstioOutput, rule);
        }
    }
}

/// DNS capture to the agent and the conntrack zones that keep its two legs apart (Istio's `SetupDNSRedir` and
/// `addDNSConntrackZones`). Zone 1: the agent and the upstream resolvers; zone 2: the apps and the agent.
fn dns(b: &mut Builder, cfg: &CaptureConfig) {
    use Chain::*;
    use Table::*;

    let all = cfg.capture_all_dns;
    let servers = [
        (Family::V4, &cfg.dns_servers_v4),
        (Family::V6, &cfg.dns_servers_v6),
    ];

    b.append(Raw, Output, words!("-j {}", IstioOutputDns));
    for (family, list) in servers {
        if all || !list.is_empty() {
            b.append_to(family, Nat, IstioOutput, words!("-j {}", IstioOutputDns));
        }
    }

    if all {
        b.append(
            Nat,
            IstioOutputDns,
            words!(
                "-p tcp --dport {} -j REDIRECT --to-ports {}",
                DNS_PORT,
                DNS_LISTENER_PORT
            ),
        );
    } else {
        for (family, list) in servers {
            for s in list {
                b.append_to(
                    family,
                    Nat,
                    IstioOutputDns,
                    words!(
                        "-p tcp --dport {} -d {} -j REDIRECT --to-ports {}",
                        DNS_PORT,
                        HostPrefix(s),
                        DNS_LISTENER_PORT
                    ),
                );
            }
        }
    }
    // Istio spells it `--to-port` for UDP (iptables takes both).
    if all {
        b.append(
            Nat,
            IstioOutputDns,
            words!(
                "-p udp --dport {} -j REDIRECT --to-port {}",
                DNS_PORT,
                DNS_LISTENER_PORT
            ),
        );
    } else {
        for (family, list) in servers {
            for s in list {
                b.append_to(
                    family,
                    Nat,
                    IstioOutputDns,
                    words!(
                        "-p udp --dport {} -d {} -j REDIRECT --to-port {}",
                        DNS_PORT,
                        HostPrefix(s),
                        DNS_LISTENER_PORT
                    ),
                );
            }
        }
    }

    for &uid in &cfg.proxy_uids {
        b.append(
            Raw,
            IstioOutputDns,
            words!(
                "-p udp --dport {} -m owner --uid-owner {} -j CT --zone 1",
                DNS_PORT,
                uid
            ),
        );
        b.append(
            Raw,
            IstioOutputDns,
            words!(
                "-p udp --sport {} -m owner --uid-owner {} -j CT --zone 2",
                DNS_LISTENER_PORT,
                uid
            ),
        );
    }
    for &gid in &cfg.proxy_gids {
        b.append(
            Raw,
            IstioOutputDns,
            words!(
                "-p udp --dport {} -m owner --gid-owner {} -j CT --zone 1",
                DNS_PORT,
                gid
            ),
        );
        b.append(
            Raw,
            IstioOutputDns,
            words!(
                "-p udp --sport {} -m owner --gid-owner {} -j CT --zone 2",
                DNS_LISTENER_PORT,
                gid
            ),
        );
    }

    if all {
        b.append(Raw, Prerouting, words!("-j {}", IstioInbound));
        b.append(
            Raw,
            IstioOutputDns,
            words!("-p udp --dport {} -j CT --zone 2", DNS_PORT),
        );
        b.append(
            Raw,
            IstioInbound,
            words!("-p udp --sport {} -j CT --zone 1", DNS_PORT),
        );
    } else {
        for (family, list) in servers {
            if !list.is_empty() {
                b.append_to(family, Raw, Prerouting, words!("-j {}", IstioInbound));
            }
            for s in list {
                b.append_to(
                    family,
                    Raw,
                    IstioOutputDns,
                    words!(
                        "-p udp --dport {} -d {} -j CT --zone 2",
                        DNS_PORT,
                        HostPrefix(s)
                    ),
                );
                b.append_to(
                    family,
                    Raw,
                    IstioInbound,
                    words!(
                        "-p udp --sport {} -s {} -j CT --zone 1",
                        DNS_PORT,
                        HostPrefix(s)
                    ),
                );
            }
        }
    }
}

/// Outbound capture by destination for one family (Istio's `handleOutboundIncludeRules`); the virtual
/// interfaces' inbound traffic goes to the outbound listener too.
fn outbound_include(b: &mut Builder, cfg: &CaptureConfig, family: Family, include: &Ranges) {
    use Chain::*;
    use Table::*;

    if include.all {
        b.append_to(family, Nat, IstioOutput, words!("-j {}", IstioRedirect));
        for iface in &cfg.reroute_virtual_interfaces {
            b.insert_to(
                family,
                Nat,
                Prerouting,
                1,
                words!("-i {} -j {}", iface, IstioRedirect),
            );
        }
        return;
    }
    for &net in include.of_family(family) {
        for iface in &cfg.reroute_virtual_interfaces {
            b.insert_to(
                family,
                Nat,
                Prerouting,
                1,
                words!("-i {} -d {} -j {}", iface, net, IstioRedirect),
            );
        }
        b.append_to(
            family,
            Nat,
            IstioOutput,
            words!("-d {} -j {}", net, IstioRedirect),
        );
    }
}

/// TPROXY's marks, so that the proxy's replies and its connections to the app are routed right.
fn tproxy_marks(b: &mut Builder, cfg: &CaptureConfig) {
    use Chain::*;
    use Table::*;

    let mark = cfg.inbound_tproxy_mark;
    b.append(
        Mangle,
        Prerouting,
        words!("-p tcp -m mark --mark {} -j CONNMARK --save-mark", mark),
    );
    b.append(
        Mangle,
        Output,
        words!("-p tcp -o lo -m mark --mark {} -j RETURN", mark),
    );
    for &uid in &cfg.proxy_uids {
        b.append_versioned(Mangle, Output, |f| {
            words!(
                "! -d {} -p tcp -o lo -m owner --uid-owner {} -j MARK --set-mark {}",
                f.loopback(cfg),
                uid,
                OUTBOUND_MARK
            )
        });
    }
    for &gid in &cfg.proxy_gids {
        b.append_versioned(Mangle, Output, |f| {
            words!(
                "! -d {} -p tcp -o lo -m owner --gid-owner {} -j MARK --set-mark {}",
                f.loopback(cfg),
                gid,
                OUTBOUND_MARK
            )
        });
    }
    b.append(
        Mangle,
        Output,
        words!(
            "-p tcp -m connmark --mark {} -j CONNMARK --restore-mark",
            mark
        ),
    );
    b.insert(
        Mangle,
        IstioInbound,
        1,
        words!("-p tcp -m mark --mark {} -j RETURN", mark),
    );
    for family in [Family::V4, Family::V6] {
        b.insert_to(
            family,
            Mangle,
            IstioInbound,
            2,
            words!("-p tcp -s {} -i lo -j RETURN", family.passthrough()),
        );
    }
    b.insert(
        Mangle,
        IstioInbound,
        3,
        words!("-p tcp -i lo -m mark ! --mark {} -j RETURN", OUTBOUND_MARK),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_slots_in_order() {
        assert_eq!(slots("-p tcp --dport {} -j {}"), 2);
        assert_eq!(slots("{} -j RETURN {}"), 2);
        assert_eq!(slots("-j RETURN"), 0);
        assert_eq!(slots("a{} {}b"), 0);
        assert_eq!(
            words!("-p tcp --dport {} -j {}", 80u16, Chain::IstioRedirect),
            ["-p", "tcp", "--dport", "80", "-j", "ISTIO_REDIRECT"]
        );
        assert_eq!(words!("-j RETURN"), ["-j", "RETURN"]);
        assert_eq!(
            words!("--tproxy-mark {}", MarkMask(7)),
            ["--tproxy-mark", "7/0xffffffff"]
        );
        assert_eq!(
            words!("--dports {}", PortList(&[53, 15008])),
            ["--dports", "53,15008"]
        );
    }

    #[test]
    fn chains_are_created_before_rules_and_jump_targets_too() {
        let mut b = Builder::new(false);
        b.append(
            Table::Nat,
            Chain::Output,
            words!("-j {}", Chain::IstioOutput),
        );
        b.append(Table::Nat, Chain::IstioRedirect, words!("-j RETURN"));
        b.append(Table::Mangle, Chain::IstioDivert, words!("-j ACCEPT"));
        b.append_to(Family::V6, Table::Raw, Chain::Output, words!("-j DROP"));
        assert!(b.v6.is_empty());
        assert_eq!(
            restore(&b.v4),
            "* mangle\n-N ISTIO_DIVERT\n-A ISTIO_DIVERT -j ACCEPT\nCOMMIT\n\
             * nat\n-N ISTIO_REDIRECT\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_REDIRECT -j RETURN\nCOMMIT\n"
        );
        assert_eq!(restore(&[]), "");
    }

    /// Everything a pod can set ends up as words without whitespace: no value can add words or lines.
    #[test]
    fn every_word_is_a_single_token() {
        let mut pi = crate::pod::PodInfo::default();
        for (k, v) in [
            (crate::redirect::INTERCEPTION_MODE, "TPROXY"),
            (crate::redirect::INCLUDE_INBOUND_PORTS, " 80 , 81"),
            (
                crate::redirect::INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,2001:db8::/32,127.0.0.1/32",
            ),
            (
                crate::redirect::EXCLUDE_OUTBOUND_IP_RANGES,
                "10.1.0.0/16,2001:db8:1::/48",
            ),
            (crate::redirect::INCLUDE_OUTBOUND_PORTS, "443"),
            (crate::redirect::EXCLUDE_OUTBOUND_PORTS, "25"),
            (crate::redirect::EXCLUDE_INTERFACES, " eth9 "),
            (crate::redirect::REROUTE_VIRTUAL_INTERFACES, "k6t-eth0"),
        ] {
            pi.annotations.insert(k.to_string(), v.to_string());
        }
        pi.proxy_env
            .insert("ISTIO_META_DNS_CAPTURE".into(), "true".into());
        pi.proxy_env.insert("INVALID_DROP".into(), "1".into());
        let r = crate::redirect::Redirect::from_pod(&pi).unwrap();
        let cfg = CaptureConfig::from_redirect(&r, true);
        let b = build(&cfg);
        for rule in b.v4.iter().chain(&b.v6) {
            for w in &rule.params {
                assert!(
                    !w.is_empty() && !w.contains(char::is_whitespace),
                    "{:?}",
                    rule.params
                );
            }
        }
        let rs = render_iptables(&cfg);
        assert!(rs.v4.contains("-A PREROUTING -i eth9 -j RETURN\n"));
        assert!(rs
            .v4
            .contains("-A ISTIO_INBOUND -p tcp --dport 81 -j ISTIO_TPROXY\n"));
        let v6 = rs.v6.unwrap();
        assert!(v6.contains("-I PREROUTING 1 -i k6t-eth0 -d 2001:db8::/32 -j ISTIO_REDIRECT\n"));
        assert!(!v6.contains("10.0.0.0/8"));
        // 127.0.0.1/32 is included: the app's own loopback traffic is no longer returned early.
        assert!(!rs.v4.contains("-m owner ! --uid-owner"));
    }
}
