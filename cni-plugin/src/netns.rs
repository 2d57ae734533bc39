//! Entering a network namespace, closure style, on a dedicated thread; netns identity; the host guard.
//!
//! `setns(CLONE_NEWNET)` moves only the calling thread. [`Netns::run`] therefore starts a fresh thread, moves that
//! thread into the netns, runs the closure there and lets the thread die: the caller's thread never changes netns,
//! and nothing else ever runs on a thread left in a pod's netns. Children spawned from inside the closure
//! (`iptables-restore`) and netlink sockets opened there belong to the pod's netns.
//!
//! A netns may be owned by another user namespace than ours (a pod with `hostUsers: false`):
//! [`Netns::owner_userns`] finds it. Joining it is not done here (it needs a single-threaded caller): the tools
//! that must run inside it join it between fork and exec (`crate::apply::exec::spawn_in_userns`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// The host's network namespace, as seen by the plugin (which runs in the host's pid namespace).
pub const HOST_NETNS_PATH: &str = "/proc/1/ns/net";
/// The network namespace of the calling thread.
pub const THREAD_NETNS_PATH: &str = "/proc/thread-self/ns/net";
/// The network namespace of this process (its main thread). The plugin is started by the runtime in the host's
/// netns, so this is the host's too; it stays readable where /proc/1 is not (sandboxed or hardened hosts).
pub const PROCESS_NETNS_PATH: &str = "/proc/self/ns/net";

/// The user namespace of this process. Unlike the netns, it is the same for every thread: a process can join
/// another one only while it is single-threaded.
pub const PROCESS_USERNS_PATH: &str = "/proc/self/ns/user";

/// `NS_GET_USERNS` from `<linux/nsfs.h>`: `_IO(0xb7, 0x1)`. Returns a new fd (O_CLOEXEC) of the user namespace
/// owning the namespace the fd names.
const NS_GET_USERNS: libc::Ioctl = 0xb701;
/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace: {reason}")]
    NotNetns { path: PathBuf, reason: String },
    #[error("cannot read the identity of network namespace {path}: {source}")]
    Stat { path: PathBuf, source: nix::Error },
    #[error(
        "refusing to program network namespace {path}: it is the host's own network namespace ({host}); \
         a hostNetwork pod or a runtime bug must never redirect the node's traffic"
    )]
    HostNetns { path: PathBuf, host: &'static str },
    #[error("cannot start a thread to enter network namespace {path}: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: setns: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("cannot create a scratch network namespace: unshare(CLONE_NEWNET): {source}")]
    Unshare { source: nix::Error },
    #[error(
        "entered network namespace {path} but the thread is in {found:?} instead of {expected:?}"
    )]
    Verify {
        path: PathBuf,
        expected: NetnsId,
        found: NetnsId,
    },
    #[error("cannot tell which user namespace owns network namespace {path}: {step}: {source}")]
    OwnerUserns {
        path: PathBuf,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("the work inside network namespace {path} panicked: {message}")]
    Panicked { path: PathBuf, message: String },
}

/// Identity of a namespace: device and inode of its nsfs file. Two paths (a bind mount under /run/netns, a
/// /proc/PID/ns/net link) name the same netns exactly when their identities are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}] (dev {})", self.ino, self.dev)
    }
}

/// An open user namespace (from [`Netns::owner_userns`]): the fd pins it. Its identity is kept for logs.
#[derive(Debug)]
pub struct Userns {
    fd: OwnedFd,
    id: NetnsId,
}

impl Userns {
    /// Device and inode of the user namespace (the same as `stat -L /proc/PID/ns/user` of its processes).
    pub fn id(&self) -> NetnsId {
        self.id
    }
}

impl AsFd for Userns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::fmt::Display for Userns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user:[{}] (dev {})", self.id.ino, self.id.dev)
    }
}

/// An open network namespace. Holding it keeps the namespace alive (the fd pins it) while we work.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    id: NetnsId,
}

impl Netns {
    /// Opens a network namespace file (a bind mount such as `/var/run/netns/cni-...`, or `/proc/PID/ns/net`) and
    /// checks that it really is a network namespace. A vanished namespace or a path that is not one is an error
    /// naming the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let fs = fstatfs(file.as_fd()).map_err(|source| NetnsError::Stat {
            path: path.clone(),
            source,
        })?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path,
                reason: format!(
                    "it is not on nsfs (filesystem magic {:#x}); the namespace may have been deleted",
                    fs.filesystem_type().0
                ),
            });
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which is open for the whole call.
        let nstype = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE) };
        if nstype < 0 {
            return Err(NetnsError::NotNetns {
                path,
                reason: format!("NS_GET_NSTYPE failed: {}", std::io::Error::last_os_error()),
            });
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path,
                reason: format!("it is a namespace of another type (CLONE flag {nstype:#x})"),
            });
        }
        let id = id_of(&file, &path)?;
        Ok(Netns { file, path, id })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Netns::open(THREAD_NETNS_PATH)
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Is this the host's own network namespace? Compares (dev, inode) with `/proc/1/ns/net` and with this
    /// process's own netns (the runtime runs the plugin in the host's netns; a pod's netns is never ours).
    /// Where /proc/1 may not be inspected (EACCES/EPERM, e.g. a hardened or sandboxed init), the process's own
    /// netns is the reference; any other failure to read either is an error.
    ///
    /// Only identities are compared, so the references are `stat`ed, not opened: `/proc/PID/ns/net` always
    /// names a network namespace, and `self` was checked to be one when it was opened.
    pub fn is_host(&self) -> Result<bool, NetnsError> {
        if id_at(Path::new(PROCESS_NETNS_PATH))? == self.id {
            return Ok(true);
        }
        match id_at(Path::new(HOST_NETNS_PATH)) {
            Ok(host) => Ok(host == self.id),
            Err(NetnsError::Stat { source, .. })
                if matches!(source, nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) =>
            {
                tracing::debug!(path = HOST_NETNS_PATH, error = %source, "cannot inspect init's netns; comparing with our own only");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Fails with [`NetnsError::HostNetns`] when this is the host's network namespace.
    pub fn ensure_not_host(&self) -> Result<(), NetnsError> {
        if self.is_host()? {
            return Err(NetnsError::HostNetns {
                path: self.path.clone(),
                host: HOST_NETNS_PATH,
            });
        }
        Ok(())
    }

    /// The user namespace owning this network namespace, when it is not our own (`None`: ours, the usual case).
    ///
    /// A pod with `hostUsers: false` has its netns owned by a child user namespace mapping the pod's uids
    /// (0-65535) to host uids. The kernel then refuses iptables owner matches (`xt_owner`) written from any other
    /// user namespace (EINVAL: `RULE_APPEND failed (Invalid argument)`), and interprets the uids of rules written
    /// from inside it as the pod's: the iptables tools must run in it ([`crate::apply::exec::spawn_in_userns`]).
    ///
    /// Compares (dev, inode) of the owner (ioctl `NS_GET_USERNS` on the netns fd) with [`PROCESS_USERNS_PATH`]. A
    /// kernel without `NS_GET_USERNS` (ENOTTY, before Linux 4.9, long before Kubernetes could run pods in user
    /// namespaces) is taken as "ours", as Istio does when the ioctl fails.
    pub fn owner_userns(&self) -> Result<Option<Userns>, NetnsError> {
        let fail = |step, source| NetnsError::OwnerUserns {
            path: self.path.clone(),
            step,
            source,
        };
        // SAFETY: NS_GET_USERNS takes no argument; the fd is open for the whole call.
        let raw = unsafe { libc::ioctl(self.file.as_raw_fd(), NS_GET_USERNS) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTTY) {
                tracing::debug!(path = %self.path.display(), "NS_GET_USERNS not supported; assuming our own user namespace");
                return Ok(None);
            }
            return Err(fail("ioctl NS_GET_USERNS", e));
        }
        // SAFETY: the kernel just returned this new fd to us; nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let st = nix::sys::stat::fstat(fd.as_fd())
            .map_err(|e| fail("fstat of the owning user namespace", e.into()))?;
        let owner = NetnsId::from(st);
        let own = nix::sys::stat::stat(PROCESS_USERNS_PATH)
            .map_err(|e| fail("stat /proc/self/ns/user", e.into()))?;
        if (own.st_dev, own.st_ino) == (owner.dev, owner.ino) {
            return Ok(None);
        }
        Ok(Some(Userns { fd, id: owner }))
    }

    /// Moves the calling thread into this network namespace and checks that it is there (belt and braces: the
    /// thread must now be in exactly this namespace). Err when the `setns` failed (the thread did not move) and
    /// when the check did (the thread may have moved).
    fn enter(&self) -> Result<(), NetnsError> {
        nix::sched::setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetnsError::Setns {
                path: self.path.clone(),
                source,
            }
        })?;
        let here = id_at(Path::new(THREAD_NETNS_PATH))?;
        if here != self.id {
            return Err(NetnsError::Verify {
                path: self.path.clone(),
                expected: self.id,
                found: here,
            });
        }
        Ok(())
    }

    /// Runs `f` on the calling thread inside this network namespace, then returns the thread to the netns it was
    /// in, and returns `f`'s value: no thread to start and hand over to, for work that needs nothing but the netns
    /// (netlink sockets). The caller must not start threads or runtimes in `f` that outlive it (they would stay in
    /// this netns), nor change its mount namespace unless the process exits afterwards (the iptables tools'
    /// sandbox: [`crate::apply::Worker`]). A panic in
    /// `f` becomes [`NetnsError::Panicked`] after the thread is back. Should the way back fail, which needs a kernel
    /// that refuses a namespace it just left, the process aborts: it must not go on in the pod's netns.
    pub fn run_here<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        // The way back: the calling thread's own netns, which needs no checking.
        let home = File::open(THREAD_NETNS_PATH).map_err(|source| NetnsError::Open {
            path: PathBuf::from(THREAD_NETNS_PATH),
            source,
        })?;
        let result = self
            .enter()
            .map(|()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        if let Err(e) = nix::sched::setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(netns = %self.path.display(), error = %e, "cannot return to our own network namespace; aborting");
            std::process::abort();
        }
        match result? {
            Ok(value) => Ok(value),
            Err(payload) => Err(NetnsError::Panicked {
                path: self.path.clone(),
                message: crate::panic_message(payload.as_ref()),
            }),
        }
    }

    /// Runs `f` on a dedicated fresh thread that entered this network namespace, and returns its value. The
    /// caller's thread never changes namespace; the thread dies after `f`. A panic in `f` becomes
    /// [`NetnsError::Panicked`].
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let name = format!("netns-{}", self.id.ino);
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn_scoped(scope, || -> Result<T, NetnsError> {
                    self.enter()?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(payload) => Err(NetnsError::Panicked {
                    path: self.path.clone(),
                    message: crate::panic_message(payload.as_ref()),
                }),
            }
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<nix::sys::stat::FileStat> for NetnsId {
    fn from(st: nix::sys::stat::FileStat) -> Self {
        NetnsId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

fn stat_failed(path: &Path) -> impl FnOnce(nix::Error) -> NetnsError + '_ {
    move |source| NetnsError::Stat {
        path: path.to_path_buf(),
        source,
    }
}

/// The identity of the namespace at `path` (a `/proc/PID/ns/net` link, followed), without opening it.
fn id_at(path: &Path) -> Result<NetnsId, NetnsError> {
    Ok(nix::sys::stat::stat(path)
        .map_err(stat_failed(path))?
        .into())
}

fn id_of(file: &File, path: &Path) -> Result<NetnsId, NetnsError> {
    Ok(nix::sys::stat::fstat(file.as_fd())
        .map_err(stat_failed(path))?
        .into())
}

/// Runs `f` on a dedicated fresh thread inside a brand-new, empty network namespace (unshare), which disappears
/// with the thread. Used to let the kernel and the iptables binaries canonicalise a ruleset without touching any
/// real namespace.
pub fn run_in_scratch_netns<T, F>(f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = PathBuf::from("<scratch netns>");
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netns-scratch".into())
            .spawn_scoped(scope, || -> Result<T, NetnsError> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Unshare { source })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Thread {
                path: path.clone(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(payload) => Err(NetnsError::Panicked {
                path: path.clone(),
                message: crate::panic_message(payload.as_ref()),
            }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_path_names_it() {
        let err = Netns::open("/nonexistent/meshcni/netns").unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/meshcni/netns"),
            "{err}"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        assert!(err.to_string().contains("/proc/self/status"), "{err}");
    }

    #[test]
    fn another_namespace_type_is_not_a_netns() {
        let err = Netns::open("/proc/self/ns/uts").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
    }

    #[test]
    fn host_netns_is_recognised_and_refused() {
        // The unit tests run in the host's netns: our own netns is the host's.
        let own = Netns::open(PROCESS_NETNS_PATH).unwrap();
        assert!(own.is_host().unwrap());
        let err = own.ensure_not_host().unwrap_err();
        assert!(matches!(err, NetnsError::HostNetns { .. }), "{err}");
        assert!(err.to_string().contains(PROCESS_NETNS_PATH), "{err}");
        // The same netns through another path has the same identity, and is refused too.
        let thread = Netns::open(THREAD_NETNS_PATH).unwrap();
        assert_eq!(thread.id(), own.id());
        assert!(thread.ensure_not_host().is_err());
        // /proc/1/ns/net is refused either as the host's netns or because it cannot even be opened.
        match Netns::open(HOST_NETNS_PATH) {
            Ok(init) => assert!(init.ensure_not_host().is_err()),
            Err(e) => assert!(matches!(e, NetnsError::Open { .. }), "{e}"),
        }
    }

    #[test]
    fn a_scratch_netns_is_not_the_host() {
        let not_host =
            run_in_scratch_netns(|| Netns::current().unwrap().is_host().unwrap()).unwrap();
        assert!(!not_host);
    }

    #[test]
    fn run_returns_the_value_and_leaves_the_caller_in_place() {
        let before = Netns::current().unwrap().id();
        let here = Netns::open("/proc/self/ns/net").unwrap();
        let inner = here.run(|| Netns::current().unwrap().id()).unwrap();
        assert_eq!(inner, here.id());
        assert_eq!(Netns::current().unwrap().id(), before);
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let here = Netns::open("/proc/self/ns/net").unwrap();
        let err = here.run(|| -> u32 { panic!("boom in netns") }).unwrap_err();
        match err {
            NetnsError::Panicked { message, .. } => assert!(message.contains("boom in netns")),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn run_here_enters_the_netns_and_comes_back() {
        // A scratch netns kept alive by its open fd after its thread is gone.
        let other = run_in_scratch_netns(|| Netns::current().unwrap()).unwrap();
        let before = Netns::current().unwrap().id();
        assert_ne!(other.id(), before);
        let inner = other.run_here(|| Netns::current().unwrap().id()).unwrap();
        assert_eq!(inner, other.id());
        assert_eq!(Netns::current().unwrap().id(), before);

        let err = other
            .run_here(|| -> u32 { panic!("boom on the calling thread") })
            .unwrap_err();
        assert!(
            matches!(&err, NetnsError::Panicked { message, .. } if message.contains("boom on the calling thread")),
            "{err}"
        );
        assert_eq!(
            Netns::current().unwrap().id(),
            before,
            "back after a panic too"
        );
    }

    #[test]
    fn scratch_netns_is_a_different_one() {
        let before = Netns::current().unwrap().id();
        let inner = run_in_scratch_netns(|| Netns::current().unwrap().id()).unwrap();
        assert_ne!(inner, before);
        assert_eq!(Netns::current().unwrap().id(), before);
    }

    #[test]
    fn our_own_and_a_scratch_netns_are_owned_by_our_userns() {
        let own = Netns::open(PROCESS_NETNS_PATH).unwrap();
        assert!(own.owner_userns().unwrap().is_none());
        let scratch =
            run_in_scratch_netns(|| Netns::current().unwrap().owner_userns().unwrap().is_none());
        assert!(scratch.unwrap());
    }
}
