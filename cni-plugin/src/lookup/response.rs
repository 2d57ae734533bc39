//! What the API server's answer means: a 2xx body becomes the [`PodInfo`] the decision needs (after checking it
//! is the pod asked for: its namespace and name, and its UID when the runtime gave `K8S_POD_UID`), any other status
//! an error kind with the server's message. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::{LookupErrorKind, PodRef};
use crate::pod::{PodInfo, ISTIO_PROXY};

/// What one attempt's HTTP answer means; `status` and `body` as received, `uid` the pod's UID as the runtime
/// knows it (`K8S_POD_UID`), when it passed one.
pub fn interpret(
    status: u16,
    body: &[u8],
    pod: &PodRef,
    uid: Option<&str>,
) -> Result<PodInfo, LookupErrorKind> {
    if (200..300).contains(&status) {
        let obj: PodDoc =
            serde_json::from_slice(body).map_err(|e| LookupErrorKind::BadResponse {
                detail: format!("HTTP {status} with a body that is not a Pod: {e}"),
            })?;
        let got_ns = obj.metadata.namespace.as_deref().unwrap_or("");
        let got_name = obj.metadata.name.as_deref().unwrap_or("");
        if got_ns != pod.namespace || got_name != pod.name {
            return Err(LookupErrorKind::BadResponse {
                detail: format!("HTTP {status} with pod {got_ns:?}/{got_name:?} instead"),
            });
        }
        // A pod deleted and recreated under the same name (a StatefulSet's) is another pod: this sandbox is the old
        // one's, and the new pod's spec must not decide for it.
        if let Some(expected) = uid {
            let got = obj.metadata.uid.as_deref().unwrap_or("");
            if got != expected {
                return Err(LookupErrorKind::UidMismatch {
                    expected: expected.to_string(),
                    got: got.to_string(),
                });
            }
        }
        return Ok(obj.into_info());
    }
    let message = status_message(body);
    Err(match status {
        404 => LookupErrorKind::NotFound,
        401 | 403 => LookupErrorKind::Denied { status, message },
        _ => LookupErrorKind::Http { status, message },
    })
}

/// The message of a Kubernetes `Status` body, or the (bounded) raw body.
fn status_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct StatusBody {
        #[serde(default)]
        message: String,
        #[serde(default)]
        reason: String,
    }
    if let Ok(s) = serde_json::from_slice::<StatusBody>(body) {
        if !s.message.is_empty() || !s.reason.is_empty() {
            return match (s.reason.is_empty(), s.message.is_empty()) {
                (false, false) => format!("{}: {}", s.reason, s.message),
                (true, _) => s.message,
                (_, true) => s.reason,
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    const MAX: usize = 512;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// The part of a Pod object that [`PodInfo`] is made of, decoded straight from the API server's answer: the
/// rest of the object is skipped, not built (the plugin decodes one Pod per process, and k8s-openapi's full
/// `Pod` is most of that decode's cost). Field names, required fields and types are k8s-openapi's for the same
/// fields, so an answer decodes here exactly when the same fields decode there; `into_info` gives what
/// `PodInfo::from(&Pod)` gives (a test compares the two).
#[derive(serde::Deserialize)]
struct PodDoc {
    #[serde(default)]
    metadata: MetaDoc,
    #[serde(default)]
    spec: Option<SpecDoc>,
}

#[derive(serde::Deserialize, Default)]
struct MetaDoc {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct SpecDoc {
    #[serde(default)]
    containers: Vec<ContainerDoc>,
    #[serde(default, rename = "initContainers")]
    init_containers: Option<Vec<ContainerDoc>>,
}

#[derive(serde::Deserialize)]
struct ContainerDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<EnvDoc>>,
    #[serde(default, rename = "securityContext")]
    security_context: Option<SecurityContextDoc>,
}

#[derive(serde::Deserialize)]
struct EnvDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(serde::Deserialize)]
struct SecurityContextDoc {
    #[serde(default, rename = "runAsUser")]
    run_as_user: Option<i64>,
    #[serde(default, rename = "runAsGroup")]
    run_as_group: Option<i64>,
}

impl PodDoc {
    fn into_info(self) -> PodInfo {
        let mut pi = PodInfo {
            labels: self.metadata.labels.unwrap_or_default(),
            annotations: self.metadata.annotations.unwrap_or_default(),
            ..Default::default()
        };
        let Some(spec) = self.spec else {
            return pi;
        };
        let init = spec.init_containers.into_iter().flatten();
        for c in init.chain(spec.containers) {
            let is_proxy = c.name == ISTIO_PROXY;
            pi.containers.insert(c.name);
            if !is_proxy {
                continue;
            }
            for e in c.env.into_iter().flatten() {
                pi.proxy_env.insert(e.name, e.value.unwrap_or_default());
            }
            if let Some(args) = c.args {
                if args.len() >= 2 && args[0] == "proxy" {
                    pi.proxy_type = Some(args[1].clone());
                }
            }
            if let Some(sc) = c.security_context {
                pi.proxy_uid = sc.run_as_user;
                pi.proxy_gid = sc.run_as_group;
            }
        }
        pi
    }
}

impl From<&Pod> for PodInfo {
    /// What matters of a Pod object, as Istio's `ExtractPodInfo`.
    fn from(pod: &Pod) -> Self {
        let mut pi = PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
            ..Default::default()
        };
        let Some(spec) = pod.spec.as_ref() else {
            return pi;
        };
        let init = spec.init_containers.iter().flatten();
        for c in init.chain(spec.containers.iter()) {
            add_container(&mut pi, c);
        }
        pi
    }
}

fn add_container(pi: &mut PodInfo, c: &Container) {
    pi.containers.insert(c.name.clone());
    if c.name != ISTIO_PROXY {
        return;
    }
    for e in c.env.iter().flatten() {
        pi.proxy_env
            .insert(e.name.clone(), e.value.clone().unwrap_or_default());
    }
    if let Some(args) = c.args.as_ref() {
        if args.len() >= 2 && args[0] == "proxy" {
            pi.proxy_type = Some(args[1].clone());
        }
    }
    if let Some(sc) = c.security_context.as_ref() {
        pi.proxy_uid = sc.run_as_user;
        pi.proxy_gid = sc.run_as_group;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::lookup::error::tests::{in_context, KC};
    use crate::lookup::LookupError;

    fn interp(status: u16, body: &str) -> Result<PodInfo, Box<LookupError>> {
        interp_uid(status, body, None)
    }

    fn interp_uid(status: u16, body: &str, uid: Option<&str>) -> Result<PodInfo, Box<LookupError>> {
        interpret(
            status,
            body.as_bytes(),
            &PodRef::new("default", "web-1"),
            uid,
        )
        .map_err(|kind| Box::new(in_context(Path::new(KC), kind)))
    }

    #[test]
    fn ok_pod_is_decoded_and_must_match() {
        let body = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"default",
            "labels":{"app":"web"}},"spec":{"containers":[{"name":"app"},{"name":"istio-proxy"}]}}"#;
        let pod = interp(200, body).expect("pod");
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert!(pod.containers.contains("app") && pod.containers.contains(ISTIO_PROXY));

        let other =
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-2","namespace":"default"}}"#;
        let e = interp(200, other).expect_err("wrong pod");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("\"default\"/\"web-2\""), "{e}");

        let e = interp(200, "<html>").expect_err("not json");
        assert!(
            matches!(e.kind, LookupErrorKind::BadResponse { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("HTTP 200"), "{e}");
    }

    /// The lean decode gives what k8s-openapi's `Pod` and `PodInfo::from` give, for pods with every field it
    /// reads (and many it skips), and refuses what k8s-openapi refuses in those fields.
    #[test]
    fn the_lean_decode_is_k8s_openapis() {
        let full = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "default", "uid": "u1",
                "labels": {"app": "web", "sidecar.istio.io/inject": "true"},
                "annotations": {"sidecar.istio.io/status": "{\"a\":1}", "k": ""},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r", "uid": "x"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:x": {}}}]},
            "spec": {
                "nodeName": "n1", "volumes": [{"name": "v", "emptyDir": {}}],
                "initContainers": [
                    {"name": "istio-validation", "image": "proxyv2", "args": ["istio-iptables", "--run-validation"]},
                    {"name": "istio-proxy", "restartPolicy": "Always", "args": ["proxy", "sidecar", "--x"],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                             {"name": "A", "value": "2"}],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1338, "privileged": false}}],
                "containers": [{"name": "app", "ports": [{"containerPort": 8080}],
                                "securityContext": {"runAsUser": 1000}}]},
            "status": {"phase": "Pending", "podIP": "10.0.0.1"}
        });
        let variants = [
            full.clone(),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default"}}),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default"}, "spec": {}}),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default"},
                               "spec": {"containers": [{"image": "x"},
                                        {"name": "istio-proxy", "env": [{"value": "v"}]}]}}),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default", "labels": null},
                               "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy"]}]}}),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default"},
                               "spec": {"containers": [{"name": "istio-proxy", "args": ["router", "sidecar"],
                                        "env": null, "securityContext": {}}]}}),
        ];
        for v in variants {
            let body = serde_json::to_vec(&v).expect("json");
            let typed: Pod = serde_json::from_slice(&body).expect("k8s-openapi decodes it");
            let lean = interpret(200, &body, &PodRef::new("default", "web-1"), None)
                .expect("lean decodes it");
            assert_eq!(lean, PodInfo::from(&typed), "{v}");
        }
        let info = interpret(
            200,
            &serde_json::to_vec(&full).expect("json"),
            &PodRef::new("default", "web-1"),
            None,
        )
        .expect("full");
        assert_eq!(info.proxy_type.as_deref(), Some("sidecar"));
        assert_eq!((info.proxy_uid, info.proxy_gid), (Some(1337), Some(1338)));
        assert_eq!(info.proxy_env.get("A").map(String::as_str), Some("2"));
        assert_eq!(info.proxy_env.get("B").map(String::as_str), Some(""));
        assert_eq!(info.containers.len(), 3);
        // Shapes k8s-openapi refuses in the fields read: refused here too.
        for bad in [
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default", "labels": {"a": 1}}}),
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default"},
                               "spec": {"containers": [{"name": "istio-proxy",
                                        "securityContext": {"runAsUser": "1337"}}]}}),
            serde_json::json!([]),
        ] {
            let body = serde_json::to_vec(&bad).expect("json");
            assert!(
                serde_json::from_slice::<Pod>(&body).is_err(),
                "k8s-openapi accepts {bad}"
            );
            let e =
                interpret(200, &body, &PodRef::new("default", "web-1"), None).expect_err("refused");
            assert!(
                matches!(e, LookupErrorKind::BadResponse { .. }),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn the_uid_must_be_the_runtimes_when_it_gave_one() {
        let body = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"default",
            "uid":"uid-new"},"spec":{"containers":[{"name":"istio-proxy"}]}}"#;
        assert!(interp_uid(200, body, Some("uid-new")).is_ok());
        assert!(
            interp_uid(200, body, None).is_ok(),
            "no K8S_POD_UID: no check"
        );
        let e = interp_uid(200, body, Some("uid-old")).expect_err("recreated pod");
        assert!(
            matches!(e.kind, LookupErrorKind::UidMismatch { .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let s = e.to_string();
        assert!(
            s.contains("uid-old") && s.contains("uid-new") && s.contains("default/web-1"),
            "{s}"
        );
        assert!(s.contains("https://10.96.0.1:443/"), "{s}");
        // A pod without a UID is not the one the runtime named either.
        let no_uid = body.replace(r#""uid":"uid-new""#, r#""generateName":"web-""#);
        let e = interp_uid(200, &no_uid, Some("uid-old")).expect_err("no uid");
        assert!(e.to_string().contains("\"\""), "{e}");
    }

    #[test]
    fn not_found_is_permanent_and_named() {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"web-1\" not found","reason":"NotFound","code":404}"#;
        let e = interp(404, body).expect_err("404");
        assert!(!e.is_transient());
        assert_eq!(e.http_status(), Some(404));
        assert!(
            e.to_string()
                .contains("pod default/web-1 not found (deleted?)"),
            "{e}"
        );
    }

    #[test]
    fn denied_names_token_or_rbac_and_kubeconfig() {
        let e = interp(
            401,
            r#"{"kind":"Status","message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        )
        .expect_err("401");
        assert!(!e.is_transient());
        let s = e.to_string();
        assert!(
            s.contains("HTTP 401") && s.contains("token") && s.contains(KC),
            "{s}"
        );

        let e = interp(403, "forbidden by policy").expect_err("403");
        let s = e.to_string();
        assert!(
            s.contains("HTTP 403") && s.contains("RBAC") && s.contains(KC),
            "{s}"
        );
        assert!(s.contains("forbidden by policy"), "{s}");
    }

    #[test]
    fn status_classes() {
        for s in [500, 502, 503, 504, 429, 408] {
            let e = interp(s, "").expect_err("error");
            assert!(e.is_transient(), "{s}");
            assert_eq!(e.http_status(), Some(s));
            assert!(e.to_string().contains(&format!("HTTP {s}")), "{e}");
        }
        for s in [400, 405, 406, 410, 422, 301, 100] {
            let e = interp(s, "").expect_err("error");
            assert!(!e.is_transient(), "{s}");
        }
    }

    #[test]
    fn status_message_prefers_status_body_and_bounds_raw_text() {
        assert_eq!(
            status_message(br#"{"message":"etcd down","reason":"InternalError"}"#),
            "InternalError: etcd down"
        );
        assert_eq!(status_message(br#"{"message":"m"}"#), "m");
        assert_eq!(status_message(b"  \n"), "(empty body)");
        assert_eq!(status_message(b"{}"), "{}");
        let long = "x".repeat(2000);
        assert_eq!(status_message(long.as_bytes()).len(), 515);
    }
}
