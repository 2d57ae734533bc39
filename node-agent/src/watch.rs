//! inotify on the directories whose files the reconcile reads or writes: the CNI conf dir, the host bin dir (our
//! binaries only), the run dir (our kubeconfig and the owner record), the service-account dir (kubelet's `..data`
//! swap) and the CA file's dir. Directories, not files, are watched: the files are replaced by rename, which a file
//! watch would lose.
//!
//! Only completed changes count: CLOSE_WRITE (an in-place write finished), MOVED_TO/MOVED_FROM (renames), CREATE
//! (symlinks, new files), DELETE, ATTRIB. A bare MODIFY is ignored: reacting to it would read a file half-written.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use futures::{FutureExt, StreamExt};
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};

use crate::install::{conflist, owner};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    ConfDir,
    BinDir,
    RunDir,
    ServiceAccount,
    CaDir,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify: {0}")]
    Init(#[source] io::Error),
    #[error("cannot watch {path}: {source}")]
    Add {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading inotify events: {0}")]
    Read(#[source] io::Error),
    #[error("the inotify event stream ended")]
    Closed,
}

/// Which names matter in each directory.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub binaries: Vec<String>,
    pub kubeconfig: String,
    pub ca_file: Option<String>,
}

impl Filter {
    fn relevant(&self, target: Target, name: Option<&str>) -> bool {
        let Some(name) = name else {
            // An event on the watched directory itself.
            return true;
        };
        match target {
            Target::ConfDir => conflist::is_config_name(name),
            Target::BinDir => self.binaries.iter().any(|b| b == name),
            // The owner record too: a newer agent's claim, or its end, changes what this one may do.
            Target::RunDir => name == self.kubeconfig || name == owner::OWNER_FILE,
            Target::ServiceAccount => true,
            Target::CaDir => Some(name) == self.ca_file.as_deref() || name == "..data",
        }
    }
}

/// A batch of relevant events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub targets: Vec<Target>,
    /// The kernel dropped events: everything must be checked.
    pub overflow: bool,
}

const DIR_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

const REACT: EventMask = EventMask::CLOSE_WRITE
    .union(EventMask::MOVED_TO)
    .union(EventMask::MOVED_FROM)
    .union(EventMask::CREATE)
    .union(EventMask::DELETE)
    .union(EventMask::ATTRIB)
    .union(EventMask::DELETE_SELF)
    .union(EventMask::MOVE_SELF);

pub struct Watcher {
    stream: EventStream<Vec<u8>>,
    dirs: Vec<(PathBuf, Vec<Target>)>,
    wds: HashMap<WatchDescriptor, usize>,
    /// Directories whose watch the kernel dropped (deleted or moved): re-added by `rewatch`.
    lost: Vec<usize>,
    filter: Filter,
}

impl Watcher {
    /// Watches each directory (a directory given for several targets is watched once).
    pub fn new(targets: &[(PathBuf, Target)], filter: Filter) -> Result<Self, WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Init)?;
        let stream = inotify
            .into_event_stream(vec![0u8; 16 * 1024])
            .map_err(WatchError::Init)?;
        let mut dirs: Vec<(PathBuf, Vec<Target>)> = Vec::new();
        for (path, target) in targets {
            match dirs.iter_mut().find(|(p, _)| p == path) {
                Some((_, ts)) => ts.push(*target),
                None => dirs.push((path.clone(), vec![*target])),
            }
        }
        let mut w = Watcher {
            stream,
            lost: (0..dirs.len()).collect(),
            dirs,
            wds: HashMap::new(),
            filter,
        };
        w.rewatch()?;
        Ok(w)
    }

    /// Re-adds the watches the kernel dropped. An error names the directory; the caller retries later.
    pub fn rewatch(&mut self) -> Result<(), WatchError> {
        let mut watches = self.stream.watches();
        while let Some(&idx) = self.lost.first() {
            let path = &self.dirs[idx].0;
            let wd = watches
                .add(path, DIR_MASK)
                .map_err(|source| WatchError::Add {
                    path: path.clone(),
                    source,
                })?;
            self.wds.insert(wd, idx);
            self.lost.remove(0);
        }
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.lost.is_empty()
    }

    /// Waits for at least one relevant event, then takes every event already queued (one reconcile for a burst).
    pub async fn next_change(&mut self) -> Result<Change, WatchError> {
        let mut change = Change::default();
        loop {
            let event = self
                .stream
                .next()
                .await
                .ok_or(WatchError::Closed)?
                .map_err(WatchError::Read)?;
            self.absorb(event.wd, event.mask, event.name, &mut change);
            if change.overflow || !change.targets.is_empty() {
                break;
            }
        }
        while let Some(Some(event)) = self.stream.next().now_or_never() {
            let event = event.map_err(WatchError::Read)?;
            self.absorb(event.wd, event.mask, event.name, &mut change);
        }
        Ok(change)
    }

    fn absorb(
        &mut self,
        wd: WatchDescriptor,
        mask: EventMask,
        name: Option<OsString>,
        change: &mut Change,
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            change.overflow = true;
            return;
        }
        let Some(&idx) = self.wds.get(&wd) else {
            return;
        };
        if mask.contains(EventMask::IGNORED) {
            self.wds.remove(&wd);
            if !self.lost.contains(&idx) {
                self.lost.push(idx);
            }
            change.targets.extend(self.dirs[idx].1.iter().copied());
            return;
        }
        if !mask.intersects(REACT) {
            return;
        }
        let name = name.as_deref().and_then(|n| n.to_str());
        for &target in &self.dirs[idx].1 {
            if self.filter.relevant(target, name) && !change.targets.contains(&target) {
                tracing::trace!(dir = %self.dirs[idx].0.display(), name = name.unwrap_or(""), ?mask, "change");
                change.targets.push(target);
            }
        }
    }
}

/// The directory of a file path (for the CA file).
pub fn parent_dir(path: &Path) -> Option<PathBuf> {
    path.parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter() {
        let f = Filter {
            binaries: vec!["istio-cni".into()],
            kubeconfig: "istio-cni-kubeconfig".into(),
            ca_file: Some("ca.crt".into()),
        };
        assert!(f.relevant(Target::ConfDir, Some("10-calico.conflist")));
        assert!(!f.relevant(Target::ConfDir, Some("10-calico.conflist.tmp.1.2")));
        assert!(f.relevant(Target::BinDir, Some("istio-cni")));
        assert!(!f.relevant(Target::BinDir, Some("bridge")));
        assert!(f.relevant(Target::RunDir, Some("istio-cni-kubeconfig")));
        assert!(!f.relevant(Target::RunDir, Some("log.sock")));
        assert!(f.relevant(Target::ServiceAccount, Some("..data")));
        assert!(f.relevant(Target::CaDir, Some("ca.crt")));
        assert!(f.relevant(Target::ConfDir, None));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sees_rename_and_close_write_not_modify() {
        let d = std::env::temp_dir().join(format!("meshcni-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let mut w = Watcher::new(&[(d.clone(), Target::ConfDir)], Filter::default()).unwrap();
        std::fs::write(d.join("x.txt"), b"irrelevant").unwrap();
        std::fs::write(d.join("a.conflist"), b"{}").unwrap();
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), w.next_change())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(change.targets, vec![Target::ConfDir]);
        std::fs::write(d.join("b.tmp"), b"{}").unwrap();
        std::fs::rename(d.join("b.tmp"), d.join("b.conf")).unwrap();
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), w.next_change())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(change.targets, vec![Target::ConfDir]);
        // The directory removed: the watch is lost and re-added once it exists again.
        std::fs::remove_dir_all(&d).unwrap();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), w.next_change())
            .await
            .unwrap();
        // Drain until the IGNORED event has been seen.
        for _ in 0..5 {
            if !w.is_complete() {
                break;
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), w.next_change()).await;
        }
        assert!(!w.is_complete());
        assert!(w.rewatch().is_err());
        std::fs::create_dir_all(&d).unwrap();
        w.rewatch().unwrap();
        assert!(w.is_complete());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
