//! Runs CNI plugins as a container runtime does (libcni's semantics): one plugin with env + stdin, or a whole
//! conflist in order for ADD/CHECK and in reverse for DEL, each plugin getting the list's name/cniVersion and
//! the previous plugin's result as `prevResult`. Plugins can be started inside a "node" netns.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

/// Where the built binaries are: `MESHCNI_BIN_DIR`, else the cargo target dir of this test executable.
pub fn target_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("MESHCNI_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            // target/<profile>/deps/<test> -> target/<profile>
            Some(exe.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_default();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins) or set MESHCNI_BIN_DIR",
        p.display()
    );
    p
}

/// The plugin binary under test.
pub fn plugin_bin() -> PathBuf {
    target_bin("istio-cni")
}

/// What one plugin invocation produced.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub success: bool,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    /// stdout parsed as JSON (panics with the raw output when it is not JSON: stdout is protocol only).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The CNI error code, when it failed.
    pub fn error_code(&self) -> Option<u64> {
        if self.success {
            return None;
        }
        self.json().get("code").and_then(Value::as_u64)
    }
}

/// One plugin invocation: binary, CNI_* environment, stdin, optional netns to start the process in.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
    /// Run the plugin process in this netns (the "node"), as a runtime in that netns would.
    pub in_netns: Option<PathBuf>,
}

impl Invocation {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Invocation {
            bin: bin.into(),
            ..Default::default()
        }
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.into()));
        self
    }

    pub fn stdin(mut self, s: impl Into<Vec<u8>>) -> Self {
        self.stdin = s.into();
        self
    }

    pub fn in_netns(mut self, p: impl Into<PathBuf>) -> Self {
        self.in_netns = Some(p.into());
        self
    }

    /// Runs it with a clean environment (PATH kept), bounded by `timeout`.
    pub fn run_with_timeout(&self, timeout: std::time::Duration) -> PluginOutput {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ns_file = self.in_netns.as_ref().map(|p| {
            std::fs::File::open(p).unwrap_or_else(|e| panic!("open netns {}: {e}", p.display()))
        });
        if let Some(f) = ns_file.as_ref() {
            let fd = f.as_raw_fd();
            // SAFETY: setns is async-signal-safe; it only changes the child's network namespace.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit before reading stdin (e.g. a bad environment): ignore EPIPE.
            let _ = stdin.write_all(&self.stdin);
        }
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(timeout) {
            Ok(r) => r.unwrap_or_else(|e| panic!("wait for plugin: {e}")),
            Err(_) => {
                // SAFETY: plain kill(2) of our own child by PID.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!(
                    "plugin {} did not finish within {timeout:?}",
                    self.bin.display()
                );
            }
        };
        PluginOutput {
            success: out.status.success(),
            exit_code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn run(&self) -> PluginOutput {
        self.run_with_timeout(std::time::Duration::from_secs(60))
    }
}

/// Errors of a chain run: which plugin failed and what it printed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("conflist is invalid: {0}")]
    Conflist(String),
    #[error("plugin {plugin:?} not found in {dirs:?}")]
    NotFound { plugin: String, dirs: Vec<PathBuf> },
    #[error("{command} of plugin {plugin:?} failed (exit {exit:?}): {stdout} / stderr: {stderr}")]
    Plugin {
        command: String,
        plugin: String,
        exit: Option<i32>,
        stdout: String,
        stderr: String,
    },
}

/// A container runtime in miniature: a conflist, CNI_PATH, and where to run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub conflist: Value,
    pub cni_path: Vec<PathBuf>,
    /// The netns the runtime (and so every plugin process) runs in.
    pub node_netns: Option<PathBuf>,
}

/// One pod attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub cni_args: String,
}

impl Runtime {
    fn plugins(&self) -> Result<Vec<Map<String, Value>>, ChainError> {
        let list = self
            .conflist
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| ChainError::Conflist("no plugins array".into()))?;
        list.iter()
            .map(|p| {
                p.as_object().cloned().ok_or_else(|| {
                    ChainError::Conflist(format!("plugin entry is not an object: {p}"))
                })
            })
            .collect()
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf, ChainError> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| ChainError::NotFound {
                plugin: plugin_type.into(),
                dirs: self.cni_path.clone(),
            })
    }

    fn invoke(
        &self,
        command: &str,
        plugin: &Map<String, Value>,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<PluginOutput, ChainError> {
        let ptype = plugin
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| ChainError::Conflist("plugin without type".into()))?
            .to_string();
        let mut conf = plugin.clone();
        for k in ["name", "cniVersion"] {
            if let Some(v) = self.conflist.get(k) {
                conf.insert(k.into(), v.clone());
            }
        }
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        let path = std::env::join_paths(&self.cni_path)
            .map_err(|e| ChainError::Conflist(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let mut inv = Invocation::new(self.find(&ptype)?)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", att.container_id.clone())
            .env("CNI_NETNS", att.netns.clone())
            .env("CNI_IFNAME", att.ifname.clone())
            .env("CNI_ARGS", att.cni_args.clone())
            .env("CNI_PATH", path)
            .stdin(
                serde_json::to_vec(&Value::Object(conf))
                    .map_err(|e| ChainError::Conflist(e.to_string()))?,
            );
        if let Some(ns) = self.node_netns.as_ref() {
            inv = inv.in_netns(ns);
        }
        let out = inv.run();
        if !out.success {
            return Err(ChainError::Plugin {
                command: command.into(),
                plugin: ptype,
                exit: out.exit_code,
                stdout: out.stdout,
                stderr: out.stderr,
            });
        }
        Ok(out)
    }

    /// ADD through the whole list; returns the final result.
    pub fn add(&self, att: &Attachment) -> Result<Value, ChainError> {
        let mut prev: Option<Value> = None;
        for p in self.plugins()? {
            let out = self.invoke("ADD", &p, att, prev.as_ref())?;
            let v: Value = serde_json::from_str(&out.stdout).map_err(|e| ChainError::Plugin {
                command: "ADD".into(),
                plugin: format!("{:?}", p.get("type")),
                exit: out.exit_code,
                stdout: format!("result is not JSON ({e}): {}", out.stdout),
                stderr: out.stderr.clone(),
            })?;
            prev = Some(v);
        }
        prev.ok_or_else(|| ChainError::Conflist("empty plugin list".into()))
    }

    /// CHECK through the list with the cached result.
    pub fn check(&self, att: &Attachment, result: &Value) -> Result<(), ChainError> {
        for p in self.plugins()? {
            self.invoke("CHECK", &p, att, Some(result))?;
        }
        Ok(())
    }

    /// DEL through the list in reverse with the cached result (if any).
    pub fn del(&self, att: &Attachment, result: Option<&Value>) -> Result<(), ChainError> {
        for p in self.plugins()?.iter().rev() {
            self.invoke("DEL", p, att, result)?;
        }
        Ok(())
    }
}

/// Debian's reference plugins (containernetworking-plugins).
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// A CNI bin dir for tests: Debian's plugins plus our plugin, linked into `dir`.
pub fn make_cni_bin_dir(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for p in ["bridge", "host-local", "loopback", "portmap"] {
        let src = Path::new(DEBIAN_CNI_DIR).join(p);
        if src.is_file() {
            let _ = std::fs::remove_file(dir.join(p));
            std::os::unix::fs::symlink(&src, dir.join(p))?;
        }
    }
    let _ = std::fs::remove_file(dir.join("istio-cni"));
    std::os::unix::fs::symlink(plugin_bin(), dir.join("istio-cni"))?;
    Ok(dir.to_path_buf())
}
