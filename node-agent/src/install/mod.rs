//! The installer: desired state (binary present and identical, kubeconfig current, our entry last in the primary
//! conflist) against the actual files, fixed with atomic writes. `reconcile` is idempotent and never rewrites a file
//! that is already right, so its own writes cannot make it loop. Only the node's owner (`owner`: the newest agent
//! while it runs) writes or removes anything, so two agents on one node (a rolling update) never fight either.

pub mod atomic;
pub mod binaries;
pub mod conflist;
pub mod fight;
pub mod gojson;
pub mod kubeconfig;
pub mod owner;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::Config;
use atomic::Attrs;
use binaries::Binaries;
use fight::FightDetector;
use owner::{DirLock, Ownership, Record, Standing};

/// How long a reconcile waits for another agent to release the run dir (it holds it for one reconcile: ms).
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Which step failed: the `result` label of `istio_cni_installs_total`, as Istio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    CopyBinaries,
    CreateKubeconfig,
    CreateCniConfig,
    /// Telling whether this agent owns the node (the run dir's lock or owner record).
    Ownership,
}

impl Step {
    pub fn result_label(self) -> &'static str {
        match self {
            Step::CopyBinaries => "COPY_BINARIES_FAILURE",
            Step::CreateKubeconfig => "CREATE_KUBECONFIG_FAILURE",
            Step::CreateCniConfig => "CREATE_CNI_CONFIG_FAILURE",
            Step::Ownership => "OWNERSHIP_FAILURE",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Binaries(#[from] binaries::BinariesError),
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Conflist(#[from] conflist::ConflistError),
    #[error(transparent)]
    Write(#[from] atomic::AtomicError),
    #[error(transparent)]
    Owner(#[from] owner::OwnerError),
    #[error("CA bundle {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kubeconfig::KubeconfigError,
    },
}

fn read_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How the last reconcile left the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Binary, kubeconfig and entry all in place.
    Ready,
    /// No primary CNI configuration yet (chained mode): waiting for the primary CNI to write one.
    WaitingForPrimary { dir: PathBuf },
    /// Another writer keeps reverting the file: our rewrites are rate-limited (`fight::MIN_INTERVAL` apart) and the
    /// agent is not ready. Reconcile again at `until`: the next allowed rewrite, or the end of the fight.
    BackingOff { file: PathBuf, until: Instant },
    /// A step failed (retried later).
    Failed { step: Step, error: String },
    /// A newer agent on this node (a rolling update's next one) owns the installation: this one writes nothing.
    Superseded { by: Record },
}

/// What one reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub status: Status,
    /// Files written (or removed, for a converted `.conf`), in order.
    pub changed: Vec<PathBuf>,
}

pub struct Installer {
    cfg: Config,
    binaries: Binaries,
    /// The file holding our entry (chained) or our standalone file, once written or found right.
    installed_conf: Option<PathBuf>,
    fight: FightDetector,
    owner: Ownership,
}

impl Installer {
    /// Snapshots the source binaries, claims the node (this agent is the newest) and removes temp files a crashed
    /// run may have left.
    pub fn new(cfg: Config) -> Result<Self, InstallError> {
        let binaries = Binaries::snapshot(&cfg.source_dir, &cfg.bin_dir)?;
        // Under the run dir's lock: no other agent is in the middle of a write whose temp file this would take for
        // a crash's leftover, and this agent's own claim comes after the cleanup (a kill in between leaves the
        // temp files of one agent at most).
        let (owner, previous) = Ownership::claim(
            &cfg.run_dir,
            Record::this(&cfg.pod_name),
            LOCK_WAIT,
            || {
                let mut stale =
                    atomic::remove_stale_temps(&cfg.bin_dir, |t| binaries.is_managed(t));
                stale.extend(atomic::remove_stale_temps(&cfg.run_dir, |t| {
                    t == cni_plugin::config::KUBECONFIG_NAME || t == owner::OWNER_FILE
                }));
                stale.extend(atomic::remove_stale_temps(
                    &cfg.conf_dir,
                    conflist::is_config_name,
                ));
                for path in stale {
                    tracing::info!(path = %path.display(), "removed a temp file left by an interrupted write");
                }
            },
        )?;
        if let Some(previous) = previous {
            tracing::info!(
                previous = %previous,
                "another agent is still running on this node (a rolling update): this newer one takes over the installation"
            );
        }
        Ok(Installer {
            cfg,
            binaries,
            installed_conf: None,
            fight: FightDetector::default(),
            owner,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Names of the binaries we install (to filter bin-dir events).
    pub fn binary_names(&self) -> Vec<String> {
        self.binaries.names().map(String::from).collect()
    }

    /// Whether a fight with another writer is on (whatever the last reconcile found: a torn read of the fighter's
    /// in-place write in the middle of it is no end of the fight).
    pub fn fighting(&self, now: Instant) -> bool {
        self.fight.fighting(now).is_some()
    }

    /// The file holding our entry, if any.
    pub fn installed_conf(&self) -> Option<&Path> {
        self.installed_conf.as_deref()
    }

    /// One pass, under the run dir's lock, if this agent owns the node (taking it over when its owner is gone):
    /// binaries, then kubeconfig, then the CNI configuration. A failing step stops the pass (an entry must never
    /// point at a missing binary or kubeconfig).
    pub fn reconcile(&mut self, now: Instant) -> Report {
        let owned = self.owner.lock_dir(LOCK_WAIT).and_then(|lock| {
            let standing = self.owner.standing(&lock)?;
            if let Standing::Vacant { last } = &standing {
                self.owner.take_over(&lock)?;
                match last {
                    Some(last) => tracing::info!(previous = %last, "the agent that owned this node is gone: taking the installation over"),
                    None => tracing::debug!("no owner record: claimed the node again"),
                }
            }
            Ok((lock, standing))
        });
        match owned {
            Err(e) => failed(Step::Ownership, e, Vec::new()),
            Ok((_, Standing::Superseded { by })) => Report {
                status: Status::Superseded { by },
                changed: Vec::new(),
            },
            Ok((_lock, Standing::Owner | Standing::Vacant { .. })) => self.reconcile_owned(now),
        }
    }

    fn reconcile_owned(&mut self, now: Instant) -> Report {
        let mut changed = Vec::new();
        match self.binaries.ensure() {
            Ok(written) => {
                for p in &written {
                    tracing::info!(path = %p.display(), "installed plugin binary");
                }
                changed.extend(written);
            }
            Err(e) => return failed(Step::CopyBinaries, e, changed),
        }
        match self.ensure_kubeconfig() {
            Ok(Some(p)) => changed.push(p),
            Ok(None) => {}
            Err(e) => return failed(Step::CreateKubeconfig, e, changed),
        }
        let result = if self.cfg.chained {
            self.ensure_chained(now, &mut changed)
        } else {
            self.ensure_standalone(now, &mut changed)
        };
        match result {
            Ok(status) => Report { status, changed },
            Err(e) => failed(Step::CreateCniConfig, e, changed),
        }
    }

    fn ensure_kubeconfig(&self) -> Result<Option<PathBuf>, InstallError> {
        let token_path = self.cfg.token_path();
        let token = fs::read_to_string(&token_path)
            .map(cni_plugin::redact::Secret::new)
            .map_err(read_err("service-account token", &token_path))?;
        // A rotated token is a new secret: known to the log scrubber before anything can quote it.
        cni_plugin::redact::register(token.expose());
        let ca;
        let trust = if self.cfg.skip_tls_verify {
            kubeconfig::Trust::SkipVerify
        } else {
            ca = fs::read(&self.cfg.ca_file).map_err(read_err("CA bundle", &self.cfg.ca_file))?;
            kubeconfig::Trust::Ca(&ca)
        };
        let desired =
            kubeconfig::render(&self.cfg.api_server, &trust, token.expose()).map_err(|source| {
                InstallError::Kubeconfig {
                    path: self.cfg.ca_file.clone(),
                    source,
                }
            })?;
        let path = self.cfg.kubeconfig_path();
        if file_is(&path, desired.as_bytes(), Some(self.cfg.kubeconfig_mode)) {
            return Ok(None);
        }
        atomic::write(
            &path,
            desired.as_bytes(),
            Attrs::mode(self.cfg.kubeconfig_mode),
        )?;
        tracing::info!(path = %path.display(), server = %self.cfg.api_server.url(), "wrote kubeconfig");
        Ok(Some(path))
    }

    /// Reads the `.conf`/`.conflist` files of the conf dir (a file vanishing meanwhile is skipped).
    fn read_conf_dir(&self) -> Result<Vec<(String, Vec<u8>)>, InstallError> {
        let dir = &self.cfg.conf_dir;
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err("CNI configuration dir", dir))? {
            let entry = entry.map_err(read_err("CNI configuration dir", dir))?;
            let Some(name) = entry.file_name().to_str().map(String::from) else {
                continue;
            };
            if !conflist::is_config_name(&name) {
                continue;
            }
            match read_config_file(&entry.path()) {
                Ok(Some(bytes)) => files.push((name, bytes)),
                // A directory, FIFO or socket named like a config, or a file removed since listing: not a
                // configuration (kubelet could not load it either).
                Ok(None) => {}
                Err(e) => {
                    return Err(InstallError::Read {
                        what: "CNI configuration",
                        path: entry.path(),
                        source: e,
                    })
                }
            }
        }
        Ok(files)
    }

    fn ensure_chained(
        &mut self,
        now: Instant,
        changed: &mut Vec<PathBuf>,
    ) -> Result<Status, InstallError> {
        let files = self.read_conf_dir()?;
        let primary = match &self.cfg.conf_name {
            Some(name) => conflist::resolve_named(name, |n| files.iter().any(|(f, _)| f == n)),
            None => {
                let (primary, skipped) = conflist::choose_primary(&files);
                for (name, reason) in skipped {
                    tracing::debug!(file = name, reason = %reason, "skipped invalid CNI configuration");
                }
                primary.map(String::from)
            }
        };
        let Some(primary) = primary else {
            return Ok(Status::WaitingForPrimary {
                dir: self.cfg.conf_dir.clone(),
            });
        };
        let source_path = self.cfg.conf_dir.join(&primary);
        let bytes = files
            .iter()
            .find(|(n, _)| *n == primary)
            .map(|(_, b)| b.as_slice())
            .unwrap_or_default();
        let file = source_path.display().to_string();
        let existing = conflist::parse(&file, bytes)?;
        let desired = conflist::insert_entry(&file, &existing, &self.cfg.entry.entry())?;
        let target_name = conflist::target_name(&primary);
        let target = self.cfg.conf_dir.join(&target_name);
        // Our entry lives in a regular file of the conf dir: a primary that is a symlink (read through, as kubelet
        // does) is replaced by a file of its own, never written through; the file it points to is left as it is.
        let regular = fs::symlink_metadata(&target).is_ok_and(|md| md.is_file());
        if !regular && target_name == primary {
            tracing::info!(path = %target.display(), "the primary CNI configuration is not a regular file (a symlink?): writing ours in its place, leaving what it points to alone");
        }
        if target_name == primary && desired == existing && regular {
            self.switch_installed(&target);
            return Ok(self.fight_status(now, target));
        }
        if let Err(until) = self.fight.allowed(now) {
            return Ok(Status::BackingOff {
                file: target,
                until,
            });
        }
        let attrs = Attrs::of(&source_path).unwrap_or(Attrs::mode(0o644));
        atomic::write(&target, &conflist::render(&desired), attrs)?;
        changed.push(target.clone());
        if target_name != primary {
            // A single-plugin .conf became a list: the list now lives in .conflist, the .conf goes (written first,
            // removed second: a crash in between leaves both, which the next start resolves the same way).
            match fs::remove_file(&source_path) {
                Ok(()) => changed.push(source_path.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(InstallError::Read {
                        what: "remove converted",
                        path: source_path,
                        source: e,
                    })
                }
            }
            tracing::info!(from = %source_path.display(), to = %target.display(), "converted single-plugin configuration to a list");
        }
        tracing::info!(path = %target.display(), "inserted istio-cni into the CNI configuration");
        self.note_rewrite(now, &target);
        self.switch_installed(&target);
        Ok(self.fight_status(now, target))
    }

    fn ensure_standalone(
        &mut self,
        now: Instant,
        changed: &mut Vec<PathBuf>,
    ) -> Result<Status, InstallError> {
        let name = self
            .cfg
            .conf_name
            .clone()
            .unwrap_or_else(|| conflist::DEFAULT_STANDALONE_NAME.to_string());
        let path = self.cfg.conf_dir.join(name);
        let right = match atomic::read_regular(&path) {
            Ok(Some((bytes, mode))) => {
                mode == self.cfg.standalone_mode
                    && serde_json::from_slice::<Value>(&bytes)
                        .is_ok_and(|v| v == self.cfg.entry.standalone_value())
            }
            _ => false,
        };
        if right {
            self.installed_conf = Some(path.clone());
            return Ok(self.fight_status(now, path));
        }
        if let Err(until) = self.fight.allowed(now) {
            return Ok(Status::BackingOff { file: path, until });
        }
        atomic::write(
            &path,
            &self.cfg.entry.standalone_file(),
            Attrs::mode(self.cfg.standalone_mode),
        )?;
        tracing::info!(path = %path.display(), "wrote standalone istio-cni configuration");
        changed.push(path.clone());
        self.note_rewrite(now, &path);
        self.installed_conf = Some(path.clone());
        Ok(self.fight_status(now, path))
    }

    /// The entry is in place: ready, unless a fight is still on (then not ready until it is over).
    fn fight_status(&self, now: Instant, file: PathBuf) -> Status {
        match self.fight.fighting(now) {
            Some(until) => Status::BackingOff { file, until },
            None => Status::Ready,
        }
    }

    fn note_rewrite(&mut self, now: Instant, path: &Path) {
        if self.fight.record(now) {
            let file = path.display().to_string();
            tracing::warn!(
                file = %file,
                rewrites = self.fight.recent(),
                window_ms = fight::WINDOW.as_millis() as u64,
                min_interval_ms = fight::MIN_INTERVAL.as_millis() as u64,
                "{file} has been changed back and reconciled many times in a short period: a conflicting component \
                 keeps reverting our configuration; rewriting it at most every {} ms until it stops.{}",
                fight::MIN_INTERVAL.as_millis(),
                fight::hint(&file)
            );
        }
    }

    /// Records the file holding our entry; when the primary moved to another file, our entry leaves the old one.
    fn switch_installed(&mut self, target: &Path) {
        if let Some(old) = self.installed_conf.replace(target.to_path_buf()) {
            if old != target && old.exists() {
                match remove_entry_from(&old) {
                    Ok(true) => {
                        tracing::info!(path = %old.display(), "removed istio-cni from the previous primary configuration")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(path = %old.display(), error = %e, "cannot remove istio-cni from the previous primary configuration")
                    }
                }
            }
        }
    }

    /// Locks the run dir (waiting up to `wait`) and tells where this agent stands: what it may still do on shutdown.
    pub fn standing(&self, wait: Duration) -> Result<(DirLock, Standing), InstallError> {
        let lock = self.owner.lock_dir(wait)?;
        let standing = self.owner.standing(&lock)?;
        Ok((lock, standing))
    }

    /// Leaves the installation in place for the next agent and gives the claim up.
    pub fn release(&mut self, lock: &DirLock) -> Result<(), InstallError> {
        self.owner.release(lock)?;
        Ok(())
    }

    /// Removes everything of ours (the entry or the standalone file, the kubeconfig, the binaries), then gives the
    /// claim up. Only for an agent that is not superseded (see [`Self::standing`]; `lock` is its lock). Returns the
    /// first error, after trying every step.
    pub fn uninstall(&mut self, lock: &DirLock) -> Result<(), InstallError> {
        let removed = self.remove_all();
        self.owner.release(lock)?;
        removed
    }

    fn remove_all(&mut self) -> Result<(), InstallError> {
        let mut first_err = None;
        if let Some(path) = self.installed_conf.take() {
            let result = if self.cfg.chained {
                remove_entry_from(&path).map(|removed| {
                    if removed {
                        tracing::info!(path = %path.display(), "removed istio-cni from the CNI configuration");
                    }
                })
            } else {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed standalone configuration");
                        Ok(())
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(InstallError::Read {
                        what: "remove",
                        path: path.clone(),
                        source: e,
                    }),
                }
            };
            if let Err(e) = result {
                first_err.get_or_insert(e);
            }
        }
        let kc = self.cfg.kubeconfig_path();
        match fs::remove_file(&kc) {
            Ok(()) => tracing::info!(path = %kc.display(), "removed kubeconfig"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_err.get_or_insert(InstallError::Read {
                    what: "remove",
                    path: kc.clone(),
                    source: e,
                });
            }
        }
        for p in self.binaries.remove_all() {
            tracing::info!(path = %p.display(), "removed plugin binary");
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Makes the service-account token known to the log scrubber (`cni_plugin::redact`); a token that cannot be read
/// yet is registered by the reconcile that reads it.
pub fn register_token(cfg: &Config) {
    if let Ok(token) = fs::read_to_string(cfg.token_path()) {
        cni_plugin::redact::register(&token);
    }
}

fn failed(step: Step, error: impl std::fmt::Display, changed: Vec<PathBuf>) -> Report {
    Report {
        status: Status::Failed {
            step,
            error: error.to_string(),
        },
        changed,
    }
}

/// Is there a regular file at `path` itself (a symlink is not followed: it is never "our file", whatever it points
/// to) whose content is exactly `content` and, when given, whose mode is `mode`?
fn file_is(path: &Path, content: &[u8], mode: Option<u32>) -> bool {
    matches!(
        atomic::read_regular(path),
        Ok(Some((bytes, m))) if bytes == content && mode.is_none_or(|want| want == m)
    )
}

/// A configuration file of the conf dir, as kubelet reads it: symlinks followed (a primary CNI may keep its file
/// elsewhere), but only a regular file is read, and never waited on (`O_NONBLOCK`: a FIFO planted there cannot
/// hang the reconcile). `None`: gone, or not a regular file.
fn read_config_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::IsADirectory => return Ok(None),
        // A socket (ENXIO) is not a configuration either.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Removes our entry from a conflist, preserving its mode and owner. `Ok(false)` when there was none (or no file).
fn remove_entry_from(path: &Path) -> Result<bool, InstallError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        // Gone (the primary CNI removed it): nothing of ours left in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(InstallError::Read {
                what: "CNI configuration",
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let file = path.display().to_string();
    let existing = conflist::parse(&file, &bytes)?;
    if !conflist::has_entry(&existing) {
        return Ok(false);
    }
    let cleaned = conflist::remove_entry(&file, &existing)?;
    let attrs = Attrs::of(path).unwrap_or(Attrs::mode(0o644));
    atomic::write(path, &conflist::render(&cleaned), attrs)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use clap::Parser;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn node(tag: &str) -> (PathBuf, Config) {
        let root =
            std::env::temp_dir().join(format!("meshcni-installer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["conf", "bin", "src", "run", "sa"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("src/istio-cni"), b"plugin").unwrap();
        fs::set_permissions(
            root.join("src/istio-cni"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::write(root.join("sa/token"), "tok").unwrap();
        fs::write(root.join("sa/ca.crt"), "ca").unwrap();
        let p = |d: &str| root.join(d).display().to_string();
        let args = Args::try_parse_from([
            "node-agent".to_string(),
            format!("--mounted-cni-net-dir={}", p("conf")),
            format!("--mounted-cni-bin-dir={}", p("bin")),
            format!("--cni-binaries-source-dir={}", p("src")),
            format!("--cni-agent-run-dir={}", p("run")),
            format!("--service-account-dir={}", p("sa")),
            "--kubernetes-service-host=10.0.0.1".to_string(),
            "--kubernetes-service-port=443".to_string(),
            "--daemonset-name=".to_string(),
        ])
        .unwrap();
        (root, args.validate().unwrap())
    }

    #[test]
    fn reconcile_is_idempotent() {
        let (root, cfg) = node("idem");
        let mut inst = Installer::new(cfg).unwrap();
        let t0 = Instant::now();
        let first = inst.reconcile(t0);
        assert!(
            matches!(first.status, Status::WaitingForPrimary { .. }),
            "{first:?}"
        );
        assert_eq!(
            first.changed.len(),
            2,
            "binary and kubeconfig first: {first:?}"
        );
        fs::write(
            root.join("conf/10-bridge.conf"),
            br#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        let second = inst.reconcile(t0);
        assert_eq!(second.status, Status::Ready);
        let list = root.join("conf/10-bridge.conflist");
        assert_eq!(
            second.changed,
            vec![list.clone(), root.join("conf/10-bridge.conf")]
        );
        let ino = fs::metadata(&list).unwrap().ino();
        for _ in 0..3 {
            let again = inst.reconcile(t0);
            assert_eq!(
                again,
                Report {
                    status: Status::Ready,
                    changed: vec![]
                }
            );
        }
        assert_eq!(
            fs::metadata(&list).unwrap().ino(),
            ino,
            "a right file is never rewritten"
        );
        let (lock, standing) = inst.standing(LOCK_WAIT).unwrap();
        assert_eq!(standing, Standing::Owner);
        inst.uninstall(&lock).unwrap();
        assert!(!root.join("run").join(owner::OWNER_FILE).exists());
        let v: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
        assert!(!conflist::has_entry(&v) && v["plugins"].as_array().unwrap().len() == 1);
        assert!(
            !root.join("bin/istio-cni").exists() && !root.join("run/istio-cni-kubeconfig").exists()
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn failing_binary_step_writes_no_entry() {
        let (root, cfg) = node("fail");
        fs::write(
            root.join("conf/10-bridge.conflist"),
            br#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let mut inst = Installer::new(cfg).unwrap();
        // The host bin dir turns read-only for us: replace it with a file.
        fs::remove_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin"), b"").unwrap();
        let report = inst.reconcile(Instant::now());
        assert!(
            matches!(
                report.status,
                Status::Failed {
                    step: Step::CopyBinaries,
                    ..
                }
            ),
            "{report:?}"
        );
        let v: Value =
            serde_json::from_slice(&fs::read(root.join("conf/10-bridge.conflist")).unwrap())
                .unwrap();
        assert!(
            !conflist::has_entry(&v),
            "an entry must not point at a missing binary"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
