//! Test probe for real-traffic tests (see `meshcni_tests::traffic`). One process, single-threaded, so entering
//! a netns and changing uid apply to all of it:
//!
//! `meshcni-netprobe listen [--netns PATH] --addr IP:PORT --name NAME [--uid N --gid N] [--transparent]`
//!   drops to uid/gid and binds (IPv6 sockets are v6-only; with --transparent it binds first, as root), prints
//!   `READY` on stdout, then for every connection
//!   writes one JSON line to the client: `{"name", "local", "peer", "orig_dst", "uid"}`; `orig_dst` is what
//!   SO_ORIGINAL_DST (SOL_IP/SOL_IPV6, 80) returns, or null when the connection was not NATed (no conntrack
//!   entry, or one whose original destination is the socket's own address).
//! `meshcni-netprobe connect [--netns PATH] --addr IP:PORT [--uid N --gid N] [--timeout-ms N]`
//!   drops to uid/gid BEFORE creating the socket (iptables' owner match looks at the socket's creator),
//!   connects, prints the listener's line. Exit 2: refused, 3: timed out, 1: anything else.
//! With `--udp` (both commands): a UDP socket; the listener answers every datagram with its line (`orig_dst` is
//! always null: SO_ORIGINAL_DST does not apply to unconnected UDP), the client sends one datagram and prints the
//! answer.
//!
//! A netns owned by another user namespace (a pod with `hostUsers: false`, see `meshcni_tests::userns`) is
//! entered from inside that user namespace, as every process of such a pod runs there: --uid/--gid are then the
//! pod's ids (uid 1337 is host uid 201337 when the pod's 0 is host 200000), and without --uid the probe is the
//! pod's root (uid 0 inside).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use cni_plugin::netns::Netns;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use nix::unistd::{Gid, Uid};

struct Args {
    cmd: String,
    /// Absent: stay in the current netns (inside a pod's container).
    netns: Option<String>,
    addr: SocketAddr,
    name: String,
    uid: Option<u32>,
    gid: Option<u32>,
    transparent: bool,
    udp: bool,
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
    let mut udp = false;
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
            "--udp" => udp = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        cmd,
        netns,
        addr: addr.ok_or("--addr is required")?,
        name,
        uid,
        gid,
        transparent,
        udp,
        timeout,
    })
}

/// Enters the netns (after its user namespace when that is not ours); returns whether a user namespace was
/// joined. The process is single-threaded here, as joining a user namespace requires.
fn enter(netns: &str) -> Result<bool, String> {
    let ns = Netns::open(netns).map_err(|e| e.to_string())?;
    ns.ensure_not_host().map_err(|e| e.to_string())?;
    let userns = ns.owner_userns().map_err(|e| e.to_string())?;
    if let Some(u) = &userns {
        nix::sched::setns(u.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("setns {u} (the owner of {netns}): {e}"))?;
    }
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {netns}: {e}"))?;
    Ok(userns.is_some())
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

fn bound_socket(a: &Args, ty: SockType) -> Result<OwnedFd, String> {
    let fam = if a.addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(fam, ty, SockFlag::SOCK_CLOEXEC, None)
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
    Ok(fd)
}

fn listener(a: &Args) -> Result<TcpListener, String> {
    let fd = bound_socket(a, SockType::Stream)?;
    socket::listen(&fd, socket::Backlog::new(64).map_err(|e| e.to_string())?)
        .map_err(|e| format!("listen: {e}"))?;
    Ok(TcpListener::from(fd))
}

/// Creates the listening socket as the listener's user: iptables' owner match looks at the uid that created a
/// socket (a UDP socket answers from it). Only a transparent socket needs root (CAP_NET_ADMIN) to be created;
/// the process drops to the user right after.
fn as_listener_user<T>(a: &Args, make: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    if a.transparent {
        let sock = make()?;
        drop_to(a.uid, a.gid)?;
        Ok(sock)
    } else {
        drop_to(a.uid, a.gid)?;
        make()
    }
}

fn ready() -> Result<(), String> {
    let mut out = std::io::stdout();
    writeln!(out, "READY")
        .and_then(|_| out.flush())
        .map_err(|e| e.to_string())
}

fn serve_udp(a: &Args) -> Result<(), String> {
    let sock = as_listener_user(a, || bound_socket(a, SockType::Datagram))?;
    let sock = UdpSocket::from(sock);
    ready()?;
    let mut buf = [0u8; 2048];
    loop {
        let Ok((_, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let report = serde_json::json!({
            "name": a.name,
            "local": sock.local_addr().ok().map(|s| s.to_string()),
            "peer": from.to_string(),
            "orig_dst": null,
            "uid": Uid::current().as_raw(),
        });
        let _ = sock.send_to(format!("{report}\n").as_bytes(), from);
    }
}

fn connect_udp(a: &Args) -> Result<(), (i32, String)> {
    drop_to(a.uid, a.gid).map_err(|e| (1, e))?;
    let any = if a.addr.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(any).map_err(|e| (1, format!("bind: {e}")))?;
    sock.connect(a.addr)
        .map_err(|e| (1, format!("connect {}: {e}", a.addr)))?;
    sock.set_read_timeout(Some(a.timeout))
        .map_err(|e| (1, e.to_string()))?;
    sock.send(b"ping")
        .map_err(|e| (1, format!("send to {}: {e}", a.addr)))?;
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => 2,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => 3,
            _ => 1,
        };
        (code, format!("recv from {}: {e}", a.addr))
    })?;
    print!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn serve(a: &Args) -> Result<(), String> {
    if a.udp {
        return serve_udp(a);
    }
    let l = as_listener_user(a, || listener(a))?;
    ready()?;
    for conn in l.incoming() {
        let Ok(mut stream) = conn else { continue };
        let report = meshcni_tests::report::tcp_report(&a.name, &stream);
        let _ = stream.write_all(format!("{report}\n").as_bytes());
    }
    Ok(())
}

fn connect(a: &Args) -> Result<(), (i32, String)> {
    if a.udp {
        return connect_udp(a);
    }
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
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshcni-netprobe: {e}");
            std::process::exit(64);
        }
    };
    if let Some(netns) = args.netns.clone() {
        match enter(&netns) {
            // In a pod's user namespace host root is unmapped: "root" there is the pod's root.
            Ok(true) if args.uid.is_none() => args.uid = Some(0),
            Ok(_) => {}
            Err(e) => {
                eprintln!("meshcni-netprobe: {e}");
                std::process::exit(1);
            }
        }
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
