//! Root tests of the agent's repair: finding a running pod's netns through /proc by the pod's IP (the real /proc,
//! and a /proc-like view to pin the choices), and repairing it with the plugin's programming path, compared with
//! what `apply::program` gives a fresh netns. Each "pod" is a test netns with a veth address and a process
//! inside; the host's rules are checked untouched.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cni_plugin::apply::{self, Family, Flavour, Target};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::Netns;
use cni_plugin::pod::PodInfo;
use cni_plugin::redirect::Redirect;
use futures::stream;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::runtime::watcher::Event;
use meshcni_tests::netns::{by_table, host_snapshot, must, veth, PodNet, TestNetns};
use node_agent::config::{BrokenPodFilter, RepairConfig, RepairMode};
use node_agent::repair::netns::{
    candidates, find_pod_netns, HostBy, HostNetns, HostRedirector, Scope, SearchError,
};
use node_agent::repair::{ApiError, Controller, PodActions, PodTarget};
use node_agent::server::Shared;
use serde_json::json;

static NEXT: AtomicU32 = AtomicU32::new(2);

/// An address of our own per call (10.231.<pid>.<n>), so parallel tests never share one.
fn unique_ip() -> IpAddr {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    assert!(n < 250, "too many test addresses");
    format!("10.231.{}.{n}", std::process::id() % 250)
        .parse()
        .unwrap()
}

/// A running "pod": a netns with `ip` on a veth to a peer netns, and a process (sleep) inside it, killed and
/// reaped on drop.
struct RunningPod {
    ns: TestNetns,
    _peer: TestNetns,
    ip: IpAddr,
    child: Child,
}

impl RunningPod {
    fn new(tag: &str, ip: IpAddr, v6: Option<&str>) -> RunningPod {
        let ns = TestNetns::new(tag);
        let peer = TestNetns::new(&format!("{tag}-peer"));
        veth(&ns, "eth0", &peer, "eth0");
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        if let Some(v6) = v6 {
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "eth0", "up"]);
        // Spawned from a thread inside the netns: the child lives there.
        let child = ns
            .run(|| Command::new("sleep").arg("300").spawn())
            .expect("spawn sleep in the pod netns");
        RunningPod {
            ns,
            _peer: peer,
            ip,
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real /proc, with the test's own netns as the host's (the tests run in the host's netns; init's may not be
/// inspectable here, as in some sandboxes: the agent on a node reads `<proc>/1/ns/net` with CAP_SYS_PTRACE).
fn real_proc() -> Scope {
    Scope::with_host("/proc", Path::new("/proc/self/ns/net")).unwrap()
}

fn same_netns(a: &Path, b: &Path) -> bool {
    Netns::open(a).unwrap().id() == Netns::open(b).unwrap().id()
}

#[test]
fn the_pod_netns_is_found_by_its_ip_in_the_real_proc() {
    let v6 = "fd00:231::7";
    let pod = RunningPod::new("rfind", unique_ip(), Some(v6));
    let found = find_pod_netns(&real_proc(), &[pod.ip]).unwrap();
    assert_eq!(found.pid, pod.pid());
    assert_eq!(
        found.path,
        PathBuf::from(format!("/proc/{}/ns/net", pod.pid()))
    );
    assert_eq!(found.netns.id(), Netns::open(pod.ns.path()).unwrap().id());
    // By its IPv6 address alone, too.
    let by_v6 = find_pod_netns(&real_proc(), &[v6.parse().unwrap()]).unwrap();
    assert_eq!(by_v6.pid, pod.pid());
    // The host's netns is never a candidate.
    let host = real_proc().host.id;
    let all = candidates(&real_proc()).unwrap();
    assert!(!all.contains_key(&host));
    assert!(all.values().any(|&pid| pid == pod.pid()));
    // An address nobody has.
    let e = find_pod_netns(&real_proc(), &[unique_ip()]).unwrap_err();
    assert!(matches!(e, SearchError::NotFound { .. }), "{e}");
}

#[test]
fn two_netns_with_the_pod_ip_is_an_error_not_a_guess() {
    let ip = unique_ip();
    let a = RunningPod::new("ramb-a", ip, None);
    let b = RunningPod::new("ramb-b", ip, None);
    match find_pod_netns(&real_proc(), &[ip]).unwrap_err() {
        SearchError::Ambiguous { mut pids, .. } => {
            pids.sort();
            let mut want = vec![a.pid(), b.pid()];
            want.sort();
            assert_eq!(pids, want);
        }
        other => panic!("{other}"),
    }
}

/// A /proc-like view: `<pid>/ns/net` links to namespace files, `<pid>/stat` with a start time.
struct FakeProc {
    dir: PathBuf,
}

impl FakeProc {
    fn new() -> FakeProc {
        let dir = std::env::temp_dir().join(format!(
            "meshcni-fakeproc-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        FakeProc { dir }
    }

    fn process(&self, pid: u32, netns: &Path, start: Option<u64>) {
        let p = self.dir.join(pid.to_string());
        std::fs::create_dir_all(p.join("ns")).unwrap();
        std::os::unix::fs::symlink(netns, p.join("ns/net")).unwrap();
        if let Some(start) = start {
            self.stat(pid, 0, start);
        }
    }

    /// `<pid>/stat` with its parent (field 4) and start time (field 22).
    fn stat(&self, pid: u32, ppid: u32, start: u64) {
        let fields: Vec<String> = (4..=52)
            .map(|i| match i {
                4 => ppid.to_string(),
                22 => start.to_string(),
                _ => "0".into(),
            })
            .collect();
        std::fs::write(
            self.dir.join(pid.to_string()).join("stat"),
            format!("{pid} (pause) S {}", fields.join(" ")),
        )
        .unwrap();
    }

    /// A process with its parent, pid namespace and name.
    fn task(&self, pid: u32, ppid: u32, netns: &Path, pid_ns: &Path, comm: &str) {
        self.process(pid, netns, None);
        self.stat(pid, ppid, u64::from(pid));
        let p = self.dir.join(pid.to_string());
        std::os::unix::fs::symlink(pid_ns, p.join("ns/pid")).unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
    }

    /// `self`, the link procfs resolves to the reader's pid.
    fn this_is(&self, pid: u32) {
        std::os::unix::fs::symlink(pid.to_string(), self.dir.join("self")).unwrap();
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_oldest_process_of_the_netns_is_chosen_and_the_hosts_skipped() {
    let pod = RunningPod::new("rold", unique_ip(), None);
    let other = RunningPod::new("rold-other", unique_ip(), None);
    let proc = FakeProc::new();
    // The view's "host" (its pid 1) is a test netns with an address of its own, and another process in it.
    let host = RunningPod::new("rold-host", unique_ip(), None);
    proc.process(1, host.ns.path(), Some(1));
    proc.process(2, host.ns.path(), Some(2));
    proc.process(100, pod.ns.path(), Some(500));
    proc.process(101, pod.ns.path(), Some(300)); // the pause process: oldest
    proc.process(102, pod.ns.path(), None); // unreadable stat: last
    proc.process(200, other.ns.path(), Some(100));
    std::fs::create_dir_all(proc.dir.join("self")).unwrap(); // not a pid
    std::fs::create_dir_all(proc.dir.join("300")).unwrap(); // exited: no ns/net

    let scope = Scope::establish(&proc.dir).unwrap();
    assert_eq!(scope.host.by, HostBy::Init(proc.dir.join("1/ns/net")));
    let all = candidates(&scope).unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let found = find_pod_netns(&scope, &[pod.ip]).unwrap();
    assert_eq!(found.pid, 101);
    assert!(same_netns(&found.path, pod.ns.path()));
    assert_eq!(find_pod_netns(&scope, &[other.ip]).unwrap().pid, 200);
    // The host's netns is never entered: a "pod" with the host's address (hostNetwork) is not found there.
    let e = find_pod_netns(&scope, &[host.ip]).unwrap_err();
    assert!(
        matches!(e, SearchError::NotFound { searched: 2, .. }),
        "{e}"
    );
}

/// A pid namespace of its own, as a container has: `unshare --pid --fork` with a sleep inside, killed (with its
/// child, `--kill-child`) and reaped on drop.
struct PidNamespace {
    unshare: Child,
    inner: u32,
}

impl PidNamespace {
    fn new() -> PidNamespace {
        let mut unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "300"])
            .spawn()
            .expect("spawn unshare --pid");
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        for _ in 0..200 {
            let inner = std::fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok());
            if let Some(inner) = inner {
                let ns =
                    |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino());
                if ns(inner).is_ok() && ns(inner).ok() != ns(std::process::id()).ok() {
                    return PidNamespace { unshare, inner };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = unshare.kill();
        let _ = unshare.wait();
        panic!("unshare --pid --fork started no process in a new pid namespace within 2 s");
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/pid", self.inner))
    }
}

impl Drop for PidNamespace {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn own_netns() -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
}

fn own_pid_ns() -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/pid", std::process::id()))
}

/// The agent in a container, as the host's /proc shows it: itself (pid 100, in `agent_netns`) under a wrapper
/// (90), both in the container's pid namespace, started by the runtime's shim (50, the host's pid namespace, in
/// `runtime_netns`).
fn container_view(proc: &FakeProc, pid_ns: &Path, agent_netns: &Path, runtime_netns: &Path) {
    proc.this_is(100);
    proc.task(100, 90, agent_netns, pid_ns, "node-agent");
    proc.task(90, 50, &own_netns(), pid_ns, "sh");
    proc.task(50, 1, runtime_netns, &own_pid_ns(), "containerd-shim");
}

#[test]
fn where_init_may_not_be_inspected_the_hosts_netns_is_the_runtimes() {
    let container = PidNamespace::new();
    let own = own_netns();
    let pod = RunningPod::new("rrt", unique_ip(), None);
    // The agent in a pod netns of its own (the DaemonSet's default): the runtime's shim is in the host's netns.
    let node = RunningPod::new("rrt-node", unique_ip(), None);
    let proc = FakeProc::new();
    container_view(&proc, &container.path(), &own, node.ns.path());
    proc.process(60, node.ns.path(), Some(1)); // another host process (the kubelet)
    proc.process(200, pod.ns.path(), Some(10));
    let host = HostNetns::runtimes(&proc.dir).unwrap();
    assert_eq!(host.id, Netns::open(node.ns.path()).unwrap().id());
    assert_eq!(
        host.by,
        HostBy::Runtime {
            pid: 50,
            comm: "containerd-shim".into(),
            agent_inside: false
        }
    );
    let scope = Scope {
        proc: proc.dir.clone(),
        host,
    };
    let all = candidates(&scope).unwrap();
    assert!(!all.values().any(|&p| p == 50 || p == 60), "{all:?}");
    assert!(all.values().any(|&p| p == 200), "{all:?}");
    assert_eq!(find_pod_netns(&scope, &[pod.ip]).unwrap().pid, 200);
    // The host's address (a hostNetwork pod's) is never found: its netns is not searched.
    let e = find_pod_netns(&scope, &[node.ip]).unwrap_err();
    assert!(matches!(e, SearchError::NotFound { .. }), "{e}");

    // hostNetwork: the agent shares the runtime's netns, which is then never a candidate either.
    let proc = FakeProc::new();
    container_view(&proc, &container.path(), &own, &own);
    proc.process(200, pod.ns.path(), Some(10));
    let host = HostNetns::runtimes(&proc.dir).unwrap();
    assert_eq!(host.id, Netns::open(&own).unwrap().id());
    assert_eq!(
        host.by,
        HostBy::Runtime {
            pid: 50,
            comm: "containerd-shim".into(),
            agent_inside: true
        }
    );
    let scope = Scope {
        proc: proc.dir.clone(),
        host,
    };
    assert_eq!(
        candidates(&scope)
            .unwrap()
            .into_values()
            .collect::<Vec<_>>(),
        vec![200]
    );

    // A /proc whose `self` is not this process.
    let elsewhere = TestNetns::new("rrt-else");
    let proc = FakeProc::new();
    container_view(&proc, &container.path(), elsewhere.path(), &own);
    let e = HostNetns::runtimes(&proc.dir).unwrap_err();
    assert!(e.contains("does not show this process"), "{e}");
    // No ancestor outside our pid namespace (hostPID, or the container's own /proc mounted as the host's).
    let proc = FakeProc::new();
    proc.this_is(100);
    proc.task(100, 90, &own, &container.path(), "node-agent");
    proc.task(90, 0, &own, &container.path(), "sh");
    let e = HostNetns::runtimes(&proc.dir).unwrap_err();
    assert!(e.contains("no ancestor of pid 100"), "{e}");
    // Not a procfs at all.
    let proc = FakeProc::new();
    let e = HostNetns::runtimes(&proc.dir).unwrap_err();
    assert!(e.contains("self is not a link"), "{e}");
}

#[test]
fn the_real_proc_gives_inits_netns_or_the_reason_it_cannot() {
    let init = Path::new("/proc/1/ns/net");
    match Scope::establish("/proc") {
        Ok(scope) => {
            assert_eq!(scope.host.by, HostBy::Init(init.to_path_buf()));
            assert_eq!(scope.host.id, Netns::open(init).unwrap().id());
        }
        // Where init may not be inspected (this sandbox), the tests are no container: nothing verifies our netns.
        Err(e) => {
            let opened = std::fs::File::open(init).map(|_| ()).unwrap_err();
            assert_eq!(opened.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            assert!(matches!(e, SearchError::NoHostNetns { .. }), "{e}");
            assert!(e.to_string().contains("/proc/1/ns/net"), "{e}");
        }
    }
}

/// An injected pod on node-1 whose istio-validation failed with 126, with `ip` as its IP.
fn broken_pod(ip: IpAddr) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default", "uid": "uid-web-1", "resourceVersion": "9",
                     "annotations": {"sidecar.istio.io/status": "{}",
                                     "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}},
        "spec": {
            "nodeName": "node-1",
            "initContainers": [{"name": "istio-validation"}],
            "containers": [{"name": "app"}, {"name": "istio-proxy", "args": ["proxy", "sidecar"]}],
        },
        "status": {
            "phase": "Pending", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "initContainerStatuses": [{
                "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false, "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}},
            }],
        },
    }))
    .unwrap()
}

fn redirect_of(pod: &Pod) -> Redirect {
    Redirect::from_pod(&PodInfo::from(pod)).unwrap()
}

fn nft_ruleset(ns: &TestNetns) -> String {
    ns.must("nft", &["list", "ruleset"])
}

fn host_state() -> (Vec<(String, String)>, String) {
    (
        host_snapshot(),
        must(Command::new("nft").args(["list", "ruleset"])),
    )
}

#[test]
fn a_repair_installs_what_the_plugin_would_have() {
    for backend in [
        BackendChoice::Legacy,
        BackendChoice::Nft,
        BackendChoice::Nftables,
    ] {
        let host_before = host_state();
        let pod = RunningPod::new("rrep", unique_ip(), None);
        let k8s_pod = broken_pod(pod.ip);
        let redirect = redirect_of(&k8s_pod);
        let before = match backend {
            BackendChoice::Nftables => nft_ruleset(&pod.ns),
            _ => String::new(),
        };
        assert!(!before.contains("inet istio"), "{before}");

        let repairer = HostRedirector::new(Ok(real_proc()), backend);
        let (found, programmed) = repairer.repair(&[pod.ip], &redirect).unwrap();
        assert_eq!(found.pid, pod.pid());
        assert_eq!(programmed.v4, apply::FamilyOutcome::Applied, "{backend:?}");

        // The reference: the plugin's programming call on a fresh netns.
        let reference = PodNet::new("rref", false);
        apply::program(
            reference.pod.path(),
            backend,
            &Target::Redirect(redirect.clone()),
        )
        .unwrap();
        match backend {
            BackendChoice::Nftables => {
                let got = nft_ruleset(&pod.ns);
                assert!(got.contains("ISTIO") || got.contains("istio"), "{got}");
                assert_eq!(got, nft_ruleset(&reference.pod), "{backend:?}");
            }
            _ => {
                let flavour = if backend == BackendChoice::Legacy {
                    Flavour::Legacy
                } else {
                    Flavour::Nft
                };
                let got = by_table(&pod.ns.save(flavour, Family::V4));
                assert!(
                    got["nat"].iter().any(|l| l.contains("ISTIO_OUTPUT")),
                    "{got:?}"
                );
                assert!(
                    got["nat"].iter().any(|l| l.contains("5432")),
                    "the pod's annotation is applied: {got:?}"
                );
                assert_eq!(
                    got,
                    by_table(&reference.pod.save(flavour, Family::V4)),
                    "{backend:?}"
                );
            }
        }
        // A second repair leaves one copy (iptables: untouched; native nftables replaces its tables in one
        // transaction).
        let (_, again) = repairer.repair(&[pod.ip], &redirect).unwrap();
        match backend {
            BackendChoice::Nftables => {
                assert_eq!(again.v4, apply::FamilyOutcome::Replaced);
                assert_eq!(nft_ruleset(&pod.ns), nft_ruleset(&reference.pod));
            }
            _ => assert_eq!(again.v4, apply::FamilyOutcome::Unchanged, "{backend:?}"),
        }
        assert_eq!(host_state(), host_before, "the host's rules changed");
    }
}

/// Records the API calls of the controller.
#[derive(Default)]
struct Api {
    events: Mutex<Vec<CoreEvent>>,
    other: Mutex<Vec<String>>,
}

impl PodActions for Api {
    async fn delete(&self, pod: &PodTarget) -> Result<(), ApiError> {
        self.other
            .lock()
            .unwrap()
            .push(format!("delete {}", pod.name));
        Ok(())
    }
    async fn label(&self, pod: &PodTarget, key: &str, _: &str) -> Result<(), ApiError> {
        self.other
            .lock()
            .unwrap()
            .push(format!("label {} {key}", pod.name));
        Ok(())
    }
    async fn event(&self, event: CoreEvent) -> Result<(), ApiError> {
        self.events.lock().unwrap().push(event);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_repairs_a_broken_pod_once_from_its_watch_events() {
    let host_before = host_state();
    let pod = RunningPod::new("rctl", unique_ip(), None);
    let k8s_pod = broken_pod(pod.ip);
    let cfg = RepairConfig {
        mode: RepairMode::Repair,
        filter: BrokenPodFilter::istio("node-1"),
        label_key: "cni.istio.io/uninitialized".into(),
        label_value: "true".into(),
        host_proc: PathBuf::from("/proc"),
        plugin: cni_plugin::config::PluginConfig::from_json(
            &json!({"type": "istio-cni", "native_nftables": true}),
        )
        .unwrap(),
    };
    let api = Arc::new(Api::default());
    let shared = Shared::new();
    let redirector = Arc::new(HostRedirector::new(Ok(real_proc()), cfg.plugin.backend));
    let mut controller = Controller::new(cfg, api.clone(), redirector, shared.clone());
    controller
        .run(stream::iter(vec![
            Event::Init,
            Event::InitApply(k8s_pod.clone()),
            Event::InitDone,
            Event::Apply(k8s_pod),
        ]))
        .await;
    let ruleset = nft_ruleset(&pod.ns);
    assert!(!ruleset.trim().is_empty(), "no rules in the pod netns");
    let events = api.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason.as_deref(), Some("RepairBrokenPod"));
    let message = events[0].message.clone().unwrap_or_default();
    assert!(
        message.contains("repaired") && message.contains(&pod.pid().to_string()),
        "{message}"
    );
    assert!(api.other.lock().unwrap().is_empty());
    assert!(shared
        .metrics_text()
        .contains("istio_cni_repair_pods_repaired_total{type=\"repair\",result=\"success\"} 1"));
    assert_eq!(host_state(), host_before, "the host's rules changed");
}
