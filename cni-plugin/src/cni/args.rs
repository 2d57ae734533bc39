//! CNI_ARGS: `K1=V1;K2=V2`. Only the Kubernetes keys are used; others (IgnoreUnknown, K8S_POD_UID, ...) are
//! tolerated, as runtimes send more than the spec's examples.

use super::{codes, CniError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_infra_container_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
}

impl CniArgs {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut out = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    codes::INVALID_ENVIRONMENT,
                    format!("CNI_ARGS has an invalid pair {pair:?}"),
                    "expected KEY=VALUE pairs separated by ';'",
                )
            })?;
            let v = Some(v.to_string()).filter(|v| !v.is_empty());
            match k {
                "K8S_POD_NAME" => out.k8s_pod_name = v,
                "K8S_POD_NAMESPACE" => out.k8s_pod_namespace = v,
                "K8S_POD_INFRA_CONTAINER_ID" => out.k8s_pod_infra_container_id = v,
                "K8S_POD_UID" => out.k8s_pod_uid = v,
                _ => {}
            }
        }
        Ok(out)
    }

    /// `(namespace, name)` when both are present: only then is this a Kubernetes pod.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((
            self.k8s_pod_namespace.as_deref()?,
            self.k8s_pod_name.as_deref()?,
        ))
    }
}
