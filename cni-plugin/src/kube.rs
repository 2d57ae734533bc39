//! The plugin's pod lookup: one HTTPS GET of the Pod from the API server named in the plugin's kubeconfig, with a
//! bounded retry policy.
//!
//! Istio's plugin retries every error 30 times, one second apart. We are stricter and faster:
//!
//! * **Transient** errors are retried with exponential backoff (default 50 ms doubling to 1 s, with a little
//!   jitter) until the caller's deadline: connection refused/reset/aborted, a connection closed before the answer
//!   (also a TLS handshake the server abandons half-way), a request that got no answer within the per-request
//!   timeout, HTTP 5xx, 429 (honouring `Retry-After`) and 408.
//! * **Permanent** errors fail at once: 404 (the pod is gone), 401/403 (the token or RBAC is wrong; retrying only
//!   hammers the API server), any other 4xx, a missing/unreadable/invalid kubeconfig, an invalid namespace or pod
//!   name, a Pod object that does not decode or is not the one asked for, and **TLS verification failures** (unknown
//!   CA, expired or not-yet-valid certificate, wrong name): a CA mismatch does not fix itself within a CNI call's
//!   deadline, and hiding it behind 30 s of retries only delays the diagnosis. It is reported with the whole error
//!   chain so the real cause is visible (kube itself shows only "client error (Connect)").
//! * On the deadline the last error is returned ([`KubeError::DeadlineExceeded`]); we never fail open. (When the
//!   deadline cut the last attempt short, the error of the attempt before it is reported: it says more.)
//!
//! Proxies are never used: a container runtime's `HTTPS_PROXY`/`https_proxy` leaks into the plugin's environment
//! and would send the service-account token to a proxy (or break the lookup). A `proxy-url` in the kubeconfig is
//! ignored too (with a warning). The API server must be reached over `https`: the kubeconfig carries a bearer
//! token, which must never travel in clear text.
//!
//! The blocking entry point builds a current-thread tokio runtime on the calling thread and creates the client
//! inside it; the connection is therefore made in the calling thread's network namespace.

use std::collections::hash_map::RandomState;
use std::error::Error as StdError;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::GetParams;
use kube::client::Body;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tracing::{debug, info_span, warn};

/// Default overall deadline of a lookup (all attempts and backoff included).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Default delay before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Default cap of the delay between two attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Default timeout of one request (connect, TLS, request and whole response), never beyond the deadline.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A value for the kubeconfig's `proxy-url` while the kube config is built. kube reads `HTTPS_PROXY` from the
/// environment only when the kubeconfig names no proxy, and fails on a value it cannot parse; a placeholder here
/// keeps the environment out entirely. The resulting `proxy_url` is cleared before the client is built.
const PROXY_PLACEHOLDER: &str = "http://127.0.0.1:9";

/// How long and how often to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupPolicy {
    /// Overall budget, from the call until the last attempt ends. At least one attempt is always made.
    pub deadline: Duration,
    /// Delay before the first retry; doubles after each failed attempt.
    pub initial_backoff: Duration,
    /// Cap of the delay between attempts.
    pub max_backoff: Duration,
    /// Timeout of a single attempt (connect, TLS handshake, request, whole response).
    pub request_timeout: Duration,
}

impl Default for LookupPolicy {
    fn default() -> Self {
        LookupPolicy {
            deadline: DEFAULT_DEADLINE,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl LookupPolicy {
    /// The default policy with the given overall deadline.
    pub fn with_deadline(deadline: Duration) -> Self {
        LookupPolicy {
            deadline,
            ..Self::default()
        }
    }

    /// Delay before attempt `attempt + 1` after attempt `attempt` (1-based) failed, before jitter:
    /// `initial_backoff * 2^(attempt-1)`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// Why a lookup failed. Every message names the pod, the server or kubeconfig, and the status or error chain.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid pod reference {namespace:?}/{name:?}: {reason}")]
    InvalidPodRef {
        namespace: String,
        name: String,
        reason: &'static str,
    },

    #[error("cannot read kubeconfig {}: {detail}", path.display())]
    KubeconfigUnreadable { path: PathBuf, detail: String },

    #[error("invalid kubeconfig {}: {detail}", path.display())]
    KubeconfigInvalid { path: PathBuf, detail: String },

    #[error("cannot start the async runtime for the API call: {0}")]
    Runtime(#[source] std::io::Error),

    #[error("pod {pod} not found (deleted?): HTTP 404 from {server}")]
    NotFound { pod: String, server: String },

    #[error(
        "HTTP {status} from {server} getting pod {pod}: {hint} (kubeconfig {}): {message}",
        kubeconfig.display()
    )]
    Denied {
        status: u16,
        pod: String,
        server: String,
        kubeconfig: PathBuf,
        hint: &'static str,
        message: String,
    },

    #[error("HTTP {status} from {server} getting pod {pod}: {message}")]
    Http {
        status: u16,
        pod: String,
        server: String,
        message: String,
    },

    #[error(
        "TLS failure talking to API server {server} for pod {pod}: the server certificate must chain to the \
         certificate-authority(-data) of kubeconfig {}, match the server address and be valid now: {chain}",
        kubeconfig.display()
    )]
    Tls {
        pod: String,
        server: String,
        kubeconfig: PathBuf,
        chain: String,
    },

    #[error("cannot reach API server {server} for pod {pod}: {chain}")]
    Transport {
        pod: String,
        server: String,
        chain: String,
    },

    #[error("no answer from API server {server} for pod {pod} within {timeout:?}")]
    Timeout {
        pod: String,
        server: String,
        timeout: Duration,
    },

    #[error("invalid answer from API server {server} for pod {pod}: {detail}")]
    BadResponse {
        pod: String,
        server: String,
        detail: String,
    },

    #[error(
        "kube client error for pod {pod} (server {server}, kubeconfig {}): {chain}",
        kubeconfig.display()
    )]
    Client {
        pod: String,
        server: String,
        kubeconfig: PathBuf,
        chain: String,
    },

    #[error(
        "gave up getting pod {pod} after {attempts} attempt(s) in {} ms (deadline {deadline:?}); last error: {last}",
        elapsed.as_millis()
    )]
    DeadlineExceeded {
        pod: String,
        attempts: u32,
        elapsed: Duration,
        deadline: Duration,
        #[source]
        last: Box<KubeError>,
    },
}

impl KubeError {
    /// Whether the same call may succeed later (the CNI caller maps this to code 11, "try again later").
    pub fn is_transient(&self) -> bool {
        match self {
            KubeError::Transport { .. } | KubeError::Timeout { .. } => true,
            KubeError::Http { status, .. } => status_is_transient(*status),
            KubeError::DeadlineExceeded { last, .. } => last.is_transient(),
            KubeError::InvalidPodRef { .. }
            | KubeError::KubeconfigUnreadable { .. }
            | KubeError::KubeconfigInvalid { .. }
            | KubeError::Runtime(_)
            | KubeError::NotFound { .. }
            | KubeError::Denied { .. }
            | KubeError::Tls { .. }
            | KubeError::BadResponse { .. }
            | KubeError::Client { .. } => false,
        }
    }

    /// The HTTP status of the (last) answer, if the server answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            KubeError::NotFound { .. } => Some(404),
            KubeError::Denied { status, .. } | KubeError::Http { status, .. } => Some(*status),
            KubeError::DeadlineExceeded { last, .. } => last.http_status(),
            _ => None,
        }
    }
}

/// 5xx, 429 Too Many Requests and 408 Request Timeout may succeed on a later attempt.
pub fn status_is_transient(status: u16) -> bool {
    (500..=599).contains(&status) || status == 429 || status == 408
}

/// The whole `source()` chain of an error, joined by ": ", skipping a cause whose text its parent already shows.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

/// Checks a namespace (DNS-1123 label) and a pod name (DNS-1123 subdomain) before they become a URL path: values
/// from `CNI_ARGS` are not trusted to be well-formed.
pub fn validate_pod_ref(namespace: &str, name: &str) -> Result<(), KubeError> {
    let invalid = |reason| KubeError::InvalidPodRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    };
    if namespace.is_empty() {
        return Err(invalid("empty namespace"));
    }
    if namespace.len() > 63 || !is_dns1123_label(namespace) {
        return Err(invalid(
            "namespace is not a DNS-1123 label (lowercase alphanumerics and '-', at most 63)",
        ));
    }
    if name.is_empty() {
        return Err(invalid("empty pod name"));
    }
    if name.len() > 253 || !name.split('.').all(is_dns1123_label) {
        return Err(invalid(
            "pod name is not a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.', at most 253)",
        ));
    }
    Ok(())
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let edge_ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(edge_ok)
        && b.last().is_some_and(edge_ok)
        && b.iter().all(|c| edge_ok(c) || *c == b'-')
}

/// What one attempt's HTTP answer means. Pure: `status` and `body` as received.
pub fn interpret_response(
    status: u16,
    body: &[u8],
    namespace: &str,
    name: &str,
    server: &str,
    kubeconfig: &Path,
) -> Result<Pod, KubeError> {
    let pod = format!("{namespace}/{name}");
    if (200..300).contains(&status) {
        let obj: Pod = serde_json::from_slice(body).map_err(|e| KubeError::BadResponse {
            pod: pod.clone(),
            server: server.to_string(),
            detail: format!("HTTP {status} with a body that is not a Pod: {e}"),
        })?;
        let got_ns = obj.metadata.namespace.as_deref().unwrap_or("");
        let got_name = obj.metadata.name.as_deref().unwrap_or("");
        if got_ns != namespace || got_name != name {
            return Err(KubeError::BadResponse {
                pod,
                server: server.to_string(),
                detail: format!("HTTP {status} with pod {got_ns:?}/{got_name:?} instead"),
            });
        }
        return Ok(obj);
    }
    let message = status_message(body);
    match status {
        404 => Err(KubeError::NotFound {
            pod,
            server: server.to_string(),
        }),
        401 | 403 => Err(KubeError::Denied {
            status,
            pod,
            server: server.to_string(),
            kubeconfig: kubeconfig.to_path_buf(),
            hint: if status == 401 {
                "the API server rejected the service-account token (missing, expired or revoked; the node agent \
                 rewrites the kubeconfig when the token rotates)"
            } else {
                "the service account may not get pods: check the RBAC of the CNI node agent's service account \
                 (ClusterRole with get on pods, and its binding)"
            },
            message,
        }),
        _ => Err(KubeError::Http {
            status,
            pod,
            server: server.to_string(),
            message,
        }),
    }
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

/// Whether a transport error is a TLS verification/protocol failure (permanent) rather than a network one.
/// rustls reports every handshake failure as an `io::Error` of kind `InvalidData` (certificate errors, alerts,
/// garbage instead of TLS); a server that closes the connection half-way gives `UnexpectedEof` instead.
/// hyper-util wraps that `io::Error` in another one (kind `Other`), and `io::Error::source()` skips the wrapped
/// error, so the walk also descends through `io::Error::get_ref()`.
fn is_tls_failure(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                let inner: &(dyn StdError + 'static) = inner;
                if is_tls_failure(inner) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}

/// Reads and parses the kubeconfig (YAML or JSON) and builds the kube `Config` from its current context, with
/// the proxy cleared, kube's own retries off and the connect timeout set. No I/O beyond reading the files the
/// kubeconfig names (CA file, if any).
pub async fn load_config(
    kubeconfig: &Path,
    request_timeout: Duration,
) -> Result<Config, KubeError> {
    let invalid = |detail: String| KubeError::KubeconfigInvalid {
        path: kubeconfig.to_path_buf(),
        detail,
    };
    // Read it ourselves first: a missing or unreadable file is reported as such, not as a parse error.
    if let Err(e) = std::fs::metadata(kubeconfig) {
        return Err(KubeError::KubeconfigUnreadable {
            path: kubeconfig.to_path_buf(),
            detail: e.to_string(),
        });
    }
    let mut kc = Kubeconfig::read_from(kubeconfig).map_err(|e| match e {
        kube::config::KubeconfigError::ReadConfig(io, _) => KubeError::KubeconfigUnreadable {
            path: kubeconfig.to_path_buf(),
            detail: io.to_string(),
        },
        other => invalid(error_chain(&other)),
    })?;
    for named in kc.clusters.iter_mut() {
        if let Some(cluster) = named.cluster.as_mut() {
            if let Some(p) = cluster.proxy_url.as_deref().filter(|p| !p.is_empty()) {
                warn!(
                    kubeconfig = %kubeconfig.display(),
                    cluster = %named.name,
                    proxy_url = p,
                    "ignoring proxy-url of the kubeconfig: the plugin talks to the API server directly"
                );
            }
            cluster.proxy_url = Some(PROXY_PLACEHOLDER.to_string());
        }
    }
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(error_chain(&e)))?;
    config.proxy_url = None;
    config.default_retry = false;
    config.connect_timeout = Some(request_timeout);
    if config.cluster_url.scheme_str() != Some("https") {
        return Err(invalid(format!(
            "server {} is not https: the bearer token must not travel in clear text",
            config.cluster_url
        )));
    }
    if config.accept_invalid_certs {
        warn!(
            kubeconfig = %kubeconfig.display(),
            "insecure-skip-tls-verify is set: the API server's certificate is not verified"
        );
    }
    Ok(config)
}

/// Blocking pod lookup: builds a current-thread tokio runtime on the calling thread, creates the kube client
/// inside it and GETs `namespace/name` per `policy`. Connections are made from the calling thread (and so in its
/// network namespace). Must not be called from within a tokio runtime (use [`get_pod`] there).
pub fn get_pod_blocking(
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    policy: &LookupPolicy,
) -> Result<Pod, KubeError> {
    validate_pod_ref(namespace, name)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(KubeError::Runtime)?;
    rt.block_on(get_pod(kubeconfig, namespace, name, policy))
}

/// The async lookup behind [`get_pod_blocking`], for callers that already run a tokio runtime.
pub async fn get_pod(
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    policy: &LookupPolicy,
) -> Result<Pod, KubeError> {
    let start = Instant::now();
    validate_pod_ref(namespace, name)?;
    let span = info_span!("pod_lookup", namespace, pod = name);
    let _enter = span.enter();

    let config = load_config(kubeconfig, policy.request_timeout).await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| KubeError::KubeconfigInvalid {
        path: kubeconfig.to_path_buf(),
        detail: format!("cannot build the client: {}", error_chain(&e)),
    })?;
    let ctx = AttemptCtx {
        client: &client,
        namespace,
        name,
        server: &server,
        kubeconfig,
    };

    let mut attempt: u32 = 0;
    // The error of the attempt before, reported instead of a last attempt that the deadline cut short (that
    // timeout says nothing about the server).
    let mut previous: Option<KubeError> = None;
    loop {
        attempt += 1;
        let remaining = policy.deadline.saturating_sub(start.elapsed());
        let timeout = policy.request_timeout.min(remaining);
        debug!(attempt, timeout_ms = timeout.as_millis() as u64, "GET pod");
        let (result, retry_after) = ctx.attempt(timeout).await;
        let err = match result {
            Ok(pod) => {
                debug!(attempt, "got pod");
                return Ok(pod);
            }
            Err(e) => e,
        };
        if !err.is_transient() {
            warn!(attempt, error = %err, "pod lookup failed (not retried)");
            return Err(err);
        }
        let remaining = policy.deadline.saturating_sub(start.elapsed());
        let delay = jitter(policy.backoff(attempt), attempt)
            .max(retry_after.unwrap_or_default())
            .min(remaining);
        if remaining.is_zero() || delay >= remaining {
            let cut_short =
                matches!(err, KubeError::Timeout { timeout: t, .. } if t < policy.request_timeout);
            let last = match previous {
                Some(p) if cut_short => p,
                _ => err,
            };
            let e = KubeError::DeadlineExceeded {
                pod: format!("{namespace}/{name}"),
                attempts: attempt,
                elapsed: start.elapsed(),
                deadline: policy.deadline,
                last: Box::new(last),
            };
            warn!(attempt, error = %e, "pod lookup failed");
            return Err(e);
        }
        warn!(
            attempt,
            error = %err,
            retry_in_ms = delay.as_millis() as u64,
            "pod lookup failed, retrying"
        );
        previous = Some(err);
        tokio::time::sleep(delay).await;
    }
}

/// Takes up to a quarter off `d`, so that many plugins started together do not retry in lockstep.
fn jitter(d: Duration, attempt: u32) -> Duration {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempt);
    let quarter = d / 4;
    let nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return d;
    }
    d - Duration::from_nanos(h.finish() % nanos)
}

struct AttemptCtx<'a> {
    client: &'a Client,
    namespace: &'a str,
    name: &'a str,
    server: &'a str,
    kubeconfig: &'a Path,
}

impl AttemptCtx<'_> {
    fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// One GET within `timeout`; also returns the server's `Retry-After`, if any.
    async fn attempt(&self, timeout: Duration) -> (Result<Pod, KubeError>, Option<Duration>) {
        match tokio::time::timeout(timeout, self.send()).await {
            Ok(r) => r,
            Err(_) => (
                Err(KubeError::Timeout {
                    pod: self.pod(),
                    server: self.server.to_string(),
                    timeout,
                }),
                None,
            ),
        }
    }

    async fn send(&self) -> (Result<Pod, KubeError>, Option<Duration>) {
        let path = format!("/api/v1/namespaces/{}/pods", self.namespace);
        // The pod reference was validated before; the builder's own check cannot fail on it.
        let req = match kube::core::Request::new(path).get(self.name, &GetParams::default()) {
            Ok(r) => r.map(Body::from),
            Err(e) => {
                return (
                    Err(KubeError::Client {
                        pod: self.pod(),
                        server: self.server.to_string(),
                        kubeconfig: self.kubeconfig.to_path_buf(),
                        chain: format!("building the request: {}", error_chain(&e)),
                    }),
                    None,
                )
            }
        };
        let res = match self.client.send(req).await {
            Ok(res) => res,
            Err(e) => return (Err(self.transport_error(&e)), None),
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
                    Err(KubeError::Transport {
                        pod: self.pod(),
                        server: self.server.to_string(),
                        chain: format!(
                            "HTTP {status}, then reading the body failed: {}",
                            error_chain(&e)
                        ),
                    }),
                    None,
                )
            }
        };
        let result = interpret_response(
            status,
            &body,
            self.namespace,
            self.name,
            self.server,
            self.kubeconfig,
        );
        (result, retry_after)
    }

    fn transport_error(&self, e: &kube::Error) -> KubeError {
        let chain = error_chain(e);
        match e {
            kube::Error::HyperError(_) | kube::Error::Service(_) => {
                if is_tls_failure(e) {
                    KubeError::Tls {
                        pod: self.pod(),
                        server: self.server.to_string(),
                        kubeconfig: self.kubeconfig.to_path_buf(),
                        chain,
                    }
                } else {
                    KubeError::Transport {
                        pod: self.pod(),
                        server: self.server.to_string(),
                        chain,
                    }
                }
            }
            // Auth layer (token file unreadable, exec plugin failed), request building, ...: configuration
            // problems that a retry will not fix.
            _ => KubeError::Client {
                pod: self.pod(),
                server: self.server.to_string(),
                kubeconfig: self.kubeconfig.to_path_buf(),
                chain,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KC: &str = "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig";

    fn interp(status: u16, body: &str) -> Result<Pod, KubeError> {
        interpret_response(
            status,
            body.as_bytes(),
            "default",
            "web-1",
            "https://10.96.0.1:443/",
            Path::new(KC),
        )
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = LookupPolicy::default();
        let got: Vec<u128> = (1..=8).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(got, vec![50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(p.backoff(0).as_millis(), 50);
        assert_eq!(p.backoff(200), Duration::from_secs(1));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for a in 1..50 {
            let d = Duration::from_millis(400);
            let j = jitter(d, a);
            assert!(j <= d && j >= Duration::from_millis(300), "{j:?}");
        }
        assert_eq!(jitter(Duration::ZERO, 1), Duration::ZERO);
    }

    #[test]
    fn pod_ref_validation() {
        assert!(validate_pod_ref("default", "web-1").is_ok());
        assert!(validate_pod_ref("kube-system", "coredns-5d78c9869d-abcde").is_ok());
        assert!(validate_pod_ref("a", "x.y.z").is_ok());
        for (ns, name) in [
            ("", "a"),
            ("default", ""),
            ("Default", "a"),
            ("default", "A"),
            ("de/fault", "a"),
            ("default", "a/b"),
            ("default", "a?b"),
            ("default", ".."),
            ("default", "a..b"),
            ("-ns", "a"),
            ("ns-", "a"),
            ("ns.x", "a"),
            ("default", "a%2fb"),
        ] {
            let e = validate_pod_ref(ns, name).expect_err(&format!("{ns:?}/{name:?}"));
            assert!(!e.is_transient());
            assert!(e.to_string().contains(&format!("{ns:?}/{name:?}")), "{e}");
        }
        let long_ns = "a".repeat(64);
        assert!(validate_pod_ref(&long_ns, "a").is_err());
        let long_name = format!("{}.{}", "a".repeat(63), "b".repeat(190));
        assert!(validate_pod_ref("a", &long_name).is_err());
    }

    #[test]
    fn ok_pod_is_decoded_and_must_match() {
        let body =
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"default"}}"#;
        let pod = interp(200, body).expect("pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));

        let other =
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-2","namespace":"default"}}"#;
        let e = interp(200, other).expect_err("wrong pod");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("\"default\"/\"web-2\""), "{e}");

        let e = interp(200, "<html>").expect_err("not json");
        assert!(matches!(e, KubeError::BadResponse { .. }), "{e:?}");
        assert!(e.to_string().contains("HTTP 200"), "{e}");
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

    #[test]
    fn deadline_error_keeps_last_cause() {
        let last = interp(503, r#"{"message":"overloaded"}"#).expect_err("503");
        let e = KubeError::DeadlineExceeded {
            pod: "default/web-1".into(),
            attempts: 7,
            elapsed: Duration::from_millis(1003),
            deadline: Duration::from_secs(1),
            last: Box::new(last),
        };
        assert!(e.is_transient());
        assert_eq!(e.http_status(), Some(503));
        let s = e.to_string();
        assert!(
            s.contains("7 attempt(s)") && s.contains("HTTP 503") && s.contains("overloaded"),
            "{s}"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_shows_every_cause_once_and_tls_is_detected() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        let e = Outer(io);
        assert_eq!(
            error_chain(&e),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        assert!(is_tls_failure(&e));
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_tls_failure(&refused));
        let eof = Outer(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        ));
        assert!(!is_tls_failure(&eof));
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("meshcni-kube-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn istio_golden_kubeconfigs_load_without_proxy() {
        // The compat corpus lives next to the repository (`../shared`), as for every golden test.
        let golden =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/compat/istio/install");
        for f in [
            "kubeconfig-tls",
            "kubeconfig-newhost",
            "kubeconfig-skip-tls",
        ] {
            let p = golden.join(f);
            let c = block(load_config(&p, Duration::from_secs(5))).expect(f);
            assert!(c.proxy_url.is_none(), "{f}");
            assert!(!c.default_retry, "{f}");
            assert_eq!(c.connect_timeout, Some(Duration::from_secs(5)));
            assert_eq!(c.cluster_url.scheme_str(), Some("https"));
            assert_eq!(c.accept_invalid_certs, f == "kubeconfig-skip-tls", "{f}");
            assert_eq!(c.root_cert.is_some(), f != "kubeconfig-skip-tls", "{f}");
        }
    }

    #[test]
    fn kubeconfig_proxy_url_is_ignored_and_json_accepted() {
        let d = tempdir("proxy");
        let json = r#"{"apiVersion":"v1","kind":"Config","current-context":"c",
            "clusters":[{"name":"l","cluster":{"server":"https://127.0.0.1:6443","proxy-url":"http://proxy:3128",
              "insecure-skip-tls-verify":true}}],
            "contexts":[{"name":"c","context":{"cluster":"l","user":"u"}}],
            "users":[{"name":"u","user":{"token":"t"}}]}"#;
        let p = write(&d, "kc.json", json);
        let c = block(load_config(&p, Duration::from_secs(1))).expect("json kubeconfig");
        assert!(c.proxy_url.is_none());
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:6443/");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_kubeconfigs_fail_naming_the_file() {
        let d = tempdir("bad");
        let missing = d.join("nope");
        let e = block(load_config(&missing, Duration::from_secs(1))).expect_err("missing");
        assert!(matches!(e, KubeError::KubeconfigUnreadable { .. }), "{e:?}");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        assert!(!e.is_transient());

        let cases = [
            ("empty", ""),
            ("garbage", "{{{ not yaml"),
            ("nocontext", "apiVersion: v1\nkind: Config\nclusters: []\n"),
            (
                "http",
                "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: l\n  cluster:\n    server: \
                 http://127.0.0.1:8080\ncontexts:\n- name: c\n  context:\n    cluster: l\n    user: u\nusers:\n- \
                 name: u\n  user:\n    token: t\n",
            ),
            (
                "badca",
                "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: l\n  cluster:\n    server: \
                 https://127.0.0.1:6443\n    certificate-authority-data: '!!!notbase64'\ncontexts:\n- name: c\n  \
                 context:\n    cluster: l\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
            ),
        ];
        for (name, text) in cases {
            let p = write(&d, name, text);
            let e = block(load_config(&p, Duration::from_secs(1))).expect_err(name);
            assert!(
                matches!(e, KubeError::KubeconfigInvalid { .. }),
                "{name}: {e:?}"
            );
            assert!(
                e.to_string().contains(&p.display().to_string()),
                "{name}: {e}"
            );
            assert!(!e.is_transient(), "{name}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
