//! The native nftables renderer: Istio's `tools/istio-nftables` capture (`NftablesConfigurator.Run()`) and the
//! transaction it builds (`addIstioTableRules`), as a typed ruleset.
//!
//! A rule is a list of typed [`Expr`]s: every word of its text is either a `&'static str` written in this file or
//! the rendering of a typed, validated value (port, prefix, interface name, id, mark, chain). No runtime string
//! is pasted into a rule. The ruleset renders to Istio's nft script byte for byte ([`NftRuleset`]'s `Display`),
//! and the netlink applier (`apply::nftables`) encodes the same values into kernel expressions.
//!
//! Istio's transaction inserts some rules at an index; [`NftTableSpec::rules_in_final_order`] gives the order
//! `nft -f` of the script leaves in each chain, so an applier can simply append.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};

use super::{
    CaptureConfig, DnsServer, InterceptionMode, InterfaceName, OwnerGroup, OwnerGroups,
    PortSelector, Ranges,
};

/// Mark of packets from the outbound proxy to the app by pod IP, in TPROXY mode (Istio's `OutboundMark`).
const OUTBOUND_MARK: u32 = 1338;
/// The agent's DNS listener.
const DNS_LISTENER_PORT: u16 = 15053;
const DNS_PORT: u16 = 53;
/// Source of the proxy's inbound passthrough connections.
const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// Conntrack zones of DNS: the agent and the upstream resolvers; the apps and the agent.
const ZONE_UPSTREAM: u16 = 1;
const ZONE_APPS: u16 = 2;

/// Istio's three tables, all of family `inet`, in the order Istio's transaction writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NftTable {
    Nat,
    Mangle,
    Raw,
}

impl NftTable {
    pub const ALL: [NftTable; 3] = [NftTable::Nat, NftTable::Mangle, NftTable::Raw];

    pub fn name(self) -> &'static str {
        match self {
            NftTable::Nat => "istio-proxy-nat",
            NftTable::Mangle => "istio-proxy-mangle",
            NftTable::Raw => "istio-proxy-raw",
        }
    }

    fn index(self) -> usize {
        match self {
            NftTable::Nat => 0,
            NftTable::Mangle => 1,
            NftTable::Raw => 2,
        }
    }

    /// The chains Istio declares in this table, in its order; only those with rules are created.
    fn chains(self) -> &'static [NftChainDecl] {
        use NftChain::*;
        const fn base(chain: NftChain, kind: ChainType, hook: Hook, priority: i32) -> NftChainDecl {
            NftChainDecl {
                chain,
                base: Some(BaseChain {
                    kind,
                    hook,
                    priority,
                }),
            }
        }
        const fn regular(chain: NftChain) -> NftChainDecl {
            NftChainDecl { chain, base: None }
        }
        const NAT: &[NftChainDecl] = &[
            base(
                Prerouting,
                ChainType::Nat,
                Hook::Prerouting,
                PRIORITY_DSTNAT,
            ),
            base(Output, ChainType::Nat, Hook::Output, PRIORITY_DSTNAT),
            regular(IstioInbound),
            regular(IstioRedirect),
            regular(IstioInRedirect),
            regular(IstioOutput),
            regular(IstioOutputDns),
        ];
        const MANGLE: &[NftChainDecl] = &[
            base(
                Prerouting,
                ChainType::Filter,
                Hook::Prerouting,
                PRIORITY_MANGLE,
            ),
            base(Output, ChainType::Route, Hook::Output, PRIORITY_MANGLE),
            regular(IstioDivert),
            regular(IstioTproxy),
            regular(IstioInbound),
            regular(IstioDrop),
        ];
        const RAW: &[NftChainDecl] = &[
            base(
                Prerouting,
                ChainType::Filter,
                Hook::Prerouting,
                PRIORITY_RAW,
            ),
            base(Output, ChainType::Filter, Hook::Output, PRIORITY_RAW),
            regular(IstioInbound),
            regular(IstioOutputDns),
        ];
        match self {
            NftTable::Nat => NAT,
            NftTable::Mangle => MANGLE,
            NftTable::Raw => RAW,
        }
    }
}

/// knftables' `DNATPriority`, `ManglePriority`, `RawPriority`.
const PRIORITY_DSTNAT: i32 = -100;
const PRIORITY_MANGLE: i32 = -150;
const PRIORITY_RAW: i32 = -300;

impl fmt::Display for NftTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The chains the rules live in or jump to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NftChain {
    Prerouting,
    Output,
    IstioInbound,
    IstioOutput,
    IstioOutputDns,
    IstioRedirect,
    IstioInRedirect,
    IstioDivert,
    IstioTproxy,
    IstioDrop,
}

impl NftChain {
    pub fn name(self) -> &'static str {
        match self {
            NftChain::Prerouting => "prerouting",
            NftChain::Output => "output",
            NftChain::IstioInbound => "istio-inbound",
            NftChain::IstioOutput => "istio-output",
            NftChain::IstioOutputDns => "istio-output-dns",
            NftChain::IstioRedirect => "istio-redirect",
            NftChain::IstioInRedirect => "istio-in-redirect",
            NftChain::IstioDivert => "istio-divert",
            NftChain::IstioTproxy => "istio-tproxy",
            NftChain::IstioDrop => "istio-drop",
        }
    }
}

impl fmt::Display for NftChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

impl ChainType {
    pub fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        }
    }
}

/// The netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }
}

/// What makes a chain a base chain: its type, hook and priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// A chain as the transaction adds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftChainDecl {
    pub chain: NftChain,
    /// `None` for a regular chain (reached only by jumps).
    pub base: Option<BaseChain>,
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Proto {
    Tcp,
    Udp,
}

impl L4Proto {
    pub fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

/// A network protocol (`ip` or `ip6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFamily {
    V4,
    V6,
}

impl NetFamily {
    pub fn name(self) -> &'static str {
        match self {
            NetFamily::V4 => "ip",
            NetFamily::V6 => "ip6",
        }
    }
}

/// Equal or not equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
}

impl fmt::Display for CmpOp {
    /// The operator word and its space (`==` is implicit in nft).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmpOp::Eq => Ok(()),
            CmpOp::Ne => f.write_str("!= "),
        }
    }
}

/// Source or destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortField {
    Sport,
    Dport,
}

impl PortField {
    pub fn name(self) -> &'static str {
        match self {
            PortField::Sport => "sport",
            PortField::Dport => "dport",
        }
    }
}

/// One port, or an anonymous set of ports (`{ 53, 15008 }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    One(u16),
    Set(Vec<u16>),
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::One(p) => write!(f, "{p}"),
            Ports::Set(ports) => {
                f.write_str("{ ")?;
                for (i, p) in ports.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                f.write_str(" }")
            }
        }
    }
}

/// Source or destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrField {
    Saddr,
    Daddr,
}

impl AddrField {
    pub fn name(self) -> &'static str {
        match self {
            AddrField::Saddr => "saddr",
            AddrField::Daddr => "daddr",
        }
    }
}

/// An address prefix: a CIDR as configured (address kept as written, host bits and all), or a DNS server as a
/// host prefix in the server's own spelling (`::127.0.0.53/128`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefix {
    Net(IpNet),
    Host(DnsServer),
}

impl Prefix {
    pub fn family(&self) -> NetFamily {
        match self.addr() {
            IpAddr::V4(_) => NetFamily::V4,
            IpAddr::V6(_) => NetFamily::V6,
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Prefix::Net(net) => net.addr(),
            Prefix::Host(server) => server.addr(),
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match self {
            Prefix::Net(net) => net.prefix_len(),
            Prefix::Host(server) => match server.addr() {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::Net(net) => write!(f, "{net}"),
            Prefix::Host(server) => write!(f, "{server}/{}", self.prefix_len()),
        }
    }
}

/// An interface of an `iifname`/`oifname` match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Iface {
    Loopback,
    Named(InterfaceName),
}

impl Iface {
    pub fn name(&self) -> &str {
        match self {
            Iface::Loopback => "lo",
            Iface::Named(name) => name.as_str(),
        }
    }
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a socket owner match is written: `skuid 1337` or `meta skuid 1337` (the same match; Istio writes both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaSpelling {
    Bare,
    Meta,
}

impl fmt::Display for MetaSpelling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaSpelling::Bare => Ok(()),
            MetaSpelling::Meta => f.write_str("meta "),
        }
    }
}

/// The conntrack states Istio matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtStates {
    Invalid,
    RelatedEstablished,
}

impl CtStates {
    pub fn name(self) -> &'static str {
        match self {
            CtStates::Invalid => "invalid",
            CtStates::RelatedEstablished => "related,established",
        }
    }
}

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Return,
    Accept,
    Drop,
    Jump(NftChain),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Return => f.write_str("return"),
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Jump(chain) => write!(f, "jump {chain}"),
        }
    }
}

/// One expression or statement of a rule, in nft's language. Matches need their protocol dependencies
/// (`meta nfproto`, `meta l4proto`) only implicitly, as in nft: the applier adds them as `nft` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `iifname X`
    Iifname(Iface),
    /// `oifname X`
    Oifname(Iface),
    /// `meta l4proto tcp`
    L4Proto(L4Proto),
    /// `tcp dport != 15008`, `udp sport 53`, `tcp dport != { 53, 15008 }`
    Port {
        proto: L4Proto,
        field: PortField,
        op: CmpOp,
        ports: Ports,
    },
    /// `ip daddr != 127.0.0.1/32`, `ip6 saddr ::6/128`
    Addr {
        field: AddrField,
        op: CmpOp,
        prefix: Prefix,
    },
    /// `skuid 1337`, `meta skuid != 1337`
    SkUid {
        spelling: MetaSpelling,
        op: CmpOp,
        uid: u32,
    },
    /// `skgid 1337`, `skgid != java` (a group name is resolved when applied, as `nft` does)
    SkGid {
        spelling: MetaSpelling,
        op: CmpOp,
        group: OwnerGroup,
    },
    /// `mark 1337`, `mark != 1338`
    Mark { op: CmpOp, mark: u32 },
    /// `ct mark 1337`
    CtMark(u32),
    /// `ct state related,established`
    CtState(CtStates),
    /// `counter`
    Counter,
    /// `meta mark set 1337`
    SetMark(u32),
    /// `meta mark set ct mark`
    SetMarkFromCtMark,
    /// `ct mark set mark`
    SetCtMarkFromMark,
    /// `ct zone set 1`
    SetCtZone(u16),
    /// `redirect to :15001`
    Redirect(u16),
    /// `tproxy ip to :15006`
    Tproxy { family: NetFamily, port: u16 },
    /// `return`, `accept`, `drop`, `jump istio-output`
    Verdict(Verdict),
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Iifname(i) => write!(f, "iifname {i}"),
            Expr::Oifname(i) => write!(f, "oifname {i}"),
            Expr::L4Proto(p) => write!(f, "meta l4proto {}", p.name()),
            Expr::Port {
                proto,
                field,
                op,
                ports,
            } => write!(f, "{} {} {op}{ports}", proto.name(), field.name()),
            Expr::Addr { field, op, prefix } => {
                write!(
                    f,
                    "{} {} {op}{prefix}",
                    prefix.family().name(),
                    field.name()
                )
            }
            Expr::SkUid { spelling, op, uid } => write!(f, "{spelling}skuid {op}{uid}"),
            Expr::SkGid {
                spelling,
                op,
                group,
            } => write!(f, "{spelling}skgid {op}{group}"),
            Expr::Mark { op, mark } => write!(f, "mark {op}{mark}"),
            Expr::CtMark(mark) => write!(f, "ct mark {mark}"),
            Expr::CtState(states) => write!(f, "ct state {}", states.name()),
            Expr::Counter => f.write_str("counter"),
            Expr::SetMark(mark) => write!(f, "meta mark set {mark}"),
            Expr::SetMarkFromCtMark => f.write_str("meta mark set ct mark"),
            Expr::SetCtMarkFromMark => f.write_str("ct mark set mark"),
            Expr::SetCtZone(zone) => write!(f, "ct zone set {zone}"),
            Expr::Redirect(port) => write!(f, "redirect to :{port}"),
            Expr::Tproxy { family, port } => write!(f, "tproxy {} to :{port}", family.name()),
            Expr::Verdict(v) => write!(f, "{v}"),
        }
    }
}

/// Where the transaction puts a rule: at the end of its chain, or before the rule at an index (nft's
/// `insert rule ... index N`, as the chain is at that point of the transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Append,
    Insert(usize),
}

/// A rule of the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub chain: NftChain,
    pub position: Position,
    pub exprs: Vec<Expr>,
}

/// One table of the transaction: added, flushed, its chains added, then its rules in command order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTableSpec {
    pub table: NftTable,
    /// Only chains that have rules, in Istio's declaration order.
    pub chains: Vec<NftChainDecl>,
    /// In the order of the transaction's commands (see [`Self::rules_in_final_order`]).
    pub rules: Vec<NftRule>,
}

impl NftTableSpec {
    /// The rules chain by chain (chains in [`Self::chains`] order), each chain's rules in the order that running
    /// the transaction leaves them in: appending them in this order gives the same ruleset.
    pub fn rules_in_final_order(&self) -> Vec<&NftRule> {
        let mut out = Vec::with_capacity(self.rules.len());
        let mut chain_rules: Vec<&NftRule> = Vec::new();
        for decl in &self.chains {
            chain_rules.clear();
            for rule in self.rules.iter().filter(|r| r.chain == decl.chain) {
                match rule.position {
                    Position::Insert(i) if i < chain_rules.len() => chain_rules.insert(i, rule),
                    _ => chain_rules.push(rule),
                }
            }
            out.extend_from_slice(&chain_rules);
        }
        out
    }

    /// The nft command of one rule (`add rule inet T C ...` or `insert rule inet T C index N ...`).
    pub fn rule_command<'a>(&'a self, rule: &'a NftRule) -> impl fmt::Display + 'a {
        RuleCommand { table: self, rule }
    }
}

struct RuleCommand<'a> {
    table: &'a NftTableSpec,
    rule: &'a NftRule,
}

impl fmt::Display for RuleCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, r) = (self.table.table, self.rule);
        match r.position {
            Position::Append => write!(f, "add rule inet {t} {}", r.chain)?,
            Position::Insert(i) => write!(f, "insert rule inet {t} {} index {i}", r.chain)?,
        }
        for e in &r.exprs {
            write!(f, " {e}")?;
        }
        Ok(())
    }
}

/// Istio's nftables ruleset for a capture configuration: the tables that have rules, in Istio's order.
/// `Display` renders the nft script Istio runs (`nft -f`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftRuleset {
    pub tables: Vec<NftTableSpec>,
}

impl fmt::Display for NftRuleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for spec in &self.tables {
            let t = spec.table;
            writeln!(f, "add table inet {t}")?;
            writeln!(f, "flush table inet {t}")?;
            for decl in &spec.chains {
                write!(f, "add chain inet {t} {}", decl.chain)?;
                if let Some(b) = decl.base {
                    write!(
                        f,
                        " {{ type {} hook {} priority {} ; }}",
                        b.kind.name(),
                        b.hook.name(),
                        b.priority
                    )?;
                }
                writeln!(f)?;
            }
            for rule in &spec.rules {
                writeln!(f, "{}", spec.rule_command(rule))?;
            }
        }
        Ok(())
    }
}

/// A rule as the generator adds it, before the transaction decides between insert and append.
struct Pending {
    chain: NftChain,
    index: Option<usize>,
    exprs: Vec<Expr>,
}

/// Collects rules per table in the order they are added (Istio's `NftablesRuleBuilder`).
struct Builder {
    ipv6: bool,
    tables: [Vec<Pending>; 3],
}

impl Builder {
    fn push(&mut self, table: NftTable, chain: NftChain, index: Option<usize>, exprs: Vec<Expr>) {
        self.tables[table.index()].push(Pending {
            chain,
            index,
            exprs,
        });
    }

    /// `AppendRule`
    fn append(&mut self, table: NftTable, chain: NftChain, exprs: Vec<Expr>) {
        self.push(table, chain, None, exprs);
    }

    /// `AppendV6RuleIfSupported`
    fn append_v6(&mut self, table: NftTable, chain: NftChain, exprs: Vec<Expr>) {
        if self.ipv6 {
            self.append(table, chain, exprs);
        }
    }

    /// `InsertRule`
    fn insert(&mut self, table: NftTable, chain: NftChain, index: usize, exprs: Vec<Expr>) {
        self.push(table, chain, Some(index), exprs);
    }

    /// `InsertV6RuleIfSupported`
    fn insert_v6(&mut self, table: NftTable, chain: NftChain, index: usize, exprs: Vec<Expr>) {
        if self.ipv6 {
            self.insert(table, chain, index, exprs);
        }
    }

    /// The transaction (Istio's `addIstioTableRules` per table): tables without rules are left out, chains
    /// without rules are not created unless a rule jumps to them, and an insert into a chain with no more than
    /// `index` rules becomes an append.
    ///
    /// A jumped-to chain can be left without rules (DNS servers of a family that is not rendered); it is still
    /// created, empty, as the iptables renderer creates every jumped-to chain: a jump to a missing chain would make
    /// the kernel refuse the whole transaction.
    fn finish(self) -> NftRuleset {
        let mut tables = Vec::new();
        for (table, pending) in NftTable::ALL.into_iter().zip(self.tables) {
            if pending.is_empty() {
                continue;
            }
            let used = |chain: NftChain| {
                let jump = Expr::Verdict(Verdict::Jump(chain));
                pending
                    .iter()
                    .any(|p| p.chain == chain || p.exprs.contains(&jump))
            };
            let chains: Vec<NftChainDecl> = table
                .chains()
                .iter()
                .filter(|d| used(d.chain))
                .copied()
                .collect();
            let mut counts: Vec<(NftChain, usize)> = Vec::new();
            let rules = pending
                .into_iter()
                .map(|p| {
                    let slot = counts
                        .iter()
                        .position(|(c, _)| *c == p.chain)
                        .unwrap_or_else(|| {
                            counts.push((p.chain, 0));
                            counts.len() - 1
                        });
                    let count = &mut counts[slot].1;
                    let position = match p.index {
                        Some(i) if *count > 0 && i < *count => Position::Insert(i),
                        _ => Position::Append,
                    };
                    *count += 1;
                    NftRule {
                        chain: p.chain,
                        position,
                        exprs: p.exprs,
                    }
                })
                .collect();
            tables.push(NftTableSpec {
                table,
                chains,
                rules,
            });
        }
        NftRuleset { tables }
    }
}

// Small constructors, so that the generator below reads like Istio's.

fn tcp() -> Expr {
    Expr::L4Proto(L4Proto::Tcp)
}

fn port(proto: L4Proto, field: PortField, op: CmpOp, port: u16) -> Expr {
    Expr::Port {
        proto,
        field,
        op,
        ports: Ports::One(port),
    }
}

fn tcp_dport(port_: u16) -> Expr {
    port(L4Proto::Tcp, PortField::Dport, CmpOp::Eq, port_)
}

fn udp_dport(port_: u16) -> Expr {
    port(L4Proto::Udp, PortField::Dport, CmpOp::Eq, port_)
}

fn udp_sport(port_: u16) -> Expr {
    port(L4Proto::Udp, PortField::Sport, CmpOp::Eq, port_)
}

fn daddr(op: CmpOp, prefix: Prefix) -> Expr {
    Expr::Addr {
        field: AddrField::Daddr,
        op,
        prefix,
    }
}

fn saddr(prefix: Prefix) -> Expr {
    Expr::Addr {
        field: AddrField::Saddr,
        op: CmpOp::Eq,
        prefix,
    }
}

fn oif_lo() -> Expr {
    Expr::Oifname(Iface::Loopback)
}

fn iif_lo() -> Expr {
    Expr::Iifname(Iface::Loopback)
}

fn skuid(op: CmpOp, uid: u32) -> Expr {
    Expr::SkUid {
        spelling: MetaSpelling::Bare,
        op,
        uid,
    }
}

fn skgid(op: CmpOp, gid: u32) -> Expr {
    Expr::SkGid {
        spelling: MetaSpelling::Bare,
        op,
        group: OwnerGroup::Id(gid),
    }
}

fn ret() -> Expr {
    Expr::Verdict(Verdict::Return)
}

fn jump(chain: NftChain) -> Expr {
    Expr::Verdict(Verdict::Jump(chain))
}

fn host(addr: IpAddr) -> Prefix {
    Prefix::Net(IpNet::from(addr))
}

/// The loopback ranges that are never captured: the configured IPv4 one, and `::1/128`.
fn loopback_v4(cfg: &CaptureConfig) -> Prefix {
    Prefix::Net(IpNet::V4(cfg.host_ipv4_loopback_cidr))
}

fn loopback_v6() -> Prefix {
    Prefix::Net(IpNet::V6(Ipv6Net::from(Ipv6Addr::LOCALHOST)))
}

/// Renders Istio's nftables ruleset for a capture configuration (`NftablesConfigurator.Run`).
pub fn render(cfg: &CaptureConfig) -> NftRuleset {
    use NftChain::*;
    use NftTable::*;

    let mut b = Builder {
        ipv6: cfg.enable_ipv6,
        tables: Default::default(),
    };
    let tproxy = cfg.interception_mode == InterceptionMode::Tproxy;
    let exclude = Ranges::split(&cfg.outbound_ip_ranges_exclude);
    let include = Ranges::of(&cfg.outbound_ip_ranges_include);
    let tunnel = cfg.inbound_tunnel_port;
    let lo4 = || loopback_v4(cfg);

    // "Redirect DNS" without "capture all" and without any server captures nothing.
    let redirect_dns = cfg.redirect_dns
        && (cfg.capture_all_dns
            || !cfg.dns_servers_v4.is_empty()
            || !cfg.dns_servers_v6.is_empty());

    // Excluded interfaces are never captured.
    for iface in &cfg.exclude_interfaces {
        let iface = || Iface::Named(iface.clone());
        b.append(
            Nat,
            Prerouting,
            vec![Expr::Iifname(iface()), Expr::Counter, ret()],
        );
        b.append(
            Nat,
            Output,
            vec![Expr::Oifname(iface()), Expr::Counter, ret()],
        );
    }
    if tproxy {
        for iface in &cfg.exclude_interfaces {
            let iface = || Iface::Named(iface.clone());
            b.append(
                Mangle,
                Prerouting,
                vec![Expr::Iifname(iface()), Expr::Counter, ret()],
            );
            b.append(
                Mangle,
                Output,
                vec![Expr::Oifname(iface()), Expr::Counter, ret()],
            );
        }
    }
    // Inbound traffic of virtual interfaces is not captured as inbound.
    for iface in &cfg.reroute_virtual_interfaces {
        b.insert(
            Nat,
            Prerouting,
            0,
            vec![
                Expr::Iifname(Iface::Named(iface.clone())),
                Expr::Counter,
                ret(),
            ],
        );
    }

    if cfg.drop_invalid {
        b.append(
            Mangle,
            Prerouting,
            vec![
                tcp(),
                Expr::CtState(CtStates::Invalid),
                Expr::Counter,
                jump(IstioDrop),
            ],
        );
        b.append(
            Mangle,
            IstioDrop,
            vec![Expr::Counter, Expr::Verdict(Verdict::Drop)],
        );
    }

    b.append(
        Nat,
        IstioInbound,
        vec![tcp(), tcp_dport(tunnel), Expr::Counter, ret()],
    );
    b.append(
        Nat,
        IstioRedirect,
        vec![tcp(), Expr::Counter, Expr::Redirect(cfg.proxy_port)],
    );
    b.append(
        Nat,
        IstioInRedirect,
        vec![
            tcp(),
            Expr::Counter,
            Expr::Redirect(cfg.inbound_capture_port),
        ],
    );

    inbound(&mut b, cfg, tproxy);

    b.append(Nat, Output, vec![Expr::Counter, jump(IstioOutput)]);

    for &p in &cfg.outbound_ports_exclude {
        b.append(Nat, IstioOutput, vec![tcp_dport(p), Expr::Counter, ret()]);
        b.append(Nat, IstioOutput, vec![udp_dport(p), Expr::Counter, ret()]);
    }

    b.append(
        Nat,
        IstioOutput,
        vec![
            oif_lo(),
            saddr(host(PASSTHROUGH_V4.into())),
            Expr::Counter,
            ret(),
        ],
    );
    b.append_v6(
        Nat,
        IstioOutput,
        vec![
            oif_lo(),
            saddr(host(PASSTHROUGH_V6.into())),
            Expr::Counter,
            ret(),
        ],
    );

    let loopback_included = include.has_loopback();
    // Per proxy owner, uids first: the proxy calling its own pod through a service address goes back through the
    // inbound listener (with DNS capture, not DNS for uids: the agent talks to the DNS server directly); the app
    // calling itself over lo is left alone unless loopback is explicitly captured (with DNS capture, TCP DNS to
    // a local server is still captured); the proxy's own traffic is never captured.
    let owners = (cfg.proxy_uids.iter().map(|&uid| (uid, true)))
        .chain(cfg.proxy_gids.iter().map(|&gid| (gid, false)));
    for (id, is_uid) in owners {
        let owner = |op| if is_uid { skuid(op, id) } else { skgid(op, id) };
        let skip_dns = is_uid && redirect_dns;
        for (family_addr, v6) in [(lo4(), false), (loopback_v6(), true)] {
            let rule = vec![
                oif_lo(),
                tcp(),
                daddr(CmpOp::Ne, family_addr),
                Expr::Port {
                    proto: L4Proto::Tcp,
                    field: PortField::Dport,
                    op: CmpOp::Ne,
                    ports: if skip_dns {
                        Ports::Set(vec![DNS_PORT, tunnel])
                    } else {
                        Ports::One(tunnel)
                    },
                },
                owner(CmpOp::Eq),
                Expr::Counter,
                jump(IstioInRedirect),
            ];
            if v6 {
                b.append_v6(Nat, IstioOutput, rule);
            } else {
                b.append(Nat, IstioOutput, rule);
            }
        }
        if !loopback_included {
            let rule = if redirect_dns {
                vec![
                    oif_lo(),
                    tcp(),
                    port(L4Proto::Tcp, PortField::Dport, CmpOp::Ne, DNS_PORT),
                    owner(CmpOp::Ne),
                    Expr::Counter,
                    ret(),
                ]
            } else {
                vec![oif_lo(), owner(CmpOp::Ne), Expr::Counter, ret()]
            };
            b.append(Nat, IstioOutput, rule);
        }
        b.append(
            Nat,
            IstioOutput,
            vec![owner(CmpOp::Eq), Expr::Counter, ret()],
        );
    }

    owner_groups(&mut b, cfg);

    if redirect_dns {
        dns(&mut b, cfg);
    }

    // Traffic to loopback (Envoy-aware apps, container to container) is not captured.
    b.append(
        Nat,
        IstioOutput,
        vec![daddr(CmpOp::Eq, lo4()), Expr::Counter, ret()],
    );
    b.append_v6(
        Nat,
        IstioOutput,
        vec![daddr(CmpOp::Eq, loopback_v6()), Expr::Counter, ret()],
    );

    for &net in &exclude.v4 {
        b.append(
            Nat,
            IstioOutput,
            vec![daddr(CmpOp::Eq, Prefix::Net(net)), Expr::Counter, ret()],
        );
    }
    for &net in &exclude.v6 {
        b.append_v6(
            Nat,
            IstioOutput,
            vec![daddr(CmpOp::Eq, Prefix::Net(net)), Expr::Counter, ret()],
        );
    }

    for &p in &cfg.outbound_ports_include {
        b.append(
            Nat,
            IstioOutput,
            vec![tcp_dport(p), Expr::Counter, jump(IstioRedirect)],
        );
    }

    outbound_include(&mut b, cfg, &include);

    if tproxy {
        tproxy_marks(&mut b, cfg);
    }
    b.finish()
}

/// Inbound capture (Istio's `handleInboundPortsInclude` and `handleInboundTProxyMode`).
fn inbound(b: &mut Builder, cfg: &CaptureConfig, tproxy: bool) {
    use NftChain::*;
    use NftTable::*;

    if cfg.inbound_ports_include.is_empty() {
        return;
    }
    let (table, capture) = if tproxy {
        // Inbound packets are marked and diverted to the loopback interface, where TPROXY hands them to Envoy.
        b.append(
            Mangle,
            IstioDivert,
            vec![Expr::Counter, Expr::SetMark(cfg.inbound_tproxy_mark)],
        );
        b.append(
            Mangle,
            IstioDivert,
            vec![Expr::Counter, Expr::Verdict(Verdict::Accept)],
        );
        for (lo, family) in [
            (loopback_v4(cfg), NetFamily::V4),
            (loopback_v6(), NetFamily::V6),
        ] {
            let rule = vec![
                tcp(),
                daddr(CmpOp::Ne, lo),
                Expr::Tproxy {
                    family,
                    port: cfg.inbound_capture_port,
                },
                Expr::SetMark(cfg.inbound_tproxy_mark),
                Expr::Counter,
                Expr::Verdict(Verdict::Accept),
            ];
            match family {
                NetFamily::V4 => b.append(Mangle, IstioTproxy, rule),
                NetFamily::V6 => b.append_v6(Mangle, IstioTproxy, rule),
            }
        }
        (Mangle, IstioTproxy)
    } else {
        (Nat, IstioInRedirect)
    };
    b.append(
        table,
        Prerouting,
        vec![tcp(), Expr::Counter, jump(IstioInbound)],
    );

    let established = || Expr::CtState(CtStates::RelatedEstablished);
    match &cfg.inbound_ports_include {
        PortSelector::All => {
            for &p in &cfg.inbound_ports_exclude {
                b.append(
                    table,
                    IstioInbound,
                    vec![tcp(), tcp_dport(p), Expr::Counter, ret()],
                );
            }
            if tproxy {
                // Established connections go straight to the proxy's socket; new ones through TPROXY.
                b.append(
                    Mangle,
                    IstioInbound,
                    vec![tcp(), established(), Expr::Counter, jump(IstioDivert)],
                );
            }
            b.append(
                table,
                IstioInbound,
                vec![tcp(), Expr::Counter, jump(capture)],
            );
        }
        PortSelector::Only(ports) => {
            for &p in ports {
                if tproxy {
                    b.append(
                        Mangle,
                        IstioInbound,
                        vec![
                            tcp(),
                            established(),
                            tcp_dport(p),
                            Expr::Counter,
                            jump(IstioDivert),
                        ],
                    );
                }
                b.append(
                    table,
                    IstioInbound,
                    vec![tcp(), tcp_dport(p), Expr::Counter, jump(capture)],
                );
            }
        }
    }
}

/// Capture by owner group (Istio's `handleCaptureByOwnerGroup`): with `*`, the excluded groups return; with a
/// list, every packet whose group is none of them returns, in one rule.
fn owner_groups(b: &mut Builder, cfg: &CaptureConfig) {
    let group_match = |op, group: &OwnerGroup| Expr::SkGid {
        spelling: MetaSpelling::Bare,
        op,
        group: group.clone(),
    };
    match &cfg.owner_groups_include {
        OwnerGroups::All => {
            for group in &cfg.owner_groups_exclude {
                b.append(
                    NftTable::Nat,
                    NftChain::IstioOutput,
                    vec![group_match(CmpOp::Eq, group), Expr::Counter, ret()],
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut rule: Vec<Expr> = groups.iter().map(|g| group_match(CmpOp::Ne, g)).collect();
            rule.extend([Expr::Counter, ret()]);
            b.append(NftTable::Nat, NftChain::IstioOutput, rule);
        }
    }
}

/// DNS capture to the agent and the conntrack zones that keep its two legs apart (Istio's `SetupDNSRedir` and
/// `addDNSConntrackZones`).
fn dns(b: &mut Builder, cfg: &CaptureConfig) {
    use NftChain::*;
    use NftTable::*;

    let all = cfg.capture_all_dns;
    let servers_v4 = &cfg.dns_servers_v4;
    let servers_v6 = &cfg.dns_servers_v6;
    let server = |s: &DnsServer| Prefix::Host(s.clone());
    let to_agent = || Expr::Redirect(DNS_LISTENER_PORT);

    b.append(Raw, Output, vec![Expr::Counter, jump(IstioOutputDns)]);
    if all || !servers_v4.is_empty() || !servers_v6.is_empty() {
        b.append(Nat, IstioOutput, vec![Expr::Counter, jump(IstioOutputDns)]);
    }

    for proto in [L4Proto::Tcp, L4Proto::Udp] {
        let dport53 = || port(proto, PortField::Dport, CmpOp::Eq, DNS_PORT);
        if all {
            let mut rule = Vec::with_capacity(4);
            // Istio spells the TCP rule with an explicit protocol, the UDP one without.
            if proto == L4Proto::Tcp {
                rule.push(tcp());
            }
            rule.extend([dport53(), Expr::Counter, to_agent()]);
            b.append(Nat, IstioOutputDns, rule);
        } else {
            for s in servers_v4 {
                b.append(
                    Nat,
                    IstioOutputDns,
                    vec![
                        daddr(CmpOp::Eq, server(s)),
                        dport53(),
                        Expr::Counter,
                        to_agent(),
                    ],
                );
            }
            for s in servers_v6 {
                b.append_v6(
                    Nat,
                    IstioOutputDns,
                    vec![
                        daddr(CmpOp::Eq, server(s)),
                        dport53(),
                        Expr::Counter,
                        to_agent(),
                    ],
                );
            }
        }
    }

    // Zone 1: the agent and the upstream resolvers; zone 2: the apps and the agent.
    let owner_zones = |b: &mut Builder, owner: &dyn Fn() -> Expr| {
        b.append(
            Raw,
            IstioOutputDns,
            vec![
                udp_dport(DNS_PORT),
                owner(),
                Expr::Counter,
                Expr::SetCtZone(ZONE_UPSTREAM),
            ],
        );
        b.append(
            Raw,
            IstioOutputDns,
            vec![
                udp_sport(DNS_LISTENER_PORT),
                owner(),
                Expr::Counter,
                Expr::SetCtZone(ZONE_APPS),
            ],
        );
    };
    for &uid in &cfg.proxy_uids {
        owner_zones(b, &|| Expr::SkUid {
            spelling: MetaSpelling::Meta,
            op: CmpOp::Eq,
            uid,
        });
    }
    for &gid in &cfg.proxy_gids {
        owner_zones(b, &|| Expr::SkGid {
            spelling: MetaSpelling::Meta,
            op: CmpOp::Eq,
            group: OwnerGroup::Id(gid),
        });
    }

    if all {
        b.append(Raw, Prerouting, vec![Expr::Counter, jump(IstioInbound)]);
        b.append(
            Raw,
            IstioOutputDns,
            vec![
                udp_dport(DNS_PORT),
                Expr::Counter,
                Expr::SetCtZone(ZONE_APPS),
            ],
        );
        b.append(
            Raw,
            IstioInbound,
            vec![
                udp_sport(DNS_PORT),
                Expr::Counter,
                Expr::SetCtZone(ZONE_UPSTREAM),
            ],
        );
        return;
    }
    if !servers_v4.is_empty() || !servers_v6.is_empty() {
        b.append(Raw, Prerouting, vec![Expr::Counter, jump(IstioInbound)]);
    }
    for (list, v6) in [(servers_v4, false), (servers_v6, true)] {
        for s in list {
            let out = vec![
                udp_dport(DNS_PORT),
                daddr(CmpOp::Eq, server(s)),
                Expr::Counter,
                Expr::SetCtZone(ZONE_APPS),
            ];
            let back = vec![
                udp_sport(DNS_PORT),
                saddr(server(s)),
                Expr::Counter,
                Expr::SetCtZone(ZONE_UPSTREAM),
            ];
            if v6 {
                b.append_v6(Raw, IstioOutputDns, out);
                b.append_v6(Raw, IstioInbound, back);
            } else {
                b.append(Raw, IstioOutputDns, out);
                b.append(Raw, IstioInbound, back);
            }
        }
    }
}

/// Outbound capture by destination (Istio's `handleOutboundIncludeRules`); the virtual interfaces' inbound
/// traffic goes to the outbound listener too.
fn outbound_include(b: &mut Builder, cfg: &CaptureConfig, include: &Ranges) {
    use NftChain::*;
    use NftTable::*;

    let virt = || cfg.reroute_virtual_interfaces.iter();
    if include.all {
        b.append(Nat, IstioOutput, vec![Expr::Counter, jump(IstioRedirect)]);
        for iface in virt() {
            b.insert(
                Nat,
                Prerouting,
                0,
                vec![
                    Expr::Iifname(Iface::Named(iface.clone())),
                    Expr::Counter,
                    jump(IstioRedirect),
                ],
            );
        }
        return;
    }
    for (list, v6) in [(&include.v4, false), (&include.v6, true)] {
        for &net in list {
            for iface in virt() {
                let rule = vec![
                    Expr::Iifname(Iface::Named(iface.clone())),
                    daddr(CmpOp::Eq, Prefix::Net(net)),
                    Expr::Counter,
                    jump(IstioRedirect),
                ];
                if v6 {
                    b.insert_v6(Nat, Prerouting, 0, rule);
                } else {
                    b.insert(Nat, Prerouting, 0, rule);
                }
            }
            let rule = vec![
                daddr(CmpOp::Eq, Prefix::Net(net)),
                Expr::Counter,
                jump(IstioRedirect),
            ];
            if v6 {
                b.append_v6(Nat, IstioOutput, rule);
            } else {
                b.append(Nat, IstioOutput, rule);
            }
        }
    }
}

/// TPROXY's marks, so that the proxy's replies and its connections to the app are routed right.
fn tproxy_marks(b: &mut Builder, cfg: &CaptureConfig) {
    use NftChain::*;
    use NftTable::*;

    let mark = cfg.inbound_tproxy_mark;
    b.append(
        Mangle,
        Prerouting,
        vec![
            tcp(),
            Expr::Mark {
                op: CmpOp::Eq,
                mark,
            },
            Expr::Counter,
            Expr::SetCtMarkFromMark,
        ],
    );
    b.append(
        Mangle,
        Output,
        vec![
            oif_lo(),
            tcp(),
            Expr::Mark {
                op: CmpOp::Eq,
                mark,
            },
            Expr::Counter,
            ret(),
        ],
    );
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|&uid| skuid(CmpOp::Eq, uid))
        .chain(cfg.proxy_gids.iter().map(|&gid| skgid(CmpOp::Eq, gid)));
    for owner in owners {
        b.append(
            Mangle,
            Output,
            vec![
                oif_lo(),
                tcp(),
                daddr(CmpOp::Ne, loopback_v4(cfg)),
                owner.clone(),
                Expr::Counter,
                Expr::SetMark(OUTBOUND_MARK),
            ],
        );
        b.append_v6(
            Mangle,
            Output,
            vec![
                oif_lo(),
                tcp(),
                daddr(CmpOp::Ne, loopback_v6()),
                owner,
                Expr::Counter,
                Expr::SetMark(OUTBOUND_MARK),
            ],
        );
    }
    b.append(
        Mangle,
        Output,
        vec![
            tcp(),
            Expr::CtMark(mark),
            Expr::Counter,
            Expr::SetMarkFromCtMark,
        ],
    );
    b.insert(
        Mangle,
        IstioInbound,
        0,
        vec![
            tcp(),
            Expr::Mark {
                op: CmpOp::Eq,
                mark,
            },
            Expr::Counter,
            ret(),
        ],
    );
    b.insert(
        Mangle,
        IstioInbound,
        1,
        vec![
            iif_lo(),
            tcp(),
            saddr(host(PASSTHROUGH_V4.into())),
            Expr::Counter,
            ret(),
        ],
    );
    b.insert_v6(
        Mangle,
        IstioInbound,
        1,
        vec![
            iif_lo(),
            tcp(),
            saddr(host(PASSTHROUGH_V6.into())),
            Expr::Counter,
            ret(),
        ],
    );
    b.insert(
        Mangle,
        IstioInbound,
        2,
        vec![
            iif_lo(),
            tcp(),
            Expr::Mark {
                op: CmpOp::Ne,
                mark: OUTBOUND_MARK,
            },
            Expr::Counter,
            ret(),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the nftables_render fuzz target: with only IPv6 DNS servers and IPv6 off, `istio-output` (nat) and
    /// `prerouting` (raw) jumped to `istio-output-dns` and `istio-inbound`, which got no rule and so were never
    /// created: the kernel refuses such a transaction.
    #[test]
    fn every_jump_target_is_declared() {
        let cfg = CaptureConfig {
            redirect_dns: true,
            dns_servers_v6: vec!["fd00::53".parse().unwrap()],
            enable_ipv6: false,
            ..CaptureConfig::default()
        };
        let ruleset = render(&cfg);
        let mut jumps = 0;
        for spec in &ruleset.tables {
            for rule in &spec.rules {
                for e in &rule.exprs {
                    if let Expr::Verdict(Verdict::Jump(target)) = e {
                        jumps += 1;
                        assert!(
                            spec.chains.iter().any(|d| d.chain == *target),
                            "{} jumps to undeclared {target}:\n{ruleset}",
                            spec.table
                        );
                    }
                }
            }
        }
        assert!(jumps > 0, "{ruleset}");
        let script = ruleset.to_string();
        assert!(
            script.contains("add chain inet istio-proxy-nat istio-output-dns\n"),
            "{script}"
        );
    }

    #[test]
    fn expressions_render_as_nft_words() {
        let set = Expr::Port {
            proto: L4Proto::Tcp,
            field: PortField::Dport,
            op: CmpOp::Ne,
            ports: Ports::Set(vec![53, 15008]),
        };
        assert_eq!(set.to_string(), "tcp dport != { 53, 15008 }");
        assert_eq!(
            daddr(CmpOp::Ne, loopback_v6()).to_string(),
            "ip6 daddr != ::1/128"
        );
        let server: DnsServer = "::127.0.0.53".parse().unwrap();
        assert_eq!(
            saddr(Prefix::Host(server)).to_string(),
            "ip6 saddr ::127.0.0.53/128"
        );
        assert_eq!(
            Expr::SkGid {
                spelling: MetaSpelling::Meta,
                op: CmpOp::Ne,
                group: OwnerGroup::Name("java".into())
            }
            .to_string(),
            "meta skgid != java"
        );
        assert_eq!(
            Expr::Tproxy {
                family: NetFamily::V6,
                port: 15006
            }
            .to_string(),
            "tproxy ip6 to :15006"
        );
        assert_eq!(
            jump(NftChain::IstioOutputDns).to_string(),
            "jump istio-output-dns"
        );
    }

    fn rule(chain: NftChain, position: Position, mark: u32) -> NftRule {
        NftRule {
            chain,
            position,
            exprs: vec![Expr::Mark {
                op: CmpOp::Eq,
                mark,
            }],
        }
    }

    /// `insert ... index N` puts the rule before the N-th rule of the chain as it is at that command.
    #[test]
    fn final_order_replays_inserts() {
        use NftChain::*;
        let spec = NftTableSpec {
            table: NftTable::Mangle,
            chains: vec![
                NftChainDecl {
                    chain: IstioDivert,
                    base: None,
                },
                NftChainDecl {
                    chain: IstioInbound,
                    base: None,
                },
            ],
            rules: vec![
                rule(IstioInbound, Position::Append, 1),
                rule(IstioDivert, Position::Append, 10),
                rule(IstioInbound, Position::Append, 2),
                rule(IstioInbound, Position::Insert(0), 3),
                rule(IstioInbound, Position::Insert(1), 4),
                rule(IstioInbound, Position::Insert(1), 5),
                rule(IstioInbound, Position::Insert(2), 6),
            ],
        };
        let marks: Vec<u32> = spec
            .rules_in_final_order()
            .iter()
            .map(|r| match r.exprs[0] {
                Expr::Mark { mark, .. } => mark,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(marks, [10, 3, 5, 6, 4, 1, 2]);
    }

    /// Istio's transaction turns an insert into an empty chain, or past its end, into an append.
    #[test]
    fn inserts_past_the_end_become_appends() {
        let mut b = Builder {
            ipv6: false,
            tables: Default::default(),
        };
        b.insert(NftTable::Nat, NftChain::Prerouting, 0, vec![ret()]);
        b.insert(NftTable::Nat, NftChain::Prerouting, 1, vec![ret()]);
        b.insert(NftTable::Nat, NftChain::Prerouting, 0, vec![ret()]);
        b.insert_v6(NftTable::Nat, NftChain::Prerouting, 0, vec![ret()]);
        let rs = b.finish();
        let positions: Vec<Position> = rs.tables[0].rules.iter().map(|r| r.position).collect();
        assert_eq!(
            positions,
            [Position::Append, Position::Append, Position::Insert(0)]
        );
        assert_eq!(rs.tables.len(), 1);
        assert_eq!(rs.tables[0].chains.len(), 1);
    }
}
