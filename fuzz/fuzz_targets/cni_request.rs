//! The CNI request: environment + stdin into `cni::Request` (`Request::parse`, what `Request::from_process` runs).
//!
//! Input: `KEY=VALUE` environment lines, a NUL byte, then stdin (the network configuration).
//!
//! Invariants: an accepted request is what the environment said (command, container id, interface, CNI_ARGS that
//! render back to themselves) and its configuration parses the same again from its own serialisation
//! (parse -> serialize -> parse); a refusal has one of the codes of a request error (1, 4, 6, 7) and names the value
//! that is wrong.
#![no_main]

use cni_plugin::cni::{
    codes, valid_ifname, CniArgs, Command, NetConf, Request, SUPPORTED_VERSIONS,
};
use libfuzzer_sys::fuzz_target;
use meshcni_fuzz::text::{env_lines, nul_fields};

fuzz_target!(|data: &[u8]| {
    let fields = nul_fields(data, 2);
    let env = env_lines(&String::from_utf8_lossy(fields[0]));
    let stdin = fields[1];
    let get = |k: &str| env.get(k).cloned();
    let var = |k: &str| env.get(k).cloned().unwrap_or_default();
    match Request::parse(&get, stdin) {
        Ok(req) => {
            assert_eq!(req.command.as_str(), var("CNI_COMMAND"));
            let args = CniArgs::parse(&var("CNI_ARGS")).expect("accepted CNI_ARGS parse again");
            assert_eq!(req.args, args);
            let rendered: Vec<String> = [
                ("K8S_POD_NAME", &args.k8s_pod_name),
                ("K8S_POD_NAMESPACE", &args.k8s_pod_namespace),
                (
                    "K8S_POD_INFRA_CONTAINER_ID",
                    &args.k8s_pod_infra_container_id,
                ),
                ("K8S_POD_UID", &args.k8s_pod_uid),
            ]
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
            assert_eq!(
                CniArgs::parse(&rendered.join(";")).expect("rendered CNI_ARGS"),
                args
            );
            if matches!(req.command, Command::Add | Command::Check | Command::Del) {
                let id = &req.container_id;
                assert!(
                    id.starts_with(|c: char| c.is_ascii_alphanumeric()),
                    "container id {id:?}"
                );
                assert!(
                    id.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
                    "container id {id:?}"
                );
                assert!(valid_ifname(&req.ifname), "ifname {:?}", req.ifname);
            }
            if matches!(req.command, Command::Add | Command::Check) {
                assert!(req.netns.is_some(), "ADD/CHECK without a netns");
            }
            match (&req.conf, req.command) {
                (None, Command::Version) => {}
                (None, other) => panic!("{other:?} accepted without a configuration"),
                (Some(conf), _) => {
                    assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
                    assert_eq!(
                        conf.raw.get("name").and_then(|v| v.as_str()),
                        Some(conf.name.as_str())
                    );
                    let again = serde_json::to_vec(&conf.raw).expect("serialise the configuration");
                    let reparsed = NetConf::parse(&again)
                        .expect("a configuration parses again from its own bytes");
                    assert_eq!(&reparsed, conf, "parse -> serialize -> parse");
                }
            }
        }
        Err(e) => {
            assert!(
                [
                    codes::INCOMPATIBLE_VERSION,
                    codes::INVALID_ENVIRONMENT,
                    codes::DECODING_FAILURE,
                    codes::INVALID_NETWORK_CONFIG
                ]
                .contains(&e.code),
                "unexpected code {} for a request error: {e:?}",
                e.code
            );
            assert!(!e.msg.is_empty(), "an error without a message: {e:?}");
            let json = e.to_json("1.0.0");
            let keys: Vec<&str> = json
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys.len(), 4, "{json}");
            let command = var("CNI_COMMAND");
            if e.msg.starts_with("unknown CNI_COMMAND") {
                assert!(
                    e.msg.contains(&format!("{command:?}")),
                    "{e:?} does not name {command:?}"
                );
            }
            for (prefix, key) in [
                ("invalid CNI_CONTAINERID", "CNI_CONTAINERID"),
                ("invalid CNI_IFNAME", "CNI_IFNAME"),
            ] {
                if e.msg.starts_with(prefix) {
                    let value = var(key);
                    assert!(
                        e.msg.contains(&format!("{value:?}")),
                        "{e:?} does not name {value:?}"
                    );
                }
            }
            if e.msg.starts_with("CNI_ARGS has an invalid pair") {
                assert!(
                    var("CNI_ARGS")
                        .split(';')
                        .any(|p| !p.contains('=') && e.msg.contains(&format!("{p:?}"))),
                    "{e:?}"
                );
            }
            if e.code == codes::INCOMPATIBLE_VERSION && e.msg == "incompatible CNI versions" {
                let v: serde_json::Value =
                    serde_json::from_slice(stdin).expect("a version error comes from JSON");
                let asked = v["cniVersion"].as_str().expect("a string cniVersion");
                assert!(
                    e.details.contains(&format!("{asked:?}")),
                    "{e:?} does not name {asked:?}"
                );
            }
        }
    }
});
