//! Which agent owns this node's installation, when two run at once: a rolling update that starts the new pod
//! before the old one has finished (a surge, a force-deleted pod whose process still shuts down), or a second agent
//! started by hand. Without an owner they would fight: each agent writes its own binary (two versions during an
//! upgrade), its own kubeconfig (each pod has its own token) and its own entry (another ConfigMap), and each write
//! wakes the other. And the old one's cleanup would remove what the new one installed.
//!
//! The newest agent owns the node. Each agent claims it at start by writing `<run dir>/agent.owner` (its pod, pid
//! and start time; atomically, and locked with `flock` before it is renamed into place) and keeps that file open and
//! locked for as long as it runs. An agent is the owner while the file is the one it wrote; once a newer agent has
//! replaced it, the older one is superseded: it writes nothing and removes nothing. Whether the owner is still
//! alive is the lock: the kernel releases it when the process ends, however it ends (SIGKILL included). An owner
//! that is gone (no file, or a file nobody holds) leaves the node vacant, and the next agent to look takes over.
//!
//! Every check and every change of the installation (a reconcile, the cleanup, a claim) happens under an exclusive
//! `flock` of the run dir itself, so a claim can never fall between an old agent's check and its removals.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::atomic::{self, Attrs};

/// The owner record's name in the run dir.
pub const OWNER_FILE: &str = "agent.owner";
/// How often a lock held by another agent is tried again.
const LOCK_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("{path}: locked by another agent for more than {waited_ms} ms")]
    Busy { path: PathBuf, waited_ms: u64 },
    /// Reading, locking or removing a file.
    #[error("{op} {path}: {}", atomic::errno_text(source))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the owner record.
    #[error(transparent)]
    Write(#[from] atomic::AtomicError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OwnerError + 'a {
    move |source| OwnerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Who an agent is, as its owner record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its pod (POD_NAME; empty outside a pod).
    pub pod: String,
    pub pid: u32,
    /// RFC 3339.
    pub started: String,
}

impl Record {
    /// This process.
    pub fn this(pod: &str) -> Record {
        Record {
            pod: pod.to_string(),
            pid: std::process::id(),
            started: cni_plugin::report::now(),
        }
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.pod.is_empty() {
            write!(f, "pod {} ", self.pod)?;
        }
        write!(f, "(pid {}, started {})", self.pid, self.started)
    }
}

/// Where an agent stands, as the run dir says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// The owner file is the one this agent wrote.
    Owner,
    /// No live owner: no owner file, or one whose agent is gone (`last`, when its record was readable).
    Vacant { last: Option<Record> },
    /// A live agent replaced this one's claim.
    Superseded { by: Record },
}

/// The run dir, locked: held while the installation is checked or changed.
pub struct DirLock {
    _lock: Flock<File>,
}

/// This agent's claim.
pub struct Ownership {
    dir: PathBuf,
    path: PathBuf,
    record: Record,
    /// The owner file this agent wrote, locked for its lifetime; `None` once released.
    held: Option<(Flock<File>, (u64, u64))>,
}

fn file_id(md: &fs::Metadata) -> (u64, u64) {
    (md.dev(), md.ino())
}

/// Waits up to `wait` for an exclusive lock on `file`.
fn lock_within(file: File, path: &Path, wait: Duration) -> Result<Flock<File>, OwnerError> {
    let start = Instant::now();
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK)) => {
                if start.elapsed() >= wait {
                    return Err(OwnerError::Busy {
                        path: path.to_path_buf(),
                        waited_ms: start.elapsed().as_millis() as u64,
                    });
                }
                file = f;
                std::thread::sleep(LOCK_POLL);
            }
            Err((_, e)) => return Err(io_err("lock", path)(e.into())),
        }
    }
}

impl Ownership {
    /// Claims the node for this agent (whoever owned it before), under the run dir's lock, after `first` (which runs
    /// under that lock too). Returns the claim and the previous owner if it is still running (a rolling update's
    /// old agent).
    pub fn claim(
        dir: &Path,
        record: Record,
        wait: Duration,
        first: impl FnOnce(),
    ) -> Result<(Ownership, Option<Record>), OwnerError> {
        let mut own = Ownership {
            dir: dir.to_path_buf(),
            path: dir.join(OWNER_FILE),
            record,
            held: None,
        };
        let lock = own.lock_dir(wait)?;
        first();
        let previous = match own.standing(&lock)? {
            Standing::Superseded { by } => Some(by),
            Standing::Owner | Standing::Vacant { .. } => None,
        };
        own.write_claim(&lock)?;
        Ok((own, previous))
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Locks the run dir, waiting up to `wait` for another agent to release it.
    pub fn lock_dir(&self, wait: Duration) -> Result<DirLock, OwnerError> {
        let dir = File::open(&self.dir).map_err(io_err("open", &self.dir))?;
        Ok(DirLock {
            _lock: lock_within(dir, &self.dir, wait)?,
        })
    }

    /// Where this agent stands (under the run dir's lock, so that nobody claims meanwhile).
    pub fn standing(&self, _lock: &DirLock) -> Result<Standing, OwnerError> {
        let md = match fs::symlink_metadata(&self.path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Standing::Vacant { last: None });
            }
            Err(e) => return Err(io_err("stat", &self.path)(e)),
        };
        if self
            .held
            .as_ref()
            .is_some_and(|(_, id)| *id == file_id(&md))
        {
            return Ok(Standing::Owner);
        }
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Standing::Vacant { last: None });
            }
            Err(e) => return Err(io_err("open", &self.path)(e)),
        };
        let record = fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
        // Its agent holds it locked while it runs: a lock we can take means that agent is gone.
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_released_on_drop) => Ok(Standing::Vacant { last: record }),
            Err((_, Errno::EWOULDBLOCK)) => Ok(Standing::Superseded {
                by: record.unwrap_or(Record {
                    pod: "(unreadable owner record)".into(),
                    pid: 0,
                    started: String::new(),
                }),
            }),
            Err((_, e)) => Err(io_err("lock", &self.path)(e.into())),
        }
    }

    /// Makes this agent the owner again (after [`Standing::Vacant`]).
    pub fn take_over(&mut self, lock: &DirLock) -> Result<(), OwnerError> {
        self.write_claim(lock)
    }

    fn write_claim(&mut self, _lock: &DirLock) -> Result<(), OwnerError> {
        let mut body = serde_json::to_vec(&self.record)
            .map_err(|e| io_err("encode the owner record for", &self.path)(e.into()))?;
        body.push(b'\n');
        let mut held = None;
        atomic::write_held(&self.path, &body, Attrs::mode(0o600), |f| {
            // A duplicate shares the open file (and its lock) with `f`: it keeps the lock after `f` is closed.
            let dup = f.try_clone()?;
            let id = file_id(&dup.metadata()?);
            let lock = Flock::lock(dup, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            held = Some((lock, id));
            Ok(())
        })?;
        // The previous claim's file (replaced by a newer agent, then left) is released here.
        self.held = held;
        Ok(())
    }

    /// Gives the claim up: removes the owner file if it is still this agent's, or its agent is gone (under the run
    /// dir's lock). Whether a file was removed.
    pub fn release(&mut self, lock: &DirLock) -> Result<bool, OwnerError> {
        let removed = match self.standing(lock)? {
            Standing::Superseded { .. } => false,
            Standing::Owner | Standing::Vacant { .. } => match fs::remove_file(&self.path) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err("remove", &self.path)(e)),
            },
        };
        self.held = None;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(200);

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshcni-owner-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn standing(o: &Ownership) -> Standing {
        let lock = o.lock_dir(WAIT).unwrap();
        o.standing(&lock).unwrap()
    }

    // flock locks belong to open files, not processes: two claims in one process behave as two agents.
    #[test]
    fn the_newest_claim_owns_and_the_older_one_is_superseded() {
        let d = dir("newest");
        let (old, previous) = Ownership::claim(&d, Record::this("old"), WAIT, || {}).unwrap();
        assert_eq!(previous, None);
        assert_eq!(standing(&old), Standing::Owner);
        let (new, previous) = Ownership::claim(&d, Record::this("new"), WAIT, || {}).unwrap();
        assert_eq!(previous.map(|r| r.pod), Some("old".to_string()));
        assert_eq!(standing(&new), Standing::Owner);
        match standing(&old) {
            Standing::Superseded { by } => assert_eq!(by.pod, "new"),
            other => panic!("{other:?}"),
        }
        let text = fs::read_to_string(d.join(OWNER_FILE)).unwrap();
        assert!(text.contains("\"pod\":\"new\""), "{text}");
        assert_eq!(
            fs::metadata(d.join(OWNER_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_gone_owner_leaves_the_node_vacant_and_it_can_be_taken_over() {
        let d = dir("gone");
        let (mut old, _) = Ownership::claim(&d, Record::this("old"), WAIT, || {}).unwrap();
        let (new, _) = Ownership::claim(&d, Record::this("new"), WAIT, || {}).unwrap();
        // The newer agent dies without a word (its lock goes with its open file).
        drop(new);
        match standing(&old) {
            Standing::Vacant { last: Some(r) } => assert_eq!(r.pod, "new"),
            other => panic!("{other:?}"),
        }
        let lock = old.lock_dir(WAIT).unwrap();
        old.take_over(&lock).unwrap();
        assert_eq!(old.standing(&lock).unwrap(), Standing::Owner);
        drop(lock);
        // Released: the file goes, the node is vacant for whoever comes next.
        let lock = old.lock_dir(WAIT).unwrap();
        assert!(old.release(&lock).unwrap());
        assert!(!d.join(OWNER_FILE).exists());
        assert_eq!(
            old.standing(&lock).unwrap(),
            Standing::Vacant { last: None }
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_superseded_agent_releases_nothing_of_the_newer_one() {
        let d = dir("release");
        let (mut old, _) = Ownership::claim(&d, Record::this("old"), WAIT, || {}).unwrap();
        let (new, _) = Ownership::claim(&d, Record::this("new"), WAIT, || {}).unwrap();
        let lock = old.lock_dir(WAIT).unwrap();
        assert!(!old.release(&lock).unwrap());
        drop(lock);
        assert!(d.join(OWNER_FILE).exists());
        assert_eq!(standing(&new), Standing::Owner);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_dir_lock_excludes_a_second_holder_for_a_bounded_time() {
        let d = dir("lock");
        let (a, _) = Ownership::claim(&d, Record::this("a"), WAIT, || {}).unwrap();
        let (b, _) = Ownership::claim(&d, Record::this("b"), WAIT, || {}).unwrap();
        let held = a.lock_dir(WAIT).unwrap();
        let started = Instant::now();
        match b.lock_dir(Duration::from_millis(50)) {
            Err(OwnerError::Busy { path, .. }) => assert_eq!(path, d),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("two holders of the run dir's lock"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held);
        assert!(b.lock_dir(WAIT).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unreadable_record_of_a_live_owner_still_supersedes() {
        let d = dir("garbage");
        let (old, _) = Ownership::claim(&d, Record::this("old"), WAIT, || {}).unwrap();
        // Another agent's claim whose record cannot be parsed, held locked as a live agent holds it.
        let path = d.join(OWNER_FILE);
        let tmp = d.join("garbage.tmp");
        fs::write(&tmp, b"not json").unwrap();
        let lock = Flock::lock(File::open(&tmp).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        fs::rename(&tmp, &path).unwrap();
        assert!(matches!(standing(&old), Standing::Superseded { .. }));
        drop(lock);
        assert_eq!(standing(&old), Standing::Vacant { last: None });
        fs::remove_dir_all(&d).unwrap();
    }
}
