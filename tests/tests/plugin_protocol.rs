//! The real `istio-cni` binary against the CNI protocol and bad input, for cases that need no API server and no
//! netns: each ends in the spec's answer or a CNI error object on stdout with a non-zero exit.

use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use serde_json::{json, Value};

const VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

fn base(cmd: &str) -> Invocation {
    Invocation::new(plugin_bin())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", "0123456789abcdef")
        .env("CNI_NETNS", "/var/run/netns/does-not-exist-meshcni")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
}

fn conf(version: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"cniVersion": version, "name": "k8s-pod-network", "type": "istio-cni",
                       "cni_agent_run_dir": "/nonexistent/meshcni-run"});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    serde_json::to_vec(&v).unwrap()
}

fn expect_error(out: &PluginOutput, code: u64) -> Value {
    assert!(
        !out.success,
        "expected failure, got success: {}",
        out.stdout
    );
    let v = out.json();
    assert_eq!(
        v["code"].as_u64(),
        Some(code),
        "wrong code: {v}\nstderr: {}",
        out.stderr
    );
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v.get("details").is_some(), "{v}");
    v
}

#[test]
fn version_lists_all_supported_versions() {
    let out = Invocation::new(plugin_bin())
        .env("CNI_COMMAND", "VERSION")
        .run();
    assert!(out.success, "{out:?}");
    let v = out.json();
    assert_eq!(v["supportedVersions"], json!(VERSIONS));
}

#[test]
fn add_without_pod_args_passes_prev_result_through_in_every_version() {
    let prev_v1 = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}
    });
    for v in VERSIONS {
        // prevResult is sent in the config's version, as a runtime does.
        let prev = if v.starts_with("0.1") || v.starts_with("0.2") {
            json!({"cniVersion": v, "ip4": {"ip": "10.22.0.5/16", "gateway": "10.22.0.1", "routes": [{"dst": "0.0.0.0/0"}]}, "dns": {}})
        } else if v.starts_with('0') {
            let mut p = prev_v1.clone();
            p["cniVersion"] = json!(v);
            p["ips"][0]["version"] = json!("4");
            p
        } else {
            let mut p = prev_v1.clone();
            p["cniVersion"] = json!(v);
            p
        };
        let out = base("ADD")
            .stdin(conf(v, json!({"prevResult": prev})))
            .run();
        assert!(out.success, "{v}: {out:?}");
        assert_eq!(out.json(), prev, "{v}: prevResult must come back unchanged");
    }
}

#[test]
fn add_without_prev_result_prints_an_empty_result() {
    for v in VERSIONS {
        let out = base("ADD").stdin(conf(v, json!({}))).run();
        assert!(out.success, "{v}: {out:?}");
        assert_eq!(out.json(), json!({"cniVersion": v, "dns": {}}));
    }
}

#[test]
fn excluded_namespace_and_agent_pod_pass_before_the_kubeconfig_is_read() {
    // cni_agent_run_dir does not exist: any attempt to read the kubeconfig would fail the ADD.
    let out = base("ADD")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1",
        )
        .stdin(conf(
            "1.0.0",
            json!({"exclude_namespaces": ["istio-system", "kube-system"]}),
        ))
        .run();
    assert!(out.success, "{out:?}");
    let out = base("ADD")
        .env(
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=istio-cni-node-7xk2p",
        )
        .stdin(conf("1.0.0", json!({"pod_namespace": "istio-system"})))
        .run();
    assert!(out.success, "{out:?}");
}

#[test]
fn missing_kubeconfig_fails_closed_with_the_path() {
    let out = base("ADD")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
        .stdin(conf("1.0.0", json!({})))
        .run();
    let v = expect_error(&out, 100);
    let text = format!("{} {}", v["msg"], v["details"]);
    assert!(
        text.contains("/nonexistent/meshcni-run/istio-cni-kubeconfig"),
        "{v}"
    );
}

#[test]
fn del_check_status_gc_succeed_without_output() {
    for (cmd, v) in [
        ("DEL", "1.0.0"),
        ("DEL", "0.3.1"),
        ("CHECK", "1.0.0"),
        ("STATUS", "1.1.0"),
        ("GC", "1.1.0"),
    ] {
        let out = base(cmd).stdin(conf(v, json!({}))).run();
        assert!(out.success, "{cmd} {v}: {out:?}");
        assert!(
            out.stdout.trim().is_empty(),
            "{cmd}: stdout must be empty: {:?}",
            out.stdout
        );
    }
}

#[test]
fn del_with_empty_netns_succeeds_twice() {
    for _ in 0..2 {
        let out = base("DEL")
            .env("CNI_NETNS", "")
            .stdin(conf("1.0.0", json!({})))
            .run();
        assert!(out.success, "{out:?}");
    }
}

#[test]
fn bad_environment_is_code_4() {
    expect_error(
        &Invocation::new(plugin_bin())
            .stdin(conf("1.0.0", json!({})))
            .run(),
        4,
    );
    expect_error(&base("SPAWN").stdin(conf("1.0.0", json!({}))).run(), 4);
    let v = expect_error(
        &base("ADD")
            .env("CNI_NETNS", "")
            .stdin(conf("1.0.0", json!({})))
            .run(),
        4,
    );
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"), "{v}");
    expect_error(
        &base("ADD")
            .env("CNI_CONTAINERID", "../etc")
            .stdin(conf("1.0.0", json!({})))
            .run(),
        4,
    );
    expect_error(
        &base("ADD")
            .env("CNI_ARGS", "K8S_POD_NAME")
            .stdin(conf("1.0.0", json!({})))
            .run(),
        4,
    );
}

#[test]
fn bad_stdin_is_code_6() {
    for input in [
        &b""[..],
        b"\n",
        b"{\"cniVersion\":",
        b"null",
        b"\xff\xfe",
        b"[]",
    ] {
        expect_error(&base("ADD").stdin(input.to_vec()).run(), 6);
    }
    let mut huge = br#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 3 << 20));
    huge.extend(br#""}"#);
    let v = expect_error(&base("ADD").stdin(huge).run(), 6);
    assert!(v["msg"].as_str().unwrap().contains("exceeds"), "{v}");
    // A malformed prevResult fails the ADD even when the pod would be passed through.
    expect_error(
        &base("ADD")
            .stdin(conf(
                "1.0.0",
                json!({"prevResult": {"ips": [{"address": "garbage"}]}}),
            ))
            .run(),
        6,
    );
}

#[test]
fn unsupported_version_is_code_1() {
    for v in ["0.5.0", "2.0.0", "1.0"] {
        let e = expect_error(&base("ADD").stdin(conf(v, json!({}))).run(), 1);
        assert!(e["details"].as_str().unwrap().contains(v), "{e}");
    }
}

#[test]
fn invalid_plugin_config_is_code_7() {
    let v = expect_error(
        &base("ADD")
            .stdin(conf("1.0.0", json!({"plugin_log_level": "chatty"})))
            .run(),
        7,
    );
    assert!(v["msg"].as_str().unwrap().contains("chatty"), "{v}");
    expect_error(
        &base("ADD")
            .stdin(br#"{"cniVersion":"1.0.0","type":"istio-cni"}"#.to_vec())
            .run(),
        7,
    );
}

#[test]
fn logs_go_to_stderr_as_json_never_to_stdout() {
    let out = base("ADD")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=x")
        .stdin(conf(
            "1.0.0",
            json!({"plugin_log_level": "debug", "exclude_namespaces": ["kube-system"]}),
        ))
        .run();
    assert!(out.success, "{out:?}");
    out.json();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        !lines.is_empty(),
        "debug logging produced nothing on stderr"
    );
    for l in lines {
        let v: Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }
}
