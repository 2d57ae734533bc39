//! The pod as the plugin sees it, and the injection decision. Pure: no I/O.
//!
//! Reproduces the skip checks of Istio's `doAddRun` (cni/pkg/plugin), in Istio's order. (Istio's `ExtractPodInfo`,
//! the Pod object to [`PodInfo`], is in [`crate::lookup::response`].)

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Name of the sidecar container.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// Name of the legacy init container that programs the rules itself.
pub const ISTIO_INIT: &str = "istio-init";
/// `sidecar.istio.io/inject`: annotation and label.
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// `sidecar.istio.io/status`: written by the injector.
pub const STATUS_KEY: &str = "sidecar.istio.io/status";

/// What the plugin needs to know of a pod: what a lookup returns (built from a Pod object by
/// [`crate::lookup::response`]). Serde, so that the node agent's pod cache can answer with the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// Names of all containers, init containers included (native sidecars are init containers).
    pub containers: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `<type>` of the `istio-proxy` args `proxy <type> ...`, if present.
    pub proxy_type: Option<String>,
    /// Literal env values of the `istio-proxy` container (valueFrom entries count as "").
    pub proxy_env: BTreeMap<String, String>,
    pub proxy_uid: Option<i64>,
    pub proxy_gid: Option<i64>,
}

/// Why a pod gets no redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// It has an `istio-init` container, which programs the rules itself.
    HasIstioInit,
    /// `DISABLE_ENVOY=true` on the `istio-proxy` container.
    EnvoyDisabled,
    /// No `istio-proxy` container at all.
    NoProxyContainer,
    /// The proxy is not a sidecar (e.g. `router`).
    ProxyType(String),
    /// `sidecar.istio.io/inject` is false (label beats annotation).
    InjectDisabled(String),
    /// No `sidecar.istio.io/status` annotation: the injector never ran.
    NoSidecarStatus,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::HasIstioInit => write!(f, "pod has an {ISTIO_INIT} container"),
            SkipReason::EnvoyDisabled => write!(f, "DISABLE_ENVOY is true on {ISTIO_PROXY}"),
            SkipReason::NoProxyContainer => write!(f, "pod has no {ISTIO_PROXY} container"),
            SkipReason::ProxyType(t) => write!(f, "proxy type is {t:?}, not \"sidecar\""),
            SkipReason::InjectDisabled(v) => write!(f, "{INJECT_KEY} is {v:?}"),
            SkipReason::NoSidecarStatus => write!(f, "pod has no {STATUS_KEY} annotation"),
        }
    }
}

impl SkipReason {
    /// A short snake_case label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::HasIstioInit => "has_istio_init",
            SkipReason::EnvoyDisabled => "envoy_disabled",
            SkipReason::NoProxyContainer => "no_proxy_container",
            SkipReason::ProxyType(_) => "proxy_type",
            SkipReason::InjectDisabled(_) => "inject_disabled",
            SkipReason::NoSidecarStatus => "no_sidecar_status",
        }
    }
}

/// The injection decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Redirect,
    Skip(SkipReason),
}

/// Go's `strconv.ParseBool`: the only spellings Istio accepts.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Decides, in Istio's order, whether the pod gets redirect rules.
pub fn decide(pi: &PodInfo) -> Decision {
    if pi.containers.contains(ISTIO_INIT) {
        return Decision::Skip(SkipReason::HasIstioInit);
    }
    if let Some(v) = pi.proxy_env.get("DISABLE_ENVOY") {
        if parse_go_bool(v) == Some(true) {
            return Decision::Skip(SkipReason::EnvoyDisabled);
        }
    }
    if !pi.containers.contains(ISTIO_PROXY) {
        return Decision::Skip(SkipReason::NoProxyContainer);
    }
    if let Some(t) = pi.proxy_type.as_deref() {
        if !t.is_empty() && t != "sidecar" {
            return Decision::Skip(SkipReason::ProxyType(t.to_string()));
        }
    }
    let inject = pi
        .labels
        .get(INJECT_KEY)
        .or_else(|| pi.annotations.get(INJECT_KEY));
    if let Some(v) = inject {
        // An unparsable value is ignored, as Istio does.
        if parse_go_bool(v) == Some(false) {
            return Decision::Skip(SkipReason::InjectDisabled(v.clone()));
        }
    }
    if !pi.annotations.contains_key(STATUS_KEY) {
        return Decision::Skip(SkipReason::NoSidecarStatus);
    }
    Decision::Redirect
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> PodInfo {
        PodInfo::from(&serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(v).unwrap())
    }

    fn injected() -> PodInfo {
        pod(json!({
            "metadata": {"name": "p", "namespace": "n", "annotations": {STATUS_KEY: "{}"}},
            "spec": {"containers": [
                {"name": "app"},
                {"name": ISTIO_PROXY, "args": ["proxy", "sidecar"], "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
                 "securityContext": {"runAsUser": 1000670000, "runAsGroup": 7}}
            ]}
        }))
    }

    #[test]
    fn pod_info_round_trips_through_json_and_must_be_complete() {
        let pi = injected();
        let text = serde_json::to_string(&pi).unwrap();
        assert_eq!(serde_json::from_str::<PodInfo>(&text).unwrap(), pi);
        // A value without what the decision reads is refused, never taken as a pod without annotations.
        let mut v = serde_json::to_value(&pi).unwrap();
        v.as_object_mut().unwrap().remove("annotations");
        assert!(serde_json::from_value::<PodInfo>(v).is_err());
    }

    #[test]
    fn extracts_proxy_details() {
        let pi = injected();
        assert_eq!(
            pi.containers.iter().collect::<Vec<_>>(),
            ["app", ISTIO_PROXY]
        );
        assert_eq!(pi.proxy_type.as_deref(), Some("sidecar"));
        assert_eq!(pi.proxy_env.get("A").map(String::as_str), Some("1"));
        assert_eq!(pi.proxy_env.get("B").map(String::as_str), Some(""));
        assert_eq!((pi.proxy_uid, pi.proxy_gid), (Some(1000670000), Some(7)));
        assert_eq!(decide(&pi), Decision::Redirect);
    }

    #[test]
    fn native_sidecar_in_init_containers_counts() {
        let pi = pod(json!({
            "metadata": {"annotations": {STATUS_KEY: "{}"}},
            "spec": {"initContainers": [{"name": ISTIO_PROXY, "restartPolicy": "Always"}], "containers": [{"name": "app"}]}
        }));
        assert_eq!(decide(&pi), Decision::Redirect);
    }

    #[test]
    fn decision_table_in_istio_order() {
        let base = injected();
        let mut with_init = base.clone();
        with_init.containers.insert(ISTIO_INIT.into());
        // istio-init wins even over a missing status annotation.
        with_init.annotations.clear();
        assert_eq!(decide(&with_init), Decision::Skip(SkipReason::HasIstioInit));

        for (v, skip) in [
            ("true", true),
            ("1", true),
            ("TRUE", true),
            ("false", false),
            ("yes", false),
        ] {
            let mut pi = base.clone();
            pi.proxy_env.insert("DISABLE_ENVOY".into(), v.into());
            assert_eq!(
                decide(&pi) == Decision::Skip(SkipReason::EnvoyDisabled),
                skip,
                "{v}"
            );
        }

        let mut no_proxy = base.clone();
        no_proxy.containers.remove(ISTIO_PROXY);
        assert_eq!(
            decide(&no_proxy),
            Decision::Skip(SkipReason::NoProxyContainer)
        );

        let mut router = base.clone();
        router.proxy_type = Some("router".into());
        assert_eq!(
            decide(&router),
            Decision::Skip(SkipReason::ProxyType("router".into()))
        );
        let mut empty_type = base.clone();
        empty_type.proxy_type = Some(String::new());
        assert_eq!(decide(&empty_type), Decision::Redirect);

        let mut ann_off = base.clone();
        ann_off
            .annotations
            .insert(INJECT_KEY.into(), "false".into());
        assert_eq!(
            decide(&ann_off),
            Decision::Skip(SkipReason::InjectDisabled("false".into()))
        );
        // The label beats the annotation, both ways.
        let mut label_on = ann_off.clone();
        label_on.labels.insert(INJECT_KEY.into(), "true".into());
        assert_eq!(decide(&label_on), Decision::Redirect);
        let mut label_off = base.clone();
        label_off
            .annotations
            .insert(INJECT_KEY.into(), "true".into());
        label_off.labels.insert(INJECT_KEY.into(), "f".into());
        assert_eq!(
            decide(&label_off),
            Decision::Skip(SkipReason::InjectDisabled("f".into()))
        );
        // An unparsable value is ignored, as in Istio.
        let mut garbage = base.clone();
        garbage.annotations.insert(INJECT_KEY.into(), "nope".into());
        assert_eq!(decide(&garbage), Decision::Redirect);

        let mut no_status = base.clone();
        no_status.annotations.remove(STATUS_KEY);
        assert_eq!(
            decide(&no_status),
            Decision::Skip(SkipReason::NoSidecarStatus)
        );
    }

    #[test]
    fn pod_without_spec_is_not_injected() {
        assert_eq!(
            decide(&pod(json!({"metadata": {}}))),
            Decision::Skip(SkipReason::NoProxyContainer)
        );
    }

    #[test]
    fn go_bool_spellings() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Some(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Some(false));
        }
        for n in ["", "yes", "tRUE", " true"] {
            assert_eq!(parse_go_bool(n), None);
        }
    }
}
