//! Programming one pod netns: firewall backends behind one trait (netavark style: the backend is chosen once and
//! logged by name), the routes that go with the rules, and the one entry point [`program_with`] ([`program`] for
//! long-lived callers).
//!
//! A backend takes the typed [`Capture`] (the capture configuration and its routes) and renders its own payload:
//! the iptables backends render Istio's iptables-restore text, the native nftables backend its netlink batch.
//! Text is an output of a backend, never the interface between the core and the backends.
//!
//! Everything happens inside the pod netns: for the iptables backends on a thread that also gets a private mount
//! namespace for their children ([`sandbox`]), and for the legacy tools the pod's netns file as their xtables lock
//! ([`IptablesEnv`]), either a dedicated one
//! ([`Netns::run`], [`Worker::Thread`]) or, in a process that exits afterwards (the plugin), the calling thread
//! ([`Worker::CallingThreadThenExit`]); for native nftables, which needs only netlink sockets, always the calling
//! thread, which enters and leaves the netns ([`Netns::run_here`]).
//! Nothing is applied before the whole configuration has been validated, and a failed ADD leaves no rule behind:
//! if the IPv6 restore fails after IPv4 succeeded, or the routes fail, our rules are removed again.

pub mod exec;
pub mod iptables;
pub mod nftables;
pub mod routes;
pub mod sandbox;
pub mod text;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::BackendChoice;
use crate::netns::{Netns, NetnsError, NetnsId};
use crate::redirect::Redirect;
use crate::rules::{self, CaptureConfig, RouteSetup};

pub use iptables::{Family, Flavour, IptablesRestore};
pub use routes::{addresses, Netlink, RouteError, RoutesOutcome};
pub use sandbox::Sandbox;
pub use text::TextError;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("invalid {family} ruleset: {reason}")]
    InvalidRuleset { family: Family, reason: String },
    #[error("invalid capture configuration: {0}")]
    InvalidConfig(#[from] rules::CaptureConfigError),
    #[error(transparent)]
    Nftables(#[from] nftables::NftError),
    #[error("invalid route setup: {0}")]
    InvalidRoutes(String),
    #[error("no pod IP in netns {path}: no address other than loopback and link-local (found {addrs:?})")]
    NoPodIp { path: PathBuf, addrs: Vec<IpAddr> },
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    #[error("cannot parse the output of {binary}: {error}")]
    SaveOutput { binary: String, error: TextError },
    #[error("no usable iptables: iptables-legacy: {legacy}; iptables-nft: {nft}")]
    NoUsableIptables { legacy: String, nft: String },
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error("{failed}; and removing the rules already applied failed too: {rollback}")]
    RollbackFailed {
        failed: Box<ApplyError>,
        rollback: Box<ApplyError>,
    },
    #[error(
        "{backend} is not usable in this netns: {restore}; and reading the state failed: {save}"
    )]
    Unusable {
        backend: BackendKind,
        restore: Box<ApplyError>,
        save: Box<ApplyError>,
    },
}

impl ApplyError {
    /// True when the netns itself is unusable (missing, not a netns, the host's): CNI code 102, not 103.
    pub fn is_netns(&self) -> bool {
        matches!(self, ApplyError::Netns(_))
    }

    /// True when the backend's tools failed both to load the rules and to read the state: the flavour does not
    /// work in this netns (auto mode then falls back from nft to legacy, as Istio's detection would have).
    pub fn is_unusable(&self) -> bool {
        matches!(self, ApplyError::Unusable { .. })
    }
}

/// The firewall implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    IptablesLegacy,
    IptablesNft,
    /// Native nftables over netfilter netlink: one transaction, no program run.
    Nftables,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::IptablesLegacy => "iptables-legacy",
            BackendKind::IptablesNft => "iptables-nft",
            BackendKind::Nftables => "nftables",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened to one family's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyOutcome {
    /// None of ours were there; the ruleset was applied.
    Applied,
    /// Ours were there, identical: nothing was done (the iptables backends, which compare the saved state).
    Unchanged,
    /// Ours were there: removed and replaced in one transaction. The iptables backends only do so when they
    /// differ; native nftables always does (it does not read the rules back), so for it a repeated ADD is
    /// `Replaced` too.
    Replaced,
}

/// What a backend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub v4: FamilyOutcome,
    pub v6: Option<FamilyOutcome>,
}

/// What a backend programs: the typed capture configuration and the routes that go with it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub config: CaptureConfig,
    pub routes: RouteSetup,
}

/// Routing tables the TPROXY rule must not point to: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

impl Capture {
    /// Validates the configuration (istio-iptables' own checks) and derives its routes.
    pub fn new(config: CaptureConfig) -> Result<Self, ApplyError> {
        config.validate()?;
        let routes = config.route_setup();
        if let Some(tp) = &routes.tproxy {
            if tp.mark == 0 {
                return Err(ApplyError::InvalidRoutes(
                    "TPROXY mark 0 would match every unmarked packet".into(),
                ));
            }
            if RESERVED_TABLES.contains(&tp.table) {
                return Err(ApplyError::InvalidRoutes(format!(
                    "TPROXY routing table {} is reserved (unspec/default/main/local)",
                    tp.table
                )));
            }
        }
        Ok(Capture { config, routes })
    }

    /// The families the rules are programmed in: IPv4, and IPv6 when enabled.
    pub fn families(&self) -> Vec<Family> {
        let mut f = vec![Family::V4];
        if self.config.enable_ipv6 {
            f.push(Family::V6);
        }
        f
    }
}

/// A firewall backend. Its methods run on the netns thread, in the pod's netns. Each renders its own payload
/// from the typed [`Capture`].
pub trait Backend {
    fn kind(&self) -> BackendKind;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Programs the rules of `capture`, idempotently: a second call with the same capture leaves one copy, a call
    /// with a different one replaces ours. On error nothing of ours is left.
    fn apply(&self, capture: &Capture) -> Result<Applied, ApplyError>;

    /// Removes our rules. Returns whether there was anything to remove.
    fn remove(&self, capture: &Capture) -> Result<bool, ApplyError>;
}

/// What [`program`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    pub netns: NetnsId,
    pub backend: BackendKind,
    pub v4: FamilyOutcome,
    pub v6: Option<FamilyOutcome>,
    pub routes: RoutesOutcome,
    /// The iptables backends' mount sandbox (`None` for native nftables, which runs no program).
    pub sandbox: Option<Sandbox>,
    /// The capture that was programmed.
    pub capture: Capture,
}

/// The backend for this netns: the configured one, or Istio's iptables detection over `families`. Runs on the
/// netns thread; the iptables backends inside its sandbox (`env`; without one their tools run in the thread's
/// mount namespace, the legacy ones with the node's lock).
pub fn select_backend(
    choice: BackendChoice,
    families: &[Family],
    env: Option<&IptablesEnv>,
) -> Result<Box<dyn Backend>, ApplyError> {
    Ok(match choice {
        BackendChoice::Legacy => Box::new(iptables::legacy_with_state(families, env)),
        BackendChoice::Nft => Box::new(IptablesRestore::new(Flavour::Nft, None)),
        BackendChoice::Auto => Box::new(iptables::detect(families, env)?),
        BackendChoice::Nftables => Box::new(nftables::NativeNftables),
    })
}

/// The iptables backends' environment on the netns thread: the thread's [`sandbox`], and the xtables lock of the
/// legacy tools. Their lock is the pod's netns file itself (`XTABLES_LOCKFILE`, as Istio sets it): pods never queue
/// behind kube-proxy on the node's /run/xtables.lock, two tools programming the same pod serialise (every path to
/// a namespace is the same nsfs inode), and no file is created. It is named `/proc/thread-self/ns/net`, which each
/// tool, started from the netns thread and so in the pod's netns, resolves to that netns (the path the netns was
/// opened by may mean nothing to another process: the repair's `/proc/self/fd/N`). iptables opens it
/// `O_RDONLY|O_CREAT` and `flock`s it; nsfs files are mode 0444 and /proc cannot be created in, so a tool in a
/// pod's user namespace opens it too and nothing is ever made. For iptables older than 1.8.6, which ignore the
/// variable, the netns file is also bind-mounted over /run/xtables.lock in the sandbox, once the first legacy
/// tool is about to run. iptables-nft takes no xtables lock (its transactions are the kernel's) and gets neither.
#[derive(Debug)]
pub struct IptablesEnv {
    sandbox: RefCell<Sandbox>,
    redirected: Cell<bool>,
}

impl IptablesEnv {
    /// The legacy tools' lock, as they name it.
    pub const LEGACY_LOCK: &'static str = crate::netns::THREAD_NETNS_PATH;

    /// Enters the sandbox on the calling thread (the netns thread).
    pub fn enter() -> Self {
        IptablesEnv {
            sandbox: RefCell::new(sandbox::enter(None)),
            redirected: Cell::new(false),
        }
    }

    /// The legacy tools' lock ([`IptablesEnv::LEGACY_LOCK`], bind-mounted over /run/xtables.lock in the sandbox
    /// on the first call).
    pub fn legacy_lock(&self) -> &'static Path {
        let lock = Path::new(Self::LEGACY_LOCK);
        if !self.redirected.replace(true) {
            self.sandbox.borrow_mut().redirect_lock(lock);
        }
        lock
    }

    /// What the sandbox achieved so far.
    pub fn sandbox(&self) -> Sandbox {
        self.sandbox.borrow().clone()
    }
}

/// What to program in a pod netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A pod's redirect: IPv6 is enabled or not from the netns addresses, as Istio's `getLocalIP` decides.
    Redirect(Redirect),
    /// A capture configuration as it is (IPv6 as its `enable_ipv6` says).
    Config(CaptureConfig),
}

/// Where [`program_with`] runs the work inside the pod netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    /// A dedicated thread that enters the netns (and, for the iptables backends, a private mount namespace for
    /// their children) and dies afterwards: the caller's thread changes nothing. For long-lived callers (the
    /// agent's repair) and the tests. Native nftables enters the netns on the calling thread either way: it needs
    /// no mount namespace.
    Thread,
    /// The calling thread enters the netns and comes back ([`Netns::run_here`]); for the iptables backends it
    /// also keeps the sandbox's private mount namespace ([`sandbox`]) afterwards, until the process exits. Only
    /// for a process that exits after programming: the plugin, which so saves a thread and two hand-overs.
    CallingThreadThenExit,
}

/// Programs `target` in the netns at `netns_path`: the one programming path of the plugin, its repair and its
/// tests ([`program_with`] on a dedicated thread).
pub fn program(
    netns_path: &Path,
    choice: BackendChoice,
    target: &Target,
) -> Result<Programmed, ApplyError> {
    program_with(netns_path, choice, target, Worker::Thread)
}

/// Programs `target` in the netns at `netns_path`: opens the netns (refusing the host's), then inside it (on the
/// `worker`): derives and validates the capture, chooses the backend (logged by name), applies the rules, then
/// the routes; when the routes fail the rules are removed again.
pub fn program_with(
    netns_path: &Path,
    choice: BackendChoice,
    target: &Target,
    worker: Worker,
) -> Result<Programmed, ApplyError> {
    let netns = Netns::open(netns_path)?;
    netns.ensure_not_host()?;
    if choice == BackendChoice::Nftables || worker == Worker::CallingThreadThenExit {
        // Native nftables needs nothing but netlink sockets opened in the netns: the calling thread enters it
        // and comes back, saving a thread and two hand-overs per ADD. So do the iptables backends in a process
        // that exits afterwards (their sandbox's mount namespace stays with the thread).
        return netns.run_here(|| on_netns_thread(&netns, choice, target))?;
    }
    let span = tracing::Span::current();
    netns.run(|| {
        let _entered = span.enter();
        on_netns_thread(&netns, choice, target)
    })?
}

/// The capture of `target` in this netns (the calling thread's).
fn capture_of(netns: &Netns, target: &Target) -> Result<Capture, ApplyError> {
    let config = match target {
        Target::Config(config) => config.clone(),
        Target::Redirect(redirect) => {
            let addrs = addresses()?;
            let enable_ipv6 =
                rules::ipv6_enabled(&addrs, redirect.dual_stack()).ok_or_else(|| {
                    ApplyError::NoPodIp {
                        path: netns.path().to_path_buf(),
                        addrs: addrs.clone(),
                    }
                })?;
            CaptureConfig::from_redirect(redirect, enable_ipv6)
        }
    };
    Capture::new(config)
}

fn on_netns_thread(
    netns: &Netns,
    choice: BackendChoice,
    target: &Target,
) -> Result<Programmed, ApplyError> {
    let capture = capture_of(netns, target)?;
    // Opened before anything is applied, so that failing to open it leaves nothing behind.
    let netlink = if Netlink::needed_for(&capture.routes) {
        Some(Netlink::open()?)
    } else {
        None
    };
    tracing::debug!(config = ?capture.config, routes = ?capture.routes, "capture");
    let families = capture.families();
    let env = (choice != BackendChoice::Nftables).then(IptablesEnv::enter);
    let backend = select_backend(choice, &families, env.as_ref())?;
    tracing::info!(backend = backend.name(), netns = %netns.path().display(), "firewall backend selected");
    let (backend, applied) = match backend.apply(&capture) {
        Ok(applied) => (backend, applied),
        Err(nft)
            if choice == BackendChoice::Auto
                && backend.kind() == BackendKind::IptablesNft
                && nft.is_unusable() =>
        {
            tracing::warn!(error = %nft, "iptables-nft does not work in this netns; using iptables-legacy");
            drop(backend);
            let legacy = iptables::legacy_with_state(&families, env.as_ref());
            match legacy.apply(&capture) {
                Ok(applied) => (Box::new(legacy) as Box<dyn Backend>, applied),
                Err(legacy) => {
                    return Err(ApplyError::NoUsableIptables {
                        legacy: legacy.to_string(),
                        nft: nft.to_string(),
                    })
                }
            }
        }
        Err(e) => return Err(e),
    };
    let configured = match &netlink {
        Some(netlink) => netlink.configure(&capture.routes),
        None => Ok(RoutesOutcome::default()),
    };
    let routes = match configured {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "routes failed; removing the rules again");
            let failed = ApplyError::Routes(e);
            return Err(match backend.remove(&capture) {
                Ok(_) => failed,
                Err(rollback) => ApplyError::RollbackFailed {
                    failed: Box::new(failed),
                    rollback: Box::new(rollback),
                },
            });
        }
    };
    Ok(Programmed {
        netns: netns.id(),
        backend: backend.kind(),
        v4: applied.v4,
        v6: applied.v6,
        routes,
        sandbox: env.as_ref().map(IptablesEnv::sandbox),
        capture,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::InterceptionMode;
    use crate::rules::{OwnerGroup, OwnerGroups, PortSelector};

    #[test]
    fn captures_are_validated_before_anything() {
        let ok = Capture::new(CaptureConfig::default()).unwrap();
        assert_eq!(ok.families(), [Family::V4]);
        assert_eq!(ok.routes, RouteSetup::default());
        let v6 = Capture::new(CaptureConfig {
            enable_ipv6: true,
            ..CaptureConfig::default()
        })
        .unwrap();
        assert_eq!(v6.families(), [Family::V4, Family::V6]);
        assert!(v6.routes.ipv6_loopback_addr);

        let too_many = CaptureConfig {
            owner_groups_include: OwnerGroups::Only(vec![OwnerGroup::Id(1); 65]),
            ..CaptureConfig::default()
        };
        let e = Capture::new(too_many).unwrap_err();
        assert!(e.to_string().contains("65 owner groups"), "{e}");

        let tproxy = |mark, table| CaptureConfig {
            interception_mode: InterceptionMode::Tproxy,
            inbound_ports_include: PortSelector::All,
            inbound_tproxy_mark: mark,
            inbound_tproxy_route_table: table,
            ..CaptureConfig::default()
        };
        assert!(Capture::new(tproxy(1337, 133))
            .unwrap()
            .routes
            .tproxy
            .is_some());
        for (cfg, what) in [(tproxy(0, 133), "mark 0"), (tproxy(1337, 254), "254")] {
            let e = Capture::new(cfg).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn the_host_netns_is_refused_before_anything() {
        let target = Target::Config(CaptureConfig::default());
        for choice in [BackendChoice::Nft, BackendChoice::Nftables] {
            for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
                let e = program(Path::new(path), choice, &target).unwrap_err();
                assert!(
                    matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
                    "{e}"
                );
                assert!(e.to_string().contains(path), "{e}");
            }
            // init's netns: refused as the host's, or not even opened where /proc/1 is off limits.
            let e = program(Path::new("/proc/1/ns/net"), choice, &target).unwrap_err();
            assert!(matches!(e, ApplyError::Netns(_)), "{e}");
            assert!(e.to_string().contains("/proc/1/ns/net"), "{e}");
        }
    }

    #[test]
    fn the_legacy_lock_is_the_netns_file_and_redirected_once() {
        let (lock, sandbox, mounts) = std::thread::spawn(|| {
            let env = IptablesEnv::enter();
            let before = env.sandbox().lock_redirected;
            let lock = env.legacy_lock().to_path_buf();
            assert_eq!(env.legacy_lock(), lock.as_path());
            let mounts = std::fs::read_to_string("/proc/thread-self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.split(' ').nth(4) == Some("/run/xtables.lock"))
                .count();
            assert!(!before, "nothing redirected before a legacy tool needs it");
            (lock, env.sandbox(), mounts)
        })
        .join()
        .unwrap();
        assert_eq!(lock, Path::new("/proc/thread-self/ns/net"));
        assert!(sandbox.private, "{sandbox:?}");
        let node_has_lock = Path::new("/run/xtables.lock").is_file();
        assert_eq!(sandbox.lock_redirected, node_has_lock, "{sandbox:?}");
        assert_eq!(mounts, usize::from(node_has_lock), "bound once, not twice");
    }
}
