//! Programming one pod netns: firewall backends behind one trait (netavark style: the backend is chosen once and
//! logged by name), the routes that go with the rules, and the two entry points [`program`] (from a `Redirect`)
//! and [`apply_ruleset`] (from a literal [`Ruleset`]).
//!
//! Everything happens on one dedicated thread inside the pod netns ([`Netns::run`]); that thread also gets a
//! private mount namespace for the iptables children ([`sandbox`]) and a pod-scoped xtables lock file.
//! Nothing is applied before the whole ruleset has been validated, and a failed ADD leaves no rule behind: if the
//! IPv6 restore fails after IPv4 succeeded, or the routes fail, our rules are removed again.

pub mod exec;
pub mod iptables;
pub mod nftables;
pub mod routes;
pub mod sandbox;
pub mod text;

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::config::BackendChoice;
use crate::netns::{Netns, NetnsError, NetnsId};
use crate::redirect::Redirect;
use crate::rules::{self, CaptureConfig, RouteSetup, Ruleset};

pub use iptables::{Family, Flavour, IptablesRestore};
pub use routes::{Netlink, RouteError, RoutesOutcome};
pub use sandbox::Sandbox;
pub use text::TextError;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("invalid {family} ruleset: {reason}")]
    InvalidRuleset { family: Family, reason: String },
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
    #[error("cannot create the pod's xtables lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error("programming aborted before any rule was applied")]
    Aborted,
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
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::IptablesLegacy => "iptables-legacy",
            BackendKind::IptablesNft => "iptables-nft",
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
    /// Ours were there, identical: nothing was done.
    Unchanged,
    /// Ours were there but different: removed and replaced in one transaction.
    Replaced,
}

/// What a backend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub v4: FamilyOutcome,
    pub v6: Option<FamilyOutcome>,
}

/// A firewall backend. Its methods run on the netns thread, in the pod's netns. A later native nftables backend
/// (one netlink batch) implements the same trait.
pub trait FirewallBackend {
    fn kind(&self) -> BackendKind;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Starts, before the ruleset is known, whatever programming `families` will need (the iptables backends
    /// start their restore processes, which then wait for their input). Dropping the backend undoes it; nothing
    /// is changed in the netns until [`FirewallBackend::apply`].
    fn prepare(&self, _families: &[Family]) {}

    /// Programs the ruleset, idempotently (see `iptables.rs`). On error nothing of ours is left.
    fn apply(&self, rules: &ValidRuleset) -> Result<Applied, ApplyError>;

    /// Removes our chains and rules. Returns whether there was anything to remove.
    fn remove(&self, rules: &ValidRuleset) -> Result<bool, ApplyError>;
}

/// One family's restore payload, parsed and checked.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The payload exactly as rendered; this is what a first apply feeds to iptables-restore.
    pub text: String,
    pub tables: text::Tables,
}

impl Payload {
    fn new(family: Family, text: &str) -> Result<Self, ApplyError> {
        let invalid = |reason: String| ApplyError::InvalidRuleset { family, reason };
        let tables = text::Tables::parse(text).map_err(|e| invalid(e.to_string()))?;
        if !tables.has_rules() {
            return Err(invalid("it holds no rule".into()));
        }
        tables.validate_payload().map_err(invalid)?;
        Ok(Payload {
            text: text.to_string(),
            tables,
        })
    }
}

/// A [`Ruleset`] that passed validation: what the backends accept.
#[derive(Debug, Clone)]
pub struct ValidRuleset {
    pub v4: Payload,
    pub v6: Option<Payload>,
    pub routes: RouteSetup,
}

/// Routing tables the TPROXY rule must not point to: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

impl ValidRuleset {
    pub fn new(rs: &Ruleset) -> Result<Self, ApplyError> {
        let v4 = Payload::new(Family::V4, &rs.v4)?;
        let v6 = rs
            .v6
            .as_deref()
            .map(|t| Payload::new(Family::V6, t))
            .transpose()?;
        if let Some(tp) = &rs.routes.tproxy {
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
            if tp.ipv6 && v6.is_none() {
                return Err(ApplyError::InvalidRoutes(
                    "IPv6 TPROXY routes requested without IPv6 rules".into(),
                ));
            }
        }
        Ok(ValidRuleset {
            v4,
            v6,
            routes: rs.routes.clone(),
        })
    }

    pub fn families(&self) -> Vec<Family> {
        let mut f = vec![Family::V4];
        if self.v6.is_some() {
            f.push(Family::V6);
        }
        f
    }
}

/// What [`program`] / [`apply_ruleset`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    pub netns: NetnsId,
    pub backend: BackendKind,
    pub v4: FamilyOutcome,
    pub v6: Option<FamilyOutcome>,
    pub routes: RoutesOutcome,
    pub sandbox: Sandbox,
}

/// The backend for this netns: the configured one, or Istio's detection over `families`. Runs on the netns thread
/// (inside the sandbox).
pub fn select_backend(
    choice: BackendChoice,
    families: &[Family],
    lockfile: Option<&Path>,
) -> Result<Box<dyn FirewallBackend>, ApplyError> {
    Ok(match choice {
        BackendChoice::Legacy => Box::new(iptables::legacy_with_state(families, lockfile)),
        BackendChoice::Nft => Box::new(IptablesRestore::new(Flavour::Nft, lockfile)),
        BackendChoice::Auto => Box::new(iptables::detect(families, lockfile)?),
    })
}

/// A pod-scoped xtables lock file: legacy iptables serialises on it instead of the node's /run/xtables.lock
/// (where kube-proxy holds the lock for seconds on big nodes). Removed when dropped.
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
}

impl LockFile {
    pub fn create(netns: NetnsId) -> Result<Self, ApplyError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "meshcni-xtables-{}-{}-{nanos}.lock",
            netns.ino,
            std::process::id()
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| ApplyError::LockFile {
                path: path.clone(),
                source,
            })?;
        Ok(LockFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove the xtables lock file");
        }
    }
}

/// The families a netns can be programmed in, known before the pod is: IPv4 always, IPv6 when the netns has a
/// usable IPv6 address (only then can [`rules::ipv6_enabled`] say yes, whatever the pod's dual-stack setting).
pub fn possible_families(addrs: &[IpAddr]) -> Vec<Family> {
    let mut families = vec![Family::V4];
    if rules::ipv6_enabled(addrs, true) == Some(true) {
        families.push(Family::V6);
    }
    families
}

/// On the netns thread, sandbox entered, backend chosen: applies the rules (falling back from nft to legacy in
/// auto mode when nft proves unusable), then the routes; when the routes fail, the rules are removed again.
fn apply_with(
    netns: &Netns,
    choice: BackendChoice,
    lock_path: &Path,
    backend: Box<dyn FirewallBackend>,
    rules: &ValidRuleset,
    netlink: Option<Netlink>,
    sandbox: Sandbox,
) -> Result<Programmed, ApplyError> {
    let (backend, applied) = match backend.apply(rules) {
        Ok(applied) => (backend, applied),
        Err(nft)
            if choice == BackendChoice::Auto
                && backend.kind() == BackendKind::IptablesNft
                && nft.is_unusable() =>
        {
            tracing::warn!(error = %nft, "iptables-nft does not work in this netns; using iptables-legacy");
            drop(backend);
            let legacy = iptables::legacy_with_state(&rules.families(), Some(lock_path));
            match legacy.apply(rules) {
                Ok(applied) => (Box::new(legacy) as Box<dyn FirewallBackend>, applied),
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
    let routes = if rules.routes == RouteSetup::default() {
        Ok(RoutesOutcome::default())
    } else {
        match netlink {
            Some(nl) => Ok(nl),
            None => Netlink::open(),
        }
        .and_then(|nl| nl.configure(&rules.routes))
    };
    let routes = match routes {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "routes failed; removing the rules again");
            let failed = ApplyError::Routes(e);
            return Err(match backend.remove(rules) {
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
        sandbox,
    })
}

/// Opens the netns, refusing the host's, and programs a validated ruleset on its thread.
fn in_pod_netns(
    netns_path: &Path,
    choice: BackendChoice,
    rules: &ValidRuleset,
) -> Result<Programmed, ApplyError> {
    let netns = Netns::open(netns_path)?;
    netns.ensure_not_host()?;
    let lock = LockFile::create(netns.id())?;
    let lock_path = lock.path();
    netns.run(|| -> Result<Programmed, ApplyError> {
        let sandbox = sandbox::enter(Some(lock_path));
        let backend = select_backend(choice, &rules.families(), Some(lock_path))?;
        tracing::info!(backend = backend.name(), netns = %netns.path().display(), "firewall backend selected");
        apply_with(&netns, choice, lock_path, backend, rules, None, sandbox)
    })?
}

/// Programs a literal ruleset in the netns at `netns_path` (tests, and the plugin once it has rendered one).
/// The ruleset is validated before the netns is even opened.
pub fn apply_ruleset(
    netns_path: &Path,
    choice: BackendChoice,
    ruleset: &Ruleset,
) -> Result<Programmed, ApplyError> {
    let rules = ValidRuleset::new(ruleset)?;
    in_pod_netns(netns_path, choice, &rules)
}

/// Programs the redirect of a pod: reads the netns addresses (IPv6 enabled or not, as Istio's `getLocalIP`),
/// renders the rules, validates them, applies them and the routes, all on the netns thread. The same as
/// [`Prepared::start`] followed by [`Prepared::program`].
pub fn program(
    netns_path: &Path,
    choice: BackendChoice,
    redirect: &Redirect,
) -> Result<Programmed, ApplyError> {
    Prepared::start(netns_path, choice).program(redirect)
}

/// The programming of one pod netns, started before the pod's redirect is known, so that the preparation
/// overlaps the pod lookup.
///
/// [`Prepared::start`] returns at once; a thread opens the netns (refusing the host's), creates the pod's lock
/// file and enters the netns on a dedicated thread, which reads the addresses, enters the sandbox, chooses the
/// backend and lets it prepare (the iptables backends start their `iptables-restore` processes, IPv6 only when
/// the netns has an IPv6 address; they wait for their input). Nothing is changed in the netns until
/// [`Prepared::program`] hands over the redirect: the rules are then rendered and validated, and only then
/// loaded.
///
/// [`Prepared::abort`] (or dropping it) stops everything: the restores are killed before they read a line and
/// reaped, and errors of the preparation are not reported (a pod that is not redirected must not fail because
/// of its netns, as with Istio, which never opens it).
#[derive(Debug)]
pub struct Prepared {
    netns_path: PathBuf,
    /// Hands the redirect to the netns thread; dropped to abort.
    tx: Option<mpsc::SyncSender<Redirect>>,
    aborted: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<Result<Programmed, ApplyError>>>,
    /// The thread could not even be started.
    failed: Option<ApplyError>,
}

impl Prepared {
    /// Starts preparing the netns at `netns_path`; never blocks, never fails (errors come with `program`).
    pub fn start(netns_path: &Path, choice: BackendChoice) -> Prepared {
        let (tx, rx) = mpsc::sync_channel::<Redirect>(1);
        let aborted = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&aborted);
        let path = netns_path.to_path_buf();
        // The caller's span (pod, container id) goes with the work, so its logs carry the same fields.
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("netns-prepare".into())
            .spawn(move || prepare_and_program(&path, choice, rx, &flag, span));
        let (tx, worker, failed) = match spawned {
            Ok(worker) => (Some(tx), Some(worker), None),
            Err(source) => (
                None,
                None,
                Some(ApplyError::Netns(NetnsError::Thread {
                    path: netns_path.to_path_buf(),
                    source,
                })),
            ),
        };
        Prepared {
            netns_path: netns_path.to_path_buf(),
            tx,
            aborted,
            worker,
            failed,
        }
    }

    /// Renders the pod's rules on the netns thread, validates them, and applies them with the prepared backend.
    /// A failure of the preparation (netns gone, host netns, no pod IP, ...) is reported here.
    pub fn program(mut self, redirect: &Redirect) -> Result<Programmed, ApplyError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if let Some(tx) = self.tx.take() {
            // An error means the thread already ended (its preparation failed): its result says why.
            let _ = tx.send(redirect.clone());
        }
        let Some(worker) = self.worker.take() else {
            return Err(ApplyError::Aborted);
        };
        worker.join().unwrap_or_else(|payload| {
            Err(ApplyError::Netns(NetnsError::Panicked {
                path: self.netns_path.clone(),
                message: crate::panic_message(payload.as_ref()),
            }))
        })
    }

    /// Stops the preparation: kills and reaps the processes it started, changes nothing, reports nothing.
    pub fn abort(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.aborted.store(true, Ordering::SeqCst);
        drop(self.tx.take());
        if let Some(worker) = self.worker.take() {
            match worker.join() {
                Ok(Err(ApplyError::Aborted)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "preparation failed; ignored: the netns is not programmed")
                }
                Ok(Ok(_)) => {}
                Err(payload) => {
                    tracing::warn!(message = %crate::panic_message(payload.as_ref()), "preparation panicked; ignored")
                }
            }
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread behind [`Prepared`]: opens the netns and holds it (and the lock file) while the netns thread works.
fn prepare_and_program(
    path: &Path,
    choice: BackendChoice,
    rx: mpsc::Receiver<Redirect>,
    aborted: &AtomicBool,
    span: tracing::Span,
) -> Result<Programmed, ApplyError> {
    let _entered = span.enter();
    let netns = Netns::open(path)?;
    netns.ensure_not_host()?;
    let lock = LockFile::create(netns.id())?;
    let lock_path = lock.path();
    netns.run(|| {
        let _entered = span.enter();
        on_netns_thread(&netns, choice, lock_path, rx, aborted)
    })?
}

fn on_netns_thread(
    netns: &Netns,
    choice: BackendChoice,
    lock_path: &Path,
    rx: mpsc::Receiver<Redirect>,
    aborted: &AtomicBool,
) -> Result<Programmed, ApplyError> {
    let stop = || aborted.load(Ordering::SeqCst);
    let netlink = Netlink::open()?;
    let addrs = netlink.addresses()?;
    let no_pod_ip = || ApplyError::NoPodIp {
        path: netns.path().to_path_buf(),
        addrs: addrs.clone(),
    };
    if rules::ipv6_enabled(&addrs, true).is_none() {
        // No pod IP: nothing to prepare; it is an error only for a pod that is to be redirected.
        return match rx.recv() {
            Ok(_) => Err(no_pod_ip()),
            Err(_) => Err(ApplyError::Aborted),
        };
    }
    let families = possible_families(&addrs);
    if stop() {
        return Err(ApplyError::Aborted);
    }
    let sandbox = sandbox::enter(Some(lock_path));
    let backend = select_backend(choice, &families, Some(lock_path))?;
    if stop() {
        return Err(ApplyError::Aborted);
    }
    backend.prepare(&families);
    tracing::debug!(
        backend = backend.name(),
        ?families,
        "netns prepared; waiting for the pod's redirect"
    );
    // A closed channel means abort: returning drops the backend, which kills its waiting restores.
    let Ok(redirect) = rx.recv() else {
        return Err(ApplyError::Aborted);
    };
    let enable_ipv6 = rules::ipv6_enabled(&addrs, redirect.dual_stack()).ok_or_else(no_pod_ip)?;
    let cfg = CaptureConfig::from_redirect(&redirect, enable_ipv6);
    let ruleset = rules::render_iptables(&cfg);
    tracing::debug!(?ruleset, enable_ipv6, "rendered ruleset");
    let rules = ValidRuleset::new(&ruleset)?;
    tracing::info!(backend = backend.name(), netns = %netns.path().display(), "firewall backend selected");
    apply_with(
        netns,
        choice,
        lock_path,
        backend,
        &rules,
        Some(netlink),
        sandbox,
    )
}

/// The interface addresses of the netns at `netns_path` (for [`rules::ipv6_enabled`]).
pub fn netns_addresses(netns_path: &Path) -> Result<Vec<IpAddr>, ApplyError> {
    let netns = Netns::open(netns_path)?;
    Ok(netns.run(|| Netlink::open().and_then(|nl| nl.addresses()))??)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::TproxyRoute;

    const MINI: &str = "*nat\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";

    #[test]
    fn rulesets_are_validated_before_anything() {
        let ok = Ruleset {
            v4: MINI.into(),
            v6: None,
            routes: RouteSetup::default(),
        };
        assert_eq!(ValidRuleset::new(&ok).unwrap().families(), [Family::V4]);

        let empty = Ruleset::default();
        let e = ValidRuleset::new(&empty).unwrap_err();
        assert!(
            e.to_string().contains("IPv4") && e.to_string().contains("no rule"),
            "{e}"
        );

        let bad_v6 = Ruleset {
            v6: Some("*nat\n-A OUTPUT -j ISTIO_OUTPUT\n".into()),
            ..ok.clone()
        };
        let e = ValidRuleset::new(&bad_v6).unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");

        for (tp, what) in [
            (
                TproxyRoute {
                    mark: 0,
                    table: 133,
                    ipv6: false,
                },
                "mark 0",
            ),
            (
                TproxyRoute {
                    mark: 1337,
                    table: 254,
                    ipv6: false,
                },
                "254",
            ),
            (
                TproxyRoute {
                    mark: 1337,
                    table: 133,
                    ipv6: true,
                },
                "without IPv6",
            ),
        ] {
            let rs = Ruleset {
                routes: RouteSetup {
                    ipv6_loopback_addr: false,
                    tproxy: Some(tp),
                },
                ..ok.clone()
            };
            let e = ValidRuleset::new(&rs).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn the_host_netns_is_refused_before_anything() {
        let ok = Ruleset {
            v4: MINI.into(),
            v6: None,
            routes: RouteSetup::default(),
        };
        for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let e = apply_ruleset(Path::new(path), BackendChoice::Nft, &ok).unwrap_err();
            assert!(
                matches!(e, ApplyError::Netns(NetnsError::HostNetns { .. })),
                "{e}"
            );
            assert!(e.to_string().contains(path), "{e}");
        }
        // init's netns: refused as the host's, or not even opened where /proc/1 is off limits.
        let e = apply_ruleset(Path::new("/proc/1/ns/net"), BackendChoice::Nft, &ok).unwrap_err();
        assert!(matches!(e, ApplyError::Netns(_)), "{e}");
        assert!(e.to_string().contains("/proc/1/ns/net"), "{e}");
    }

    #[test]
    fn lock_files_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let id = NetnsId { dev: 1, ino: 42 };
        let lock = LockFile::create(id).unwrap();
        let path = lock.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(lock);
        assert!(!path.exists());
    }
}
