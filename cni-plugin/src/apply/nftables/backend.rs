//! The native nftables backend behind [`crate::apply::Backend`]: renders Istio's nftables ruleset from the typed
//! capture (`rules::nftables::render`) and programs it in one transaction ([`super::apply`]); removes Istio's
//! tables in one transaction. Runs no program, needs no sandbox and no lock file, and no user-namespace switch:
//! `meta skuid/skgid` written from the host's user namespace are mapped by the kernel through the netns's owner,
//! so they mean the pod's own uids.

use nix::errno::Errno;

use super::msg::{
    answers, MsgBuf, NftMsg, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES,
    NFPROTO_UNSPEC, NLM_F_ACK, NLM_F_REQUEST,
};
use super::{classify, NftError, Session, NFTA_TABLE_NAME};
use crate::apply::{Applied, ApplyError, Backend, BackendKind, Capture, FamilyOutcome};
use crate::rules::nftables::{render, NftTable};

/// Native nftables over netfilter netlink.
#[derive(Debug, Default)]
pub struct NativeNftables;

impl Backend for NativeNftables {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }

    fn apply(&self, capture: &Capture) -> Result<Applied, ApplyError> {
        let ruleset = render(&capture.config);
        // Ours already there are deleted in the same transaction that creates the new ones: nothing of an earlier,
        // different capture stays (a table or chain the new one lacks), and there is no moment without rules.
        let mut session = Session::open()?;
        let before = session.programmed_tables()?;
        let sent = session.apply_replacing(&ruleset, &before)?;
        tracing::debug!(?sent, replaced = ?before, "nftables batch applied");
        let outcome = if before.is_empty() {
            FamilyOutcome::Applied
        } else {
            FamilyOutcome::Replaced
        };
        Ok(Applied {
            v4: outcome,
            v6: capture.config.enable_ipv6.then_some(outcome),
        })
    }

    fn remove(&self, _capture: &Capture) -> Result<bool, ApplyError> {
        Ok(!remove_tables()?.is_empty())
    }
}

/// Deletes Istio's tables that exist in the calling thread's netns, in one transaction. Returns those deleted.
pub fn remove_tables() -> Result<Vec<NftTable>, NftError> {
    let mut session = Session::open()?;
    let present = session.programmed_tables()?;
    if present.is_empty() {
        return Ok(present);
    }
    let mut m = MsgBuf::with_capacity(64 * (present.len() + 2));
    m.begin(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    m.end();
    let mut last = 0;
    for t in &present {
        last = m.begin_nft(NftMsg::DelTable, NLM_F_REQUEST);
        m.attr_str(NFTA_TABLE_NAME, t.name());
        m.end();
    }
    m.add_flags_to_last(NLM_F_ACK);
    m.begin(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    m.end();
    let socket = session.socket();
    socket.send(m.as_bytes()).map_err(|source| NftError::Send {
        bytes: m.as_bytes().len(),
        source,
    })?;
    let what = || {
        let names: Vec<_> = present.iter().map(|t| t.name()).collect();
        format!("the deletion of table(s) inet {}", names.join(", "))
    };
    loop {
        let datagram = socket
            .recv(true)
            .map_err(NftError::Receive)?
            .ok_or(NftError::NoAnswer {
                messages: present.len() + 2,
            })?;
        for answer in answers(datagram) {
            let answer = answer.map_err(NftError::Malformed)?;
            match answer.error() {
                Some(0) if answer.seq == last => return Ok(present),
                Some(0) | None => {}
                Some(errno) => return Err(classify(Errno::from_raw(errno), what(), false, 0)),
            }
        }
    }
}
