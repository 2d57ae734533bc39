//! The repair controller (Istio's `cni/pkg/repair`): pods of this node that started before the plugin was in place
//! (node boot, agent upgrade, the primary CNI rewriting its conflist) run with their traffic bypassing the sidecar.
//! Istio's injector adds an init container (`istio-validation`) that checks the redirect and fails with exit code
//! 126 when it is missing, so such a pod crash-loops in its init phase; the controller finds those pods and acts on
//! each **once** (by UID): repair it in place (the plugin's own programming path, in the pod's netns found through
//! the host's /proc), delete it (its controller recreates it, this time through the plugin), or label it.
//!
//! - [`broken`] is Istio's filter (`matchesFilter`), pure, plus three checks of ours: the pod is not being deleted,
//!   has not finished, and is not on the host's network (none of the actions can help those).
//! - The controller is fed by a stream of watch events ([`Controller::run`]), so its tests need no API server.
//!   In the agent that stream is the pod cache's own watch: [`Tap`] forwards from it what the controller needs
//!   (the broken pods whole, every other pod reduced to its identity, so UIDs can be forgotten when pods go).
//! - The API side is the [`PodActions`] trait ([`kube_api::KubeActions`] in the agent), the netns side the
//!   [`Redirector`] trait ([`netns::HostRedirector`]); tests record the calls.
//! - Every action is recorded in one place ([`Controller::record`]): the log line and
//!   `istio_cni_repair_pods_repaired_total{type,result}` (Istio's metric), plus a Kubernetes Event on the pod.

pub mod kube_api;
pub mod netns;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni_plugin::config::PluginConfig;
use cni_plugin::pod::{decide, Decision, PodInfo};
use cni_plugin::redirect::Redirect;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::watcher::Event;
use tokio::sync::mpsc;

use crate::config::{BrokenPodFilter, RepairConfig, RepairMode};
use crate::server::Shared;

/// How often an action on one pod is tried before the controller gives up on it (Istio's queue: 5 attempts).
/// A new attempt is made on the pod's next matching event (a crash-looping pod changes at every restart).
pub const MAX_ATTEMPTS: u32 = 5;

/// How long the delete mode waits for the plugin to be in place (the agent ready) before it deletes a pod: a
/// replacement started without the plugin would be broken as well, and deleted in turn, pod after pod.
pub const INSTALL_WAIT: Duration = Duration::from_secs(10);
/// How often readiness is looked at meanwhile.
const INSTALL_POLL: Duration = Duration::from_millis(100);

/// The `source.component` of our Events (Istio's event recorder name).
pub const EVENT_COMPONENT: &str = "cni-repair";
/// Event reasons: Istio's two, and ours for the repair (Istio records none for it).
pub const REASON_REPAIR: &str = "RepairBrokenPod";
pub const REASON_DELETE: &str = "DeleteBrokenPod";
pub const REASON_LABEL: &str = "LabelBrokenPod";
/// The API server caps an Event's message; longer ones are cut at a character boundary.
pub const MAX_EVENT_MESSAGE: usize = 1024;

/// Why a pod is considered broken: the init container and the termination that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub container: String,
    pub exit_code: i32,
    pub message: String,
}

/// Istio's filter: a pod of this node with the sidecar annotation, one of whose init containers named
/// `init_container_name` last terminated with `init_exit_code` (and `init_termination_message`), unless it is now
/// terminated successfully. Ours on top: a pod being deleted, finished (Succeeded/Failed) or on the host network
/// is never broken.
pub fn broken(filter: &BrokenPodFilter, pod: &Pod) -> Option<Broken> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(filter.node_name.as_str()) {
        return None;
    }
    if pod.metadata.deletion_timestamp.is_some() || spec.host_network == Some(true) {
        return None;
    }
    if !filter.sidecar_annotation.is_empty()
        && !pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(&filter.sidecar_annotation))
    {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    for c in status.init_container_statuses.iter().flatten() {
        if !filter.init_container_name.is_empty() && c.name != filter.init_container_name {
            continue;
        }
        // Now terminated successfully: never broken, whatever happened before.
        if let Some(now) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            if now.reason.as_deref() == Some("Completed") || now.exit_code == 0 {
                continue;
            }
        }
        let Some(last) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) else {
            continue;
        };
        let message = last.message.as_deref().unwrap_or("").trim();
        let message_ok = filter.init_termination_message.is_empty()
            || filter.init_termination_message == message;
        let code_ok = filter.init_exit_code == 0 || filter.init_exit_code == last.exit_code;
        if message_ok && code_ok {
            return Some(Broken {
                container: c.name.clone(),
                exit_code: last.exit_code,
                message: message.to_string(),
            });
        }
    }
    None
}

/// The pod reduced to its identity (namespace, name, UID): what the controller keeps of a pod that is not broken.
pub fn identity(pod: &Pod) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

/// What of a watch event the controller needs: list boundaries, every listed pod (whole when broken, its identity
/// otherwise), broken pods as they change, and deletions (identity). `None`: nothing to forward.
pub fn forwarded(filter: &BrokenPodFilter, event: &Event<Pod>) -> Option<Event<Pod>> {
    let keep = |pod: &Pod| {
        if broken(filter, pod).is_some() {
            pod.clone()
        } else {
            identity(pod)
        }
    };
    match event {
        Event::Init => Some(Event::Init),
        Event::InitDone => Some(Event::InitDone),
        Event::InitApply(pod) => Some(Event::InitApply(keep(pod))),
        Event::Apply(pod) => broken(filter, pod).map(|_| Event::Apply(pod.clone())),
        Event::Delete(pod) => Some(Event::Delete(identity(pod))),
    }
}

/// The watch side of the controller's input: the pod watch calls [`Tap::observe`] with every event (cheap: only
/// broken pods are copied whole), the controller reads the other end. Unbounded, since what goes through is small
/// (an identity per pod and event at most) and the watch must never wait behind a repair.
#[derive(Debug, Clone)]
pub struct Tap {
    filter: BrokenPodFilter,
    tx: mpsc::UnboundedSender<Event<Pod>>,
}

impl Tap {
    pub fn new(filter: BrokenPodFilter) -> (Tap, mpsc::UnboundedReceiver<Event<Pod>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Tap { filter, tx }, rx)
    }

    pub fn observe(&self, event: &Event<Pod>) {
        if let Some(ev) = forwarded(&self.filter, event) {
            // A closed channel: the controller is restarting; it relists when its new watch starts.
            let _ = self.tx.send(ev);
        }
    }
}

/// What the plugin would do for this pod: its exclusions and decision, then the redirect (Istio's repair builds
/// the redirect the same way, `plugin.NewRedirect(plugin.ExtractPodInfo(pod))`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Redirect(Box<Redirect>),
    /// The plugin would leave this pod alone: nothing to repair.
    Skip(String),
}

/// [`Plan`] of a pod: pure. `Err`: its annotations are invalid (the plugin would fail its ADD the same way).
pub fn plan(plugin: &PluginConfig, pod: &Pod) -> Result<Plan, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if plugin.namespace_excluded(namespace) {
        return Ok(Plan::Skip(format!("namespace {namespace} is excluded")));
    }
    if plugin.is_agent_pod(namespace, name) {
        return Ok(Plan::Skip(format!(
            "{name} is the istio-cni agent's own pod"
        )));
    }
    let pi = PodInfo::from(pod);
    if let Decision::Skip(reason) = decide(&pi) {
        return Ok(Plan::Skip(reason.to_string()));
    }
    Redirect::from_pod(&pi)
        .map(|r| Plan::Redirect(Box::new(r)))
        .map_err(|e| e.to_string())
}

/// The pod's IPs (`status.podIPs`, else `status.podIP`), as the netns search matches them.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// The pod an API action is about, with the version it was seen at (the delete's preconditions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: Option<String>,
}

impl PodTarget {
    pub fn of(pod: &Pod) -> PodTarget {
        PodTarget {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            resource_version: pod.metadata.resource_version.clone(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{what}: not found (404)")]
    NotFound { what: String },
    #[error("{what}: HTTP {status}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: {message}")]
    Request { what: String, message: String },
    #[error("{what}: no answer within {secs} s")]
    Timeout { what: String, secs: u64 },
}

/// The API side of the actions.
pub trait PodActions: Send + Sync + 'static {
    /// Deletes the pod, only if it still is the one seen (UID and resource version).
    fn delete(&self, pod: &PodTarget) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Sets one label on the pod (through `pods/status`, the lower privilege, as Istio does).
    fn label(
        &self,
        pod: &PodTarget,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Creates a core/v1 Event.
    fn event(&self, event: CoreEvent) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    /// The oldest process of the pod's netns on the host (its sandbox's pause process).
    pub pid: u32,
    pub netns: String,
    pub backend: &'static str,
}

/// Why a repair in place failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RedirectError {
    pub message: String,
    /// Another attempt may succeed (the netns not found yet, a transient programming failure); `false` when the
    /// agent refuses every repair (the host's netns could not be established).
    pub retry: bool,
}

impl From<String> for RedirectError {
    fn from(message: String) -> Self {
        RedirectError {
            message,
            retry: true,
        }
    }
}

/// The netns side of the repair: finds the pod's netns by its IPs and programs `redirect` there. Blocking; called
/// on a blocking thread.
pub trait Redirector: Send + Sync + 'static {
    fn redirect(&self, ips: &[IpAddr], redirect: &Redirect) -> Result<Redirected, RedirectError>;
}

/// Istio's `result` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionResult {
    Success,
    Skip,
    Fail,
}

impl ActionResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionResult::Success => "success",
            ActionResult::Skip => "skip",
            ActionResult::Fail => "fail",
        }
    }
}

/// One action of the controller, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub mode: RepairMode,
    pub result: ActionResult,
    /// What was done or why not.
    pub detail: String,
    /// Which attempt this was (1-based).
    pub attempt: u32,
    /// A failure that another attempt may fix (an API error, a netns not found yet); an invalid annotation is not.
    pub retry: bool,
}

/// A core/v1 Event about `pod` (what client-go's recorder writes, which Istio uses): a unique name, the pod as the
/// involved object, our component and node as the source. Pure: `now` is given.
pub fn pod_event(pod: &Pod, node: &str, reason: &str, message: &str, now: Time) -> CoreEvent {
    let t = PodTarget::of(pod);
    let nanos = now.0.as_nanosecond();
    let mut message = message.to_string();
    if message.len() > MAX_EVENT_MESSAGE {
        let mut cut = MAX_EVENT_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    CoreEvent {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", t.name, nanos)),
            namespace: Some(t.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(t.name),
            namespace: Some(t.namespace),
            uid: Some(t.uid),
            resource_version: t.resource_version,
            ..ObjectReference::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(EVENT_COMPONENT.into()),
            host: Some(node.into()),
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        reporting_component: Some(EVENT_COMPONENT.into()),
        reporting_instance: Some(node.into()),
        ..CoreEvent::default()
    }
}

/// What the controller remembers of a pod it acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Memory {
    attempts: u32,
    /// Done (success or skip), or failed for good: never again for this UID.
    settled: bool,
}

/// The controller: acts once per broken pod (by UID), in the configured mode.
pub struct Controller<A, R> {
    cfg: RepairConfig,
    api: Arc<A>,
    redirector: Arc<R>,
    shared: Arc<Shared>,
    seen: HashMap<String, Memory>,
    /// UIDs of the list in progress (between `Init` and `InitDone`), to forget the pods that went meanwhile.
    listing: Option<HashSet<String>>,
    install_wait: Duration,
}

impl<A: PodActions, R: Redirector> Controller<A, R> {
    pub fn new(cfg: RepairConfig, api: Arc<A>, redirector: Arc<R>, shared: Arc<Shared>) -> Self {
        Controller {
            cfg,
            api,
            redirector,
            shared,
            seen: HashMap::new(),
            listing: None,
            install_wait: INSTALL_WAIT,
        }
    }

    /// How long a delete waits for the plugin to be in place (default [`INSTALL_WAIT`]).
    pub fn with_install_wait(mut self, wait: Duration) -> Self {
        self.install_wait = wait;
        self
    }

    /// Whether the plugin is in place (the agent is ready), waiting for it up to the install wait.
    async fn installed(&self) -> bool {
        let deadline = Instant::now() + self.install_wait;
        loop {
            if self.shared.is_ready() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(INSTALL_POLL).await;
        }
    }

    /// Handles the events of `stream` until it ends.
    pub async fn run<S: Stream<Item = Event<Pod>>>(&mut self, stream: S) {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            self.handle(ev).await;
        }
    }

    /// Number of pods remembered (acted on, or being listed).
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    pub async fn handle(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(listing), Some(uid)) = (self.listing.as_mut(), &pod.metadata.uid) {
                    listing.insert(uid.clone());
                }
                self.consider(&pod).await;
            }
            Event::InitDone => {
                if let Some(alive) = self.listing.take() {
                    self.seen.retain(|uid, _| alive.contains(uid));
                }
            }
            Event::Apply(pod) => self.consider(&pod).await,
            Event::Delete(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    self.seen.remove(uid);
                }
            }
        }
    }

    async fn consider(&mut self, pod: &Pod) {
        let Some(why) = broken(&self.cfg.filter, pod) else {
            return;
        };
        let Some(uid) = pod.metadata.uid.clone().filter(|u| !u.is_empty()) else {
            return;
        };
        let memory = self.seen.entry(uid.clone()).or_insert(Memory {
            attempts: 0,
            settled: false,
        });
        if memory.settled {
            tracing::debug!(namespace = ?pod.metadata.namespace, pod = ?pod.metadata.name, %uid, "already acted on this pod");
            return;
        }
        memory.attempts += 1;
        let attempt = memory.attempts;
        tracing::info!(
            namespace = ?pod.metadata.namespace,
            pod = ?pod.metadata.name,
            %uid,
            container = %why.container,
            exit_code = why.exit_code,
            mode = self.cfg.mode.as_str(),
            attempt,
            "pod detected as broken (its traffic is not redirected)"
        );
        let action = self.act(pod, attempt).await;
        let settled =
            action.result != ActionResult::Fail || !action.retry || attempt >= MAX_ATTEMPTS;
        if let Some(m) = self.seen.get_mut(&uid) {
            m.settled = settled;
        }
        self.record(&action);
    }

    async fn act(&self, pod: &Pod, attempt: u32) -> Action {
        let target = PodTarget::of(pod);
        let mode = self.cfg.mode;
        let (result, detail, retry, event) = match mode {
            RepairMode::Repair => self.repair(pod).await,
            RepairMode::Delete if !self.installed().await => {
                let e = format!(
                    "the plugin is not in place on this node (the agent is not ready after {} s): its \
                     replacement would start unredirected as well",
                    self.install_wait.as_secs()
                );
                (
                    ActionResult::Fail,
                    e.clone(),
                    true,
                    Some((
                        REASON_DELETE,
                        format!("pod detected as broken, but not deleted: {e}"),
                    )),
                )
            }
            RepairMode::Delete => match self.api.delete(&target).await {
                Ok(()) => (
                    ActionResult::Success,
                    "deleted".to_string(),
                    false,
                    Some((REASON_DELETE, "pod detected as broken, deleted".to_string())),
                ),
                Err(ApiError::NotFound { .. }) => {
                    (ActionResult::Skip, "already gone".to_string(), false, None)
                }
                Err(e) => (
                    ActionResult::Fail,
                    e.to_string(),
                    true,
                    Some((
                        REASON_DELETE,
                        format!("pod detected as broken, but failed to delete: {e}"),
                    )),
                ),
            },
            RepairMode::Label => {
                let (key, value) = (&self.cfg.label_key, &self.cfg.label_value);
                let has = pod
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(key));
                if has {
                    (
                        ActionResult::Skip,
                        format!("already has a label {key}"),
                        false,
                        None,
                    )
                } else {
                    match self.api.label(&target, key, value).await {
                        Ok(()) => (
                            ActionResult::Success,
                            format!("labeled {key}={value}"),
                            false,
                            Some((REASON_LABEL, "pod detected as broken, labeled".to_string())),
                        ),
                        Err(e) => (
                            ActionResult::Fail,
                            e.to_string(),
                            !matches!(e, ApiError::NotFound { .. }),
                            Some((
                                REASON_LABEL,
                                format!("pod detected as broken, but failed to label: {e}"),
                            )),
                        ),
                    }
                }
            }
        };
        if let Some((reason, message)) = event {
            let ev = pod_event(
                pod,
                &self.cfg.filter.node_name,
                reason,
                &message,
                Time(k8s_openapi::jiff::Timestamp::now()),
            );
            if let Err(e) = self.api.event(ev).await {
                tracing::warn!(namespace = %target.namespace, pod = %target.name, error = %e, "cannot record the Event of a repair action");
            }
        }
        Action {
            namespace: target.namespace,
            name: target.name,
            uid: target.uid,
            mode,
            result,
            detail,
            attempt,
            retry,
        }
    }

    /// Repair mode: the plugin's decision and redirect, then the netns search and programming on a blocking
    /// thread. Returns (result, detail, retry, event).
    async fn repair(
        &self,
        pod: &Pod,
    ) -> (ActionResult, String, bool, Option<(&'static str, String)>) {
        let failed = |detail: String, retry: bool| {
            let msg = format!("pod detected as broken, but failed to repair: {detail}");
            (
                ActionResult::Fail,
                detail,
                retry,
                Some((REASON_REPAIR, msg)),
            )
        };
        let redirect = match plan(&self.cfg.plugin, pod) {
            Ok(Plan::Redirect(r)) => r,
            Ok(Plan::Skip(reason)) => {
                return (
                    ActionResult::Skip,
                    format!("the plugin would not redirect it: {reason}"),
                    false,
                    None,
                )
            }
            Err(e) => return failed(e, false),
        };
        let ips = pod_ips(pod);
        if ips.is_empty() {
            return failed("the pod has no IP yet".into(), true);
        }
        let redirector = self.redirector.clone();
        let joined =
            tokio::task::spawn_blocking(move || redirector.redirect(&ips, &redirect)).await;
        match joined {
            Ok(Ok(done)) => {
                let detail = format!(
                    "rules programmed with {} in the netns of pid {} ({})",
                    done.backend, done.pid, done.netns
                );
                let msg = format!("pod detected as broken, repaired: {detail}");
                (
                    ActionResult::Success,
                    detail,
                    false,
                    Some((REASON_REPAIR, msg)),
                )
            }
            Ok(Err(e)) => failed(e.message, e.retry),
            Err(e) => failed(format!("the repair panicked: {e}"), true),
        }
    }

    /// The one place where an action is recorded: log, metric, and the recent events `node-agent status` shows.
    pub fn record(&self, action: &Action) {
        self.shared
            .count_repair(action.mode.as_str(), action.result.as_str());
        let result = match action.result {
            ActionResult::Success => "ok".to_string(),
            ActionResult::Skip => "skipped".to_string(),
            ActionResult::Fail => format!("failed (attempt {})", action.attempt),
        };
        self.shared
            .events
            .record_repair(crate::events::RepairEvent::new(
                action.namespace.clone(),
                action.name.clone(),
                action.mode.as_str(),
                action.detail.clone(),
                result,
            ));
        match action.result {
            ActionResult::Success => tracing::info!(
                namespace = %action.namespace, pod = %action.name, uid = %action.uid,
                mode = action.mode.as_str(), detail = %action.detail, "pod repaired"
            ),
            ActionResult::Skip => tracing::info!(
                namespace = %action.namespace, pod = %action.name, uid = %action.uid,
                mode = action.mode.as_str(), detail = %action.detail, "broken pod left alone"
            ),
            ActionResult::Fail => tracing::warn!(
                namespace = %action.namespace, pod = %action.name, uid = %action.uid,
                mode = action.mode.as_str(), attempt = action.attempt,
                will_retry = action.retry && action.attempt < MAX_ATTEMPTS,
                error = %action.detail, "repair action failed"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
