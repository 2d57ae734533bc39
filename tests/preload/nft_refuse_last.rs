//! An `LD_PRELOAD` shim for the fault tests (never shipped): it wraps `sendto(2)` and, in every nf_tables batch
//! (`NFNL_MSG_BATCH_BEGIN` ... `NFNL_MSG_BATCH_END`) whose last message before the end is a `NEWRULE`, renames
//! that rule's chain (its first letter becomes `X`), so the kernel refuses exactly the batch's last message
//! (`ENOENT`: no such chain) and with it the whole transaction. Everything else passes through unchanged. When
//! `MESHCNI_PRELOAD_MARKER` names a file, each corrupted batch appends a line to it:
//! `message <index> of <count>: chain <name>`.
//!
//! Built by the tests with `rustc --crate-type cdylib` (see `meshcni_tests::preload`), loaded into the debug
//! build of `istio-cni`, which calls `sendto` through glibc.

use std::ffi::{c_char, c_int, c_void};
use std::io::Write;

type SendTo = unsafe extern "C" fn(c_int, *const c_void, usize, c_int, *const c_void, u32) -> isize;

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// `RTLD_NEXT`: the next object's definition of the symbol (glibc's).
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE`
const NEWRULE: u16 = (10 << 8) | 6;
const NFTA_RULE_CHAIN: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The (offset, length, type) of each netlink message of `buf`.
fn messages(buf: &[u8]) -> Option<Vec<(usize, usize, u16)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at)? as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return None;
        }
        out.push((at, len, u16_at(buf, at + 4)?));
        at += align4(len);
    }
    Some(out)
}

/// Renames the chain of the batch's last rule in place; the message index, the count and the old name.
fn corrupt_last_rule(buf: &mut [u8]) -> Option<(usize, usize, String)> {
    let msgs = messages(buf)?;
    let (first, last) = (msgs.first()?, msgs.last()?);
    if first.2 != NFNL_MSG_BATCH_BEGIN || last.2 != NFNL_MSG_BATCH_END || msgs.len() < 3 {
        return None;
    }
    let index = msgs.len() - 2;
    let (at, len, kind) = msgs[index];
    if kind != NEWRULE {
        return None;
    }
    let mut attr = at + NLMSG_HDRLEN + NFGENMSG_LEN;
    while attr + 4 <= at + len {
        let alen = u16_at(buf, attr)? as usize;
        let atype = u16_at(buf, attr + 2)? & 0x3fff;
        if alen < 4 {
            return None;
        }
        if atype == NFTA_RULE_CHAIN && alen > 5 {
            let name = &mut buf[attr + 4..attr + alen];
            let old = String::from_utf8_lossy(name.split(|b| *b == 0).next()?).into_owned();
            name[0] = b'X';
            return Some((index, msgs.len(), old));
        }
        attr += align4(alen);
    }
    None
}

/// # Safety
/// The `sendto(2)` contract: `buf` points at `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    len: usize,
    flags: c_int,
    addr: *const c_void,
    addrlen: u32,
) -> isize {
    let next = dlsym(RTLD_NEXT, c"sendto".as_ptr());
    if next.is_null() {
        return -1;
    }
    let real: SendTo = std::mem::transmute::<*mut c_void, SendTo>(next);
    if buf.is_null() || len == 0 {
        return real(fd, buf, len, flags, addr, addrlen);
    }
    let mut copy = std::slice::from_raw_parts(buf.cast::<u8>(), len).to_vec();
    let Some((index, count, chain)) = corrupt_last_rule(&mut copy) else {
        return real(fd, buf, len, flags, addr, addrlen);
    };
    if let Some(marker) = std::env::var_os("MESHCNI_PRELOAD_MARKER") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(marker)
        {
            let _ = writeln!(f, "message {index} of {count}: chain {chain}");
        }
    }
    real(fd, copy.as_ptr().cast(), copy.len(), flags, addr, addrlen)
}
