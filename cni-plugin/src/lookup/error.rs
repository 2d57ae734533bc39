//! Why a pod lookup failed. A [`LookupError`] names the pod, the API server and the kubeconfig once; its
//! [`LookupErrorKind`] says what went wrong (HTTP status and the server's message, the error chain, the deadline).
//! The message of every kind names the pod, the server or the kubeconfig, and the status or the cause.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::PodRef;

/// A failed lookup of one pod.
#[derive(Debug)]
pub struct LookupError {
    pub pod: PodRef,
    /// The API server's URL as the kubeconfig names it; empty when the lookup failed before the kubeconfig was read.
    pub server: String,
    /// The kubeconfig the plugin used.
    pub kubeconfig: PathBuf,
    pub kind: LookupErrorKind,
}

/// What went wrong; the context is in the [`LookupError`] around it.
#[derive(Debug)]
pub enum LookupErrorKind {
    /// The namespace or name (from `CNI_ARGS`) cannot be a Kubernetes name; checked before it becomes a URL path.
    InvalidPodRef {
        reason: &'static str,
    },
    KubeconfigUnreadable {
        detail: String,
    },
    KubeconfigInvalid {
        detail: String,
    },
    /// The current-thread tokio runtime of the blocking lookup could not be built.
    Runtime(std::io::Error),
    /// HTTP 404: the pod is gone.
    NotFound,
    /// HTTP 401 (the token) or 403 (RBAC); `message` is the server's.
    Denied {
        status: u16,
        message: String,
    },
    /// Any other non-2xx status; `message` is the server's `Status` message or the (bounded) body.
    Http {
        status: u16,
        message: String,
    },
    /// The TLS handshake failed (unknown CA, expired certificate, wrong name, not TLS); `chain` is the error chain.
    Tls {
        chain: String,
    },
    /// The server could not be reached or closed the connection.
    Transport {
        chain: String,
    },
    /// No answer within the per-request timeout.
    Timeout {
        timeout: Duration,
    },
    /// A 2xx answer that is not the Pod asked for.
    BadResponse {
        detail: String,
    },
    /// The pod of that name has another UID than the runtime's `K8S_POD_UID`: it was deleted and recreated under
    /// the same name, and this sandbox belongs to the old one.
    UidMismatch {
        expected: String,
        got: String,
    },
    /// The kube client failed before sending (auth layer, request building).
    Client {
        chain: String,
    },
    /// The deadline ended the retries; `last` is the error worth reporting (see the retry loop).
    DeadlineExceeded {
        attempts: u32,
        elapsed: Duration,
        deadline: Duration,
        last: Box<LookupErrorKind>,
    },
}

/// 5xx, 429 Too Many Requests and 408 Request Timeout may succeed on a later attempt.
pub fn status_is_transient(status: u16) -> bool {
    (500..=599).contains(&status) || status == 429 || status == 408
}

impl LookupErrorKind {
    /// Whether the same call may succeed later (the CNI caller maps this to code 11, "try again later").
    pub fn is_transient(&self) -> bool {
        match self {
            LookupErrorKind::Transport { .. } | LookupErrorKind::Timeout { .. } => true,
            LookupErrorKind::Http { status, .. } => status_is_transient(*status),
            LookupErrorKind::DeadlineExceeded { last, .. } => last.is_transient(),
            LookupErrorKind::InvalidPodRef { .. }
            | LookupErrorKind::KubeconfigUnreadable { .. }
            | LookupErrorKind::KubeconfigInvalid { .. }
            | LookupErrorKind::Runtime(_)
            | LookupErrorKind::NotFound
            | LookupErrorKind::Denied { .. }
            | LookupErrorKind::Tls { .. }
            | LookupErrorKind::BadResponse { .. }
            | LookupErrorKind::UidMismatch { .. }
            | LookupErrorKind::Client { .. } => false,
        }
    }

    /// The HTTP status of the (last) answer, if the server answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            LookupErrorKind::NotFound => Some(404),
            LookupErrorKind::Denied { status, .. } | LookupErrorKind::Http { status, .. } => {
                Some(*status)
            }
            LookupErrorKind::DeadlineExceeded { last, .. } => last.http_status(),
            _ => None,
        }
    }
}

impl LookupError {
    /// See [`LookupErrorKind::is_transient`].
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    /// See [`LookupErrorKind::http_status`].
    pub fn http_status(&self) -> Option<u16> {
        self.kind.http_status()
    }

    fn describe(&self, kind: &LookupErrorKind, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pod, server, kubeconfig) = (&self.pod, &self.server, self.kubeconfig.display());
        match kind {
            LookupErrorKind::InvalidPodRef { reason } => write!(
                f,
                "invalid pod reference {:?}/{:?}: {reason}",
                pod.namespace, pod.name
            ),
            LookupErrorKind::KubeconfigUnreadable { detail } => {
                write!(f, "cannot read kubeconfig {kubeconfig}: {detail}")
            }
            LookupErrorKind::KubeconfigInvalid { detail } => {
                write!(f, "invalid kubeconfig {kubeconfig}: {detail}")
            }
            LookupErrorKind::Runtime(e) => {
                write!(f, "cannot start the async runtime for the API call: {e}")
            }
            LookupErrorKind::NotFound => {
                write!(f, "pod {pod} not found (deleted?): HTTP 404 from {server}")
            }
            LookupErrorKind::Denied { status, message } => {
                let hint = if *status == 401 {
                    "the API server rejected the service-account token (missing, expired or revoked; the node \
                     agent rewrites the kubeconfig when the token rotates)"
                } else {
                    "the service account may not get pods: check the RBAC of the CNI node agent's service account \
                     (ClusterRole with get on pods, and its binding)"
                };
                write!(
                    f,
                    "HTTP {status} from {server} getting pod {pod}: {hint} (kubeconfig {kubeconfig}): {message}"
                )
            }
            LookupErrorKind::Http { status, message } => {
                write!(f, "HTTP {status} from {server} getting pod {pod}: {message}")
            }
            LookupErrorKind::Tls { chain } => write!(
                f,
                "TLS failure talking to API server {server} for pod {pod}: the server certificate must chain to the \
                 certificate-authority(-data) of kubeconfig {kubeconfig}, match the server address and be valid \
                 now: {chain}"
            ),
            LookupErrorKind::Transport { chain } => {
                write!(f, "cannot reach API server {server} for pod {pod}: {chain}")
            }
            LookupErrorKind::Timeout { timeout } => write!(
                f,
                "no answer from API server {server} for pod {pod} within {timeout:?}"
            ),
            LookupErrorKind::BadResponse { detail } => write!(
                f,
                "invalid answer from API server {server} for pod {pod}: {detail}"
            ),
            LookupErrorKind::UidMismatch { expected, got } => write!(
                f,
                "pod {pod} on API server {server} has uid {got:?}, not the runtime's K8S_POD_UID {expected:?}: it \
                 was deleted and recreated under the same name, this sandbox is the old pod's"
            ),
            LookupErrorKind::Client { chain } => write!(
                f,
                "kube client error for pod {pod} (server {server}, kubeconfig {kubeconfig}): {chain}"
            ),
            LookupErrorKind::DeadlineExceeded {
                attempts,
                elapsed,
                deadline,
                last,
            } => {
                write!(
                    f,
                    "gave up getting pod {pod} after {attempts} attempt(s) in {} ms (deadline {deadline:?}); last \
                     error: ",
                    elapsed.as_millis()
                )?;
                self.describe(last, f)
            }
        }
    }
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(&self.kind, f)
    }
}

impl std::error::Error for LookupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            LookupErrorKind::Runtime(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// The kubeconfig of the unit tests' errors.
    pub(crate) const KC: &str = "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig";

    /// `kind` in the context of pod default/web-1 on https://10.96.0.1:443/ with `kubeconfig`.
    pub(crate) fn in_context(kubeconfig: &Path, kind: LookupErrorKind) -> LookupError {
        LookupError {
            pod: PodRef::new("default", "web-1"),
            server: "https://10.96.0.1:443/".into(),
            kubeconfig: kubeconfig.to_path_buf(),
            kind,
        }
    }

    #[test]
    fn deadline_error_keeps_last_cause() {
        let e = in_context(
            Path::new(KC),
            LookupErrorKind::DeadlineExceeded {
                attempts: 7,
                elapsed: Duration::from_millis(1003),
                deadline: Duration::from_secs(1),
                last: Box::new(LookupErrorKind::Http {
                    status: 503,
                    message: "overloaded".into(),
                }),
            },
        );
        assert!(e.is_transient());
        assert_eq!(e.http_status(), Some(503));
        let s = e.to_string();
        assert!(
            s.contains("7 attempt(s)")
                && s.contains("in 1003 ms")
                && s.contains("HTTP 503 from https://10.96.0.1:443/ getting pod default/web-1")
                && s.contains("overloaded"),
            "{s}"
        );
    }

    #[test]
    fn every_message_names_its_context() {
        let kc = Path::new(KC);
        let pod_and_server = [
            LookupErrorKind::NotFound,
            LookupErrorKind::Http {
                status: 400,
                message: "m".into(),
            },
            LookupErrorKind::Transport { chain: "c".into() },
            LookupErrorKind::Timeout {
                timeout: Duration::from_secs(5),
            },
            LookupErrorKind::BadResponse { detail: "d".into() },
            LookupErrorKind::UidMismatch {
                expected: "u1".into(),
                got: "u2".into(),
            },
        ];
        for kind in pod_and_server {
            let s = in_context(kc, kind).to_string();
            assert!(
                s.contains("default/web-1") && s.contains("https://10.96.0.1:443/"),
                "{s}"
            );
        }
        let with_kubeconfig = [
            LookupErrorKind::Denied {
                status: 403,
                message: "m".into(),
            },
            LookupErrorKind::Tls { chain: "c".into() },
            LookupErrorKind::Client { chain: "c".into() },
        ];
        for kind in with_kubeconfig {
            let s = in_context(kc, kind).to_string();
            assert!(
                s.contains("default/web-1")
                    && s.contains("https://10.96.0.1:443/")
                    && s.contains(KC),
                "{s}"
            );
        }
        for kind in [
            LookupErrorKind::KubeconfigUnreadable { detail: "d".into() },
            LookupErrorKind::KubeconfigInvalid { detail: "d".into() },
        ] {
            assert!(in_context(kc, kind).to_string().contains(KC));
        }
    }
}
