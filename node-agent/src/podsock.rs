//! The plugin's socket: answers pod lookups from the [`PodCache`] in the protocol of
//! `cni_plugin::lookup::agent` (one JSON line in, one out), on `<run_dir>/pod-cache.sock`, owner-only.
//!
//! The socket is bound under a temporary name, made owner-only, then renamed into place, so the plugin never sees
//! it with wider permissions. Each connection gets one answer; a client that sends nothing, or too much, is dropped
//! after a short time, and never holds up anyone else.

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
}

/// Whether `name` is one of the sockets the agent binds in its run dir (the pod cache's, the plugin's logs, the
/// status), for the removal of their temp names at start.
pub fn is_agent_socket(name: &str) -> bool {
    [
        SOCKET_NAME,
        cni_plugin::report::SOCKET_NAME,
        crate::status::SOCKET_NAME,
    ]
    .contains(&name)
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

/// Binds the socket at `path`, owner-only (mode 0600), replacing a stale one (or another agent's: the newest wins).
/// Returns the listener and the file's identity, for [`remove_if_ours`].
pub fn bind(path: &Path) -> Result<(UnixListener, SocketId), SocketError> {
    let fail = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // The installer's temp pattern: a bind interrupted by a crash leaves a name the next start removes.
    let tmp = crate::install::atomic::temp_path(path).map_err(|e| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = UnixListener::bind(&tmp).map_err(fail)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| socket_id(&tmp))
        .and_then(|id| std::fs::rename(&tmp, path).map(|()| id));
    match placed {
        Ok(id) => Ok((listener, id)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(fail(e))
        }
    }
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

async fn handle(cache: Arc<PodCache>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
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
    let response = answer(&cache, &line);
    let Ok(mut out) = serde_json::to_vec(&response) else {
        return;
    };
    out.push(b'\n');
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

/// Serves lookups on `listener` until an accept error.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    cache: Arc<PodCache>,
) -> Result<(), SocketError> {
    loop {
        let stream = accept(&listener, &path).await?;
        tokio::spawn(handle(cache.clone(), stream));
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

    /// What a kill between bind and rename leaves (a socket under its temp name) is what the start removes; the
    /// temp names of anything else in the run dir stay.
    #[tokio::test]
    async fn a_socket_left_under_its_temp_name_is_removed_at_start() {
        use crate::install::atomic::{remove_stale_temps, temp_path};
        let dir =
            std::env::temp_dir().join(format!("meshcni-podsock-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A crashed agent's bind: the socket file exists under the temp name bind() uses, never renamed.
        let names = [
            SOCKET_NAME,
            cni_plugin::report::SOCKET_NAME,
            crate::status::SOCKET_NAME,
        ];
        let mut leftovers = Vec::new();
        for name in names {
            let tmp = temp_path(&dir.join(name)).unwrap();
            drop(std::os::unix::net::UnixListener::bind(&tmp).unwrap());
            leftovers.push(tmp);
        }
        std::fs::write(dir.join("other.sock.tmp.1.0"), "").unwrap();
        let mut removed = remove_stale_temps(&dir, is_agent_socket);
        removed.sort();
        leftovers.sort();
        assert_eq!(removed, leftovers);
        assert!(dir.join("other.sock.tmp.1.0").exists());
        // A bind leaves only the socket itself.
        let (_listener, _) = bind(&socket_path(&dir)).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["other.sock.tmp.1.0", SOCKET_NAME]);
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
