//! The plugin's report to the node agent, in Istio's protocol: the plugin's log lines, sent once at the end of an
//! invocation as `POST /log` on `<cni_agent_run_dir>/log.sock`, the body a JSON array of strings, each string one
//! JSON log line `{"level":"info","time":"2026-01-02T03:04:05.123456Z","msg":"...", ...fields}` (Istio's zap
//! encoding: lowercase level, RFC 3339 UTC time with microseconds, the fields flat beside them). Istio's agent
//! re-logs each line with its fields; ours does too and also recognises one line of ours, the ADD record
//! ([`ADD_RECORD`]), from which it counts decisions and latencies.
//!
//! - [`LogLine`], [`parse_body`], [`encode_body`]: the wire format (pure), shared with the agent.
//! - [`AddRecord`]: the final line of an ADD: outcome, reason, backend, latency.
//! - [`layer`]: the `tracing` layer that buffers the plugin's events as such lines.
//! - [`send`]: the delivery, bounded by a deadline of a few ms: the ADD never waits for the agent.

pub mod layer;
pub mod send;

use std::time::Duration;

use serde_json::{Map, Value};

pub use layer::{BufferLayer, LogBuffer};
pub use send::{send, Delivery, SendError};

/// The socket's name in the agent's run dir (Istio's `constants.LogUDSSocketName`).
pub const SOCKET_NAME: &str = "log.sock";
/// The HTTP path (Istio's `constants.UDSLogPath`).
pub const LOG_PATH: &str = "/log";
/// The `msg` of the ADD record.
pub const ADD_RECORD: &str = "meshcni.add";
/// How long the plugin spends on the delivery, connect to answer, at most.
pub const DEADLINE: Duration = Duration::from_millis(5);

/// Keys of a line that are not fields.
const LEVEL: &str = "level";
const TIME: &str = "time";
const MSG: &str = "msg";

/// A log level of the protocol: the four Istio's agent re-logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// zap's lowercase names; its levels above error (dpanic, panic, fatal) are errors here.
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "debug" | "trace" => Some(Level::Debug),
            "info" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warn),
            "error" | "dpanic" | "panic" | "fatal" => Some(Level::Error),
            _ => None,
        }
    }
}

impl From<tracing::Level> for Level {
    fn from(l: tracing::Level) -> Self {
        match l {
            tracing::Level::TRACE | tracing::Level::DEBUG => Level::Debug,
            tracing::Level::INFO => Level::Info,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::ERROR => Level::Error,
        }
    }
}

/// One log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    /// RFC 3339, as the sender wrote it.
    pub time: String,
    pub msg: String,
    /// Everything else, as sent.
    pub fields: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("log line is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("log line is not a JSON object: {0:.80}")]
    NotObject(String),
    #[error("log line has no string {key:?}: {line:.80}")]
    Missing { key: &'static str, line: String },
    #[error("log line has level {0:?}, not one of debug, info, warn, error")]
    Level(String),
}

#[derive(Debug, thiserror::Error)]
#[error("log report is not a JSON array of strings: {0}")]
pub struct BodyError(#[source] pub serde_json::Error);

/// The time now as Istio writes it: UTC, microseconds, `Z`.
pub fn now() -> String {
    format!("{:.6}", jiff::Timestamp::now())
}

impl LogLine {
    pub fn new(level: Level, msg: impl Into<String>) -> Self {
        LogLine {
            level,
            time: now(),
            msg: msg.into(),
            fields: Map::new(),
        }
    }

    /// Parses one line as Istio's agent does: `level`, `time` and `msg` strings are required (a line without them
    /// is dropped); the message is trimmed; every other key is a field.
    pub fn parse(line: &str) -> Result<LogLine, LineError> {
        let value: Value = serde_json::from_str(line).map_err(LineError::NotJson)?;
        let Value::Object(mut map) = value else {
            return Err(LineError::NotObject(line.to_string()));
        };
        let mut take = |key: &'static str| match map.remove(key) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(LineError::Missing {
                key,
                line: line.trim().to_string(),
            }),
        };
        let level = take(LEVEL)?;
        let time = take(TIME)?;
        let msg = take(MSG)?;
        let level = Level::parse(&level).ok_or(LineError::Level(level))?;
        Ok(LogLine {
            level,
            time,
            msg: msg.trim().to_string(),
            fields: map,
        })
    }

    /// The line as Istio's encoder writes it: level, time, msg first, then the fields (a field named like one of
    /// those three is written as `field.<name>`, so it cannot hide them). No trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(96 + self.msg.len());
        out.push('{');
        let mut put = |key: &str, value: &Value| {
            if out.len() > 1 {
                out.push(',');
            }
            // Display of a JSON value is its compact JSON and cannot fail.
            out.push_str(&Value::String(key.to_string()).to_string());
            out.push(':');
            out.push_str(&value.to_string());
        };
        put(LEVEL, &Value::String(self.level.as_str().into()));
        put(TIME, &Value::String(self.time.clone()));
        put(MSG, &Value::String(self.msg.clone()));
        for (k, v) in &self.fields {
            if matches!(k.as_str(), LEVEL | TIME | MSG) {
                put(&format!("field.{k}"), v);
            } else {
                put(k, v);
            }
        }
        out.push('}');
        out
    }

    /// A string field, when present.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }
}

/// Parses a request body: the array must parse (else nothing does); each line on its own.
pub fn parse_body(body: &[u8]) -> Result<Vec<Result<LogLine, LineError>>, BodyError> {
    let lines: Vec<String> = serde_json::from_slice(body).map_err(BodyError)?;
    Ok(lines.iter().map(|l| LogLine::parse(l)).collect())
}

/// The request body for `lines` (each already one JSON line).
pub fn encode_body(lines: &[String]) -> Vec<u8> {
    // A Vec of strings always serialises.
    serde_json::to_vec(lines).unwrap_or_else(|_| b"[]".to_vec())
}

/// What an ADD decided, in the words of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Redirected,
    Skipped,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Redirected => "redirected",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "redirected" => Some(Outcome::Redirected),
            "skipped" => Some(Outcome::Skipped),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// The backend label of an ADD that programmed nothing.
pub const NO_BACKEND: &str = "none";

/// The final line of an ADD, fields `outcome`, `reason`, `backend`, `latency_seconds`, `detail`, beside the
/// pod's fields (`namespace`, `pod`, `container_id`) of the invocation's span.
#[derive(Debug, Clone, PartialEq)]
pub struct AddRecord {
    pub outcome: Outcome,
    /// A short snake_case label: why skipped, or the CNI error code's name; empty when redirected.
    pub reason: String,
    /// The backend that programmed the rules, or [`NO_BACKEND`].
    pub backend: String,
    /// From the plugin's start to the decision's end.
    pub latency: Duration,
    /// For a person: the skip reason or the error message.
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{ADD_RECORD} record has no valid {key:?}: {value}")]
    Field { key: &'static str, value: String },
}

impl AddRecord {
    /// Logs the record (at info, so it is sent at every plugin log level but `none`).
    pub fn emit(&self) {
        tracing::info!(
            outcome = self.outcome.as_str(),
            reason = %self.reason,
            backend = %self.backend,
            latency_seconds = self.latency.as_secs_f64(),
            detail = %self.detail,
            "meshcni.add"
        );
    }

    /// The record in `line`: `None` when the line is not one, an error when it is one but malformed.
    pub fn from_line(line: &LogLine) -> Option<Result<AddRecord, RecordError>> {
        if line.msg != ADD_RECORD {
            return None;
        }
        let bad = |key: &'static str| RecordError::Field {
            key,
            value: line
                .fields
                .get(key)
                .map(Value::to_string)
                .unwrap_or_else(|| "missing".into()),
        };
        let parsed = (|| {
            let outcome = line
                .str_field("outcome")
                .and_then(Outcome::parse)
                .ok_or_else(|| bad("outcome"))?;
            let reason = line.str_field("reason").ok_or_else(|| bad("reason"))?;
            let backend = line.str_field("backend").ok_or_else(|| bad("backend"))?;
            let latency = line
                .fields
                .get("latency_seconds")
                .and_then(Value::as_f64)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| bad("latency_seconds"))?;
            Ok(AddRecord {
                outcome,
                reason: reason.to_string(),
                backend: backend.to_string(),
                latency,
                detail: line.str_field("detail").unwrap_or_default().to_string(),
            })
        })();
        Some(parsed)
    }
}

#[cfg(test)]
pub(crate) mod tests;
