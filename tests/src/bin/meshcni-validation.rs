//! The real-node test's `istio-validation` init container (`scripts/e2e-node.sh`), behaving as Istio's
//! (`istio-iptables --run-validation`): it listens on 127.0.0.1:15001 and 127.0.0.1:15006, then connects from
//! 127.0.0.1 to 127.0.0.6:15002, where nothing listens, once per interval. With the redirect rules in place the
//! connection (from the proxy's uid over `lo`, to an address that is not 127.0.0.1) is redirected to 15006 and
//! the listener sees the original port 15002: exit 0. Without them every attempt is refused until the timeout:
//! exit 126, Istio's validation error code, so the pod never starts its containers.
//!
//! `meshcni-validation [--timeout-ms N] [--interval-ms N]` (defaults 5000 and 200; Istio probes for 5 s).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage};

/// The exit code of Istio's validation when the redirect does not work.
const VALIDATION_FAILED: i32 = 126;
/// The port the client connects to; Istio's default `--iptables-probe-port`.
const PROBE_PORT: u16 = 15002;
/// Istio's magic source-less destination: 127.0.0.6 is never 127.0.0.1, so the owner rule redirects it.
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

fn arg_ms(args: &[String], name: &str, default: u64) -> Result<Duration, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(Duration::from_millis(default)),
        Some(i) => args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()
            .map(Duration::from_millis)
            .map_err(|e| format!("{name}: {e}")),
    }
}

/// Accepts connections on `listener` and sends on `done` once one arrives whose original port is the probe's.
fn watch(listener: TcpListener, done: mpsc::Sender<SocketAddr>) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let orig = meshcni_tests::report::original_dst(&stream);
        if let Some(o) = orig {
            let _ = stream.write_all(o.port().to_string().as_bytes());
            if o.port() == PROBE_PORT {
                let _ = done.send(o);
                return;
            }
        }
    }
}

/// One connection from 127.0.0.1 (bound explicitly, as Istio's client does) to `target`.
fn probe(target: SocketAddr) -> Result<(), String> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let to: SockaddrStorage = target.into();
    // Loopback: refused or accepted at once, no timeout needed.
    socket::connect(fd.as_raw_fd(), &to).map_err(|e| format!("connect {target}: {e}"))
}

fn run() -> Result<SocketAddr, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let timeout = arg_ms(&args, "--timeout-ms", 5000)?;
    let interval = arg_ms(&args, "--interval-ms", 200)?;
    let (tx, rx) = mpsc::channel();
    for port in [15001, 15006] {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let tx = tx.clone();
        std::thread::spawn(move || watch(l, tx));
    }
    let target = SocketAddr::from((PROBE_IP, PROBE_PORT));
    let start = Instant::now();
    let mut last = String::from("no attempt");
    while start.elapsed() < timeout {
        last = match probe(target) {
            Ok(()) => format!("connected to {target}"),
            Err(e) => e,
        };
        if let Ok(orig) = rx.recv_timeout(interval) {
            return Ok(orig);
        }
    }
    Err(format!(
        "no connection to {target} was redirected within {timeout:?} (last attempt: {last})"
    ))
}

fn main() {
    match run() {
        Ok(orig) => {
            println!("validation passed: a connection to {orig} was redirected to the proxy")
        }
        Err(e) => {
            eprintln!("validation failed: {e}");
            std::process::exit(VALIDATION_FAILED);
        }
    }
}
