//! The real `istio-cni` binary against an API server that misbehaves (root): slow beyond the lookup deadline,
//! stuck in the middle of its answer, cutting its answer short, flapping between refused or reset connections and
//! HTTP 5xx, answering garbage, a Pod of another name or namespace, or a Pod of another UID than the runtime's
//! `K8S_POD_UID`. Every ADD of an injected pod must fail closed: a CNI error on stdout (stdout holds nothing
//! else), a non-zero exit, a message that names what was wrong (the status or the cause, the pod, the server),
//! within the deadline plus a small margin (measured and printed), and nothing of a capture in the pod's netns on
//! any backend (both iptables flavours, nftables, the TPROXY route). Transient faults are retried until the
//! deadline and then fail with "try again later" (code 11); permanent ones fail at once with code 100 after one
//! request.
//!
//! A server that flaps but gives the right answer within the deadline redirects the pod: that is what Istio's
//! users get from Istio's plugin (it retries every error 30 times, a second apart), and the pod is no less safe
//! for it, since only the server's answer decides. Each test ends with a control: the same pod netns after an ADD
//! against a healthy server holds the rules, so the "nothing installed" checks can see rules when there are some.

use std::time::{Duration, Instant};

use cni_plugin::lookup::FINAL_ATTEMPT;
use meshcni_tests::apiserver::{sample_pod, Fault};
use meshcni_tests::chain::{plugin_bin, Invocation, PluginOutput};
use meshcni_tests::e2e::{for_each_case, StubCluster};
use meshcni_tests::netns::{capture_traces, require_root, TestNetns};
use serde_json::json;

/// `pod_lookup_timeout_seconds` of the failing cases.
const DEADLINE: Duration = Duration::from_secs(2);
/// What an ADD may take beyond its lookup deadline: process start, kubeconfig, TLS, the error's output. Measured
/// here at 8 to 11 ms; the bound leaves room for a loaded machine.
const MARGIN: Duration = Duration::from_millis(1000);
/// A permanent fault must fail well before the deadline (one request, no retry).
const AT_ONCE: Duration = Duration::from_millis(1000);
const NS: &str = "default";
const UID: &str = "6f1c0e2a-0000-4000-8000-00000000c0de";

/// One test's API stub and a pod netns with an address (the control ADD needs one to program the rules).
struct Setup {
    cluster: StubCluster,
    netns: TestNetns,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        require_root();
        let cluster = StubCluster::new(tag);
        let netns = TestNetns::new(tag);
        // A veth pair with both ends inside (no dummy driver needed): eth0 carries the pod's address.
        netns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ]);
        netns.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        Setup { cluster, netns }
    }

    /// Serves an injected pod `name` with UID [`UID`].
    fn serve(&self, name: &str) {
        let mut pod = sample_pod(NS, name);
        pod["metadata"]["uid"] = json!(UID);
        self.cluster.srv.add_pod(pod).expect("add pod");
    }

    /// An ADD of pod `name` into the netns, with `K8S_POD_UID` when `uid` is given; its output and wall time.
    fn add(&self, name: &str, uid: Option<&str>, deadline: Duration) -> (PluginOutput, Duration) {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "cni_agent_run_dir": self.cluster.run_dir, "plugin_log_level": "debug",
            "pod_lookup_timeout_seconds": deadline.as_secs(),
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.200.0.2/24"}], "dns": {}},
        });
        let mut args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={name}");
        if let Some(uid) = uid {
            args.push_str(&format!(";K8S_POD_UID={uid}"));
        }
        let inv = Invocation::new(plugin_bin())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("ctr-{name}"))
            .env("CNI_NETNS", self.netns.path().display().to_string())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env("CNI_ARGS", args)
            .stdin(serde_json::to_vec(&conf).expect("conf"));
        let started = Instant::now();
        let out = inv.run_with_timeout(deadline + Duration::from_secs(20));
        (out, started.elapsed())
    }

    /// The ADD failed closed: a CNI error with `code` is all of stdout, the exit status is non-zero, the netns holds
    /// nothing of a capture. Returns `msg` (with `details` when there are some).
    #[track_caller]
    fn assert_failed_closed(&self, out: &PluginOutput, code: u64) -> String {
        assert!(!out.success, "the ADD succeeded: {out:?}");
        assert_eq!(out.exit_code, Some(1), "{out:?}");
        let err = out.json();
        assert_eq!(err["code"], code, "{err}\nstderr: {}", out.stderr);
        assert_eq!(err["cniVersion"], "1.0.0", "{err}");
        let traces = capture_traces(&self.netns);
        assert!(traces.is_empty(), "a failed ADD left {traces:#?}");
        let msg = err["msg"].as_str().unwrap_or_default().to_string();
        match err["details"].as_str().filter(|d| !d.is_empty()) {
            Some(d) => format!("{msg}; {d}"),
            None => msg,
        }
    }

    /// An ADD of pod `web` that must fail closed with `code` (see [`Setup::assert_failed_closed`]), its message
    /// naming the pod, the server and each of `says`. The message, the output and the wall time.
    #[track_caller]
    fn failing_add(
        &self,
        uid: Option<&str>,
        code: u64,
        says: &[&str],
    ) -> (String, PluginOutput, Duration) {
        let (out, took) = self.add("web", uid, DEADLINE);
        let msg = self.assert_failed_closed(&out, code);
        for word in [format!("{NS}/web"), self.cluster.srv.url()]
            .iter()
            .map(String::as_str)
            .chain(says.iter().copied())
        {
            assert!(msg.contains(word), "{word:?} missing: {msg}");
        }
        (msg, out, took)
    }

    /// The control: against a healthy server, the same ADD programs the rules into the netns.
    fn assert_control_redirects(&self, name: &str, uid: Option<&str>) {
        let (out, _) = self.add(name, uid, DEADLINE);
        assert!(out.success, "control ADD: {out:?}");
        let traces = capture_traces(&self.netns);
        assert!(
            traces.iter().any(|t| t.contains("ISTIO_REDIRECT")),
            "the control ADD installed nothing: {traces:?}"
        );
    }
}

/// A transient fault, repeated for every request, and what the failure must say.
struct Transient {
    label: &'static str,
    /// Sets the fault up (for every request until the deadline).
    arm: fn(&Setup),
    /// Words the message must hold (besides pod and server).
    says: &'static [&'static str],
    /// Words the plugin's log of its retries must hold (a retried fault of each kind was seen).
    retried: &'static [&'static str],
}

const PARTIAL_POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"#;

/// The beginning of a Pod and then nothing more: the connection stays open (`hang`) or is closed.
fn partial_pod(hang: bool) -> Fault {
    Fault::Partial {
        status: 200,
        body: PARTIAL_POD.into(),
        hang,
    }
}

fn transient_cases() -> Vec<Transient> {
    vec![
        Transient {
            label: "slow beyond the deadline (no answer for 60 s)",
            arm: |s| {
                s.cluster
                    .srv
                    .push_faults(100, Fault::Delay(Duration::from_secs(60)))
            },
            says: &["gave up", "no answer from API server"],
            retried: &[],
        },
        Transient {
            label: "stuck half-way through its answer",
            arm: |s| s.cluster.srv.push_faults(100, partial_pod(true)),
            says: &["gave up", "no answer from API server"],
            retried: &[],
        },
        Transient {
            label: "cutting its answer short (body shorter than its content-length)",
            arm: |s| s.cluster.srv.push_faults(100, partial_pod(false)),
            says: &["gave up", "HTTP 200, then reading the body failed"],
            retried: &["reading the body failed"],
        },
        Transient {
            label: "flapping between a reset connection and HTTP 500",
            arm: |s| {
                for _ in 0..50 {
                    s.cluster.srv.push_fault(Fault::Reset);
                    s.cluster.srv.push_fault(Fault::Status(500));
                }
            },
            says: &["gave up", "attempt(s)"],
            retried: &["Connection reset by peer", "HTTP 500"],
        },
        Transient {
            label: "down (connections refused), then HTTP 503 until the deadline",
            arm: |s| {
                s.cluster.srv.push_faults(100, Fault::Status(503));
                s.cluster
                    .srv
                    .refuse_connections_for(Duration::from_millis(400));
            },
            says: &["gave up", "HTTP 503", "injected fault"],
            retried: &["Connection refused", "HTTP 503"],
        },
    ]
}

/// Transient faults are retried until the deadline, then the ADD fails with code 11 ("try again later"), not
/// before the deadline and not much after it, naming the last cause, the pod and the server.
#[test]
fn transient_faults_fail_closed_at_the_deadline() {
    let mut timings = Vec::new();
    for_each_case(
        transient_cases(),
        |c| c.label.to_string(),
        |case| {
            let s = Setup::new("api-transient");
            s.serve("web");
            (case.arm)(&s);
            let (msg, out, took) = s.failing_add(Some(UID), 11, case.says);
            for word in case.retried {
                assert!(
                    out.stderr.contains(word),
                    "{}: no retried attempt with {word:?}:\n{}",
                    case.label,
                    out.stderr
                );
            }
            // Retried until the deadline: the last attempt starts at the latest FINAL_ATTEMPT before it (and an
            // attempt refused at once then ends the lookup that much early).
            assert!(
                took + FINAL_ATTEMPT >= DEADLINE && took <= DEADLINE + MARGIN,
                "{}: the ADD took {took:?} for a deadline of {DEADLINE:?}",
                case.label
            );
            assert!(s.cluster.srv.pod_requests(NS, "web") >= 1);
            timings.push(format!(
                "{}: failed after {} ms (deadline {} ms): {msg}",
                case.label,
                took.as_millis(),
                DEADLINE.as_millis(),
            ));
            // The control: the faults are still queued, so serve a clean cluster into the same netns.
            let healthy = StubCluster::new("api-transient-control");
            healthy.srv.add_pod(sample_pod(NS, "web")).expect("add pod");
            let control = Setup {
                cluster: healthy,
                netns: s.netns,
            };
            control.assert_control_redirects("web", None);
        },
    );
    for t in &timings {
        eprintln!("{t}");
    }
}

/// A permanent fault, answered once, and what the failure must say.
struct Permanent {
    label: &'static str,
    /// The answer to the GET (`None`: the pod as served, for the UID case).
    answer: fn() -> Fault,
    /// The `K8S_POD_UID` the runtime passes.
    uid: Option<&'static str>,
    says: &'static [&'static str],
}

fn ok_with(body: String) -> Fault {
    Fault::Raw {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}

fn permanent_cases() -> Vec<Permanent> {
    vec![
        Permanent {
            label: "garbage JSON (a Pod cut in the middle, complete HTTP answer)",
            answer: || ok_with(PARTIAL_POD.into()),
            uid: Some(UID),
            says: &[
                "invalid answer from API server",
                "HTTP 200 with a body that is not a Pod",
            ],
        },
        Permanent {
            label: "not JSON at all",
            answer: || ok_with("<html><body>502 Bad Gateway</body></html>".into()),
            uid: Some(UID),
            says: &["HTTP 200 with a body that is not a Pod"],
        },
        Permanent {
            label: "JSON of the wrong shape",
            answer: || ok_with(r#"{"kind":"Pod","metadata":"web","spec":[1,2,3]}"#.into()),
            uid: Some(UID),
            says: &["HTTP 200 with a body that is not a Pod"],
        },
        Permanent {
            label: "a Pod of another name",
            answer: || ok_with(sample_pod(NS, "web-other").to_string()),
            uid: None,
            says: &["HTTP 200 with pod \"default\"/\"web-other\" instead"],
        },
        Permanent {
            label: "a Pod of another namespace",
            answer: || ok_with(sample_pod("other-ns", "web").to_string()),
            uid: None,
            says: &["HTTP 200 with pod \"other-ns\"/\"web\" instead"],
        },
        Permanent {
            label: "a Pod of another UID than K8S_POD_UID (recreated under the same name)",
            answer: || {
                let mut pod = sample_pod(NS, "web");
                pod["metadata"]["uid"] = json!("uid-of-the-new-pod");
                ok_with(pod.to_string())
            },
            uid: Some(UID),
            says: &[
                "has uid \"uid-of-the-new-pod\"",
                "not the runtime's K8S_POD_UID \"6f1c0e2a-0000-4000-8000-00000000c0de\"",
            ],
        },
    ]
}

/// Answers that are not the pod asked for fail at once (one request) with code 100, naming what was wrong.
#[test]
fn wrong_answers_fail_closed_at_once() {
    let mut timings = Vec::new();
    for_each_case(
        permanent_cases(),
        |c| c.label.to_string(),
        |case| {
            let s = Setup::new("api-permanent");
            s.serve("web");
            s.cluster.srv.push_fault((case.answer)());
            let (msg, _, took) = s.failing_add(case.uid, 100, case.says);
            assert_eq!(s.cluster.srv.pod_requests(NS, "web"), 1, "{}", case.label);
            assert!(took < AT_ONCE, "{}: took {took:?}", case.label);
            timings.push(format!(
                "{}: failed after {} ms: {msg}",
                case.label,
                took.as_millis()
            ));
            // The control: the same pod, the right answer (the fault is consumed), with the same K8S_POD_UID.
            s.assert_control_redirects("web", case.uid);
        },
    );
    for t in &timings {
        eprintln!("{t}");
    }
}

/// A server that flaps but answers within the deadline: the ADD redirects the pod (Istio's users get the same
/// from Istio's plugin, which retries every error 30 times, a second apart). Refused for 400 ms (every attempt
/// then is refused by the kernel), then HTTP 500 and 503, then the pod: four or more attempts, the last three
/// reaching the server, within a deadline of 5 s. And alternating reset connections and HTTP 500 twice, then
/// the pod. Both logged as retried, both within the deadline.
#[test]
fn a_flapping_server_that_answers_within_the_deadline_redirects_the_pod() {
    let deadline = Duration::from_secs(5);
    let s = Setup::new("api-flap");
    s.serve("web");
    s.cluster.srv.push_fault(Fault::Status(500));
    s.cluster.srv.push_fault(Fault::Status(503));
    s.cluster
        .srv
        .refuse_connections_for(Duration::from_millis(400));
    let (out, took) = s.add("web", Some(UID), deadline);
    assert!(out.success, "{out:?}");
    assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);
    assert!(out.stderr.contains("HTTP 503"), "{}", out.stderr);
    assert_eq!(s.cluster.srv.pod_requests(NS, "web"), 3);
    assert_eq!(s.cluster.srv.pending_faults(), 0);
    assert!(took < deadline, "{took:?}");
    let traces = capture_traces(&s.netns);
    assert!(
        traces.iter().any(|t| t.contains("ISTIO_REDIRECT")),
        "{traces:?}"
    );
    eprintln!(
        "refused 400 ms, 500, 503, then the pod: redirected after {} ms",
        took.as_millis()
    );

    let s = Setup::new("api-flap-reset");
    s.serve("web");
    for _ in 0..2 {
        s.cluster.srv.push_fault(Fault::Reset);
        s.cluster.srv.push_fault(Fault::Status(500));
    }
    let (out, took) = s.add("web", Some(UID), deadline);
    assert!(out.success, "{out:?}");
    assert!(
        out.stderr.contains("Connection reset by peer") && out.stderr.contains("HTTP 500"),
        "{}",
        out.stderr
    );
    assert_eq!(s.cluster.srv.pending_faults(), 0);
    assert!(s.cluster.srv.connections_reset() >= 1);
    assert!(took < deadline, "{took:?}");
    assert!(!capture_traces(&s.netns).is_empty());
    eprintln!(
        "reset, 500, reset, 500, then the pod: redirected after {} ms",
        took.as_millis()
    );
}
