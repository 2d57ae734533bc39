//! The plugin's pod lookup through the agent's pod cache, end to end with the real binaries (root): the HTTPS API
//! stub, the real `node-agent` on temp host dirs pointed at it (its own client from the service-account token and
//! CA, watching `spec.nodeName=node-1`), and the real `istio-cni` doing ADDs into fresh pod netns with the entry's
//! `cni_agent_run_dir` = the agent's `CNI_AGENT_RUN_DIR`.
//!
//! The stub's request log is the witness: a pod served from the cache costs 0 GETs of it, every fallback exactly
//! one, and the decision (rules in the pod netns or none) always follows what the API server says, never a cache
//! that cannot be trusted. The untrusted answers come from a test-owned listener at the socket path that *lies*
//! ("no sidecar" for an injected pod): the same lie from a trusted socket is believed (the control case), so a
//! plugin that skipped a check would fail these tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cni_plugin::apply::{Family, Flavour};
use cni_plugin::lookup::agent::{Answer, Miss, Response};
use cni_plugin::pod::PodInfo;
use meshcni_tests::agent::{Agent, Node, NODE};
use meshcni_tests::apiserver::{sample_pod, ApiServer};
use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use meshcni_tests::e2e::for_each_case;
use meshcni_tests::netns::{istio_lines, require_root, PodNet};
use serde_json::{json, Value};

const NS: &str = "default";
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The tests of this file run one at a time: the plugin gives the agent 10 ms, and a 2-core machine running the
/// other tests' netns and iptables work next to it can miss that (the plugin then, correctly, does its GET, and a
/// "0 GETs" assertion fails for a reason that is not the one under test).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The API stub of one test, holding the file's lock while it lives.
struct Stub {
    srv: ApiServer,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Stub {
    type Target = ApiServer;

    fn deref(&self) -> &ApiServer {
        &self.srv
    }
}

fn stub() -> Stub {
    require_root();
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Stub {
        srv: ApiServer::start().expect("start the API stub"),
        _serial: serial,
    }
}

/// A stub serving the injected pod `web` (uid `uid-web`).
fn stub_with_web() -> Stub {
    let srv = stub();
    srv.add_pod(injected("web", "uid-web")).expect("add web");
    srv
}

/// A stub serving `web` and the pod without a sidecar `plain` (uid `uid-plain`).
fn stub_with_web_and_plain() -> Stub {
    let srv = stub_with_web();
    srv.add_pod(plain("plain", "uid-plain")).expect("add plain");
    srv
}

/// A sidecar-injected pod bound to this node, with this UID.
fn injected(name: &str, uid: &str) -> Value {
    let mut p = sample_pod(NS, name);
    p["metadata"]["uid"] = json!(uid);
    p["spec"]["nodeName"] = json!(NODE);
    p
}

/// A pod without a sidecar bound to this node.
fn plain(name: &str, uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": {"app": name}},
           "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]}})
}

/// One pod start: a fresh netns pair and the plugin's ADD with the entry a node would have.
struct Start {
    net: PodNet,
    out: PluginOutput,
}

impl Start {
    fn rules(&self) -> Vec<String> {
        istio_lines(&self.net.pod.save(Flavour::Nft, Family::V4))
    }

    #[track_caller]
    fn assert_redirected(&self) {
        assert!(self.out.success, "ADD failed: {:?}", self.out);
        assert!(
            !self.rules().is_empty(),
            "no Istio rule in the pod netns; plugin stderr:\n{}",
            self.out.stderr
        );
    }

    /// The ADD failed with CNI error `code`, its message holding `says`, and nothing was programmed.
    #[track_caller]
    fn assert_failed(&self, code: u64, says: &str) {
        assert_eq!(self.out.error_code(), Some(code), "{:?}", self.out);
        let msg = self.out.json()["msg"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(says), "{msg}");
        assert!(self.rules().is_empty(), "{:?}", self.rules());
    }

    #[track_caller]
    /// The level the plugin logged its fallback at ("INFO", "WARN"); panics when it logged none.
    fn fallback_level(&self) -> String {
        let line = self
            .out
            .stderr
            .lines()
            .find(|l| l.contains("not answered by the agent's cache"))
            .unwrap_or_else(|| panic!("no fallback logged; plugin stderr:\n{}", self.out.stderr));
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        v["level"].as_str().unwrap_or_default().to_string()
    }

    fn assert_passed_through(&self) {
        assert!(self.out.success, "ADD failed: {:?}", self.out);
        for flavour in [Flavour::Legacy, Flavour::Nft] {
            for family in [Family::V4, Family::V6] {
                let save = self.net.pod.save(flavour, family);
                assert!(
                    !save.contains("ISTIO"),
                    "{flavour:?} {family:?} has Istio rules:\n{save}\nplugin stderr:\n{}",
                    self.out.stderr
                );
            }
        }
    }
}

/// ADD of pod `name` (with `K8S_POD_UID` when `uid` is given) on `node`; returns after the plugin exits.
fn add(node: &Node, name: &str, uid: Option<&str>) -> Start {
    let net = PodNet::new("pc", false);
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": net.pod.path()}],
        "ips": [{"address": format!("{}/24", net.addrs.pod_v4), "gateway": net.addrs.peer_v4, "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": net.addrs.peer_v4}],
        "dns": {}
    });
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": node.run, "plugin_log_level": "debug",
        "pod_lookup_timeout_seconds": 5, "iptables_backend": "nft", "prevResult": prev,
    });
    let mut args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=ctr-{name}"
    );
    if let Some(uid) = uid {
        args.push_str(&format!(";K8S_POD_UID={uid}"));
    }
    let out = Invocation::new(plugin_bin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("ctr-{name}"))
        .env("CNI_NETNS", net.pod.path().display().to_string())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(serde_json::to_vec(&conf).expect("conf"))
        .run_with_timeout(PLUGIN_TIMEOUT);
    Start { net, out }
}

/// ADD of `name`, asserting how many GETs of that pod it made.
#[track_caller]
fn add_counted(srv: &ApiServer, node: &Node, name: &str, uid: Option<&str>, gets: usize) -> Start {
    let before = srv.pod_requests(NS, name);
    let s = add(node, name, uid);
    let made = srv.pod_requests(NS, name) - before;
    assert_eq!(
        made, gets,
        "ADD of {name} (uid {uid:?}) made {made} GET(s) of it, expected {gets}; plugin stderr:\n{}",
        s.out.stderr
    );
    s
}

/// A node with the agent running, ready and its cache synced.
fn node_with_agent(tag: &str, srv: &ApiServer) -> (Node, Agent) {
    let node = Node::new(tag, srv);
    let mut agent = Agent::start(&node, srv);
    agent.wait_ready();
    agent.wait_synced();
    (node, agent)
}

/// A node without an agent: only the plugin's kubeconfig in the run dir, as a node keeps it after the agent.
fn node_without_agent(tag: &str, srv: &ApiServer) -> Node {
    let node = Node::new(tag, srv);
    srv.write_kubeconfig(&node.kubeconfig())
        .expect("write the plugin's kubeconfig");
    node
}

#[test]
fn pods_are_served_from_the_cache_without_a_get() {
    let srv = stub_with_web_and_plain();
    let (node, mut agent) = node_with_agent("served", &srv);
    // The plugin's entry the agent wrote names the run dir its socket is in.
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(node.conf.join("10-bridge.conflist")).expect("read the conflist"),
    )
    .expect("conflist JSON");
    let entry = conflist["plugins"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p["type"] == "istio-cni"))
        .expect("the agent inserted the istio-cni entry");
    assert_eq!(entry["cni_agent_run_dir"], json!(node.run));
    assert!(node.socket().exists());

    for_each_case(
        [
            ("web", Some("uid-web"), true),
            // A runtime that passes no K8S_POD_UID is served too.
            ("web", None, true),
            ("plain", Some("uid-plain"), false),
        ],
        |(name, uid, _)| format!("{name} uid {uid:?}"),
        |(name, uid, redirected)| {
            let s = add_counted(&srv, &node, name, uid, 0);
            if redirected {
                s.assert_redirected();
            } else {
                s.assert_passed_through();
            }
        },
    );

    // A pod created after the watch started, and one changed after it (now injected).
    srv.add_pod(injected("late", "uid-late")).unwrap();
    let mut became = injected("plain", "uid-plain");
    became["metadata"]["labels"]["v"] = json!("2");
    srv.add_pod(became).unwrap();
    agent.wait_cached(NS, "late", "uid-late");
    agent.wait_for(
        "the change of plain in the cache",
        Duration::from_secs(10),
        || agent_says_injected(&node, "plain").then_some(()),
    );
    add_counted(&srv, &node, "late", Some("uid-late"), 0).assert_redirected();
    add_counted(&srv, &node, "plain", Some("uid-plain"), 0).assert_redirected();
    assert_eq!(srv.pod_gets(), 0, "{:?}", srv.request_log());
}

fn agent_says_injected(node: &Node, name: &str) -> bool {
    agent_ask(node, name).is_ok_and(|pi| pi.containers.contains("istio-proxy"))
}

#[test]
fn a_uid_mismatch_falls_back_to_the_get() {
    let srv = stub_with_web();
    srv.add_pod(plain("db-0", "uid-db-old")).unwrap();
    let (node, mut agent) = node_with_agent("uid", &srv);

    // The runtime starts another pod than the cached one: the GET decides, and the API server's pod of that name
    // is not the runtime's either (another UID): refused, nothing programmed.
    add_counted(&srv, &node, "web", Some("uid-someone-else"), 1).assert_failed(
        100,
        "has uid \"uid-web\", not the runtime's K8S_POD_UID \"uid-someone-else\"",
    );

    // A StatefulSet pod recreated under the same name, now with a sidecar, while the watch lags (paused): the cache
    // still holds the old pod without one. Believing it would leave the new pod uncaptured.
    srv.pause_watches(true);
    srv.add_pod(injected("db-0", "uid-db-new")).unwrap();
    let cached = agent.ask(NS, "db-0").expect("the old db-0 is still cached");
    assert!(!cached.containers.contains("istio-proxy"));
    let s = add_counted(&srv, &node, "db-0", Some("uid-db-new"), 1);
    s.assert_redirected();
    assert_eq!(
        s.fallback_level(),
        "INFO",
        "a recreated pod is no fault of the agent"
    );

    // Once the watch catches up, the new pod is served from the cache.
    srv.pause_watches(false);
    agent.wait_cached(NS, "db-0", "uid-db-new");
    add_counted(&srv, &node, "db-0", Some("uid-db-new"), 0).assert_redirected();
}

#[test]
fn an_unsynced_cache_falls_back_to_the_get_until_it_syncs() {
    let srv = stub_with_web_and_plain();
    srv.refuse_list_watch(Some(500));
    let node = Node::new("unsynced", &srv);
    let mut agent = Agent::start(&node, &srv);
    agent.wait_ready();
    agent.wait_for("the agent's first list", Duration::from_secs(10), || {
        (srv.pod_lists() >= 1).then_some(())
    });
    let e = agent
        .ask(NS, "web")
        .expect_err("nothing is answered unsynced");
    assert!(matches!(e, Miss::Unsynced), "{e}");
    let s = add_counted(&srv, &node, "web", Some("uid-web"), 1);
    s.assert_redirected();
    assert_eq!(s.fallback_level(), "INFO", "a listing cache is no fault");
    add_counted(&srv, &node, "plain", Some("uid-plain"), 1).assert_passed_through();

    // The API server serves lists again: the agent's next try syncs, and pods are served from the cache.
    srv.refuse_list_watch(None);
    agent.wait_synced();
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();

    // A watch that breaks (its stream ends, the new one is refused) may have missed events: unsynced again.
    srv.refuse_list_watch(Some(500));
    srv.end_watches();
    agent.wait_for("the cache to be unsynced", Duration::from_secs(10), || {
        matches!(agent_ask(&node, "web"), Err(Miss::Unsynced)).then_some(())
    });
    add_counted(&srv, &node, "web", Some("uid-web"), 1).assert_redirected();
    srv.refuse_list_watch(None);
    agent.wait_synced();
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();
}

fn agent_ask(node: &Node, name: &str) -> Result<PodInfo, Miss> {
    cni_plugin::lookup::agent::ask(
        &node.run,
        &cni_plugin::lookup::PodRef::new(NS, name),
        None,
        Duration::from_secs(2),
    )
}

#[test]
fn a_killed_agent_falls_back_to_the_get() {
    let srv = stub_with_web_and_plain();
    let (node, mut agent) = node_with_agent("killed", &srv);
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();
    agent.kill();
    // The socket file stays behind, and nothing accepts on it.
    let meta = std::fs::symlink_metadata(node.socket()).expect("the socket file remains");
    assert!(meta.file_type().is_socket());
    let e = UnixStream::connect(node.socket()).expect_err("nobody listens");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let s = add_counted(&srv, &node, "web", Some("uid-web"), 1);
    s.assert_redirected();
    assert_eq!(s.fallback_level(), "INFO", "an agent restarting");
    add_counted(&srv, &node, "plain", Some("uid-plain"), 1).assert_passed_through();

    // A new agent replaces the stale socket and serves again.
    let mut agent = Agent::start(&node, &srv);
    agent.wait_ready();
    agent.wait_synced();
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();
    // Stopped for good (SIGTERM), it removes its socket (with its entry and the kubeconfig; put the kubeconfig back
    // to see what a plugin still called does): no socket, the GET.
    agent.stop();
    assert!(
        !node.socket().exists(),
        "the socket outlived the agent's SIGTERM"
    );
    srv.write_kubeconfig(&node.kubeconfig())
        .expect("kubeconfig");
    add_counted(&srv, &node, "web", Some("uid-web"), 1).assert_redirected();
}

#[test]
fn a_stopping_agent_leaves_its_successors_socket() {
    // A DaemonSet rolling update with maxSurge: the new agent binds its socket before the old one gets SIGTERM.
    let srv = stub_with_web();
    let (node, mut old) = node_with_agent("succ", &srv);
    let mut new = Agent::start(&node, &srv);
    new.wait_ready();
    new.wait_synced();
    old.stop();
    assert!(
        node.socket().exists(),
        "the old agent removed its successor's socket; its log:\n{}",
        old.log_text()
    );
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();
}

#[test]
fn a_hung_agent_falls_back_to_the_get_within_the_deadline() {
    let srv = stub_with_web();
    let (node, agent) = node_with_agent("hung", &srv);
    // SIGSTOP: the kernel still accepts connections on its socket, nobody answers.
    agent.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    let s = add_counted(&srv, &node, "web", Some("uid-web"), 1);
    s.assert_redirected();
    assert!(
        s.out.stderr.contains("did not answer within"),
        "the fallback is not the deadline's: {}",
        s.out.stderr
    );
    assert_eq!(s.fallback_level(), "WARN", "an agent up and not answering");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    agent.signal(libc::SIGCONT);
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_redirected();
}

#[test]
fn no_socket_at_all_falls_back_to_the_get() {
    let srv = stub_with_web_and_plain();
    let node = node_without_agent("nosock", &srv);
    assert!(!node.socket().exists());
    add_counted(&srv, &node, "web", Some("uid-web"), 1).assert_redirected();
    add_counted(&srv, &node, "plain", Some("uid-plain"), 1).assert_passed_through();
}

/// A test-owned listener at the socket path, answering every connection with `answer` after `delay` (having
/// read the request line), counting connections. Stopped and joined on drop.
struct FakeAgent {
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl FakeAgent {
    fn start(path: &Path, answer: Vec<u8>, delay: Duration) -> FakeAgent {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        listener.set_nonblocking(true).expect("nonblocking");
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                };
                count.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut line = Vec::new();
                    let _ = BufReader::new(&stream).read_until(b'\n', &mut line);
                    std::thread::sleep(delay);
                    let _ = (&stream).write_all(&answer);
                });
            }
        });
        FakeAgent {
            connections,
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lie: a well-formed v1 hit saying the pod has no sidecar.
fn lying_hit(uid: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Response::new(Answer::Hit {
        uid: uid.into(),
        pod: PodInfo::default(),
    }))
    .expect("hit");
    line.push(b'\n');
    line
}

#[test]
fn a_trusted_socket_is_believed_the_control_case() {
    // Without this, the untrusted cases below could pass with a plugin that never asks the socket at all.
    let srv = stub_with_web();
    let node = node_without_agent("trusted", &srv);
    let fake = FakeAgent::start(&node.socket(), lying_hit("uid-web"), Duration::ZERO);
    add_counted(&srv, &node, "web", Some("uid-web"), 0).assert_passed_through();
    assert_eq!(fake.connections(), 1);
}

#[test]
fn untrusted_answers_fall_back_to_the_get() {
    let srv = stub_with_web();
    let mut v2 = serde_json::to_value(Response::new(Answer::Hit {
        uid: "uid-web".into(),
        pod: PodInfo::default(),
    }))
    .expect("hit");
    v2["v"] = json!(2);
    let v2 = format!("{v2}\n").into_bytes();
    let cases: Vec<(&str, Vec<u8>, Duration)> = vec![
        (
            "garbage",
            b"hello, I am not the agent\n".to_vec(),
            Duration::ZERO,
        ),
        (
            "an unterminated line",
            b"{\"v\":1,\"status\":\"hit\"".to_vec(),
            Duration::ZERO,
        ),
        ("no answer (closed)", Vec::new(), Duration::ZERO),
        ("an unknown protocol version", v2, Duration::ZERO),
        // The lie arrives, but after the plugin's deadline.
        ("too slow", lying_hit("uid-web"), Duration::from_millis(200)),
    ];
    for_each_case(
        cases,
        |(what, _, _)| what.to_string(),
        |(what, answer, delay)| {
            let node = node_without_agent("untrusted", &srv);
            let fake = FakeAgent::start(&node.socket(), answer, delay);
            let s = add_counted(&srv, &node, "web", Some("uid-web"), 1);
            s.assert_redirected();
            assert_eq!(fake.connections(), 1, "{what}: the plugin asked once");
            assert_eq!(s.fallback_level(), "WARN", "{what}");
        },
    );
}

#[test]
fn a_socket_of_the_wrong_owner_is_not_even_asked() {
    let srv = stub_with_web();
    for_each_case(
        ["mode 0666", "mode 0660", "owned by uid 65534"],
        |c| c.to_string(),
        |case| {
            let node = node_without_agent("owner", &srv);
            let fake = FakeAgent::start(&node.socket(), lying_hit("uid-web"), Duration::ZERO);
            match case {
                "mode 0666" => {
                    std::fs::set_permissions(node.socket(), std::fs::Permissions::from_mode(0o666))
                        .expect("chmod")
                }
                "mode 0660" => {
                    std::fs::set_permissions(node.socket(), std::fs::Permissions::from_mode(0o660))
                        .expect("chmod")
                }
                _ => std::os::unix::fs::lchown(node.socket(), Some(65534), Some(65534))
                    .expect("chown"),
            }
            let s = add_counted(&srv, &node, "web", Some("uid-web"), 1);
            s.assert_redirected();
            assert_eq!(s.fallback_level(), "WARN", "{case}");
            assert_eq!(
                fake.connections(),
                0,
                "{case}: the plugin connected to a socket it cannot trust"
            );
        },
    );
}

#[test]
fn steady_state_makes_no_pod_request_per_start_and_one_without_the_agent() {
    const N: usize = 8;
    let srv = stub();
    for i in 0..N {
        if i % 2 == 0 {
            srv.add_pod(injected(&format!("web-{i}"), &format!("uid-{i}")))
                .unwrap();
        } else {
            srv.add_pod(plain(&format!("app-{i}"), &format!("uid-{i}")))
                .unwrap();
        }
    }
    let name = |i: usize| {
        if i % 2 == 0 {
            format!("web-{i}")
        } else {
            format!("app-{i}")
        }
    };
    let run_all = |node: &Node, gets: usize| {
        for i in 0..N {
            let s = add_counted(&srv, node, &name(i), Some(&format!("uid-{i}")), gets);
            if i % 2 == 0 {
                s.assert_redirected();
            } else {
                s.assert_passed_through();
            }
        }
    };
    let non_watch = |srv: &Stub| srv.total_requests() - srv.pod_lists() - srv.pod_watches();

    let (node, agent) = node_with_agent("steady", &srv);
    let before = non_watch(&srv);
    run_all(&node, 0);
    assert_eq!(
        non_watch(&srv) - before,
        0,
        "API requests other than the agent's list/watch: {:?}",
        srv.request_log()
    );
    assert_eq!(srv.pod_gets(), 0);
    drop(agent);
    drop(node);

    let node = node_without_agent("steady-none", &srv);
    let before = non_watch(&srv);
    run_all(&node, 1);
    assert_eq!(non_watch(&srv) - before, N, "{:?}", srv.request_log());
    assert_eq!(srv.pod_gets(), N);
    for i in 0..N {
        assert_eq!(srv.pod_requests(NS, &name(i)), 1, "{}", name(i));
    }
}
