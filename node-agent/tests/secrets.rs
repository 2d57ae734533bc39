//! No secret in any log line. The real agent and the real plugin run with a distinctive service-account token at
//! the most verbose log level (`LOG_LEVEL=debug`, every target at `trace`) against the API stub, which quotes
//! every request it refuses in its answer, `Authorization` header included. Through install, the pod watch
//! refused (401, 500) then served, the plugin's ADD refused (401) and failing (500 until its deadline) and
//! succeeding, a repair whose delete fails, `node-agent status`, a token rotation and the shutdown, every line is
//! collected (the agent's stdout and stderr, the plugin's stderr and stdout, the plugin lines it forwards over
//! log.sock, which the agent logs again, the status output): neither token, nor any base64 form of one, is in
//! any of them. The echoes did reach the logs: `<redacted>` stands where each token was quoted.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::{Agent, Node, AGENT};
use meshcni_tests::apiserver::{ApiServer, Fault};
use meshcni_tests::chain::{Invocation, PluginOutput};
use meshcni_tests::netns::require_root;
use serde_json::{json, Value};

const SECRET: &str = "eyJhbGciOiJSUzI1NiJ9.meshcni-SECRET-7f3a9c41d2.c2lnbmF0dXJlLW9uZQ";
const SECRET2: &str = "eyJhbGciOiJSUzI1NiJ9.meshcni-ROTATED-0b8e66aa51.c2lnbmF0dXJlLXR3bw";
const WAIT: Duration = Duration::from_secs(20);

/// Every form of `secret` that must not appear: itself and its base64 encodings.
fn forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut v = vec![secret.to_string()];
    for e in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        v.push(e.encode(secret));
    }
    // The token's signature alone is as good as the token to someone who has the rest from a JWT decoder.
    v.push(secret.rsplit('.').next().unwrap_or(secret).to_string());
    v
}

fn plugin_bin() -> std::path::PathBuf {
    let p = Path::new(AGENT).with_file_name("istio-cni");
    assert!(
        p.is_file(),
        "{} not found: build the workspace binaries first",
        p.display()
    );
    p
}

/// One ADD of the installed plugin for `ns/name`, its lookups with a 1 s deadline.
fn add(node: &Node, ns: &str, name: &str) -> PluginOutput {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": node.run, "plugin_log_level": "debug",
        "pod_lookup_timeout_seconds": 1,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.9/16"}], "dns": {}}
    });
    Invocation::new(node.plugin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("c0ffee-{name}"))
        // A pod that is not redirected never has its netns opened.
        .env("CNI_NETNS", "/var/run/netns/meshcni-secrets-unused")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        )
        .stdin(serde_json::to_vec(&conf).unwrap())
        .run_with_timeout(Duration::from_secs(30))
}

/// A pod on another node (never in this node's cache: the plugin GETs it).
fn plain_pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": "node-2", "containers": [{"name": "app", "image": "app:1"}]}})
}

/// An injected pod of this node whose istio-validation init container failed with 126: the repair acts on it.
fn broken_pod(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "annotations": {"sidecar.istio.io/status": "{}"}},
        "spec": {"nodeName": "node-1",
                 "initContainers": [{"name": "istio-validation", "image": "proxyv2:1"}],
                 "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Pending", "podIP": "10.22.0.77",
                   "initContainerStatuses": [{"name": "istio-validation", "image": "proxyv2:1", "imageID": "",
                       "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                       "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}}]},
    })
}

/// One HTTP/1.1 request on one of the agent's sockets in `run`: the whole answer.
fn ask_socket(run: &Path, socket: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(run.join(socket)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: unix\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

struct Logs {
    /// (where, text)
    all: Vec<(String, String)>,
}

impl Logs {
    fn plugin(&mut self, what: &str, out: &PluginOutput) {
        self.all
            .push((format!("{what}: plugin stderr"), out.stderr.clone()));
        self.all
            .push((format!("{what}: plugin stdout"), out.stdout.clone()));
    }
}

#[test]
fn no_token_in_any_log_line() {
    require_root();
    let srv = ApiServer::builder()
        .token(SECRET)
        .start()
        .expect("start the API stub");
    srv.echo_requests(true);
    let mut node = Node::new("secrets");
    node.project_sa(SECRET, srv.ca_pem().as_bytes());
    std::fs::copy(plugin_bin(), node.src.join("istio-cni")).unwrap();
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    let port = srv.port().to_string();
    let mut logs = Logs { all: Vec::new() };

    // The pod watch is refused first, 401 then 500, each answer quoting the request with its bearer token.
    srv.refuse_list_watch(Some(401));
    let mut agent = Agent::start(
        &node,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
            ("POD_CACHE_ENABLED", "true"),
            ("REPAIR_ENABLED", "true"),
            ("REPAIR_REPAIR_PODS", "false"),
            ("REPAIR_DELETE_PODS", "true"),
            ("LOG_LEVEL", "debug"),
            ("NODE_AGENT_LOG", "trace"),
        ],
    );
    agent.wait_ready();
    let kubeconfig = std::fs::read_to_string(node.kubeconfig()).unwrap();
    assert!(
        kubeconfig.contains(SECRET),
        "the plugin's kubeconfig carries the token"
    );
    let quoted = |text: &str| text.contains("request as received") && text.contains("<redacted>");
    agent.expect("the refused watch in the log", WAIT, || {
        quoted(&agent.log_text()).then_some(())
    });
    srv.refuse_list_watch(Some(500));
    let lists = srv.pod_lists();
    agent.expect("the watch retried against a 500", WAIT, || {
        (srv.pod_lists() > lists + 1).then_some(())
    });
    srv.refuse_list_watch(None);
    agent.expect("the pod cache synced", WAIT, || {
        agent
            .metrics_text()
            .contains("meshcni_pod_cache_synced 1")
            .then_some(())
    });

    // The plugin: a GET refused (401), one failing until the deadline (500), one that works.
    srv.add_pod(plain_pod("default", "web-0")).unwrap();
    srv.push_fault(Fault::Status(401));
    let denied = add(&node, "default", "web-0");
    assert_eq!(denied.exit_code, Some(1), "{}", denied.stderr);
    assert!(denied.stdout.contains("HTTP 401"), "{}", denied.stdout);
    assert!(
        quoted(&denied.stdout) && quoted(&denied.stderr),
        "{denied:?}"
    );
    logs.plugin("ADD refused", &denied);
    srv.push_faults(8, Fault::Status(500));
    let failing = add(&node, "default", "web-0");
    assert!(failing.stdout.contains("HTTP 500"), "{}", failing.stdout);
    logs.plugin("ADD failing", &failing);
    while srv.pending_faults() > 0 {
        // The rest of the 500s, by GETs of our own (the stub consumes one per request).
        let _ = add(&node, "default", "web-0");
    }
    let fine = add(&node, "default", "web-0");
    assert!(fine.success, "{fine:?}");
    logs.plugin("ADD", &fine);
    agent.expect("the plugin's forwarded lines, scrubbed", WAIT, || {
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("cni-plugin") && quoted(l))
            .then_some(())
    });

    // The repair: its delete fails (a quoted 500), its Event is created, the next attempt deletes.
    srv.push_fault(Fault::Status(500));
    srv.add_pod(broken_pod("default", "broken-0")).unwrap();
    agent.expect("the failed delete logged", WAIT, || {
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("repair action failed") && quoted(l))
            .then_some(())
    });
    let mut again = broken_pod("default", "broken-0");
    again["status"]["initContainerStatuses"][0]["restartCount"] = json!(2);
    srv.add_pod(again).unwrap();
    agent.expect("the broken pod deleted", WAIT, || {
        srv.served_pod("default", "broken-0")
            .is_none()
            .then_some(())
    });
    assert!(!srv.events().is_empty(), "the repair recorded its Events");

    // A plugin that is not ours (Istio's does not scrub) reports a line and an ADD record quoting the token.
    let foreign = [
        json!({"level": "error", "time": "2026-12-01T09:00:00.000001Z",
               "msg": format!("GET failed: Authorization: Bearer {SECRET}"),
               "namespace": "default", "pod": "foreign-0"}),
        json!({"level": "info", "time": "2026-12-01T09:00:00.000002Z", "msg": "meshcni.add",
               "namespace": "default", "pod": "foreign-0", "container_id": "c0ffee-foreign",
               "outcome": "failed", "reason": "pod_lookup", "backend": "none", "latency_seconds": 0.001,
               "detail": format!("HTTP 401: request as received: authorization: Bearer {SECRET}")}),
    ];
    let body =
        serde_json::to_string(&foreign.iter().map(Value::to_string).collect::<Vec<_>>()).unwrap();
    let answer = ask_socket(&node.run, "log.sock", "POST", "/log", &body);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    agent.expect("the foreign lines logged, scrubbed", WAIT, || {
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("foreign-0") && l.contains("Bearer <redacted>"))
            .then_some(())
    });

    // What the status socket serves, and node-agent status, both forms.
    let served = ask_socket(&node.run, "status.sock", "GET", "/status", "");
    assert!(served.contains("foreign-0"), "{served}");
    logs.all.push(("status.sock".into(), served));
    for args in [vec!["status"], vec!["status", "--json"]] {
        let out = Command::new(AGENT)
            .env_clear()
            .envs(node.env(agent.health, agent.metrics))
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", &port)
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            stdout.contains("web-0") && stdout.contains("foreign-0"),
            "status shows the ADDs: {stdout}"
        );
        logs.all.push((format!("{args:?} stdout"), stdout));
        logs.all.push((
            format!("{args:?} stderr"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }

    // The token rotates; the stub still wants the old one, so the plugin's GET with the new one is refused and
    // quoted back; its forwarded lines reach the agent's log.
    node.project_sa(SECRET2, srv.ca_pem().as_bytes());
    agent.expect("the kubeconfig rewritten", WAIT, || {
        std::fs::read_to_string(node.kubeconfig())
            .ok()?
            .contains(SECRET2)
            .then_some(())
    });
    let before = agent.log_text().matches("<redacted>").count();
    let rotated = add(&node, "default", "web-0");
    assert!(
        rotated.stdout.contains("HTTP 401") && quoted(&rotated.stdout),
        "{rotated:?}"
    );
    logs.plugin("ADD after the rotation", &rotated);
    agent.expect(
        "the new token's refusal forwarded and scrubbed",
        WAIT,
        || (agent.log_text().matches("<redacted>").count() > before).then_some(()),
    );

    let status = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{status}: {}", agent.log_text());
    let agent_log = agent.log_text();
    assert!(
        agent_log.contains("cleanup complete"),
        "the whole run is in the log"
    );
    logs.all.push(("agent stdout and stderr".into(), agent_log));

    // What the repair told the API server: Events anyone who may read them sees.
    let events = srv.events();
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().is_some_and(quoted)),
        "the failed delete's Event quotes the (scrubbed) answer: {events:?}"
    );
    logs.all.push((
        "Events posted to the API server".into(),
        serde_json::to_string_pretty(&events).unwrap(),
    ));

    let secrets: Vec<String> = forms(SECRET).into_iter().chain(forms(SECRET2)).collect();
    let mut leaks = Vec::new();
    for (what, text) in &logs.all {
        for (n, line) in text.lines().enumerate() {
            for s in &secrets {
                if line.contains(s.as_str()) {
                    leaks.push(format!("{what}, line {}: {s} in {line}", n + 1));
                }
            }
        }
    }
    let lines: usize = logs.all.iter().map(|(_, t)| t.lines().count()).sum();
    assert!(
        leaks.is_empty(),
        "{} of {lines} lines leak a token:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    println!(
        "{lines} log lines from {} sources, no token in any",
        logs.all.len()
    );
}
