//! The agent's HTTP endpoints: `/healthz` (always 200) and `/readyz` (200 only when the last reconcile found
//! everything in place) on HEALTH_PORT, as Istio's install-cni serves them; Prometheus metrics on MONITORING_PORT with
//! Istio's names (`istio_cni_install_ready`, `istio_cni_installs_total{result}`,
//! `istio_cni_repair_pods_repaired_total{type,result}`) plus a reconcile-duration histogram.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::events::Events;
use crate::pluginlog::AddMetrics;
use crate::status::InstallState;

/// `result` label value of a reconcile that ended with everything in place.
pub const RESULT_SUCCESS: &str = "SUCCESS";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{var}: cannot listen on {addr}: {source}")]
    Bind {
        var: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by the reconcile loop and the servers.
pub struct Shared {
    /// The plugin's ADD metrics, fed by its log socket.
    pub adds: AddMetrics,
    /// Recent ADDs and repair actions, for `node-agent status`.
    pub events: Events,
    install: Mutex<InstallState>,
    ready: AtomicBool,
    install_ready: Gauge,
    /// 1 while another writer keeps reverting our entry; fights started since the agent did.
    fighting: Gauge,
    fights: Counter,
    installs: Family<Vec<(String, String)>, Counter>,
    reconcile_seconds: Histogram,
    /// The pod cache's state, set by the cache itself (see [`crate::podcache::PodCache::with_metrics`]).
    pub pod_cache: crate::podcache::CacheMetrics,
    repairs: Family<Vec<(String, String)>, Counter>,
    registry: Registry,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        let install_ready = Gauge::default();
        let fighting = Gauge::default();
        let fights = Counter::default();
        let installs = Family::<Vec<(String, String)>, Counter>::default();
        // 100 µs .. ~3 s.
        let reconcile_seconds = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ]);
        let mut registry = Registry::default();
        registry.register(
            "istio_cni_install_ready",
            "Whether the CNI plugin installation is ready or not",
            install_ready.clone(),
        );
        registry.register(
            "meshcni_conflist_fight",
            "1 while another writer keeps reverting the istio-cni entry (our rewrites are then rate-limited)",
            fighting.clone(),
        );
        // The encoder appends `_total` to a counter's name.
        registry.register(
            "meshcni_conflist_fights",
            "Fights with another writer of the CNI configuration since the agent started",
            fights.clone(),
        );
        // The encoder appends `_total` to a counter's name.
        registry.register(
            "istio_cni_installs",
            "Total number of CNI plugins installed by the Istio CNI installer",
            installs.clone(),
        );
        registry.register(
            "meshcni_reconcile_duration_seconds",
            "Duration of one reconcile of the node's CNI installation",
            reconcile_seconds.clone(),
        );
        let pod_cache = crate::podcache::CacheMetrics::default();
        registry.register(
            "meshcni_pod_cache_synced",
            "Whether the agent's pod cache has listed every pod of this node (1) or cannot answer (0)",
            pod_cache.synced.clone(),
        );
        registry.register(
            "meshcni_pod_cache_pods",
            "Pods of this node held in the agent's pod cache",
            pod_cache.pods.clone(),
        );
        let repairs = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "istio_cni_repair_pods_repaired",
            "Total number of pods repaired by repair controller",
            repairs.clone(),
        );
        let adds = AddMetrics::register(&mut registry);
        Arc::new(Shared {
            pod_cache,
            adds,
            events: Events::default(),
            install: Mutex::new(InstallState::default()),
            ready: AtomicBool::new(false),
            install_ready,
            fighting,
            fights,
            installs,
            reconcile_seconds,
            repairs,
            registry,
        })
    }

    /// Whether a fight with another writer is on; counts each one that starts.
    pub fn set_fighting(&self, fighting: bool) {
        let was = self.fighting.set(i64::from(fighting));
        if fighting && was == 0 {
            self.fights.inc();
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.install_ready.set(i64::from(ready));
    }

    /// The last reconcile's state, for `node-agent status` (its `since` kept while it does not change).
    pub fn set_install_state(&self, state: InstallState) {
        let mut cur = self.install.lock().unwrap_or_else(|e| e.into_inner());
        *cur = state.after(&cur);
    }

    pub fn install_state(&self) -> InstallState {
        self.install
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn count_install(&self, result: &str) {
        self.installs
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    /// One action of the repair controller: `kind` repair/delete/label, `result` success/skip/fail (Istio's).
    pub fn count_repair(&self, kind: &str, result: &str) {
        self.repairs
            .get_or_create(&vec![
                ("type".to_string(), kind.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
    }

    pub fn observe_reconcile(&self, elapsed: Duration) {
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Health,
    Metrics,
}

fn handle(shared: &Shared, endpoints: Endpoints, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match (endpoints, req.uri().path()) {
        (Endpoints::Health, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        (Endpoints::Health, "/readyz") => {
            let (status, body) = readyz(shared);
            respond(status, "text/plain", body)
        }
        (Endpoints::Metrics, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics_text(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `/readyz`: 200 when the last reconcile found everything in place; else 503 and why, as that reconcile found it
/// (the step, the file, the errno), which is what `kubectl describe pod` shows of a failed readiness probe.
fn readyz(shared: &Shared) -> (StatusCode, String) {
    if shared.is_ready() {
        return (StatusCode::OK, "ready\n".into());
    }
    let detail = shared.install_state().detail;
    let body = if detail.is_empty() {
        "not ready\n".to_string()
    } else {
        format!("not ready: {detail}\n")
    };
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// Binds the listener now (so a port in use stops the agent at start, naming the variable).
pub async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { var, addr, source })
}

/// Serves HTTP/1 on the listener until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, endpoints: Endpoints) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&shared, endpoints, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(60), conn)
                .await
                .unwrap_or(Ok(()))
            {
                tracing::debug!(%peer, error = %e, "connection error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_says_why_not() {
        use crate::install::{Status, Step};
        let s = Shared::new();
        assert_eq!(
            readyz(&s),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
            "before the first reconcile"
        );
        let failed = Status::Failed {
            step: Step::CreateCniConfig,
            error: "cannot write /etc/cni/net.d/10-calico.conflist: write ...: ENOSPC: No space left on device"
                .into(),
        };
        s.set_install_state(InstallState::of(&failed, None));
        let (status, body) = readyz(&s);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "not ready: CREATE_CNI_CONFIG_FAILURE: cannot write /etc/cni/net.d/10-calico.conflist: write ...: \
             ENOSPC: No space left on device\n"
        );
        s.set_ready(true);
        s.set_install_state(InstallState::of(&Status::Ready, None));
        assert_eq!(readyz(&s), (StatusCode::OK, "ready\n".into()));
    }

    #[test]
    fn metric_names_are_istios() {
        let s = Shared::new();
        s.set_ready(true);
        s.count_install(RESULT_SUCCESS);
        s.count_install("CREATE_CNI_CONFIG_FAILURE");
        s.observe_reconcile(Duration::from_micros(300));
        s.count_repair("repair", "success");
        let text = s.metrics_text();
        assert!(
            text.contains(
                "istio_cni_repair_pods_repaired_total{type=\"repair\",result=\"success\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("istio_cni_install_ready 1"), "{text}");
        assert!(
            text.contains("istio_cni_installs_total{result=\"SUCCESS\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("istio_cni_installs_total{result=\"CREATE_CNI_CONFIG_FAILURE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshcni_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        s.set_ready(false);
        assert!(s.metrics_text().contains("istio_cni_install_ready 0"));
    }
}
