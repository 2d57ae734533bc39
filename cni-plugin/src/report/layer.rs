//! A `tracing` layer that keeps every event the plugin logs (after the level filter) as one line of the protocol,
//! with the fields of its spans (the invocation's `namespace`, `pod`, `container_id`...) flat beside the event's
//! own, for [`super::send`] at the end of the invocation.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{Level, LogLine};

/// At most this many lines are kept; past it the oldest go (the last lines, the error and the ADD record, matter
/// most).
pub const MAX_LINES: usize = 1000;
/// At most this many bytes of lines are kept.
pub const MAX_BYTES: usize = 512 * 1024;

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<String>,
    bytes: usize,
    dropped: usize,
    run_dir: Option<PathBuf>,
}

/// The lines of one invocation, and where they go (set once the configuration is known).
#[derive(Debug, Default)]
pub struct LogBuffer {
    state: Mutex<State>,
}

impl LogBuffer {
    pub fn new() -> Arc<Self> {
        Arc::new(LogBuffer::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a list of complete strings: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, line: String) {
        let mut st = self.state();
        st.bytes += line.len();
        st.lines.push_back(line);
        while st.lines.len() > MAX_LINES || (st.bytes > MAX_BYTES && st.lines.len() > 1) {
            if let Some(old) = st.lines.pop_front() {
                st.bytes -= old.len();
                st.dropped += 1;
            }
        }
    }

    /// The agent's run dir, from the plugin's configuration.
    pub fn set_run_dir(&self, dir: PathBuf) {
        self.state().run_dir = Some(dir);
    }

    pub fn run_dir(&self) -> Option<PathBuf> {
        self.state().run_dir.clone()
    }

    /// Takes the lines kept so far (and a warning line first when some were dropped).
    pub fn take(&self) -> Vec<String> {
        let mut st = self.state();
        let mut out = Vec::with_capacity(st.lines.len() + 1);
        if st.dropped > 0 {
            let mut l = LogLine::new(Level::Warn, "earlier plugin log lines were dropped");
            l.fields.insert("dropped".into(), st.dropped.into());
            out.push(l.to_json());
        }
        out.extend(st.lines.drain(..));
        st.bytes = 0;
        st.dropped = 0;
        out
    }
}

/// The layer; add it to the subscriber beside the stderr one.
pub struct BufferLayer {
    buffer: Arc<LogBuffer>,
}

impl BufferLayer {
    pub fn new(buffer: Arc<LogBuffer>) -> Self {
        BufferLayer { buffer }
    }
}

/// A span's fields, kept in its extensions.
struct SpanFields(Map<String, Value>);

/// Collects fields as JSON values; `message` is the event's message.
struct Collect<'a> {
    fields: &'a mut Map<String, Value>,
    message: Option<String>,
}

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.put(field, v);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(crate::error::error_chain(value)));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

impl<S> Layer<S> for BufferLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut Collect {
            fields: &mut fields,
            message: None,
        });
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(&mut Collect {
                fields,
                message: None,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    fields.extend(f.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        let mut collect = Collect {
            fields: &mut fields,
            message: None,
        };
        event.record(&mut collect);
        let msg = collect.message.take().unwrap_or_default();
        let line = LogLine {
            level: (*event.metadata().level()).into(),
            time: super::now(),
            msg,
            fields,
        };
        // Scrubbed here, not only by the stderr writer: these lines go to the agent's log and `node-agent status`.
        self.buffer
            .push(crate::redact::scrub(&line.to_json()).into_owned());
    }
}
