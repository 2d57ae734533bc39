//! The netfilter netlink socket (through `netlink-sys`), opened in the calling thread's netns.

use std::io;

use netlink_sys::{Socket, SocketAddr};

use super::msg::NETLINK_NETFILTER;

/// Room for any answer: an error echoes the refused message, and ours stay far below this.
const RECV_BUFFER: usize = 64 * 1024;
/// What `netlink_sendmsg` keeps for itself from the send buffer.
const SNDBUF_OVERHEAD: usize = 32;

pub(super) struct NfSocket {
    socket: Socket,
    buf: Vec<u8>,
}

impl NfSocket {
    /// A `NETLINK_NETFILTER` socket in the netns of the calling thread.
    pub(super) fn open() -> io::Result<Self> {
        Ok(NfSocket {
            socket: Socket::new(NETLINK_NETFILTER)?,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Sends a whole request in one datagram (the kernel handles a batch as one `sendmsg`), growing the send
    /// buffer first when the request would not fit.
    pub(super) fn send(&self, request: &[u8]) -> io::Result<()> {
        let needed = request.len() + SNDBUF_OVERHEAD;
        if needed > default_sndbuf() {
            set_sndbuf(&self.socket, needed)?;
        }
        let sent = self.socket.send_to(request, &SocketAddr::new(0, 0), 0)?;
        if sent != request.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                request.len()
            )));
        }
        Ok(())
    }

    /// The next datagram from the kernel; with `wait: false`, `None` when none is queued.
    pub(super) fn recv(&mut self, wait: bool) -> io::Result<Option<&[u8]>> {
        self.buf.clear();
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT } | libc::MSG_TRUNC;
        match self.socket.recv(&mut self.buf, flags) {
            Ok(n) if n > self.buf.len() => Err(io::Error::other(format!(
                "an answer of {n} bytes does not fit in {RECV_BUFFER}"
            ))),
            Ok(_) => Ok(Some(&self.buf)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The kernel's default socket send buffer (`net.core.wmem_default`, 212992 on most systems); assumed when
/// unreadable, which only costs a `setsockopt` for large requests.
fn default_sndbuf() -> usize {
    212_992
}

/// `SO_SNDBUFFORCE` (the plugin has `CAP_NET_ADMIN`; `SO_SNDBUF` would be capped by `wmem_max`).
fn set_sndbuf(socket: &Socket, bytes: usize) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::SndBufForce, &bytes).map_err(io::Error::from)
}
