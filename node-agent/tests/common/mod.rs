//! Fixture for the agent's end-to-end tests: a temp directory laid out like a node (CNI conf dir, host bin dir, run
//! dir, the image's source bin dir, a service-account dir with kubelet's projected-volume `..data` layout) and the
//! real `node-agent` binary started against it, its log captured to a file. Every wait is bounded.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_node-agent");
pub const PLUGIN_BYTES: &[u8] = b"#!/bin/sh\n# stand-in for the istio-cni plugin binary\nexit 0\n";
pub const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.first-token.sig";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A file of the Istio compatibility corpus.
pub use cni_plugin::compat::path as corpus;

pub fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `f` every `step` until it returns `Some`, or panics after `limit` naming `what`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    step: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(step);
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// GET over HTTP/1.0 on loopback: (status, body), or None when nothing listens yet.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<tmp>/meshcni-<tag>-<pid>`, fresh.
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("meshcni-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs in the agent's process between fork and exec (async-signal-safe calls only).
pub type PreExec = Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>;

/// A node's directories.
pub struct Node {
    pub root: PathBuf,
    pub conf: PathBuf,
    pub bin: PathBuf,
    pub src: PathBuf,
    pub run: PathBuf,
    pub sa: PathBuf,
    sa_gen: u32,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let root = std::env::temp_dir().join(format!(
            "meshcni-agent-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&root);
        let node = Node {
            conf: root.join("etc/cni/net.d"),
            bin: root.join("opt/cni/bin"),
            src: root.join("image/opt/cni/bin"),
            run: root.join("var/run/istio-cni"),
            sa: root.join("secrets/serviceaccount"),
            root,
            sa_gen: 0,
        };
        for d in [&node.conf, &node.bin, &node.src, &node.sa] {
            fs::create_dir_all(d).unwrap();
        }
        let plugin = node.src.join("istio-cni");
        fs::write(&plugin, PLUGIN_BYTES).unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
        // A binary of the primary CNI in the host bin dir: never ours to touch.
        fs::write(node.bin.join("bridge"), b"bridge").unwrap();
        let mut node = node;
        let ca = fs::read(corpus("install/kube-ca.crt")).unwrap();
        node.project_sa(TOKEN, &ca);
        for name in ["token", "ca.crt", "namespace"] {
            symlink(format!("..data/{name}"), node.sa.join(name)).unwrap();
        }
        node
    }

    /// Kubelet's atomic writer: a new timestamped dir, `..data_tmp` pointing at it renamed over `..data`, the old
    /// dir removed.
    pub fn project_sa(&mut self, token: &str, ca: &[u8]) {
        self.sa_gen += 1;
        let dir_name = format!("..2026_01_01_00_00_{:02}.{:09}", self.sa_gen, self.sa_gen);
        let dir = self.sa.join(&dir_name);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("token"), token).unwrap();
        fs::write(dir.join("ca.crt"), ca).unwrap();
        fs::write(dir.join("namespace"), "kube-system").unwrap();
        let old = fs::read_link(self.sa.join("..data")).ok();
        symlink(&dir_name, self.sa.join("..data_tmp")).unwrap();
        fs::rename(self.sa.join("..data_tmp"), self.sa.join("..data")).unwrap();
        if let Some(old) = old {
            fs::remove_dir_all(self.sa.join(old)).unwrap();
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.run.join("istio-cni-kubeconfig")
    }

    pub fn plugin(&self) -> PathBuf {
        self.bin.join("istio-cni")
    }

    /// Writes a file into the conf dir from the corpus.
    pub fn put(&self, name: &str, corpus_rel: &str) -> PathBuf {
        let p = self.conf.join(name);
        fs::copy(corpus(corpus_rel), &p).unwrap();
        p
    }

    /// Names in a dir containing `.tmp` (a leftover temp file).
    pub fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| n.contains(".tmp"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts that no write left a temp file in the conf, bin or run dir.
    #[track_caller]
    pub fn assert_no_temp_files(&self) {
        for dir in [&self.conf, &self.bin, &self.run] {
            assert!(
                Self::temp_files(dir).is_empty(),
                "temp files in {}",
                dir.display()
            );
        }
    }

    /// Environment for an agent on this node, loopback ports, no ambient variables of the test process.
    pub fn env(&self, health: u16, metrics: u16) -> Vec<(String, String)> {
        [
            ("MOUNTED_CNI_NET_DIR", self.conf.display().to_string()),
            ("MOUNTED_CNI_BIN_DIR", self.bin.display().to_string()),
            ("CNI_BINARIES_SOURCE_DIR", self.src.display().to_string()),
            ("CNI_AGENT_RUN_DIR", self.run.display().to_string()),
            ("SERVICE_ACCOUNT_DIR", self.sa.display().to_string()),
            ("KUBERNETES_SERVICE_HOST", "10.110.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", "443".to_string()),
            ("KUBERNETES_NODE_NAME", "node-1".to_string()),
            ("EXCLUDE_NAMESPACES", "istio-system".to_string()),
            ("LOG_LEVEL", "debug".to_string()),
            ("HEALTH_PORT", health.to_string()),
            ("MONITORING_PORT", metrics.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_string()),
            // 10.110.0.1 is only a name in the kubeconfig: nothing may connect to it (the pod cache would).
            ("POD_CACHE_ENABLED", "false".to_string()),
            // The repair controller shares that watch: off too.
            ("REPAIR_ENABLED", "false".to_string()),
            // Nor may the shutdown ask it for the DaemonSet: no check, every SIGTERM uninstalls (unless a newer agent
            // owns the node).
            ("DAEMONSET_NAME", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The Istio e2e golden with our run dir in place of the `/tmp` Istio's test used.
    pub fn expected_bytes(&self, corpus_rel: &str) -> String {
        let text = fs::read_to_string(corpus(corpus_rel)).unwrap();
        text.replace(
            "\"cni_agent_run_dir\": \"/tmp\"",
            &format!("\"cni_agent_run_dir\": \"{}\"", self.run.display()),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A running agent; killed (SIGKILL) on drop if still running.
pub struct Agent {
    pub child: Child,
    pub health: u16,
    pub metrics: u16,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(node: &Node, extra: &[(&str, &str)]) -> Agent {
        Self::start_named(node, extra, "agent")
    }

    pub fn start_named(node: &Node, extra: &[(&str, &str)], name: &str) -> Agent {
        Self::spawn(node, extra, name, false)
    }

    /// Starts the agent stopped (SIGSTOP) before it runs any code of its own, so a test knows its pid before it
    /// does anything (its temp names contain it); [`Agent::resume`] lets it go on. A shell stops itself, then
    /// execs the agent, which keeps its pid (a child stopped between fork and exec would block `spawn`, which
    /// waits for the exec).
    pub fn start_paused(node: &Node, extra: &[(&str, &str)], name: &str) -> Agent {
        let agent = Self::spawn(node, extra, name, true);
        let stat = format!("/proc/{}/stat", agent.pid());
        wait_for(
            "the agent's shell to stop before exec",
            Duration::from_secs(10),
            Duration::from_millis(2),
            || {
                let text = fs::read_to_string(&stat).ok()?;
                // The state follows the parenthesised command name.
                let state = text.rsplit_once(')')?.1.split_whitespace().next()?;
                (state == "T").then_some(())
            },
        );
        agent
    }

    /// Lets an agent started with [`Agent::start_paused`] run.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Starts the agent with exactly the environment `env(health_port, metrics_port)` returns (and PATH), none
    /// of this fixture's defaults: for a test that runs the settings of a manifest.
    pub fn start_env(
        node: &Node,
        name: &str,
        env: impl FnOnce(u16, u16) -> Vec<(String, String)>,
    ) -> Agent {
        let (health, metrics) = (free_port(), free_port());
        Self::spawn_with(
            node,
            name,
            false,
            health,
            metrics,
            env(health, metrics),
            None,
        )
    }

    /// Starts the agent with this fixture's environment and `hook` run in its process before exec (to take
    /// privileges away as a container runtime does).
    pub fn start_with_hook(node: &Node, name: &str, hook: PreExec) -> Agent {
        let (health, metrics) = (free_port(), free_port());
        let env = node.env(health, metrics);
        Self::spawn_with(node, name, false, health, metrics, env, Some(hook))
    }

    fn spawn(node: &Node, extra: &[(&str, &str)], name: &str, paused: bool) -> Agent {
        let (health, metrics) = (free_port(), free_port());
        let mut env = node.env(health, metrics);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::spawn_with(node, name, paused, health, metrics, env, None)
    }

    fn spawn_with(
        node: &Node,
        name: &str,
        paused: bool,
        health: u16,
        metrics: u16,
        env: Vec<(String, String)>,
        hook: Option<PreExec>,
    ) -> Agent {
        let log = node.root.join(format!("{name}-{health}.log"));
        let logf = fs::File::create(&log).unwrap();
        let mut cmd = if paused {
            let mut sh = Command::new("/bin/sh");
            sh.args(["-c", "kill -STOP $$ && exec \"$0\"", AGENT]);
            sh
        } else {
            Command::new(AGENT)
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        if let Some(hook) = hook {
            use std::os::unix::process::CommandExt;
            // SAFETY: the hook's contract (PreExec) is the one pre_exec asks for.
            unsafe {
                cmd.pre_exec(hook);
            }
        }
        let child = cmd.spawn().expect("spawn node-agent");
        Agent {
            child,
            health,
            metrics,
            log,
        }
    }

    /// `node-agent status` of this agent on `node` with `args`: (exit code, stdout).
    pub fn status(&self, node: &Node, args: &[&str]) -> (i32, String) {
        let out = Command::new(AGENT)
            .env_clear()
            .envs(node.env(self.health, self.metrics))
            .arg("status")
            .args(args)
            .output()
            .expect("run node-agent status");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn ready(&self) -> Option<bool> {
        http_get(self.health, "/readyz").map(|(s, _)| s == 200)
    }

    pub fn wait_ready(&mut self) {
        let limit = Duration::from_secs(15);
        let start = Instant::now();
        loop {
            if self.ready() == Some(true) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) before ready; log:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > limit {
                panic!("agent not ready after {limit:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether /readyz said 200 within `limit`: `Err` with the exit status if the agent stopped instead.
    pub fn ready_within(&mut self, limit: Duration) -> Result<bool, ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.ready() == Some(true) {
                return Ok(true);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(false)
    }

    /// Waits until the health server answers (ready or not).
    pub fn wait_serving(&mut self) {
        let start = Instant::now();
        while self.ready().is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}); log:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "agent not serving; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `wait_for` that shows the agent's log when it times out.
    pub fn expect<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; agent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .expect("metrics server answers")
            .1
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Sends `sig` and waits (bounded) for the exit.
    pub fn stop(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "agent did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// VmRSS and VmHWM in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Number of `istio-cni` entries in a conflist value.
pub fn entries(v: &Value) -> usize {
    v.get("plugins")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter(|p| p["type"] == "istio-cni").count())
        .unwrap_or(0)
}

/// Does the file parse with exactly one istio-cni entry, last?
pub fn has_entry_last(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    let Some(list) = v.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    entries(&v) == 1 && list.last().is_some_and(|p| p["type"] == "istio-cni")
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
