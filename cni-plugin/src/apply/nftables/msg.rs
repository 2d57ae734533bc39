//! The nf_tables netlink message layer: netlink headers, `nfgenmsg`, attributes and nests, written into one
//! growing buffer (one batch, one `sendmsg`), and the parsing of the kernel's answers.
//!
//! Constants carry the kernel's names (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
//! `linux/netfilter/nf_tables.h`); netlink integers are host-endian in headers, big-endian in nf_tables
//! attributes (`NLA_BE32`), except where a value is data compared with a register (see `expr.rs`).

/// `NETLINK_NETFILTER`, the protocol of the socket.
pub(super) const NETLINK_NETFILTER: isize = 12;

pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_APPEND: u16 = 0x800;

pub(super) const NLMSG_ERROR: u16 = 0x2;
pub(super) const NLMSG_DONE: u16 = 0x3;
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;

/// `NFNL_MSG_BATCH_BEGIN` / `NFNL_MSG_BATCH_END` (`NLMSG_MIN_TYPE` and the next).
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nf_tables message type, the `res_id` of a batch.
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// `enum nf_tables_msg_types`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(super) enum NftMsg {
    NewTable = 0,
    GetTable = 1,
    DelTable = 2,
    NewChain = 3,
    NewRule = 6,
    DelRule = 8,
    NewSet = 9,
    NewSetElem = 12,
}

/// `NFPROTO_UNSPEC`, `NFPROTO_INET`
pub(super) const NFPROTO_UNSPEC: u8 = 0;
pub(super) const NFPROTO_INET: u8 = 1;

/// Aligns to 4 bytes (`NLMSG_ALIGN`, `NLA_ALIGN`).
const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink request being written: messages appended one after the other into one buffer.
#[derive(Debug, Default)]
pub(super) struct MsgBuf {
    buf: Vec<u8>,
    /// Offset of the message being written.
    msg_start: usize,
    seq: u32,
}

impl MsgBuf {
    pub(super) fn with_capacity(bytes: usize) -> Self {
        MsgBuf {
            buf: Vec::with_capacity(bytes),
            msg_start: 0,
            seq: 0,
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Starts a message (header + `nfgenmsg`); returns its sequence number (1, 2, ...).
    pub(super) fn begin(&mut self, msg_type: u16, flags: u16, family: u8, res_id: u16) -> u32 {
        self.seq += 1;
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by end()
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
                                                         // struct nfgenmsg { u8 nfgen_family; u8 version; __be16 res_id; }
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.seq
    }

    /// Starts an nf_tables message of family `inet`.
    pub(super) fn begin_nft(&mut self, msg: NftMsg, flags: u16) -> u32 {
        self.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | msg as u16,
            flags,
            NFPROTO_INET,
            0,
        )
    }

    /// Ends the current message: writes its length.
    pub(super) fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Adds flags to the last message begun (e.g. `NLM_F_ACK` on the last message of a batch).
    pub(super) fn add_flags_to_last(&mut self, flags: u16) {
        let at = self.msg_start + 6;
        if let Some(field) = self.buf.get_mut(at..at + 2) {
            let old = u16::from_ne_bytes([field[0], field[1]]);
            field.copy_from_slice(&(old | flags).to_ne_bytes());
        }
    }

    /// An attribute with raw data, padded to 4 bytes.
    pub(super) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A big-endian u32 attribute (`NLA_BE32`).
    pub(super) fn attr_be32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_be_bytes());
    }

    /// A NUL-terminated string attribute (`NLA_STRING`, `NLA_NUL_STRING`).
    pub(super) fn attr_str(&mut self, ty: u16, s: &str) {
        let len = (NLA_HDRLEN + s.len() + 1) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Opens a nested attribute; close it with [`Self::nest_end`].
    pub(super) fn nest_start(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub(super) fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

/// One message of a kernel answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Answer<'a> {
    pub msg_type: u16,
    pub seq: u32,
    /// The payload after the netlink header.
    pub payload: &'a [u8],
}

impl Answer<'_> {
    /// The errno of an `NLMSG_ERROR` (0 for an ACK); `None` for other messages or a short one.
    pub(super) fn error(&self) -> Option<i32> {
        if self.msg_type != NLMSG_ERROR {
            return None;
        }
        let raw: [u8; 4] = self.payload.get(..4)?.try_into().ok()?;
        Some(-i32::from_ne_bytes(raw))
    }
}

/// The messages of one datagram from the kernel.
pub(super) fn answers(datagram: &[u8]) -> impl Iterator<Item = Result<Answer<'_>, String>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let header = match rest.get(..NLMSG_HDRLEN) {
            Some(h) => h,
            None => {
                let err = format!("{} bytes left, shorter than a netlink header", rest.len());
                rest = &[];
                return Some(Err(err));
            }
        };
        let u32_at =
            |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let len = u32_at(0) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            let err = format!("message length {len} with {} bytes left", rest.len());
            rest = &[];
            return Some(Err(err));
        }
        let answer = Answer {
            msg_type: u16::from_ne_bytes([header[4], header[5]]),
            seq: u32_at(8),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get(align(len)..).unwrap_or(&[]);
        Some(Ok(answer))
    })
}

/// The attributes of a payload (after its fixed header), as `(type without flags, data)`.
pub(super) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes([*data.first()?, *data.get(1)?]) as usize;
        let ty = u16::from_ne_bytes([*data.get(2)?, *data.get(3)?]) & !(NLA_F_NESTED | 0x4000);
        if len < NLA_HDRLEN || len > data.len() {
            return None;
        }
        let value = &data[NLA_HDRLEN..len];
        data = data.get(align(len)..).unwrap_or(&[]);
        Some((ty, value))
    })
}

/// A datagram of `NLMSG_ERROR` answers `(seq, -errno or 0)`, as the kernel sends them with `NETLINK_CAP_ACK`.
#[cfg(test)]
pub(super) fn error_datagram(answers: &[(u32, i32)]) -> Vec<u8> {
    let mut d = Vec::new();
    for &(seq, err) in answers {
        d.extend_from_slice(&36u32.to_ne_bytes());
        d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        d.extend_from_slice(&0u16.to_ne_bytes());
        d.extend_from_slice(&seq.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&err.to_ne_bytes());
        d.extend_from_slice(&[0; 16]);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_are_aligned_and_measured() {
        let mut m = MsgBuf::default();
        let seq = m.begin_nft(NftMsg::NewTable, NLM_F_REQUEST);
        assert_eq!(seq, 1);
        m.attr_str(1, "nat");
        let nest = m.nest_start(4);
        m.attr_be32(1, 3);
        m.nest_end(nest);
        m.end();
        let b = m.as_bytes();
        // header 16 + nfgenmsg 4 + "nat\0" attr 8 + nest 4 + be32 attr 8
        assert_eq!(b.len(), 40);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x0a00);
        assert_eq!(&b[16..20], &[1, 0, 0, 0]);
        assert_eq!(&b[20..28], &[8, 0, 1, 0, b'n', b'a', b't', 0]);
        assert_eq!(&b[28..32], &[12, 0, 4, 0x80]);
        assert_eq!(&b[32..40], &[8, 0, 1, 0, 0, 0, 0, 3]);
        let parsed: Vec<_> = answers(b).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].seq, 1);
        let a: Vec<_> = attrs(&parsed[0].payload[4..]).collect();
        assert_eq!(a[0], (1, &b"nat\0"[..]));
        assert_eq!(a[1].0, 4);
        assert_eq!(attrs(a[1].1).collect::<Vec<_>>(), [(1, &[0, 0, 0, 3][..])]);
    }

    #[test]
    fn odd_sized_data_is_padded() {
        let mut m = MsgBuf::default();
        m.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        m.attr(2, &[6]);
        m.end();
        let b = m.as_bytes();
        assert_eq!(&b[16..20], &[0, 0, 0, 10]);
        assert_eq!(&b[20..28], &[5, 0, 2, 0, 6, 0, 0, 0]);
    }

    #[test]
    fn kernel_errors_are_read() {
        // NLMSG_ERROR for seq 7 with -ENOENT, then an ACK (0) for seq 8.
        let d = error_datagram(&[(7, -2), (8, 0)]);
        let got: Vec<(u32, Option<i32>)> = answers(&d)
            .map(|a| a.map(|a| (a.seq, a.error())).unwrap())
            .collect();
        assert_eq!(got, [(7, Some(2)), (8, Some(0))]);
        assert!(answers(&d[..20]).next().unwrap().is_err());
    }
}
