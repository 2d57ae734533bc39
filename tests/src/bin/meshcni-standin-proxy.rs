//! The real-node test's stand-in for Envoy in the `istio-proxy` container (`scripts/e2e-node.sh`). Run with
//! Istio's proxy arguments, `meshcni-standin-proxy proxy sidecar`: listens on 0.0.0.0:15001 (outbound capture)
//! and 0.0.0.0:15006 (inbound capture) and answers every connection with one JSON report line
//! (`meshcni_tests::report`) naming the listener (`outbound`, `inbound`) and the original destination, then
//! closes it. Each connection is also logged on stdout, so `kubectl logs` shows what was captured.
//!
//! Exit 64: wrong arguments (anything but `proxy sidecar`); 1: a port cannot be bound.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

/// Istio's outbound and inbound capture ports, with the name each reports.
const LISTENERS: [(&str, u16); 2] = [("outbound", 15001), ("inbound", 15006)];

fn serve(name: &'static str, listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let report = meshcni_tests::report::tcp_report(name, &stream);
        println!("{report}");
        let _ = stream.write_all(format!("{report}\n").as_bytes());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args != ["proxy", "sidecar"] {
        eprintln!("meshcni-standin-proxy: expected the arguments `proxy sidecar`, got {args:?}");
        std::process::exit(64);
    }
    let mut threads = Vec::new();
    for (name, port) in LISTENERS {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("meshcni-standin-proxy: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("listening on {addr} ({name})");
        threads.push(std::thread::spawn(move || serve(name, listener)));
    }
    for t in threads {
        let _ = t.join();
    }
}
