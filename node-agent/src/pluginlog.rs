//! The plugin's log socket, `<run_dir>/log.sock`, in Istio's protocol (see `cni_plugin::report`): each line of a
//! `POST /log` is logged again here with the pod it is about (`namespace`, `pod`, `container_id`), so `kubectl logs`
//! of the agent shows why a pod was or was not redirected. An ADD record (`meshcni.add`) also feeds the ADD
//! metrics and the recent-events ring of `node-agent status`.
//!
//! Lines from Istio's plugin are accepted as they are: its pod label is `pod: "<namespace>/<name>"`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cni_plugin::report::{self, AddRecord, Level, LogLine};
use hyper::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::events::AddEvent;
use crate::server::Shared;
use crate::uds::{self, Handler};

/// The largest request accepted (the plugin keeps at most 512 KiB of lines).
pub const MAX_BODY: usize = 4 << 20;
/// The target the plugin's lines are logged under (Istio's scope name).
pub const TARGET: &str = "cni-plugin";

/// ADD latency buckets, seconds: 0.5 ms (a pass-through) .. 30 s (lookups retried up to their deadline).
const ADD_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type Labels = Vec<(String, String)>;

fn add_histogram() -> Histogram {
    Histogram::new(ADD_BUCKETS)
}

/// `meshcni_cni_add_duration_seconds{outcome,backend}` and `meshcni_cni_add_total{outcome,reason}`.
#[derive(Debug, Clone)]
pub struct AddMetrics {
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    total: Family<Labels, Counter>,
}

impl AddMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = AddMetrics {
            duration: Family::new_with_constructor(add_histogram as fn() -> Histogram),
            total: Family::default(),
        };
        registry.register(
            "meshcni_cni_add_duration_seconds",
            "Duration of the plugin's CNI ADD, from its start to its decision, by outcome and backend",
            m.duration.clone(),
        );
        // The encoder appends `_total` to a counter's name.
        registry.register(
            "meshcni_cni_add",
            "CNI ADDs by the plugin's decision: redirected, skipped (by reason) or failed (by CNI error code)",
            m.total.clone(),
        );
        m
    }

    pub fn observe(&self, r: &AddRecord) {
        let outcome = r.outcome.as_str().to_string();
        self.duration
            .get_or_create(&vec![
                ("outcome".into(), outcome.clone()),
                ("backend".into(), r.backend.clone()),
            ])
            .observe(r.latency.as_secs_f64());
        self.total
            .get_or_create(&vec![
                ("outcome".into(), outcome),
                ("reason".into(), r.reason.clone()),
            ])
            .inc();
    }
}

/// The pod a line is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFields {
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
}

impl PodFields {
    /// Ours: `namespace`, `pod`, `container_id`; Istio's: `pod` = `<namespace>/<name>`.
    pub fn of(line: &LogLine) -> Self {
        let mut namespace = line.str_field("namespace").unwrap_or_default().to_string();
        let mut pod = line.str_field("pod").unwrap_or_default().to_string();
        if namespace.is_empty() {
            if let Some((ns, name)) = pod.split_once('/') {
                (namespace, pod) = (ns.to_string(), name.to_string());
            }
        }
        let container_id = line
            .str_field("container_id")
            .or_else(|| line.str_field("containerID"))
            .unwrap_or_default()
            .to_string();
        PodFields {
            namespace,
            pod,
            container_id,
        }
    }
}

/// The line's other fields as `key=value` (strings bare when they need no quotes), sorted by key.
pub fn other_fields(line: &LogLine) -> String {
    let mut out = String::new();
    for (k, v) in &line.fields {
        if matches!(
            k.as_str(),
            "namespace" | "pod" | "container_id" | "containerID"
        ) {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        match v {
            Value::String(s)
                if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"') =>
            {
                out.push_str(s)
            }
            other => out.push_str(&other.to_string()),
        }
    }
    out
}

macro_rules! relog {
    ($level:ident, $line:expr, $pod:expr, $fields:expr) => {
        tracing::$level!(
            target: TARGET,
            namespace = %$pod.namespace,
            pod = %$pod.pod,
            container_id = %$pod.container_id,
            plugin_time = %$line.time,
            fields = %$fields,
            "{}",
            $line.msg
        )
    };
}

/// Logs a plugin line again, at its level, with its pod.
fn relog(line: &LogLine, pod: &PodFields) {
    let fields = other_fields(line);
    match line.level {
        Level::Debug => relog!(debug, line, pod, fields),
        Level::Info => relog!(info, line, pod, fields),
        Level::Warn => relog!(warn, line, pod, fields),
        Level::Error => relog!(error, line, pod, fields),
    }
}

/// What a body held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    pub lines: usize,
    pub malformed: usize,
    pub add_records: usize,
}

/// Logs every line of a body again, counts its ADD records and keeps them as recent events. The body is scrubbed of
/// the secrets the agent knows first (a plugin that is not ours may log what an API server echoed): nothing of it
/// reaches the agent's log or `node-agent status` unscrubbed.
pub fn process(shared: &Shared, body: &[u8]) -> Result<Processed, report::BodyError> {
    let mut done = Processed::default();
    let text = String::from_utf8_lossy(body);
    let body = cni_plugin::redact::scrub(&text);
    for parsed in report::parse_body(body.as_bytes())? {
        let line = match parsed {
            Ok(l) => l,
            Err(e) => {
                done.malformed += 1;
                tracing::debug!(error = %e, "malformed plugin log line dropped");
                continue;
            }
        };
        done.lines += 1;
        let pod = PodFields::of(&line);
        relog(&line, &pod);
        match AddRecord::from_line(&line) {
            None => {}
            Some(Ok(r)) => {
                done.add_records += 1;
                shared.adds.observe(&r);
                shared.events.record_add(AddEvent {
                    at: line.time.clone(),
                    namespace: pod.namespace,
                    pod: pod.pod,
                    container_id: pod.container_id,
                    outcome: r.outcome.as_str().to_string(),
                    reason: r.reason,
                    backend: r.backend,
                    latency_seconds: r.latency.as_secs_f64(),
                    detail: r.detail,
                });
            }
            Some(Err(e)) => tracing::warn!(error = %e, "malformed ADD record from the plugin"),
        }
    }
    Ok(done)
}

/// The socket's path in `run_dir`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(report::SOCKET_NAME)
}

/// The handler of the log socket: `POST /log` (any method, as Istio's agent) -> 200; a body that is not a JSON
/// array of strings -> 400.
pub fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |_method: &Method, path: &str, body: Bytes| {
        if path != report::LOG_PATH {
            return uds::text(StatusCode::NOT_FOUND, "not found\n");
        }
        match process(&shared, &body) {
            Ok(_) => uds::text(StatusCode::OK, ""),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the plugin's log report");
                uds::text(StatusCode::BAD_REQUEST, format!("{e}\n"))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(v: Value) -> LogLine {
        LogLine::parse(&v.to_string()).unwrap()
    }

    #[test]
    fn the_pod_of_our_lines_and_of_istios() {
        let ours = line(serde_json::json!({"level": "info", "time": "t", "msg": "m",
            "namespace": "default", "pod": "web-0", "container_id": "c0ffee"}));
        let want = PodFields {
            namespace: "default".into(),
            pod: "web-0".into(),
            container_id: "c0ffee".into(),
        };
        assert_eq!(PodFields::of(&ours), want);
        let istio = line(
            serde_json::json!({"level": "info", "time": "t", "msg": "m", "pod": "default/web-0"}),
        );
        assert_eq!(
            PodFields::of(&istio),
            PodFields {
                container_id: String::new(),
                ..want
            }
        );
        let none = line(serde_json::json!({"level": "info", "time": "t", "msg": "m"}));
        assert_eq!(PodFields::of(&none), PodFields::default());
    }

    #[test]
    fn other_fields_are_key_value_without_the_pod() {
        let l = line(serde_json::json!({"level": "info", "time": "t", "msg": "m",
            "namespace": "ns", "pod": "p", "reason": "pod has no x", "n": 3, "command": "ADD"}));
        assert_eq!(other_fields(&l), r#"command=ADD n=3 reason="pod has no x""#);
    }

    #[test]
    fn records_are_counted_and_kept_and_other_lines_only_logged() {
        let shared = Shared::new();
        let rec = |outcome: &str, reason: &str, backend: &str, secs: f64| {
            LogLine {
                level: Level::Info,
                time: "2026-01-01T00:00:00.000001Z".into(),
                msg: report::ADD_RECORD.into(),
                fields: serde_json::json!({"namespace": "ns", "pod": "p", "container_id": "c",
                    "outcome": outcome, "reason": reason, "backend": backend,
                    "latency_seconds": secs, "detail": "d"})
                .as_object()
                .cloned()
                .unwrap(),
            }
            .to_json()
        };
        let body = report::encode_body(&[
            LogLine::new(Level::Info, "no redirect").to_json(),
            rec("skipped", "no_sidecar_status", "none", 0.0021),
            rec("redirected", "", "iptables-legacy", 0.004),
            rec("failed", "pod_lookup", "none", 0.3),
            rec("skipped", "no_sidecar_status", "none", 0.0001),
            "garbage".into(),
        ]);
        let done = process(&shared, &body).unwrap();
        assert_eq!(
            done,
            Processed {
                lines: 5,
                malformed: 1,
                add_records: 4
            }
        );
        let text = shared.metrics_text();
        for want in [
            r#"meshcni_cni_add_total{outcome="skipped",reason="no_sidecar_status"} 2"#,
            r#"meshcni_cni_add_total{outcome="redirected",reason=""} 1"#,
            r#"meshcni_cni_add_total{outcome="failed",reason="pod_lookup"} 1"#,
            r#"meshcni_cni_add_duration_seconds_count{outcome="skipped",backend="none"} 2"#,
            r#"meshcni_cni_add_duration_seconds_bucket{le="0.0005",outcome="skipped",backend="none"} 1"#,
            r#"meshcni_cni_add_duration_seconds_bucket{le="0.005",outcome="redirected",backend="iptables-legacy"} 1"#,
            r#"meshcni_cni_add_duration_seconds_bucket{le="0.25",outcome="failed",backend="none"} 0"#,
            "# TYPE meshcni_cni_add_duration_seconds histogram",
            "# TYPE meshcni_cni_add counter",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        let adds = shared.events.adds(10);
        assert_eq!(adds.len(), 4);
        assert_eq!(
            (adds[0].outcome.as_str(), adds[0].pod.as_str()),
            ("skipped", "p")
        );
        assert_eq!(adds[1].reason, "pod_lookup");
        assert_eq!(
            Duration::from_secs_f64(adds[2].latency_seconds),
            Duration::from_millis(4)
        );
        assert!(process(&shared, b"{\"not\":\"an array\"}").is_err());
    }
}
