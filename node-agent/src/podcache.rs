//! The node-scoped pod cache: a watch of the pods bound to this node (`spec.nodeName=<node>`), holding only what
//! the plugin's decision needs (the same [`PodInfo`] its API lookup returns) and each pod's UID, so the plugin can
//! be answered without an API request per pod start.
//!
//! The cache is fed by a stream of watch events ([`PodCache::feed`]), so its tests need no API server. It is
//! *synced* once the watch's initial list is complete (`InitDone`); a watch error marks it unsynced until a new
//! watch has listed everything again: an unsynced cache answers nothing, and the plugin falls back to its own GET.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cni_plugin::pod::PodInfo;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::repair::Tap;

/// A cached pod: its UID and what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPod {
    pub uid: String,
    pub info: PodInfo,
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The watch has not listed every pod yet, or broke: nothing can be said.
    Unsynced,
    /// Synced, and no such pod on this node (yet).
    Miss,
    Hit(CachedPod),
}

type Key = (String, String);

#[derive(Debug, Default)]
struct State {
    synced: bool,
    pods: HashMap<Key, CachedPod>,
    /// The pods of a list in progress (between `Init` and `InitDone`).
    listing: Option<HashMap<Key, CachedPod>>,
}

/// The cache's state as metrics, kept current by the cache.
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    pub synced: prometheus_client::metrics::gauge::Gauge,
    pub pods: prometheus_client::metrics::gauge::Gauge,
}

/// The cache, shared by the watch task (writer) and the socket server (readers).
#[derive(Debug, Default)]
pub struct PodCache {
    state: RwLock<State>,
    metrics: CacheMetrics,
}

fn entry(pod: &Pod) -> Option<(Key, CachedPod)> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    Some((
        (namespace, name),
        CachedPod {
            uid,
            info: PodInfo::from(pod),
        },
    ))
}

impl PodCache {
    pub fn new() -> Arc<Self> {
        Arc::new(PodCache::default())
    }

    /// A cache that keeps `metrics` current.
    pub fn with_metrics(metrics: CacheMetrics) -> Arc<Self> {
        Arc::new(PodCache {
            state: RwLock::default(),
            metrics,
        })
    }

    fn publish(&self, st: &State) {
        self.metrics.synced.set(i64::from(st.synced));
        self.metrics.pods.set(st.pods.len() as i64);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters (each update is
        // one insert or remove): keep serving.
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one watch event.
    pub fn apply(&self, event: Event<Pod>) {
        let mut st = self.write();
        match event {
            Event::Init => st.listing = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let Some((k, v)) = entry(&pod) {
                    st.listing.get_or_insert_with(HashMap::new).insert(k, v);
                }
            }
            Event::InitDone => {
                let listed = st.listing.take().unwrap_or_default();
                st.pods = listed;
                if !st.synced {
                    tracing::info!(
                        pods = st.pods.len(),
                        "pod cache synced: the plugin's lookups are answered from it"
                    );
                }
                st.synced = true;
            }
            Event::Apply(pod) => {
                if let Some((k, v)) = entry(&pod) {
                    st.pods.insert(k, v);
                }
            }
            Event::Delete(pod) => {
                if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
                    let key = (ns.clone(), name.clone());
                    // A delete of an older incarnation must not remove the pod recreated under the same name.
                    let same = st
                        .pods
                        .get(&key)
                        .is_some_and(|c| pod.metadata.uid.as_deref().is_none_or(|u| u == c.uid));
                    if same {
                        st.pods.remove(&key);
                    }
                }
            }
        }
        self.publish(&st);
    }

    /// The watch broke: answer nothing until a new list completes.
    pub fn mark_unsynced(&self) {
        let mut st = self.write();
        st.synced = false;
        st.listing = None;
        self.publish(&st);
    }

    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        let st = self.read();
        if !st.synced {
            return Lookup::Unsynced;
        }
        match st.pods.get(&(namespace.to_string(), name.to_string())) {
            Some(p) => Lookup::Hit(p.clone()),
            None => Lookup::Miss,
        }
    }

    /// Applies the events of `stream` until it ends or yields an error; the error is returned (the cache is then
    /// unsynced) so the caller can start a new watch.
    pub async fn feed<S, E>(&self, stream: S) -> Result<(), E>
    where
        S: Stream<Item = Result<Event<Pod>, E>>,
    {
        self.feed_observed(stream, |_| {}).await
    }

    /// [`PodCache::feed`], showing every event to `observe` first (the repair controller's [`Tap`]: one watch
    /// feeds both).
    pub async fn feed_observed<S, E>(
        &self,
        stream: S,
        mut observe: impl FnMut(&Event<Pod>),
    ) -> Result<(), E>
    where
        S: Stream<Item = Result<Event<Pod>, E>>,
    {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    observe(&ev);
                    self.apply(ev)
                }
                Err(e) => {
                    self.mark_unsynced();
                    return Err(e);
                }
            }
        }
        self.mark_unsynced();
        Ok(())
    }
}

/// First delay before a new watch after one broke; doubles up to [`MAX_REWATCH`].
pub const FIRST_REWATCH: Duration = Duration::from_millis(500);
pub const MAX_REWATCH: Duration = Duration::from_secs(30);

/// Watches the pods of `node` into `cache` (and shows every event to the repair controller's `tap`), forever: a
/// broken watch is logged, the cache marked unsynced, and a new watch (a new list) started after a back-off.
pub async fn watch(client: Client, node: String, cache: Arc<PodCache>, tap: Option<Tap>) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut delay = FIRST_REWATCH;
    loop {
        tracing::info!(%node, "watching the pods of this node");
        let started = std::time::Instant::now();
        let result = cache
            .feed_observed(watcher::watcher(api.clone(), config.clone()), |ev| {
                if let Some(tap) = &tap {
                    tap.observe(ev);
                }
            })
            .await;
        match result {
            Ok(()) => tracing::warn!(%node, "the pod watch ended; starting a new one"),
            Err(e) => {
                tracing::warn!(%node, error = %e, "the pod watch failed; the cache is unsynced until a new one has listed the pods")
            }
        }
        if started.elapsed() > MAX_REWATCH {
            delay = FIRST_REWATCH;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_REWATCH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, uid: &str, injected: bool) -> Pod {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": {}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
        });
        if injected {
            v["metadata"]["annotations"]["sidecar.istio.io/status"] = json!("{}");
            v["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "istio-proxy", "args": ["proxy", "sidecar"]}));
        }
        serde_json::from_value(v).unwrap()
    }

    fn hit(l: Lookup) -> CachedPod {
        match l {
            Lookup::Hit(p) => p,
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    #[test]
    fn nothing_is_answered_before_the_list_is_complete() {
        let c = PodCache::new();
        assert_eq!(c.lookup("ns", "a"), Lookup::Unsynced);
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("ns", "a", "u1", true)));
        assert_eq!(c.lookup("ns", "a"), Lookup::Unsynced);
        c.apply(Event::InitDone);
        let p = hit(c.lookup("ns", "a"));
        assert_eq!(p.uid, "u1");
        assert!(p.info.annotations.contains_key("sidecar.istio.io/status"));
        assert!(p.info.containers.contains("istio-proxy"));
        assert_eq!(c.lookup("ns", "b"), Lookup::Miss);
        assert_eq!(c.lookup("other", "a"), Lookup::Miss);
    }

    #[test]
    fn watch_events_add_update_and_delete() {
        let c = PodCache::new();
        c.apply(Event::Init);
        c.apply(Event::InitDone);
        c.apply(Event::Apply(pod("ns", "a", "u1", false)));
        assert!(!hit(c.lookup("ns", "a"))
            .info
            .containers
            .contains("istio-proxy"));
        c.apply(Event::Apply(pod("ns", "a", "u1", true)));
        assert!(hit(c.lookup("ns", "a"))
            .info
            .containers
            .contains("istio-proxy"));
        c.apply(Event::Delete(pod("ns", "a", "u1", true)));
        assert_eq!(c.lookup("ns", "a"), Lookup::Miss);
        assert!(c.is_empty());
    }

    #[test]
    fn a_late_delete_of_an_older_incarnation_keeps_the_new_pod() {
        let c = PodCache::new();
        c.apply(Event::Init);
        c.apply(Event::InitDone);
        c.apply(Event::Apply(pod("ns", "web-0", "new", true)));
        c.apply(Event::Delete(pod("ns", "web-0", "old", true)));
        assert_eq!(hit(c.lookup("ns", "web-0")).uid, "new");
    }

    #[test]
    fn the_metrics_follow_the_cache() {
        let m = CacheMetrics::default();
        let c = PodCache::with_metrics(m.clone());
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("ns", "a", "u1", true)));
        assert_eq!((m.synced.get(), m.pods.get()), (0, 0));
        c.apply(Event::InitDone);
        assert_eq!((m.synced.get(), m.pods.get()), (1, 1));
        c.apply(Event::Apply(pod("ns", "b", "u2", true)));
        assert_eq!(m.pods.get(), 2);
        c.mark_unsynced();
        assert_eq!(m.synced.get(), 0);
    }

    #[test]
    fn a_relist_replaces_everything() {
        let c = PodCache::new();
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("ns", "a", "u1", true)));
        c.apply(Event::InitApply(pod("ns", "b", "u2", true)));
        c.apply(Event::InitDone);
        assert_eq!(c.len(), 2);
        c.mark_unsynced();
        assert_eq!(c.lookup("ns", "a"), Lookup::Unsynced);
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("ns", "b", "u2", true)));
        // Still unsynced while listing.
        assert_eq!(c.lookup("ns", "b"), Lookup::Unsynced);
        c.apply(Event::InitDone);
        assert_eq!(c.lookup("ns", "a"), Lookup::Miss);
        assert_eq!(hit(c.lookup("ns", "b")).uid, "u2");
    }

    #[tokio::test]
    async fn a_stream_error_unsyncs_the_cache_and_is_returned() {
        let c = PodCache::new();
        let events: Vec<Result<Event<Pod>, String>> = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(pod("ns", "a", "u1", true))),
            Ok(Event::InitDone),
        ];
        assert_eq!(c.feed(futures::stream::iter(events)).await, Ok(()));
        // A stream that ends is a watch that ended: unsynced.
        assert!(!c.is_synced());
        let events: Vec<Result<Event<Pod>, String>> = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(pod("ns", "a", "u1", true))),
            Ok(Event::InitDone),
            Ok(Event::Apply(pod("ns", "b", "u2", true))),
            Err("watch failed: 500".into()),
            Ok(Event::Apply(pod("ns", "c", "u3", true))),
        ];
        let feeding = c.feed(futures::stream::iter(events));
        assert_eq!(feeding.await, Err("watch failed: 500".to_string()));
        assert_eq!(c.lookup("ns", "b"), Lookup::Unsynced);
        // The event after the error was not applied.
        c.apply(Event::Init);
        c.apply(Event::InitDone);
        assert_eq!(c.lookup("ns", "c"), Lookup::Miss);
    }
}
