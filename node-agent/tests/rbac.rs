//! The ClusterRoles hold nothing unused and miss nothing: for the base of `daemonset/` and each repair component,
//! the real agent runs with that variant's own settings (the rendered ConfigMap and the DaemonSet's env; only
//! paths, ports and the API server's address are the test's) against the API stub, and every code path that
//! talks to the API is run in turn, whatever the variant enables: the agent's start (its node-scoped pod watch),
//! the plugin's ADD of a pod the agent's cache cannot answer (its GET), a broken pod for the repair controller,
//! the shutdown. The stub's request log gives the calls of each path as RBAC sees them (verb, API group,
//! resource, subresource, namespace, name). Then, per variant: every call is allowed by the rules the rendered
//! manifests bind to the DaemonSet's service account, every rule (each verb, group and resource of it) is used by
//! some call, and a path the variant does not enable makes no call at all.
//!
//! A new code path is one entry of [`paths`]; its rule goes into the manifests. (The shutdown's entry runs
//! already: a call the agent makes on SIGTERM, as the check of its own DaemonSet does, is covered once its
//! Role and RoleBinding are in the manifests.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Agent, Node, TempDir};
use meshcni_tests::apiserver::ApiServer;
use meshcni_tests::chain::Invocation;
use meshcni_tests::netns::require_root;
use meshcni_tests::rbac::{self, ApiCall, Grants};
use node_agent::config::RepairMode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const NODE_NAME: &str = "node-1";

/// What a variant's settings switch on.
#[derive(Debug, Clone, Copy)]
struct Enabled {
    /// The node-scoped pod watch: the pod cache or the repair controller needs it.
    watch: bool,
    repair: Option<RepairMode>,
}

/// One code path that talks to the API.
struct CodePath {
    name: &'static str,
    /// Whether a variant runs it; a path that is off must make no call.
    enabled: fn(&Enabled) -> bool,
    run: fn(&mut Run),
}

/// Every code path that talks to the API, in the order they run.
fn paths() -> Vec<CodePath> {
    vec![
        CodePath {
            name: "agent start: the node-scoped pod watch (pod cache, repair controller)",
            enabled: |e| e.watch,
            run: Run::start,
        },
        CodePath {
            name: "plugin ADD: GET of a pod the agent's cache does not hold",
            enabled: |_| true,
            run: Run::plugin_get,
        },
        CodePath {
            name: "repair of a broken pod (in place: its Event; delete: the delete, its Event; label: the \
                   pods/status patch, its Event)",
            enabled: |e| e.repair.is_some(),
            run: Run::repair,
        },
        CodePath {
            name: "shutdown (SIGTERM)",
            enabled: |_| true,
            run: Run::stop,
        },
    ]
}

/// One variant's run: its node, the stub, its agent.
struct Run {
    variant: String,
    enabled: Enabled,
    env: Vec<(String, String)>,
    node: Node,
    srv: ApiServer,
    agent: Option<Agent>,
    /// The repair controller's host /proc: an empty dir, so the in-place repair finds no netns (and enters none).
    _proc: TempDir,
}

fn temp_dir(tag: &str) -> TempDir {
    TempDir::new(&format!("rbac-{tag}"))
}

impl Run {
    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent runs")
    }

    fn expect(&self, what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            if start.elapsed() > WAIT {
                panic!(
                    "{}: timed out waiting for {what}; agent log:\n{}",
                    self.variant,
                    self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start(&mut self) {
        let env = self.env.clone();
        let mut agent = Agent::start_env(&self.node, &self.variant, move |health, metrics| {
            let mut env = env;
            env.push(("HEALTH_PORT".into(), health.to_string()));
            env.push(("MONITORING_PORT".into(), metrics.to_string()));
            env
        });
        agent.wait_ready();
        self.agent = Some(agent);
        if self.enabled.watch {
            self.expect("the pod watch listed the node's pods", || {
                self.agent()
                    .metrics_text()
                    .contains("meshcni_pod_cache_synced 1")
            });
        }
    }

    fn plugin_get(&mut self) {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "elsewhere-0", "namespace": "default", "uid": "uid-elsewhere"},
            "spec": {"nodeName": "node-2", "containers": [{"name": "app", "image": "app:1"}]}});
        self.srv.add_pod(pod).unwrap();
        // The entry the agent installed, as the runtime passes it to the plugin.
        let list = common::read_json(&self.node.conf.join("10-calico.conflist"));
        let mut conf = list["plugins"]
            .as_array()
            .and_then(|l| l.last())
            .cloned()
            .expect("our entry");
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("k8s-pod-network");
        conf["prevResult"] =
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.9/16"}], "dns": {}});
        let out = Invocation::new(self.node.plugin())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c0ffee-rbac")
            // Not redirected: its netns is never opened.
            .env("CNI_NETNS", "/var/run/netns/meshcni-rbac-unused")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=elsewhere-0",
            )
            .stdin(serde_json::to_vec(&conf).unwrap())
            .run_with_timeout(Duration::from_secs(30));
        assert!(out.success, "{}: plugin ADD: {out:?}", self.variant);
    }

    /// An injected pod of this node that started before the plugin: its istio-validation failed with 126.
    fn repair(&mut self) {
        let name = "broken-0";
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"]}"}},
            "spec": {"nodeName": NODE_NAME,
                     "initContainers": [{"name": "istio-validation", "image": "proxyv2:1"}],
                     "containers": [{"name": "app", "image": "app:1"},
                                    {"name": "istio-proxy", "image": "proxyv2:1", "args": ["proxy", "sidecar"]}]},
            "status": {"phase": "Pending", "podIP": "10.22.0.77", "podIPs": [{"ip": "10.22.0.77"}],
                       "initContainerStatuses": [{"name": "istio-validation", "image": "proxyv2:1", "imageID": "",
                           "ready": false, "restartCount": 1,
                           "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                           "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}}]},
        });
        self.srv.add_pod(pod).unwrap();
        let acts = self.enabled.repair.is_some();
        // What the repair ends with, whatever its mode: an Event about the pod. Without a repair controller,
        // a second is plenty for a watch event to have been handled by nobody.
        if acts {
            self.expect("the repair's Event", || {
                self.srv
                    .events()
                    .iter()
                    .any(|e| e["involvedObject"]["name"] == name)
            });
        } else {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn stop(&mut self) {
        let mut agent = self.agent.take().expect("the agent runs");
        let status = agent.stop(libc::SIGTERM);
        assert!(
            status.success(),
            "{}: {status}; log:\n{}",
            self.variant,
            agent.log_text()
        );
    }
}

/// The variant's settings: the rendered ConfigMap's data, then the DaemonSet container's own env (its
/// `fieldRef`s resolved as kubelet would), then the test's paths, addresses and ports, which must not switch
/// anything the manifests decide.
fn settings(
    objects: &[Value],
    node: &Node,
    srv: &ApiServer,
    proc: &TempDir,
) -> Vec<(String, String)> {
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
    };
    let mut env: Vec<(String, String)> = find("ConfigMap", "istio-cni-config")["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let ds = find("DaemonSet", "istio-cni-node");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    for var in container["env"].as_array().into_iter().flatten() {
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => NODE_NAME.to_string(),
            Some("metadata.name") => "istio-cni-node-rbac1".to_string(),
            Some("metadata.namespace") => ds["metadata"]["namespace"].as_str().unwrap().to_string(),
            Some(other) => {
                panic!("fieldRef {other} of the DaemonSet's env is not known to this test")
            }
            None => var["value"].as_str().unwrap_or_default().to_string(),
        };
        env.push((var["name"].as_str().unwrap().to_string(), value));
    }
    let dir = |p: &std::path::Path| p.display().to_string();
    let ours = [
        ("MOUNTED_CNI_NET_DIR", dir(&node.conf)),
        ("MOUNTED_CNI_BIN_DIR", dir(&node.bin)),
        ("CNI_BINARIES_SOURCE_DIR", dir(&node.src)),
        ("CNI_AGENT_RUN_DIR", dir(&node.run)),
        ("SERVICE_ACCOUNT_DIR", dir(&node.sa)),
        ("REPAIR_HOST_PROC_DIR", dir(&proc.0)),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
        ("KUBERNETES_SERVICE_PORT", srv.port().to_string()),
        ("BIND_ADDRESS", "127.0.0.1".to_string()),
    ];
    env.extend(ours.into_iter().map(|(k, v)| (k.to_string(), v)));
    env
}

fn flag(env: &[(String, String)], key: &str, default: bool) -> bool {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
        .unwrap_or(default)
}

/// What the agent's own defaults make of a variant's settings (the ones the manifests leave unset).
fn enabled(env: &[(String, String)]) -> Enabled {
    let repair = flag(env, "REPAIR_ENABLED", true)
        .then(|| {
            RepairMode::select(
                flag(env, "REPAIR_REPAIR_PODS", true),
                flag(env, "REPAIR_DELETE_PODS", false),
                flag(env, "REPAIR_LABEL_PODS", false),
            )
        })
        .flatten();
    Enabled {
        watch: flag(env, "POD_CACHE_ENABLED", true) || repair.is_some(),
        repair,
    }
}

#[test]
fn every_api_call_is_allowed_and_every_rule_used() {
    require_root();
    let work = temp_dir("render");
    let mut problems = Vec::new();
    let mut report = String::new();
    for component in rbac::variants() {
        let variant = component.clone().unwrap_or_else(|| "base".into());
        let objects = rbac::render(component.as_deref(), &work.0)
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        let ds = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .expect("the DaemonSet");
        let sa_name = ds["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let sa_ns = ds["metadata"]["namespace"].as_str().unwrap();
        let grants =
            Grants::of(&objects, sa_ns, sa_name).unwrap_or_else(|e| panic!("{variant}: {e}"));

        let srv = ApiServer::start().expect("start the API stub");
        let mut node = Node::new(&format!("rbac-{variant}"));
        node.project_sa(srv.token(), srv.ca_pem().as_bytes());
        let plugin = std::path::Path::new(common::AGENT).with_file_name("istio-cni");
        std::fs::copy(&plugin, node.src.join("istio-cni")).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build the workspace binaries first)",
                plugin.display()
            )
        });
        node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
        let proc = temp_dir(&format!("proc-{variant}"));
        let env = settings(&objects, &node, &srv, &proc);
        let enabled = enabled(&env);
        let mut run = Run {
            variant: variant.clone(),
            enabled,
            env,
            node,
            srv,
            agent: None,
            _proc: proc,
        };

        report.push_str(&format!("{variant} ({enabled:?}):\n"));
        let mut calls: BTreeMap<&str, BTreeSet<ApiCall>> = BTreeMap::new();
        for path in paths() {
            let before = run.srv.request_log().len();
            (path.run)(&mut run);
            let made: BTreeSet<ApiCall> = run.srv.request_log()[before..]
                .iter()
                .filter_map(|r| match ApiCall::of(&r.method, &r.path, &r.query) {
                    Ok(c) => Some(c),
                    Err(p) => {
                        problems.push(format!(
                            "{variant}: {}: a non-resource request {p}",
                            path.name
                        ));
                        None
                    }
                })
                .collect();
            report.push_str(&format!("  {}:\n", path.name));
            for c in &made {
                report.push_str(&format!("    {c}\n"));
                if !grants.allows(c) {
                    problems.push(format!("{variant}: {}: {c} is not allowed", path.name));
                }
            }
            if !(path.enabled)(&enabled) && !made.is_empty() {
                problems.push(format!(
                    "{variant}: {} is off in this variant but made {} call(s)",
                    path.name,
                    made.len()
                ));
            }
            calls.insert(path.name, made);
        }
        for unused in grants.unused(calls.values().flatten()) {
            problems.push(format!(
                "{variant}: {unused} is granted but no code path uses it"
            ));
        }
    }
    println!("{report}");
    assert!(problems.is_empty(), "{}\n\n{report}", problems.join("\n"));
}
