//! Crash-safe file replacement: a temp file in the same directory, written, given its mode (and owner), fsynced,
//! then renamed over the target. A reader (kubelet, the plugin) sees the old file or the new one, never a torn one;
//! a crash leaves at most a temp file, which `remove_stale_temps` deletes on the next start.
//!
//! The file is fsynced before the rename, so even after a power loss the name holds the old content or the complete
//! new one (never an empty or partial file). The directory is deliberately not fsynced after the rename: that would
//! only make the rename itself durable (after a power loss the old file may come back, which the agent repairs at its
//! next start) and costs a second disk flush (~4 ms measured here) on the path that puts our entry back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marker in our temp file names: `<target name>.tmp.<pid>.<n>` (Istio's installer uses `<name>.tmp.*` too, so a
/// leftover from either is recognised). The name never ends in `.conf`/`.conflist`, so kubelet ignores it.
const TEMP_MARK: &str = ".tmp.";

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    #[error("{path}: has no parent directory or file name")]
    BadPath { path: PathBuf },
    /// `path` is the file the failed operation was on: the temp file, or the source of a copy. The target is
    /// untouched.
    #[error("cannot write {}: {op} {}: {}; the file was left as it was", target.display(), path.display(), errno_text(source))]
    Io {
        target: PathBuf,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An OS error with its errno's name first (`ENOSPC: No space left on device (os error 28)`), so that a person and
/// a grep find the same word; any other error as it is.
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{} (os error {n})", nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

fn io_err<'a>(
    target: &'a Path,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> AtomicError + 'a {
    move |source| AtomicError::Io {
        target: target.to_path_buf(),
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Mode and owner for the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    /// `(uid, gid)` to give the file, or `None` to leave it ours.
    pub owner: Option<(u32, u32)>,
}

impl Attrs {
    pub fn mode(mode: u32) -> Self {
        Attrs { mode, owner: None }
    }

    /// The attributes of an existing file (to preserve them), or `None` when it does not exist.
    pub fn of(path: &Path) -> Option<Self> {
        let md = fs::metadata(path).ok()?;
        Some(Attrs {
            mode: md.permissions().mode() & 0o7777,
            owner: Some((md.uid(), md.gid())),
        })
    }
}

/// A fresh temp name beside `target`: `<target>.tmp.<pid>.<n>`, the one pattern [`remove_stale_temps`] cleans (the
/// agent's sockets are bound under it too).
pub fn temp_path(target: &Path) -> Result<PathBuf, AtomicError> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(AtomicError::BadPath {
            path: target.to_path_buf(),
        });
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = name.to_os_string();
    tmp.push(format!("{TEMP_MARK}{}.{n}", std::process::id()));
    Ok(dir.join(tmp))
}

/// Writes the file through `fill` into a temp file and renames it over `target`. The temp file is removed on any
/// failure.
fn replace_with(
    target: &Path,
    attrs: Attrs,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), AtomicError> {
    let tmp = temp_path(target)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(target, "create", &tmp))?;
        fill(&mut file).map_err(io_err(target, "write", &tmp))?;
        if let Some((uid, gid)) = attrs.owner {
            // Only when it differs. Giving a file away needs CAP_CHOWN, which the DaemonSet does not grant (as in
            // Istio's chart): without it the file becomes ours, which beats not writing it at all.
            let md = file.metadata().map_err(io_err(target, "stat", &tmp))?;
            if (md.uid(), md.gid()) != (uid, gid) {
                if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                    tracing::warn!(path = %target.display(), uid, gid, error = %e, "cannot preserve the file's owner");
                }
            }
        }
        // Explicit chmod after creation: the mode is exact whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(attrs.mode))
            .map_err(io_err(target, "chmod", &tmp))?;
        file.sync_all().map_err(io_err(target, "fsync", &tmp))?;
        fs::rename(&tmp, target).map_err(io_err(target, "rename into place", &tmp))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomically replaces `target` with `content`.
pub fn write(target: &Path, content: &[u8], attrs: Attrs) -> Result<(), AtomicError> {
    replace_with(target, attrs, |f| f.write_all(content))
}

/// [`write`], and `hold` runs on the new file before it is renamed into place: what it does to the file (a lock on a
/// duplicate of its descriptor) is in effect before anyone can see the file.
pub fn write_held(
    target: &Path,
    content: &[u8],
    attrs: Attrs,
    hold: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(), AtomicError> {
    replace_with(target, attrs, |f| {
        f.write_all(content)?;
        hold(f)
    })
}

/// Atomically replaces `target` with a copy of `source` (streamed: a large binary is never held in memory).
pub fn copy(source: &Path, target: &Path, attrs: Attrs) -> Result<(), AtomicError> {
    let mut src = File::open(source).map_err(io_err(target, "open the source", source))?;
    replace_with(target, attrs, |f| io::copy(&mut src, f).map(|_| ()))
}

/// Are the two files' contents identical? Streams both (64 KiB at a time).
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Removes temp files left in `dir` by a crash, for targets accepted by `is_target`. Returns what was removed.
pub fn remove_stale_temps(dir: &Path, is_target: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(idx) = name.find(TEMP_MARK) else {
            continue;
        };
        if is_target(&name[..idx]) && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshcni-atomic-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_sets_mode_and_leaves_no_temp() {
        let d = tempdir("w");
        let t = d.join("a.conflist");
        write(&t, b"one", Attrs::mode(0o640)).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o640
        );
        write(&t, b"two", Attrs::of(&t).unwrap()).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn owner_is_preserved() {
        let d = tempdir("o");
        let t = d.join("10-x.conflist");
        fs::write(&t, b"old").unwrap();
        // Tests run as root (see HELPERS.md): giving the file to another owner must work.
        std::os::unix::fs::chown(&t, Some(1234), Some(4321)).unwrap();
        write(&t, b"new", Attrs::of(&t).unwrap()).unwrap();
        let md = fs::metadata(&t).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 4321));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failed_write_removes_temp() {
        let d = tempdir("f");
        // The target is a directory: the rename fails, the temp file must go.
        let t = d.join("sub");
        fs::create_dir(&t).unwrap();
        fs::write(t.join("x"), b"x").unwrap();
        assert!(write(&t, b"x", Attrs::mode(0o644)).is_err());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_names_the_target_the_step_and_the_errno() {
        let d = tempdir("e");
        let t = d.join("10-x.conflist");
        fs::write(&t, b"old").unwrap();
        // The temp file cannot be created: the target's "directory" is a regular file.
        let below_a_file = t.join("sub.conflist");
        let err = write(&below_a_file, b"new", Attrs::mode(0o644)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("cannot write {}: create ", below_a_file.display())),
            "{msg}"
        );
        assert!(
            msg.contains(": ENOTDIR: Not a directory (os error 20); the file was left as it was"),
            "{msg}"
        );
        assert_eq!(fs::read(&t).unwrap(), b"old");
        let err = copy(&d.join("no-such-source"), &t, Attrs::mode(0o755)).unwrap_err();
        assert!(
            err.to_string().contains("open the source") && err.to_string().contains("ENOENT"),
            "{err}"
        );
        assert_eq!(fs::read(&t).unwrap(), b"old");
        assert_eq!(
            errno_text(&io::Error::other("plain")),
            "plain",
            "no errno: the error as it is"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn copy_and_compare() {
        let d = tempdir("c");
        let (a, b) = (d.join("a"), d.join("b"));
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&a, &big).unwrap();
        copy(&a, &b, Attrs::mode(0o755)).unwrap();
        assert!(same_content(&a, &b).unwrap());
        let mut other = big.clone();
        other[299_999] ^= 1;
        fs::write(&b, &other).unwrap();
        assert!(!same_content(&a, &b).unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_temps() {
        let d = tempdir("s");
        for n in [
            "istio-cni.tmp.1.2",
            "istio-cni",
            "bridge.tmp.1.1",
            "10-x.conflist.tmp.77.0",
        ] {
            fs::write(d.join(n), b"").unwrap();
        }
        let removed = remove_stale_temps(&d, |t| t == "istio-cni" || t.ends_with(".conflist"));
        assert_eq!(removed.len(), 2);
        assert!(d.join("istio-cni").exists() && d.join("bridge.tmp.1.1").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
