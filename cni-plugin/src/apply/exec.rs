//! Running one external tool (iptables-save / iptables-restore) from the calling thread, bounded in time.
//!
//! The child is spawned from the calling thread, so it inherits that thread's network and mount namespaces (the
//! pod's netns and our private mount namespace when called on a netns thread).

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Where binaries are looked for when `PATH` is empty or lacks them (a runtime may run us with a minimal `PATH`).
const FALLBACK_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{binary} not found in PATH nor in {fallback}", fallback = FALLBACK_DIRS.join(":"))]
    NotFound { binary: String },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
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
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|source| ExecError::Spawn {
        binary: binary.to_path_buf(),
        source,
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
    pub fn finish(mut self, stdin: Option<&str>, timeout: Duration) -> Result<String, ExecError> {
        let Some(mut child) = self.child.take() else {
            return Err(ExecError::Wait {
                binary: self.binary.clone(),
                source: std::io::Error::other("the process was already reaped"),
            });
        };
        let pid = child.id();
        let input = child.stdin.take();
        let (tx, rx) = mpsc::sync_channel(1);
        let waited = std::thread::scope(|s| {
            if let Some(mut w) = input {
                if let Some(data) = stdin.filter(|d| !d.is_empty()) {
                    s.spawn(move || {
                        // A write error (EPIPE) means the child exited early; its exit status tells why.
                        let _ = w.write_all(data.as_bytes());
                    });
                }
                // else: `w` is dropped here, which closes the pipe: the tool sees an empty input.
            }
            s.spawn(move || {
                let _ = tx.send(child.wait_with_output());
            });
            match rx.recv_timeout(timeout) {
                Ok(out) => Some(out),
                Err(_) => {
                    kill(self.pidfd.as_ref(), pid);
                    // The waiter thread returns once the killed child is reaped.
                    let _ = rx.recv();
                    None
                }
            }
        });
        let binary = self.binary.clone();
        let Some(out) = waited else {
            return Err(ExecError::Timeout {
                binary,
                args: std::mem::take(&mut self.args),
                after: timeout,
            });
        };
        let out = out.map_err(|source| ExecError::Wait {
            binary: binary.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(ExecError::Failed {
                binary,
                args: std::mem::take(&mut self.args),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        if !out.stderr.is_empty() {
            tracing::debug!(binary = %binary.display(), stderr = %String::from_utf8_lossy(&out.stderr).trim(), "tool stderr");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    use std::os::fd::AsRawFd;
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
}
