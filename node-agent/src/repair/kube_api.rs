//! The API side of the repair actions, over the agent's own client: delete with preconditions, a merge patch of
//! `pods/status` for the label (Istio's choice: the lower privilege that can still change metadata), core/v1 Events.
//! Every call is bounded in time.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};

use super::{ApiError, PodActions, PodTarget};

/// Longest wait for one API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct KubeActions {
    client: Client,
}

impl KubeActions {
    pub fn new(client: Client) -> Self {
        KubeActions { client }
    }
}

/// The error of a call. The server's message is scrubbed of the token (a server or proxy may quote the request):
/// it goes into logs, `node-agent status` and the pod's Event, which anyone who may read Events sees.
fn api_error(what: String, e: kube::Error) -> ApiError {
    let scrub = |s: &str| cni_plugin::redact::scrub(s).into_owned();
    match e {
        kube::Error::Api(s) if s.code == 404 => ApiError::NotFound { what },
        kube::Error::Api(s) => ApiError::Status {
            what,
            status: s.code,
            message: scrub(&s.message),
        },
        // The whole chain (a TLS failure says only "client error (Connect)" at the top), scrubbed: it goes into
        // the pod's Event.
        other => ApiError::Request {
            what,
            message: scrub(&crate::podsock::error_chain(&other)),
        },
    }
}

async fn bounded<T>(
    what: String,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| api_error(what, e)),
        Err(_) => Err(ApiError::Timeout {
            what,
            secs: CALL_TIMEOUT.as_secs(),
        }),
    }
}

/// The merge patch that sets one label.
pub fn label_patch(key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { key: value } } })
}

/// The delete's options: only the pod as seen (UID, and resource version when known).
pub fn delete_params(pod: &PodTarget) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(pod.uid.clone()),
            resource_version: pod.resource_version.clone(),
        }),
        ..DeleteParams::default()
    }
}

impl PodActions for KubeActions {
    async fn delete(&self, pod: &PodTarget) -> Result<(), ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let what = format!("delete pod {}/{}", pod.namespace, pod.name);
        bounded(what, api.delete(&pod.name, &delete_params(pod)))
            .await
            .map(|_| ())
    }

    async fn label(&self, pod: &PodTarget, key: &str, value: &str) -> Result<(), ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let what = format!("label pod {}/{} (pods/status)", pod.namespace, pod.name);
        let patch = Patch::Merge(label_patch(key, value));
        bounded(
            what,
            api.patch_status(&pod.name, &PatchParams::default(), &patch),
        )
        .await
        .map(|_| ())
    }

    async fn event(&self, event: CoreEvent) -> Result<(), ApiError> {
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &namespace);
        let what = format!(
            "create event {}/{}",
            namespace,
            event.metadata.name.as_deref().unwrap_or("")
        );
        bounded(what, api.create(&PostParams::default(), &event))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_is_one_merge_patch_and_the_delete_is_guarded() {
        assert_eq!(
            label_patch("cni.istio.io/uninitialized", "true"),
            serde_json::json!({"metadata": {"labels": {"cni.istio.io/uninitialized": "true"}}})
        );
        let dp = delete_params(&PodTarget {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u1".into(),
            resource_version: Some("42".into()),
        });
        let json = serde_json::to_value(&dp).unwrap();
        assert_eq!(
            json["preconditions"],
            serde_json::json!({"uid": "u1", "resourceVersion": "42"})
        );
    }
}
