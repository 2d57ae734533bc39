//! The real `istio-cni` binary against the HTTPS API stub: the pod lookup policy as seen by a runtime (codes,
//! messages, request counts), non-injected pods passed through, and every kind of bad annotation refused before
//! anything is programmed (the pod netns stays empty).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshcni_tests::apiserver::{sample_pod, ApiServer, Fault};
use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use serde_json::{json, Value};

struct Fixture {
    srv: ApiServer,
    run_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "meshcni-api-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn fixture(tag: &str) -> Fixture {
    let srv = ApiServer::start().expect("start API stub");
    let run_dir = std::env::temp_dir().join(unique(tag));
    std::fs::create_dir_all(&run_dir).unwrap();
    srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
        .unwrap();
    Fixture { srv, run_dir }
}

/// A netns created for one test and deleted on drop; the plugin needs a real one for injected pods.
struct PodNetns(String);

impl PodNetns {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (netns)"
        );
        let name = unique(tag);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        PodNetns(name)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    /// Every rule in the netns, both flavours and both families.
    fn rules(&self) -> String {
        let mut all = String::new();
        for save in [
            "iptables-legacy-save",
            "iptables-nft-save",
            "ip6tables-legacy-save",
            "ip6tables-nft-save",
        ] {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.0, save])
                .output()
                .unwrap();
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        all
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn add(fx: &Fixture, ns: &str, pod: &str, netns: &str, extra: Value) -> PluginOutput {
    let mut conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": fx.run_dir, "plugin_log_level": "debug",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.9/16"}], "dns": {}}
    });
    if let (Some(o), Value::Object(e)) = (conf.as_object_mut(), extra) {
        o.extend(e);
    }
    Invocation::new(plugin_bin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"),
        )
        .stdin(serde_json::to_vec(&conf).unwrap())
        .run()
}

fn error_of(out: &PluginOutput) -> (u64, String) {
    assert!(!out.success, "expected failure: {out:?}");
    let v = out.json();
    let text = format!(
        "{} | {}",
        v["msg"].as_str().unwrap_or_default(),
        v["details"].as_str().unwrap_or_default()
    );
    (v["code"].as_u64().unwrap(), text)
}

fn plain_pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

#[test]
fn non_injected_pod_passes_through_after_one_lookup() {
    let fx = fixture("plain");
    fx.srv.add_pod(plain_pod("default", "plain")).unwrap();
    let out = add(
        &fx,
        "default",
        "plain",
        "/var/run/netns/never-opened",
        json!({}),
    );
    assert!(out.success, "{out:?}");
    assert_eq!(out.json()["ips"][0]["address"], "10.22.0.9/16");
    assert_eq!(fx.srv.pod_requests("default", "plain"), 1);
}

#[test]
fn excluded_namespace_makes_no_api_call() {
    let fx = fixture("excluded");
    let out = add(
        &fx,
        "kube-system",
        "coredns",
        "/var/run/netns/x",
        json!({"exclude_namespaces": ["kube-system"]}),
    );
    assert!(out.success, "{out:?}");
    assert_eq!(fx.srv.total_requests(), 0);
}

#[test]
fn unknown_pod_fails_at_once() {
    let fx = fixture("unknown");
    let (code, text) = error_of(&add(&fx, "default", "ghost", "/var/run/netns/x", json!({})));
    assert_eq!(code, 100, "{text}");
    assert!(
        text.contains("not found") && text.contains("default/ghost"),
        "{text}"
    );
    assert_eq!(fx.srv.pod_requests("default", "ghost"), 1);
}

#[test]
fn unauthorized_and_forbidden_fail_at_once_naming_the_cause() {
    let fx = fixture("auth");
    fx.srv.add_pod(plain_pod("default", "p")).unwrap();
    let mut spec = fx.srv.kubeconfig();
    spec.token = "wrong-token".into();
    spec.write(&fx.run_dir.join("istio-cni-kubeconfig"))
        .unwrap();
    let (code, text) = error_of(&add(&fx, "default", "p", "/var/run/netns/x", json!({})));
    assert_eq!(code, 100, "{text}");
    assert!(
        text.contains("401") && text.to_lowercase().contains("token"),
        "{text}"
    );

    let fx = fixture("forbidden");
    fx.srv.add_pod(plain_pod("default", "p")).unwrap();
    fx.srv.push_fault(Fault::Status(403));
    let (code, text) = error_of(&add(&fx, "default", "p", "/var/run/netns/x", json!({})));
    assert_eq!(code, 100, "{text}");
    assert!(text.contains("403") && text.contains("RBAC"), "{text}");
    assert_eq!(fx.srv.pod_requests("default", "p"), 1);
}

#[test]
fn server_errors_then_ok_is_retried_to_success() {
    let fx = fixture("retry");
    fx.srv.add_pod(plain_pod("default", "p")).unwrap();
    fx.srv.push_faults(2, Fault::Status(500));
    fx.srv.push_fault(Fault::Status(429));
    let out = add(&fx, "default", "p", "/var/run/netns/x", json!({}));
    assert!(out.success, "{out:?}");
    assert_eq!(fx.srv.pod_requests("default", "p"), 4);
}

#[test]
fn unreachable_api_is_try_again_later_after_the_deadline() {
    let fx = fixture("unreachable");
    // Nothing listens on port 1 of loopback: every connection is refused.
    let mut spec = fx.srv.kubeconfig();
    spec.server = "https://127.0.0.1:1".into();
    spec.write(&fx.run_dir.join("istio-cni-kubeconfig"))
        .unwrap();
    let (code, text) = error_of(&add(
        &fx,
        "default",
        "p",
        "/var/run/netns/x",
        json!({"pod_lookup_timeout_seconds": 1}),
    ));
    assert_eq!(code, 11, "{text}");
    assert!(text.to_lowercase().contains("connect"), "{text}");
    assert_eq!(fx.srv.total_requests(), 0);
}

fn injected_with(annotations: &[(&str, &str)]) -> Value {
    let mut pod = sample_pod("default", "web");
    for (k, v) in annotations {
        pod["metadata"]["annotations"][*k] = json!(v);
    }
    pod
}

#[test]
fn every_bad_annotation_is_refused_naming_it_and_nothing_is_installed() {
    let netns = PodNetns::new("badann");
    let cases: &[(&str, &str)] = &[
        ("sidecar.istio.io/interceptionMode", "NONE"),
        ("sidecar.istio.io/interceptionMode", "REDIRECT;rm -rf /"),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/33",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8\n-A OUTPUT -j ACCEPT",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/8 -j ACCEPT",
        ),
        ("traffic.sidecar.istio.io/includeInboundPorts", "80,http"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "70000"),
        (
            "traffic.sidecar.istio.io/includeOutboundPorts",
            "443 -j ACCEPT",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,-1"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0 -j DROP"),
        (
            "traffic.sidecar.istio.io/excludeInterfaces",
            "this-is-too-long-for-linux",
        ),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1;reboot"),
        ("istio.io/reroute-virtual-interfaces", "!eth0"),
    ];
    for (annotation, value) in cases {
        let fx = fixture("badann");
        fx.srv
            .add_pod(injected_with(&[(annotation, value)]))
            .unwrap();
        let (code, text) = error_of(&add(&fx, "default", "web", &netns.path(), json!({})));
        assert_eq!(code, 101, "{annotation}={value:?}: {text}");
        assert!(
            text.contains(annotation),
            "{annotation}: message must name the annotation: {text}"
        );
        let shown = serde_json::to_string(value).unwrap();
        let shown = shown.trim_matches('"');
        assert!(
            text.contains(value) || text.contains(shown),
            "{annotation}: message must show the value {value:?}: {text}"
        );
        let rules = netns.rules();
        assert!(
            !rules.contains("ISTIO"),
            "{annotation}={value:?} left rules behind:\n{rules}"
        );
    }
}

#[test]
fn host_network_namespace_is_refused() {
    let fx = fixture("hostns");
    fx.srv.add_pod(sample_pod("default", "web")).unwrap();
    let (code, text) = error_of(&add(&fx, "default", "web", "/proc/1/ns/net", json!({})));
    assert_eq!(code, 102, "{text}");
}

#[test]
fn vanished_netns_fails_with_its_path() {
    let fx = fixture("vanished");
    fx.srv.add_pod(sample_pod("default", "web")).unwrap();
    let (code, text) = error_of(&add(
        &fx,
        "default",
        "web",
        "/var/run/netns/meshcni-gone-for-good",
        json!({}),
    ));
    assert_eq!(code, 102, "{text}");
    assert!(
        text.contains("/var/run/netns/meshcni-gone-for-good"),
        "{text}"
    );
}
