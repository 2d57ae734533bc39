//! The iptables backends: `iptables-legacy` and `iptables-nft`, both through their `*-save`/`*-restore` binaries.
//!
//! One `iptables-restore --noflush` transaction per family, first without looking at the netns (the fast path),
//! with Istio's state check only when needed:
//! - the payload creates every one of our chains with `-N`, and every ruleset of ours creates the same chains in
//!   `nat`, so loading it into a netns that already holds ours fails in that table. Both `iptables-legacy-restore`
//!   and `iptables-nft-restore` (1.8.9) commit table by table: tables before the failing one may have been
//!   committed. When the restore succeeds there was none of ours: nothing more to do, and no `*-save` was run;
//! - when it fails, the netns is read (`*-save`): none of ours there means the restore's error is the real one;
//!   ours present and identical to the ruleset means nothing to do (a repeated ADD); ours present but different
//!   means: remove ours and apply the ruleset, in the same transaction (per table), so there is no moment without
//!   rules and never two copies;
//! - any failure removes ours again from every family of the ruleset: a failed ADD leaves no rule behind (also
//!   what a legacy restore had committed in an earlier table before a later table failed).
//!
//! Where the state is known without asking the binaries, it is used: a netns in which no legacy table exists
//! (`/proc/thread-self/net/ip_tables_names`, read on the netns thread) holds no legacy rule at all; a save that
//! auto-detection read anyway is reused instead of trying a restore bound to fail.
//!
//! The backend renders its payloads itself from the typed [`Capture`] (`rules::render_iptables`, Istio's text byte
//! for byte) and checks them ([`Payload`]) before any process is started.
//!
//! "Identical" is decided on iptables-save's canonical text: the ruleset is loaded into a scratch netns with the
//! same binary and saved back, which gives exactly the text the pod netns shows for the same rules.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::rules::iptables::Family;

use super::exec::{self, ExecError};
use super::text::{compose, Owned, Tables};
use super::{
    sandbox, Applied, ApplyError, Backend, BackendKind, Capture, FamilyOutcome, IptablesEnv,
};
use crate::rules::render_iptables;

/// Upper bound for one iptables process (from the moment it is given its input).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// The environment variable iptables ≥ 1.8.6 reads for its lock file.
pub const XTABLES_LOCKFILE_ENV: &str = "XTABLES_LOCKFILE";

/// Which iptables flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    Legacy,
    Nft,
}

impl Flavour {
    pub fn kind(self) -> BackendKind {
        match self {
            Flavour::Legacy => BackendKind::IptablesLegacy,
            Flavour::Nft => BackendKind::IptablesNft,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Flavour::Legacy => "legacy",
            Flavour::Nft => "nft",
        }
    }

    /// `iptables-legacy-save`, `ip6tables-nft-save`, ...
    pub fn save_binary(self, family: Family) -> String {
        format!("{}-{}-save", family.tool_base(), self.suffix())
    }

    /// `iptables-legacy-restore`, `ip6tables-nft-restore`, ...
    pub fn restore_binary(self, family: Family) -> String {
        format!("{}-{}-restore", family.tool_base(), self.suffix())
    }
}

/// `/proc/thread-self/net/ip_tables_names` (or `ip6_tables_names`): the legacy tables that exist in the calling
/// thread's netns. A table exists there only once something used it; no file means the kernel module is not
/// even loaded. `/proc/self` would show the netns of the thread-group leader, not of the netns thread.
pub fn legacy_tables_file(family: Family) -> &'static str {
    match family {
        Family::V4 => "/proc/thread-self/net/ip_tables_names",
        Family::V6 => "/proc/thread-self/net/ip6_tables_names",
    }
}

/// The legacy tables of `family` that exist in the calling thread's netns (see [`legacy_tables_file`]).
pub fn legacy_tables(family: Family) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(legacy_tables_file(family)) {
        Ok(text) => Ok(text.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// One family's restore payload, parsed and checked.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The payload exactly as rendered; this is what a first apply feeds to iptables-restore.
    pub text: String,
    pub tables: Tables,
}

impl Payload {
    pub fn new(family: Family, text: &str) -> Result<Self, ApplyError> {
        let invalid = |reason: String| ApplyError::InvalidRuleset { family, reason };
        let tables = Tables::parse(text).map_err(|e| invalid(e.to_string()))?;
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

/// The payloads of a capture: IPv4, and IPv6 when enabled.
#[derive(Debug, Clone)]
pub struct Payloads {
    pub v4: Payload,
    pub v6: Option<Payload>,
}

impl Payloads {
    /// Renders and checks the payloads of `capture`.
    pub fn render(capture: &Capture) -> Result<Self, ApplyError> {
        let rendered = render_iptables(&capture.config);
        tracing::debug!(v4 = %rendered.v4, v6 = ?rendered.v6, "rendered iptables payloads");
        Ok(Payloads {
            v4: Payload::new(Family::V4, &rendered.v4)?,
            v6: rendered
                .v6
                .as_deref()
                .map(|t| Payload::new(Family::V6, t))
                .transpose()?,
        })
    }

    fn get(&self, family: Family) -> Option<&Payload> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// Runs one flavour's tools. Plain data, so it can be handed to another thread (the scratch netns).
#[derive(Debug, Clone)]
struct Tools {
    flavour: Flavour,
    lockfile: Option<PathBuf>,
}

impl Tools {
    fn env(&self) -> Vec<(&'static str, &OsStr)> {
        self.lockfile
            .as_deref()
            .map(|l| (XTABLES_LOCKFILE_ENV, l.as_os_str()))
            .into_iter()
            .collect()
    }

    /// Every tool runs in the user namespace owning the calling thread's netns: a pod's own for a pod with
    /// `hostUsers: false` (owner rules are refused otherwise), ours for a scratch netns.
    fn run(&self, binary: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        let path = exec::find_binary(binary)?;
        exec::run_in_owning_userns(&path, args, &self.env(), stdin, TOOL_TIMEOUT)
    }

    fn save_text(&self, family: Family) -> Result<String, ExecError> {
        self.run(&self.flavour.save_binary(family), &[], None)
    }

    fn save(&self, family: Family) -> Result<Tables, ApplyError> {
        let text = self.save_text(family)?;
        self.parse_save(family, &text)
    }

    fn parse_save(&self, family: Family, text: &str) -> Result<Tables, ApplyError> {
        Tables::parse(text).map_err(|error| ApplyError::SaveOutput {
            binary: self.flavour.save_binary(family),
            error,
        })
    }

    /// `iptables-restore --noflush` of this family with `input`.
    fn restore(&self, family: Family, input: &str) -> Result<(), ApplyError> {
        let binary = self.flavour.restore_binary(family);
        tracing::debug!(%binary, %family, %input, "iptables-restore --noflush");
        self.run(&binary, &["--noflush"], Some(input))?;
        Ok(())
    }

    /// The ruleset as iptables-save prints it once loaded: loaded into a fresh empty netns that vanishes after.
    fn canonical(&self, family: Family, payload: &Payload) -> Result<Tables, ApplyError> {
        let tools = self.clone();
        let text = payload.text.clone();
        crate::netns::run_in_scratch_netns(move || {
            sandbox::enter(tools.lockfile.as_deref());
            tools.restore(family, &text)?;
            tools.save(family)
        })?
    }

    /// [`Tools::canonical`] of what of the payload loads at all, for removing it: a legacy restore commits table
    /// by table, so a payload refused in a later table may have left its first tables in the pod netns, and
    /// those are exactly the tables that load into the scratch netns too.
    fn canonical_loadable(&self, family: Family, payload: &Payload) -> Result<Tables, ApplyError> {
        let tools = self.clone();
        let text = payload.text.clone();
        crate::netns::run_in_scratch_netns(move || {
            sandbox::enter(tools.lockfile.as_deref());
            if let Err(e) = tools.restore(family, &text) {
                tracing::debug!(%family, error = %e, "the ruleset does not fully load; removing what does");
            }
            tools.save(family)
        })?
    }
}

/// What is known of one family's state in the netns before anything is programmed.
#[derive(Debug, Clone, Default)]
enum Known {
    /// Nothing: try the restore, read the state only if it fails.
    #[default]
    Unknown,
    /// No table of this flavour and family exists in the netns: it holds no rule at all.
    Empty,
    /// A save read moments ago (by the detection): reused instead of a restore bound to fail.
    Saved(String),
}

/// An iptables flavour driven through its restore binaries.
#[derive(Debug)]
pub struct IptablesRestore {
    tools: Tools,
    known: RefCell<[Known; 2]>,
}

impl IptablesRestore {
    /// A backend of the given flavour. `lockfile` is the pod-scoped xtables lock its children use.
    pub fn new(flavour: Flavour, lockfile: Option<&Path>) -> Self {
        IptablesRestore {
            tools: Tools {
                flavour,
                lockfile: lockfile.map(Path::to_path_buf),
            },
            known: RefCell::new([Known::Unknown, Known::Unknown]),
        }
    }

    pub fn flavour(&self) -> Flavour {
        self.tools.flavour
    }

    fn slot(family: Family) -> usize {
        match family {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    fn set_known(&self, family: Family, known: Known) {
        self.known.borrow_mut()[Self::slot(family)] = known;
    }

    /// Learns what can be learnt cheaply about the legacy flavour's state: a family without any legacy table
    /// holds no rule; one with tables is saved now (on the netns thread, while the pod is looked up), so that a
    /// repeated ADD needs no restore bound to fail. Nothing to learn for nft (the restore itself tells).
    pub fn learn_state(&self, families: &[Family]) {
        if self.flavour() != Flavour::Legacy {
            return;
        }
        for &family in families {
            let known = match legacy_tables(family) {
                Ok(tables) if tables.is_empty() => Known::Empty,
                Ok(_) | Err(_) => match self.tools.save_text(family) {
                    Ok(text) => Known::Saved(text),
                    Err(e) => {
                        tracing::debug!(%family, error = %e, "cannot read the legacy state in advance");
                        Known::Unknown
                    }
                },
            };
            self.set_known(family, known);
        }
    }

    fn restore_payload(&self, family: Family, payload: &Payload) -> Result<(), ApplyError> {
        self.tools.restore(family, &payload.text)
    }

    fn apply_family(&self, family: Family, payload: &Payload) -> Result<FamilyOutcome, ApplyError> {
        let known = std::mem::take(&mut self.known.borrow_mut()[Self::slot(family)]);
        if let Known::Saved(text) = &known {
            let live = self.tools.parse_save(family, text)?;
            if !Owned::from_save(&live, &Default::default()).is_empty() {
                return self.reconcile(family, payload, &live);
            }
        }
        let restore_error = match self.restore_payload(family, payload) {
            Ok(()) => return Ok(FamilyOutcome::Applied),
            Err(e) => e,
        };
        let live = match self.tools.save(family) {
            Ok(live) => live,
            Err(save) => {
                return Err(ApplyError::Unusable {
                    backend: self.kind(),
                    restore: Box::new(restore_error),
                    save: Box::new(save),
                })
            }
        };
        if Owned::from_save(&live, &Default::default()).is_empty() {
            // Nothing of ours in the way: the restore's own error is the real one.
            return Err(restore_error);
        }
        tracing::debug!(%family, backend = self.name(), error = %restore_error, "ours already there; comparing");
        self.reconcile(family, payload, &live)
    }

    /// Ours are in the netns (`live`): nothing to do when identical to the ruleset, else one transaction per
    /// table that removes ours and loads the ruleset.
    fn reconcile(
        &self,
        family: Family,
        payload: &Payload,
        live: &Tables,
    ) -> Result<FamilyOutcome, ApplyError> {
        let canonical = self.tools.canonical(family, payload)?;
        let builtin = canonical.builtin_rules();
        let want = Owned::from_save(&canonical, &builtin);
        let have = Owned::from_save(live, &builtin);
        if want == have {
            tracing::info!(%family, backend = self.name(), "rules already in place, nothing to do");
            return Ok(FamilyOutcome::Unchanged);
        }
        tracing::info!(%family, backend = self.name(), ?have, "replacing different rules found in the netns");
        let input = compose(&have.removal(), Some(&payload.tables));
        self.tools.restore(family, &input)?;
        Ok(FamilyOutcome::Replaced)
    }

    /// Removes our chains and jumps of this family, and the ruleset's rules in built-in chains, from a fresh
    /// save. Returns whether there was anything to remove.
    fn remove_family(&self, family: Family, payload: &Payload) -> Result<bool, ApplyError> {
        let live = self.tools.save(family)?;
        if Owned::from_save(&live, &Default::default()).is_empty() {
            return Ok(false);
        }
        let canonical = self.tools.canonical_loadable(family, payload)?;
        let have = Owned::from_save(&live, &canonical.builtin_rules());
        self.tools
            .restore(family, &compose(&have.removal(), None))?;
        Ok(true)
    }

    fn log_final_state(&self, family: Family) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            match self.tools.save_text(family) {
                Ok(state) => {
                    tracing::debug!(%family, backend = self.name(), %state, "final iptables state")
                }
                Err(e) => {
                    tracing::debug!(%family, error = %e, "cannot read the final iptables state")
                }
            }
        }
    }
}

impl IptablesRestore {
    fn apply_payloads(&self, payloads: &Payloads) -> Result<Applied, ApplyError> {
        let v4 = match self.apply_family(Family::V4, &payloads.v4) {
            Ok(o) => o,
            Err(failed) => return Err(self.roll_back(payloads, &[Family::V4], failed)),
        };
        let v6 = match &payloads.v6 {
            None => None,
            Some(p6) => match self.apply_family(Family::V6, p6) {
                Ok(o) => Some(o),
                Err(failed) => {
                    tracing::warn!(error = %failed, "IPv6 rules failed; removing the IPv4 rules again");
                    return Err(self.roll_back(payloads, &[Family::V4, Family::V6], failed));
                }
            },
        };
        self.log_final_state(Family::V4);
        if payloads.v6.is_some() {
            self.log_final_state(Family::V6);
        }
        Ok(Applied { v4, v6 })
    }

    fn remove_payloads(&self, payloads: &Payloads) -> Result<bool, ApplyError> {
        let mut removed = self.remove_family(Family::V4, &payloads.v4)?;
        if let Some(p6) = &payloads.v6 {
            removed |= self.remove_family(Family::V6, p6)?;
        }
        Ok(removed)
    }
}

impl Backend for IptablesRestore {
    fn kind(&self) -> BackendKind {
        self.tools.flavour.kind()
    }

    fn apply(&self, capture: &Capture) -> Result<Applied, ApplyError> {
        self.apply_payloads(&Payloads::render(capture)?)
    }

    fn remove(&self, capture: &Capture) -> Result<bool, ApplyError> {
        self.remove_payloads(&Payloads::render(capture)?)
    }
}

impl IptablesRestore {
    /// After `failed`: removes ours from each of `attempted` (also the failed family itself: a legacy restore
    /// may have committed its first tables before a later one failed). A family whose tools proved unusable is
    /// left alone: its restore cannot have changed anything and its state cannot be read.
    fn roll_back(
        &self,
        payloads: &Payloads,
        attempted: &[Family],
        failed: ApplyError,
    ) -> ApplyError {
        let unusable_family = attempted.last().filter(|_| failed.is_unusable());
        for &family in attempted {
            if Some(&family) == unusable_family {
                continue;
            }
            let Some(payload) = payloads.get(family) else {
                continue;
            };
            if let Err(rollback) = self.remove_family(family, payload) {
                return ApplyError::RollbackFailed {
                    failed: Box::new(failed),
                    rollback: Box::new(rollback),
                };
            }
        }
        failed
    }
}

/// Istio's detection (`DetectIptablesVersion`), for the whole netns: the legacy flavour when it already holds
/// rules here (in any of `families`), else nft when its binaries are there, else legacy when they are. Runs on
/// the netns thread.
///
/// Cheap where it can be: legacy tables exist in a netns only once used, so `iptables-legacy-save` runs only
/// for a family that has some (a fresh pod netns has none), and its output is kept as the state check. nft is
/// not probed with a save: its restore reports whether it works, and when it fails and `iptables-nft-save`
/// fails too, the caller falls back to legacy ([`ApplyError::is_unusable`]).
///
/// Differences from Istio, on purpose: one flavour for both families (Istio decides per family, which could
/// split a pod between two flavours); "holds rules" means at least one rule, not "at least three lines of save
/// output" (an empty table left by a probe is not a ruleset); no test rule is added (the restore reports a
/// missing kernel feature itself, and a probe would leave a table behind).
pub fn detect(
    families: &[Family],
    env: Option<&IptablesEnv>,
) -> Result<IptablesRestore, ApplyError> {
    // A family without any legacy table holds no legacy rule: the legacy tools (and their lock's bind mount) are
    // only made when some family has tables to look at.
    let no_legacy_tables = families
        .iter()
        .all(|&f| legacy_tables(f).is_ok_and(|t| t.is_empty()));
    let legacy = if no_legacy_tables {
        None
    } else {
        let legacy = legacy_with_state(families, env);
        let has_rules = families.iter().any(|f| {
            matches!(&legacy.known.borrow()[IptablesRestore::slot(*f)], Known::Saved(t)
                if legacy.tools.parse_save(*f, t).is_ok_and(|t| t.has_rules()))
        });
        if has_rules {
            tracing::debug!("iptables-legacy already holds rules in this netns");
            return Ok(legacy);
        }
        Some(legacy)
    };
    let nft_error = match binaries_present(Flavour::Nft, families) {
        Ok(()) => return Ok(IptablesRestore::new(Flavour::Nft, None)),
        Err(e) => e,
    };
    match binaries_present(Flavour::Legacy, families) {
        Ok(()) => {
            tracing::debug!(error = %nft_error, "iptables-nft is not installed, using iptables-legacy");
            match legacy {
                Some(legacy) => Ok(legacy),
                None => Ok(legacy_with_state(families, env)),
            }
        }
        Err(legacy_error) => Err(ApplyError::NoUsableIptables {
            legacy: legacy_error.to_string(),
            nft: nft_error.to_string(),
        }),
    }
}

/// The legacy backend with what [`IptablesRestore::learn_state`] finds, for auto mode's fallback. Its tools
/// lock the pod's netns file ([`IptablesEnv::legacy_lock`]).
pub fn legacy_with_state(families: &[Family], env: Option<&IptablesEnv>) -> IptablesRestore {
    let legacy = IptablesRestore::new(Flavour::Legacy, env.map(IptablesEnv::legacy_lock));
    legacy.learn_state(families);
    legacy
}

fn binaries_present(flavour: Flavour, families: &[Family]) -> Result<(), ExecError> {
    for &family in families {
        exec::find_binary(&flavour.restore_binary(family))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names() {
        assert_eq!(
            Flavour::Legacy.save_binary(Family::V4),
            "iptables-legacy-save"
        );
        assert_eq!(
            Flavour::Nft.restore_binary(Family::V6),
            "ip6tables-nft-restore"
        );
        assert_eq!(Flavour::Nft.kind().name(), "iptables-nft");
        assert_eq!(Flavour::Legacy.kind().name(), "iptables-legacy");
    }
}
