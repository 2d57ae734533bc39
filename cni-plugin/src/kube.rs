//! CONTRACT (being implemented by the kube helper): the pod lookup.
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

pub struct LookupPolicy {
    pub deadline: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("placeholder")]
    Placeholder,
}

impl KubeError {
    pub fn is_transient(&self) -> bool {
        false
    }
}

pub fn get_pod_blocking(
    _kubeconfig: &Path,
    _namespace: &str,
    _name: &str,
    _policy: &LookupPolicy,
) -> Result<Pod, KubeError> {
    Err(KubeError::Placeholder)
}
