//! Real-traffic fixtures: listeners that report which socket a connection reached and its SO_ORIGINAL_DST, and
//! clients that connect as a given uid, all inside test namespaces. They drive the `meshcni-netprobe` binary of
//! this crate (one small process each, so setns and setuid concern only it); get its path in an integration
//! test with [`netprobe!`](crate::netprobe).
//!
//! Sockets are created as the listener's user (iptables' owner match looks at the creator), except transparent
//! ones (TPROXY), which need root to be created. A UDP listener answering REDIRECTed queries must bind the
//! address REDIRECT delivers to (127.0.0.1 / ::1, as Istio's DNS proxy does), or conntrack cannot map the answer
//! back to the server the client asked.
//!
//! Every wait is bounded; listeners are killed (by their own pid) when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

use crate::netns::TestNetns;

/// The probe binary of this crate, for integration tests of this package.
#[macro_export]
macro_rules! netprobe {
    () => {
        $crate::traffic::Probe::new(env!("CARGO_BIN_EXE_meshcni-netprobe"))
    };
}

/// How long a listener may take to come up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for a connection and its report.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a listener tells a client about the connection it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// The listener's name (given at start).
    pub name: String,
    /// The accepted socket's local address (for TPROXY: the original destination itself).
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// SO_ORIGINAL_DST; `None` when the connection was not NATed (not redirected, or TPROXY).
    pub orig_dst: Option<SocketAddr>,
    /// The listener's uid.
    pub uid: u32,
}

/// Who a probe runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum As {
    Root,
    /// uid and gid (same number, as in Istio's proxy user 1337).
    User(u32),
}

/// The probe binary.
#[derive(Debug, Clone)]
pub struct Probe {
    bin: PathBuf,
}

/// Transport of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    /// One datagram out, one answer back (the listener reports no `orig_dst` for UDP).
    Udp,
}

/// Options of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOpts {
    pub user: As,
    /// IP_TRANSPARENT / IPV6_TRANSPARENT (TPROXY inbound), set before dropping privileges.
    pub transparent: bool,
    pub proto: Proto,
}

impl ListenOpts {
    pub fn user(uid: u32) -> Self {
        ListenOpts {
            user: As::User(uid),
            transparent: false,
            proto: Proto::Tcp,
        }
    }

    pub fn root() -> Self {
        ListenOpts {
            user: As::Root,
            transparent: false,
            proto: Proto::Tcp,
        }
    }

    pub fn transparent(self) -> Self {
        ListenOpts {
            transparent: true,
            ..self
        }
    }

    pub fn udp(self) -> Self {
        ListenOpts {
            proto: Proto::Udp,
            ..self
        }
    }
}

fn user_args(user: As) -> Vec<String> {
    match user {
        As::Root => Vec::new(),
        As::User(u) => vec!["--uid".into(), u.to_string(), "--gid".into(), u.to_string()],
    }
}

impl Probe {
    pub fn new(bin: impl Into<PathBuf>) -> Probe {
        let bin = bin.into();
        assert!(bin.is_file(), "probe binary {} is missing", bin.display());
        Probe { bin }
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// Starts a listener named `name` on `addr` inside `ns`; returns once it accepts connections.
    pub fn listen(
        &self,
        ns: &TestNetns,
        name: &str,
        addr: SocketAddr,
        opts: ListenOpts,
    ) -> Listener {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("listen")
            .arg("--netns")
            .arg(ns.path())
            .args(["--addr", &addr.to_string(), "--name", name])
            .args(user_args(opts.user))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.transparent {
            cmd.arg("--transparent");
        }
        if opts.proto == Proto::Udp {
            cmd.arg("--udp");
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let listener = Listener {
            child,
            name: name.to_string(),
            addr,
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) if line.trim() == "READY" => listener,
            other => {
                let mut listener = listener;
                let _ = listener.child.kill();
                let _ = listener.child.wait();
                let mut err = String::new();
                if let Some(mut e) = listener.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "listener {name} on {addr} in {} did not come up ({other:?}): {err}",
                    ns.name()
                );
            }
        }
    }

    /// Connects (TCP) from inside `ns` as `user` to `addr` and returns the report of whoever accepted.
    pub fn connect(&self, ns: &TestNetns, addr: SocketAddr, user: As) -> Result<Report, String> {
        self.connect_with(ns, addr, user, Proto::Tcp)
    }

    /// Like [`Probe::connect`], over the given transport.
    pub fn connect_with(
        &self,
        ns: &TestNetns,
        addr: SocketAddr,
        user: As,
        proto: Proto,
    ) -> Result<Report, String> {
        let mut args: Vec<String> = vec![
            "connect".into(),
            "--netns".into(),
            ns.path().display().to_string(),
            "--addr".into(),
            addr.to_string(),
            "--timeout-ms".into(),
            CONNECT_TIMEOUT.as_millis().to_string(),
        ];
        args.extend(user_args(user));
        if proto == Proto::Udp {
            args.push("--udp".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cni_plugin::apply::exec::run(&self.bin, &args, &[], None, CONNECT_TIMEOUT * 3)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(out.trim()).map_err(|e| format!("bad report {out:?}: {e}"))
    }

    /// Like [`Probe::connect`], panicking with context when no report comes back.
    pub fn must_connect(&self, ns: &TestNetns, addr: SocketAddr, user: As) -> Report {
        self.connect(ns, addr, user)
            .unwrap_or_else(|e| panic!("{user:?} in {} -> {addr}: {e}", ns.name()))
    }
}

/// A running listener; killed when dropped.
#[derive(Debug)]
pub struct Listener {
    child: Child,
    pub name: String,
    pub addr: SocketAddr,
}

impl Listener {
    /// The listener's process id (to look at its credentials from the host).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a connection landed on listener `name` with SO_ORIGINAL_DST `orig` (`None`: not NATed).
#[track_caller]
pub fn assert_landed(report: &Report, name: &str, orig: Option<SocketAddr>) {
    assert_eq!(
        (report.name.as_str(), report.orig_dst),
        (name, orig),
        "unexpected landing: {report:?}"
    );
}
