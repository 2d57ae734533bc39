//! The plugin binaries: every file of the source dir (snapshotted at start, as Istio does) copied into the host's
//! CNI bin dir when missing or different. A target whose content was compared equal is remembered by the stat
//! fingerprint taken before the comparison, so an unchanged file is not read again at every reconcile (any write,
//! chmod or replacement since then changes its ctime or inode).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::atomic::{self, Attrs};

/// The plugin binary every source dir must hold.
pub const PLUGIN_BINARY: &str = "istio-cni";

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error("{dir}: cannot list the plugin binaries: {source}")]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{dir}: no executable {PLUGIN_BINARY} file in it (CNI_BINARIES_SOURCE_DIR)")]
    NoPlugin { dir: PathBuf },
    #[error("{path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] atomic::AtomicError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn fingerprint(md: &fs::Metadata) -> Fingerprint {
    Fingerprint {
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mode: md.mode() & 0o7777,
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
    }
}

/// The binaries to keep installed.
#[derive(Debug)]
pub struct Binaries {
    source_dir: PathBuf,
    target_dir: PathBuf,
    /// `(name, mode)` of each source file.
    files: Vec<(String, u32)>,
    verified: HashMap<String, (Fingerprint, Fingerprint)>,
}

impl Binaries {
    /// Snapshots the source dir (regular files, symlinks followed; directories skipped). It must hold an executable
    /// `istio-cni`.
    pub fn snapshot(source_dir: &Path, target_dir: &Path) -> Result<Self, BinariesError> {
        let list_err = |source| BinariesError::List {
            dir: source_dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(source_dir).map_err(list_err)? {
            let entry = entry.map_err(list_err)?;
            let md = fs::metadata(entry.path()).map_err(|source| BinariesError::Stat {
                path: entry.path(),
                source,
            })?;
            if !md.is_file() {
                continue;
            }
            if let Some(name) = entry.file_name().to_str() {
                files.push((name.to_string(), md.permissions().mode() & 0o7777));
            }
        }
        files.sort();
        if !files
            .iter()
            .any(|(n, mode)| n == PLUGIN_BINARY && mode & 0o111 != 0)
        {
            return Err(BinariesError::NoPlugin {
                dir: source_dir.to_path_buf(),
            });
        }
        Ok(Binaries {
            source_dir: source_dir.to_path_buf(),
            target_dir: target_dir.to_path_buf(),
            files,
            verified: HashMap::new(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(n, _)| n.as_str())
    }

    pub fn is_managed(&self, name: &str) -> bool {
        self.files.iter().any(|(n, _)| n == name)
    }

    pub fn target_dir(&self) -> &Path {
        &self.target_dir
    }

    /// Copies what is missing or different; returns the paths written.
    pub fn ensure(&mut self) -> Result<Vec<PathBuf>, BinariesError> {
        let mut written = Vec::new();
        for (name, mode) in &self.files {
            let source = self.source_dir.join(name);
            let target = self.target_dir.join(name);
            let src_md = fs::metadata(&source).map_err(|e| BinariesError::Stat {
                path: source.clone(),
                source: e,
            })?;
            let src_fp = fingerprint(&src_md);
            // lstat: a symlink planted at the target's name is not our binary (whatever it points to), and is
            // replaced by one.
            if let Ok(md) = fs::symlink_metadata(&target) {
                // Taken before the content is compared: any change after it alters the fingerprint.
                let fp = fingerprint(&md);
                if self.verified.get(name) == Some(&(src_fp, fp)) {
                    continue;
                }
                let identical = md.is_file()
                    && fp.mode == *mode
                    && atomic::same_content(&source, &target).map_err(|e| BinariesError::Stat {
                        path: target.clone(),
                        source: e,
                    })?;
                if identical {
                    self.verified.insert(name.clone(), (src_fp, fp));
                    continue;
                }
            }
            // Not remembered as verified: a change right after the rename would be recorded as right. The next
            // reconcile (our own rename wakes it) compares the content and remembers it then.
            self.verified.remove(name);
            atomic::copy(&source, &target, Attrs::mode(*mode))?;
            written.push(target);
        }
        Ok(written)
    }

    /// Removes every installed binary (cleanup); returns what was removed.
    pub fn remove_all(&mut self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for (name, _) in &self.files {
            let target = self.target_dir.join(name);
            match fs::remove_file(&target) {
                Ok(()) => removed.push(target),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %target.display(), error = %e, "cannot remove binary")
                }
            }
        }
        self.verified.clear();
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshcni-bins-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("src")).unwrap();
        fs::create_dir_all(d.join("dst")).unwrap();
        d
    }

    fn exe(path: &Path, content: &[u8]) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn copies_once_and_restores() {
        let d = tempdir("copy");
        exe(&d.join("src/istio-cni"), b"plugin v1");
        fs::create_dir(d.join("src/subdir")).unwrap();
        let mut b = Binaries::snapshot(&d.join("src"), &d.join("dst")).unwrap();
        assert_eq!(b.names().collect::<Vec<_>>(), vec!["istio-cni"]);
        assert_eq!(b.ensure().unwrap().len(), 1);
        assert_eq!(fs::read(d.join("dst/istio-cni")).unwrap(), b"plugin v1");
        assert_eq!(
            fs::metadata(d.join("dst/istio-cni"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert!(b.ensure().unwrap().is_empty(), "identical: no second copy");
        // Changed in place on the host -> restored.
        fs::write(d.join("dst/istio-cni"), b"tampered").unwrap();
        assert_eq!(b.ensure().unwrap().len(), 1);
        assert_eq!(fs::read(d.join("dst/istio-cni")).unwrap(), b"plugin v1");
        // Deleted -> restored.
        fs::remove_file(d.join("dst/istio-cni")).unwrap();
        assert_eq!(b.ensure().unwrap().len(), 1);
        // Mode changed -> restored.
        fs::set_permissions(d.join("dst/istio-cni"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(b.ensure().unwrap().len(), 1);
        assert_eq!(b.remove_all().len(), 1);
        assert!(!d.join("dst/istio-cni").exists());
        assert_eq!(fs::read_dir(d.join("dst")).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn source_must_hold_the_plugin() {
        let d = tempdir("noplugin");
        fs::write(d.join("src/other"), b"x").unwrap();
        let err = Binaries::snapshot(&d.join("src"), &d.join("dst")).unwrap_err();
        assert!(err.to_string().contains("istio-cni"), "{err}");
        fs::write(d.join("src/istio-cni"), b"not executable").unwrap();
        assert!(Binaries::snapshot(&d.join("src"), &d.join("dst")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
