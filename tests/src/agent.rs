//! The real `node-agent` binary against the API stub, for the end-to-end tests of the plugin with the agent: a
//! temp directory laid out like a node (CNI conf dir with a primary conflist, host bin dir, run dir, the image's
//! bin dir holding the built `istio-cni`, a service-account dir with the stub's token and CA) and the agent
//! started on it, pointed at the stub on 127.0.0.1 (`KUBERNETES_SERVICE_HOST/PORT`), its log in a file. Every wait
//! is bounded; the agent is killed by its PID and the directories removed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cni_plugin::lookup::agent::{ask, Miss, SOCKET_NAME};
use cni_plugin::lookup::PodRef;

use crate::apiserver::ApiServer;
use crate::chain::{plugin_bin, target_bin};
use crate::netns::require_root;

/// The node name the agent watches the pods of.
pub const NODE: &str = "node-1";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A node's directories (removed on drop).
#[derive(Debug)]
pub struct Node {
    pub root: PathBuf,
    pub conf: PathBuf,
    pub bin: PathBuf,
    pub src: PathBuf,
    /// `CNI_AGENT_RUN_DIR`, the plugin's `cni_agent_run_dir`.
    pub run: PathBuf,
    pub sa: PathBuf,
}

impl Node {
    /// Fresh dirs; the service account holds `srv`'s token and CA, the conf dir a primary bridge conflist, the
    /// image's bin dir the built plugin.
    pub fn new(tag: &str, srv: &ApiServer) -> Node {
        require_root();
        let root = std::env::temp_dir().join(format!(
            "meshcni-node-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let node = Node {
            conf: root.join("etc/cni/net.d"),
            bin: root.join("opt/cni/bin"),
            src: root.join("image/opt/cni/bin"),
            run: root.join("var/run/istio-cni"),
            sa: root.join("secrets/serviceaccount"),
            root,
        };
        for d in [&node.conf, &node.bin, &node.src, &node.run, &node.sa] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        let write = |p: PathBuf, data: &[u8]| {
            std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
        };
        write(node.sa.join("token"), srv.token().as_bytes());
        write(node.sa.join("ca.crt"), srv.ca_pem().as_bytes());
        write(node.sa.join("namespace"), b"istio-system");
        write(
            node.conf.join("10-bridge.conflist"),
            br#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}]}"#,
        );
        let plugin = node.src.join("istio-cni");
        std::fs::copy(plugin_bin(), &plugin).unwrap_or_else(|e| {
            panic!(
                "copy {} to {}: {e}",
                plugin_bin().display(),
                plugin.display()
            )
        });
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", plugin.display()));
        node
    }

    /// `<run>/pod-cache.sock`
    pub fn socket(&self) -> PathBuf {
        self.run.join(SOCKET_NAME)
    }

    /// `<run>/istio-cni-kubeconfig`, the kubeconfig the plugin reads.
    pub fn kubeconfig(&self) -> PathBuf {
        self.run.join(cni_plugin::config::KUBECONFIG_NAME)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// GET over HTTP/1.0 on loopback: the status, or None when nothing listens yet.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_whitespace().nth(1)?.parse().ok()
}

/// A running agent; killed (SIGKILL, by PID) on drop if still running.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    health: u16,
    log: PathBuf,
    run: PathBuf,
}

impl Agent {
    /// Starts the agent on `node`, pointed at `srv`, with the pod cache on.
    pub fn start(node: &Node, srv: &ApiServer) -> Agent {
        Self::start_with(node, srv, &[])
    }

    /// [`Self::start`] with more (or other) environment variables.
    pub fn start_with(node: &Node, srv: &ApiServer, extra: &[(&str, &str)]) -> Agent {
        let health = free_port();
        let log = node.root.join(format!("agent-{health}.log"));
        let logf =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let errf = logf.try_clone().expect("clone the log file");
        let dir = |p: &Path| p.display().to_string();
        let child = Command::new(target_bin("node-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MOUNTED_CNI_NET_DIR", dir(&node.conf))
            .env("MOUNTED_CNI_BIN_DIR", dir(&node.bin))
            .env("CNI_BINARIES_SOURCE_DIR", dir(&node.src))
            .env("CNI_AGENT_RUN_DIR", dir(&node.run))
            .env("SERVICE_ACCOUNT_DIR", dir(&node.sa))
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", srv.port().to_string())
            .env("KUBERNETES_NODE_NAME", NODE)
            .env("POD_NAMESPACE", "istio-system")
            .env("LOG_LEVEL", "debug")
            .env("HEALTH_PORT", health.to_string())
            .env("MONITORING_PORT", "0")
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("POD_CACHE_ENABLED", "true")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .expect("spawn node-agent");
        Agent {
            child,
            health,
            log,
            run: node.run.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` every 5 ms until it returns `Some`; panics after `limit` with the agent's log.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) while waiting for {what}; log:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; agent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for `/readyz` to answer 200 (the plugin is installed).
    pub fn wait_ready(&mut self) {
        let port = self.health;
        self.wait_for("the agent to be ready", Duration::from_secs(20), || {
            (http_status(port, "/readyz") == Some(200)).then_some(())
        });
    }

    /// Asks the agent's socket as the plugin would (no API request), with a generous deadline.
    pub fn ask(&self, namespace: &str, name: &str) -> Result<cni_plugin::pod::PodInfo, Miss> {
        ask(
            &self.run,
            &PodRef::new(namespace, name),
            None,
            Duration::from_secs(2),
        )
    }

    /// Waits until the agent's cache has listed the node's pods (a lookup answers "miss", not "unsynced").
    pub fn wait_synced(&mut self) {
        let run = self.run.clone();
        self.wait_for("the pod cache to sync", Duration::from_secs(20), || {
            let probe = PodRef::new("meshcni-probe", "no-such-pod");
            match ask(&run, &probe, None, Duration::from_secs(2)) {
                Err(Miss::NotCached { .. }) => Some(()),
                _ => None,
            }
        });
    }

    /// Waits until the agent's cache holds `namespace/name` with `uid`.
    pub fn wait_cached(&mut self, namespace: &str, name: &str, uid: &str) {
        let run = self.run.clone();
        let pod = PodRef::new(namespace, name);
        self.wait_for(
            &format!("{pod} (uid {uid}) in the pod cache"),
            Duration::from_secs(20),
            || match ask(&run, &pod, Some(uid), Duration::from_secs(2)) {
                Ok(_) => Some(()),
                Err(_) => None,
            },
        );
    }

    /// Sends `sig` to the agent (by its PID).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own unreaped child by its PID.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill -{sig} {}", self.child.id());
    }

    /// SIGKILL, then reap: the agent leaves its socket file behind, as a crash would.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.child.wait().expect("reap the agent");
        assert!(!status.success(), "{status}");
    }

    /// SIGTERM and a bounded wait for its exit.
    pub fn stop(&mut self) {
        self.terminate();
    }

    /// SIGTERM, a bounded wait for its exit; how it exited and how long that took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(15));
        (status, start.elapsed())
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "agent did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A stopped agent (SIGSTOP) must still die: SIGKILL works on a stopped process.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
