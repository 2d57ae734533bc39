//! A private mount namespace for the calling (netns) thread, so the iptables children it spawns
//! - never make name-service lookups: `-m owner --uid-owner 1337` makes iptables call getpwnam(), which follows
//!   /etc/nsswitch.conf and may go to the network (LDAP, sssd...) from a half-configured pod netns. /dev/null is
//!   bind-mounted over /etc/nsswitch.conf, as Istio does; our uids are numeric, nothing needs a lookup;
//! - never queue behind kube-proxy on the node's /run/xtables.lock: iptables ≥ 1.8.6 honours `XTABLES_LOCKFILE`
//!   (set by the caller to the pod's own lock, its netns file: [`crate::apply::IptablesEnv`]), and for older ones
//!   the same file is bind-mounted over /run/xtables.lock.
//!
//! Why on the thread rather than in each child (`pre_exec`): the setup is done once per ADD instead of once per
//! iptables process (copying a busy node's mount table is not free), and it runs as ordinary Rust code rather than
//! in the restricted context between fork and exec. The thread is the dedicated netns thread of
//! [`crate::netns::Netns::run`], which runs nothing else and dies afterwards, taking the namespace with it; or,
//! in the plugin, its own thread, which keeps the namespace until the process exits a moment later (only its
//! output and its log lines for the agent are left to write then, neither through the hidden files).
//! `unshare(CLONE_NEWNS)` also unshares the thread's filesystem attributes (CLONE_FS), which Linux allows for one
//! thread of a multi-threaded process.
//!
//! The host's mount table is never touched: nothing is mounted unless the thread verifiably sits in a new mount
//! namespace (its /proc/thread-self/ns/mnt changed) whose root was made private (or slave, where seccomp or an
//! LSM forbids private, as Istio does) so nothing propagates back. When a step fails we log and carry on without
//! it, as Istio does: a node whose policy forbids mounts still gets its pods programmed.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;

const NSSWITCH: &str = "/etc/nsswitch.conf";
const XTABLES_LOCK: &str = "/run/xtables.lock";
const THREAD_MNT_NS: &str = "/proc/thread-self/ns/mnt";

/// What the sandbox achieved (logged; tests look at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The thread has its own mount namespace with private/slave propagation.
    pub private: bool,
    /// /etc/nsswitch.conf is /dev/null for this thread's children.
    pub nsswitch_hidden: bool,
    /// /run/xtables.lock is the pod's lock for this thread's children.
    pub lock_redirected: bool,
    /// Why a step was skipped, if one was.
    pub note: Option<String>,
}

fn mnt_ns_ino() -> Option<u64> {
    nix::sys::stat::stat(THREAD_MNT_NS).ok().map(|s| s.st_ino)
}

/// Gives the calling thread a private mount namespace and hides what iptables must not use. Only call this on a
/// dedicated thread that dies afterwards (the netns thread), or on a thread of a process that exits afterwards
/// (the plugin, [`crate::apply::Worker::CallingThreadThenExit`]): the thread keeps the namespace.
pub fn enter(lockfile: Option<&Path>) -> Sandbox {
    let mut sb = Sandbox {
        private: false,
        nsswitch_hidden: false,
        lock_redirected: false,
        note: None,
    };
    let before = mnt_ns_ino();
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNS) {
        sb.note = Some(format!("unshare(CLONE_NEWNS) failed: {e}"));
        tracing::warn!(error = %e, "cannot create a private mount namespace for iptables; running without it");
        return sb;
    }
    let after = mnt_ns_ino();
    if before.is_none() || before == after {
        sb.note = Some(format!(
            "mount namespace unchanged after unshare ({before:?} -> {after:?}); not mounting anything"
        ));
        tracing::warn!(
            ?before,
            ?after,
            "mount namespace did not change; running iptables without a sandbox"
        );
        return sb;
    }
    let none: Option<&str> = None;
    let private = mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none);
    if let Err(e_private) = private {
        if let Err(e_slave) = mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none) {
            sb.note = Some(format!(
                "cannot make / private ({e_private}) nor slave ({e_slave}); not mounting anything"
            ));
            tracing::warn!(%e_private, %e_slave, "cannot isolate the mount namespace; running iptables without a sandbox");
            return sb;
        }
    }
    sb.private = true;
    if Path::new(NSSWITCH).exists() {
        match mount(Some("/dev/null"), NSSWITCH, none, MsFlags::MS_BIND, none) {
            Ok(()) => sb.nsswitch_hidden = true,
            Err(e) => {
                tracing::warn!(error = %e, path = NSSWITCH, "cannot hide nsswitch.conf from iptables");
                sb.note = Some(format!("bind mount over {NSSWITCH} failed: {e}"));
            }
        }
    }
    if let Some(lock) = lockfile {
        sb.redirect_lock(lock);
    }
    tracing::debug!(?sb, "iptables sandbox");
    sb
}

impl Sandbox {
    /// Bind-mounts the pod's lock `lock` over /run/xtables.lock for this thread's children, when the thread's
    /// mount namespace is private (else nothing is mounted) and the node has that file. Also after [`enter`]:
    /// the legacy tools' lock is redirected only when one is about to run.
    pub fn redirect_lock(&mut self, lock: &Path) {
        if !self.private || !Path::new(XTABLES_LOCK).is_file() {
            return;
        }
        let none: Option<&str> = None;
        match mount(Some(lock), XTABLES_LOCK, none, MsFlags::MS_BIND, none) {
            Ok(()) => self.lock_redirected = true,
            Err(e) => {
                tracing::warn!(error = %e, path = XTABLES_LOCK, lock = %lock.display(), "cannot redirect the xtables lock");
                self.note = Some(format!("bind mount over {XTABLES_LOCK} failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_nsswitch() -> Option<String> {
        std::fs::read_to_string(NSSWITCH).ok()
    }

    #[test]
    fn sandbox_hides_nsswitch_for_the_thread_only() {
        let host_before = host_nsswitch();
        let host_mnt = mnt_ns_ino();
        let (sb, inside, inside_mnt) = std::thread::spawn(|| {
            let sb = enter(None);
            (sb, std::fs::read_to_string(NSSWITCH).ok(), mnt_ns_ino())
        })
        .join()
        .unwrap();
        assert!(sb.private, "{sb:?}");
        assert_ne!(inside_mnt, host_mnt);
        if host_before.is_some() {
            assert!(sb.nsswitch_hidden, "{sb:?}");
            assert_eq!(inside.as_deref(), Some(""), "children see /dev/null");
        }
        // The process (and the host) still see the real file.
        assert_eq!(host_nsswitch(), host_before);
        assert_eq!(mnt_ns_ino(), host_mnt);
    }
}
