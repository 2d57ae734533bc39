//! The predicate and the event processing, fed by streams of watch events; the API and netns sides record calls.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::*;
use crate::config::{BrokenPodFilter, RepairConfig, RepairMode};

const NODE: &str = "node-1";

fn filter() -> BrokenPodFilter {
    BrokenPodFilter::istio(NODE)
}

fn plugin() -> PluginConfig {
    PluginConfig::from_json(&json!({
        "type": "istio-cni",
        "exclude_namespaces": ["kube-system"],
        "pod_namespace": "istio-system",
    }))
    .unwrap()
}

fn config(mode: RepairMode) -> RepairConfig {
    RepairConfig {
        mode,
        filter: filter(),
        label_key: "cni.istio.io/uninitialized".into(),
        label_value: "true".into(),
        host_proc: "/host/proc".into(),
        plugin: plugin(),
    }
}

/// An injected pod on NODE (istio-validation + istio-proxy), not yet broken.
fn injected(ns: &str, name: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "7",
                     "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"]}"}},
        "spec": {
            "nodeName": NODE,
            "initContainers": [{"name": "istio-validation", "args": ["istio-iptables", "--run-validation"]}],
            "containers": [{"name": "app"}, {"name": "istio-proxy", "args": ["proxy", "sidecar"]}],
        },
        "status": {
            "phase": "Pending",
            "podIP": "10.244.1.7",
            "podIPs": [{"ip": "10.244.1.7"}],
            "initContainerStatuses": [{
                "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"running": {}},
            }],
        },
    })
}

/// The pod after its validation failed `n` times with `code` and `message`: crash-looping (waiting).
fn failed(mut v: Value, code: i32, message: &str) -> Value {
    let st = &mut v["status"]["initContainerStatuses"][0];
    st["restartCount"] = json!(1);
    st["state"] = json!({"waiting": {"reason": "CrashLoopBackOff"}});
    st["lastState"] =
        json!({"terminated": {"exitCode": code, "reason": "Error", "message": message}});
    v
}

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn broken_pod(ns: &str, name: &str, uid: &str) -> Pod {
    pod(failed(
        injected(ns, name, uid),
        126,
        "iptables validation failed",
    ))
}

#[test]
fn istios_filter() {
    let f = filter();
    // Healthy, and never failed.
    assert_eq!(broken(&f, &pod(injected("ns", "a", "u"))), None);
    // Failed with 126: broken.
    let b = broken(&f, &broken_pod("ns", "a", "u")).unwrap();
    assert_eq!(b.container, "istio-validation");
    assert_eq!(b.exit_code, 126);
    // Another exit code.
    assert_eq!(
        broken(&f, &pod(failed(injected("ns", "a", "u"), 1, ""))),
        None
    );
    // Exit code filter 0 matches any.
    let any = BrokenPodFilter {
        init_exit_code: 0,
        ..filter()
    };
    assert!(broken(&any, &pod(failed(injected("ns", "a", "u"), 1, ""))).is_some());
    // Another init container's failure.
    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["status"]["initContainerStatuses"][0]["name"] = json!("other");
    assert_eq!(broken(&f, &pod(v.clone())), None);
    // ...unless the name filter is empty.
    let any_name = BrokenPodFilter {
        init_container_name: String::new(),
        ..filter()
    };
    assert!(broken(&any_name, &pod(v)).is_some());
    // Failed before, but completed now: never broken.
    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["status"]["initContainerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 0, "reason": "Completed"}});
    assert_eq!(broken(&f, &pod(v)), None);
    // Terminated now with 126 but no earlier termination (first failure): Istio waits for the restart.
    let mut v = injected("ns", "a", "u");
    v["status"]["initContainerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 126, "reason": "Error"}});
    assert_eq!(broken(&f, &pod(v)), None);
}

#[test]
fn annotation_node_and_our_own_exclusions() {
    let f = filter();
    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["metadata"]["annotations"] = json!({});
    assert_eq!(broken(&f, &pod(v.clone())), None, "no sidecar annotation");
    let no_annotation = BrokenPodFilter {
        sidecar_annotation: String::new(),
        ..filter()
    };
    assert!(broken(&no_annotation, &pod(v)).is_some());

    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["spec"]["nodeName"] = json!("node-2");
    assert_eq!(broken(&f, &pod(v)), None, "another node");

    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(broken(&f, &pod(v)), None, "being deleted");

    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["status"]["phase"] = json!("Failed");
    assert_eq!(broken(&f, &pod(v)), None, "finished");

    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["spec"]["hostNetwork"] = json!(true);
    assert_eq!(broken(&f, &pod(v)), None, "host network");
}

#[test]
fn termination_message_filter_is_trimmed() {
    let f = BrokenPodFilter {
        init_termination_message: "no redirect".into(),
        ..filter()
    };
    assert!(broken(
        &f,
        &pod(failed(injected("ns", "a", "u"), 126, "  no redirect\n"))
    )
    .is_some());
    assert_eq!(
        broken(&f, &pod(failed(injected("ns", "a", "u"), 126, "other"))),
        None
    );
    assert_eq!(
        broken(&f, &pod(failed(injected("ns", "a", "u"), 126, ""))),
        None
    );
}

#[test]
fn only_what_the_controller_needs_is_forwarded() {
    let f = filter();
    let healthy = pod(injected("ns", "a", "u1"));
    let sick = broken_pod("ns", "b", "u2");
    assert!(forwarded(&f, &Event::Apply(healthy.clone())).is_none());
    match forwarded(&f, &Event::Apply(sick.clone())) {
        Some(Event::Apply(p)) => assert_eq!(p, sick),
        other => panic!("{other:?}"),
    }
    match forwarded(&f, &Event::InitApply(healthy.clone())) {
        Some(Event::InitApply(p)) => {
            assert_eq!(p.metadata.uid.as_deref(), Some("u1"));
            assert!(p.spec.is_none() && p.status.is_none() && p.metadata.annotations.is_none());
        }
        other => panic!("{other:?}"),
    }
    match forwarded(&f, &Event::Delete(sick)) {
        Some(Event::Delete(p)) => {
            assert_eq!(p.metadata.uid.as_deref(), Some("u2"));
            assert!(p.status.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(forwarded(&f, &Event::Init), Some(Event::Init)));
    assert!(matches!(
        forwarded(&f, &Event::InitDone),
        Some(Event::InitDone)
    ));
}

#[test]
fn the_plan_is_the_plugins() {
    let p = plugin();
    assert!(matches!(
        plan(&p, &broken_pod("ns", "a", "u")),
        Ok(Plan::Redirect(_))
    ));
    assert!(matches!(
        plan(&p, &broken_pod("kube-system", "a", "u")),
        Ok(Plan::Skip(r)) if r.contains("excluded")
    ));
    assert!(matches!(
        plan(&p, &broken_pod("istio-system", "istio-cni-node-x1", "u")),
        Ok(Plan::Skip(r)) if r.contains("agent")
    ));
    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["metadata"]["annotations"]["sidecar.istio.io/inject"] = json!("false");
    assert!(matches!(plan(&p, &pod(v)), Ok(Plan::Skip(_))));
    let mut v = failed(injected("ns", "a", "u"), 126, "");
    v["metadata"]["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] = json!("x");
    let e = plan(&p, &pod(v)).unwrap_err();
    assert!(e.contains("includeInboundPorts"), "{e}");
}

#[test]
fn events_are_core_v1_about_the_pod() {
    let p = broken_pod("ns", "web-1", "u9");
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
    let long = "x".repeat(2000) + "é";
    let ev = pod_event(&p, NODE, REASON_DELETE, &long, now.clone());
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(v["metadata"]["namespace"], "ns");
    assert!(v["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("web-1."));
    assert_eq!(
        v["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "name": "web-1", "namespace": "ns", "uid": "u9",
               "resourceVersion": "7"})
    );
    assert_eq!(v["reason"], "DeleteBrokenPod");
    assert_eq!(v["type"], "Warning");
    assert_eq!(
        v["source"],
        json!({"component": "cni-repair", "host": NODE})
    );
    assert_eq!(v["count"], 1);
    assert_eq!(v["firstTimestamp"], "2027-01-15T08:00:00Z");
    assert_eq!(ev.message.unwrap().len(), MAX_EVENT_MESSAGE);
}

#[test]
fn pod_ips_prefer_the_list() {
    let mut v = injected("ns", "a", "u");
    v["status"]["podIPs"] = json!([{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]);
    let ips: Vec<String> = pod_ips(&pod(v.clone()))
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
    v["status"]["podIPs"] = json!([]);
    v["status"]["podIP"] = json!("10.0.0.2");
    assert_eq!(pod_ips(&pod(v)).len(), 1);
    assert!(pod_ips(&pod(json!({"metadata": {"name": "x"}}))).is_empty());
}

/// A call the controller made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Delete(PodTarget),
    Label(PodTarget, String, String),
    Event {
        pod: String,
        reason: String,
        message: String,
    },
    Redirect(Vec<IpAddr>),
}

fn event_call(pod: &str, reason: &str, message: &str) -> Call {
    Call::Event {
        pod: pod.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    /// Answers of delete/label, in order; empty: Ok.
    answers: Mutex<VecDeque<Result<(), ApiError>>>,
    /// Answers of the redirector, in order; empty: Ok.
    redirects: Mutex<VecDeque<Result<(), RedirectError>>>,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn push(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
    fn count(&self, which: fn(&Call) -> bool) -> usize {
        self.calls().iter().filter(|c| which(c)).count()
    }
    fn redirects(&self) -> usize {
        self.count(|c| matches!(c, Call::Redirect(_)))
    }
    fn deletes(&self) -> usize {
        self.count(|c| matches!(c, Call::Delete(_)))
    }
    /// Some Event's message contains `text`.
    fn assert_event_says(&self, text: &str) {
        let calls = self.calls();
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Event { message, .. } if message.contains(text))),
            "no Event says {text:?}: {calls:?}"
        );
    }
    fn answer(&self) -> Result<(), ApiError> {
        self.answers.lock().unwrap().pop_front().unwrap_or(Ok(()))
    }
}

impl PodActions for Recorder {
    async fn delete(&self, pod: &PodTarget) -> Result<(), ApiError> {
        self.push(Call::Delete(pod.clone()));
        self.answer()
    }
    async fn label(&self, pod: &PodTarget, key: &str, value: &str) -> Result<(), ApiError> {
        self.push(Call::Label(pod.clone(), key.into(), value.into()));
        self.answer()
    }
    async fn event(&self, event: CoreEvent) -> Result<(), ApiError> {
        self.push(Call::Event {
            pod: event.involved_object.name.unwrap_or_default(),
            reason: event.reason.unwrap_or_default(),
            message: event.message.unwrap_or_default(),
        });
        Ok(())
    }
}

impl Redirector for Recorder {
    fn redirect(&self, ips: &[IpAddr], _redirect: &Redirect) -> Result<Redirected, RedirectError> {
        self.push(Call::Redirect(ips.to_vec()));
        self.redirects
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()))
            .map(|()| Redirected {
                pid: 4242,
                netns: "/host/proc/4242/ns/net".into(),
                backend: "iptables-nft",
            })
    }
}

struct Run {
    rec: Arc<Recorder>,
    shared: Arc<Shared>,
    controller: Controller<Recorder, Recorder>,
}

fn controller(mode: RepairMode) -> Run {
    let rec = Arc::new(Recorder::default());
    let shared = Shared::new();
    // The plugin is in place (the delete mode waits for it).
    shared.set_ready(true);
    let controller = Controller::new(config(mode), rec.clone(), rec.clone(), shared.clone());
    Run {
        rec,
        shared,
        controller,
    }
}

async fn feed(run: &mut Run, events: Vec<Event<Pod>>) {
    run.controller.run(futures::stream::iter(events)).await;
}

fn metric(shared: &Shared, kind: &str, result: &str) -> u64 {
    let text = shared.metrics_text();
    let needle =
        format!("istio_cni_repair_pods_repaired_total{{type=\"{kind}\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

fn target(ns: &str, name: &str, uid: &str) -> PodTarget {
    PodTarget {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        resource_version: Some("7".into()),
    }
}

#[tokio::test]
async fn delete_mode_deletes_once_and_records_an_event() {
    let mut run = controller(RepairMode::Delete);
    let sick = broken_pod("ns", "a", "u1");
    feed(
        &mut run,
        vec![
            Event::Init,
            Event::InitApply(pod(injected("ns", "ok", "u0"))),
            Event::InitDone,
            Event::Apply(sick.clone()),
            // The same pod again (its status changes while it crash-loops, and then it is being deleted).
            Event::Apply(sick.clone()),
            Event::Apply(sick),
        ],
    )
    .await;
    assert_eq!(
        run.rec.calls(),
        vec![
            Call::Delete(target("ns", "a", "u1")),
            event_call("a", "DeleteBrokenPod", "pod detected as broken, deleted"),
        ]
    );
    assert_eq!(metric(&run.shared, "delete", "success"), 1);
    // And once in the recent events `node-agent status` shows.
    let recent = run.shared.events.repairs(10);
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(
        (
            recent[0].namespace.as_str(),
            recent[0].pod.as_str(),
            recent[0].action.as_str(),
            recent[0].result.as_str()
        ),
        ("ns", "a", "delete", "ok")
    );
}

#[tokio::test]
async fn a_new_incarnation_under_the_same_name_is_acted_on_again() {
    let mut run = controller(RepairMode::Delete);
    feed(
        &mut run,
        vec![
            Event::Apply(broken_pod("ns", "web-0", "old")),
            Event::Delete(broken_pod("ns", "web-0", "old")),
            Event::Apply(broken_pod("ns", "web-0", "new")),
        ],
    )
    .await;
    let deletes: Vec<_> = run
        .rec
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Delete(t) => Some(t.uid),
            _ => None,
        })
        .collect();
    assert_eq!(deletes, ["old", "new"]);
    assert_eq!(run.controller.remembered(), 1);
}

#[tokio::test]
async fn mode_precedence_picks_one_action() {
    // The config's selection, as the agent builds it.
    assert_eq!(
        RepairMode::select(true, true, true),
        Some(RepairMode::Repair)
    );
    assert_eq!(
        RepairMode::select(false, true, true),
        Some(RepairMode::Delete)
    );
    assert_eq!(
        RepairMode::select(false, false, true),
        Some(RepairMode::Label)
    );
    assert_eq!(RepairMode::select(false, false, false), None);
    // Each mode makes only its own request.
    for (mode, expect) in [
        (RepairMode::Repair, "redirect"),
        (RepairMode::Delete, "delete"),
        (RepairMode::Label, "label"),
    ] {
        let mut run = controller(mode);
        feed(&mut run, vec![Event::Apply(broken_pod("ns", "a", "u1"))]).await;
        let kinds: Vec<&str> = run
            .rec
            .calls()
            .iter()
            .map(|c| match c {
                Call::Delete(_) => "delete",
                Call::Label(..) => "label",
                Call::Redirect(_) => "redirect",
                Call::Event { .. } => "event",
            })
            .collect();
        assert_eq!(kinds, [expect, "event"], "{mode:?}");
        assert_eq!(metric(&run.shared, mode.as_str(), "success"), 1);
    }
}

#[tokio::test]
async fn repair_mode_programs_the_pod_ips_once() {
    let mut run = controller(RepairMode::Repair);
    let sick = broken_pod("ns", "a", "u1");
    feed(
        &mut run,
        vec![Event::Apply(sick.clone()), Event::Apply(sick)],
    )
    .await;
    let calls = run.rec.calls();
    assert_eq!(
        calls[0],
        Call::Redirect(vec!["10.244.1.7".parse().unwrap()])
    );
    match &calls[1] {
        Call::Event {
            reason, message, ..
        } => {
            assert_eq!(reason, "RepairBrokenPod");
            assert!(
                message.contains("repaired") && message.contains("4242"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.len(), 2);
    assert_eq!(metric(&run.shared, "repair", "success"), 1);
}

#[tokio::test]
async fn repair_mode_skips_what_the_plugin_would_skip() {
    let mut run = controller(RepairMode::Repair);
    feed(
        &mut run,
        vec![Event::Apply(broken_pod("kube-system", "a", "u1"))],
    )
    .await;
    assert!(run.rec.calls().is_empty());
    assert_eq!(metric(&run.shared, "repair", "skip"), 1);
}

#[tokio::test]
async fn failures_are_retried_on_later_events_up_to_the_limit() {
    let mut run = controller(RepairMode::Repair);
    for _ in 0..10 {
        run.rec.redirects.lock().unwrap().push_back(Err(
            "no network namespace has the pod's address"
                .to_string()
                .into(),
        ));
    }
    let sick = broken_pod("ns", "a", "u1");
    feed(&mut run, vec![Event::Apply(sick.clone()); 8]).await;
    let redirects = run.rec.redirects();
    assert_eq!(redirects as u32, MAX_ATTEMPTS);
    assert_eq!(
        metric(&run.shared, "repair", "fail"),
        u64::from(MAX_ATTEMPTS)
    );
    run.rec
        .assert_event_says("failed to repair: no network namespace");

    // A failure then a success: two attempts, then never again.
    let mut run = controller(RepairMode::Repair);
    run.rec
        .redirects
        .lock()
        .unwrap()
        .push_back(Err("not yet".to_string().into()));
    feed(&mut run, vec![Event::Apply(sick); 4]).await;
    let redirects = run.rec.redirects();
    assert_eq!(redirects, 2);
    assert_eq!(metric(&run.shared, "repair", "fail"), 1);
    assert_eq!(metric(&run.shared, "repair", "success"), 1);
}

#[tokio::test]
async fn delete_mode_waits_for_the_plugin_to_be_in_place() {
    let mut run = controller(RepairMode::Delete);
    run.shared.set_ready(false);
    run.controller = Controller::new(
        config(RepairMode::Delete),
        run.rec.clone(),
        run.rec.clone(),
        run.shared.clone(),
    )
    .with_install_wait(Duration::from_millis(150));
    let sick = broken_pod("ns", "a", "u1");
    let started = Instant::now();
    feed(&mut run, vec![Event::Apply(sick.clone())]).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        run.rec.deletes(),
        0,
        "deleted while the plugin is not in place"
    );
    assert_eq!(metric(&run.shared, "delete", "fail"), 1);
    run.rec
        .assert_event_says("not deleted: the plugin is not in place");
    // Ready meanwhile (the installer's first reconcile): the next event deletes it, at once.
    run.shared.set_ready(true);
    let started = Instant::now();
    feed(&mut run, vec![Event::Apply(sick)]).await;
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(run.rec.deletes(), 1);
    assert_eq!(metric(&run.shared, "delete", "success"), 1);
}

#[tokio::test]
async fn a_refused_repair_fails_once_without_retry() {
    let mut run = controller(RepairMode::Repair);
    run.rec
        .redirects
        .lock()
        .unwrap()
        .push_back(Err(RedirectError {
            message:
                "the in-place repair is refused: cannot establish the host's network namespace"
                    .into(),
            retry: false,
        }));
    feed(&mut run, vec![Event::Apply(broken_pod("ns", "a", "u1")); 3]).await;
    assert_eq!(run.rec.redirects(), 1);
    assert_eq!(metric(&run.shared, "repair", "fail"), 1);
    run.rec
        .assert_event_says("failed to repair: the in-place repair is refused");
}

#[tokio::test]
async fn an_invalid_annotation_fails_once_without_retry() {
    let mut run = controller(RepairMode::Repair);
    let mut v = failed(injected("ns", "a", "u1"), 126, "");
    v["metadata"]["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] = json!("x");
    feed(&mut run, vec![Event::Apply(pod(v)); 3]).await;
    assert_eq!(metric(&run.shared, "repair", "fail"), 1);
    assert_eq!(run.rec.redirects(), 0);
}

#[tokio::test]
async fn label_mode_patches_once_and_skips_labelled_pods() {
    let mut run = controller(RepairMode::Label);
    let mut v = failed(injected("ns", "b", "u2"), 126, "");
    v["metadata"]["labels"] = json!({"cni.istio.io/uninitialized": "true"});
    feed(
        &mut run,
        vec![
            Event::Apply(broken_pod("ns", "a", "u1")),
            Event::Apply(broken_pod("ns", "a", "u1")),
            Event::Apply(pod(v)),
        ],
    )
    .await;
    assert_eq!(
        run.rec.calls(),
        vec![
            Call::Label(
                target("ns", "a", "u1"),
                "cni.istio.io/uninitialized".into(),
                "true".into()
            ),
            event_call("a", "LabelBrokenPod", "pod detected as broken, labeled"),
        ]
    );
    assert_eq!(metric(&run.shared, "label", "success"), 1);
    assert_eq!(metric(&run.shared, "label", "skip"), 1);
}

#[tokio::test]
async fn api_failures_are_recorded_with_their_cause() {
    let mut run = controller(RepairMode::Delete);
    run.rec.answers.lock().unwrap().extend([
        Err(ApiError::Status {
            what: "delete pod ns/a".into(),
            status: 403,
            message: "forbidden".into(),
        }),
        Err(ApiError::NotFound {
            what: "delete pod ns/a".into(),
        }),
    ]);
    let sick = broken_pod("ns", "a", "u1");
    feed(&mut run, vec![Event::Apply(sick.clone()); 3]).await;
    let calls = run.rec.calls();
    assert!(matches!(&calls[1], Call::Event { message, .. }
        if message == "pod detected as broken, but failed to delete: delete pod ns/a: HTTP 403: forbidden"));
    // The second attempt found it gone: a skip, settled, no third attempt.
    assert_eq!(run.rec.deletes(), 2);
    assert_eq!(metric(&run.shared, "delete", "fail"), 1);
    assert_eq!(metric(&run.shared, "delete", "skip"), 1);
}

#[tokio::test]
async fn healthy_deleted_and_other_nodes_pods_are_ignored() {
    let mut run = controller(RepairMode::Delete);
    let mut deleting = failed(injected("ns", "b", "u2"), 126, "");
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let mut elsewhere = failed(injected("ns", "c", "u3"), 126, "");
    elsewhere["spec"]["nodeName"] = json!("node-2");
    feed(
        &mut run,
        vec![
            Event::Apply(pod(injected("ns", "a", "u1"))),
            Event::Apply(pod(deleting)),
            Event::Apply(pod(elsewhere)),
            Event::Delete(broken_pod("ns", "d", "u4")),
        ],
    )
    .await;
    assert!(run.rec.calls().is_empty());
    assert_eq!(run.controller.remembered(), 0);
}

#[tokio::test]
async fn a_relist_forgets_pods_that_went_and_keeps_the_others() {
    let mut run = controller(RepairMode::Repair);
    feed(
        &mut run,
        vec![
            Event::Apply(broken_pod("ns", "a", "u1")),
            Event::Apply(broken_pod("ns", "b", "u2")),
        ],
    )
    .await;
    assert_eq!(run.controller.remembered(), 2);
    // The watch broke; a pod went meanwhile (no Delete event); the other is still broken-looking (its init
    // container has not restarted since the repair): it must not be repaired again.
    let f = filter();
    let relist: Vec<Event<Pod>> = [
        Event::Init,
        Event::InitApply(broken_pod("ns", "b", "u2")),
        Event::InitDone,
    ]
    .iter()
    .filter_map(|e| forwarded(&f, e))
    .collect();
    feed(&mut run, relist).await;
    assert_eq!(run.controller.remembered(), 1);
    let redirects = run.rec.redirects();
    assert_eq!(redirects, 2);
}

#[tokio::test]
async fn the_tap_feeds_the_controller_from_the_watch() {
    let (tap, mut rx) = Tap::new(filter());
    let events = vec![
        Event::Init,
        Event::InitApply(pod(injected("ns", "ok", "u0"))),
        Event::InitDone,
        Event::Apply(pod(injected("ns", "a", "u1"))),
        Event::Apply(broken_pod("ns", "a", "u1")),
    ];
    let cache = crate::podcache::PodCache::new();
    let stream = futures::stream::iter(events.into_iter().map(Ok::<_, String>));
    cache
        .feed_observed(stream, |ev| tap.observe(ev))
        .await
        .unwrap();
    drop(tap);
    let mut run = controller(RepairMode::Delete);
    run.controller
        .run(futures::stream::poll_fn(|cx| rx.poll_recv(cx)))
        .await;
    assert_eq!(run.rec.deletes(), 1);
    // The cache saw everything too.
    assert_eq!(cache.len(), 2);
}
