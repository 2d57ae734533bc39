//! The plugin's pod lookup: one HTTPS GET of the Pod from the API server named in the plugin's kubeconfig, with a
//! bounded retry policy, returning the [`PodInfo`] the decision needs. [`PodInfo`] and [`PodRef`] are serde types
//! so that another source of pods (the node agent's cache) can answer with the same values.
//!
//! Istio's plugin retries every error 30 times, one second apart. We are stricter and faster:
//!
//! * **Transient** errors are retried with exponential backoff (default 50 ms doubling to 1 s, with a little
//!   jitter) until the caller's deadline: connection refused/reset/aborted, a connection closed before the answer
//!   (also a TLS handshake the server abandons half-way), a request that got no answer within the per-request
//!   timeout, HTTP 5xx, 429 (honouring `Retry-After`) and 408.
//! * **Permanent** errors fail at once: 404 (the pod is gone), 401/403 (the token or RBAC is wrong; retrying only
//!   hammers the API server), any other 4xx, a missing/unreadable/invalid kubeconfig, an invalid namespace or pod
//!   name, a Pod object that does not decode or is not the one asked for (another namespace or name, or another
//!   UID than the runtime's `K8S_POD_UID`: a pod recreated under the same name), and **TLS verification failures** (unknown
//!   CA, expired or not-yet-valid certificate, wrong name): a CA mismatch does not fix itself within a CNI call's
//!   deadline, and hiding it behind 30 s of retries only delays the diagnosis. It is reported with the whole error
//!   chain so the real cause is visible (kube itself shows only "client error (Connect)").
//! * On the deadline the last error is returned ([`LookupErrorKind::DeadlineExceeded`]); we never fail open. (When
//!   the deadline cut the last attempt short, the error of the attempt before it is reported: it says more.) The
//!   deadline, not the backoff, ends the retries: a backoff that would start the next attempt too late to get an
//!   answer is shortened so that it still has [`FINAL_ATTEMPT`] (a server that recovers just before the deadline
//!   is still found); only a server's `Retry-After` beyond that makes the lookup give up earlier.
//!
//! Proxies are never used: a container runtime's `HTTPS_PROXY`/`https_proxy` leaks into the plugin's environment
//! and would send the service-account token to a proxy (or break the lookup). A `proxy-url` in the kubeconfig is
//! ignored too (with a warning). The API server must be reached over `https`: the kubeconfig carries a bearer
//! token, which must never travel in clear text.
//!
//! Files: this one the policy and the retry loop; [`kubeconfig`] the kube `Config`; `https` the plugin's own GET
//! and the classification of its failures; `client` kube's client, for kubeconfigs that need it; [`response`]
//! what an answer means; [`error`] the error type.

pub mod agent;
mod client;
pub mod error;
mod https;
pub mod kubeconfig;
pub mod response;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info_span, warn};

pub use error::{LookupError, LookupErrorKind};

use crate::pod::PodInfo;
use client::ApiClient;

/// Default overall deadline of a lookup (all attempts and backoff included).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Default delay before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Default cap of the delay between two attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Default timeout of one request (connect, TLS, request and whole response), never beyond the deadline.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time an attempt is given before the deadline: a retry is never started later than this before it.
pub const FINAL_ATTEMPT: Duration = Duration::from_millis(100);

/// The pod to look up: `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`, not trusted to be well-formed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Checks the namespace (DNS-1123 label) and the pod name (DNS-1123 subdomain) before they become a URL path.
    /// The reason when not.
    pub fn validate(&self) -> Result<(), &'static str> {
        let (namespace, name) = (self.namespace.as_str(), self.name.as_str());
        if namespace.is_empty() {
            return Err("empty namespace");
        }
        if namespace.len() > 63 || !is_dns1123_label(namespace) {
            return Err(
                "namespace is not a DNS-1123 label (lowercase alphanumerics and '-', at most 63)",
            );
        }
        if name.is_empty() {
            return Err("empty pod name");
        }
        if name.len() > 253 || !name.split('.').all(is_dns1123_label) {
            return Err(
                "pod name is not a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.', at most 253)",
            );
        }
        Ok(())
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
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

/// Blocking pod lookup (the error is boxed: it is large and rare): reads the kubeconfig and GETs the pod per
/// `policy`, from the calling thread (and so in its network namespace). `uid` is the pod's UID as the runtime
/// knows it (`K8S_POD_UID`), when it passed one: a pod of that name with another UID is refused.
///
/// The GET is the plugin's own lean one (`lookup/https.rs`) for every kubeconfig it serves; one that needs more
/// (an exec plugin, ...) is served by kube's client on a current-thread tokio runtime made here. Must not be called
/// from within a tokio runtime.
pub fn pod(
    kubeconfig: &Path,
    pod: &PodRef,
    uid: Option<&str>,
    policy: &LookupPolicy,
) -> Result<PodInfo, Box<LookupError>> {
    let start = Instant::now();
    let fail = |kind| error(pod, "", kubeconfig, kind);
    pod.validate()
        .map_err(|reason| fail(LookupErrorKind::InvalidPodRef { reason }))?;
    let span = info_span!("pod_lookup", namespace = %pod.namespace, pod = %pod.name);
    let _enter = span.enter();

    let config = match kubeconfig::agent_written(kubeconfig, policy.request_timeout) {
        Some(config) => config,
        None => kubeconfig::load_config(kubeconfig, policy.request_timeout).map_err(fail)?,
    };
    let server = config.cluster_url.to_string();
    let fail = |kind| error(pod, &server, kubeconfig, kind);
    match https::Endpoint::from_config(&config).map_err(fail)? {
        Ok(endpoint) => {
            let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
            retry(policy, start, fail, |timeout| {
                match endpoint.get(&path, timeout) {
                    Ok(a) => (
                        response::interpret(a.status, &a.body, pod, uid),
                        a.retry_after,
                    ),
                    Err(kind) => (Err(kind), None),
                }
            })
        }
        Err(reason) => {
            debug!(reason, "the kubeconfig needs kube's client");
            let rt = client::runtime().map_err(|e| fail(LookupErrorKind::Runtime(e)))?;
            let client = {
                let _in_runtime = rt.enter();
                ApiClient::new(config).map_err(fail)?
            };
            retry(policy, start, fail, |timeout| {
                rt.block_on(client.get(pod, uid, timeout))
            })
        }
    }
}

/// The retry loop of [`pod()`] around `attempt_once` (one GET within the timeout it is given; its result and the
/// server's `Retry-After`), the lookup having started at `start`.
fn retry(
    policy: &LookupPolicy,
    start: Instant,
    fail: impl Fn(LookupErrorKind) -> Box<LookupError>,
    mut attempt_once: impl FnMut(Duration) -> (Result<PodInfo, LookupErrorKind>, Option<Duration>),
) -> Result<PodInfo, Box<LookupError>> {
    let mut attempt: u32 = 0;
    // The error of the attempt before, reported instead of a last attempt that the deadline cut short (that
    // timeout says nothing about the server).
    let mut previous: Option<LookupErrorKind> = None;
    loop {
        attempt += 1;
        let remaining = policy.deadline.saturating_sub(start.elapsed());
        let timeout = policy.request_timeout.min(remaining);
        debug!(attempt, timeout_ms = timeout.as_millis() as u64, "GET pod");
        let (result, retry_after) = attempt_once(timeout);
        let err = match result {
            Ok(info) => {
                debug!(attempt, "got pod");
                return Ok(info);
            }
            Err(kind) => fail(kind),
        };
        if !err.is_transient() {
            warn!(attempt, error = %err, "pod lookup failed (not retried)");
            return Err(err);
        }
        let remaining = policy.deadline.saturating_sub(start.elapsed());
        let next = next_delay(
            remaining,
            jitter(policy.backoff(attempt), attempt),
            retry_after,
        );
        let Some(delay) = next else {
            let cut_short = matches!(err.kind, LookupErrorKind::Timeout { timeout: t } if t < policy.request_timeout);
            let last = match previous {
                Some(p) if cut_short => p,
                _ => err.kind,
            };
            let e = fail(LookupErrorKind::DeadlineExceeded {
                attempts: attempt,
                elapsed: start.elapsed(),
                deadline: policy.deadline,
                last: Box::new(last),
            });
            warn!(attempt, error = %e, "pod lookup failed");
            return Err(e);
        };
        warn!(
            attempt,
            error = %err,
            retry_in_ms = delay.as_millis() as u64,
            "pod lookup failed, retrying"
        );
        previous = Some(err.kind);
        std::thread::sleep(delay);
    }
}

fn error(pod: &PodRef, server: &str, kubeconfig: &Path, kind: LookupErrorKind) -> Box<LookupError> {
    Box::new(LookupError {
        pod: pod.clone(),
        server: server.to_string(),
        kubeconfig: kubeconfig.to_path_buf(),
        kind,
    })
}

/// When to make the next attempt after a transient failure, `remaining` before the deadline: after `backoff` (or
/// the server's `Retry-After`, when longer), but early enough that the attempt still has [`FINAL_ATTEMPT`] before
/// the deadline. `None`, give up: not even that is left, or the server asked us to wait beyond it.
fn next_delay(
    remaining: Duration,
    backoff: Duration,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let latest = remaining.checked_sub(FINAL_ATTEMPT)?;
    let retry_after = retry_after.unwrap_or_default();
    if retry_after > latest {
        return None;
    }
    Some(backoff.min(latest).max(retry_after))
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn retries_go_on_until_the_deadline() {
        let ms = Duration::from_millis;
        // Plenty of time: the backoff.
        assert_eq!(next_delay(ms(5000), ms(400), None), Some(ms(400)));
        // The backoff would start the attempt too late: shortened, so it still has FINAL_ATTEMPT.
        assert_eq!(next_delay(ms(550), ms(1000), None), Some(ms(450)));
        assert_eq!(next_delay(FINAL_ATTEMPT, ms(50), None), Some(ms(0)));
        // Less than FINAL_ATTEMPT left: give up.
        assert_eq!(next_delay(ms(99), ms(50), None), None);
        assert_eq!(next_delay(ms(0), ms(50), None), None);
        // Retry-After: honoured when it fits, else give up rather than come back earlier than asked.
        assert_eq!(next_delay(ms(5000), ms(50), Some(ms(2000))), Some(ms(2000)));
        assert_eq!(next_delay(ms(5000), ms(50), Some(ms(4900))), Some(ms(4900)));
        assert_eq!(next_delay(ms(5000), ms(50), Some(ms(4901))), None);
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
        for (ns, name) in [
            ("default", "web-1"),
            ("kube-system", "coredns-5d78c9869d-abcde"),
            ("a", "x.y.z"),
        ] {
            assert_eq!(PodRef::new(ns, name).validate(), Ok(()), "{ns}/{name}");
        }
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
            let p = PodRef::new(ns, name);
            let reason = p.validate().expect_err(&format!("{ns:?}/{name:?}"));
            let e = error(
                &p,
                "",
                Path::new("/kc"),
                LookupErrorKind::InvalidPodRef { reason },
            );
            assert!(!e.is_transient());
            let s = e.to_string();
            assert!(
                s.contains(&format!("{ns:?}/{name:?}")) && s.contains(reason),
                "{s}"
            );
        }
        let long_ns = "a".repeat(64);
        assert!(PodRef::new(long_ns, "a").validate().is_err());
        let long_name = format!("{}.{}", "a".repeat(63), "b".repeat(190));
        assert!(PodRef::new("a", long_name).validate().is_err());
    }

    /// An invalid reference fails before any file is read or runtime is made.
    #[test]
    fn invalid_pod_ref_fails_before_the_kubeconfig_is_read() {
        let e = pod(
            Path::new("/nonexistent/kubeconfig"),
            &PodRef::new("default", "a/b"),
            None,
            &LookupPolicy::default(),
        )
        .expect_err("invalid");
        assert!(
            matches!(e.kind, LookupErrorKind::InvalidPodRef { .. }),
            "{e:?}"
        );
        assert_eq!(e.server, "");
    }
}
