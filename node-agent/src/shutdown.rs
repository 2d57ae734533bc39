//! On SIGTERM/SIGINT: uninstall, or leave everything in place for the next agent? As Istio's node agent does
//! (istio/istio#54180), the agent reads its own DaemonSet: gone or being deleted means an uninstall, and the entry,
//! the kubeconfig and the binary go; still there means a restart or an upgrade, and all three stay, so that pods
//! started before the next agent is up still go through the plugin (redirected, or refused when it cannot look them
//! up: never started outside the mesh) and kubelet's DEL of existing pods still finds the binary.
//!
//! When no answer says which (a timeout, no network, 403, 5xx), everything stays: fail closed. Removing the entry
//! would open exactly the bypass window this avoids, and an agent that stays is cleaned up by the next one anyway.
//! The cost is on a real uninstall whose agent could not ask: the files stay until someone removes them (README).
//! A 401 counts as an uninstall: the token is refused, so the service account is gone (an uninstall deletes it with
//! the DaemonSet), and the kubeconfig we would leave carries that same token: the plugin could not look any pod up
//! with it, and every pod start on the node would fail until someone removed the files.
//!
//! [`decide`] and [`action`] are pure (unit-tested over every case); [`ask`] makes the API call, bounded by
//! SHUTDOWN_CHECK_SECONDS, retrying what may still change within that time (403 included: an uninstall may delete the
//! role a moment before the service account or the DaemonSet).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

use crate::config::{Config, ShutdownCheck};
use crate::install::owner::{Record, Standing};
use crate::podsock;

/// First delay between two attempts; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
pub const MAX_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for one attempt (within the whole check's time).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the API server said about the agent's DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// DAEMONSET_NAME is empty: nothing to ask (outside Kubernetes).
    NotAsked,
    /// 200, no deletion timestamp.
    Present,
    /// 200 with `metadata.deletionTimestamp`.
    Deleting,
    /// 404.
    NotFound,
    /// 401: the agent's token is refused.
    Unauthorized { message: String },
    /// 403: RBAC does not let the agent read it.
    Forbidden { message: String },
    /// No usable answer: the last failure (a timeout, a connection error, another status, an undecodable body).
    Unavailable { reason: String },
}

impl Answer {
    /// Whether asking again could not change the answer (a 403 or a failure may still turn into one of these).
    pub fn is_final(&self) -> bool {
        match self {
            Answer::NotAsked
            | Answer::Present
            | Answer::Deleting
            | Answer::NotFound
            | Answer::Unauthorized { .. } => true,
            Answer::Forbidden { .. } | Answer::Unavailable { .. } => false,
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::NotAsked => write!(f, "not asked (DAEMONSET_NAME is empty)"),
            Answer::Present => write!(f, "present"),
            Answer::Deleting => write!(f, "being deleted (deletionTimestamp set)"),
            Answer::NotFound => write!(f, "not found (HTTP 404)"),
            Answer::Unauthorized { message } => write!(f, "HTTP 401 Unauthorized: {message}"),
            Answer::Forbidden { message } => write!(f, "HTTP 403 Forbidden: {message}"),
            Answer::Unavailable { reason } => write!(f, "no answer: {reason}"),
        }
    }
}

/// Remove everything of ours, or leave it for the next agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Uninstall,
    Leave,
}

/// The decision and why, in words for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub why: &'static str,
}

/// What the answer means.
pub fn decide(answer: &Answer) -> Verdict {
    let (decision, why) = match answer {
        Answer::NotAsked => (
            Decision::Uninstall,
            "no DaemonSet to ask (DAEMONSET_NAME is empty): uninstall",
        ),
        Answer::Present => (
            Decision::Leave,
            "the DaemonSet is still there: a restart or an upgrade, the next agent takes over",
        ),
        Answer::Deleting => (
            Decision::Uninstall,
            "the DaemonSet is being deleted: uninstall",
        ),
        Answer::NotFound => (Decision::Uninstall, "the DaemonSet is gone: uninstall"),
        Answer::Unauthorized { .. } => (
            Decision::Uninstall,
            "the agent's token is refused (its service account is gone, and the plugin's kubeconfig carries the same \
             token): uninstall",
        ),
        Answer::Forbidden { .. } | Answer::Unavailable { .. } => (
            Decision::Leave,
            "cannot tell an uninstall from a restart: everything stays in place (fail closed: new pods are still \
             redirected or refused, never started outside the mesh)",
        ),
    };
    Verdict { decision, why }
}

/// What this agent does on shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove the entry, the kubeconfig and the binary.
    Uninstall,
    /// Leave them for the next agent.
    Leave,
    /// A newer agent owns the node: its files are not ours to remove, whatever the decision.
    StepAside { by: Record },
}

/// The decision, for an agent that stands where `standing` says.
pub fn action(decision: Decision, standing: &Standing) -> Action {
    match (standing, decision) {
        (Standing::Superseded { by }, _) => Action::StepAside { by: by.clone() },
        (Standing::Owner | Standing::Vacant { .. }, Decision::Uninstall) => Action::Uninstall,
        (Standing::Owner | Standing::Vacant { .. }, Decision::Leave) => Action::Leave,
    }
}

/// The answer to one GET.
pub fn classify(result: Result<DaemonSet, kube::Error>) -> Answer {
    match result {
        Ok(ds) if ds.metadata.deletion_timestamp.is_some() => Answer::Deleting,
        Ok(_) => Answer::Present,
        Err(kube::Error::Api(status)) => match status.code {
            404 => Answer::NotFound,
            401 => Answer::Unauthorized {
                message: status.message.clone(),
            },
            403 => Answer::Forbidden {
                message: status.message.clone(),
            },
            code => Answer::Unavailable {
                reason: format!("HTTP {code}: {}", status.message),
            },
        },
        Err(e) => Answer::Unavailable {
            reason: podsock::error_chain(&e),
        },
    }
}

/// Asks for the DaemonSet until the answer is final or `check.timeout` has passed; returns the last answer and the
/// number of attempts.
pub async fn ask(cfg: &Config, check: &ShutdownCheck) -> (Answer, u32) {
    let deadline = Instant::now() + check.timeout;
    let client = match tokio::time::timeout(check.timeout, podsock::client(cfg)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return (Answer::Unavailable { reason: e }, 0),
        Err(_) => {
            return (
                Answer::Unavailable {
                    reason: "no API client within the check's time".into(),
                },
                0,
            )
        }
    };
    let api: Api<DaemonSet> = Api::namespaced(client, &check.namespace);
    let mut delay = FIRST_RETRY;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = left.min(ATTEMPT_TIMEOUT);
        let answer = match tokio::time::timeout(limit, api.get(&check.name)).await {
            Ok(result) => classify(result),
            Err(_) => Answer::Unavailable {
                reason: format!("no answer within {} ms", limit.as_millis()),
            },
        };
        if answer.is_final() || Instant::now() + delay >= deadline {
            return (answer, attempts);
        }
        tracing::debug!(
            daemonset = %check.name,
            namespace = %check.namespace,
            attempt = attempts,
            answer = %answer,
            retry_ms = delay.as_millis() as u64,
            "no final answer about the DaemonSet yet; asking again"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_answer() -> Vec<Answer> {
        vec![
            Answer::NotAsked,
            Answer::Present,
            Answer::Deleting,
            Answer::NotFound,
            Answer::Unauthorized {
                message: "Unauthorized".into(),
            },
            Answer::Forbidden {
                message: "forbidden".into(),
            },
            Answer::Unavailable {
                reason: "no answer within 2000 ms".into(),
            },
        ]
    }

    #[test]
    fn uninstall_only_when_the_daemonset_is_gone_going_or_unknowable_as_such() {
        for answer in every_answer() {
            let expected = match answer {
                Answer::NotAsked
                | Answer::Deleting
                | Answer::NotFound
                | Answer::Unauthorized { .. } => Decision::Uninstall,
                Answer::Present | Answer::Forbidden { .. } | Answer::Unavailable { .. } => {
                    Decision::Leave
                }
            };
            let verdict = decide(&answer);
            assert_eq!(verdict.decision, expected, "{answer}");
            assert!(!verdict.why.is_empty());
        }
    }

    #[test]
    fn what_may_still_change_is_asked_again() {
        for answer in every_answer() {
            let retried = matches!(
                answer,
                Answer::Forbidden { .. } | Answer::Unavailable { .. }
            );
            assert_eq!(answer.is_final(), !retried, "{answer}");
        }
    }

    #[test]
    fn a_superseded_agent_never_removes_anything() {
        let newer = Record {
            pod: "istio-cni-node-new".into(),
            pid: 7,
            started: "2026-01-01T00:00:00Z".into(),
        };
        let standings = [
            Standing::Owner,
            Standing::Vacant { last: None },
            Standing::Vacant {
                last: Some(newer.clone()),
            },
            Standing::Superseded { by: newer.clone() },
        ];
        for standing in &standings {
            for decision in [Decision::Uninstall, Decision::Leave] {
                let expected = match (standing, decision) {
                    (Standing::Superseded { by }, _) => Action::StepAside { by: by.clone() },
                    (_, Decision::Uninstall) => Action::Uninstall,
                    (_, Decision::Leave) => Action::Leave,
                };
                assert_eq!(
                    action(decision, standing),
                    expected,
                    "{standing:?} {decision:?}"
                );
            }
        }
    }

    fn status(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({
                "status": "Failure", "message": message, "code": code,
            }))
            .unwrap(),
        ))
    }

    #[test]
    fn api_answers_are_classified() {
        let ds = |meta: serde_json::Value| -> DaemonSet {
            serde_json::from_value(serde_json::json!({"metadata": meta})).unwrap()
        };
        assert_eq!(
            classify(Ok(ds(serde_json::json!({"name": "istio-cni-node"})))),
            Answer::Present
        );
        assert_eq!(
            classify(Ok(ds(
                serde_json::json!({"name": "istio-cni-node", "deletionTimestamp": "2026-01-01T00:00:00Z"})
            ))),
            Answer::Deleting
        );
        assert_eq!(classify(Err(status(404, "not found"))), Answer::NotFound);
        assert_eq!(
            classify(Err(status(401, "Unauthorized"))),
            Answer::Unauthorized {
                message: "Unauthorized".into()
            }
        );
        assert_eq!(
            classify(Err(status(403, "cannot get daemonsets"))),
            Answer::Forbidden {
                message: "cannot get daemonsets".into()
            }
        );
        assert_eq!(
            classify(Err(status(503, "etcd is down"))),
            Answer::Unavailable {
                reason: "HTTP 503: etcd is down".into()
            }
        );
        let garbage = serde_json::from_str::<DaemonSet>("{").unwrap_err();
        match classify(Err(kube::Error::SerdeError(garbage))) {
            Answer::Unavailable { reason } => assert!(reason.contains("EOF"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
