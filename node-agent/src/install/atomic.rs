//! Crash-safe file replacement: a temp file in the same directory, written, given its mode (and owner), fsynced,
//! then renamed over the target. A reader (kubelet, the plugin) sees the old file or the new one, never a torn one;
//! a crash leaves at most a temp file, which `remove_stale_temps` deletes on the next start.
//!
//! The file is fsynced before the rename, so even after a power loss the name holds the old content or the complete
//! new one (never an empty or partial file). The directory is deliberately not fsynced after the rename: that would
//! only make the rename itself durable (after a power loss the old file may come back, which the agent repairs at its
//! next start) and costs a second disk flush (~4 ms measured here) on the path that puts our entry back.
//!
//! The directories we write into (the host's CNI conf and bin dirs, the run dir) are shared with other components,
//! so nothing planted there can redirect a write: the temp file's name has a random part and is created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` (a name that exists, a symlink included, is never opened: another name is
//! drawn), and the rename replaces whatever is at the target's name (a symlink itself, never what it points to).
//! An existing target is only ever read, and then through [`open_regular`] (`O_NOFOLLOW | O_NONBLOCK`: a symlink
//! or a FIFO planted there is "not our file", never followed or waited on).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marker in our temp file names: `<target name>.tmp.<pid>.<n>.<random>` (Istio's installer uses `<name>.tmp.*`
/// too, so a leftover from either is recognised). The name never ends in `.conf`/`.conflist`, so kubelet ignores
/// it.
const TEMP_MARK: &str = ".tmp.";

/// How many temp names are tried before a write gives up (each one exists only if someone planted it).
const TEMP_ATTEMPTS: u32 = 16;

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
    #[error("{dir}: {attempts} temp file names for {name} were all taken (planted?)")]
    TempNamesTaken {
        dir: PathBuf,
        name: String,
        attempts: u32,
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

    /// The attributes of an existing regular file (to preserve them), or `None` when there is none at `path`. A
    /// symlink is not followed: the file it points to is not the one being replaced, and its mode and owner are
    /// not ours to copy.
    pub fn of(path: &Path) -> Option<Self> {
        let md = fs::symlink_metadata(path).ok()?;
        md.is_file().then(|| Attrs {
            mode: md.permissions().mode() & 0o7777,
            owner: Some((md.uid(), md.gid())),
        })
    }
}

/// Opens `path` for reading only if it is a regular file itself: a symlink is refused (`O_NOFOLLOW`), a FIFO or a
/// device is opened without blocking (`O_NONBLOCK`) and refused. `Ok(None)` when there is nothing at `path`, or
/// something that is not a regular file.
pub fn open_regular(path: &Path) -> io::Result<Option<(File, fs::Metadata)>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    let md = file.metadata()?;
    Ok(md.is_file().then_some((file, md)))
}

/// The content and mode of the regular file at `path` (see [`open_regular`]), `None` when there is none.
pub fn read_regular(path: &Path) -> io::Result<Option<(Vec<u8>, u32)>> {
    let Some((mut file, md)) = open_regular(path)? else {
        return Ok(None);
    };
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.read_to_end(&mut bytes)?;
    Ok(Some((bytes, md.permissions().mode() & 0o7777)))
}

/// A fresh random suffix for a temp name (the pid and a counter keep names apart when the system's random source
/// fails, which ring reports instead of handing out predictable bytes).
pub fn random_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            format!("{nanos:08x}")
        }
    }
}

fn temp_path(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = name.to_os_string();
    tmp.push(format!(
        "{TEMP_MARK}{}.{n}.{}",
        std::process::id(),
        random_suffix()
    ));
    dir.join(tmp)
}

/// Creates a new temp file for `target` in its directory: `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 until the
/// final mode is set. A name that is taken (by anything, a planted symlink included) is never opened: another one
/// is drawn.
fn create_temp(target: &Path) -> Result<(PathBuf, File), AtomicError> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(AtomicError::BadPath {
            path: target.to_path_buf(),
        });
    };
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = temp_path(dir, name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(path = %tmp.display(), "a temp file name we drew exists already: drawing another");
            }
            Err(e) => return Err(io_err(target, "create", &tmp)(e)),
        }
    }
    Err(AtomicError::TempNamesTaken {
        dir: dir.to_path_buf(),
        name: name.to_string_lossy().into_owned(),
        attempts: TEMP_ATTEMPTS,
    })
}

/// Writes the file through `fill` into a temp file and renames it over `target`. The temp file is removed on any
/// failure.
fn replace_with(
    target: &Path,
    attrs: Attrs,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), AtomicError> {
    let (tmp, mut file) = create_temp(target)?;
    let result = (|| {
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
        // Explicit chmod (fchmod, on the open file) after creation: the mode is exact whatever the umask.
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

/// Is `target` a regular file (itself, not through a symlink) with the same content as `source`? Streams both
/// (64 KiB at a time).
pub fn same_content(source: &Path, target: &Path) -> io::Result<bool> {
    let Some((mut fb, mdb)) = open_regular(target)? else {
        return Ok(false);
    };
    let mut fa = File::open(source)?;
    if fa.metadata()?.len() != mdb.len() {
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
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let d = tempdir("l");
        let outside = tempdir("l-outside");
        let victim = outside.join("victim");
        fs::write(&victim, b"victim").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o666)).unwrap();
        let t = d.join("10-x.conflist");
        std::os::unix::fs::symlink(&victim, &t).unwrap();
        assert_eq!(
            Attrs::of(&t),
            None,
            "a link's target's attributes are not ours"
        );
        assert!(open_regular(&t).unwrap().is_none());
        assert!(
            !same_content(&victim, &t).unwrap(),
            "a link is never our file"
        );
        write(&t, b"ours", Attrs::mode(0o644)).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o666
        );
        let md = fs::symlink_metadata(&t).unwrap();
        assert!(md.is_file() && md.permissions().mode() & 0o777 == 0o644);
        assert_eq!(read_regular(&t).unwrap(), Some((b"ours".to_vec(), 0o644)));
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn a_fifo_is_not_read() {
        let d = tempdir("fifo");
        let p = d.join("istio-cni-kubeconfig");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block forever without O_NONBLOCK (no writer).
        assert!(open_regular(&p).unwrap().is_none());
        assert!(read_regular(&d.join("missing")).unwrap().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temp_names_are_unpredictable() {
        let d = tempdir("names");
        let t = d.join("istio-cni");
        let a = temp_path(&d, t.file_name().unwrap());
        let b = temp_path(&d, t.file_name().unwrap());
        assert_ne!(a, b);
        let prefix = format!("istio-cni{TEMP_MARK}{}.", std::process::id());
        for p in [&a, &b] {
            let name = p.file_name().unwrap().to_str().unwrap();
            let rest = name.strip_prefix(&prefix).unwrap();
            let (_n, random) = rest.split_once('.').unwrap();
            assert_eq!(random.len(), 16, "{name}");
        }
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
}
