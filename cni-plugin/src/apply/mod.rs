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
pub mod routes;
pub mod sandbox;
pub mod text;

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
}

impl ApplyError {
    /// True when the netns itself is unusable (missing, not a netns, the host's): CNI code 102, not 103.
    pub fn is_netns(&self) -> bool {
        matches!(self, ApplyError::Netns(_))
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

/// The backend for this netns: the configured one, or Istio's detection. Runs on the netns thread.
pub fn select_backend(
    choice: BackendChoice,
    rules: &ValidRuleset,
    lockfile: Option<&Path>,
) -> Result<Box<dyn FirewallBackend>, ApplyError> {
    Ok(match choice {
        BackendChoice::Legacy => Box::new(IptablesRestore::new(Flavour::Legacy, lockfile)),
        BackendChoice::Nft => Box::new(IptablesRestore::new(Flavour::Nft, lockfile)),
        BackendChoice::Auto => Box::new(iptables::detect(&rules.families(), lockfile)?),
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

/// Opens the netns, refusing the host's, and runs the whole programming on its thread. `build` produces the
/// validated ruleset on that thread; it may open the netlink connection (kept for the routes).
fn in_pod_netns(
    netns_path: &Path,
    choice: BackendChoice,
    build: impl FnOnce(&Netns, &mut Option<Netlink>) -> Result<ValidRuleset, ApplyError> + Send,
) -> Result<Programmed, ApplyError> {
    let netns = Netns::open(netns_path)?;
    netns.ensure_not_host()?;
    let lock = LockFile::create(netns.id())?;
    let lock_path = lock.path();
    netns.run(|| -> Result<Programmed, ApplyError> {
        let mut netlink = None;
        let rules = build(&netns, &mut netlink)?;
        let sandbox = sandbox::enter(Some(lock_path));
        let backend = select_backend(choice, &rules, Some(lock_path))?;
        tracing::info!(backend = backend.name(), netns = %netns.path().display(), "firewall backend selected");
        let applied = backend.apply(&rules)?;
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
                return Err(match backend.remove(&rules) {
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
    in_pod_netns(netns_path, choice, move |_, _| Ok(rules))
}

/// Programs the redirect of a pod: reads the netns addresses (IPv6 enabled or not, as Istio's `getLocalIP`),
/// renders the rules, validates them, applies them and the routes, all on the netns thread.
pub fn program(
    netns_path: &Path,
    choice: BackendChoice,
    redirect: &Redirect,
) -> Result<Programmed, ApplyError> {
    in_pod_netns(netns_path, choice, |netns, netlink| {
        let nl = match netlink {
            Some(nl) => nl,
            None => netlink.insert(Netlink::open()?),
        };
        let addrs = nl.addresses()?;
        let enable_ipv6 = rules::ipv6_enabled(&addrs, redirect.dual_stack()).ok_or_else(|| {
            ApplyError::NoPodIp {
                path: netns.path().to_path_buf(),
                addrs: addrs.clone(),
            }
        })?;
        let cfg = CaptureConfig::from_redirect(redirect, enable_ipv6);
        let ruleset = rules::render_iptables(&cfg);
        tracing::debug!(?ruleset, enable_ipv6, "rendered ruleset");
        ValidRuleset::new(&ruleset)
    })
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
