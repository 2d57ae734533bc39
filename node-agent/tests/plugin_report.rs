//! The plugin's report to the agent, end to end with the real binaries: the agent against temp host dirs, the
//! real `istio-cni` (installed by it from the image dir) run with `cni_agent_run_dir` = the agent's run dir and
//! the HTTPS API stub for its pod lookups. After ADDs the agent's log shows the plugin's lines with the pod,
//! `/metrics` the counters and the histogram, `node-agent status` the decisions. Without an agent, or with a log
//! socket nobody reads, the ADD works and costs at most the deadline. A request recorded from Istio's plugin
//! (zap + Go's http client, `scripts/istio-log-recorder`) is accepted and re-logged with its pods.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Node};
use meshcni_tests::apiserver::{sample_pod, ApiServer};
use meshcni_tests::chain::{Invocation, PluginOutput};
use meshcni_tests::netns::{require_root, PodNet};
use serde_json::{json, Value};

fn plugin_bin() -> PathBuf {
    let p = Path::new(common::AGENT).with_file_name("istio-cni");
    assert!(
        p.is_file(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

struct Setup {
    node: Node,
    agent: Agent,
    srv: ApiServer,
}

/// The API stub, and a ready agent that installed the real plugin and wrote its kubeconfig for the stub (on
/// loopback: the service account carries the stub's token and CA), as on a node.
fn setup(tag: &str) -> Setup {
    let srv = ApiServer::start().expect("start the API stub");
    let mut node = Node::new(tag);
    node.project_sa(srv.token(), srv.ca_pem().as_bytes());
    std::fs::copy(plugin_bin(), node.src.join("istio-cni")).unwrap();
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    let port = srv.port().to_string();
    let mut agent = Agent::start(
        &node,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
        ],
    );
    agent.wait_ready();
    let kubeconfig = std::fs::read_to_string(node.kubeconfig()).unwrap();
    assert!(
        kubeconfig.contains(&format!("https://127.0.0.1:{port}")),
        "{kubeconfig}"
    );
    Setup { node, agent, srv }
}

fn plain_pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": "u"},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

/// One ADD of the installed plugin, with its wall time.
/// The kubeconfig is the one the agent wrote into `run_dir` (absent where no agent runs; those pods are in an
/// excluded namespace and need no lookup).
fn add(
    plugin: &Path,
    run_dir: &Path,
    pod: (&str, &str, &str),
    netns: &str,
) -> (PluginOutput, Duration) {
    let (ns, name, container) = pod;
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": run_dir, "plugin_log_level": "debug",
        "exclude_namespaces": ["istio-system"],
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.9/16"}], "dns": {}}
    });
    let inv = Invocation::new(plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        )
        .stdin(serde_json::to_vec(&conf).unwrap());
    let start = Instant::now();
    let out = inv.run_with_timeout(Duration::from_secs(60));
    (out, start.elapsed())
}

/// `node-agent status` of this node's agent: (exit code, stdout).
fn status(s: &Setup, args: &[&str]) -> (i32, String) {
    s.agent.status(&s.node, args)
}

/// The agent's log lines about `pod` (re-logged plugin lines carry `pod=<name>`).
fn lines_about(agent: &Agent, pod: &str) -> Vec<String> {
    let tag = format!("pod={pod} ");
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("cni-plugin") && l.contains(&tag))
        .map(String::from)
        .collect()
}

#[test]
fn adds_are_logged_with_their_pod_counted_and_shown_by_status() {
    require_root();
    let s = setup("report");
    let plugin = s.node.plugin();
    assert_eq!(
        std::fs::read(&plugin).unwrap(),
        std::fs::read(plugin_bin()).unwrap(),
        "the agent installs the real plugin"
    );
    s.srv.add_pod(sample_pod("default", "web-0")).unwrap();
    s.srv.add_pod(plain_pod("default", "plain-0")).unwrap();
    let pod_net = PodNet::new("report-web", false);
    let netns = pod_net.pod.path().display().to_string();
    let run = |pod: (&str, &str, &str), netns: &str| {
        let (out, _) = add(&plugin, &s.node.run, pod, netns);
        out
    };
    let out = run(("default", "web-0", "c0ffee01"), &netns);
    assert!(out.success, "{out:?}");
    let out = run(
        ("default", "plain-0", "c0ffee02"),
        "/var/run/netns/never-opened",
    );
    assert!(out.success, "{out:?}");
    let out = run(("istio-system", "istiod-1", "c0ffee03"), "/var/run/netns/x");
    assert!(out.success, "{out:?}");
    let out = run(("default", "ghost", "c0ffee04"), "/var/run/netns/x");
    assert_eq!(out.error_code(), Some(100), "{out:?}");

    // kubectl logs of the agent: why each pod was or was not redirected, with the pod's fields.
    let plain = s.agent.expect(
        "the plugin's lines about plain-0",
        Duration::from_secs(5),
        || {
            let l = lines_about(&s.agent, "plain-0");
            l.iter().any(|l| l.contains("meshcni.add")).then_some(l)
        },
    );
    let why = plain
        .iter()
        .find(|l| l.contains("no redirect"))
        .unwrap_or_else(|| panic!("{plain:#?}"));
    assert!(
        why.contains(" INFO ")
            && why.contains("namespace=default")
            && why.contains("container_id=c0ffee02")
            && why.contains("pod has no istio-proxy container"),
        "{why}"
    );
    let web = lines_about(&s.agent, "web-0");
    assert!(
        web.iter().any(|l| l.contains("rules programmed")),
        "{web:#?}"
    );
    let ghost = s
        .agent
        .expect("the failure of ghost", Duration::from_secs(5), || {
            let l = lines_about(&s.agent, "ghost");
            l.into_iter()
                .find(|l| l.contains(" ERROR ") && l.contains("istio-cni failed"))
        });
    assert!(ghost.contains("not found"), "{ghost}");

    // /metrics: the decisions and the latencies.
    let text = s.agent.metrics_text();
    for want in [
        r#"meshcni_cni_add_total{outcome="skipped",reason="no_proxy_container"} 1"#,
        r#"meshcni_cni_add_total{outcome="skipped",reason="namespace_excluded"} 1"#,
        r#"meshcni_cni_add_total{outcome="failed",reason="pod_lookup"} 1"#,
        r#"meshcni_cni_add_duration_seconds_count{outcome="skipped",backend="none"} 2"#,
        r#"meshcni_cni_add_duration_seconds_count{outcome="failed",backend="none"} 1"#,
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    let redirected = text
        .lines()
        .find(|l| l.starts_with(r#"meshcni_cni_add_total{outcome="redirected",reason=""}"#))
        .unwrap_or_else(|| panic!("no redirected count in\n{text}"));
    assert!(redirected.ends_with(" 1"), "{redirected}");
    assert!(
        text.lines().any(|l| l.starts_with(
            "meshcni_cni_add_duration_seconds_count{outcome=\"redirected\",backend=\"iptables-"
        ) && l.ends_with(" 1")),
        "{text}"
    );

    // node-agent status: the installation and the decisions, newest first.
    let (code, out) = status(&s, &[]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    let conflist = s.node.conf.join("10-calico.conflist");
    for want in [
        "node node-1 · meshcni node agent ".to_string(),
        "  ready     yes, since ".to_string(),
        format!("  conflist  {}\n", conflist.display()),
        "  entry     {".to_string(),
        format!("  binary    {} (", plugin.display()),
        format!(
            "  version   istio-cni (meshcni) {}\n",
            env!("CARGO_PKG_VERSION")
        ),
        "(same as this image's ".to_string(),
        "LAST ADD DECISIONS (4 of 4 kept, newest first)".to_string(),
        "REPAIR ACTIONS (0 of 0 kept, newest first)\n  none since the agent started".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} not in\n{out}");
    }
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("LAST ADD"))
        .skip(2)
        .take(4)
        .collect();
    // Each row from its pod on (WHEN is "now" or "2s ago": one or two words).
    let cells = |i: usize, pod: &str| -> Vec<String> {
        let row = rows[i];
        row[row
            .find(pod)
            .unwrap_or_else(|| panic!("{pod} not in row {i}: {out}"))..]
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        cells(0, "default/ghost")[1..4],
        ["c0ffee04", "failed", "pod_lookup"],
        "{out}"
    );
    assert_eq!(
        cells(1, "istio-system/istiod-1")[1..4],
        ["c0ffee03", "skipped", "namespace_excluded"],
        "{out}"
    );
    assert_eq!(
        cells(2, "default/plain-0")[1..4],
        ["c0ffee02", "skipped", "no_proxy_container"],
        "{out}"
    );
    let web = cells(3, "default/web-0");
    assert_eq!(web[1..4], ["c0ffee01", "redirected", "-"], "{out}");
    assert!(web[4].starts_with("iptables-"), "{out}");
    let sha = meshcni_sha256(&plugin);
    assert!(out.contains(&sha), "{sha} not in\n{out}");
    let (code, json) = status(&s, &["--json", "-n", "1"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["agent"]["Ok"]["adds"][0]["pod"], "ghost", "{v:#}");
    assert_eq!(v["binary"]["Ok"]["sha256"], sha.as_str());
}

/// sha256 by Debian's coreutils, to check ours.
fn meshcni_sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The median wall time of `n` namespace-excluded ADDs (no API call) against `run_dir`.
fn median_add(plugin: &Path, run_dir: &Path, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let c = format!("c{i}");
            let (out, t) = add(plugin, run_dir, ("istio-system", "p", &c), "/x");
            assert!(out.success, "{out:?}");
            t
        })
        .collect();
    times.sort();
    common::percentile(&times, 0.5)
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("meshcni-report-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

#[test]
fn without_an_agent_or_with_a_stuck_socket_the_add_costs_at_most_the_deadline() {
    let plugin = plugin_bin();
    let none = temp_dir("none");
    let stuck = temp_dir("stuck");
    // A log socket that accepts and never reads nor answers (until told to stop).
    let listener = UnixListener::bind(stuck.0.join("log.sock")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                held.extend(conn.ok());
            }
            held.len()
        })
    };
    let n = 15;
    // Warm the page cache first.
    median_add(&plugin, &none.0, 3);
    let base = median_add(&plugin, &none.0, n);
    let slow = median_add(&plugin, &stuck.0, n);
    let deadline = cni_plugin::report::DEADLINE;
    println!("median ADD: no agent {base:?}, stuck log socket {slow:?} (deadline {deadline:?})");
    assert!(
        slow < base + deadline + Duration::from_millis(5),
        "stuck socket {slow:?} vs none {base:?}"
    );
    // Without an agent the plugin does not even try: a few ms at most, whatever the machine.
    assert!(base < Duration::from_millis(200), "{base:?}");
    // It did write its lines into the stuck socket (unconfirmed), not wait for it.
    let (out, _) = add(&plugin, &stuck.0, ("istio-system", "p", "c"), "/x");
    assert!(out.stderr.contains("Unconfirmed"), "{}", out.stderr);
    let (out, _) = add(&plugin, &none.0, ("istio-system", "p", "c"), "/x");
    assert!(
        out.stderr.contains("no agent to send the plugin logs to"),
        "{}",
        out.stderr
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _wake = UnixStream::connect(stuck.0.join("log.sock"));
    let held = holder.join().unwrap();
    assert!(held > n, "the plugin did connect: {held}");
}

#[test]
fn a_request_of_istios_plugin_is_accepted_and_relogged_with_its_pods() {
    let node = Node::new("istio-log");
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    let mut agent = Agent::start(&node, &[]);
    agent.wait_ready();
    let request = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-plugin-log-request.http"),
    )
    .unwrap();
    let mut s = UnixStream::connect(node.run.join("log.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&request).unwrap();
    let mut answer = [0u8; 12];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let excluded = agent.expect("Istio's line about plain-0", Duration::from_secs(5), || {
        lines_about(&agent, "plain-0").into_iter().next()
    });
    assert!(
        excluded.contains(" INFO ")
            && excluded.contains("namespace=default")
            && excluded.contains("plugin_time=2026-03-01T12:00:00.124456Z")
            && excluded.contains("excluded due to not containing sidecar annotation"),
        "{excluded}"
    );
    let ghost = lines_about(&agent, "ghost");
    assert!(
        ghost.len() == 1 && ghost[0].contains(" ERROR ") && ghost[0].contains("fields=retries=3"),
        "{ghost:#?}"
    );
    // The agent's level is debug here: Istio's debug line (Go's \u003c escapes decoded) is there too.
    assert!(
        agent
            .log_text()
            .contains("{Kubernetes:<nil> PluginLogLevel:debug}")
            && agent.log_text().contains("fields=if=eth0"),
        "{}",
        agent.log_text()
    );
    let warn = lines_about(&agent, "istio-cni-node-x");
    assert!(
        warn.len() == 1 && warn[0].contains("namespace=istio-system"),
        "{warn:#?}"
    );
    // Not an ADD record of ours: nothing counted.
    assert!(!agent.metrics_text().contains("meshcni_cni_add_total{"));
    // The socket is owner-only, like the pod cache's.
    use std::os::unix::fs::MetadataExt;
    for name in ["log.sock", "status.sock"] {
        let mode = std::fs::symlink_metadata(node.run.join(name))
            .unwrap()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
}
