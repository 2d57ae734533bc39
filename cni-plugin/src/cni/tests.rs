use std::collections::HashMap;

use serde_json::json;

use super::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc123"),
    ("CNI_NETNS", "/var/run/netns/x"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u",
    ),
];

fn conf(version: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"cniVersion": version, "name": "k8s-pod-network", "type": "istio-cni"}),
    )
    .unwrap()
}

#[test]
fn add_request_parses_with_extra_args() {
    let req = Request::parse(&env(ADD_ENV), &conf("1.0.0")).unwrap();
    assert_eq!(req.command, Command::Add);
    assert_eq!(req.args.pod(), Some(("default", "web-0")));
    assert_eq!(req.conf.unwrap().cni_version, CniVersion::V1_0_0);
}

#[test]
fn every_supported_version_parses() {
    for v in SUPPORTED_VERSIONS {
        let req = Request::parse(&env(ADD_ENV), &conf(v)).unwrap();
        assert_eq!(req.conf.unwrap().cni_version.as_str(), v);
    }
}

#[test]
fn unsupported_version_is_code_1() {
    for v in ["0.5.0", "2.0.0", "1.0", "latest"] {
        let e = Request::parse(&env(ADD_ENV), &conf(v)).unwrap_err();
        assert_eq!(e.code, codes::INCOMPATIBLE_VERSION, "{v}");
        assert!(e.details.contains(v), "{e:?}");
    }
}

#[test]
fn missing_command_and_unknown_command_are_code_4() {
    let e = Request::parse(&env(&[]), b"{}").unwrap_err();
    assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
    assert!(e.msg.contains("CNI_COMMAND"));
    let e = Request::parse(&env(&[("CNI_COMMAND", "FROB")]), b"{}").unwrap_err();
    assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
    assert!(e.msg.contains("FROB"));
}

#[test]
fn add_without_netns_is_code_4_but_del_is_fine() {
    let mut vars: Vec<(&str, &str)> = ADD_ENV
        .iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .copied()
        .collect();
    let e = Request::parse(&env(&vars), &conf("1.0.0")).unwrap_err();
    assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
    assert!(e.msg.contains("CNI_NETNS"), "{e:?}");
    vars[0] = ("CNI_COMMAND", "DEL");
    let req = Request::parse(&env(&vars), &conf("1.0.0")).unwrap();
    assert_eq!(req.netns, None);
}

#[test]
fn bad_container_id_and_ifname_are_rejected() {
    let mut vars = ADD_ENV.to_vec();
    vars[1] = ("CNI_CONTAINERID", "-rf /");
    assert_eq!(
        Request::parse(&env(&vars), &conf("1.0.0"))
            .unwrap_err()
            .code,
        codes::INVALID_ENVIRONMENT
    );
    let mut vars = ADD_ENV.to_vec();
    vars[3] = ("CNI_IFNAME", "this-name-is-too-long");
    assert_eq!(
        Request::parse(&env(&vars), &conf("1.0.0"))
            .unwrap_err()
            .code,
        codes::INVALID_ENVIRONMENT
    );
}

#[test]
fn malformed_cni_args_are_rejected() {
    let mut vars = ADD_ENV.to_vec();
    vars[5] = ("CNI_ARGS", "K8S_POD_NAME");
    let e = Request::parse(&env(&vars), &conf("1.0.0")).unwrap_err();
    assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
    assert!(e.msg.contains("K8S_POD_NAME"));
}

#[test]
fn bad_stdin_is_code_6_or_7() {
    for (input, code) in [
        (&b""[..], codes::DECODING_FAILURE),
        (b"   \n", codes::DECODING_FAILURE),
        (b"{not json", codes::DECODING_FAILURE),
        (b"[1,2]", codes::DECODING_FAILURE),
        (
            br#"{"cniVersion": 1, "name": "x"}"#,
            codes::DECODING_FAILURE,
        ),
        (br#"{"cniVersion": "1.0.0"}"#, codes::INVALID_NETWORK_CONFIG),
        (
            br#"{"cniVersion": "1.0.0", "name": "bad name"}"#,
            codes::INVALID_NETWORK_CONFIG,
        ),
        (
            br#"{"cniVersion": "1.0.0", "name": "n", "prevResult": 3}"#,
            codes::DECODING_FAILURE,
        ),
    ] {
        let e = Request::parse(&env(ADD_ENV), input).unwrap_err();
        assert_eq!(
            e.code,
            code,
            "{:?} -> {e:?}",
            String::from_utf8_lossy(input)
        );
    }
    let huge = vec![b' '; MAX_STDIN + 1];
    assert_eq!(
        Request::parse(&env(ADD_ENV), &huge).unwrap_err().code,
        codes::DECODING_FAILURE
    );
}

#[test]
fn missing_cni_version_means_0_1_0() {
    let req = Request::parse(&env(ADD_ENV), br#"{"name":"n","type":"istio-cni"}"#).unwrap();
    assert_eq!(req.conf.unwrap().cni_version, CniVersion::V0_1_0);
}

#[test]
fn check_needs_0_4_0_and_status_gc_need_1_1_0() {
    let mut vars = ADD_ENV.to_vec();
    vars[0] = ("CNI_COMMAND", "CHECK");
    assert_eq!(
        Request::parse(&env(&vars), &conf("0.3.1"))
            .unwrap_err()
            .code,
        codes::INCOMPATIBLE_VERSION
    );
    assert!(Request::parse(&env(&vars), &conf("0.4.0")).is_ok());
    for cmd in ["STATUS", "GC"] {
        let vars = [("CNI_COMMAND", cmd), ("CNI_PATH", "/opt/cni/bin")];
        assert_eq!(
            Request::parse(&env(&vars), &conf("1.0.0"))
                .unwrap_err()
                .code,
            codes::INCOMPATIBLE_VERSION
        );
        assert!(Request::parse(&env(&vars), &conf("1.1.0")).is_ok());
    }
}

#[test]
fn version_needs_no_stdin() {
    let req = Request::parse(&env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
    assert_eq!(req.conf, None);
    let v = supported_versions_json();
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 7);
}

fn v1_result() -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
        "ips": [
            {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0},
            {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 0},
            {"address": "10.2.0.5/16"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"]},
        "x-extra": {"kept": true}
    })
}

#[test]
fn same_format_passes_through_unchanged() {
    let prev = v1_result();
    assert_eq!(convert_result(&prev, CniVersion::V1_0_0).unwrap(), prev);
    let mut expect = prev.clone();
    expect["cniVersion"] = json!("1.1.0");
    assert_eq!(convert_result(&prev, CniVersion::V1_1_0).unwrap(), expect);
}

#[test]
fn v1_to_v03_adds_version_and_back() {
    let out = convert_result(&v1_result(), CniVersion::V0_3_1).unwrap();
    let versions: Vec<&str> = out["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["4", "6", "4"]);
    assert_eq!(out["cniVersion"], "0.3.1");
    assert_eq!(out["x-extra"], json!({"kept": true}));
    let back = convert_result(&out, CniVersion::V1_0_0).unwrap();
    assert_eq!(back, v1_result());
}

#[test]
fn v1_to_legacy_keeps_first_address_per_family() {
    let out = convert_result(&v1_result(), CniVersion::V0_2_0).unwrap();
    assert_eq!(
        out["ip4"],
        json!({"ip": "10.1.0.5/16", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]})
    );
    assert_eq!(
        out["ip6"],
        json!({"ip": "fd00::5/64", "gateway": "fd00::1", "routes": [{"dst": "::/0"}]})
    );
    assert!(out.get("ips").is_none() && out.get("interfaces").is_none());
    assert_eq!(out["dns"], json!({"nameservers": ["10.96.0.10"]}));
}

#[test]
fn legacy_to_v03() {
    let prev = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0"}]}, "dns": {}});
    let out = convert_result(&prev, CniVersion::V0_4_0).unwrap();
    assert_eq!(
        out,
        json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1"}], "routes": [{"dst": "0.0.0.0/0"}], "dns": {}})
    );
}

#[test]
fn malformed_results_are_decoding_failures() {
    for bad in [
        json!({"ips": [{"address": "not-an-ip"}]}),
        json!({"ips": [{"address": "10.0.0.1/8", "version": "6"}]}),
        json!({"ips": "x"}),
        json!({"ip4": {"ip": "fd00::1/64"}}),
        json!({"ip4": {"ip": "10.0.0.1/8"}, "ips": []}),
        json!([1]),
    ] {
        let e = convert_result(&bad, CniVersion::V1_0_0).unwrap_err();
        assert_eq!(e.code, codes::DECODING_FAILURE, "{bad}");
    }
}

/// Found by the prev_result fuzz target: a 0.2.0 result with a top-level `routes` kept it as an unknown field, so
/// converting it to 1.0.0 either dropped it (when ip4.routes had routes) or printed it as `routes` whatever it
/// was, e.g. an object: a result that no longer parses.
#[test]
fn a_legacy_result_with_top_level_routes_is_mixed() {
    for routes in [json!({"dst": "0.0.0.0/0"}), json!([{"dst": "10.0.0.0/8"}])] {
        let prev = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "routes": [{"dst": "0.0.0.0/0"}]}, "routes": routes});
        for to in CniVersion::ALL {
            let e = convert_result(&prev, to).unwrap_err();
            assert_eq!(e.code, codes::DECODING_FAILURE, "{prev} -> {to}");
            assert!(e.msg.contains("mixes"), "{e:?}");
        }
    }
}

/// Found by the cni_request fuzz target: without serde_json's exact float parsing, a number written with many
/// digits (9999099999999999999 and 91 zeros) was read as one float and the plugin's own output of it read back as
/// another: what the plugin prints of a configuration or prevResult must be what it received.
#[test]
fn floats_pass_through_exactly() {
    let digits = format!("9999099999999999999{}", "0".repeat(91));
    let conf =
        format!(r#"{{"cniVersion":"1.0.0","name":"n","prevResult":{{"x":[{digits}],"y":0.3}}}}"#);
    let conf = NetConf::parse(conf.as_bytes()).unwrap();
    let out = convert_result(conf.prev_result.as_ref().unwrap(), CniVersion::V1_0_0).unwrap();
    let printed = serde_json::to_vec(&out).unwrap();
    let again: serde_json::Value = serde_json::from_slice(&printed).unwrap();
    assert_eq!(again, out, "{}", String::from_utf8_lossy(&printed));
    assert_eq!(out["x"][0].as_f64(), Some(9.9991e109));
    assert_eq!(serde_json::to_string(&out["y"]).unwrap(), "0.3");
}

#[test]
fn empty_result_has_version_and_dns() {
    assert_eq!(
        empty_result(CniVersion::V0_3_1),
        json!({"cniVersion": "0.3.1", "dns": {}})
    );
}

#[test]
fn error_object_shape() {
    let e = CniError::new(7, "bad", "why");
    assert_eq!(
        e.to_json("1.0.0"),
        json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "why"})
    );
}
