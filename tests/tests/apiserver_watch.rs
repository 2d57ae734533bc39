//! The API stub's list and watch of pods, asked by kube-runtime's own watcher (the one the agent's pod cache runs),
//! so the stub answers what that watcher really sends: the node's field selector, paging, watch from the list's
//! resource version, events of pods added/changed/removed afterwards, a pod bound to the node later, a clean end
//! of the stream (resumed without a new list), a pause, a refusal. And the request log telling GETs from lists.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use meshcni_tests::apiserver::{pod_path, sample_pod, ApiServer, Fault, RequestKind};
use serde_json::{json, Value};

fn on_node(ns: &str, name: &str, node: &str) -> Value {
    let mut p = sample_pod(ns, name);
    p["spec"]["nodeName"] = json!(node);
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn client(srv: &ApiServer, dir: &std::path::Path) -> kube::Client {
    let kc = dir.join("kubeconfig");
    srv.write_kubeconfig(&kc).expect("kubeconfig");
    let config =
        cni_plugin::lookup::kubeconfig::load_config(&kc, Duration::from_secs(5)).expect("config");
    kube::Client::try_from(config).expect("client")
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshcni-stubwatch-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A name/uid of what an event carries.
fn describe(ev: &Event<Pod>) -> String {
    let name = |p: &Pod| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or(""),
            p.metadata.name.as_deref().unwrap_or("")
        )
    };
    match ev {
        Event::Init => "init".into(),
        Event::InitApply(p) => format!("init-apply {}", name(p)),
        Event::InitDone => "init-done".into(),
        Event::Apply(p) => format!("apply {}", name(p)),
        Event::Delete(p) => format!("delete {}", name(p)),
    }
}

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = watcher::Result<Event<Pod>>> + Send>>;

async fn next(events: &mut Events) -> String {
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(ev))) => describe(&ev),
        Ok(Some(Err(e))) => format!("error {e}"),
        Ok(None) => "end".into(),
        Err(_) => "timeout".into(),
    }
}

/// No event within `d` (a paused or filtered change must not arrive).
async fn quiet(events: &mut Events, d: Duration) -> Option<String> {
    match tokio::time::timeout(d, events.next()).await {
        Err(_) => None,
        Ok(Some(Ok(ev))) => Some(describe(&ev)),
        Ok(Some(Err(e))) => Some(format!("error {e}")),
        Ok(None) => Some("end".into()),
    }
}

#[test]
fn kube_runtime_watcher_lists_pages_and_follows_the_node() {
    let srv = ApiServer::start().expect("stub");
    srv.add_pod(on_node("default", "a", "node-1")).unwrap();
    srv.add_pod(on_node("default", "b", "node-1")).unwrap();
    srv.add_pod(on_node("default", "c", "node-1")).unwrap();
    srv.add_pod(on_node("default", "elsewhere", "node-2"))
        .unwrap();
    let dir = temp_dir("follow");
    rt().block_on(async {
        let api: kube::Api<Pod> = kube::Api::all(client(&srv, &dir).await);
        // Pages of 2: three pods of node-1 take two lists.
        let config = watcher::Config::default()
            .fields("spec.nodeName=node-1")
            .page_size(2);
        let mut events: Events = watcher::watcher(api, config).boxed();
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(next(&mut events).await);
        }
        assert_eq!(
            got,
            [
                "init",
                "init-apply default/a",
                "init-apply default/b",
                "init-apply default/c",
                "init-done"
            ]
        );
        assert_eq!(srv.pod_lists(), 2, "{:?}", srv.request_log());
        // Changes after the watch started.
        srv.add_pod(on_node("default", "d", "node-1")).unwrap();
        assert_eq!(next(&mut events).await, "apply default/d");
        srv.add_pod(on_node("default", "other-node", "node-2"))
            .unwrap();
        let mut changed = on_node("default", "a", "node-1");
        changed["metadata"]["labels"]["v"] = json!("2");
        srv.add_pod(changed).unwrap();
        // node-2's pod is not seen: the next event is a's change.
        assert_eq!(next(&mut events).await, "apply default/a");
        assert!(srv.remove_pod("default", "b"));
        assert_eq!(next(&mut events).await, "delete default/b");
        // A pod created unscheduled, then bound to node-1, arrives when bound.
        let mut pending = sample_pod("default", "late");
        srv.add_pod(pending.clone()).unwrap();
        pending["spec"]["nodeName"] = json!("node-1");
        srv.add_pod(pending).unwrap();
        assert_eq!(next(&mut events).await, "apply default/late");
        assert_eq!(srv.pod_watches(), 1);

        // A stream that ends is resumed from its version: no new list, nothing replayed.
        srv.end_watches();
        assert_eq!(quiet(&mut events, Duration::from_millis(300)).await, None);
        srv.add_pod(on_node("default", "e", "node-1")).unwrap();
        assert_eq!(next(&mut events).await, "apply default/e");
        assert_eq!(srv.pod_watches(), 2, "{:?}", srv.request_log());
        assert_eq!(srv.pod_lists(), 2);

        // Paused: the pods change, the watcher does not hear of it until resumed.
        srv.pause_watches(true);
        assert!(srv.remove_pod("default", "e"));
        assert_eq!(quiet(&mut events, Duration::from_millis(300)).await, None);
        srv.pause_watches(false);
        assert_eq!(next(&mut events).await, "delete default/e");

        // Refused lists and watches: after the stream ends the watcher's new watch fails.
        srv.refuse_list_watch(Some(500));
        srv.end_watches();
        let e = next(&mut events).await;
        assert!(e.starts_with("error") && e.contains("500"), "{e}");
    });
    // The watcher's requests were all lists and watches of /api/v1/pods with the node's selector.
    let log = srv.request_log();
    assert!(!log.is_empty());
    for r in &log {
        assert!(
            matches!(r.kind, RequestKind::PodList | RequestKind::PodWatch),
            "{r:?}"
        );
        assert_eq!(r.path, "/api/v1/pods");
        assert!(
            r.query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "{r:?}"
        );
    }
    assert_eq!(srv.pod_gets(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gets_lists_and_watches_are_told_apart_and_faults_skip_list_watch() {
    let srv = ApiServer::start().expect("stub");
    srv.add_pod(on_node("default", "a", "node-1")).unwrap();
    let dir = temp_dir("kinds");
    rt().block_on(async {
        let c = client(&srv, &dir).await;
        let pods: kube::Api<Pod> = kube::Api::namespaced(c.clone(), "default");
        // A fault queued for the next GET is not consumed by a list.
        srv.push_fault(Fault::Status(503));
        let list = pods.list(&Default::default()).await.expect("list");
        assert_eq!(list.items.len(), 1);
        let rv: u64 = list
            .metadata
            .resource_version
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(rv, srv.resource_version());
        assert_eq!(
            list.items[0].metadata.resource_version.as_deref(),
            Some(rv.to_string().as_str())
        );
        assert_eq!(srv.pending_faults(), 1);
        let e = pods.get("a").await.expect_err("faulted GET");
        assert!(matches!(e, kube::Error::Api(ref s) if s.code == 503), "{e}");
        pods.get("a").await.expect("GET");
        // Unknown fields and label selectors are refused, not ignored.
        let lp = kube::api::ListParams::default().fields("status.phase=Running");
        let e = pods.list(&lp).await.expect_err("unknown field");
        assert!(matches!(e, kube::Error::Api(ref s) if s.code == 400), "{e}");
        let lp = kube::api::ListParams::default().labels("app=a");
        let e = pods.list(&lp).await.expect_err("label selector");
        assert!(matches!(e, kube::Error::Api(ref s) if s.code == 400), "{e}");
        // A watch from version 0 starts with every pod as ADDED; timeoutSeconds ends it.
        let wp = kube::api::WatchParams::default().timeout(1);
        let started = std::time::Instant::now();
        let stream = pods.watch(&wp, "0").await.expect("watch");
        let events: Vec<_> = stream.collect().await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            matches!(&events[0], Ok(kube::api::WatchEvent::Added(p)) if p.metadata.name.as_deref() == Some("a"))
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // From a version: only what changed after it (nothing here).
        let stream = pods.watch(&wp, "1").await.expect("watch from 1");
        let events: Vec<_> = stream.collect().await;
        assert!(events.is_empty(), "{events:?}");
    });
    assert_eq!(srv.pod_gets(), 2);
    assert_eq!(srv.pod_requests("default", "a"), 2);
    assert_eq!(srv.requests(&pod_path("default", "a")), 2);
    assert_eq!(srv.pod_lists(), 3);
    assert_eq!(srv.pod_watches(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pod_dir_is_listed_and_watched() {
    let dir = temp_dir("poddir");
    let pods_dir = dir.join("pods");
    std::fs::create_dir_all(&pods_dir).unwrap();
    std::fs::write(
        pods_dir.join("a.json"),
        on_node("default", "a", "node-1").to_string(),
    )
    .unwrap();
    let srv = ApiServer::builder()
        .pod_dir(&pods_dir)
        .start()
        .expect("stub");
    rt().block_on(async {
        let api: kube::Api<Pod> = kube::Api::all(client(&srv, &dir).await);
        let config = watcher::Config::default().fields("spec.nodeName=node-1");
        let mut events: Events = watcher::watcher(api, config).boxed();
        for want in ["init", "init-apply default/a", "init-done"] {
            assert_eq!(next(&mut events).await, want);
        }
        // A file dropped into the dir is seen by the open watch (it re-reads the dir while idle).
        std::fs::write(
            pods_dir.join("b.json"),
            on_node("default", "b", "node-1").to_string(),
        )
        .unwrap();
        assert_eq!(next(&mut events).await, "apply default/b");
        std::fs::remove_file(pods_dir.join("a.json")).unwrap();
        assert_eq!(next(&mut events).await, "delete default/a");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
