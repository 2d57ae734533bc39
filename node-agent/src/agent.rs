//! The agent: a set of supervised tasks on one runtime, until SIGTERM/SIGINT. Then it asks whether its DaemonSet is
//! being deleted ([`shutdown`](crate::shutdown)): an uninstall removes everything of ours, a restart or an upgrade
//! leaves it for the next agent, and an agent that a newer one superseded on this node removes nothing.
//!
//! - the installer: reconcile, publish readiness and metrics, then wait for a relevant inotify event or a timer
//!   (retry, back-off end, periodic resync). The reconcile itself (file copies, fsyncs) runs on a blocking thread,
//!   so nothing else ever waits behind it;
//! - the HTTP servers (health, metrics);
//! - the pod watch (the node-scoped pod cache) and the plugin's socket that answers from it;
//! - the repair controller, fed by the same pod watch.
//! - the plugin's log socket (`log.sock`, Istio's protocol) and the status socket of `node-agent status`.
//!
//! A task that fails (an error or a panic) is logged and restarted after a back-off; the others go on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, RepairConfig, RepairMode, HEALTH_PORT, MONITORING_PORT};
use crate::install::owner::Standing;
use crate::install::{InstallError, Installer, Status};
use crate::pluginlog;
use crate::podcache::{self, PodCache};
use crate::podsock::{self, SocketError};
use crate::repair::kube_api::KubeActions;
use crate::repair::netns::{HostRedirector, Scope};
use crate::repair::{Controller, Tap};
use crate::server::{self, Endpoints, ServerError, Shared, RESULT_SUCCESS};
use crate::shutdown::{self, Action, Answer};
use crate::status::{self, InstallState};
use crate::uds;
use crate::watch::{self, Filter, Target, WatchError, Watcher};

/// A reconcile runs at least this often, events or not (a safety net for anything inotify cannot report).
pub const RESYNC: Duration = Duration::from_secs(60);
/// First retry delay after a failed reconcile; doubles up to `MAX_RETRY`.
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often a superseded agent looks whether the newer one is still there (its end is seen at once when it
/// removes or closes the owner record; this is the safety net).
pub const SUPERSEDED_POLL: Duration = Duration::from_secs(1);
/// How long the shutdown waits for the run dir's lock (another agent's reconcile holds it for milliseconds).
pub const SHUTDOWN_LOCK_WAIT: Duration = Duration::from_secs(1);

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
    #[error("{0}")]
    Task(String),
    #[error(transparent)]
    Socket(#[from] SocketError),
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

    let installer = Arc::new(Mutex::new(Installer::new(cfg.clone())?));
    for path in podsock::remove_stale_bind_dirs(&cfg.run_dir) {
        tracing::info!(path = %path.display(), "removed a socket bind dir left by an interrupted start");
    }
    // The first watch is set up here so that a directory that cannot be watched stops the agent before anything
    // is written; the watch starts before the first reconcile, so no change after the reconcile's reads is missed.
    let first_watcher = Arc::new(Mutex::new(Some(new_watcher(&cfg, &installer)?)));
    let mut tasks = Vec::new();
    for (listener, endpoints) in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, ?endpoints, "serving");
        }
        // A listener cannot be re-created by a restart (its port is bound once, at start): serve() runs forever.
        tasks.push(tokio::spawn(server::serve(
            listener,
            shared.clone(),
            endpoints,
        )));
    }
    tracing::info!(
        conf_dir = %cfg.conf_dir.display(),
        bin_dir = %cfg.bin_dir.display(),
        run_dir = %cfg.run_dir.display(),
        chained = cfg.chained,
        node = %cfg.node_name,
        "node agent started"
    );
    {
        let (cfg, installer, shared) = (cfg.clone(), installer.clone(), shared.clone());
        tasks.push(tokio::spawn(supervise("installer", move || {
            let watcher = lock(&first_watcher).take();
            installer_task(cfg.clone(), installer.clone(), shared.clone(), watcher)
        })));
    }

    // The repair controller shares the pod cache's watch: the watch runs when either needs it.
    let tap = cfg
        .repair
        .as_ref()
        .map(|repair| start_repair(&cfg, repair, &shared, &mut tasks));
    let cache = PodCache::with_metrics(shared.pod_cache.clone());
    let socket = if cfg.pod_cache {
        let path = podsock::socket_path(&cfg.run_dir);
        let (first, first_id) = podsock::bind(&path)?;
        let first = Arc::new(Mutex::new(Some(first)));
        // The identity of the socket file we bound last: on shutdown only that one is removed.
        let bound = Arc::new(Mutex::new(first_id));
        {
            let (path, cache, bound) = (path.clone(), cache.clone(), bound.clone());
            tasks.push(tokio::spawn(supervise("pod-cache socket", move || {
                let (path, cache, first, bound) =
                    (path.clone(), cache.clone(), first.clone(), bound.clone());
                async move {
                    let listener = match lock(&first).take() {
                        Some(l) => l,
                        None => {
                            let (l, id) = podsock::bind(&path)?;
                            *lock(&bound) = id;
                            l
                        }
                    };
                    tracing::info!(path = %path.display(), "serving the plugin's pod lookups");
                    podsock::serve(listener, path, cache).await
                }
            })));
        }
        Some((path, bound))
    } else {
        None
    };
    if cfg.pod_cache || tap.is_some() {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(supervise("pod watch", move || {
            let (cfg, cache, tap) = (cfg.clone(), cache.clone(), tap.clone());
            async move {
                let client = podsock::client(&cfg).await?;
                podcache::watch(client, cfg.node_name.clone(), cache, tap).await;
                Ok::<(), String>(())
            }
        })));
    }

    // The plugin's log socket (Istio's protocol) and the status socket of `node-agent status`.
    let uds_sockets = [
        (
            "the plugin's logs",
            pluginlog::socket_path(&cfg.run_dir),
            pluginlog::MAX_BODY,
            pluginlog::handler(shared.clone()),
        ),
        (
            "node-agent status",
            status::socket_path(&cfg.run_dir),
            0,
            status::handler(shared.clone(), cfg.node_name.clone()),
        ),
    ];
    let mut uds_paths = Vec::new();
    for (name, path, max_body, handler) in uds_sockets {
        let (task, bound) = uds::task(name, path.clone(), max_body, handler)?;
        tasks.push(tokio::spawn(task));
        uds_paths.push((path, bound));
    }

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal, "stopping");
    for t in &tasks {
        t.abort();
    }
    shared.set_ready(false);
    // Only the socket files we bound: a newer agent (a rolling update) may have bound the paths since.
    for (path, bound) in socket.into_iter().chain(uds_paths) {
        let id = *lock(&bound);
        match podsock::remove_if_ours(&path, id) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(path = %path.display(), "the socket is another agent's now; left in place")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the socket")
            }
        }
    }
    finish(&cfg, installer).await
}

/// The shutdown: unless a newer agent owns the node, ask whether this is an uninstall, then act on the answer.
async fn finish(cfg: &Config, installer: Arc<Mutex<Installer>>) -> Result<(), AgentError> {
    // The installer task may be in the middle of a reconcile on its blocking thread: the lock waits for it.
    let peek = {
        let installer = installer.clone();
        blocking(move || {
            lock(&installer)
                .standing(SHUTDOWN_LOCK_WAIT)
                .map(|(_, s)| s)
        })
        .await?
    };
    let answer = match (&peek, &cfg.shutdown_check) {
        // Its files are not ours to remove, whatever the answer: no need to ask. (Should it be gone by the time
        // this agent acts, this agent has no answer: everything stays.)
        (Ok(Standing::Superseded { by }), _) => Answer::Unavailable {
            reason: format!("not asked: a newer agent owns this node ({by})"),
        },
        (_, None) => Answer::NotAsked,
        (_, Some(check)) => {
            let started = Instant::now();
            let (answer, attempts) = shutdown::ask(cfg, check).await;
            tracing::info!(
                daemonset = %check.name,
                namespace = %check.namespace,
                %answer,
                attempts,
                millis = started.elapsed().as_millis() as u64,
                "asked the API server for the agent's own DaemonSet"
            );
            answer
        }
    };
    let verdict = shutdown::decide(&answer);
    let cfg = cfg.clone();
    blocking(move || {
        let mut installer = lock(&installer);
        let (dir_lock, standing) = match installer.standing(SHUTDOWN_LOCK_WAIT) {
            Ok(s) => s,
            Err(e) => {
                // Whether a newer agent owns the node is unknown: removing could take its files away.
                tracing::warn!(error = %e, "cannot tell whether a newer agent owns this node: everything stays in place");
                return Ok(());
            }
        };
        match shutdown::action(verdict.decision, &standing) {
            Action::StepAside { by } => tracing::info!(
                newer = %by,
                "a newer agent owns this node's installation: nothing of it is removed"
            ),
            Action::Leave => {
                installer.release(&dir_lock).map_err(AgentError::Cleanup)?;
                let files = installed_files(&cfg, &installer);
                if answer.is_final() {
                    tracing::info!(reason = verdict.why, files = %files, "left in place for the next agent");
                } else {
                    tracing::warn!(
                        reason = verdict.why,
                        %answer,
                        files = %files,
                        "left in place; if the DaemonSet was deleted, remove these by hand (README: restarts and upgrades)"
                    );
                }
            }
            Action::Uninstall => {
                tracing::info!(reason = verdict.why, "removing istio-cni from this node");
                installer.uninstall(&dir_lock).map_err(AgentError::Cleanup)?;
                tracing::info!("cleanup complete");
            }
        }
        Ok(())
    })
    .await?
}

/// What stays on the node when the agent leaves it in place.
fn installed_files(cfg: &Config, installer: &Installer) -> String {
    let mut files = vec![
        cfg.bin_dir
            .join(crate::install::binaries::PLUGIN_BINARY)
            .display()
            .to_string(),
        cfg.kubeconfig_path().display().to_string(),
    ];
    if let Some(conf) = installer.installed_conf() {
        files.insert(0, format!("the istio-cni entry of {}", conf.display()));
    }
    files.join(", ")
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(format!("shutdown step panicked: {e}")))
}

/// Starts the repair controller's task; returns the tap the pod watch feeds it through. A restarted task goes on
/// reading the same channel (its memory of the pods it acted on starts afresh, as after an agent restart).
fn start_repair(
    cfg: &Config,
    repair: &RepairConfig,
    shared: &Arc<Shared>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Tap {
    let (tap, rx) = Tap::new(repair.filter.clone());
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    tracing::info!(
        mode = repair.mode.as_str(),
        annotation = %repair.filter.sidecar_annotation,
        init_container = %repair.filter.init_container_name,
        exit_code = repair.filter.init_exit_code,
        "repair controller enabled"
    );
    // The host's netns is established once, at start: the in-place repair never runs without it.
    let redirector = Arc::new(if repair.mode == RepairMode::Repair {
        let scope = Scope::establish(&repair.host_proc);
        match &scope {
            Ok(s) => tracing::info!(
                proc = %s.proc.display(),
                host_netns = %s.host.id,
                by = %s.host.by,
                "host network namespace established for the in-place repair"
            ),
            Err(e) => tracing::error!(
                proc = %repair.host_proc.display(),
                error = %e,
                "REPAIR_REPAIR_PODS: the in-place repair is refused (broken pods are reported, never repaired)"
            ),
        }
        HostRedirector::new(scope, repair.plugin.backend)
    } else {
        HostRedirector {
            scope: Err(format!(
                "the in-place repair is not the selected mode ({})",
                repair.mode.as_str()
            )),
            backend: repair.plugin.backend,
        }
    });
    let (cfg, repair, shared) = (cfg.clone(), repair.clone(), shared.clone());
    tasks.push(tokio::spawn(supervise("repair", move || {
        let (cfg, repair, shared, rx, redirector) = (
            cfg.clone(),
            repair.clone(),
            shared.clone(),
            rx.clone(),
            redirector.clone(),
        );
        async move {
            let client = podsock::client(&cfg).await?;
            let mut controller = Controller::new(
                repair,
                Arc::new(KubeActions::new(client)),
                redirector,
                shared,
            );
            let mut rx = rx.lock().await;
            controller
                .run(futures::stream::poll_fn(|cx| rx.poll_recv(cx)))
                .await;
            Ok::<(), String>(())
        }
    })));
    tap
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic during a reconcile leaves the installer as consistent as a crash would (every write is atomic); the
    // next reconcile repairs.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_watcher(cfg: &Config, installer: &Mutex<Installer>) -> Result<Watcher, AgentError> {
    let filter = Filter {
        binaries: lock(installer).binary_names(),
        kubeconfig: cni_plugin::config::KUBECONFIG_NAME.to_string(),
        ca_file: cfg
            .ca_file
            .file_name()
            .and_then(|n| n.to_str())
            .map(String::from),
    };
    Ok(Watcher::new(&watch_targets(cfg), filter)?)
}

/// First restart delay of a failed task; doubles up to [`MAX_RESTART`], back to the first after a long run.
pub const FIRST_RESTART: Duration = Duration::from_millis(200);
pub const MAX_RESTART: Duration = Duration::from_secs(30);

/// Runs the task `make` builds, forever: when it ends (an error, a panic, or even success), it is logged and a new
/// one is started after a back-off. Aborting the supervisor aborts its task.
pub async fn supervise<F, Fut, E>(name: &'static str, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    /// Aborting the supervisor aborts the task it runs (a dropped JoinHandle would leave it running).
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut delay = FIRST_RESTART;
    loop {
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn(make()));
        match (&mut task.0).await {
            Ok(Ok(())) => tracing::warn!(task = name, "task ended; restarting it"),
            Ok(Err(e)) => tracing::error!(task = name, error = %e, "task failed; restarting it"),
            Err(e) if e.is_cancelled() => return,
            Err(e) => tracing::error!(task = name, error = %e, "task panicked; restarting it"),
        }
        if started.elapsed() > MAX_RESTART {
            delay = FIRST_RESTART;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RESTART);
    }
}

/// The installer: reconcile, then wait for a change or a timer; forever.
async fn installer_task(
    cfg: Config,
    installer: Arc<Mutex<Installer>>,
    shared: Arc<Shared>,
    watcher: Option<Watcher>,
) -> Result<(), AgentError> {
    let mut watcher = match watcher {
        Some(w) => w,
        None => new_watcher(&cfg, &installer)?,
    };
    let mut retry = FIRST_RETRY;
    let mut last_status: Option<Status> = None;
    loop {
        if !watcher.is_complete() {
            if let Err(e) = watcher.rewatch() {
                tracing::warn!(error = %e, "cannot re-establish a watch; retrying");
            }
        }
        let next = {
            let (installer, shared) = (installer.clone(), shared.clone());
            let mut state = (last_status.take(), retry);
            let (next, state) = tokio::task::spawn_blocking(move || {
                let next =
                    reconcile_once(&mut lock(&installer), &shared, &mut state.0, &mut state.1);
                (next, state)
            })
            .await
            .map_err(|e| AgentError::Task(format!("reconcile panicked: {e}")))?;
            (last_status, retry) = state;
            next
        };
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
        }
    }
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
    shared.set_fighting(installer.fighting(now));
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
        Status::Superseded { .. } => {
            shared.set_ready(false);
            now + SUPERSEDED_POLL
        }
    };
    // A fight's `until` moves on every reconcile: a new deadline alone is not news.
    let same = match (last_status.as_ref(), &report.status) {
        (Some(Status::BackingOff { file: a, .. }), Status::BackingOff { file: b, .. }) => a == b,
        (last, status) => last == Some(status),
    };
    if !same || (!report.changed.is_empty() && !matches!(report.status, Status::BackingOff { .. }))
    {
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
                "another component keeps reverting this configuration: our rewrites are rate-limited; not ready until it stops"
            ),
            Status::Failed { step, error } => {
                tracing::error!(step = step.result_label(), %error, "reconcile failed; will retry")
            }
            Status::Superseded { by } => tracing::info!(
                newer = %by,
                "a newer agent on this node owns the installation (a rolling update): this one writes nothing while it runs; not ready"
            ),
        }
    }
    shared.set_install_state(InstallState::of(&report.status, installer.installed_conf()));
    *last_status = Some(report.status);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_failing_or_panicking_task_is_restarted_and_abort_stops_it() {
        struct SetOnDrop(Arc<AtomicUsize>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(1, Ordering::SeqCst);
            }
        }
        let runs = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (counter, flag) = (runs.clone(), dropped.clone());
        let sup = tokio::spawn(supervise("test", move || {
            let (counter, flag) = (counter.clone(), flag.clone());
            async move {
                match counter.fetch_add(1, Ordering::SeqCst) {
                    0 => Err("first run fails".to_string()),
                    1 => panic!("second run panics"),
                    _ => {
                        // Third run: stays up until aborted.
                        let _guard = SetOnDrop(flag);
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                }
            }
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "not restarted: {runs:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sup.abort();
        let _ = sup.await;
        tokio::time::sleep(FIRST_RESTART * 3).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "restarted after abort");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the running task was not aborted"
        );
    }
}
