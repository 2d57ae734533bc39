//! `node-agent status` (run with `kubectl exec` in the agent's pod): this node's installation and what the plugin
//! and the repair controller did lately, as a table a person reads at a glance.
//!
//! The running agent answers `GET /status` with JSON ([`AgentStatus`]) on `<run_dir>/status.sock` (owner-only,
//! like the pod-cache socket: it names pods); the subcommand adds what it reads itself (the conflist entry, the
//! installed binary's version and sha256) and renders both ([`render`], pure). It still prints the files' side
//! when the agent does not answer, and says why.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::events::{AddEvent, RepairEvent, CAPACITY};
use crate::install::binaries::PLUGIN_BINARY;
use crate::install::{conflist, Status};
use crate::server::Shared;
use crate::uds::{self, Handler};

/// The status socket's name in the run dir.
pub const SOCKET_NAME: &str = "status.sock";
pub const STATUS_PATH: &str = "/status";
/// How long the subcommand waits for the agent, and for the plugin's `--version`.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The last reconcile's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallState {
    pub ready: bool,
    /// What the reconcile found, for a person.
    pub detail: String,
    /// The file holding our entry, once written or found right.
    pub conflist: Option<PathBuf>,
    /// RFC 3339: since when this state (ready and detail) holds.
    pub since: String,
}

/// What a reconcile status means, in a sentence.
pub fn describe(status: &Status) -> String {
    match status {
        Status::Ready => "istio-cni installed and in place".into(),
        Status::WaitingForPrimary { dir } => format!(
            "waiting for the primary CNI plugin to write its configuration into {}",
            dir.display()
        ),
        Status::BackingOff { file, .. } => format!(
            "another component keeps reverting {}; our rewrites are rate-limited until it stops",
            file.display()
        ),
        Status::Failed { step, error } => format!("{}: {error}", step.result_label()),
        Status::Superseded { by } => format!(
            "a newer agent on this node owns the installation ({by}); this one writes nothing while it runs"
        ),
    }
}

impl InstallState {
    pub fn of(status: &Status, conflist: Option<&Path>) -> Self {
        InstallState {
            ready: *status == Status::Ready,
            detail: describe(status),
            conflist: conflist.map(Path::to_path_buf),
            since: cni_plugin::report::now(),
        }
    }

    /// Keeps `prev`'s `since` when the state did not change.
    pub fn after(mut self, prev: &InstallState) -> Self {
        if prev.ready == self.ready && prev.detail == self.detail && !prev.since.is_empty() {
            self.since = prev.since.clone();
        }
        self
    }
}

/// The running agent's answer to `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub install: InstallState,
    /// Newest first.
    pub adds: Vec<AddEvent>,
    /// Newest first.
    pub repairs: Vec<RepairEvent>,
}

impl AgentStatus {
    pub fn of(shared: &Shared, node: &str) -> Self {
        AgentStatus {
            node: node.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            install: shared.install_state(),
            adds: shared.events.adds(CAPACITY),
            repairs: shared.events.repairs(CAPACITY),
        }
    }
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// The status socket's handler: `GET /status` -> [`AgentStatus`] as JSON.
pub fn handler(shared: Arc<Shared>, node: String) -> Handler {
    Arc::new(move |method: &Method, path: &str, _body: Bytes| {
        if path != STATUS_PATH {
            return uds::text(StatusCode::NOT_FOUND, "not found\n");
        }
        if method != Method::GET {
            return uds::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match serde_json::to_string(&AgentStatus::of(&shared, &node)) {
            Ok(json) => uds::with_type(StatusCode::OK, "application/json", json),
            Err(e) => uds::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    })
}

/// Asks the agent whose run dir is `run_dir`.
pub fn fetch(run_dir: &Path, timeout: Duration) -> Result<AgentStatus, String> {
    let path = socket_path(run_dir);
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
    let mut s = UnixStream::connect(&path).map_err(|e| fail("cannot connect to", &e))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| fail("cannot use", &e))?;
    write!(s, "GET {STATUS_PATH} HTTP/1.0\r\nHost: node-agent\r\n\r\n")
        .map_err(|e| fail("cannot ask", &e))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| fail("no answer from", &e))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("a truncated answer from", &format!("{} bytes", resp.len())))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(fail("an error from", &format!("{status}: {}", body.trim())));
    }
    serde_json::from_str(body).map_err(|e| fail("an unreadable answer from", &e))
}

/// What the subcommand reads itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    pub node: String,
    pub conf_dir: PathBuf,
    /// The file holding our entry, and the entry.
    pub entry: Result<(PathBuf, Value), String>,
    pub binary: Result<Binary, String>,
}

/// The installed plugin binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// What `istio-cni --version` printed, or why nothing.
    pub version: Result<String, String>,
    /// Same content as the copy in this image (the agent's source), when that one can be read.
    pub same_as_image: Option<bool>,
    pub image_copy: PathBuf,
}

/// Our entry in `conf_dir`: in `preferred` (the agent's file) when it is there, else in the first file that holds
/// one.
pub fn find_entry(conf_dir: &Path, preferred: Option<&Path>) -> Result<(PathBuf, Value), String> {
    let read = |p: &Path| -> Option<Value> {
        let v: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        conflist::entry(&v).cloned()
    };
    if let Some(p) = preferred {
        if let Some(e) = read(p) {
            return Ok((p.to_path_buf(), e));
        }
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot read {}: {e}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(conflist::is_config_name)
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .find_map(|p| read(&p).map(|e| (p, e)))
        .ok_or_else(|| format!("no istio-cni entry in any file of {}", conf_dir.display()))
}

/// The file's sha256, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The first line `<binary> --version` prints, within `timeout` (then it is killed).
pub fn binary_version(path: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {} --version: {e}", path.display()))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version: no answer in {timeout:?}",
                    path.display()
                ));
            }
            Err(e) => return Err(format!("{} --version: {e}", path.display())),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    out.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
        .ok_or_else(|| format!("{} --version printed nothing", path.display()))
}

pub fn binary(bin_dir: &Path, source_dir: &Path) -> Result<Binary, String> {
    let path = bin_dir.join(PLUGIN_BINARY);
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let sha256 = sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let image_copy = source_dir.join(PLUGIN_BINARY);
    let same_as_image = sha256_file(&image_copy).ok().map(|s| s == sha256);
    Ok(Binary {
        version: binary_version(&path, TIMEOUT),
        path,
        size: meta.len(),
        sha256,
        same_as_image,
        image_copy,
    })
}

/// `node-agent status` options.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// How many of the last ADD decisions and repair actions to show.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub last: usize,
    /// Print the agent's answer and the local facts as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs the subcommand: the text to print, and whether the node is ready (the exit status).
pub fn run(cfg: &Config, args: &StatusArgs) -> (String, bool) {
    let agent = fetch(&cfg.run_dir, TIMEOUT);
    let preferred = agent.as_ref().ok().and_then(|a| a.install.conflist.clone());
    let local = Local {
        node: cfg.node_name.clone(),
        conf_dir: cfg.conf_dir.clone(),
        entry: find_entry(&cfg.conf_dir, preferred.as_deref()),
        binary: binary(&cfg.bin_dir, &cfg.source_dir),
    };
    let ready = agent.as_ref().is_ok_and(|a| a.install.ready);
    let text = if args.json {
        let json = serde_json::json!({
            "node": local.node,
            "agent": agent.as_ref().map_err(|e| e.to_string()).map(|a| serde_json::to_value(a).unwrap_or_default()),
            "entry": local.entry.as_ref().map(|(p, e)| serde_json::json!({"file": p, "entry": e})),
            "binary": local.binary.as_ref().map(|b| serde_json::json!({
                "path": b.path, "size": b.size, "sha256": b.sha256,
                "version": b.version, "same_as_image": b.same_as_image,
            })),
        });
        format!("{json:#}\n")
    } else {
        render(&local, &agent, args.last, jiff::Timestamp::now())
    };
    (text, ready)
}

/// How long ago `at` (RFC 3339) was, shortly.
pub fn ago(at: &str, now: jiff::Timestamp) -> String {
    let Ok(t) = at.parse::<jiff::Timestamp>() else {
        return at.to_string();
    };
    let s = now.duration_since(t).as_secs();
    match s {
        i64::MIN..=0 => "now".into(),
        1..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{:02}s ago", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m ago", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h ago", s / 86400, s % 86400 / 3600),
    }
}

/// A latency, shortly: µs under 1 ms, ms with one decimal under 1 s, else s.
pub fn latency(secs: f64) -> String {
    if secs < 0.001 {
        format!("{:.0}µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1}ms", secs * 1e3)
    } else {
        format!("{secs:.2}s")
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Columns padded to their widest cell, two spaces apart, indented by two; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from("  ");
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// The whole report.
pub fn render(
    local: &Local,
    agent: &Result<AgentStatus, String>,
    last: usize,
    now: jiff::Timestamp,
) -> String {
    let mut out = String::new();
    match agent {
        Ok(a) => out.push_str(&format!(
            "node {} · meshcni node agent {} (pid {})\n\n",
            a.node, a.version, a.pid
        )),
        Err(_) => out.push_str(&format!(
            "node {} · node agent not answering\n\n",
            local.node
        )),
    }
    out.push_str("INSTALLATION\n");
    let mut kv: Vec<Vec<String>> = Vec::new();
    let mut put = |k: &str, v: String| kv.push(vec![k.to_string(), v]);
    match agent {
        Ok(a) if a.install.ready => put(
            "ready",
            format!(
                "yes, since {} ({})",
                ago(&a.install.since, now),
                a.install.detail
            ),
        ),
        Ok(a) if a.install.detail.is_empty() => {
            put("ready", "no: no reconcile finished yet".into())
        }
        Ok(a) => put(
            "ready",
            format!(
                "NO, since {}: {}",
                ago(&a.install.since, now),
                a.install.detail
            ),
        ),
        Err(e) => put("ready", format!("unknown: {e}")),
    }
    match &local.entry {
        Ok((file, entry)) => {
            put("conflist", file.display().to_string());
            put("entry", entry.to_string());
        }
        Err(e) => put("conflist", format!("NONE: {e}")),
    }
    match &local.binary {
        Ok(b) => {
            put("binary", format!("{} ({} bytes)", b.path.display(), b.size));
            put(
                "version",
                match &b.version {
                    Ok(v) => v.clone(),
                    Err(e) => format!("unknown: {e}"),
                },
            );
            let same = match b.same_as_image {
                Some(true) => format!("same as this image's {}", b.image_copy.display()),
                Some(false) => format!("DIFFERS from this image's {}", b.image_copy.display()),
                None => format!("{} unreadable", b.image_copy.display()),
            };
            put("sha256", format!("{} ({same})", b.sha256));
        }
        Err(e) => put("binary", format!("NONE: {e}")),
    }
    for row in &kv {
        out.push_str(&format!("  {:<9} {}\n", row[0], row[1]));
    }
    let Ok(a) = agent else {
        out.push_str("\nLAST ADD DECISIONS, REPAIR ACTIONS\n  unknown: the agent did not answer\n");
        return out;
    };
    let adds: Vec<&AddEvent> = a.adds.iter().take(last).collect();
    out.push_str(&format!(
        "\nLAST ADD DECISIONS ({} of {} kept, newest first)\n",
        adds.len(),
        a.adds.len()
    ));
    if adds.is_empty() {
        out.push_str("  none since the agent started\n");
    } else {
        let rows: Vec<Vec<String>> = adds
            .iter()
            .map(|e| {
                vec![
                    ago(&e.at, now),
                    format!("{}/{}", e.namespace, e.pod),
                    cut(&dash(&e.container_id), 12),
                    e.outcome.clone(),
                    dash(&e.reason),
                    e.backend.clone(),
                    latency(e.latency_seconds),
                    if e.outcome == "redirected" {
                        String::new()
                    } else {
                        cut(&e.detail, 80)
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "WHEN",
                "POD",
                "CONTAINER",
                "OUTCOME",
                "REASON",
                "BACKEND",
                "LATENCY",
                "DETAIL",
            ],
            &rows,
        ));
    }
    let repairs: Vec<&RepairEvent> = a.repairs.iter().take(last).collect();
    out.push_str(&format!(
        "\nREPAIR ACTIONS ({} of {} kept, newest first)\n",
        repairs.len(),
        a.repairs.len()
    ));
    if repairs.is_empty() {
        out.push_str("  none since the agent started\n");
    } else {
        let rows: Vec<Vec<String>> = repairs
            .iter()
            .map(|e| {
                vec![
                    ago(&e.at, now),
                    format!("{}/{}", e.namespace, e.pod),
                    e.action.clone(),
                    dash(&e.reason),
                    cut(&e.result, 80),
                ]
            })
            .collect();
        out.push_str(&table(
            &["WHEN", "POD", "ACTION", "REASON", "RESULT"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests;
