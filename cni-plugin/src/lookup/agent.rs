//! The node agent's pod cache, asked over a Unix socket before the API server: the agent watches the pods of its
//! node and answers with the same [`PodInfo`] the API lookup returns, so a pod start costs no API request.
//!
//! Protocol, version 1 (documented in README): the plugin connects to `<cni_agent_run_dir>/pod-cache.sock`, writes
//! one JSON line `{"v":1,"namespace":NS,"name":NAME}` and reads one JSON line back:
//! `{"v":1,"status":"hit","uid":UID,"pod":{PodInfo}}`, `{"v":1,"status":"miss"}` (synced, no such pod on the
//! node) or `{"v":1,"status":"unsynced"}` (the agent's watch has not listed every pod, or broke). An answer of a
//! version the plugin does not know is a miss.
//!
//! The plugin trusts an answer only when everything holds; anything else is a [`Miss`] and the plugin does its own
//! GET, so the first pods after a node boots still work and a broken agent can never decide for a pod:
//! - the socket is a socket owned by the plugin's own uid, with no access for group or others (anyone else could
//!   have made it, and answer "no sidecar");
//! - it answers within the deadline (a few ms), in the protocol, with `hit`;
//! - the cached pod's UID equals `K8S_POD_UID` when the runtime passes it (a StatefulSet pod recreated under the
//!   same name is another pod).
//!
//! A miss is never "not injected".

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::PodRef;
use crate::pod::PodInfo;
use crate::sockets::Socket;

/// The socket's name in the agent's run dir.
pub const SOCKET_NAME: &str = "pod-cache.sock";
/// The protocol version this plugin speaks.
pub const VERSION: u32 = 1;
/// How long the plugin waits for the agent's answer, from its request sent. An answer takes microseconds; the
/// margin is for a node busy starting many pods at once, where 10 ms proved too short on 2 cores (the agent waited
/// for a CPU and the plugin fell back to a GET); on a node whose CPUs are all busy it grows
/// ([`MAX_BUSY_DEADLINE`]). A hung agent on a node that is not overloaded costs at most this per pod start.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(25);
/// The longest line either side reads.
pub const MAX_LINE: usize = 256 * 1024;

/// A lookup, as the plugin sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub pod: PodRef,
}

/// The agent's answer, as it sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    #[serde(flatten)]
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Answer {
    Hit { uid: String, pod: PodInfo },
    Miss,
    Unsynced,
}

impl Response {
    pub fn new(answer: Answer) -> Self {
        Response { v: VERSION, answer }
    }
}

/// Why the agent's cache could not be used (the plugin then does its own GET). Each says what and with which value.
#[derive(Debug, thiserror::Error)]
pub enum Miss {
    #[error("no agent socket at {path}")]
    NoSocket { path: PathBuf },
    #[error("cannot stat the agent socket {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a socket")]
    NotSocket { path: PathBuf },
    #[error("the agent socket {path} is owned by uid {owner} with mode {mode:o}; only uid {expected} with no group or other access is trusted")]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        mode: u32,
        expected: u32,
    },
    #[error("cannot connect to the agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {path} did not answer within {deadline:?}: {source}")]
    Io {
        path: PathBuf,
        deadline: Duration,
        source: std::io::Error,
    },
    #[error("the agent at {path} closed the connection without an answer")]
    NoAnswer { path: PathBuf },
    #[error("the agent at {path} answered with protocol version {version}, this plugin speaks {VERSION}")]
    UnknownVersion { path: PathBuf, version: u64 },
    #[error("the agent at {path} answered something that is not protocol {VERSION}: {detail}")]
    Garbage { path: PathBuf, detail: String },
    #[error("the agent's cache has not synced the pods of this node")]
    Unsynced,
    #[error("the agent's cache has no pod {pod}")]
    NotCached { pod: PodRef },
    #[error("the agent's cache holds {pod} with uid {cached}, the runtime starts uid {wanted}")]
    UidMismatch {
        pod: PodRef,
        cached: String,
        wanted: String,
    },
}

impl Miss {
    /// Whether a healthy node meets this miss in its normal life: no agent yet, an agent (re)starting (its socket
    /// refuses until it listens again), its cache still listing, a pod the watch has not brought yet, a pod
    /// recreated under the same name. The others mean an agent that is up and did not answer as it should (too
    /// slow, garbage, another protocol, a socket not ours): worth a warning, each costs the API server a request.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            Miss::NoSocket { .. }
                | Miss::Connect { .. }
                | Miss::Unsynced
                | Miss::NotCached { .. }
                | Miss::UidMismatch { .. }
        )
    }
}

/// Checks that `path` is a socket only the plugin's own uid can use.
fn check_socket(path: &Path) -> Result<(), Miss> {
    let path_buf = || path.to_path_buf();
    match Socket::inspect(path) {
        Socket::Missing => Err(Miss::NoSocket { path: path_buf() }),
        Socket::Unreadable(source) => Err(Miss::Stat {
            path: path_buf(),
            source,
        }),
        Socket::NotSocket => Err(Miss::NotSocket { path: path_buf() }),
        Socket::Found {
            owner,
            mode,
            our_uid,
        } if owner != our_uid || mode & 0o077 != 0 => Err(Miss::WrongOwner {
            path: path_buf(),
            owner,
            mode,
            expected: our_uid,
        }),
        Socket::Found { .. } => Ok(()),
    }
}

/// Interprets the agent's answer line for `pod` (and `uid`, when the runtime passed one).
pub fn interpret(
    path: &Path,
    line: &[u8],
    pod: &PodRef,
    uid: Option<&str>,
) -> Result<PodInfo, Miss> {
    let garbage = |detail: String| Miss::Garbage {
        path: path.to_path_buf(),
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| garbage(e.to_string()))?;
    let version = value
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| garbage("no version \"v\"".into()))?;
    if version != u64::from(VERSION) {
        return Err(Miss::UnknownVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let response: Response = serde_json::from_value(value).map_err(|e| garbage(e.to_string()))?;
    match response.answer {
        Answer::Unsynced => Err(Miss::Unsynced),
        Answer::Miss => Err(Miss::NotCached { pod: pod.clone() }),
        Answer::Hit {
            uid: cached,
            pod: info,
        } => match uid {
            Some(wanted) if wanted != cached => Err(Miss::UidMismatch {
                pod: pod.clone(),
                cached,
                wanted: wanted.to_string(),
            }),
            _ => Ok(info),
        },
    }
}

/// Asks the agent whose run dir is `run_dir` for `pod`: waits at most `deadline` for its answer.
///
/// The deadline counts the time the agent takes, from the request sent to the end of the answer line, not the
/// time this process waits for a CPU: in a burst of pod starts on a busy node the plugin can be preempted between
/// connecting and reading for longer than the deadline, and an answer already waiting in the socket is still
/// taken. The connect itself cannot block: a listener whose backlog is full (an agent that stopped accepting, and
/// a thousand pod starts since) refuses at once instead of holding every later pod start.
pub fn ask(
    run_dir: &Path,
    pod: &PodRef,
    uid: Option<&str>,
    deadline: Duration,
) -> Result<PodInfo, Miss> {
    let path = run_dir.join(SOCKET_NAME);
    check_socket(&path)?;
    let io_err = |source: std::io::Error| Miss::Io {
        path: path.clone(),
        deadline,
        source,
    };
    let stream = connect(&path).map_err(|source| Miss::Connect {
        path: path.clone(),
        source,
    })?;
    let mut line = serde_json::to_vec(&Request {
        v: VERSION,
        pod: pod.clone(),
    })
    .map_err(|e| io_err(std::io::Error::other(e)))?;
    line.push(b'\n');
    // A line this short always fits the socket's buffer: the write does not wait for the agent.
    stream.set_write_timeout(Some(deadline)).map_err(io_err)?;
    (&stream).write_all(&line).map_err(io_err)?;
    let asked = Instant::now();
    let answer =
        read_line(&stream, asked, deadline, busy_node_deadline).map_err(|(source, deadline)| {
            Miss::Io {
                path: path.clone(),
                deadline,
                source,
            }
        })?;
    if answer.is_empty() {
        return Err(Miss::NoAnswer { path });
    }
    if answer.last() != Some(&b'\n') {
        return Err(Miss::Garbage {
            path,
            detail: format!("an unterminated line of {} bytes", answer.len()),
        });
    }
    interpret(&path, &answer, pod, uid)
}

/// Connects to the socket at `path` without ever blocking ([`crate::sockets::connect_now`]: a full backlog is
/// `WouldBlock`), then makes the stream blocking again for the exchange, which timeouts bound.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let stream = crate::sockets::connect_now(path)?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The longest the plugin waits for the agent on a node whose CPUs are all busy ([`busy_node_deadline`]).
pub const MAX_BUSY_DEADLINE: Duration = Duration::from_millis(250);

/// How long to wait for the agent when `deadline` has passed: on a node with more runnable tasks than CPUs (a burst
/// of pod starts) the answer is late because the agent's thread waits for a CPU behind every one of them, not
/// because the agent hangs (50 ADDs at once on 2 CPUs: 1 in ~1,000 answers took longer than 25 ms). Then
/// `deadline` × runnable tasks per CPU, at most [`MAX_BUSY_DEADLINE`]; else `deadline`. Read only then (the
/// kernel's current count of runnable tasks, in /proc/loadavg), so an ADD whose answer is in time pays nothing.
fn busy_node_deadline(deadline: Duration) -> Duration {
    let runnable = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| runnable_tasks(&l));
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    scaled_deadline(deadline, runnable, cpus)
}

/// The runnable tasks of /proc/loadavg ("0.61 0.52 0.40 3/512 4711": 3).
fn runnable_tasks(loadavg: &str) -> Option<usize> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// `deadline` × runnable tasks per CPU (rounded up) when more tasks are runnable than there are CPUs, at most
/// [`MAX_BUSY_DEADLINE`] (never less than `deadline`); `deadline` otherwise or when the count is unknown.
fn scaled_deadline(deadline: Duration, runnable: Option<usize>, cpus: usize) -> Duration {
    let cpus = cpus.max(1);
    match runnable {
        Some(r) if r > cpus => {
            let per_cpu = u32::try_from(r.div_ceil(cpus)).unwrap_or(u32::MAX);
            deadline
                .saturating_mul(per_cpu)
                .min(MAX_BUSY_DEADLINE)
                .max(deadline)
        }
        _ => deadline,
    }
}

/// Reads up to and including the first newline, at most [`MAX_LINE`] bytes, until `deadline` after `asked`:
/// each read waits at most what is left of it, and once it has passed, one last short read takes what has arrived,
/// however late this process runs. When the deadline passes, `busy` may give a longer one, once (a node whose
/// CPUs are all busy). The error carries the deadline that ended the wait.
fn read_line(
    stream: &UnixStream,
    asked: Instant,
    deadline: Duration,
    busy: impl FnOnce(Duration) -> Duration,
) -> Result<Vec<u8>, (std::io::Error, Duration)> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut deadline = deadline;
    let mut busy = Some(busy);
    let mut last_look = false;
    loop {
        let mut left = deadline.saturating_sub(asked.elapsed());
        if left.is_zero() {
            if let Some(longer) = busy.take().map(|f| f(deadline)).filter(|l| *l > deadline) {
                deadline = longer;
                continue;
            }
            if last_look {
                let what = if answer.is_empty() {
                    "no answer".to_string()
                } else {
                    format!("{} bytes and no end of line", answer.len())
                };
                return Err((
                    std::io::Error::new(std::io::ErrorKind::TimedOut, what),
                    deadline,
                ));
            }
            last_look = true;
            left = Duration::from_micros(100);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| (e, deadline))?;
        let want = buf.len().min(MAX_LINE - answer.len());
        let n = match std::io::Read::read(&mut &*stream, &mut buf[..want]) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err((e, deadline)),
        };
        if n == 0 {
            return Ok(answer);
        }
        let got = &buf[..n];
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            answer.extend_from_slice(&got[..=end]);
            return Ok(answer);
        }
        answer.extend_from_slice(got);
        if answer.len() >= MAX_LINE {
            return Ok(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> PodRef {
        PodRef::new("default", "web-0")
    }

    fn info() -> PodInfo {
        let mut pi = PodInfo::default();
        pi.containers.insert("istio-proxy".into());
        pi.annotations
            .insert("sidecar.istio.io/status".into(), "{}".into());
        pi
    }

    fn line(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn the_protocol_on_the_wire() {
        let req = Request { v: 1, pod: pod() };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"v": 1, "namespace": "default", "name": "web-0"})
        );
        let hit = Response::new(Answer::Hit {
            uid: "u1".into(),
            pod: info(),
        });
        let v = serde_json::to_value(&hit).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["status"], "hit");
        assert_eq!(v["uid"], "u1");
        assert!(v["pod"]["annotations"]["sidecar.istio.io/status"].is_string());
        assert_eq!(
            serde_json::to_value(Response::new(Answer::Miss)).unwrap(),
            json!({"v": 1, "status": "miss"})
        );
        assert_eq!(
            serde_json::to_value(Response::new(Answer::Unsynced)).unwrap(),
            json!({"v": 1, "status": "unsynced"})
        );
    }

    #[test]
    fn only_a_hit_of_the_right_uid_is_used() {
        let p = Path::new("/run/x.sock");
        let hit = line(
            serde_json::to_value(Response::new(Answer::Hit {
                uid: "u1".into(),
                pod: info(),
            }))
            .unwrap(),
        );
        assert_eq!(interpret(p, &hit, &pod(), Some("u1")).unwrap(), info());
        assert_eq!(interpret(p, &hit, &pod(), None).unwrap(), info());
        let e = interpret(p, &hit, &pod(), Some("u2")).unwrap_err();
        assert!(matches!(e, Miss::UidMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains("u1") && e.to_string().contains("u2"),
            "{e}"
        );
        assert!(matches!(
            interpret(p, &line(json!({"v": 1, "status": "miss"})), &pod(), None),
            Err(Miss::NotCached { .. })
        ));
        assert!(matches!(
            interpret(
                p,
                &line(json!({"v": 1, "status": "unsynced"})),
                &pod(),
                None
            ),
            Err(Miss::Unsynced)
        ));
        // A node's normal life (a listing cache, a pod the watch has not brought, a recreated pod): no warning.
        for answer in [
            json!({"v": 1, "status": "miss"}),
            json!({"v": 1, "status": "unsynced"}),
        ] {
            assert!(interpret(p, &line(answer), &pod(), None)
                .unwrap_err()
                .is_expected());
        }
        assert!(e.is_expected(), "{e}");
    }

    #[test]
    fn unknown_versions_and_garbage_are_misses() {
        let p = Path::new("/run/x.sock");
        let e = interpret(
            p,
            &line(json!({"v": 2, "status": "hit", "uid": "u", "pod": {}})),
            &pod(),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Miss::UnknownVersion { version: 2, .. }), "{e}");
        assert!(!e.is_expected(), "{e}");
        for bad in [
            b"not json".to_vec(),
            line(json!({"status": "hit"})),
            line(json!({"v": "1", "status": "hit"})),
            line(json!({"v": 1, "status": "maybe"})),
            // A hit without what the decision needs is not "a pod without annotations".
            line(json!({"v": 1, "status": "hit", "uid": "u", "pod": {}})),
            line(json!({"v": 1, "status": "hit", "pod": info()})),
        ] {
            let e = interpret(p, &bad, &pod(), None).unwrap_err();
            assert!(matches!(e, Miss::Garbage { .. }), "{e}");
            assert!(!e.is_expected(), "{e}");
        }
    }

    #[test]
    fn an_answer_waiting_is_taken_however_late_the_plugin_reads_it() {
        // The plugin preempted for a second between its request and its read (`asked` long past): the answer the
        // agent sent meanwhile is still taken.
        let (mut agent, plugin) = UnixStream::pair().unwrap();
        agent.write_all(b"{\"v\":1}\nmore").unwrap();
        let asked = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        let line = read_line(&plugin, asked, Duration::from_millis(25), |d| d).unwrap();
        assert_eq!(line, b"{\"v\":1}\n");
        // Nothing sent, nothing closed: the read gives up after the deadline.
        let (_agent, plugin) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let (e, d) =
            read_line(&plugin, Instant::now(), Duration::from_millis(30), |d| d).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(d, Duration::from_millis(30));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_busy_node_gives_a_late_answer_more_time_once() {
        // The answer comes after 80 ms; the deadline is 25 ms, and the node is busy: 200 ms.
        let (mut agent, plugin) = UnixStream::pair().unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(80));
            agent.write_all(b"{}\n").unwrap();
            agent
        });
        let mut asked_busy = 0;
        let line = read_line(&plugin, Instant::now(), Duration::from_millis(25), |d| {
            asked_busy += 1;
            assert_eq!(d, Duration::from_millis(25));
            Duration::from_millis(200)
        })
        .unwrap();
        assert_eq!((line.as_slice(), asked_busy), (&b"{}\n"[..], 1));
        let _agent = late.join().unwrap();
        // A quiet node (no more time): the same late answer is a timeout at 25 ms.
        let (mut agent, plugin) = UnixStream::pair().unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(80));
            let _ = agent.write_all(b"{}\n");
        });
        let t = Instant::now();
        let (e, d) =
            read_line(&plugin, Instant::now(), Duration::from_millis(25), |d| d).unwrap_err();
        assert_eq!(
            (e.kind(), d),
            (std::io::ErrorKind::TimedOut, Duration::from_millis(25))
        );
        assert!(t.elapsed() < Duration::from_millis(75), "{:?}", t.elapsed());
        drop(plugin);
        late.join().unwrap();
    }

    #[test]
    fn the_deadline_grows_with_the_runnable_tasks_per_cpu_up_to_a_bound() {
        let d = Duration::from_millis(25);
        assert_eq!(runnable_tasks("0.61 0.52 0.40 3/512 4711\n"), Some(3));
        assert_eq!(runnable_tasks("garbage"), None);
        assert_eq!(
            scaled_deadline(d, Some(2), 2),
            d,
            "as many runnable as CPUs: not busy"
        );
        assert_eq!(scaled_deadline(d, None, 2), d);
        assert_eq!(
            scaled_deadline(d, Some(5), 2),
            Duration::from_millis(75),
            "3 per CPU"
        );
        assert_eq!(
            scaled_deadline(d, Some(52), 2),
            MAX_BUSY_DEADLINE,
            "a burst of 50 on 2 CPUs"
        );
        assert_eq!(
            scaled_deadline(d, Some(3), 0),
            Duration::from_millis(75),
            "0 CPUs counts as 1"
        );
        let long = Duration::from_secs(1);
        assert_eq!(
            scaled_deadline(long, Some(50), 2),
            long,
            "never shorter than asked"
        );
    }

    #[test]
    fn an_agent_that_drips_its_answer_is_bounded_by_the_deadline_in_all() {
        let (mut agent, plugin) = UnixStream::pair().unwrap();
        let dripper = std::thread::spawn(move || {
            // A byte every 5 ms, never a newline, for far longer than the deadline.
            for _ in 0..100 {
                if agent.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let t = Instant::now();
        let (e, _) =
            read_line(&plugin, Instant::now(), Duration::from_millis(40), |d| d).unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(
            took < Duration::from_millis(200),
            "{took:?}: every byte restarted the wait"
        );
        drop(plugin);
        dripper.join().unwrap();
    }

    #[test]
    fn a_full_backlog_is_a_miss_at_once_not_a_hang() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshcni-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        // An agent that stopped accepting: its listener's backlog (0: one pending connection) is full.
        let _listener = crate::report::tests::listener_with_backlog(&path, 0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut pending = Vec::new();
        while let Ok(s) = connect(&path) {
            pending.push(s);
            assert!(pending.len() < 64, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = dir.clone();
        std::thread::spawn(move || {
            let _ = tx.send(ask(&p, &pod(), None, Duration::from_millis(25)));
        });
        let e = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the lookup hung on a full backlog")
            .unwrap_err();
        assert!(
            matches!(&e, Miss::Connect { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
            "{e}"
        );
        drop(pending);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_private_socket_of_our_uid_is_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshcni-agentsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        let e = check_socket(&path).unwrap_err();
        assert!(matches!(e, Miss::NoSocket { .. }) && e.is_expected(), "{e}");
        std::fs::write(&path, "").unwrap();
        let e = check_socket(&path).unwrap_err();
        assert!(
            matches!(e, Miss::NotSocket { .. }) && !e.is_expected(),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_socket(&path).unwrap_err();
        assert!(
            matches!(e, Miss::WrongOwner { mode: 0o666, .. }) && !e.is_expected(),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_socket(&path).unwrap();
        // A refused connection (no one accepting) is a miss; a listener that never answers runs into the deadline.
        // 300 ms, not the plugin's few: under a loaded test run the connect alone has taken longer than 30 ms, and
        // the test is about what happens after it.
        let e = ask(&dir, &pod(), None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, Miss::Io { .. }) && !e.is_expected(), "{e}");
        drop(_listener);
        let e = ask(&dir, &pod(), None, Duration::from_millis(30)).unwrap_err();
        // The agent restarting: its socket is there, no one listens yet.
        assert!(matches!(e, Miss::Connect { .. }) && e.is_expected(), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
