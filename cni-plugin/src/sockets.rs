//! What the plugin learns of a Unix socket of the agent's before it connects: whether it is there, is a socket,
//! and who owns it. The callers (the pod-cache lookup, the log report) decide what they trust. And the connect
//! both use, which never waits.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the Unix socket at `path` without ever waiting: a listener whose backlog is full (an agent that
/// stopped accepting) is `WouldBlock` at once, where a blocking connect would hold the pod start. The stream is
/// non-blocking; a caller that wants timeouts instead makes it blocking.
pub fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(UnixStream::from(fd))
}

/// A socket path, as `lstat` sees it (a symlink is not followed: it is "not a socket").
#[derive(Debug)]
pub enum Socket {
    Missing,
    Unreadable(std::io::Error),
    NotSocket,
    /// A socket, with its owner, its permission bits and the plugin's own effective uid.
    Found {
        owner: u32,
        mode: u32,
        our_uid: u32,
    },
}

impl Socket {
    pub fn inspect(path: &Path) -> Socket {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Socket::Missing,
            Err(e) => return Socket::Unreadable(e),
        };
        if !meta.file_type().is_socket() {
            return Socket::NotSocket;
        }
        Socket::Found {
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
            our_uid: nix::unistd::geteuid().as_raw(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_without_following_links() {
        let dir = std::env::temp_dir().join(format!("meshcni-sockets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        assert!(matches!(Socket::inspect(&path), Socket::Missing));
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        match Socket::inspect(&path) {
            Socket::Found { owner, our_uid, .. } => assert_eq!(owner, our_uid),
            other => panic!("{other:?}"),
        }
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(Socket::inspect(&link), Socket::NotSocket));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
