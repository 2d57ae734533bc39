//! The agent's loop: reconcile, publish readiness and metrics, then wait for a relevant inotify event, a timer
//! (retry, back-off end, periodic resync) or SIGTERM/SIGINT, which removes everything of ours before exiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, HEALTH_PORT, MONITORING_PORT};
use crate::install::{InstallError, Installer, Status};
use crate::server::{self, Endpoints, ServerError, Shared, RESULT_SUCCESS};
use crate::watch::{self, Filter, Target, WatchError, Watcher};

/// A reconcile runs at least this often, events or not (a safety net for anything inotify cannot report).
pub const RESYNC: Duration = Duration::from_secs(60);
/// First retry delay after a failed reconcile; doubles up to `MAX_RETRY`.
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cleanup on shutdown failed: {0}")]
    Cleanup(#[source] InstallError),
}

fn watch_targets(cfg: &Config) -> Vec<(std::path::PathBuf, Target)> {
    let mut targets = vec![
        (cfg.conf_dir.clone(), Target::ConfDir),
        (cfg.bin_dir.clone(), Target::BinDir),
        (cfg.run_dir.clone(), Target::RunDir),
        (cfg.service_account_dir.clone(), Target::ServiceAccount),
    ];
    if !cfg.skip_tls_verify && !cfg.ca_file.starts_with(&cfg.service_account_dir) {
        if let Some(dir) = watch::parent_dir(&cfg.ca_file) {
            targets.push((dir, Target::CaDir));
        }
    }
    targets
}

/// Runs until SIGTERM/SIGINT; then cleans up. Errors at start (a port in use, a directory that cannot be watched)
/// are returned before anything is written.
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    let shared = Shared::new();
    let mut listeners = Vec::new();
    if cfg.health_port != 0 {
        let addr = SocketAddr::new(cfg.bind_address, cfg.health_port);
        listeners.push((server::bind(HEALTH_PORT, addr).await?, Endpoints::Health));
    }
    if cfg.monitoring_port != 0 {
        let addr = SocketAddr::new(cfg.bind_address, cfg.monitoring_port);
        listeners.push((
            server::bind(MONITORING_PORT, addr).await?,
            Endpoints::Metrics,
        ));
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| AgentError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| AgentError::Signal {
        signal: "SIGINT",
        source,
    })?;

    let mut installer = Installer::new(cfg.clone())?;
    let filter = Filter {
        binaries: installer.binary_names(),
        kubeconfig: cni_plugin::config::KUBECONFIG_NAME.to_string(),
        ca_file: cfg
            .ca_file
            .file_name()
            .and_then(|n| n.to_str())
            .map(String::from),
    };
    // The watch starts before the first reconcile, so no change after the reconcile's reads is missed.
    let mut watcher = Watcher::new(&watch_targets(&cfg), filter)?;
    for (listener, endpoints) in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, ?endpoints, "serving");
        }
        tokio::spawn(server::serve(listener, shared.clone(), endpoints));
    }
    tracing::info!(
        conf_dir = %cfg.conf_dir.display(),
        bin_dir = %cfg.bin_dir.display(),
        run_dir = %cfg.run_dir.display(),
        chained = cfg.chained,
        node = %cfg.node_name,
        "node agent started"
    );

    let mut retry = FIRST_RETRY;
    let mut last_status: Option<Status> = None;
    loop {
        if !watcher.is_complete() {
            if let Err(e) = watcher.rewatch() {
                tracing::warn!(error = %e, "cannot re-establish a watch; retrying");
            }
        }
        let next = reconcile_once(&mut installer, &shared, &mut last_status, &mut retry);
        let wake = if watcher.is_complete() {
            next
        } else {
            next.min(Instant::now() + FIRST_RETRY)
        };
        tokio::select! {
            change = watcher.next_change() => {
                let change = change?;
                tracing::debug!(targets = ?change.targets, overflow = change.overflow, "change detected");
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = sigterm.recv() => { tracing::info!("SIGTERM: cleaning up"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: cleaning up"); break; }
        }
    }
    shared.set_ready(false);
    installer.cleanup().map_err(AgentError::Cleanup)?;
    tracing::info!("cleanup complete");
    Ok(())
}

/// One reconcile with its bookkeeping; returns when to reconcile next without an event.
fn reconcile_once(
    installer: &mut Installer,
    shared: &Arc<Shared>,
    last_status: &mut Option<Status>,
    retry: &mut Duration,
) -> Instant {
    let started = Instant::now();
    let report = installer.reconcile(started);
    let elapsed = started.elapsed();
    shared.observe_reconcile(elapsed);
    let now = Instant::now();
    let next = match &report.status {
        Status::Ready => {
            shared.set_ready(true);
            shared.count_install(RESULT_SUCCESS);
            *retry = FIRST_RETRY;
            now + RESYNC
        }
        Status::WaitingForPrimary { .. } => {
            shared.set_ready(false);
            now + RESYNC
        }
        Status::BackingOff { until, .. } => {
            shared.set_ready(false);
            *until
        }
        Status::Failed { step, .. } => {
            shared.set_ready(false);
            shared.count_install(step.result_label());
            let at = now + *retry;
            *retry = (*retry * 2).min(MAX_RETRY);
            at
        }
    };
    if last_status.as_ref() != Some(&report.status) || !report.changed.is_empty() {
        match &report.status {
            Status::Ready => tracing::info!(
                changed = report.changed.len(),
                micros = elapsed.as_micros() as u64,
                "istio-cni installed and in place"
            ),
            Status::WaitingForPrimary { dir } => tracing::info!(
                dir = %dir.display(),
                "waiting for the primary CNI plugin to write its configuration (chained mode); not ready"
            ),
            Status::BackingOff { file, until } => tracing::warn!(
                file = %file.display(),
                wait_ms = until.saturating_duration_since(now).as_millis() as u64,
                "deferring the rewrite of a configuration another component keeps reverting; not ready"
            ),
            Status::Failed { step, error } => {
                tracing::error!(step = step.result_label(), %error, "reconcile failed; will retry")
            }
        }
    }
    *last_status = Some(report.status);
    next
}
