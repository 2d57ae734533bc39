//! The agent-socket protocol, both sides: the agent's `podsock::answer` over its `PodCache` (fed watch events),
//! and the plugin's `lookup::agent::interpret` of the answer line.
//!
//! Input: a script (`meshcni_fuzz::text::socket_ops`): watch events (`init`, `list`, `done`, `apply`, `delete`,
//! `unsync`), the plugin's lookups (`ask NS NAME [UID]`), raw request lines to the agent (`raw`) and raw answer
//! lines to the plugin (`reply`).
//!
//! Invariants: the agent answers in its own version, `unsynced` exactly until a list completes (and after the
//! watch broke), a hit only for the pod of the request's namespace and name as the watch last reported it (its
//! UID and `PodInfo`), a miss for an unknown version or a line it cannot read; the plugin takes a hit only for the
//! UID it was given (when given) and an answer of an unknown version is always a miss; the answer survives its
//! JSON round trip.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use cni_plugin::lookup::agent::{interpret, Answer, Miss, Request, Response, VERSION};
use cni_plugin::lookup::PodRef;
use cni_plugin::pod::PodInfo;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use libfuzzer_sys::fuzz_target;
use meshcni_fuzz::text::{socket_ops, PodFact, SocketOp};
use node_agent::podcache::PodCache;
use node_agent::podsock::answer;
use serde_json::Value;

type Key = (String, String);

/// What the cache must hold: the watch's last word on each pod.
#[derive(Default)]
struct Model {
    synced: bool,
    pods: HashMap<Key, (String, PodInfo)>,
    listing: Option<HashMap<Key, (String, PodInfo)>>,
}

fn pod(f: &PodFact) -> Pod {
    serde_json::from_value(f.pod()).expect("a pod of the script")
}

fn cached(f: &PodFact) -> (Key, (String, PodInfo)) {
    let info = PodInfo::from(&pod(f));
    (
        (f.namespace.clone(), f.name.clone()),
        (f.uid.clone().unwrap_or_default(), info),
    )
}

fn expected(model: &Model, ns: &str, name: &str) -> Answer {
    if !model.synced {
        return Answer::Unsynced;
    }
    match model.pods.get(&(ns.to_string(), name.to_string())) {
        Some((uid, pod)) => Answer::Hit {
            uid: uid.clone(),
            pod: pod.clone(),
        },
        None => Answer::Miss,
    }
}

const PATH: &str = "/var/run/istio-cni/pod-cache.sock";

fuzz_target!(|data: &[u8]| {
    let cache = PodCache::new();
    let mut model = Model::default();
    for op in socket_ops(&String::from_utf8_lossy(data)) {
        match op {
            SocketOp::Init => {
                cache.apply(Event::Init);
                model.listing = Some(HashMap::new());
            }
            SocketOp::List(f) => {
                cache.apply(Event::InitApply(pod(&f)));
                let (k, v) = cached(&f);
                model.listing.get_or_insert_with(HashMap::new).insert(k, v);
            }
            SocketOp::Done => {
                cache.apply(Event::InitDone);
                model.pods = model.listing.take().unwrap_or_default();
                model.synced = true;
            }
            SocketOp::Apply(f) => {
                cache.apply(Event::Apply(pod(&f)));
                let (k, v) = cached(&f);
                model.pods.insert(k, v);
            }
            SocketOp::Delete(f) => {
                cache.apply(Event::Delete(pod(&f)));
                let (k, _) = cached(&f);
                if model
                    .pods
                    .get(&k)
                    .is_some_and(|(uid, _)| f.uid.as_ref().is_none_or(|u| u == uid))
                {
                    model.pods.remove(&k);
                }
            }
            SocketOp::Unsync => {
                cache.mark_unsynced();
                model.synced = false;
                model.listing = None;
            }
            SocketOp::Ask {
                namespace,
                name,
                uid,
            } => {
                let pod_ref = PodRef::new(namespace.clone(), name.clone());
                let line = serde_json::to_vec(&Request {
                    v: VERSION,
                    pod: pod_ref.clone(),
                })
                .expect("request");
                let resp = answer(&cache, &line);
                let want = expected(&model, &namespace, &name);
                assert_eq!(
                    resp,
                    Response::new(want.clone()),
                    "the agent's answer for {pod_ref}"
                );
                let mut wire = serde_json::to_vec(&resp).expect("answer");
                assert_eq!(
                    serde_json::from_slice::<Response>(&wire).expect("answer reads back"),
                    resp
                );
                wire.push(b'\n');
                let got = interpret(Path::new(PATH), &wire, &pod_ref, uid.as_deref());
                match (&want, got) {
                    (Answer::Hit { uid: cached, pod }, Ok(info)) => {
                        assert!(
                            uid.as_ref().is_none_or(|u| u == cached),
                            "a hit for another UID"
                        );
                        assert_eq!(&info, pod);
                    }
                    (
                        Answer::Hit { uid: cached, .. },
                        Err(Miss::UidMismatch {
                            pod,
                            cached: c,
                            wanted,
                        }),
                    ) => {
                        assert_eq!((&pod, &c, Some(&wanted)), (&pod_ref, cached, uid.as_ref()));
                    }
                    (Answer::Miss, Err(Miss::NotCached { pod })) => assert_eq!(pod, pod_ref),
                    (Answer::Unsynced, Err(Miss::Unsynced)) => {}
                    (want, got) => panic!("agent said {want:?}, the plugin read {got:?}"),
                }
            }
            SocketOp::Raw(text) => raw_request(&cache, &model, &text),
            SocketOp::Reply(text) => reply(&text),
        }
        assert_eq!(cache.is_synced(), model.synced);
        if model.synced {
            assert_eq!(cache.len(), model.pods.len());
        }
    }
});

/// A request line from anyone: the answer is about the pod it names, in our version, or a miss.
fn raw_request(cache: &PodCache, model: &Model, text: &str) {
    let resp = answer(cache, text.as_bytes());
    assert_eq!(resp.v, VERSION, "the agent answers in its own version");
    let value: Option<Value> = serde_json::from_str(text).ok();
    let field = |k: &str| value.as_ref().and_then(|v| v.get(k));
    let version = field("v");
    if version.and_then(Value::as_u64) != Some(u64::from(VERSION)) {
        assert_eq!(
            resp.answer,
            Answer::Miss,
            "a request of version {version:?} (or none) is a miss: {text:?}"
        );
        return;
    }
    match &resp.answer {
        Answer::Miss => {}
        Answer::Unsynced => assert!(!model.synced, "unsynced while synced"),
        Answer::Hit { uid, pod } => {
            let (Some(Value::String(ns)), Some(Value::String(name))) =
                (field("namespace"), field("name"))
            else {
                panic!("a hit for a request that names no pod: {text:?}");
            };
            let want = expected(model, ns, name);
            assert_eq!(
                want,
                Answer::Hit {
                    uid: uid.clone(),
                    pod: pod.clone()
                },
                "the hit is not the pod {ns}/{name} of the request {text:?}"
            );
        }
    }
}

/// An answer line from anyone: the plugin takes only a v1 hit for its UID.
fn reply(text: &str) {
    let pod_ref = PodRef::new("ns", "pod");
    let got = interpret(Path::new(PATH), text.as_bytes(), &pod_ref, Some("u"));
    let value: Option<Value> = serde_json::from_str(text).ok();
    let version = value
        .as_ref()
        .and_then(|v| v.get("v"))
        .and_then(Value::as_u64);
    match got {
        Ok(info) => {
            let v = value.expect("a hit is JSON");
            assert_eq!(
                version,
                Some(u64::from(VERSION)),
                "a hit of version {:?}: {text:?}",
                v.get("v")
            );
            assert_eq!(v["status"], "hit");
            assert_eq!(v["uid"], "u", "a hit for another UID: {text:?}");
            let pod: PodInfo = serde_json::from_value(v["pod"].clone()).expect("the hit's pod");
            assert_eq!(info, pod);
        }
        Err(Miss::UnknownVersion { version: v, .. }) => {
            assert_eq!(version, Some(v));
            assert_ne!(v, u64::from(VERSION));
        }
        Err(_) => {
            if let Some(v) = version {
                assert_eq!(
                    v,
                    u64::from(VERSION),
                    "version {v} is not reported as unknown: {text:?}"
                );
            }
        }
    }
}
