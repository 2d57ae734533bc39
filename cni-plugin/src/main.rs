//! `istio-cni`: the edge. Reads the environment and stdin, runs the plugin, prints the answer or a CNI error on
//! stdout (nothing else ever goes to stdout), and exits non-zero on failure. Logs go to stderr as JSON.

use std::io::Write;
use std::process::ExitCode;

use cni_plugin::cni::{codes, Request};
use cni_plugin::config::LogLevel;
use cni_plugin::error::PluginError;
use cni_plugin::plugin;

fn init_logging(level: LogLevel) {
    let filter = tracing_subscriber::EnvFilter::new(level.directive());
    // Ignore the error: a subscriber may only be set once per process, and logging must never fail the plugin.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn print_json(v: &serde_json::Value) -> bool {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v).is_ok()
        && out.write_all(b"\n").is_ok()
        && out.flush().is_ok()
}

fn run() -> (Result<Option<serde_json::Value>, PluginError>, String) {
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
    (plugin::execute(&req, init_logging), version)
}

fn main() -> ExitCode {
    // The default hook prints to stderr only; keep it so the panic location is in the runtime's logs.
    let (result, version) = match plugin::catch_panic(run) {
        Ok(r) => r,
        Err(e) => (Err(e), "1.1.0".to_string()),
    };
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
            tracing::error!(code = cni.code, error = %cni.msg, details = %cni.details, "istio-cni failed");
            if cni.code == codes::INTERNAL {
                eprintln!("istio-cni: {cni}");
            }
            print_json(&cni.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
