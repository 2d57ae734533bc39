//! kube's API client, for the kubeconfigs the plugin's own GET does not serve (an exec plugin, an auth-provider,
//! ...): one HTTPS GET of a Pod per attempt, its answer interpreted, transport failures classified (TLS
//! verification failures apart from network ones). Its current-thread tokio runtime is made here too, so that
//! every connection is made from the calling thread (and so in its network namespace).

use std::error::Error as StdError;
use std::time::Duration;

use kube::api::GetParams;
use kube::client::Body;
use kube::{Client, Config};

use super::{response, LookupErrorKind, PodRef};
use crate::error::{causes, error_chain};
use crate::pod::PodInfo;

/// A current-thread tokio runtime for kube's client, on the calling thread.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A kube client for one API server. Must be created inside the tokio runtime that uses it.
pub(super) struct ApiClient {
    client: Client,
}

impl ApiClient {
    pub(super) fn new(config: Config) -> Result<Self, LookupErrorKind> {
        let client = Client::try_from(config).map_err(|e| LookupErrorKind::KubeconfigInvalid {
            detail: format!("cannot build the client: {}", error_chain(&e)),
        })?;
        Ok(ApiClient { client })
    }

    /// One GET of `pod` (of `uid`, when known) within `timeout`; also returns the server's `Retry-After`, if any.
    pub(super) async fn get(
        &self,
        pod: &PodRef,
        uid: Option<&str>,
        timeout: Duration,
    ) -> (Result<PodInfo, LookupErrorKind>, Option<Duration>) {
        match tokio::time::timeout(timeout, self.send(pod, uid)).await {
            Ok(r) => r,
            Err(_) => (Err(LookupErrorKind::Timeout { timeout }), None),
        }
    }

    async fn send(
        &self,
        pod: &PodRef,
        uid: Option<&str>,
    ) -> (Result<PodInfo, LookupErrorKind>, Option<Duration>) {
        let path = format!("/api/v1/namespaces/{}/pods", pod.namespace);
        // The pod reference was validated before; the builder's own check cannot fail on it.
        let req = match kube::core::Request::new(path).get(&pod.name, &GetParams::default()) {
            Ok(r) => r.map(Body::from),
            Err(e) => {
                return (
                    Err(LookupErrorKind::Client {
                        chain: format!("building the request: {}", error_chain(&e)),
                    }),
                    None,
                )
            }
        };
        let res = match self.client.send(req).await {
            Ok(res) => res,
            Err(e) => return (Err(transport_error(&e)), None),
        };
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match res.into_body().collect_bytes().await {
            Ok(b) => b,
            Err(e) => {
                return (
                    Err(LookupErrorKind::Transport {
                        chain: format!(
                            "HTTP {status}, then reading the body failed: {}",
                            error_chain(&e)
                        ),
                    }),
                    None,
                )
            }
        };
        (response::interpret(status, &body, pod, uid), retry_after)
    }
}

fn transport_error(e: &kube::Error) -> LookupErrorKind {
    let chain = error_chain(e);
    match e {
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            if is_tls_failure(e) {
                LookupErrorKind::Tls { chain }
            } else {
                LookupErrorKind::Transport { chain }
            }
        }
        // Auth layer (token file unreadable, exec plugin failed), request building, ...: configuration problems
        // that a retry will not fix.
        _ => LookupErrorKind::Client { chain },
    }
}

/// Whether a transport error is a TLS verification/protocol failure (permanent) rather than a network one.
/// rustls reports every handshake failure as an `io::Error` of kind `InvalidData` (certificate errors, alerts,
/// garbage instead of TLS); a server that closes the connection half-way gives `UnexpectedEof` instead.
/// hyper-util wraps that `io::Error` in another one (kind `Other`); [`causes`] walks into it.
fn is_tls_failure(err: &(dyn StdError + 'static)) -> bool {
    causes(err).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::tests::{unknown_issuer, Outer};

    #[test]
    fn tls_is_told_from_network_failures_also_inside_a_wrapped_io_error() {
        assert!(is_tls_failure(&Outer(unknown_issuer())));
        // hyper-util's shape: an io::Error (Other) wrapping rustls' io::Error (InvalidData).
        assert!(is_tls_failure(&Outer(std::io::Error::other(
            unknown_issuer()
        ))));
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_tls_failure(&refused));
        let eof = Outer(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        ));
        assert!(!is_tls_failure(&eof));
    }
}
