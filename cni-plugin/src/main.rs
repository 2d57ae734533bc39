//! `istio-cni`: the edge. Reads the environment and stdin, runs the plugin, prints the answer or a CNI error on
//! stdout (nothing else ever goes to stdout), and exits non-zero on failure. Logs go to stderr as JSON.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cni_plugin::cni::{codes, Request};
use cni_plugin::config::{LogLevel, PluginConfig};
use cni_plugin::error::PluginError;
use cni_plugin::plugin;
use cni_plugin::report::{self, BufferLayer, LogBuffer, SendError};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A CNI call lives a few milliseconds: allocations are pointer bumps, returned when the process exits.
#[global_allocator]
static ALLOCATOR: cni_plugin::arena::Arena = cni_plugin::arena::Arena::new();

/// JSON lines on stderr (the runtime's log), and the same events kept for the agent's log socket.
fn init_logging(level: LogLevel, buffer: Arc<LogBuffer>) {
    let filter = level.filter();
    let stderr = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(cni_plugin::redact::Redacted(std::io::stderr));
    // Ignore the error: a subscriber may only be set once per process, and logging must never fail the plugin.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(BufferLayer::new(buffer))
        .try_init();
}

/// Sends the kept lines to the agent, if it listens; a failure is only logged (on stderr, nothing else listens
/// by then).
fn flush_to_agent(buffer: &LogBuffer) {
    let Some(run_dir) = buffer.run_dir() else {
        return;
    };
    match report::send(&run_dir, &buffer.take(), report::DEADLINE) {
        Ok(delivery) => tracing::debug!(?delivery, "plugin logs sent to the agent"),
        Err(e @ SendError::NoSocket { .. }) => {
            tracing::debug!(error = %e, "no agent to send the plugin logs to")
        }
        Err(e) => tracing::warn!(error = %e, "plugin logs not delivered to the agent"),
    }
}

/// Prints `v` as one line on stdout. An error's text may quote an API server's answer: it is scrubbed of the
/// kubeconfig's token (the runtime logs it and shows it in the pod's events).
fn print_json(v: &serde_json::Value) -> bool {
    let text = v.to_string();
    let text = cni_plugin::redact::scrub(&text);
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).is_ok() && out.write_all(b"\n").is_ok() && out.flush().is_ok()
}

fn run(
    started: Instant,
    buffer: &Arc<LogBuffer>,
) -> (Result<Option<serde_json::Value>, PluginError>, String) {
    let req = match Request::from_process() {
        Ok(r) => r,
        Err(e) => return (Err(e.into()), "1.1.0".to_string()),
    };
    let version = req
        .conf
        .as_ref()
        .map(|c| c.cni_version.as_str())
        .unwrap_or("1.1.0")
        .to_string();
    let init = |cfg: &PluginConfig| {
        init_logging(cfg.log_level, buffer.clone());
        buffer.set_run_dir(cfg.agent_run_dir.clone());
    };
    (plugin::execute(&req, started, init), version)
}

fn main() -> ExitCode {
    let started = Instant::now();
    if std::env::args().nth(1).as_deref() == Some("--version") {
        // Not the CNI protocol (a runtime never passes arguments): for `node-agent status` and people.
        println!("istio-cni (meshcni) {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let buffer = LogBuffer::new();
    // The default hook prints to stderr only; keep it so the panic location is in the runtime's logs.
    let (result, version) = match plugin::catch_panic(|| run(started, &buffer)) {
        Ok(r) => r,
        Err(e) => (Err(e), "1.1.0".to_string()),
    };
    if let Err(e @ PluginError::Panic(_)) = &result {
        // Other errors were logged in the invocation's span.
        plugin::log_error(e);
    }
    flush_to_agent(&buffer);
    match result {
        Ok(Some(answer)) => {
            if print_json(&answer) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let cni = e.to_cni();
            if cni.code == codes::INTERNAL {
                eprintln!("istio-cni: {cni}");
            }
            print_json(&cni.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
