//! The iptables backends: `iptables-legacy` and `iptables-nft`, both through their `*-save`/`*-restore` binaries.
//!
//! One `iptables-restore --noflush` transaction per family, with Istio's state check first:
//! - none of our chains or jumps in the netns: apply the ruleset as is;
//! - ours present and identical to the ruleset: nothing to do (a repeated ADD);
//! - ours present but different: remove ours and apply the ruleset, in the same transaction (per table), so
//!   there is no moment without rules and never two copies.
//!
//! "Identical" is decided on iptables-save's canonical text: the ruleset is loaded into a scratch netns with the
//! same binary and saved back, which gives exactly the text the pod netns shows for the same rules.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::exec::{self, ExecError};
use super::text::{compose, Owned, Tables};
use super::{
    sandbox, Applied, ApplyError, BackendKind, FamilyOutcome, FirewallBackend, Payload,
    ValidRuleset,
};

/// Upper bound for one iptables process.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// The environment variable iptables ≥ 1.8.6 reads for its lock file.
pub const XTABLES_LOCKFILE_ENV: &str = "XTABLES_LOCKFILE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

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
        format!("{}-{}-save", base(family), self.suffix())
    }

    /// `iptables-legacy-restore`, `ip6tables-nft-restore`, ...
    pub fn restore_binary(self, family: Family) -> String {
        format!("{}-{}-restore", base(family), self.suffix())
    }
}

fn base(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// Runs one flavour's tools. Plain data, so it can be handed to another thread (the scratch netns).
#[derive(Debug, Clone)]
struct Tools {
    flavour: Flavour,
    lockfile: Option<PathBuf>,
}

impl Tools {
    fn run(&self, binary: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        let path = exec::find_binary(binary)?;
        let env: Vec<(&str, &OsStr)> = self
            .lockfile
            .as_deref()
            .map(|l| (XTABLES_LOCKFILE_ENV, l.as_os_str()))
            .into_iter()
            .collect();
        exec::run(&path, args, &env, stdin, TOOL_TIMEOUT)
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

    fn restore(&self, family: Family, input: &str) -> Result<(), ApplyError> {
        let binary = self.flavour.restore_binary(family);
        tracing::debug!(%binary, %input, "iptables-restore --noflush");
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
}

/// An iptables flavour driven through its restore binaries.
#[derive(Debug)]
pub struct IptablesRestore {
    tools: Tools,
    /// Save outputs read during detection, used (once) instead of saving again.
    prefetched: RefCell<[Option<String>; 2]>,
}

impl IptablesRestore {
    /// A backend of the given flavour. `lockfile` is the pod-scoped xtables lock its children use.
    pub fn new(flavour: Flavour, lockfile: Option<&Path>) -> Self {
        IptablesRestore {
            tools: Tools {
                flavour,
                lockfile: lockfile.map(Path::to_path_buf),
            },
            prefetched: RefCell::new([None, None]),
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

    /// The netns's current tables of this family.
    fn live(&self, family: Family) -> Result<Tables, ApplyError> {
        let pre = self.prefetched.borrow_mut()[Self::slot(family)].take();
        match pre {
            Some(text) => self.tools.parse_save(family, &text),
            None => self.tools.save(family),
        }
    }

    fn apply_family(&self, family: Family, payload: &Payload) -> Result<FamilyOutcome, ApplyError> {
        let live = self.live(family)?;
        let residue = Owned::from_save(&live, &Default::default());
        if residue.is_empty() {
            self.tools.restore(family, &payload.text)?;
            return Ok(FamilyOutcome::Applied);
        }
        let canonical = self.tools.canonical(family, payload)?;
        let builtin = canonical.builtin_rules();
        let want = Owned::from_save(&canonical, &builtin);
        let have = Owned::from_save(&live, &builtin);
        if want == have {
            tracing::info!(%family, backend = self.name(), "rules already in place, nothing to do");
            return Ok(FamilyOutcome::Unchanged);
        }
        tracing::info!(%family, backend = self.name(), ?have, "replacing different rules found in the netns");
        let input = compose(&have.removal(), Some(&payload.tables));
        self.tools.restore(family, &input)?;
        Ok(FamilyOutcome::Replaced)
    }

    /// Removes our chains and jumps of this family, and the ruleset's rules in built-in chains. Returns whether
    /// there was anything to remove.
    fn remove_family(&self, family: Family, payload: &Payload) -> Result<bool, ApplyError> {
        let live = self.live(family)?;
        if Owned::from_save(&live, &Default::default()).is_empty() {
            return Ok(false);
        }
        let canonical = self.tools.canonical(family, payload)?;
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

impl FirewallBackend for IptablesRestore {
    fn kind(&self) -> BackendKind {
        self.tools.flavour.kind()
    }

    fn apply(&self, rules: &ValidRuleset) -> Result<Applied, ApplyError> {
        let v4 = self.apply_family(Family::V4, &rules.v4)?;
        let v6 = match &rules.v6 {
            None => None,
            Some(p6) => match self.apply_family(Family::V6, p6) {
                Ok(o) => Some(o),
                Err(failed) => {
                    tracing::warn!(error = %failed, "IPv6 rules failed; removing the IPv4 rules again");
                    return Err(match self.remove_family(Family::V4, &rules.v4) {
                        Ok(_) => failed,
                        Err(rollback) => ApplyError::RollbackFailed {
                            failed: Box::new(failed),
                            rollback: Box::new(rollback),
                        },
                    });
                }
            },
        };
        self.log_final_state(Family::V4);
        if rules.v6.is_some() {
            self.log_final_state(Family::V6);
        }
        Ok(Applied { v4, v6 })
    }

    fn remove(&self, rules: &ValidRuleset) -> Result<bool, ApplyError> {
        let mut removed = self.remove_family(Family::V4, &rules.v4)?;
        if let Some(p6) = &rules.v6 {
            removed |= self.remove_family(Family::V6, p6)?;
        }
        Ok(removed)
    }
}

/// Istio's detection (`DetectIptablesVersion`), for the whole netns: the legacy flavour when it already holds
/// rules here (in any family we program), else nft when its binaries work, else legacy when they work. The save
/// outputs read on the way are kept so the state check does not read them again.
///
/// Differences from Istio, on purpose: one flavour for both families (Istio decides per family, which could
/// split a pod between two flavours); "holds rules" means at least one rule, not "at least three lines of save
/// output" (an empty table left by a probe is not a ruleset); no test rule is added (the restore reports a
/// missing kernel feature itself, and a probe would leave a table behind).
pub fn detect(families: &[Family], lockfile: Option<&Path>) -> Result<IptablesRestore, ApplyError> {
    let legacy = IptablesRestore::new(Flavour::Legacy, lockfile);
    let legacy_saves = saves(&legacy, families);
    if let Ok(texts) = &legacy_saves {
        let has_rules = texts.iter().any(|(fam, t)| {
            legacy
                .tools
                .parse_save(*fam, t)
                .map(|t| t.has_rules())
                .unwrap_or(false)
        });
        if has_rules {
            tracing::debug!("iptables-legacy already holds rules in this netns");
            return Ok(with_prefetched(legacy, texts));
        }
    }
    let nft = IptablesRestore::new(Flavour::Nft, lockfile);
    let nft_error = match saves(&nft, families) {
        Ok(texts) => return Ok(with_prefetched(nft, &texts)),
        Err(e) => e,
    };
    match legacy_saves {
        Ok(texts) => {
            tracing::debug!(error = %nft_error, "iptables-nft is not usable, using iptables-legacy");
            Ok(with_prefetched(legacy, &texts))
        }
        Err(legacy_error) => Err(ApplyError::NoUsableIptables {
            legacy: legacy_error.to_string(),
            nft: nft_error.to_string(),
        }),
    }
}

fn saves(b: &IptablesRestore, families: &[Family]) -> Result<Vec<(Family, String)>, ExecError> {
    families
        .iter()
        .map(|f| b.tools.save_text(*f).map(|t| (*f, t)))
        .collect()
}

fn with_prefetched(b: IptablesRestore, texts: &[(Family, String)]) -> IptablesRestore {
    {
        let mut slots = b.prefetched.borrow_mut();
        for (f, t) in texts {
            slots[IptablesRestore::slot(*f)] = Some(t.clone());
        }
    }
    b
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
