//! Netns fixtures for root tests: a throwaway named netns (deleted on drop, even on panic), veth links to give a
//! pod an address and an outside world, commands and closures run inside, iptables snapshots, Istio goldens.
//!
//! Every fixture refuses the host's netns with the plugin's own guard, and never changes the host netns: veth
//! pairs are created directly inside the test namespaces (`ip -n A link add ... peer ... netns B`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use cni_plugin::apply::{Family, Flavour};
use cni_plugin::netns::Netns;

use cni_plugin::apply::Target;
use cni_plugin::pod::PodInfo;
use cni_plugin::redirect::Redirect;
use cni_plugin::rules::{render_iptables, CaptureConfig};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics unless the tests run as root: they need netns, iptables and routes for real, and must fail loudly
/// rather than skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests program real network namespaces and must run as root"
    );
}

/// Runs a command to completion; panics with its stderr when it fails.
pub fn must(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), with lo up, deleted when dropped.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    /// A fresh netns named `mcni-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TestNetns {
        Self::named(tag, |name| {
            must(Command::new("ip").args(["netns", "add", name]));
        })
    }

    /// The netns of process `pid`, pinned under a fresh name like [`TestNetns::new`]'s (`ip netns attach`: the
    /// same bind mount under /run/netns), and deleted the same way when dropped; the process may exit after.
    pub fn attach(tag: &str, pid: u32) -> TestNetns {
        Self::named(tag, |name| {
            must(Command::new("ip").args(["netns", "attach", name, &pid.to_string()]));
        })
    }

    fn named(tag: &str, create: impl FnOnce(&str)) -> TestNetns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("mcni-{tag}-{}-{n}", std::process::id());
        create(&name);
        let ns = TestNetns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ip -n <name> <args>`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        must(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread inside this netns (refusing the host's, like the plugin).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = Netns::open(&self.path).unwrap_or_else(|e| panic!("{e}"));
        ns.ensure_not_host().unwrap_or_else(|e| panic!("{e}"));
        ns.run(f).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a program inside this netns (spawned from a thread in it) and returns its output.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.run(|| Command::new(program).args(args).output())
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Like [`TestNetns::output`], panicking unless it succeeds; returns stdout.
    pub fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} in {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `<flavour>-save` of one family inside this netns, normalised (see [`normalize_save`]).
    pub fn save(&self, flavour: Flavour, family: Family) -> String {
        normalize_save(&self.must(&flavour.save_binary(family), &[]))
    }

    /// Adds one rule with `iptables-<flavour>` inside this netns (to simulate someone else's rules).
    pub fn iptables(&self, flavour: Flavour, family: Family, args: &[&str]) {
        let bin = flavour.restore_binary(family).replace("-restore", "");
        self.must(&bin, args);
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cannot delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot delete netns {}: {e}", self.name),
        }
    }
}

/// Drops what changes between two identical saves: comment lines (timestamps) and chain counters.
pub fn normalize_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let line = if line.starts_with(':') {
            match line.rfind(" [") {
                Some(i) => &line[..i],
                None => line,
            }
        } else {
            line
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The `-A` lines of a (normalised) save that belong to Istio: in `ISTIO_*` chains or jumping to one.
pub fn istio_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains("ISTIO_"))
        .map(str::to_string)
        .collect()
}

/// The lines of a (normalised) save per table, tables in name order (iptables-legacy-save prints tables in the
/// order they were first used in the netns, so whole saves of two netns are not comparable as text).
pub fn by_table(save: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.trim().to_string());
            out.entry(t.trim().to_string()).or_insert_with(Vec::new);
        } else if line == "COMMIT" {
            current = None;
        } else if let Some(t) = &current {
            if let Some(v) = out.get_mut(t) {
                v.push(line.to_string());
            }
        }
    }
    out
}

/// Istio's lines per table (see [`istio_lines`]), tables without any left out.
pub fn istio_by_table(save: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    by_table(save)
        .into_iter()
        .map(|(t, lines)| {
            let ours: Vec<String> = lines
                .into_iter()
                .filter(|l| {
                    (l.starts_with("-A ") || l.starts_with(":ISTIO_")) && l.contains("ISTIO_")
                })
                .collect();
            (t, ours)
        })
        .filter(|(_, l)| !l.is_empty())
        .collect()
}

/// Everything of a capture found in `ns`, on every backend, for "nothing was installed": each line of either
/// iptables flavour, either family, that names an `ISTIO_` chain; each of Istio's nftables tables (`inet
/// istio-proxy-*`); each TPROXY policy rule (`lookup 133`). Empty when there is none.
pub fn capture_traces(ns: &TestNetns) -> Vec<String> {
    let mut out = Vec::new();
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        for family in [Family::V4, Family::V6] {
            out.extend(
                ns.save(flavour, family)
                    .lines()
                    .filter(|l| l.contains("ISTIO_"))
                    .map(|l| format!("{} {l}", flavour.save_binary(family))),
            );
        }
    }
    out.extend(
        crate::nft::istio_tables(ns)
            .into_iter()
            .map(|t| format!("nftables table inet {t}")),
    );
    for family in ["-4", "-6"] {
        out.extend(
            ns.ip(&[family, "rule", "show"])
                .lines()
                .filter(|l| l.contains("lookup 133"))
                .map(|l| format!("ip {family} rule {l}")),
        );
    }
    out
}

/// iptables-save of the host for every flavour and family, normalised, and its whole nftables ruleset (without
/// counter values; the native backend's tables would show there): to prove a test left the host alone.
pub fn host_snapshot() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        for family in [Family::V4, Family::V6] {
            let bin = flavour.save_binary(family);
            let text = must(&mut Command::new(&bin));
            out.push((bin, normalize_save(&text)));
        }
    }
    let nft = ["--stateless", "list", "ruleset"];
    out.push((
        format!("nft {}", nft.join(" ")),
        must(Command::new("nft").args(nft)),
    ));
    out
}

/// Addresses of a pod and of its peer on the veth between them.
#[derive(Debug, Clone, Copy)]
pub struct LinkAddrs {
    pub pod_v4: Ipv4Addr,
    pub peer_v4: Ipv4Addr,
    pub pod_v6: Option<Ipv6Addr>,
    pub peer_v6: Option<Ipv6Addr>,
}

/// A pod netns and a peer netns (the outside world: "the node", another pod) joined by a veth pair `eth0`-`eth0`;
/// the pod's default route goes to the peer.
#[derive(Debug)]
pub struct PodNet {
    pub pod: TestNetns,
    pub peer: TestNetns,
    pub addrs: LinkAddrs,
}

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);

impl PodNet {
    /// Pod 10.200.0.2/24 (and fd00:200::2/64 with `v6`), peer .1; the addresses live only in these namespaces.
    pub fn new(tag: &str, v6: bool) -> PodNet {
        Self::with_pod(TestNetns::new(&format!("{tag}-pod")), tag, v6)
    }

    /// Like [`PodNet::new`], around a given pod netns (e.g. one owned by its own user namespace).
    pub fn with_pod(pod: TestNetns, tag: &str, v6: bool) -> PodNet {
        let peer = TestNetns::new(&format!("{tag}-peer"));
        veth(&pod, "eth0", &peer, "eth0");
        pod.ip(&["addr", "add", &format!("{POD_V4}/24"), "dev", "eth0"]);
        peer.ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", "eth0"]);
        if v6 {
            pod.ip(&[
                "addr",
                "add",
                &format!("{POD_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            peer.ip(&[
                "addr",
                "add",
                &format!("{PEER_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        pod.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", &PEER_V4.to_string()]);
        if v6 {
            pod.ip(&["-6", "route", "add", "default", "via", &PEER_V6.to_string()]);
        }
        PodNet {
            pod,
            peer,
            addrs: LinkAddrs {
                pod_v4: POD_V4,
                peer_v4: PEER_V4,
                pod_v6: v6.then_some(POD_V6),
                peer_v6: v6.then_some(PEER_V6),
            },
        }
    }
}

/// A veth pair created directly between two test namespaces (it never exists in the host's).
pub fn veth(a: &TestNetns, a_if: &str, b: &TestNetns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
}

/// The pod of a plugin case (`plugin/cases.json`, as the plugin's golden test reads it): containers test,
/// istio-proxy and istio-validate, with the case's annotations, proxy env and proxy uid/gid.
pub fn plugin_case_pod(name: &str) -> PodInfo {
    cni_plugin::compat::plugin_case_pod_named(name)
}

/// The capture configuration the plugin derives for a plugin case (IPv6 as given): with IPv6 off, rendering it
/// gives the case's golden.
pub fn plugin_capture(name: &str, enable_ipv6: bool) -> CaptureConfig {
    let redirect = Redirect::from_pod(&plugin_case_pod(name))
        .unwrap_or_else(|e| panic!("plugin case {name}: {e}"));
    CaptureConfig::from_redirect(&redirect, enable_ipv6)
}

/// [`plugin_capture`] as a programming target.
pub fn plugin_target(name: &str, enable_ipv6: bool) -> Target {
    Target::Config(plugin_capture(name, enable_ipv6))
}

/// The IPv4 iptables-restore payload of a capture, as the iptables backends render it.
pub fn iptables_payload(target: &Target) -> String {
    match target {
        Target::Config(c) => render_iptables(c).v4,
        Target::Redirect(r) => render_iptables(&CaptureConfig::from_redirect(r, false)).v4,
    }
}
