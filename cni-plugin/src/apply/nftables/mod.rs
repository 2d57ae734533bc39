//! The native nftables backend's edge: a rendered [`NftRuleset`] programmed into the netns of the calling thread
//! over netfilter netlink, as one nf_tables batch (one transaction), with no program run and no C library.
//!
//! The batch is what `nft -f` sends for Istio's script: per table `NEWTABLE`, a flush (`DELRULE` naming only
//! the table, so a second apply leaves one copy), `NEWCHAIN` for each chain, then per rule its anonymous sets
//! (`NEWSET` + `NEWSETELEM`) and `NEWRULE`. Rules are appended in their final order
//! ([`crate::rules::nftables::NftTableSpec::rules_in_final_order`]). The kernel applies all of it or none of it.
//!
//! One socket, one `sendmsg` of the whole batch. Only the batch's last message asks for an ACK: the kernel
//! processes a batch synchronously within `sendmsg` and reports every refused message anyway (then the ACK of
//! the last one), so the answers are already queued when `sendmsg` returns and are read without waiting.
//!
//! The caller chooses the netns: run this on a thread that has entered the pod netns (see
//! [`crate::netns::Netns::run`]); the socket is opened here, in that thread's netns.

mod backend;
mod expr;
mod msg;
mod socket;

pub use backend::{remove_tables, NativeNftables};

use std::io;

use nix::errno::Errno;

use crate::rules::nftables::{
    Expr, Hook, NftChain, NftRule, NftRuleset, NftTable, NftTableSpec, Ports,
};
use msg::{
    answers, attrs, MsgBuf, NftMsg, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES,
    NFPROTO_UNSPEC, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use socket::NfSocket;

/// The backend's name, in every error.
pub const BACKEND: &str = "nftables";

// nft_table_attributes, nft_chain_attributes, nft_hook_attributes, nft_rule_attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
// nft_set_attributes, nft_set_desc_attributes, nft_set_elem_list_attributes, nft_set_elem_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
/// `NFT_SET_ANONYMOUS | NFT_SET_CONSTANT`
const ANON_CONSTANT_SET: u32 = 0x1 | 0x2;
/// nft's `TYPE_INET_SERVICE` (a port): the key type userspace reads back to print the elements.
const KEY_TYPE_INET_SERVICE: u32 = 13;
/// `NF_INET_PRE_ROUTING`, `NF_INET_LOCAL_OUT`
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;

/// What the kernel refused, or why nothing could be sent. Every message names the backend.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{BACKEND}: the kernel has no nf_tables support ({what}: {errno})")]
    Unsupported { what: &'static str, errno: Errno },
    #[error("{BACKEND}: cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{BACKEND}: sending the batch of {bytes} bytes failed: {source}")]
    Send {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("{BACKEND}: reading the kernel's answer failed: {0}")]
    Receive(#[source] io::Error),
    #[error("{BACKEND}: the kernel refused {what}: {errno}{}", others_note(*.others))]
    Refused {
        /// The refused message: `table inet T`, `chain inet T C`, `rule "add rule inet T C ..."`, ...
        what: String,
        errno: Errno,
        /// How many other messages of the batch were refused too.
        others: usize,
    },
    #[error("{BACKEND}: group {name:?} does not exist (in rule \"{rule}\")")]
    UnknownGroup { name: String, rule: String },
    #[error("{BACKEND}: malformed answer from the kernel: {0}")]
    Malformed(String),
    #[error("{BACKEND}: the kernel did not answer the batch of {messages} messages")]
    NoAnswer { messages: usize },
}

fn others_note(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} more messages of the batch)"),
    }
}

/// What one [`apply`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NftApplied {
    /// Tables deleted before the ruleset's were created ([`apply_replacing`]).
    pub deleted: usize,
    pub tables: usize,
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    /// Messages of the batch, `BATCH_BEGIN` and `BATCH_END` included.
    pub messages: usize,
    pub bytes: usize,
}

/// Programs the ruleset into the calling thread's netns in one transaction: Istio's tables are created if
/// missing and their rules replaced. Group names are resolved with the system's group database, as `nft` does.
/// An empty ruleset sends nothing.
pub fn apply(ruleset: &NftRuleset) -> Result<NftApplied, NftError> {
    apply_with_groups(ruleset, &system_gid)
}

/// One netfilter netlink socket for a table dump and the batch after it (one socket, one receive buffer, instead
/// of one each).
pub struct Session {
    socket: NfSocket,
}

impl Session {
    /// Opens the socket in the calling thread's netns.
    pub fn open() -> Result<Session, NftError> {
        Ok(Session { socket: open()? })
    }

    /// [`programmed_tables`] on this socket.
    pub fn programmed_tables(&mut self) -> Result<Vec<NftTable>, NftError> {
        tables_on(&mut self.socket)
    }

    /// The socket, for a batch of the caller's own.
    fn socket(&mut self) -> &mut NfSocket {
        &mut self.socket
    }

    /// [`apply`] on this socket, deleting the tables of `existing` first in the same transaction: what an
    /// earlier, different capture left (a table or chain the new ruleset does not have) goes too, and there is
    /// still no moment without rules.
    pub fn apply_replacing(
        &mut self,
        ruleset: &NftRuleset,
        existing: &[NftTable],
    ) -> Result<NftApplied, NftError> {
        send_batch(
            Batch::build(ruleset, existing, &system_gid)?,
            Some(&mut self.socket),
        )
    }
}

/// [`apply`] with the group-name resolver given (tests, or a caller that resolved names already).
pub fn apply_with_groups(
    ruleset: &NftRuleset,
    gid_of: &dyn Fn(&str) -> Option<u32>,
) -> Result<NftApplied, NftError> {
    send_batch(Batch::build(ruleset, &[], gid_of)?, None)
}

/// Sends the batch on `socket`, or on a socket of its own.
fn send_batch(batch: Batch<'_>, socket: Option<&mut NfSocket>) -> Result<NftApplied, NftError> {
    if batch.stats.tables == 0 && batch.stats.deleted == 0 {
        return Ok(NftApplied::default());
    }
    let mut own;
    let socket = match socket {
        Some(s) => s,
        None => {
            own = open()?;
            &mut own
        }
    };
    let bytes = batch.m.as_bytes();
    socket.send(bytes).map_err(|source| NftError::Send {
        bytes: bytes.len(),
        source,
    })?;
    batch.check_answers(socket)?;
    Ok(batch.stats)
}

/// Which of Istio's tables exist in the calling thread's netns (a table dump of family `inet`).
pub fn programmed_tables() -> Result<Vec<NftTable>, NftError> {
    tables_on(&mut open()?)
}

fn tables_on(socket: &mut NfSocket) -> Result<Vec<NftTable>, NftError> {
    let mut m = MsgBuf::with_capacity(32);
    let seq = m.begin_nft(NftMsg::GetTable, NLM_F_REQUEST | NLM_F_DUMP);
    m.end();
    socket.send(m.as_bytes()).map_err(|source| NftError::Send {
        bytes: m.as_bytes().len(),
        source,
    })?;
    let mut found = Vec::new();
    loop {
        let datagram = socket
            .recv(true)
            .map_err(NftError::Receive)?
            .ok_or(NftError::NoAnswer { messages: 1 })?;
        for answer in answers(datagram) {
            let answer = answer.map_err(NftError::Malformed)?;
            if answer.seq != seq {
                continue;
            }
            match answer.msg_type {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = answer
                        .error()
                        .ok_or_else(|| NftError::Malformed("short error message".to_string()))?;
                    return Err(table_dump_refused(Errno::from_raw(errno)));
                }
                _ => {
                    let name = answer
                        .payload
                        .get(4..)
                        .and_then(|a| attrs(a).find(|(t, _)| *t == NFTA_TABLE_NAME))
                        .map(|(_, v)| v.strip_suffix(&[0]).unwrap_or(v));
                    if let Some(t) = NftTable::ALL
                        .into_iter()
                        .find(|t| name == Some(t.name().as_bytes()))
                    {
                        found.push(t);
                    }
                }
            }
        }
    }
}

fn open() -> Result<NfSocket, NftError> {
    NfSocket::open().map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
        Some(errno @ (Errno::EPROTONOSUPPORT | Errno::EAFNOSUPPORT)) => NftError::Unsupported {
            what: "netfilter netlink socket",
            errno,
        },
        _ => NftError::Socket(e),
    })
}

/// The system's gid for a group name (`getgrnam_r`: /etc/group or NSS).
fn system_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The errors that mean "this kernel cannot do nf_tables (or family inet)".
fn is_unsupported(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT | Errno::EAFNOSUPPORT | Errno::ENOENT
    )
}

fn classify(errno: Errno, what: String, may_be_unsupported: bool, others: usize) -> NftError {
    if may_be_unsupported && is_unsupported(errno) {
        return NftError::Unsupported {
            what: "nf_tables batch",
            errno,
        };
    }
    NftError::Refused {
        what,
        errno,
        others,
    }
}

/// The error of a refused table dump (the first request of every apply). A kernel with netfilter netlink but
/// without nf_tables answers any request for the missing subsystem with EINVAL (nfnetlink finds no subsystem
/// for the message type): for a dump of tables, which carries no attribute that could be invalid, that is the
/// kernel saying it has no nf_tables, and the error says so.
fn table_dump_refused(errno: Errno) -> NftError {
    if errno == Errno::EINVAL || is_unsupported(errno) {
        return NftError::Unsupported {
            what: "nf_tables table dump",
            errno,
        };
    }
    NftError::Refused {
        what: "the table dump".to_string(),
        errno,
        others: 0,
    }
}

/// What a message of the batch is, to name it in an error.
#[derive(Debug, Clone, Copy)]
enum Label<'a> {
    BatchBegin,
    BatchEnd,
    Delete(NftTable),
    Table(NftTable),
    Flush(NftTable),
    Chain(NftTable, NftChain),
    Set(&'a NftTableSpec, &'a NftRule),
    SetElems(&'a NftTableSpec, &'a NftRule),
    Rule(&'a NftTableSpec, &'a NftRule),
}

impl Label<'_> {
    fn describe(&self) -> String {
        match self {
            Label::BatchBegin => "the transaction".to_string(),
            Label::BatchEnd => "the end of the transaction".to_string(),
            Label::Delete(t) => format!("the deletion of table inet {t}"),
            Label::Table(t) => format!("table inet {t}"),
            Label::Flush(t) => format!("the flush of table inet {t}"),
            Label::Chain(t, c) => format!("chain inet {t} {c}"),
            Label::Set(spec, rule) => {
                format!("an anonymous set of rule \"{}\"", spec.rule_command(rule))
            }
            Label::SetElems(spec, rule) => format!(
                "the elements of an anonymous set of rule \"{}\"",
                spec.rule_command(rule)
            ),
            Label::Rule(spec, rule) => format!("rule \"{}\"", spec.rule_command(rule)),
        }
    }
}

/// The encoded batch, with a label per message (`labels[seq - 1]`).
struct Batch<'a> {
    m: MsgBuf,
    labels: Vec<Label<'a>>,
    stats: NftApplied,
}

impl<'a> Batch<'a> {
    fn build(
        ruleset: &'a NftRuleset,
        delete: &[NftTable],
        gid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Self, NftError> {
        let rules: usize = ruleset.tables.iter().map(|t| t.rules.len()).sum();
        let mut b = Batch {
            m: MsgBuf::with_capacity(512 + 320 * rules),
            labels: Vec::with_capacity(8 + rules + 3 * ruleset.tables.len()),
            stats: NftApplied::default(),
        };
        b.m.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        b.m.end();
        b.labels.push(Label::BatchBegin);
        for &t in delete {
            b.m.begin_nft(NftMsg::DelTable, NLM_F_REQUEST);
            b.m.attr_str(NFTA_TABLE_NAME, t.name());
            b.m.end();
            b.labels.push(Label::Delete(t));
            b.stats.deleted += 1;
        }
        let mut set_id = 0u32;
        for spec in &ruleset.tables {
            b.table(spec);
            for rule in spec.rules_in_final_order() {
                let first_set = set_id + 1;
                for e in &rule.exprs {
                    if let Expr::Port {
                        ports: Ports::Set(ports),
                        ..
                    } = e
                    {
                        set_id += 1;
                        b.set(spec, rule, set_id, ports);
                    }
                }
                b.rule(spec, rule, &mut (first_set..=set_id), gid_of)?;
            }
        }
        // The last message asks for the ACK that tells the whole batch was processed.
        b.m.add_flags_to_last(NLM_F_ACK);
        b.m.begin(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        b.m.end();
        b.labels.push(Label::BatchEnd);
        b.stats.sets = set_id as usize;
        b.stats.messages = b.labels.len();
        b.stats.bytes = b.m.as_bytes().len();
        Ok(b)
    }

    fn table(&mut self, spec: &'a NftTableSpec) {
        let t = spec.table;
        let m = &mut self.m;
        m.begin_nft(NftMsg::NewTable, NLM_F_REQUEST);
        m.attr_str(NFTA_TABLE_NAME, t.name());
        m.attr_be32(NFTA_TABLE_FLAGS, 0);
        m.end();
        m.begin_nft(NftMsg::DelRule, NLM_F_REQUEST);
        m.attr_str(NFTA_RULE_TABLE, t.name());
        m.end();
        self.labels.extend([Label::Table(t), Label::Flush(t)]);
        for decl in &spec.chains {
            m.begin_nft(NftMsg::NewChain, NLM_F_REQUEST | NLM_F_CREATE);
            m.attr_str(NFTA_CHAIN_TABLE, t.name());
            m.attr_str(NFTA_CHAIN_NAME, decl.chain.name());
            if let Some(base) = decl.base {
                m.attr_str(NFTA_CHAIN_TYPE, base.kind.name());
                let hook = m.nest_start(NFTA_CHAIN_HOOK);
                m.attr_be32(
                    NFTA_HOOK_HOOKNUM,
                    match base.hook {
                        Hook::Prerouting => NF_INET_PRE_ROUTING,
                        Hook::Output => NF_INET_LOCAL_OUT,
                    },
                );
                m.attr(NFTA_HOOK_PRIORITY, &base.priority.to_be_bytes());
                m.nest_end(hook);
            }
            m.end();
            self.labels.push(Label::Chain(t, decl.chain));
        }
        self.stats.tables += 1;
        self.stats.chains += spec.chains.len();
    }

    /// An anonymous constant set of ports and its elements, for the rule that follows.
    fn set(&mut self, spec: &'a NftTableSpec, rule: &'a NftRule, id: u32, ports: &[u16]) {
        let t = spec.table.name();
        let m = &mut self.m;
        m.begin_nft(NftMsg::NewSet, NLM_F_REQUEST | NLM_F_CREATE);
        m.attr_str(NFTA_SET_TABLE, t);
        m.attr_str(NFTA_SET_NAME, expr::ANON_SET_NAME);
        m.attr_be32(NFTA_SET_FLAGS, ANON_CONSTANT_SET);
        m.attr_be32(NFTA_SET_KEY_TYPE, KEY_TYPE_INET_SERVICE);
        m.attr_be32(NFTA_SET_KEY_LEN, 2);
        m.attr_be32(NFTA_SET_ID, id);
        let desc = m.nest_start(NFTA_SET_DESC);
        m.attr_be32(NFTA_SET_DESC_SIZE, ports.len() as u32);
        m.nest_end(desc);
        m.end();
        m.begin_nft(NftMsg::NewSetElem, NLM_F_REQUEST | NLM_F_CREATE);
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, t);
        m.attr_str(NFTA_SET_ELEM_LIST_SET, expr::ANON_SET_NAME);
        m.attr_be32(NFTA_SET_ELEM_LIST_SET_ID, id);
        let elements = m.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        for port in ports {
            let elem = m.nest_start(NFTA_LIST_ELEM);
            let key = m.nest_start(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, &port.to_be_bytes());
            m.nest_end(key);
            m.nest_end(elem);
        }
        m.nest_end(elements);
        m.end();
        self.labels
            .extend([Label::Set(spec, rule), Label::SetElems(spec, rule)]);
    }

    fn rule(
        &mut self,
        spec: &'a NftTableSpec,
        rule: &'a NftRule,
        set_ids: &mut impl Iterator<Item = u32>,
        gid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), NftError> {
        let m = &mut self.m;
        m.begin_nft(NftMsg::NewRule, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND);
        m.attr_str(NFTA_RULE_TABLE, spec.table.name());
        m.attr_str(NFTA_RULE_CHAIN, rule.chain.name());
        let exprs = m.nest_start(NFTA_RULE_EXPRESSIONS);
        let mut w = expr::RuleWriter::new(m);
        for e in &rule.exprs {
            w.expr(e, set_ids, gid_of)
                .map_err(|expr::UnknownGroup(name)| NftError::UnknownGroup {
                    name,
                    rule: spec.rule_command(rule).to_string(),
                })?;
        }
        m.nest_end(exprs);
        m.end();
        self.labels.push(Label::Rule(spec, rule));
        self.stats.rules += 1;
        Ok(())
    }

    /// Reads the kernel's answers to the batch (already queued: see the module doc) until the ACK of its last
    /// message; any refused message fails the whole batch, which the kernel then did not apply.
    fn check_answers(&self, socket: &mut NfSocket) -> Result<(), NftError> {
        let mut seen = Answers::default();
        while !seen.done(self) {
            let Some(datagram) = socket.recv(false).map_err(NftError::Receive)? else {
                break;
            };
            seen.read(datagram)?;
        }
        seen.outcome(self)
    }

    /// The sequence number of the message before `BATCH_END`, the one whose ACK ends the answers.
    fn last_seq(&self) -> u32 {
        (self.labels.len() - 1) as u32
    }
}

/// The kernel's answers to a batch, as far as read.
#[derive(Debug, Default)]
struct Answers {
    refused: Vec<(u32, Errno)>,
    acked: Vec<u32>,
}

impl Answers {
    fn read(&mut self, datagram: &[u8]) -> Result<(), NftError> {
        for answer in answers(datagram) {
            let answer = answer.map_err(NftError::Malformed)?;
            match answer.error() {
                Some(0) => self.acked.push(answer.seq),
                Some(errno) => self.refused.push((answer.seq, Errno::from_raw(errno))),
                None => {}
            }
        }
        Ok(())
    }

    fn done(&self, batch: &Batch<'_>) -> bool {
        let last = batch.last_seq();
        self.acked.contains(&last) || self.refused.iter().any(|&(seq, _)| seq == last)
    }

    /// Success only when the last message was acknowledged and nothing was refused; otherwise the first refused
    /// message, named.
    fn outcome(&self, batch: &Batch<'_>) -> Result<(), NftError> {
        let Some(&(seq, errno)) = self.refused.first() else {
            return if self.done(batch) {
                Ok(())
            } else {
                Err(NftError::NoAnswer {
                    messages: batch.labels.len(),
                })
            };
        };
        let label = seq
            .checked_sub(1)
            .and_then(|i| batch.labels.get(i as usize))
            .copied()
            .unwrap_or(Label::BatchBegin);
        // nf_tables missing: the batch itself is refused (EOPNOTSUPP), or family inet is (EAFNOSUPPORT).
        let may_be_unsupported = match label {
            Label::BatchBegin => true,
            Label::Table(_) => errno != Errno::ENOENT,
            _ => false,
        };
        Err(classify(
            errno,
            label.describe(),
            may_be_unsupported,
            self.refused.len() - 1,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nftables::render;
    use crate::rules::CaptureConfig;
    use msg::error_datagram;

    /// The basic ruleset: one table, five chains, twelve rules.
    fn basic() -> NftRuleset {
        render(&CaptureConfig::default())
    }

    fn outcome(ruleset: &NftRuleset, answers: &[(u32, i32)]) -> Result<(), NftError> {
        let batch = Batch::build(ruleset, &[], &|_| None).unwrap();
        let mut seen = Answers::default();
        seen.read(&error_datagram(answers)).unwrap();
        seen.outcome(&batch)
    }

    /// The flags of every message of an encoded request.
    fn flags(request: &[u8]) -> Vec<u16> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 16 <= request.len() {
            let len = u32::from_ne_bytes(request[at..at + 4].try_into().unwrap()) as usize;
            out.push(u16::from_ne_bytes(
                request[at + 6..at + 8].try_into().unwrap(),
            ));
            at += (len + 3) & !3;
        }
        out
    }

    #[test]
    fn the_batch_is_framed_and_only_its_last_message_asks_for_an_ack() {
        let rs = basic();
        let batch = Batch::build(&rs, &[], &|_| None).unwrap();
        // BEGIN, table, flush, 5 chains, 12 rules, END; `nft -f` of the same script sends 4496 bytes too.
        assert_eq!(batch.stats.messages, 21);
        assert_eq!(batch.stats.bytes, 4496);
        let msgs: Vec<_> = answers(batch.m.as_bytes()).map(|a| a.unwrap()).collect();
        assert_eq!(msgs.len(), 21);
        assert_eq!(msgs[0].msg_type, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[20].msg_type, NFNL_MSG_BATCH_END);
        let seqs: Vec<u32> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
        let acks: Vec<bool> = flags(batch.m.as_bytes())
            .iter()
            .map(|f| f & NLM_F_ACK != 0)
            .collect();
        assert_eq!(acks.iter().filter(|a| **a).count(), 1);
        assert!(acks[19]);
    }

    #[test]
    fn port_sets_come_before_their_rule() {
        let cfg = CaptureConfig {
            redirect_dns: true,
            capture_all_dns: true,
            enable_ipv6: true,
            ..CaptureConfig::default()
        };
        let rs = render(&cfg);
        let batch = Batch::build(&rs, &[], &|_| None).unwrap();
        assert_eq!(batch.stats.sets, 2);
        let kinds: Vec<&str> = batch
            .labels
            .iter()
            .filter_map(|l| match l {
                Label::Set(..) => Some("set"),
                Label::SetElems(..) => Some("elems"),
                Label::Rule(_, r)
                    if r.exprs.iter().any(|e| {
                        matches!(
                            e,
                            Expr::Port {
                                ports: Ports::Set(_),
                                ..
                            }
                        )
                    }) =>
                {
                    Some("rule")
                }
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["set", "elems", "rule", "set", "elems", "rule"]);
    }

    #[test]
    fn answers_decide_the_outcome() {
        let rs = basic();
        assert!(outcome(&rs, &[(20, 0)]).is_ok());
        assert!(matches!(
            outcome(&rs, &[]),
            Err(NftError::NoAnswer { messages: 21 })
        ));
        // A rule refused in the middle: named by its text; the ACK of the last message does not save it.
        let err = outcome(&rs, &[(12, -libc::ENOENT), (20, 0)]).unwrap_err();
        assert!(
            matches!(
                err,
                NftError::Refused {
                    errno: Errno::ENOENT,
                    others: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("nftables: the kernel refused rule \"add rule inet istio-proxy-nat "),
            "{msg}"
        );
        assert!(
            msg.ends_with(": ENOENT: No such file or directory"),
            "{msg}"
        );
        let err = outcome(&rs, &[(5, -libc::EINVAL), (9, -libc::EINVAL), (20, 0)]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("chain inet istio-proxy-nat istio-inbound: EINVAL")
                && msg.ends_with("(and 1 more messages of the batch)"),
            "{msg}"
        );
    }

    #[test]
    fn a_kernel_without_nf_tables_is_named() {
        let rs = basic();
        for (seq, errno) in [(1, libc::EOPNOTSUPP), (2, libc::EAFNOSUPPORT)] {
            let err = outcome(&rs, &[(seq, -errno)]).unwrap_err();
            assert!(matches!(err, NftError::Unsupported { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .starts_with("nftables: the kernel has no nf_tables support"),
                "{err}"
            );
        }
        // The table dump before any batch: a kernel with netfilter netlink but no nf_tables answers EINVAL.
        for errno in [Errno::EINVAL, Errno::EOPNOTSUPP] {
            let err = table_dump_refused(errno);
            assert!(matches!(err, NftError::Unsupported { .. }), "{err:?}");
            assert!(
                err.to_string().starts_with(
                    "nftables: the kernel has no nf_tables support (nf_tables table dump: E"
                ),
                "{err}"
            );
        }
        let err = table_dump_refused(Errno::EPERM);
        assert_eq!(
            err.to_string(),
            "nftables: the kernel refused the table dump: EPERM: Operation not permitted"
        );
        // A commit refused as a whole (answered on the batch's first message) with another errno is a refusal.
        let err = outcome(&rs, &[(1, -libc::ENOMEM), (20, 0)]).unwrap_err();
        assert!(
            matches!(
                err,
                NftError::Refused {
                    errno: Errno::ENOMEM,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
