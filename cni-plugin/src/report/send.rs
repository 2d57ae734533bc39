//! The delivery: one HTTP/1.1 `POST /log` on the agent's log socket, within a deadline of a few ms, connect to
//! answer; whatever does not fit is dropped, the ADD never waits for it.
//!
//! - Sent only when the socket exists and belongs to the plugin's own uid (root), so no one else can collect the
//!   plugin's lines. Its mode is not checked: Istio's agent makes it 0666.
//! - The socket is non-blocking: a listener whose backlog is full (an agent that stopped accepting) is a refusal,
//!   not a wait; the write and the read of the status line wait in poll(2), bounded by what is left of the
//!   deadline.
//! - Written in full but not answered in time is [`Delivery::Unconfirmed`]: the lines are in the socket's buffer,
//!   the agent reads them when it gets to it (ours processes a request whose client has gone).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{encode_body, LOG_PATH, SOCKET_NAME};
use crate::sockets::Socket;

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The agent answered 200.
    Accepted,
    /// Written in full; no answer within the deadline.
    Unconfirmed,
    /// Nothing to send.
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no agent log socket at {path}")]
    NoSocket { path: PathBuf },
    #[error("cannot stat the agent log socket {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a socket")]
    NotSocket { path: PathBuf },
    #[error(
        "the agent log socket {path} is owned by uid {owner}, not by this plugin's uid {expected}"
    )]
    Untrusted {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("cannot connect to the agent log socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent log socket {path} accepts no connection (its backlog is full)")]
    Busy { path: PathBuf },
    #[error("cannot send the plugin's logs to {path} within {deadline:?}: {source}")]
    Write {
        path: PathBuf,
        deadline: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} refused the plugin's logs: {status:?}")]
    Refused { path: PathBuf, status: String },
}

/// The HTTP request carrying `body`, as Go's client sends it (Istio's plugin), with `Connection: close`.
pub fn request(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {LOG_PATH} HTTP/1.1\r\nHost: unix\r\nUser-Agent: istio-cni (meshcni)\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn check_socket(path: &Path) -> Result<(), SendError> {
    let path_buf = || path.to_path_buf();
    match Socket::inspect(path) {
        Socket::Missing => Err(SendError::NoSocket { path: path_buf() }),
        Socket::Unreadable(source) => Err(SendError::Stat {
            path: path_buf(),
            source,
        }),
        Socket::NotSocket => Err(SendError::NotSocket { path: path_buf() }),
        // Istio's agent makes its log socket 0666: only the owner is checked.
        Socket::Found { owner, our_uid, .. } if owner != our_uid => Err(SendError::Untrusted {
            path: path_buf(),
            owner,
            expected: our_uid,
        }),
        Socket::Found { .. } => Ok(()),
    }
}

/// A connection that is refused rather than waited for when nobody accepts ([`crate::sockets::connect_now`]).
fn connect_now(path: &Path) -> Result<UnixStream, SendError> {
    crate::sockets::connect_now(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::WouldBlock => SendError::Busy {
            path: path.to_path_buf(),
        },
        _ => SendError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Waits until the (non-blocking) stream is ready for `events`, at most until `deadline` from `start`; false when
/// the time is up. poll(2)'s timeout is precise to the ms, where SO_SNDTIMEO/SO_RCVTIMEO round up to jiffies.
fn wait_ready(stream: &UnixStream, events: PollFlags, start: Instant, deadline: Duration) -> bool {
    loop {
        let Some(left) = deadline
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
        else {
            return false;
        };
        let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stream.as_fd(), events)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => {}
            Ok(_) => return true,
            Err(Errno::EINTR) => {}
            // Let the next read or write report what is wrong.
            Err(_) => return true,
        }
    }
}

/// Sends `lines` to the agent whose run dir is `run_dir`, within `deadline`.
pub fn send(run_dir: &Path, lines: &[String], deadline: Duration) -> Result<Delivery, SendError> {
    if lines.is_empty() {
        return Ok(Delivery::Empty);
    }
    let req = request(&encode_body(lines));
    // The deadline is the agent's share: from the connect on.
    let start = Instant::now();
    let path = run_dir.join(SOCKET_NAME);
    check_socket(&path)?;
    let stream = connect_now(&path)?;
    let write_err = |source: std::io::Error| SendError::Write {
        path: path.clone(),
        deadline,
        source,
    };
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut rest = &req[..];
    while !rest.is_empty() {
        match (&stream).write(rest) {
            Ok(0) => return Err(write_err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !wait_ready(&stream, PollFlags::POLLOUT, start, deadline) {
                    return Err(write_err(timed_out()));
                }
            }
            Err(e) => return Err(write_err(e)),
        }
    }
    // The status line, if it comes in time.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        match (&stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !wait_ready(&stream, PollFlags::POLLIN, start, deadline) {
                    return Ok(Delivery::Unconfirmed);
                }
            }
            Err(_) => return Ok(Delivery::Unconfirmed),
        }
    }
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(Delivery::Accepted),
        _ if status.is_empty() => Ok(Delivery::Unconfirmed),
        _ => Err(SendError::Refused { path, status }),
    }
}
