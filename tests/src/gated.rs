//! Processes made ahead of time and started together: what the bench's burst of concurrent ADDs runs.
//!
//! A burst spawned by the harness while it is being timed measures the harness too: 50 threads building
//! commands, creating pipes, writing each plugin's stdin after its start (the plugin blocks on the read until
//! its thread is scheduled) and contending for the harness's memory-map lock, which each vfork-style spawn and
//! each exec also takes. Traced with `perf sched`, that was 2.75 ms of the 20 ms of CPU time inside a burst of 50
//! native ADDs and the cause of the idle CPU in it.
//!
//! Here every process is made before the clock: for each, its stdin is a pipe already holding its whole input
//! (written and closed before the next process is made, so no other process holds the pipe's write end and the
//! reader sees the end of its input at once), its stdout and stderr are memfds, and the process is cloned
//! sharing this process's memory (`CLONE_VM`, no copy of it to make or tear down, as `posix_spawn` does) on a
//! stack of its own. It then waits on a shared gate pipe. [`Gated::release`] closes the gate's last write end:
//! every process sees the end of the gate together and execs its program. The release time is taken just
//! before; each process's end is its exit, reaped as it happens (the processes form a process group of their
//! own, waited for as a group).
//!
//! Between the clone and the exec a process runs only system calls on values prepared for it (close, read,
//! dup2, signal, execve, _exit): it allocates nothing and touches no shared state. The memory it uses (its
//! stack, its program's path, arguments and environment) lives in [`Gated`] until every process is reaped;
//! a [`Gated`] dropped before or during its release kills and reaps its processes first.

use std::ffi::{c_void, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of stack for a process between its clone and its exec (it needs a few hundred).
const STACK_BYTES: usize = 64 * 1024;

/// One process to make: its program, its whole environment and its whole stdin.
pub struct Spec<'a> {
    pub program: &'a Path,
    pub env: Vec<(String, String)>,
    pub stdin: &'a [u8],
}

/// How one process ended.
pub struct Outcome {
    /// The raw wait status (`WIFEXITED` etc.).
    pub status: i32,
    /// From the release to its exit being reaped.
    pub took: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Outcome {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }
}

/// What a process reads between its clone and its exec. Raw values only; the memory the pointers point into
/// is owned by the same [`Prepared`].
#[repr(C)]
struct ChildArgs {
    gate_read: RawFd,
    gate_write: RawFd,
    stdio: [RawFd; 3],
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
}

/// One made process and everything it uses until its exec.
struct Prepared {
    pid: libc::pid_t,
    _args: Box<ChildArgs>,
    _stack: Vec<u128>,
    _strings: Vec<CString>,
    _pointers: [Vec<*const libc::c_char>; 2],
    _stdin: OwnedFd,
    stdout: File,
    stderr: File,
    /// Its wait status and when it was reaped, once it was.
    ended: Option<(i32, Instant)>,
}

/// Processes made and waiting at the gate, see the module's doc.
pub struct Gated {
    procs: Vec<Prepared>,
    gate_write: Option<OwnedFd>,
    _gate_read: OwnedFd,
    pgid: libc::pid_t,
}

/// Runs in the cloned process: wait for the gate to open, take the prepared stdio, exec. Exit status 126 if the
/// gate could not be read or stdio not set up, 127 if the exec failed.
extern "C" fn gated_child(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of this process, alive until it is reaped (see `Gated`); every call
    // below is a plain system call on values prepared before the clone.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        libc::close(a.gate_write);
        let mut byte = 0u8;
        // The gate's end (0) is the release; this process never writes to it, so data cannot arrive.
        if libc::read(a.gate_read, (&mut byte as *mut u8).cast(), 1) != 0 {
            libc::_exit(126);
        }
        for (to, &from) in a.stdio.iter().enumerate() {
            if libc::dup2(from, to as RawFd) < 0 {
                libc::_exit(126);
            }
        }
        // As std's spawn does: the program starts with SIGPIPE's default, whatever this process set.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(a.program, a.argv, a.envp);
        libc::_exit(127)
    }
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUL byte in {:?}", String::from_utf8_lossy(b)),
        )
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn memfd(name: &str) -> io::Result<File> {
    let name = cstring(name.as_bytes())?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn read_all(f: &mut File) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_end(&mut v)?;
    Ok(v)
}

impl Gated {
    /// Makes one process per spec, each waiting at the gate. Their programs have not started when this returns.
    pub fn prepare(specs: &[Spec<'_>]) -> io::Result<Gated> {
        let (gate_read, gate_write) = pipe()?;
        let mut g = Gated {
            procs: Vec::with_capacity(specs.len()),
            gate_write: Some(gate_write),
            _gate_read: gate_read,
            pgid: 0,
        };
        for (i, spec) in specs.iter().enumerate() {
            g.make(i, spec)?;
        }
        Ok(g)
    }

    fn make(&mut self, i: usize, spec: &Spec<'_>) -> io::Result<()> {
        // stdin: the whole input in a pipe whose write end is closed before the clone (see the module's doc).
        let (stdin, input) = pipe()?;
        // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
        let capacity = unsafe { libc::fcntl(input.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity < 0 || spec.stdin.len() > capacity as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "stdin of {} bytes does not fit a pipe of {capacity}",
                    spec.stdin.len()
                ),
            ));
        }
        File::from(input).write_all(spec.stdin)?;
        let stdout = memfd(&format!("gated-{i}-stdout"))?;
        let stderr = memfd(&format!("gated-{i}-stderr"))?;

        let program = cstring(spec.program.as_os_str().as_bytes())?;
        let mut strings = vec![program];
        for (k, v) in &spec.env {
            let mut kv = OsStr::new(k).as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            strings.push(cstring(&kv)?);
        }
        let argv = vec![strings[0].as_ptr(), std::ptr::null()];
        let mut envp: Vec<*const libc::c_char> = strings[1..].iter().map(|s| s.as_ptr()).collect();
        envp.push(std::ptr::null());
        let args = Box::new(ChildArgs {
            gate_read: self._gate_read.as_raw_fd(),
            gate_write: self
                .gate_write
                .as_ref()
                .map(|f| f.as_raw_fd())
                .unwrap_or(-1),
            stdio: [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            program: strings[0].as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
        });
        let mut stack = vec![0u128; STACK_BYTES / 16];
        // SAFETY: the stack grows down from one past its end; u128 keeps it 16-byte aligned.
        let top = unsafe { stack.as_mut_ptr().add(stack.len()) }.cast::<c_void>();
        let arg = (&*args as *const ChildArgs).cast_mut().cast::<c_void>();
        // SAFETY: the child runs `gated_child` on its own stack with `args`; both, and every pointer in `args`,
        // are kept in `self.procs` until the child is reaped (or killed and reaped, in `Drop`).
        let pid = unsafe { libc::clone(gated_child, top, libc::CLONE_VM | libc::SIGCHLD, arg) };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        self.procs.push(Prepared {
            pid,
            _args: args,
            _stack: stack,
            _strings: strings,
            _pointers: [argv, envp],
            _stdin: stdin,
            stdout,
            stderr,
            ended: None,
        });
        // The first process leads the group the others join; the group is what `release` waits for.
        let pgid = if self.pgid == 0 { pid } else { self.pgid };
        // SAFETY: setpgid on our own child, which has not exec'd yet.
        if unsafe { libc::setpgid(pid, pgid) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.pgid = pgid;
        Ok(())
    }

    /// How many processes wait at the gate.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Opens the gate and waits for every process: their outcomes in the specs' order, each timed from the
    /// release to its exit.
    pub fn release(mut self) -> io::Result<Vec<Outcome>> {
        let start = Instant::now();
        drop(self.gate_write.take());
        let mut left = self.procs.len();
        while left > 0 {
            let mut status = 0;
            // SAFETY: waitpid writes the status it is given.
            let pid = unsafe { libc::waitpid(-self.pgid, &mut status, 0) };
            let now = Instant::now();
            if pid < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(p) = self.procs.iter_mut().find(|p| p.pid == pid) {
                p.ended = Some((status, now));
                left -= 1;
            }
        }
        let mut out = Vec::with_capacity(self.procs.len());
        for p in &mut self.procs {
            let (status, at) = p.ended.unwrap_or((-1, start));
            out.push(Outcome {
                status,
                took: at.saturating_duration_since(start),
                stdout: read_all(&mut p.stdout)?,
                stderr: read_all(&mut p.stderr)?,
            });
        }
        Ok(out)
    }
}

impl Drop for Gated {
    /// Kills and reaps every process not reaped yet, before the memory they may still use is freed.
    fn drop(&mut self) {
        for p in self.procs.iter().filter(|p| p.ended.is_none()) {
            // SAFETY: signalling and reaping our own child by its pid.
            unsafe {
                libc::kill(p.pid, libc::SIGKILL);
                let mut status = 0;
                while libc::waitpid(p.pid, &mut status, 0) < 0
                    && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                {
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir as Dir;

    const SH: &str = "/bin/sh";

    /// One `sh` per input, which it reads as its script from stdin; `$MARK` is a file of its own in `dir`.
    fn specs<'a>(dir: &Dir, inputs: &'a [Vec<u8>]) -> Vec<Spec<'a>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, stdin)| Spec {
                program: Path::new(SH),
                env: vec![
                    ("PATH".into(), "/usr/bin:/bin".into()),
                    (
                        "MARK".into(),
                        dir.0.join(format!("ran-{i}")).display().to_string(),
                    ),
                ],
                stdin,
            })
            .collect()
    }

    #[test]
    fn the_processes_start_only_at_the_release_each_with_its_own_stdio() {
        let dir = Dir::new("gated-release");
        let inputs: Vec<Vec<u8>> = (0..5)
            .map(|i| format!("touch \"$MARK\"\necho err-{i} >&2\necho line {i}\n").into_bytes())
            .collect();
        let g = Gated::prepare(&specs(&dir, &inputs)).unwrap();
        assert_eq!(g.len(), 5);
        std::thread::sleep(Duration::from_millis(100));
        let ran = std::fs::read_dir(&dir.0).unwrap().count();
        assert_eq!(ran, 0, "a process ran before the release");
        let out = g.release().unwrap();
        assert_eq!(out.len(), 5);
        for (i, o) in out.iter().enumerate() {
            assert!(o.success(), "process {i}: status {}", o.status);
            assert_eq!(String::from_utf8_lossy(&o.stdout), format!("line {i}\n"));
            assert_eq!(String::from_utf8_lossy(&o.stderr), format!("err-{i}\n"));
            assert!(dir.0.join(format!("ran-{i}")).exists());
            assert!(o.took > Duration::ZERO);
        }
    }

    #[test]
    fn dropped_before_the_release_nothing_runs() {
        let dir = Dir::new("gated-drop");
        let inputs: Vec<Vec<u8>> = (0..3).map(|_| b"touch \"$MARK\"\n".to_vec()).collect();
        let g = Gated::prepare(&specs(&dir, &inputs)).unwrap();
        let pids: Vec<libc::pid_t> = g.procs.iter().map(|p| p.pid).collect();
        drop(g);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
        for pid in pids {
            // Reaped, not left as zombies: no child of ours has the pid any more.
            let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            assert_eq!(r, -1, "pid {pid} is still our child");
        }
    }

    #[test]
    fn exit_statuses_are_reported_and_a_missing_program_is_127() {
        let dir = Dir::new("gated-status");
        let script = b"exit 3\n".to_vec();
        let mut s = specs(&dir, std::slice::from_ref(&script));
        s.push(Spec {
            program: Path::new("/nonexistent/program"),
            env: vec![],
            stdin: b"",
        });
        let out = Gated::prepare(&s).unwrap().release().unwrap();
        assert!(!out[0].success());
        assert_eq!(libc::WEXITSTATUS(out[0].status), 3);
        assert_eq!(libc::WEXITSTATUS(out[1].status), 127);
    }

    #[test]
    fn an_input_larger_than_a_pipe_is_refused_with_its_size() {
        let dir = Dir::new("gated-big");
        let big = vec![b'#'; 16 << 20];
        let e = Gated::prepare(&specs(&dir, std::slice::from_ref(&big)))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(&big.len().to_string()), "{e}");
    }
}
