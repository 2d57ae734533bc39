//! The real `node-agent`'s shutdown against the HTTPS API stub (root): on SIGTERM it reads its own DaemonSet
//! (`istio-system/istio-cni-node`, the fixture's POD_NAMESPACE and the default DAEMONSET_NAME) and either removes the
//! entry, the kubeconfig and the binary (the DaemonSet is gone, being deleted, or the token is refused) or leaves them
//! byte for byte for the next agent (present, or no answer within SHUTDOWN_CHECK_SECONDS: 403, slow). The stub's
//! request log shows the only call the shutdown makes: GETs of that one DaemonSet.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use meshcni_tests::agent::{Agent, Node};
use meshcni_tests::apiserver::{sample_daemonset, ApiServer, Fault, RequestKind};
use serde_json::Value;

const NS: &str = "istio-system";
const DS: &str = "istio-cni-node";
/// The check's time in these tests.
const CHECK_SECONDS: u64 = 2;
/// What a shutdown may take beyond the check (the run dir's lock, the cleanup, the process exit).
const MARGIN: Duration = Duration::from_millis(1500);

/// What the agent installed: the conflist, the binary, the kubeconfig.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    conflist: Vec<u8>,
    binary: Vec<u8>,
    kubeconfig: Vec<u8>,
}

fn conflist(node: &Node) -> PathBuf {
    node.conf.join("10-bridge.conflist")
}

fn installed(node: &Node) -> Installed {
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Installed {
        conflist: read(conflist(node)),
        binary: read(node.bin.join("istio-cni")),
        kubeconfig: read(node.kubeconfig()),
    }
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("the conflist parses")
}

/// One shutdown: an agent installs on a fresh node, `setup` scripts the stub, SIGTERM.
struct Shutdown {
    node: Node,
    srv: ApiServer,
    /// The conflist before the agent inserted its entry.
    original: Value,
    before: Installed,
    status: ExitStatus,
    took: Duration,
    log: String,
}

impl Shutdown {
    fn run(tag: &str, setup: impl FnOnce(&ApiServer)) -> Shutdown {
        let srv = ApiServer::start().expect("start the API stub");
        let node = Node::new(tag, &srv);
        let original = json(&std::fs::read(conflist(&node)).unwrap());
        let mut agent = start(&node, &srv, "istio-cni-node-test");
        agent.wait_ready();
        let before = installed(&node);
        setup(&srv);
        let (status, took) = agent.terminate();
        let log = agent.log_text();
        Shutdown {
            node,
            srv,
            original,
            before,
            status,
            took,
            log,
        }
    }

    /// The shutdown's requests: each must be a GET of the agent's own DaemonSet; how many there were.
    fn daemonset_gets(&self) -> usize {
        let log = self.srv.request_log();
        for r in &log {
            assert!(
                r.method == "GET"
                    && r.kind
                        == RequestKind::DaemonSetGet {
                            namespace: NS.into(),
                            name: DS.into(),
                        },
                "an API call other than the GET of {NS}/{DS}: {r:?}"
            );
        }
        log.len()
    }

    #[track_caller]
    fn assert_left_in_place(&self) {
        assert!(self.status.success(), "{}; log:\n{}", self.status, self.log);
        assert_eq!(
            installed(&self.node),
            self.before,
            "the files changed on shutdown; log:\n{}",
            self.log
        );
        assert!(self.log.contains("left in place"), "{}", self.log);
    }

    #[track_caller]
    fn assert_uninstalled(&self) {
        assert!(self.status.success(), "{}; log:\n{}", self.status, self.log);
        let after = std::fs::read(conflist(&self.node)).unwrap();
        assert_eq!(json(&after), self.original, "log:\n{}", self.log);
        assert!(!self.node.bin.join("istio-cni").exists(), "{}", self.log);
        assert!(!self.node.kubeconfig().exists(), "{}", self.log);
        assert!(self.log.contains("cleanup complete"), "{}", self.log);
    }

    #[track_caller]
    fn assert_within_the_check(&self) {
        let bound = Duration::from_secs(CHECK_SECONDS) + MARGIN;
        assert!(
            self.took <= bound,
            "the shutdown took {:?} (bound {bound:?}); log:\n{}",
            self.took,
            self.log
        );
    }
}

/// The agent on `node`, asking `srv` on shutdown within [`CHECK_SECONDS`]. No pod cache, no repair: the shutdown's
/// read is the only API call it makes.
fn start(node: &Node, srv: &ApiServer, pod: &str) -> Agent {
    let seconds = CHECK_SECONDS.to_string();
    Agent::start_with(
        node,
        srv,
        &[
            ("POD_CACHE_ENABLED", "false"),
            ("REPAIR_ENABLED", "false"),
            ("SHUTDOWN_CHECK_SECONDS", seconds.as_str()),
            ("POD_NAME", pod),
        ],
    )
}

/// A restart (the DaemonSet is there): everything stays, byte for byte; the next agent finds it right and rewrites
/// nothing; once the DaemonSet is being deleted, that agent's SIGTERM removes it all.
#[test]
fn a_restart_leaves_everything_for_the_next_agent_and_a_deletion_uninstalls() {
    let restart = Shutdown::run("restart", |srv| {
        srv.set_daemonset(sample_daemonset(NS, DS, false)).unwrap();
    });
    restart.assert_left_in_place();
    assert_eq!(restart.daemonset_gets(), 1);
    assert!(
        restart
            .log
            .contains("the DaemonSet is still there: a restart or an upgrade"),
        "{}",
        restart.log
    );
    restart.assert_within_the_check();
    let node = &restart.node;
    let stamp = |p: PathBuf| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(p).unwrap();
        (md.ino(), md.mtime_nsec())
    };
    let files = || {
        [
            stamp(conflist(node)),
            stamp(node.bin.join("istio-cni")),
            stamp(node.kubeconfig()),
        ]
    };
    let before = files();
    // The next agent (the DaemonSet's new pod).
    let mut next = start(node, &restart.srv, "istio-cni-node-next");
    next.wait_ready();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        files(),
        before,
        "the next agent rewrote files that were right"
    );
    restart
        .srv
        .set_daemonset(sample_daemonset(NS, DS, true))
        .unwrap();
    let (status, _) = next.terminate();
    let log = next.log_text();
    assert!(status.success(), "{log}");
    assert!(log.contains("the DaemonSet is being deleted"), "{log}");
    assert!(!node.bin.join("istio-cni").exists() && !node.kubeconfig().exists());
    assert_eq!(
        json(&std::fs::read(conflist(node)).unwrap()),
        restart.original
    );
}

#[test]
fn a_deleted_daemonset_uninstalls() {
    let gone = Shutdown::run("gone", |_| {});
    gone.assert_uninstalled();
    assert_eq!(gone.daemonset_gets(), 1);
    assert!(gone.log.contains("the DaemonSet is gone"), "{}", gone.log);
}

/// 401: the service account is gone (an uninstall), and the kubeconfig we would leave carries the refused token.
#[test]
fn a_refused_token_uninstalls() {
    let refused = Shutdown::run("401", |srv| {
        srv.set_daemonset(sample_daemonset(NS, DS, false)).unwrap();
        srv.push_fault(Fault::Status(401));
    });
    refused.assert_uninstalled();
    assert_eq!(refused.daemonset_gets(), 1);
    assert!(
        refused.log.contains("the agent's token is refused"),
        "{}",
        refused.log
    );
}

/// 403 for the whole check: no answer, everything stays (fail closed), within the check's time, with a warning that
/// names the status and the files.
#[test]
fn forbidden_leaves_everything_in_place_within_the_check_time() {
    let forbidden = Shutdown::run("403", |srv| {
        srv.push_faults(100, Fault::Status(403));
    });
    forbidden.assert_left_in_place();
    forbidden.assert_within_the_check();
    let gets = forbidden.daemonset_gets();
    assert!(gets >= 3, "a 403 is asked again: {gets} GET(s)");
    assert!(
        forbidden.log.contains("HTTP 403") && forbidden.log.contains("WARN"),
        "{}",
        forbidden.log
    );
    assert!(
        forbidden.log.contains("istio-cni-kubeconfig"),
        "the warning names the files: {}",
        forbidden.log
    );
}

/// An uninstall that deletes the role a moment before the DaemonSet: 403, then 404. Asking again sees it.
#[test]
fn forbidden_then_gone_uninstalls() {
    let later = Shutdown::run("403-404", |srv| {
        srv.push_faults(2, Fault::Status(403));
    });
    later.assert_uninstalled();
    assert_eq!(later.daemonset_gets(), 3);
}

/// An API server slower than the check: everything stays, and the shutdown still ends within the check's time.
#[test]
fn a_slow_api_server_leaves_everything_in_place_within_the_check_time() {
    let slow = Shutdown::run("slow", |srv| {
        srv.set_daemonset(sample_daemonset(NS, DS, true)).unwrap();
        srv.push_faults(10, Fault::Delay(Duration::from_secs(30)));
    });
    slow.assert_left_in_place();
    slow.assert_within_the_check();
    assert!(slow.log.contains("no answer within"), "{}", slow.log);
}

/// A 5xx may pass: it is asked again, and the answer after it decides (here: present, a restart).
#[test]
fn a_server_error_is_asked_again() {
    let flaky = Shutdown::run("500", |srv| {
        srv.set_daemonset(sample_daemonset(NS, DS, false)).unwrap();
        srv.push_fault(Fault::Status(500));
    });
    flaky.assert_left_in_place();
    assert_eq!(flaky.daemonset_gets(), 2);
    assert!(
        flaky.log.contains("the DaemonSet is still there"),
        "{}",
        flaky.log
    );
}
