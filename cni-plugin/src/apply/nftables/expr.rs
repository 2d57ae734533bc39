//! Rule expressions as nf_tables kernel expressions, written the way `nft` 1.0 writes them (compare with
//! `nft --debug=netlink -f`): the same loads, comparisons, registers and implicit protocol dependencies, so that
//! `nft list ruleset` shows our rules exactly as it shows Istio's script loaded by `nft -f`.
//!
//! Register data is host-endian for host values (uid, gid, mark, zone, conntrack state bits) and network order
//! for packet fields (ports, addresses); attributes themselves are big-endian.

use std::net::IpAddr;

use super::msg::MsgBuf;
use crate::rules::nftables::{
    AddrField, CmpOp, CtStates, Expr, Iface, L4Proto, NetFamily, PortField, Ports, Prefix, Verdict,
};
use crate::rules::OwnerGroup;

// enum nft_registers
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

// struct nft_list_attributes / nft_expr_attributes
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

// nft_data_attributes / nft_verdict_attributes
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

// Verdict codes: NF_DROP, NF_ACCEPT, NFT_JUMP, NFT_RETURN.
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_RETURN: i32 = -5;

// nft_meta_attributes and keys
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_SKUID: u32 = 10;
const NFT_META_SKGID: u32 = 11;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;

// nft_cmp_attributes and ops
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;

// nft_payload_attributes and bases
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

// nft_bitwise_attributes
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;

// nft_lookup_attributes
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFT_LOOKUP_F_INV: u32 = 1;

// nft_ct_attributes and keys
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_SREG: u16 = 4;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_MARK: u32 = 3;
const NFT_CT_ZONE: u32 = 17;
/// `NF_CT_STATE_INVALID_BIT`, and `NF_CT_STATE_BIT(IP_CT_ESTABLISHED | IP_CT_RELATED)`.
const CT_STATE_INVALID: u32 = 1;
const CT_STATE_ESTABLISHED: u32 = 1 << 1;
const CT_STATE_RELATED: u32 = 1 << 2;

// nft_immediate_attributes
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;

// nft_redir_attributes; NF_NAT_RANGE_PROTO_SPECIFIED
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

// nft_tproxy_attributes
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_PORT: u16 = 3;

/// `NFPROTO_IPV4`, `NFPROTO_IPV6`
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `IPPROTO_TCP`, `IPPROTO_UDP`
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `IFNAMSIZ`: interface names are compared as 16 zero-padded bytes.
const IFNAMSIZ: usize = 16;

fn nfproto(family: NetFamily) -> u8 {
    match family {
        NetFamily::V4 => NFPROTO_IPV4,
        NetFamily::V6 => NFPROTO_IPV6,
    }
}

fn ipproto(proto: L4Proto) -> u8 {
    match proto {
        L4Proto::Tcp => IPPROTO_TCP,
        L4Proto::Udp => IPPROTO_UDP,
    }
}

/// A group name that could not be resolved to a gid (as `nft` resolves it when it parses the rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnknownGroup(pub String);

/// Writes kernel expressions into the `NFTA_RULE_EXPRESSIONS` nest of a rule being written.
pub(super) struct RuleWriter<'m> {
    m: &'m mut MsgBuf,
    /// The protocols the rule has matched so far (nft's protocol context): a match needs its dependency
    /// (`meta nfproto`, `meta l4proto`) only when the context does not already have it.
    network: Option<NetFamily>,
    transport: Option<L4Proto>,
}

impl<'m> RuleWriter<'m> {
    pub(super) fn new(m: &'m mut MsgBuf) -> Self {
        RuleWriter {
            m,
            network: None,
            transport: None,
        }
    }

    /// Writes one rule expression. `set_ids` gives, in order, the batch ids of the anonymous sets of the rule's
    /// port sets (already written); `gid_of` resolves group names.
    pub(super) fn expr(
        &mut self,
        e: &Expr,
        set_ids: &mut impl Iterator<Item = u32>,
        gid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), UnknownGroup> {
        match e {
            Expr::Iifname(i) => self.ifname(NFT_META_IIFNAME, i),
            Expr::Oifname(i) => self.ifname(NFT_META_OIFNAME, i),
            Expr::L4Proto(p) => self.l4proto(*p),
            Expr::Port {
                proto,
                field,
                op,
                ports,
            } => {
                if self.transport != Some(*proto) {
                    self.l4proto(*proto);
                }
                let offset = match field {
                    PortField::Sport => 0,
                    PortField::Dport => 2,
                };
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2);
                match ports {
                    Ports::One(port) => self.cmp(*op, &port.to_be_bytes()),
                    Ports::Set(_) => {
                        // The rule's sets were written in the order of its expressions.
                        let id = set_ids.next().unwrap_or(0);
                        self.lookup(id, *op == CmpOp::Ne);
                    }
                }
            }
            Expr::Addr { field, op, prefix } => self.addr(*field, *op, prefix),
            Expr::SkUid { op, uid, .. } => {
                self.meta_load(NFT_META_SKUID);
                self.cmp(*op, &uid.to_ne_bytes());
            }
            Expr::SkGid { op, group, .. } => {
                let gid = match group {
                    OwnerGroup::Id(id) => *id,
                    OwnerGroup::Name(name) => {
                        gid_of(name).ok_or_else(|| UnknownGroup(name.clone()))?
                    }
                };
                self.meta_load(NFT_META_SKGID);
                self.cmp(*op, &gid.to_ne_bytes());
            }
            Expr::Mark { op, mark } => {
                self.meta_load(NFT_META_MARK);
                self.cmp(*op, &mark.to_ne_bytes());
            }
            Expr::CtMark(mark) => {
                self.ct_load(NFT_CT_MARK);
                self.cmp(CmpOp::Eq, &mark.to_ne_bytes());
            }
            Expr::CtState(states) => {
                let bits = match states {
                    CtStates::Invalid => CT_STATE_INVALID,
                    CtStates::RelatedEstablished => CT_STATE_ESTABLISHED | CT_STATE_RELATED,
                };
                self.ct_load(NFT_CT_STATE);
                self.bitwise(&bits.to_ne_bytes(), &[0; 4]);
                self.cmp(CmpOp::Ne, &[0; 4]);
            }
            Expr::Counter => {
                let (elem, data) = self.begin("counter");
                self.finish(elem, data);
            }
            Expr::SetMark(mark) => {
                self.immediate(&mark.to_ne_bytes());
                self.meta_set(NFT_META_MARK);
            }
            Expr::SetMarkFromCtMark => {
                self.ct_load(NFT_CT_MARK);
                self.meta_set(NFT_META_MARK);
            }
            Expr::SetCtMarkFromMark => {
                self.meta_load(NFT_META_MARK);
                self.ct_set(NFT_CT_MARK);
            }
            Expr::SetCtZone(zone) => {
                self.immediate(&zone.to_ne_bytes());
                self.ct_set(NFT_CT_ZONE);
            }
            Expr::Redirect(port) => {
                self.immediate(&port.to_be_bytes());
                let (elem, data) = self.begin("redir");
                self.m.attr_be32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1);
                self.m
                    .attr_be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
                self.finish(elem, data);
            }
            Expr::Tproxy { family, port } => {
                if self.network != Some(*family) {
                    self.nfproto(*family);
                }
                self.immediate(&port.to_be_bytes());
                let (elem, data) = self.begin("tproxy");
                self.m
                    .attr_be32(NFTA_TPROXY_FAMILY, u32::from(nfproto(*family)));
                self.m.attr_be32(NFTA_TPROXY_REG_PORT, NFT_REG_1);
                self.finish(elem, data);
            }
            Expr::Verdict(v) => self.verdict(*v),
        }
        Ok(())
    }

    /// Opens `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }`.
    fn begin(&mut self, name: &str) -> (usize, usize) {
        let elem = self.m.nest_start(NFTA_LIST_ELEM);
        self.m.attr_str(NFTA_EXPR_NAME, name);
        let data = self.m.nest_start(NFTA_EXPR_DATA);
        (elem, data)
    }

    fn finish(&mut self, elem: usize, data: usize) {
        self.m.nest_end(data);
        self.m.nest_end(elem);
    }

    /// `meta` and `ct` expressions: a key and the register they load into or set from.
    fn keyed(&mut self, name: &str, key_attr: u16, key: u32, reg_attr: u16) {
        let (elem, data) = self.begin(name);
        self.m.attr_be32(key_attr, key);
        self.m.attr_be32(reg_attr, NFT_REG_1);
        self.finish(elem, data);
    }

    fn meta_load(&mut self, key: u32) {
        self.keyed("meta", NFTA_META_KEY, key, NFTA_META_DREG);
    }

    fn meta_set(&mut self, key: u32) {
        self.keyed("meta", NFTA_META_KEY, key, NFTA_META_SREG);
    }

    fn ct_load(&mut self, key: u32) {
        self.keyed("ct", NFTA_CT_KEY, key, NFTA_CT_DREG);
    }

    fn ct_set(&mut self, key: u32) {
        self.keyed("ct", NFTA_CT_KEY, key, NFTA_CT_SREG);
    }

    fn cmp(&mut self, op: CmpOp, value: &[u8]) {
        let (elem, data) = self.begin("cmp");
        self.m.attr_be32(NFTA_CMP_SREG, NFT_REG_1);
        self.m.attr_be32(
            NFTA_CMP_OP,
            match op {
                CmpOp::Eq => NFT_CMP_EQ,
                CmpOp::Ne => NFT_CMP_NEQ,
            },
        );
        let nest = self.m.nest_start(NFTA_CMP_DATA);
        self.m.attr(NFTA_DATA_VALUE, value);
        self.m.nest_end(nest);
        self.finish(elem, data);
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        let (elem, data) = self.begin("payload");
        self.m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        self.m.attr_be32(NFTA_PAYLOAD_BASE, base);
        self.m.attr_be32(NFTA_PAYLOAD_OFFSET, offset);
        self.m.attr_be32(NFTA_PAYLOAD_LEN, len);
        self.finish(elem, data);
    }

    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        let (elem, data) = self.begin("bitwise");
        self.m.attr_be32(NFTA_BITWISE_SREG, NFT_REG_1);
        self.m.attr_be32(NFTA_BITWISE_DREG, NFT_REG_1);
        self.m.attr_be32(NFTA_BITWISE_LEN, mask.len() as u32);
        for (ty, value) in [(NFTA_BITWISE_MASK, mask), (NFTA_BITWISE_XOR, xor)] {
            let nest = self.m.nest_start(ty);
            self.m.attr(NFTA_DATA_VALUE, value);
            self.m.nest_end(nest);
        }
        self.finish(elem, data);
    }

    fn lookup(&mut self, set_id: u32, invert: bool) {
        let (elem, data) = self.begin("lookup");
        self.m.attr_be32(NFTA_LOOKUP_SREG, NFT_REG_1);
        self.m.attr_str(NFTA_LOOKUP_SET, ANON_SET_NAME);
        self.m.attr_be32(NFTA_LOOKUP_SET_ID, set_id);
        if invert {
            self.m.attr_be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
        }
        self.finish(elem, data);
    }

    fn immediate(&mut self, value: &[u8]) {
        let (elem, data) = self.begin("immediate");
        self.m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
        let nest = self.m.nest_start(NFTA_IMMEDIATE_DATA);
        self.m.attr(NFTA_DATA_VALUE, value);
        self.m.nest_end(nest);
        self.finish(elem, data);
    }

    fn verdict(&mut self, v: Verdict) {
        let (code, chain) = match v {
            Verdict::Return => (NFT_RETURN, None),
            Verdict::Accept => (NF_ACCEPT, None),
            Verdict::Drop => (NF_DROP, None),
            Verdict::Jump(chain) => (NFT_JUMP, Some(chain.name())),
        };
        let (elem, data) = self.begin("immediate");
        self.m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        let imm = self.m.nest_start(NFTA_IMMEDIATE_DATA);
        let verdict = self.m.nest_start(NFTA_DATA_VERDICT);
        self.m.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(chain) = chain {
            self.m.attr_str(NFTA_VERDICT_CHAIN, chain);
        }
        self.m.nest_end(verdict);
        self.m.nest_end(imm);
        self.finish(elem, data);
    }

    fn ifname(&mut self, key: u32, iface: &Iface) {
        let mut name = [0u8; IFNAMSIZ];
        let bytes = iface.name().as_bytes();
        let n = bytes.len().min(IFNAMSIZ - 1);
        name[..n].copy_from_slice(&bytes[..n]);
        self.meta_load(key);
        self.cmp(CmpOp::Eq, &name);
    }

    fn l4proto(&mut self, proto: L4Proto) {
        self.meta_load(NFT_META_L4PROTO);
        self.cmp(CmpOp::Eq, &[ipproto(proto)]);
        self.transport = Some(proto);
    }

    fn nfproto(&mut self, family: NetFamily) {
        self.meta_load(NFT_META_NFPROTO);
        self.cmp(CmpOp::Eq, &[nfproto(family)]);
        self.network = Some(family);
    }

    /// An address prefix as nft matches it: a byte-aligned prefix loads and compares only its bytes; any other
    /// (including `/0`) loads the whole address, masks it, and compares with the masked address.
    fn addr(&mut self, field: AddrField, op: CmpOp, prefix: &Prefix) {
        let family = prefix.family();
        if self.network != Some(family) {
            self.nfproto(family);
        }
        let mut bytes = [0u8; 16];
        let (offset, len) = match (prefix.addr(), field) {
            (IpAddr::V4(a), f) => {
                bytes[..4].copy_from_slice(&a.octets());
                (if f == AddrField::Saddr { 12 } else { 16 }, 4)
            }
            (IpAddr::V6(a), f) => {
                bytes.copy_from_slice(&a.octets());
                (if f == AddrField::Saddr { 8 } else { 24 }, 16)
            }
        };
        let bits = usize::from(prefix.prefix_len()).min(len * 8);
        let mut mask = [0u8; 16];
        for (i, m) in mask.iter_mut().enumerate().take(len) {
            let taken = bits.saturating_sub(i * 8).min(8);
            *m = !(0xffu8.checked_shr(taken as u32).unwrap_or(0));
        }
        for (b, m) in bytes.iter_mut().zip(mask) {
            *b &= m;
        }
        if bits % 8 == 0 && bits > 0 {
            let n = bits / 8;
            self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, n as u32);
            self.cmp(op, &bytes[..n]);
        } else {
            self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
            self.bitwise(&mask[..len], &[0; 16][..len]);
            self.cmp(op, &bytes[..len]);
        }
    }
}

/// The name of every anonymous set: the kernel replaces `%d` with a free number.
pub(super) const ANON_SET_NAME: &str = "__set%d";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::nftables::msg::attrs;

    /// Renders written expressions as `nft --debug=netlink` prints them, for comparing with nft's own output.
    fn debug_lines(exprs: &[u8]) -> Vec<String> {
        let be32 = |d: &[u8]| u32::from_be_bytes(d.try_into().unwrap());
        let data_words = |d: &[u8]| -> String {
            let (value, _) = attrs(d)
                .find(|(t, _)| *t == NFTA_DATA_VALUE)
                .map(|(_, v)| (v, ()))
                .unwrap();
            value
                .chunks(4)
                .map(|c| {
                    let mut w = [0u8; 4];
                    w[..c.len()].copy_from_slice(c);
                    format!("0x{:08x}", u32::from_le_bytes(w))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut out = Vec::new();
        for (_, elem) in attrs(exprs) {
            let mut it = attrs(elem);
            let name = it.next().unwrap().1;
            let name = std::str::from_utf8(&name[..name.len() - 1])
                .unwrap()
                .to_string();
            let body: Vec<(u16, &[u8])> = it
                .next()
                .map(|(_, d)| attrs(d).collect())
                .unwrap_or_default();
            let get = |t: u16| body.iter().find(|(ty, _)| *ty == t).map(|(_, v)| *v);
            let line = match name.as_str() {
                "meta" => {
                    let key = match be32(get(NFTA_META_KEY).unwrap()) {
                        NFT_META_MARK => "mark",
                        NFT_META_IIFNAME => "iifname",
                        NFT_META_OIFNAME => "oifname",
                        NFT_META_SKUID => "skuid",
                        NFT_META_SKGID => "skgid",
                        NFT_META_NFPROTO => "nfproto",
                        NFT_META_L4PROTO => "l4proto",
                        _ => "?",
                    };
                    match get(NFTA_META_DREG) {
                        Some(r) => format!("meta load {key} => reg {}", be32(r)),
                        None => format!(
                            "meta set {key} with reg {}",
                            be32(get(NFTA_META_SREG).unwrap())
                        ),
                    }
                }
                "cmp" => format!(
                    "cmp {} reg {} {}",
                    if be32(get(NFTA_CMP_OP).unwrap()) == NFT_CMP_EQ {
                        "eq"
                    } else {
                        "neq"
                    },
                    be32(get(NFTA_CMP_SREG).unwrap()),
                    data_words(get(NFTA_CMP_DATA).unwrap())
                ),
                "payload" => format!(
                    "payload load {}b @ {} header + {} => reg {}",
                    be32(get(NFTA_PAYLOAD_LEN).unwrap()),
                    if be32(get(NFTA_PAYLOAD_BASE).unwrap()) == NFT_PAYLOAD_NETWORK_HEADER {
                        "network"
                    } else {
                        "transport"
                    },
                    be32(get(NFTA_PAYLOAD_OFFSET).unwrap()),
                    be32(get(NFTA_PAYLOAD_DREG).unwrap())
                ),
                "bitwise" => format!(
                    "bitwise reg {} = ( reg {} & {} ) ^ {}",
                    be32(get(NFTA_BITWISE_DREG).unwrap()),
                    be32(get(NFTA_BITWISE_SREG).unwrap()),
                    data_words(get(NFTA_BITWISE_MASK).unwrap()),
                    data_words(get(NFTA_BITWISE_XOR).unwrap())
                ),
                "lookup" => format!(
                    "lookup reg {} set __set%d{}",
                    be32(get(NFTA_LOOKUP_SREG).unwrap()),
                    get(NFTA_LOOKUP_FLAGS).map_or(String::new(), |f| format!(" 0x{:x}", be32(f)))
                ),
                "counter" => "counter pkts 0 bytes 0".to_string(),
                _ => name,
            };
            out.push(format!("[ {line} ]"));
        }
        out
    }

    fn lower(exprs: &[Expr]) -> Vec<String> {
        let mut m = MsgBuf::default();
        let nest = m.nest_start(4);
        let mut w = RuleWriter::new(&mut m);
        let mut ids = 1..;
        let gid_of = |name: &str| (name == "java").then_some(5000);
        for e in exprs {
            w.expr(e, &mut ids, &gid_of).unwrap();
        }
        m.nest_end(nest);
        let bytes = m.as_bytes();
        let first = attrs(bytes).next().unwrap().1;
        debug_lines(first)
    }

    fn daddr(op: CmpOp, net: &str) -> Expr {
        Expr::Addr {
            field: AddrField::Daddr,
            op,
            prefix: Prefix::Net(net.parse().unwrap()),
        }
    }

    /// Istio's self-call rule, as `nft --debug=netlink` prints it for the tproxy golden.
    #[test]
    fn rule_with_dependencies_and_a_set_lowers_like_nft() {
        let rule = [
            Expr::Oifname(Iface::Loopback),
            Expr::L4Proto(L4Proto::Tcp),
            daddr(CmpOp::Ne, "127.0.0.1/32"),
            Expr::Port {
                proto: L4Proto::Tcp,
                field: PortField::Dport,
                op: CmpOp::Ne,
                ports: Ports::Set(vec![53, 15008]),
            },
            Expr::SkUid {
                spelling: crate::rules::nftables::MetaSpelling::Bare,
                op: CmpOp::Eq,
                uid: 1337,
            },
            Expr::Counter,
        ];
        assert_eq!(
            lower(&rule),
            [
                "[ meta load oifname => reg 1 ]",
                "[ cmp eq reg 1 0x00006f6c 0x00000000 0x00000000 0x00000000 ]",
                "[ meta load l4proto => reg 1 ]",
                "[ cmp eq reg 1 0x00000006 ]",
                "[ meta load nfproto => reg 1 ]",
                "[ cmp eq reg 1 0x00000002 ]",
                "[ payload load 4b @ network header + 16 => reg 1 ]",
                "[ cmp neq reg 1 0x0100007f ]",
                "[ payload load 2b @ transport header + 2 => reg 1 ]",
                "[ lookup reg 1 set __set%d 0x1 ]",
                "[ meta load skuid => reg 1 ]",
                "[ cmp eq reg 1 0x00000539 ]",
                "[ counter pkts 0 bytes 0 ]",
            ]
        );
    }

    /// Prefixes as nft 1.0 writes them (checked with `nft --debug=netlink`): aligned ones compare their bytes,
    /// others mask the whole address, host bits are cleared.
    #[test]
    fn prefixes_lower_like_nft() {
        assert_eq!(
            lower(&[daddr(CmpOp::Eq, "10.1.2.3/8")])[2..],
            [
                "[ payload load 1b @ network header + 16 => reg 1 ]",
                "[ cmp eq reg 1 0x0000000a ]"
            ]
        );
        assert_eq!(
            lower(&[daddr(CmpOp::Eq, "10.16.0.0/12")])[2..],
            [
                "[ payload load 4b @ network header + 16 => reg 1 ]",
                "[ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]",
                "[ cmp eq reg 1 0x0000100a ]"
            ]
        );
        assert_eq!(
            lower(&[daddr(CmpOp::Eq, "0.0.0.0/0")])[2..],
            [
                "[ payload load 4b @ network header + 16 => reg 1 ]",
                "[ bitwise reg 1 = ( reg 1 & 0x00000000 ) ^ 0x00000000 ]",
                "[ cmp eq reg 1 0x00000000 ]"
            ]
        );
        assert_eq!(
            lower(&[daddr(CmpOp::Eq, "2001:db8::/33")]),
            [
                "[ meta load nfproto => reg 1 ]",
                "[ cmp eq reg 1 0x0000000a ]",
                "[ payload load 16b @ network header + 24 => reg 1 ]",
                "[ bitwise reg 1 = ( reg 1 & 0xffffffff 0x00000080 0x00000000 0x00000000 ) ^ \
                 0x00000000 0x00000000 0x00000000 0x00000000 ]",
                "[ cmp eq reg 1 0xb80d0120 0x00000000 0x00000000 0x00000000 ]"
            ]
        );
        // One dependency per rule: the second IPv4 match needs no second `meta nfproto`.
        let two = lower(&[
            daddr(CmpOp::Eq, "10.0.0.0/8"),
            Expr::Addr {
                field: AddrField::Saddr,
                op: CmpOp::Eq,
                prefix: Prefix::Net("127.0.0.6/32".parse().unwrap()),
            },
        ]);
        assert_eq!(two.len(), 6);
        assert_eq!(two[4], "[ payload load 4b @ network header + 12 => reg 1 ]");
    }

    #[test]
    fn ports_add_their_transport_dependency_once() {
        let udp53 = Expr::Port {
            proto: L4Proto::Udp,
            field: PortField::Dport,
            op: CmpOp::Eq,
            ports: Ports::One(53),
        };
        assert_eq!(
            lower(std::slice::from_ref(&udp53)),
            [
                "[ meta load l4proto => reg 1 ]",
                "[ cmp eq reg 1 0x00000011 ]",
                "[ payload load 2b @ transport header + 2 => reg 1 ]",
                "[ cmp eq reg 1 0x00003500 ]"
            ]
        );
        assert_eq!(lower(&[Expr::L4Proto(L4Proto::Udp), udp53]).len(), 4);
    }

    #[test]
    fn ct_state_and_named_groups() {
        assert_eq!(
            lower(&[Expr::CtState(CtStates::RelatedEstablished)])[1..],
            [
                "[ bitwise reg 1 = ( reg 1 & 0x00000006 ) ^ 0x00000000 ]",
                "[ cmp neq reg 1 0x00000000 ]"
            ]
        );
        let java = Expr::SkGid {
            spelling: crate::rules::nftables::MetaSpelling::Bare,
            op: CmpOp::Ne,
            group: OwnerGroup::Name("java".into()),
        };
        assert_eq!(lower(&[java])[1], "[ cmp neq reg 1 0x00001388 ]");
        let mut m = MsgBuf::default();
        let unknown = Expr::SkGid {
            spelling: crate::rules::nftables::MetaSpelling::Bare,
            op: CmpOp::Eq,
            group: OwnerGroup::Name("nosuch".into()),
        };
        let err = RuleWriter::new(&mut m)
            .expr(&unknown, &mut (1..), &|_| None)
            .unwrap_err();
        assert_eq!(err, UnknownGroup("nosuch".into()));
    }
}
