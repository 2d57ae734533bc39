//! The plugin's socket: answers pod lookups from the [`PodCache`] in the protocol of
//! `cni_plugin::lookup::agent` (one JSON line in, one out), on `<run_dir>/pod-cache.sock`, owner-only.
//!
//! The socket is bound under a temporary name, made owner-only, then renamed into place, so the plugin never sees
//! it with wider permissions. Each connection gets one answer; a client that sends nothing, or too much, is dropped
//! after a short time, and never holds up anyone else.
//!
//! Connections are accepted and answered on a thread of their own, blocking, never on the runtime: a pod start
//! waits for the answer, and a runtime's hand-overs (readiness, a task, a timer) cost more than the answer itself
//! (an injected ADD spent ~50 µs waiting for it that way, ~6 µs is the round trip of a blocking echo here). A
//! client whose request is not there within [`INLINE_WAIT`] is handed to the runtime for the rest of
//! [`REQUEST_TIMEOUT`], so that it holds the thread up for no longer than that.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cni_plugin::lookup::agent::{Answer, Request, Response, MAX_LINE, SOCKET_NAME, VERSION};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Config;
use crate::podcache::{Lookup, PodCache};

/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the socket's thread waits for a request (and for its answer to be taken) before it hands the client to
/// the runtime: the plugin sends its request right after it connects, so this is only ever reached by a slow or
/// broken client.
pub const INLINE_WAIT: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the agent socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent socket {path} failed: {source}")]
    Accept {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread serving the agent socket {path} failed: {reason}")]
    Thread { path: PathBuf, reason: String },
}

/// The socket's path in `run_dir`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// Which bind made a socket file: its (device, inode).
pub type SocketId = (u64, u64);

fn socket_id(path: &Path) -> std::io::Result<SocketId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Marks the private directories a socket is bound in before it is moved into place: `.<socket name>` + this +
/// `<random>`.
const BIND_DIR_MARK: &str = ".bind.";

/// Binds the socket at `path`, owner-only (mode 0600), replacing a stale one (or another agent's: the newest wins).
/// Returns the listener and the file's identity, for [`remove_if_ours`].
///
/// The socket is bound in a fresh directory of ours (mode 0700, a random name, `mkdir` refusing any name that
/// exists, a planted symlink included) next to `path`, made owner-only there, where nobody else can swap it for a
/// symlink between the bind and the chmod (chmod follows symlinks), then renamed over `path` (which replaces a
/// symlink planted at `path` itself, never what it points to). The plugin never sees it with wider permissions.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketId), SocketError> {
    let fail = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let (Some(run_dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a socket path needs a directory and a file name",
        )));
    };
    let private = make_bind_dir(run_dir, &name.to_string_lossy()).map_err(fail)?;
    let inner = private.join("s");
    let placed = bind_in(&private, &inner).and_then(|listener| {
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| socket_id(&inner))
            .and_then(|id| std::fs::rename(&inner, path).map(|()| (listener, id)))
    });
    if placed.is_err() {
        let _ = std::fs::remove_file(&inner);
    }
    // Empty now (or holding nothing of use): it goes either way.
    let _ = std::fs::remove_dir(&private);
    placed.map_err(fail)
}

/// Binds `inner` (the socket `s` in the directory `private`). A socket's path is limited to 107 bytes, and the
/// bind dir's name adds to the run dir's: the bind goes through the directory's descriptor
/// (`/proc/self/fd/<fd>/s`, 20-odd bytes whatever the run dir), or through `inner` itself where there is no /proc.
fn bind_in(private: &Path, inner: &Path) -> std::io::Result<UnixListener> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(private)?;
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    match UnixListener::bind(&via_fd) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => UnixListener::bind(inner),
        other => other,
    }
}

/// A new owner-only directory in `run_dir` to bind the socket `name` in.
fn make_bind_dir(run_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..16 {
        let dir = run_dir.join(format!(
            ".{name}{BIND_DIR_MARK}{}",
            crate::install::atomic::random_suffix()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists)))
}

/// Removes the bind directories of `run_dir` that a crash between a bind and its rename left behind (and the
/// socket in one): those older than a minute, so a concurrent agent's bind in progress is never disturbed.
/// Returns what was removed.
pub fn remove_stale_bind_dirs(run_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with('.') || !name.contains(BIND_DIR_MARK) {
            continue;
        }
        // lstat: only a real directory of that name is ours; a symlink named like one is removed as a file.
        let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let old = md
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if !old {
            continue;
        }
        let gone = if md.is_dir() {
            let _ = std::fs::remove_file(entry.path().join("s"));
            std::fs::remove_dir(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        if gone.is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Removes the socket at `path` if it is still the one `id` names; whether it did. During a DaemonSet rolling
/// update the next agent may already have bound its own socket there: removing that one would leave the node's
/// pods without a cache (every pod start a GET) until the next agent restart.
pub fn remove_if_ours(path: &Path, id: SocketId) -> std::io::Result<bool> {
    match socket_id(path) {
        Ok(current) if current == id => std::fs::remove_file(path).map(|()| true),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The answer to one request line.
pub fn answer(cache: &PodCache, line: &[u8]) -> Response {
    let request: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "malformed pod-cache request");
            return Response::new(Answer::Miss);
        }
    };
    if request.v != VERSION {
        // We can only answer in our own version, which such a client treats as a miss.
        return Response::new(Answer::Miss);
    }
    Response::new(
        match cache.lookup(&request.pod.namespace, &request.pod.name) {
            Lookup::Unsynced => Answer::Unsynced,
            Lookup::Miss => Answer::Miss,
            Lookup::Hit(p) => Answer::Hit {
                uid: p.uid,
                pod: p.info,
            },
        },
    )
}

/// The answer to one request line as the line to send back (JSON and a newline), whichever side answers.
fn answer_line(cache: &PodCache, line: &[u8]) -> Option<Vec<u8>> {
    let mut out = serde_json::to_vec(&answer(cache, line)).ok()?;
    out.push(b'\n');
    Some(out)
}

/// Answers a client the socket's thread handed over, whose request so far is `line` (no newline in it yet).
async fn handle(cache: Arc<PodCache>, stream: UnixStream, mut line: Vec<u8>) {
    let (read, mut write) = stream.into_split();
    let left = MAX_LINE.saturating_sub(line.len());
    let mut reader = BufReader::new(read.take(left as u64));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) if !line.is_empty() => {}
        Ok(Ok(_)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "pod-cache client failed");
            return;
        }
        Err(_) => {
            tracing::debug!("pod-cache client sent no request in time");
            return;
        }
    }
    let Some(out) = answer_line(&cache, &line) else {
        return;
    };
    if let Err(e) = write.write_all(&out).await {
        tracing::debug!(error = %e, "cannot answer a pod-cache client");
    }
}

/// The next connection on the socket at `path`.
pub async fn accept(listener: &UnixListener, path: &Path) -> Result<UnixStream, SocketError> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(|source| SocketError::Accept {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(stream)
}

/// Serves lookups on `listener` until an accept error, from a thread of its own (the module's doc says why);
/// slow clients go to the current runtime. Dropping the future lets the thread end after its next client.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    cache: Arc<PodCache>,
) -> Result<(), SocketError> {
    let thread_failed = |path: &Path, reason: String| SocketError::Thread {
        path: path.to_path_buf(),
        reason,
    };
    let listener = listener
        .into_std()
        .and_then(|l| l.set_nonblocking(false).map(|()| l))
        .map_err(|e| thread_failed(&path, format!("cannot make the listener blocking: {e}")))?;
    let runtime = tokio::runtime::Handle::current();
    let (done, result) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("pod-cache-socket".to_string())
        .spawn(move || {
            let ended = serve_blocking(&listener, &thread_path, &cache, &runtime, || {
                done.is_closed()
            });
            let _ = done.send(ended);
        })
        .map_err(|e| thread_failed(&path, format!("cannot start it: {e}")))?;
    result
        .await
        .unwrap_or_else(|_| Err(thread_failed(&path, "it panicked".to_string())))
}

/// The socket's thread: accepts and answers until an accept error, or until `stopped` says so after a client.
fn serve_blocking(
    listener: &std::os::unix::net::UnixListener,
    path: &Path,
    cache: &Arc<PodCache>,
    runtime: &tokio::runtime::Handle,
    stopped: impl Fn() -> bool,
) -> Result<(), SocketError> {
    loop {
        let (stream, _) = listener.accept().map_err(|source| SocketError::Accept {
            path: path.to_path_buf(),
            source,
        })?;
        if stopped() {
            return Ok(());
        }
        answer_inline(cache, stream, runtime);
    }
}

/// Reads one request line from `stream` and answers it on this thread; a client that has not sent its line
/// within [`INLINE_WAIT`] goes to the runtime ([`handle`]) with what it sent so far.
fn answer_inline(
    cache: &Arc<PodCache>,
    mut stream: std::os::unix::net::UnixStream,
    runtime: &tokio::runtime::Handle,
) {
    use std::io::{ErrorKind, Read, Write};
    if let Err(e) = stream
        .set_read_timeout(Some(INLINE_WAIT))
        .and_then(|()| stream.set_write_timeout(Some(INLINE_WAIT)))
    {
        tracing::debug!(error = %e, "cannot set a pod-cache client's timeouts");
        return;
    }
    // One read: the plugin's request comes in one write. Whatever is not a whole line by then goes to the
    // runtime, so no client holds the thread for longer than INLINE_WAIT, however it drips its bytes.
    let mut buf = [0u8; 4096];
    let mut line = loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => break buf[..n].to_vec(),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Vec::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "pod-cache client failed");
                return;
            }
        }
    };
    match line.iter().position(|&b| b == b'\n') {
        Some(end) => line.truncate(end + 1),
        // As much as a request may be, without its end: answered as it is (a miss), as the runtime would.
        None if line.len() >= MAX_LINE => {}
        None => {
            let cache = cache.clone();
            let handed = stream.set_nonblocking(true).map(|()| {
                runtime.spawn(async move {
                    match UnixStream::from_std(stream) {
                        Ok(stream) => handle(cache, stream, line).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot hand a pod-cache client over")
                        }
                    }
                })
            });
            if let Err(e) = handed {
                tracing::debug!(error = %e, "cannot hand a pod-cache client over");
            }
            return;
        }
    }
    let Some(out) = answer_line(cache, &line) else {
        return;
    };
    if let Err(e) = stream.write_all(&out) {
        tracing::debug!(error = %e, "cannot answer a pod-cache client");
    }
}

/// An error and its causes, `: `-separated: a TLS failure says only "client error (Connect)" at the top.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// The agent's own API client, from its service account (the token file is re-read by kube as kubelet rotates it)
/// and the API server the plugin's kubeconfig names.
pub async fn client(cfg: &Config) -> Result<kube::Client, String> {
    // kube re-reads the token file; each new token is registered by the installer's reconcile too.
    crate::install::register_token(cfg);
    let mut cluster = serde_json::json!({ "server": cfg.api_server.url() });
    if cfg.skip_tls_verify {
        cluster["insecure-skip-tls-verify"] = true.into();
    } else {
        cluster["certificate-authority"] = cfg.ca_file.display().to_string().into();
    }
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "node-agent", "user": {"tokenFile": cfg.token_path().display().to_string()}}],
        "contexts": [{"name": "node-agent", "context": {"cluster": "local", "user": "node-agent"}}],
        "current-context": "node-agent",
    });
    let kubeconfig: kube::config::Kubeconfig =
        serde_json::from_value(kubeconfig).map_err(|e| format!("agent kubeconfig: {e}"))?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| format!("agent kubeconfig: {e}"))?;
    // A proxy in the agent's environment must not see its token, nor break the watch.
    config.proxy_url = None;
    kube::Client::try_from(config)
        .map_err(|e| format!("agent API client for {}: {e}", cfg.api_server.url()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni_plugin::lookup::PodRef;
    use kube::runtime::watcher::Event;

    fn request(ns: &str, name: &str) -> Vec<u8> {
        serde_json::to_vec(&Request {
            v: VERSION,
            pod: PodRef::new(ns, name),
        })
        .unwrap()
    }

    #[test]
    fn answers_from_the_cache() {
        let cache = PodCache::new();
        assert_eq!(answer(&cache, &request("ns", "a")).answer, Answer::Unsynced);
        cache.apply(Event::Init);
        let pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "istio-proxy"}]}
        }))
        .unwrap();
        cache.apply(Event::InitApply(pod));
        cache.apply(Event::InitDone);
        match answer(&cache, &request("ns", "a")).answer {
            Answer::Hit { uid, pod } => {
                assert_eq!(uid, "u1");
                assert!(pod.containers.contains("istio-proxy"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(answer(&cache, &request("ns", "b")).answer, Answer::Miss);
        assert_eq!(answer(&cache, b"garbage").answer, Answer::Miss);
        let v2 = br#"{"v":2,"namespace":"ns","name":"a"}"#;
        assert_eq!(answer(&cache, v2), Response::new(Answer::Miss));
    }

    #[tokio::test]
    async fn the_socket_is_owner_only_and_answers() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("meshcni-podsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        std::fs::write(&path, "stale").unwrap();
        let (listener, id) = bind(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let cache = PodCache::new();
        cache.apply(Event::Init);
        cache.apply(Event::InitDone);
        let server = tokio::spawn(serve(listener, path.clone(), cache));
        let ask = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                cni_plugin::lookup::agent::ask(
                    &dir,
                    &PodRef::new("ns", "a"),
                    None,
                    Duration::from_secs(2),
                )
            })
        };
        let e = ask.await.unwrap().unwrap_err();
        assert!(
            matches!(e, cni_plugin::lookup::agent::Miss::NotCached { .. }),
            "{e}"
        );
        server.abort();
        assert!(remove_if_ours(&path, id).unwrap());
        assert!(!path.exists());
        assert!(!remove_if_ours(&path, id).unwrap(), "already gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client that connects and then dawdles over its request goes to the runtime and is still answered, in
    /// two writes too; meanwhile a prompt client is answered at once, by the socket's thread. On a current-thread
    /// runtime, as the agent's.
    #[tokio::test]
    async fn a_slow_client_is_answered_and_holds_up_nobody() {
        use std::io::{BufRead, Write};
        let dir = std::env::temp_dir().join(format!("meshcni-podsock-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        let (listener, _) = bind(&path).unwrap();
        let cache = PodCache::new();
        cache.apply(Event::Init);
        cache.apply(Event::InitDone);
        let server = tokio::spawn(serve(listener, path.clone(), cache));
        let ask = |stream: &mut std::os::unix::net::UnixStream| {
            let mut line = String::new();
            std::io::BufReader::new(stream)
                .read_line(&mut line)
                .unwrap();
            serde_json::from_str::<Response>(&line).unwrap()
        };
        let p = path.clone();
        let clients = tokio::task::spawn_blocking(move || {
            let mut slow = std::os::unix::net::UnixStream::connect(&p).unwrap();
            let req = request("ns", "slow");
            slow.write_all(&req[..5]).unwrap();
            std::thread::sleep(INLINE_WAIT * 5);
            let started = std::time::Instant::now();
            let mut prompt = std::os::unix::net::UnixStream::connect(&p).unwrap();
            prompt.write_all(&request("ns", "prompt")).unwrap();
            prompt.write_all(b"\n").unwrap();
            let prompt_answer = ask(&mut prompt);
            let prompt_took = started.elapsed();
            std::thread::sleep(INLINE_WAIT * 5);
            slow.write_all(&req[5..]).unwrap();
            slow.write_all(b"\n").unwrap();
            (prompt_answer, prompt_took, ask(&mut slow))
        });
        let (prompt, prompt_took, slow) = clients.await.unwrap();
        assert_eq!(prompt.answer, Answer::Miss);
        assert_eq!(slow.answer, Answer::Miss, "the slow client was answered");
        assert!(
            prompt_took < REQUEST_TIMEOUT / 2,
            "the prompt client waited {prompt_took:?}"
        );
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_symlink_at_the_socket_path_is_replaced_not_followed() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = std::env::temp_dir().join(format!("meshcni-podsock-link-{}", std::process::id()));
        let outside = dir.with_extension("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let victim = outside.join("victim");
        std::fs::write(&victim, "victim").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = socket_path(&dir);
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let (_listener, _id) = bind(&path).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket() && md.mode() & 0o777 == 0o600);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o644);
        // The private bind dir is gone: only the socket is left in the run dir.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SOCKET_NAME)]);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[tokio::test]
    async fn a_long_run_dir_is_no_longer_for_the_bind() {
        // The socket's own path is just under the 107-byte limit; the bind dir's path is over it.
        let base =
            std::env::temp_dir().join(format!("meshcni-podsock-long-{}", std::process::id()));
        let mut dir = base.clone();
        let target = 107 - SOCKET_NAME.len() - 1;
        let pad = target.saturating_sub(dir.as_os_str().len() + 1);
        dir.push("d".repeat(pad.max(1)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        assert!(path.as_os_str().len() <= 107, "{}", path.display());
        let (_listener, _id) = bind(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stale_bind_dirs_are_removed_when_old() {
        let dir =
            std::env::temp_dir().join(format!("meshcni-podsock-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fresh = make_bind_dir(&dir, SOCKET_NAME).unwrap();
        let old = make_bind_dir(&dir, SOCKET_NAME).unwrap();
        std::fs::write(old.join("s"), "").unwrap();
        let past = std::time::SystemTime::now() - Duration::from_secs(120);
        std::fs::File::open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        assert_eq!(remove_stale_bind_dirs(&dir), vec![old.clone()]);
        assert!(fresh.is_dir() && !old.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_successors_socket_is_not_removed() {
        let dir = std::env::temp_dir().join(format!("meshcni-podsock-succ-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        let (_first, first_id) = bind(&path).unwrap();
        // The next agent binds its own socket at the same path.
        let (_second, second_id) = bind(&path).unwrap();
        assert_ne!(first_id, second_id);
        assert!(!remove_if_ours(&path, first_id).unwrap());
        assert!(
            path.exists(),
            "the first agent removed its successor's socket"
        );
        assert!(remove_if_ours(&path, second_id).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
