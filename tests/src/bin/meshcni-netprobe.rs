//! Test probe for real-traffic tests (see `meshcni_tests::traffic`). One process, single-threaded, so entering
//! a netns and changing uid apply to all of it:
//!
//! `meshcni-netprobe listen --netns PATH --addr IP:PORT --name NAME [--uid N --gid N] [--transparent]`
//!   binds (IPv6 sockets are v6-only), drops to uid/gid, prints `READY` on stdout, then for every connection
//!   writes one JSON line to the client: `{"name", "local", "peer", "orig_dst", "uid"}`; `orig_dst` is what
//!   SO_ORIGINAL_DST (SOL_IP/SOL_IPV6, 80) returns, or null when the connection was not NATed (no conntrack
//!   entry, or one whose original destination is the socket's own address).
//! `meshcni-netprobe connect --netns PATH --addr IP:PORT [--uid N --gid N] [--timeout-ms N]`
//!   drops to uid/gid BEFORE creating the socket (iptables' owner match looks at the socket's creator),
//!   connects, prints the listener's line. Exit 2: refused, 3: timed out, 1: anything else.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use cni_plugin::netns::Netns;
use nix::sys::socket::{
    self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use nix::unistd::{Gid, Uid};

struct Args {
    cmd: String,
    netns: String,
    addr: SocketAddr,
    name: String,
    uid: Option<u32>,
    gid: Option<u32>,
    transparent: bool,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or("missing command (listen|connect)")?;
    let mut netns = None;
    let mut addr = None;
    let mut name = String::from("listener");
    let mut uid = None;
    let mut gid = None;
    let mut transparent = false;
    let mut timeout = Duration::from_secs(5);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--netns" => netns = Some(val()?),
            "--addr" => addr = Some(val()?.parse::<SocketAddr>().map_err(|e| e.to_string())?),
            "--name" => name = val()?,
            "--uid" => uid = Some(val()?.parse().map_err(|e| format!("--uid: {e}"))?),
            "--gid" => gid = Some(val()?.parse().map_err(|e| format!("--gid: {e}"))?),
            "--timeout-ms" => {
                timeout =
                    Duration::from_millis(val()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?)
            }
            "--transparent" => transparent = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        cmd,
        netns: netns.ok_or("--netns is required")?,
        addr: addr.ok_or("--addr is required")?,
        name,
        uid,
        gid,
        transparent,
        timeout,
    })
}

fn enter(netns: &str) -> Result<(), String> {
    let ns = Netns::open(netns).map_err(|e| e.to_string())?;
    ns.ensure_not_host().map_err(|e| e.to_string())?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {netns}: {e}"))
}

fn drop_to(uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    if let Some(g) = gid.or(uid) {
        nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setgid(Gid::from_raw(g)).map_err(|e| format!("setgid {g}: {e}"))?;
    }
    if let Some(u) = uid {
        nix::unistd::setuid(Uid::from_raw(u)).map_err(|e| format!("setuid {u}: {e}"))?;
    }
    Ok(())
}

fn listener(a: &Args) -> Result<TcpListener, String> {
    let fam = if a.addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    if a.addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)
            .map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    if a.transparent {
        let (level, opt) = if a.addr.is_ipv4() {
            (libc::SOL_IP, libc::IP_TRANSPARENT)
        } else {
            (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
        };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid fd and a pointer to a c_int that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(format!(
                "IP_TRANSPARENT: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let sa: SockaddrStorage = a.addr.into();
    socket::bind(fd.as_raw_fd(), &sa).map_err(|e| format!("bind {}: {e}", a.addr))?;
    socket::listen(&fd, socket::Backlog::new(64).map_err(|e| e.to_string())?)
        .map_err(|e| format!("listen: {e}"))?;
    Ok(TcpListener::from(fd))
}

/// SO_ORIGINAL_DST, when it differs from the socket's own address (conntrack answers for every tracked
/// connection; only a NATed one has another original destination).
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
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

fn serve(a: &Args) -> Result<(), String> {
    let l = listener(a)?;
    drop_to(a.uid, a.gid)?;
    let mut out = std::io::stdout();
    writeln!(out, "READY")
        .and_then(|_| out.flush())
        .map_err(|e| e.to_string())?;
    for conn in l.incoming() {
        let Ok(mut stream) = conn else { continue };
        let report = serde_json::json!({
            "name": a.name,
            "local": stream.local_addr().ok().map(|s| s.to_string()),
            "peer": stream.peer_addr().ok().map(|s| s.to_string()),
            "orig_dst": original_dst(&stream).map(|s| s.to_string()),
            "uid": Uid::current().as_raw(),
        });
        let _ = stream.write_all(format!("{report}\n").as_bytes());
    }
    Ok(())
}

fn connect(a: &Args) -> Result<(), (i32, String)> {
    drop_to(a.uid, a.gid).map_err(|e| (1, e))?;
    let stream = TcpStream::connect_timeout(&a.addr, a.timeout).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => 2,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => 3,
            _ => 1,
        };
        (code, format!("connect {}: {e}", a.addr))
    })?;
    stream
        .set_read_timeout(Some(a.timeout))
        .map_err(|e| (1, e.to_string()))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(|e| {
        let code = if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            3
        } else {
            1
        };
        (code, format!("read from {}: {e}", a.addr))
    })?;
    if line.is_empty() {
        return Err((1, format!("{} closed without a report", a.addr)));
    }
    print!("{line}");
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshcni-netprobe: {e}");
            std::process::exit(64);
        }
    };
    if let Err(e) = enter(&args.netns) {
        eprintln!("meshcni-netprobe: {e}");
        std::process::exit(1);
    }
    let res = match args.cmd.as_str() {
        "listen" => serve(&args).map_err(|e| (1, e)),
        "connect" => connect(&args),
        other => Err((64, format!("unknown command {other}"))),
    };
    if let Err((code, e)) = res {
        eprintln!("meshcni-netprobe: {e}");
        std::process::exit(code);
    }
}
