//! Istio's install e2e cases (cni/test/install_k8s_test.go) against the real `node-agent`: files from
//! install-e2e/pre/ in the conf dir, the agent started, the result compared with install-e2e/expected/ (byte for byte,
//! as Istio's test does, and as JSON), our entry removed by hand and put back, then SIGTERM and the cleanup result.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

struct Case {
    chained: bool,
    /// CNI_CONF_NAME, when set.
    conf_name: Option<&'static str>,
    /// The file holding the result.
    result: &'static str,
    /// A file from pre/ written only after the agent started.
    delayed: Option<&'static str>,
    expected: &'static str,
    /// The result after cleanup (chained); `None`: the file is gone (standalone).
    post_clean: Option<&'static str>,
    /// Files of pre/, copied as `0<i>-<name>`.
    ordered: &'static [&'static str],
}

const CALICO_EXPECTED: &str = "install-e2e/expected/10-calico.conflist-istioconfig";
const CALICO_PRE: &str = "install-e2e/pre/calico.conflist";
const MINIKUBE_EXPECTED: &str = "install-e2e/expected/minikube_cni.conflist.expected";
const MINIKUBE_CLEAN: &str = "install-e2e/expected/minikube_cni.conflist.clean";

fn chained(
    conf_name: Option<&'static str>,
    result: &'static str,
    calico: bool,
    ordered: &'static [&'static str],
) -> Case {
    Case {
        chained: true,
        conf_name,
        result,
        delayed: None,
        expected: if calico {
            CALICO_EXPECTED
        } else {
            MINIKUBE_EXPECTED
        },
        post_clean: Some(if calico { CALICO_PRE } else { MINIKUBE_CLEAN }),
        ordered,
    }
}

fn run(case: Case) {
    let node = Node::new("istio-e2e");
    for (i, f) in case.ordered.iter().enumerate() {
        node.put(&format!("0{i}-{f}"), &format!("install-e2e/pre/{f}"));
    }
    let chained = if case.chained { "true" } else { "false" };
    let mut extra = vec![("CHAINED_CNI_PLUGIN", chained)];
    if let Some(name) = case.conf_name {
        extra.push(("CNI_CONF_NAME", name));
    }
    let mut agent = Agent::start(&node, &extra);
    let result = node.conf.join(case.result);
    if let Some(delayed) = case.delayed {
        agent.wait_serving();
        // It must wait for the configuration, not ready, and write nothing meanwhile.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            agent.ready(),
            Some(false),
            "ready without a primary configuration"
        );
        assert!(
            !result.exists(),
            "{} written before the primary configuration existed",
            result.display()
        );
        let dest = case.conf_name.unwrap_or(case.result);
        fs::copy(corpus(delayed), node.conf.join(dest)).unwrap();
    }
    agent.wait_ready();
    let expected = node.expected_bytes(case.expected);
    let expected_json: serde_json::Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(read_json(&result), expected_json, "{} as JSON", case.result);
    assert_eq!(
        fs::read_to_string(&result).unwrap(),
        expected,
        "{} byte for byte",
        case.result
    );
    assert_eq!(fs::read(node.plugin()).unwrap(), PLUGIN_BYTES);
    let kc = fs::read_to_string(node.kubeconfig()).unwrap();
    assert!(
        kc.contains("    server: https://10.110.0.1:443\n") && kc.contains(TOKEN),
        "{kc}"
    );

    // "Test script restart by removing configuration": the entry taken out (or the file removed) comes back.
    if case.chained {
        let mut v = read_json(&result);
        let plugins = v["plugins"].as_array_mut().unwrap();
        plugins.retain(|p| p["type"] != "istio-cni");
        fs::write(&result, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    } else {
        fs::remove_file(&result).unwrap();
    }
    wait_for(
        "the configuration restored",
        Duration::from_secs(5),
        Duration::from_millis(2),
        || (fs::read_to_string(&result).ok()? == expected).then_some(()),
    );

    let status = agent.stop(libc::SIGTERM);
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        agent.log_text()
    );
    match case.post_clean {
        Some(clean) => assert_eq!(
            read_json(&result),
            read_json(&corpus(clean)),
            "after cleanup"
        ),
        None => assert!(!result.exists(), "standalone file left after cleanup"),
    }
    assert!(!node.plugin().exists(), "binary left after cleanup");
    assert!(
        node.bin.join("bridge").exists(),
        "another plugin's binary was removed"
    );
    assert!(!node.kubeconfig().exists(), "kubeconfig left after cleanup");
    node.assert_no_temp_files();
}

#[test]
fn file_with_pre_plugins_conflist() {
    run(chained(
        Some("00-calico.conflist"),
        "00-calico.conflist",
        true,
        &["calico.conflist"],
    ));
}

#[test]
fn file_without_pre_plugins_conf() {
    run(chained(
        Some("00-minikube_cni.conf"),
        "00-minikube_cni.conflist",
        false,
        &["minikube_cni.conf"],
    ));
}

#[test]
fn first_file_with_pre_plugins_conflist() {
    run(chained(
        None,
        "00-calico.conflist",
        true,
        &["calico.conflist", "minikube_cni.conf"],
    ));
}

#[test]
fn first_file_without_pre_plugins_conf() {
    run(chained(
        None,
        "00-minikube_cni.conflist",
        false,
        &["minikube_cni.conf", "calico.conflist"],
    ));
}

#[test]
fn skip_non_json_for_first_valid_conf() {
    run(chained(
        None,
        "01-minikube_cni.conflist",
        false,
        &["non_json.conf", "minikube_cni.conf", "calico.conflist"],
    ));
}

#[test]
fn skip_non_json_for_first_valid_conflist() {
    run(chained(
        None,
        "01-calico.conflist",
        true,
        &["non_json.conf", "calico.conflist", "minikube_cni.conf"],
    ));
}

#[test]
fn skip_invalid_conf_for_first_valid_conf() {
    run(chained(
        None,
        "01-minikube_cni.conflist",
        false,
        &[
            "bad_minikube_cni.conf",
            "minikube_cni.conf",
            "calico.conflist",
        ],
    ));
}

#[test]
fn skip_invalid_conf_for_first_valid_conflist() {
    run(chained(
        None,
        "01-calico.conflist",
        true,
        &[
            "bad_minikube_cni.conf",
            "calico.conflist",
            "minikube_cni.conf",
        ],
    ));
}

#[test]
fn skip_invalid_conflists_for_first_valid_conf() {
    run(chained(
        None,
        "02-minikube_cni.conflist",
        false,
        &[
            "noname_calico.conflist",
            "noplugins_calico.conflist",
            "minikube_cni.conf",
            "calico.conflist",
        ],
    ));
}

#[test]
fn skip_invalid_conflists_for_first_valid_conflist() {
    run(chained(
        None,
        "02-calico.conflist",
        true,
        &[
            "noname_calico.conflist",
            "noplugins_calico.conflist",
            "calico.conflist",
            "minikube_cni.conf",
        ],
    ));
}

#[test]
fn conf_name_points_to_missing_conf_with_valid_conflist() {
    run(chained(
        Some("00-calico.conf"),
        "00-calico.conflist",
        true,
        &["calico.conflist"],
    ));
}

#[test]
fn conf_name_points_to_missing_conflist_with_valid_conf() {
    run(chained(
        Some("00-minikube_cni.conflist"),
        "00-minikube_cni.conflist",
        false,
        &["minikube_cni.conf"],
    ));
}

#[test]
fn conf_name_missing_initially_ignores_other_conf() {
    let mut case = chained(
        Some("missing_initially.conf"),
        "missing_initially.conflist",
        true,
        &[],
    );
    case.delayed = Some(CALICO_PRE);
    run(case);
}

#[test]
fn no_conf_name_and_no_valid_conf_initially() {
    let mut case = chained(None, "calico.conflist", true, &[]);
    case.delayed = Some(CALICO_PRE);
    run(case);
}

#[test]
fn standalone_default_name() {
    run(Case {
        chained: false,
        conf_name: None,
        result: "YYY-istio-cni.conf",
        delayed: None,
        expected: "install-e2e/expected/YYY-istio-cni.conf",
        post_clean: None,
        ordered: &[],
    });
}

#[test]
fn standalone_user_defined_name() {
    run(Case {
        chained: false,
        conf_name: Some("user-defined.conf"),
        result: "user-defined.conf",
        delayed: None,
        expected: "install-e2e/expected/YYY-istio-cni.conf",
        post_clean: None,
        ordered: &[],
    });
}
