//! Running one external tool (iptables-save / iptables-restore) from the calling thread, bounded in time.
//!
//! The child is spawned from the calling thread, so it inherits that thread's network and mount namespaces (the
//! pod's netns and our private mount namespace when called on a netns thread).
//!
//! ## Inside the pod's user namespace ([`spawn_in_userns`])
//!
//! A pod with `hostUsers: false` has a netns owned by a child user namespace. The kernel's `xt_owner` refuses
//! `--uid-owner`/`--gid-owner` rules unless the writer's user namespace is the netns's owner (EINVAL; legacy
//! reports `line N failed`, nft `RULE_APPEND failed (Invalid argument)`), and maps the numbers of a rule written
//! from inside it through that namespace: `--uid-owner 1337` then matches pod uid 1337 (host uid 201337 when
//! the pod's 0 is host 200000). So the tools run inside it, as Istio does (with `nsenter --user --net`).
//!
//! Joining a user namespace (`setns(CLONE_NEWUSER)`) is refused to a multi-threaded process (and to one sharing
//! its filesystem attributes), so it is done in the forked child between fork and exec (`pre_exec`), with raw
//! syscalls only (async-signal-safe: no allocation, no lock): `setns`, `capget`/`capset`, `prctl`. The child
//! keeps the thread's netns and mount namespace (the sandbox's private one with its bind mounts: joining a user
//! namespace changes neither). What else the tools need there, measured with iptables 1.8.9 on Linux 6.18:
//! - after `setns` the child is still host root (kuid 0), which the pod's namespace does not map: it sees itself
//!   as uid/gid 65534. It has every capability in the pod's namespace, but `execve` recomputes them and keeps
//!   none for a non-root uid: both flavours then fail (`iptables-nft-restore`: "Could not fetch rule set
//!   generation id: Permission denied (you must be root)"; legacy: "unable to initialize table 'nat'").
//! - becoming the pod's root (`setuid(0)` inside, what `nsenter` does by default and so Istio) keeps the
//!   capabilities across exec, but the child is then host uid 200000, an "other" for our files: a 0600 xtables
//!   lock file created by the plugin as host root (what it used before it locked the netns file, as Istio does)
//!   could not be opened, and iptables-legacy 1.8.9 treats that as fatal ("Fatal: can't open lock file ...:
//!   Permission denied", exit 4); so would be any other file of ours it needs.
//! - so the child stays host root for files (the libraries, the sandbox's mounts behave exactly as for a
//!   host-namespace tool) and keeps just [`TOOL_CAPS`] across exec as *ambient* capabilities (raised in
//!   the inheritable set, then `PR_CAP_AMBIENT_RAISE`); they are capabilities over the pod's user namespace
//!   only, hence over nothing of the host. Files it creates belong to host root, as a host-namespace tool's
//!   would (the host's filesystems map host root; the pod's namespace need not).
//! - `iptables-save` prints the numbers stored in the rule, so a save shows `--uid-owner 1337` whether it runs
//!   inside the pod's namespace or in the host's, and it equals the save of the same rules loaded into a scratch
//!   netns of the host's namespace: comparing rulesets needs no translation.
//!
//! A child spawned with `pre_exec` is started with fork instead of posix_spawn (vfork): a little slower in a
//! big process, and only for pods in their own user namespace.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Where binaries are looked for when `PATH` is empty or lacks them (a runtime may run us with a minimal `PATH`).
const FALLBACK_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The capabilities a tool keeps inside a pod's user namespace (see the module docs): `CAP_NET_ADMIN` (program
/// netfilter) and `CAP_NET_RAW` (the raw socket iptables-legacy talks to the kernel through).
pub const TOOL_CAPS: [u32; 2] = [CAP_NET_ADMIN, CAP_NET_RAW];
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{binary} not found in PATH nor in {fallback}", fallback = FALLBACK_DIRS.join(":"))]
    NotFound { binary: String },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot start {binary} inside user namespace {userns} (setns, then ambient CAP_NET_ADMIN and \
         CAP_NET_RAW in the child): {source}"
    )]
    SpawnInUserns {
        binary: PathBuf,
        userns: String,
        source: std::io::Error,
    },
    #[error("cannot start {binary}: {source}")]
    Userns {
        binary: PathBuf,
        source: crate::netns::NetnsError,
    },
    #[error("{binary} {args} did not finish within {after:?} and was killed")]
    Timeout {
        binary: PathBuf,
        args: String,
        after: Duration,
    },
    #[error("{binary} {args} failed ({status}): {stderr}")]
    Failed {
        binary: PathBuf,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("cannot wait for {binary}: {source}")]
    Wait {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// Finds `name` in `PATH`, then in the usual system directories.
pub fn find_binary(name: &str) -> Result<PathBuf, ExecError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| ExecError::NotFound {
            binary: name.to_string(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `binary args` with `stdin` fed in, waits at most `timeout`, and returns its stdout. A non-zero exit is
/// an error carrying stderr.
pub fn run(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, ExecError> {
    spawn(binary, args, env, stdin.is_some())?.finish(stdin, timeout)
}

/// Starts `binary args` without waiting: with a stdin pipe when `piped_stdin` (the process then waits for its
/// input, see [`Running::finish`]), else with /dev/null. Its stdout and stderr are collected by `finish`.
pub fn spawn(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    piped_stdin: bool,
) -> Result<Running, ExecError> {
    spawn_in_userns(binary, args, env, piped_stdin, None)
}

/// Like [`spawn`], in the user namespace that owns the calling thread's netns when that is not ours (a pod with
/// `hostUsers: false`, see [`crate::netns::Netns::owner_userns`]); else exactly [`spawn`]. The tools that
/// program or read a netns use this: on a pod's netns thread they run in the pod's user namespace, on a
/// scratch netns thread (owned by ours) in ours.
pub fn spawn_in_owning_userns(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    piped_stdin: bool,
) -> Result<Running, ExecError> {
    let userns = owning_userns(binary)?;
    spawn_in_userns(
        binary,
        args,
        env,
        piped_stdin,
        userns.as_ref().map(AsFd::as_fd),
    )
}

/// The user namespace owning the calling thread's netns when it is not ours (see [`spawn_in_owning_userns`]).
fn owning_userns(binary: &Path) -> Result<Option<crate::netns::Userns>, ExecError> {
    let userns = crate::netns::Netns::current()
        .and_then(|ns| ns.owner_userns())
        .map_err(|source| ExecError::Userns {
            binary: binary.to_path_buf(),
            source,
        })?;
    if let Some(u) = &userns {
        tracing::debug!(binary = %binary.display(), userns = %u, "running inside the netns's user namespace");
    }
    Ok(userns)
}

/// Like [`spawn`]; with `userns`, the child joins that user namespace before exec and runs there as described
/// in the module docs (host root for files, [`TOOL_CAPS`] over the namespace).
pub fn spawn_in_userns(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    piped_stdin: bool,
    userns: Option<BorrowedFd<'_>>,
) -> Result<Running, ExecError> {
    let stdin = if piped_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    spawn_with(binary, args, env, stdin, userns)
}

/// Runs `binary args` like [`spawn_in_owning_userns`] + [`Running::finish`], with its whole input already in
/// its stdin when the child starts: written into a fresh pipe (grown to fit, up to the system's pipe size
/// limit) whose write end is closed before the spawn. The child then never waits for us: a tool started with an
/// empty pipe blocks on its first read until the parent is scheduled again, which on a busy node (or with the
/// parent woken on the child's CPU) can be after the child's whole start-up. Input that does not fit is fed by
/// [`Running::finish`] as before. Without input the tool's stdin is /dev/null.
pub fn run_in_owning_userns(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, ExecError> {
    let userns = owning_userns(binary)?;
    let userns = userns.as_ref().map(AsFd::as_fd);
    let Some(input) = stdin else {
        return spawn_with(binary, args, env, Stdio::null(), userns)?.finish(None, timeout);
    };
    match prefilled_pipe(input.as_bytes()) {
        Some(read_end) => {
            spawn_with(binary, args, env, Stdio::from(read_end), userns)?.finish(None, timeout)
        }
        None => spawn_with(binary, args, env, Stdio::piped(), userns)?.finish(stdin, timeout),
    }
}

/// The read end of a pipe that holds all of `input`, its write end closed; `None` when it does not fit (the
/// pipe cannot be grown to its size) or the pipe cannot be made.
fn prefilled_pipe(input: &[u8]) -> Option<OwnedFd> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    let capacity = nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_GETPIPE_SZ).ok()?;
    if usize::try_from(capacity).ok()? < input.len() {
        let wanted = libc::c_int::try_from(input.len()).ok()?;
        let grown =
            nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(wanted)).ok()?;
        if usize::try_from(grown).ok()? < input.len() {
            return None;
        }
    }
    // An empty pipe with room for all of it: the write does not block.
    std::fs::File::from(write_end).write_all(input).ok()?;
    Some(read_end)
}

fn spawn_with(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    stdin: Stdio,
    userns: Option<BorrowedFd<'_>>,
) -> Result<Running, ExecError> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(fd) = userns {
        let raw = fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child and makes raw syscalls only (async-signal-safe); `raw`
        // stays open until `spawn` returns (it is borrowed for this call).
        unsafe {
            cmd.pre_exec(move || join_userns(raw));
        }
    }
    let child = cmd.spawn().map_err(|source| match userns {
        None => ExecError::Spawn {
            binary: binary.to_path_buf(),
            source,
        },
        Some(fd) => ExecError::SpawnInUserns {
            binary: binary.to_path_buf(),
            userns: ns_name(fd),
            source,
        },
    })?;
    // A pidfd names this very process even after it exits, so a kill can never hit a recycled pid.
    let pidfd = pidfd_open(child.id());
    Ok(Running {
        child: Some(child),
        pidfd,
        binary: binary.to_path_buf(),
        args: args.join(" "),
    })
}

/// `user:[inode]` of a namespace fd, for messages.
fn ns_name(fd: BorrowedFd<'_>) -> String {
    match nix::sys::stat::fstat(fd) {
        Ok(st) => format!("user:[{}]", st.st_ino),
        Err(e) => format!("(fd {}: {e})", fd.as_raw_fd()),
    }
}

/// `struct __user_cap_header_struct` of `<linux/capability.h>`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one per 32 capabilities (version 3 uses two).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In the forked child, before exec: joins the user namespace `fd` and makes [`TOOL_CAPS`] ambient, so they
/// survive the exec of a tool whose uid the namespace does not map (see the module docs). Raw syscalls only.
fn join_userns(fd: RawFd) -> std::io::Result<()> {
    // SAFETY (all calls): plain syscalls on a valid fd and on stack memory that outlives them.
    if unsafe { libc::setns(fd, libc::CLONE_NEWUSER) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // After setns the child holds every capability of the namespace in its permitted and effective sets, none
    // in the inheritable one; a capability can be made ambient only when it is permitted and inheritable.
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for cap in TOOL_CAPS {
        data[(cap / 32) as usize].inheritable |= 1 << (cap % 32);
    }
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for cap in TOOL_CAPS {
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A started tool. Dropping it without [`Running::finish`] kills and reaps it (see [`Running::kill`]).
#[derive(Debug)]
pub struct Running {
    /// `None` once finished or killed.
    child: Option<Child>,
    pidfd: Option<OwnedFd>,
    binary: PathBuf,
    args: String,
}

impl Running {
    /// The process id (for logs and tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Feeds `stdin` (when the process was started with a pipe; `None` closes it with no input), waits at most
    /// `timeout` from now, and returns stdout. A non-zero exit is an error carrying stderr; on timeout the
    /// process is killed and reaped.
    ///
    /// All on the calling thread: one `poll` loop writes the input and drains stdout and stderr as the pipes
    /// allow (so neither side can block the other, whatever the sizes), then the exit is awaited on the pidfd,
    /// all against one deadline. No helper thread is started: for a restore that takes a fraction of a
    /// millisecond, starting and handing over to threads was a measurable part of an ADD.
    pub fn finish(mut self, stdin: Option<&str>, timeout: Duration) -> Result<String, ExecError> {
        let deadline = Instant::now() + timeout;
        let Some(mut child) = self.child.take() else {
            return Err(ExecError::Wait {
                binary: self.binary.clone(),
                source: std::io::Error::other("the process was already reaped"),
            });
        };
        let wait_error = |binary: &Path, source| ExecError::Wait {
            binary: binary.to_path_buf(),
            source,
        };
        // An empty or absent input closes the pipe at once: the tool sees an empty input.
        let input = child
            .stdin
            .take()
            .filter(|_| stdin.is_some_and(|d| !d.is_empty()));
        let mut pipes = Pipes {
            input: input.map(|w| (w, stdin.unwrap_or_default().as_bytes())),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            out: Vec::new(),
            err: Vec::new(),
        };
        let pumped = pipes.pump(deadline);
        let status = match pumped {
            Ok(true) => wait_until(&mut child, self.pidfd.as_ref(), deadline),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => {
                self.child = Some(child);
                self.kill_and_reap();
                return Err(ExecError::Timeout {
                    binary: self.binary.clone(),
                    args: std::mem::take(&mut self.args),
                    after: timeout,
                });
            }
            Err(source) => {
                self.child = Some(child);
                self.kill_and_reap();
                return Err(wait_error(&self.binary, source));
            }
        };
        let binary = self.binary.clone();
        if !status.success() {
            return Err(ExecError::Failed {
                binary,
                args: std::mem::take(&mut self.args),
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&pipes.err).trim().to_string(),
            });
        }
        if !pipes.err.is_empty() {
            tracing::debug!(binary = %binary.display(), stderr = %String::from_utf8_lossy(&pipes.err).trim(), "tool stderr");
        }
        Ok(String::from_utf8_lossy(&pipes.out).into_owned())
    }

    /// Kills the process (SIGKILL) and reaps it. For a tool that was given no input yet, such as an
    /// `iptables-restore` waiting on its stdin, this changes nothing: it never read a line.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(self.pidfd.as_ref(), child.id());
            // Closing our pipe ends first lets nothing block on them; wait() then reaps the killed child.
            drop(child.stdin.take());
            if let Err(e) = child.wait() {
                tracing::warn!(binary = %self.binary.display(), pid = child.id(), error = %e, "cannot reap a killed tool");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A child's three pipes, pumped from one thread.
struct Pipes<'a> {
    /// The write end and what is left to write.
    input: Option<(ChildStdin, &'a [u8])>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out: Vec<u8>,
    err: Vec<u8>,
}

impl Pipes<'_> {
    /// Writes the input and reads both outputs until the child has closed them (it normally does so by exiting):
    /// `Ok(true)`; `Ok(false)` when the deadline came first.
    fn pump(&mut self, deadline: Instant) -> std::io::Result<bool> {
        for fd in [
            self.input.as_ref().map(|(w, _)| w.as_fd()),
            self.stdout.as_ref().map(AsFd::as_fd),
            self.stderr.as_ref().map(AsFd::as_fd),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd)?;
        }
        loop {
            let mut fds = Vec::with_capacity(3);
            if let Some((w, _)) = &self.input {
                fds.push(PollFd::new(w.as_fd(), PollFlags::POLLOUT));
            }
            if let Some(r) = &self.stdout {
                fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
            }
            if let Some(r) = &self.stderr {
                fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
            }
            if fds.is_empty() {
                return Ok(true);
            }
            let Some(left) = poll_timeout(deadline) else {
                return Ok(false);
            };
            match poll(&mut fds, left) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            drop(fds);
            self.write_some()?;
            if read_some(&mut self.stdout, &mut self.out)? {
                self.stdout = None;
            }
            if read_some(&mut self.stderr, &mut self.err)? {
                self.stderr = None;
            }
        }
    }

    /// Writes what the pipe takes; closes it once all is written, or when the child closed its end (EPIPE: it
    /// exited early, and its exit status will tell why).
    fn write_some(&mut self) -> std::io::Result<()> {
        let Some((w, left)) = &mut self.input else {
            return Ok(());
        };
        loop {
            match w.write(left) {
                Ok(n) => {
                    *left = &left[n..];
                    if left.is_empty() {
                        self.input = None;
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    self.input = None;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads what a pipe has; `Ok(true)` at end of file.
fn read_some(pipe: &mut Option<impl Read>, into: &mut Vec<u8>) -> std::io::Result<bool> {
    let Some(r) = pipe else {
        return Ok(false);
    };
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The time left until `deadline` for `poll` (rounded up to a millisecond); `None` once it has passed.
fn poll_timeout(deadline: Instant) -> Option<PollTimeout> {
    let left = deadline.checked_duration_since(Instant::now())?;
    if left.is_zero() {
        return None;
    }
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).ok()
}

/// Waits for the child's exit until `deadline`: on its pidfd when there is one, else by polling `try_wait`.
/// `Ok(None)` when the deadline came first (the child still runs).
fn wait_until(
    child: &mut Child,
    pidfd: Option<&OwnedFd>,
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let Some(left) = poll_timeout(deadline) else {
            return Ok(None);
        };
        match pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, left) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn kill(pidfd: Option<&OwnedFd>, pid: u32) {
    if let Some(fd) = pidfd {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return;
        }
    }
    // Old kernels without pidfd: the child is not reaped yet (the waiter has not returned), so its pid is ours.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as libc::pid_t),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_reports_missing_binaries() {
        assert!(find_binary("sh").unwrap().is_absolute());
        let e = find_binary("meshcni-no-such-binary").unwrap_err();
        assert!(e.to_string().contains("meshcni-no-such-binary"), "{e}");
    }

    #[test]
    fn feeds_stdin_and_returns_stdout() {
        let sh = find_binary("sh").unwrap();
        let out = run(
            &sh,
            &["-c", "cat; echo \"$X\""],
            &[("X", OsStr::new("env-ok"))],
            Some("in\n"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out, "in\nenv-ok\n");
    }

    #[test]
    fn failure_carries_status_and_stderr() {
        let sh = find_binary("sh").unwrap();
        let e = run(
            &sh,
            &["-c", "echo bad rule >&2; exit 2"],
            &[],
            None,
            Duration::from_secs(10),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("bad rule") && msg.contains("exit status: 2"),
            "{msg}"
        );
    }

    #[test]
    fn a_hanging_tool_is_killed() {
        let sh = find_binary("sh").unwrap();
        let e = run(
            &sh,
            &["-c", "exec sleep 30"],
            &[],
            None,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_started_tool_waits_for_its_input() {
        let sh = find_binary("sh").unwrap();
        let r = spawn(&sh, &["-c", "cat"], &[], true).unwrap();
        assert!(r.pid().is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            r.finish(Some("late input\n"), Duration::from_secs(10))
                .unwrap(),
            "late input\n"
        );
        // No input: the pipe is closed, the tool sees an empty stdin.
        let r = spawn(&sh, &["-c", "wc -c"], &[], true).unwrap();
        assert_eq!(r.finish(None, Duration::from_secs(10)).unwrap().trim(), "0");
    }

    /// The whole input is in the tool's stdin before it starts: it reads it without anyone feeding it, whatever
    /// its size up to what a pipe can be grown to; beyond that it is streamed as before.
    #[test]
    fn input_is_prefilled_when_it_fits_and_streamed_when_not() {
        let sh = find_binary("sh").unwrap();
        for len in [0usize, 1, 4096, 100_000] {
            let input = "p".repeat(len);
            let pipe = prefilled_pipe(input.as_bytes()).expect("fits in a pipe");
            let mut got = String::new();
            std::fs::File::from(pipe).read_to_string(&mut got).unwrap();
            assert_eq!(
                got.len(),
                len,
                "the pipe holds it all and ends: its write end is closed"
            );
            let out = run_in_owning_userns(
                &sh,
                &["-c", "wc -c"],
                &[],
                Some(&input),
                Duration::from_secs(10),
            )
            .unwrap();
            assert_eq!(out.trim(), len.to_string());
        }
        // Beyond the system's pipe size limit (1 MiB by default): not prefilled, still delivered whole.
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
        let big = "q".repeat(max + 1);
        assert!(prefilled_pipe(big.as_bytes()).is_none());
        let out = run_in_owning_userns(
            &sh,
            &["-c", "wc -c"],
            &[],
            Some(&big),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.trim(), (max + 1).to_string());
    }

    fn gone(pid: u32) -> bool {
        // Reaped: no such process (not even a zombie of ours).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as libc::pid_t), None)
            == Err(nix::errno::Errno::ESRCH)
    }

    #[test]
    fn a_waiting_tool_is_killed_and_reaped() {
        let sh = find_binary("sh").unwrap();
        let r = spawn(&sh, &["-c", "cat >/dev/null; echo fed"], &[], true).unwrap();
        let pid = r.pid().unwrap();
        r.kill();
        assert!(gone(pid), "pid {pid} still exists");
        // Dropping does the same.
        let r = spawn(&sh, &["-c", "cat >/dev/null; echo fed"], &[], true).unwrap();
        let pid = r.pid().unwrap();
        drop(r);
        assert!(gone(pid), "pid {pid} still exists");
    }

    #[test]
    fn input_and_both_outputs_are_pumped_together() {
        // 1 MiB in, 1 MiB out on stdout and on stderr at once: far beyond the pipes' buffers, in every direction.
        let sh = find_binary("sh").unwrap();
        let big = "y".repeat(1 << 20);
        let out = run(
            &sh,
            &["-c", "tee /dev/stderr"],
            &[],
            Some(&big),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.len(), 1 << 20);
    }

    #[test]
    fn a_tool_that_exits_without_reading_reports_its_status() {
        let sh = find_binary("sh").unwrap();
        let big = "z".repeat(1 << 20);
        let e = run(
            &sh,
            &["-c", "echo early >&2; exit 3"],
            &[],
            Some(&big),
            Duration::from_secs(20),
        )
        .unwrap_err();
        match e {
            ExecError::Failed { status, stderr, .. } => {
                assert!(status.contains('3'), "{status}");
                assert_eq!(stderr, "early");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_tool_that_closes_its_outputs_and_hangs_is_killed_at_the_deadline() {
        let sh = find_binary("sh").unwrap();
        let start = std::time::Instant::now();
        let e = run(
            &sh,
            &["-c", "exec >&- 2>&-; exec sleep 30"],
            &[],
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn large_stdin_does_not_deadlock() {
        let sh = find_binary("sh").unwrap();
        let big = "x".repeat(1 << 20);
        let out = run(
            &sh,
            &["-c", "wc -c"],
            &[],
            Some(&big),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.trim(), (1 << 20).to_string());
    }

    #[test]
    fn a_failed_join_names_the_binary_and_the_namespace() {
        let sh = find_binary("sh").unwrap();
        // Not a user namespace: setns refuses it (EINVAL).
        let not_userns = std::fs::File::open("/proc/self/ns/uts").unwrap();
        let e = spawn_in_userns(
            &sh,
            &["-c", "true"],
            &[],
            false,
            Some(std::os::fd::AsFd::as_fd(&not_userns)),
        )
        .unwrap_err();
        assert!(matches!(e, ExecError::SpawnInUserns { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("/sh") && msg.contains("user namespace user:["),
            "{msg}"
        );
    }
}
