//! Recent events of this node, for `node-agent status`: the plugin's last ADD decisions (from its ADD records on
//! the log socket) and the repair controller's last actions. Two bounded rings, newest kept; shared by the tasks
//! through [`crate::server::Shared::events`].

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// How many of each kind are kept.
pub const CAPACITY: usize = 100;

/// One ADD, as the plugin reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddEvent {
    /// RFC 3339, the plugin's time of the record.
    pub at: String,
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
    /// `redirected`, `skipped` or `failed`.
    pub outcome: String,
    /// The metric's reason label (empty when redirected).
    pub reason: String,
    pub backend: String,
    pub latency_seconds: f64,
    /// For a person: the skip reason or the error message.
    pub detail: String,
}

/// One action of the repair controller on a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairEvent {
    /// RFC 3339, when it was recorded.
    pub at: String,
    pub namespace: String,
    pub pod: String,
    /// What was done: `repair`, `delete` or `label` (the metric's `type`).
    pub action: String,
    /// Why, or what was done (e.g. the netns found and programmed, or the error).
    pub reason: String,
    /// Whether it worked: `ok`, or what failed.
    pub result: String,
}

impl RepairEvent {
    /// An event stamped now.
    pub fn new(
        namespace: impl Into<String>,
        pod: impl Into<String>,
        action: impl Into<String>,
        reason: impl Into<String>,
        result: impl Into<String>,
    ) -> Self {
        RepairEvent {
            at: cni_plugin::report::now(),
            namespace: namespace.into(),
            pod: pod.into(),
            action: action.into(),
            reason: reason.into(),
            result: result.into(),
        }
    }
}

/// The two rings.
#[derive(Debug)]
pub struct Events {
    capacity: usize,
    adds: Mutex<VecDeque<AddEvent>>,
    repairs: Mutex<VecDeque<RepairEvent>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(CAPACITY)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A ring of complete values stays usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn push<T>(ring: &Mutex<VecDeque<T>>, capacity: usize, item: T) {
    let mut ring = lock(ring);
    if ring.len() >= capacity.max(1) {
        ring.pop_front();
    }
    ring.push_back(item);
}

fn newest_first<T: Clone>(ring: &Mutex<VecDeque<T>>, n: usize) -> Vec<T> {
    lock(ring).iter().rev().take(n).cloned().collect()
}

impl Events {
    pub fn new(capacity: usize) -> Self {
        Events {
            capacity,
            adds: Mutex::new(VecDeque::new()),
            repairs: Mutex::new(VecDeque::new()),
        }
    }

    pub fn record_add(&self, e: AddEvent) {
        push(&self.adds, self.capacity, e);
    }

    pub fn record_repair(&self, e: RepairEvent) {
        push(&self.repairs, self.capacity, e);
    }

    /// The last `n` ADDs, newest first.
    pub fn adds(&self, n: usize) -> Vec<AddEvent> {
        newest_first(&self.adds, n)
    }

    /// The last `n` repair actions, newest first.
    pub fn repairs(&self, n: usize) -> Vec<RepairEvent> {
        newest_first(&self.repairs, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(pod: &str) -> AddEvent {
        AddEvent {
            at: "2026-01-01T00:00:00.000000Z".into(),
            namespace: "ns".into(),
            pod: pod.into(),
            container_id: "c".into(),
            outcome: "skipped".into(),
            reason: "no_sidecar_status".into(),
            backend: "none".into(),
            latency_seconds: 0.002,
            detail: String::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_returns_them_first() {
        let ev = Events::new(3);
        for i in 0..5 {
            ev.record_add(add(&format!("p{i}")));
        }
        let pods: Vec<_> = ev.adds(10).into_iter().map(|e| e.pod).collect();
        assert_eq!(pods, ["p4", "p3", "p2"]);
        assert_eq!(ev.adds(1)[0].pod, "p4");
        assert!(ev.repairs(10).is_empty());
        ev.record_repair(RepairEvent::new("ns", "a", "label", "exit 126", "ok"));
        ev.record_repair(RepairEvent::new("ns", "b", "delete", "exit 126", "ok"));
        let r = ev.repairs(10);
        assert_eq!((r[0].pod.as_str(), r[1].pod.as_str()), ("b", "a"));
        assert!(r[0].at.parse::<jiff::Timestamp>().is_ok(), "{}", r[0].at);
    }
}
