//! Pods with their own user namespace (`hostUsers: false`), for root tests: a pod netns owned by a fresh child
//! user namespace whose uids and gids 0-65535 are host 200000-265535, as a runtime sets up, joined by a veth to a
//! peer netns like [`PodNet`]'s.
//!
//! How it is made: a short-lived holder process unshares a user namespace and a netns together (the netns is
//! then owned by the new user namespace), the test writes its uid/gid maps (as root in the host's user namespace,
//! as a runtime does; `setgroups` stays allowed), pins the netns under /run/netns (`ip netns attach`) and kills
//! the holder. The pinned netns keeps its user namespace alive (a netns holds a reference to its owner), and the
//! owner is found again from the netns itself (`NS_GET_USERNS`), as the plugin finds it: nothing else is pinned.
//! The netns is deleted when dropped (by [`TestNetns`]), also while unwinding; the holder is killed and reaped
//! by its own pid even when a step in between fails.
//!
//! The traffic probes (`meshcni-netprobe`) join the user namespace of a netns owned by another one before they
//! enter it, as every process of such a pod runs in it: `--uid 1337` is then the pod's uid 1337 (host uid
//! 201337). [`host_uid_of`] and [`userns_of`] read a process's identity from the host's side.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use cni_plugin::netns::{Netns, NetnsId};

use crate::netns::{require_root, PodNet, TestNetns};

/// The host uid (and gid) of the pod's uid 0.
pub const HOST_ID_BASE: u32 = 200_000;
/// How many ids the pod's user namespace maps (Kubernetes gives each pod 65536).
pub const ID_COUNT: u32 = 65_536;

/// The host uid of a pod uid.
pub fn host_id(pod_id: u32) -> u32 {
    assert!(pod_id < ID_COUNT, "pod id {pod_id} is not mapped");
    HOST_ID_BASE + pod_id
}

/// A process that sits in a new user namespace and a new netns it owns, until killed (by its pid) on drop.
struct Holder {
    child: Child,
}

impl Holder {
    fn start() -> Holder {
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: unshare is a plain syscall (async-signal-safe); nothing is allocated in the child. A netns
        // unshared together with a user namespace is owned by the new user namespace.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a process in a new user namespace: {e}"));
        Holder { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn map_ids(&self) {
        let map = format!("0 {HOST_ID_BASE} {ID_COUNT}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", self.pid());
            std::fs::write(&path, &map).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod netns owned by its own user namespace, pinned under /run/netns; deleted on drop.
#[derive(Debug)]
pub struct UsernsNetns {
    netns: TestNetns,
    userns: NetnsId,
}

impl UsernsNetns {
    /// A fresh netns named `mcni-<tag>-<pid>-<n>`, owned by a fresh user namespace mapping 0-65535 to
    /// [`HOST_ID_BASE`].., with lo up.
    pub fn new(tag: &str) -> UsernsNetns {
        require_root();
        let holder = Holder::start();
        holder.map_ids();
        let userns = ns_id(&format!("/proc/{}/ns/user", holder.pid()));
        let netns = TestNetns::attach(tag, holder.pid());
        drop(holder);
        let owner = Netns::open(netns.path())
            .and_then(|n| n.owner_userns())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("{} is owned by our own user namespace", netns.name()));
        assert_eq!(owner.id(), userns, "{} changed owner", netns.name());
        UsernsNetns { netns, userns }
    }

    pub fn netns(&self) -> &TestNetns {
        &self.netns
    }

    pub fn into_netns(self) -> TestNetns {
        self.netns
    }

    /// The user namespace owning the netns.
    pub fn userns(&self) -> NetnsId {
        self.userns
    }
}

/// A [`PodNet`] whose pod netns is owned by its own user namespace (the peer stays in the host's).
#[derive(Debug)]
pub struct UsernsPodNet {
    pub net: PodNet,
    userns: NetnsId,
}

impl UsernsPodNet {
    /// Addresses and routes as [`PodNet::new`] gives them.
    pub fn new(tag: &str, v6: bool) -> UsernsPodNet {
        let pod = UsernsNetns::new(&format!("{tag}-upod"));
        let userns = pod.userns();
        UsernsPodNet {
            net: PodNet::with_pod(pod.into_netns(), tag, v6),
            userns,
        }
    }

    /// The user namespace owning the pod netns.
    pub fn userns(&self) -> NetnsId {
        self.userns
    }
}

/// Device and inode of a namespace file (`/proc/PID/ns/user`, ...).
pub fn ns_id(path: &str) -> NetnsId {
    let st = nix::sys::stat::stat(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    NetnsId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// The user namespace of process `pid`.
pub fn userns_of(pid: u32) -> NetnsId {
    ns_id(&format!("/proc/{pid}/ns/user"))
}

/// The real, effective, saved and filesystem uids of process `pid` as the host sees them.
pub fn host_uid_of(pid: u32) -> [u32; 4] {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_else(|| panic!("no Uid line in {path}"));
    let ids: Vec<u32> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{path}: {v}: {e}")))
        .collect();
    ids.try_into()
        .unwrap_or_else(|v| panic!("{path}: unexpected Uid line {v:?}"))
}
