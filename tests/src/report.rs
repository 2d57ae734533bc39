//! What a test listener tells the client about the connection it accepted: one JSON line
//! `{"name", "local", "peer", "orig_dst", "uid"}` (the shape of [`crate::traffic::Report`]). Shared by
//! `meshcni-netprobe` and the real node's stand-in proxy `meshcni-standin-proxy`.

use std::net::{SocketAddr, TcpStream};

use nix::sys::socket::{self, sockopt, SockaddrIn, SockaddrIn6};

/// SO_ORIGINAL_DST, when it differs from the socket's own address (conntrack answers for every tracked
/// connection; only a NATed one has another original destination).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let orig = if local.is_ipv4() {
        let sin = socket::getsockopt(stream, sockopt::OriginalDst).ok()?;
        SocketAddr::from(SockaddrIn::from(sin))
    } else {
        let sin6 = socket::getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        SocketAddr::from(SockaddrIn6::from(sin6))
    };
    (orig != local).then_some(orig)
}

/// The report line (without the newline) for an accepted TCP connection.
pub fn tcp_report(name: &str, stream: &TcpStream) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "local": stream.local_addr().ok().map(|s| s.to_string()),
        "peer": stream.peer_addr().ok().map(|s| s.to_string()),
        "orig_dst": original_dst(stream).map(|s| s.to_string()),
        "uid": nix::unistd::Uid::current().as_raw(),
    })
}
