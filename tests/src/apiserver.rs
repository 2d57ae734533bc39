//! A small HTTPS Kubernetes API server stub for tests: serves Pod JSON, checks a bearer token, injects faults.
//!
//! * TLS with a real chain: a fresh CA and a leaf for `IP:127.0.0.1` (rustls refuses a CA certificate used as the
//!   server's own). [`ApiServerBuilder::expired_cert`] issues a leaf that expired in 2000.
//! * `GET /api/v1/namespaces/{ns}/pods/{name}`: the Pod from the in-memory map (or from a directory of Pod JSON
//!   files, re-read on every request), `404` with a Kubernetes `Status` body when unknown.
//!   `GET /api/v1/namespaces/{ns}`: a Namespace when a pod lives there or it was added. `GET /version`: a version
//!   object (no token needed, as on a real server).
//!   `GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}`: a DaemonSet set with [`ApiServer::set_daemonset`]
//!   (the agent reads its own on shutdown), `404` otherwise. Anything else: `404`. Every `/api` and `/apis` request
//!   needs `Authorization: Bearer <token>` (`401` Status otherwise).
//! * `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods`: a `PodList` (with `metadata.resourceVersion`,
//!   `limit`/`continue` paging) or, with `watch=true`, a chunked stream of watch events, as kube-runtime's
//!   watcher asks for them (see [`watch`](self#list-and-watch)).
//! * Faults, consumed one per request in FIFO order whatever the path, list and watch of pods excepted (they have
//!   their own switch, [`ApiServer::refuse_list_watch`], so an agent's watch never eats a fault meant for a
//!   plugin's GET): a canned status, a raw answer, a delay before the normal answer, dropping the connection
//!   without an answer, an answer whose body stops half-way (cut, or hanging), or a TCP reset of the next
//!   connection ([`Fault::Reset`], consumed when the connection is accepted). [`ApiServer::refuse_connections_for`]
//!   closes the listening socket for a while: connections are refused, as by a server that is down. Together
//!   they script a flapping server request by request.
//! * A request log ([`ApiServer::request_log`]) that tells a GET of one pod from a list or watch of pods, counts
//!   per path (query excluded) and a count of failed TLS handshakes, so a test can assert "no GET of this pod was
//!   made" or "the client gave up during the handshake".
//! * The server runs on its own thread with its own current-thread tokio runtime, bound to `127.0.0.1` (port 0 by
//!   default). [`ApiServerBuilder::netns`] creates the listening socket inside a given network namespace (a
//!   socket stays in the netns where it was created): the server is then reachable on that netns's loopback only.
//!   Dropping the handle stops the server and joins its thread.
//!
//! # List and watch
//! Every change of a pod (added, replaced with different content, removed; through [`ApiServer::add_pod`] and
//! [`ApiServer::remove_pod`] or a changed pod dir) gets the next resource version, written into the served pod's
//! `metadata.resourceVersion`, and an entry in an event log. A list answers the pods as they are now, sorted by
//! namespace and name, with the current resource version. A watch (`watch=true` or `watch=1`) with a
//! `resourceVersion` streams, one JSON line each, every logged change after it, then each new one as it happens:
//! `{"type":"ADDED"|"MODIFIED"|"DELETED","object":Pod}`. Without one (or `0`), or with `sendInitialEvents=true`,
//! it first sends every current pod as ADDED (then, with `sendInitialEvents`, the `k8s.io/initial-events-end`
//! BOOKMARK). A version older than the log is `410 Expired` (an ERROR event, as a real server sends). The stream
//! ends after `timeoutSeconds`. `fieldSelector` understands `spec.nodeName`, `metadata.name` and
//! `metadata.namespace` with `=`, `==` and `!=`; a pod that starts or stops matching (bound to the node later) is
//! ADDED or DELETED for that watcher, as on a real server. Any other field, and any `labelSelector`, is refused
//! with `400` rather than ignored. [`ApiServer::pause_watches`] holds events back (the pods change, the watchers do
//! not hear of it) and [`ApiServer::end_watches`] ends every open stream.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// Errors of the stub's setup and helpers.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("generating the test certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("building the TLS server config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("opening network namespace {}: {source}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {}: {source}", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("binding 127.0.0.1:{port}{}: {source} (is lo up in that netns?)",
        netns.as_ref().map(|p| format!(" in netns {}", p.display())).unwrap_or_default())]
    Bind {
        port: u16,
        netns: Option<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    #[error("the bind thread panicked")]
    BindThread,
    #[error("starting the server runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("pod JSON has no metadata.{0}: {1}")]
    PodWithoutMeta(&'static str, String),
    #[error("reading pod dir {}: {source}", path.display())]
    PodDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod file {}: {detail}", path.display())]
    PodFile { path: PathBuf, detail: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A fault for one request (whatever its path), consumed in FIFO order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and a Kubernetes `Status` body.
    Status(u16),
    /// Answer with exactly this status, headers and body.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait, then answer normally.
    Delay(Duration),
    /// Close the connection without answering.
    Drop,
    /// Answer with this status and a `content-length` 1 KiB beyond `body`, send `body`, then close the connection
    /// (`hang: false`: the client sees the body cut short) or send nothing more while the client waits
    /// (`hang: true`: a server stuck in the middle of its answer).
    Partial {
        status: u16,
        body: String,
        hang: bool,
    },
    /// Reset the next connection (TCP RST, before the TLS handshake) when it is accepted; a request on an open
    /// connection that finds it first closes that connection without an answer instead.
    Reset,
}

/// What a kubeconfig for the stub contains; tweak fields (a wrong CA, a wrong token, another server) to test
/// failures, then [`KubeconfigSpec::to_yaml`] or [`KubeconfigSpec::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigSpec {
    /// `https://127.0.0.1:PORT`
    pub server: String,
    /// PEM of the CA, written as `certificate-authority-data`; `None` writes none.
    pub ca_pem: Option<String>,
    pub token: String,
    pub insecure_skip_tls_verify: bool,
}

impl KubeconfigSpec {
    /// The kubeconfig in the layout Istio's agent writes.
    pub fn to_yaml(&self) -> String {
        let mut cluster = String::new();
        if let Some(ca) = &self.ca_pem {
            let b64 = base64::engine::general_purpose::STANDARD.encode(ca.as_bytes());
            cluster.push_str(&format!("    certificate-authority-data: {b64}\n"));
        }
        if self.insecure_skip_tls_verify {
            cluster.push_str("    insecure-skip-tls-verify: true\n");
        }
        format!(
            "apiVersion: v1\n\
             clusters:\n\
             - cluster:\n\
             {cluster}    server: {server}\n  name: local\n\
             contexts:\n\
             - context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\n\
             current-context: istio-cni-context\n\
             kind: Config\n\
             users:\n\
             - name: istio-cni\n  user:\n    token: {token}\n",
            server = self.server,
            token = self.token,
        )
    }

    /// Writes [`Self::to_yaml`] to `path` (mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), ApiServerError> {
        write_private(path, self.to_yaml().as_bytes())
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ApiServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| ApiServerError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(data).map_err(werr)
}

type Key = (String, String);

/// What a request was, as the request log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `GET /api/v1/namespaces/{ns}/pods/{name}`: the plugin's lookup of one pod.
    PodGet {
        namespace: String,
        name: String,
    },
    /// A list of pods (all namespaces, or one).
    PodList,
    /// A watch of pods.
    PodWatch,
    /// `GET /api/v1/namespaces/{ns}`.
    Namespace,
    /// `GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}`: the agent's read of its own DaemonSet.
    DaemonSetGet {
        namespace: String,
        name: String,
    },
    /// `GET /version`.
    Version,
    Other,
}

/// One request, as received (faulted and refused ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, empty when none.
    pub query: String,
    pub kind: RequestKind,
}

/// One logged change of a served pod.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    /// The pod before the change (`None`: it was added).
    old: Option<Value>,
    /// The pod after the change, stamped with `rv`; for a removal, the last version stamped with `rv`.
    new: Value,
    removed: bool,
}

/// The most changes kept for watchers to resume from; older versions are `410 Expired`.
const MAX_CHANGES: usize = 100_000;
/// How often an idle watch re-reads the pod dir (when there is one).
const POD_DIR_POLL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    pods: BTreeMap<Key, Value>,
    /// Pods of the pod dir as last read; looked up before `pods`.
    dir_pods: BTreeMap<Key, Value>,
    /// What is served: per pod, its source (as added or read) and the copy stamped with its resource version.
    served: BTreeMap<Key, (Value, Value)>,
    /// The resource version of the last change (0: none yet).
    rv: u64,
    changes: VecDeque<Change>,
    namespaces: BTreeMap<String, Value>,
    daemonsets: BTreeMap<Key, Value>,
    pod_dir: Option<PathBuf>,
    faults: VecDeque<Fault>,
    requests: HashMap<String, usize>,
    log: Vec<LoggedRequest>,
    total: usize,
    /// The status every list and watch of pods is answered with instead, when set.
    refuse_list_watch: Option<u16>,
    watches_paused: bool,
    /// Bumped by [`ApiServer::end_watches`]: a stream started in an older generation ends.
    watch_generation: u64,
    /// Events created (`POST .../events`), as received.
    events: Vec<Value>,
    /// Every error answer (4xx, 5xx) quotes the request as received, headers included (see
    /// [`ApiServer::echo_requests`]).
    echo: bool,
}

struct Shared {
    state: Mutex<State>,
    token: String,
    tls_failures: AtomicU64,
    /// Connections reset by [`Fault::Reset`].
    resets: AtomicU64,
    /// Until when the listening socket stays closed ([`ApiServer::refuse_connections_for`]).
    refuse_until: Mutex<Option<tokio::time::Instant>>,
    /// Wakes the accept loop when `refuse_until` was set.
    listen_changed: tokio::sync::Notify,
    /// Whether the listening socket is open (the accept loop's view).
    listening: std::sync::atomic::AtomicBool,
    /// Bumped after every change a watch may care about (a pod, a pause, an end).
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Options of [`ApiServer`].
#[derive(Debug, Default, Clone)]
pub struct ApiServerBuilder {
    netns: Option<PathBuf>,
    token: Option<String>,
    port: u16,
    expired_cert: bool,
    pod_dir: Option<PathBuf>,
}

impl ApiServerBuilder {
    /// Create the listening socket inside this network namespace (e.g. `/run/netns/NAME`); its `lo` must be up.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }
    /// The bearer token to require (default: a random one).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
    /// Listen on this port (default 0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Present a leaf certificate that expired on 2000-01-01 (the CA itself stays valid).
    pub fn expired_cert(mut self, yes: bool) -> Self {
        self.expired_cert = yes;
        self
    }
    /// Serve the pods of the `*.json` files of this directory (one Pod object per file), re-read on every
    /// request, in addition to the pods added with [`ApiServer::add_pod`].
    pub fn pod_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pod_dir = Some(dir.into());
        self
    }

    pub fn start(self) -> Result<ApiServer, ApiServerError> {
        let certs = Certs::generate(self.expired_cert)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![certs.leaf_der.clone(), certs.ca_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(certs.leaf_key_der.clone_key()),
            )?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let mut place = Place {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            netns: self.netns.clone(),
        };
        let listener = place.bind()?;
        let port = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind {
                port: self.port,
                netns: self.netns.clone(),
                source,
            })?
            .port();
        // Listening again after a refusal means the same port, not any free one.
        place.addr.set_port(port);

        let token = self.token.unwrap_or_else(random_token);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pod_dir: self.pod_dir,
                ..State::default()
            }),
            token: token.clone(),
            tls_failures: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            refuse_until: Mutex::new(None),
            listen_changed: tokio::sync::Notify::new(),
            listening: std::sync::atomic::AtomicBool::new(true),
            changed: watch::Sender::new(0),
        });
        {
            // Pods of the dir are served (and listed) from the start.
            let mut st = shared.lock();
            if let Err(e) = reload_pod_dir(&mut st) {
                eprintln!("test apiserver: {e}");
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let srv_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-apiserver-{port}"))
            .spawn(move || rt.block_on(serve(listener, place, acceptor, srv_shared, stop_rx)))
            .map_err(ApiServerError::Runtime)?;
        Ok(ApiServer {
            port,
            ca_pem: certs.ca_pem,
            token,
            netns: self.netns,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// Where the server listens: to listen there again after [`ApiServer::refuse_connections_for`].
#[derive(Debug, Clone)]
struct Place {
    addr: SocketAddr,
    netns: Option<PathBuf>,
}

impl Place {
    fn bind(&self) -> Result<StdTcpListener, ApiServerError> {
        let bind_err = |source| ApiServerError::Bind {
            port: self.addr.port(),
            netns: self.netns.clone(),
            source,
        };
        let listener = match &self.netns {
            None => StdTcpListener::bind(self.addr).map_err(bind_err)?,
            Some(ns) => bind_in_netns(ns, self.addr)?,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(listener)
    }
}

/// Binds on a dedicated thread that first enters `netns`; the socket stays in that netns.
fn bind_in_netns(netns: &Path, addr: SocketAddr) -> Result<StdTcpListener, ApiServerError> {
    let path = netns.to_path_buf();
    let handle = std::thread::spawn(move || -> Result<StdTcpListener, ApiServerError> {
        let f = File::open(&path).map_err(|source| ApiServerError::OpenNetns {
            path: path.clone(),
            source,
        })?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
            ApiServerError::Setns {
                path: path.clone(),
                source,
            }
        })?;
        // This thread now lives in `path` and ends right after the bind.
        StdTcpListener::bind(addr).map_err(|source| ApiServerError::Bind {
            port: addr.port(),
            netns: Some(path),
            source,
        })
    });
    handle.join().map_err(|_| ApiServerError::BindThread)?
}

/// A random bearer token shaped as a service account's is (a JWT: `{"alg":"none"}`, `{"sub":"meshcni-test"}`,
/// then random hex as its signature), so the plugin reads the stub's kubeconfig as it reads a real node's.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::from("eyJhbGciOiJub25lIn0.eyJzdWIiOiJtZXNoY25pLXRlc3QifQ.");
    for i in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(i);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

struct Certs {
    ca_pem: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    leaf_der: rustls::pki_types::CertificateDer<'static>,
    leaf_key_der: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

impl Certs {
    fn generate(expired: bool) -> Result<Self, ApiServerError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("meshcni test CA {}", random_token()),
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            leaf_params.not_before = rcgen::date_time_ymd(1999, 1, 1);
            leaf_params.not_after = rcgen::date_time_ymd(2000, 1, 1);
        }
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        Ok(Certs {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            leaf_der: leaf.der().clone(),
            leaf_key_der: rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        })
    }
}

/// A running stub; stops when dropped.
pub struct ApiServer {
    port: u16,
    ca_pem: String,
    token: String,
    netns: Option<PathBuf>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("port", &self.port)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    pub fn builder() -> ApiServerBuilder {
        ApiServerBuilder::default()
    }

    /// A server with default options (host netns, random port and token).
    pub fn start() -> Result<Self, ApiServerError> {
        Self::builder().start()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The netns the listening socket lives in, if not the creator's.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Adds (or replaces) a pod, keyed by its `metadata.namespace`/`metadata.name`.
    /// A changed pod is a new resource version and a watch event (ADDED or MODIFIED).
    pub fn add_pod(&self, pod: Value) -> Result<(), ApiServerError> {
        let key = pod_key(&pod)?;
        {
            let mut st = self.shared.lock();
            st.pods.insert(key.clone(), pod);
            st.publish(&key);
        }
        self.shared.notify();
        Ok(())
    }

    /// Removes a pod (a DELETED watch event); whether it was there.
    pub fn remove_pod(&self, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        let removed = {
            let mut st = self.shared.lock();
            let removed = st.pods.remove(&key).is_some();
            st.publish(&key);
            removed
        };
        self.shared.notify();
        removed
    }

    /// The pod as served now (with its `metadata.resourceVersion`).
    pub fn served_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = (namespace.to_string(), name.to_string());
        self.shared.lock().served.get(&key).map(|(_, v)| v.clone())
    }

    /// The resource version of the last change of a pod.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Answers every list and watch of pods with this HTTP status (`None`: serve them again). Open watch streams
    /// are not ended by it (see [`Self::end_watches`]).
    pub fn refuse_list_watch(&self, status: Option<u16>) {
        self.shared.lock().refuse_list_watch = status;
    }

    /// Holds watch events back (`true`) or delivers the held ones and new ones again (`false`).
    pub fn pause_watches(&self, paused: bool) {
        self.shared.lock().watches_paused = paused;
        self.shared.notify();
    }

    /// Ends every open watch stream (cleanly, as a server does at `timeoutSeconds`).
    pub fn end_watches(&self) {
        self.shared.lock().watch_generation += 1;
        self.shared.notify();
    }

    /// Adds a namespace with these labels (namespaces of pods exist without it).
    pub fn add_namespace(&self, name: &str, labels: BTreeMap<String, String>) {
        let ns = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
            "status": {"phase": "Active"},
        });
        self.shared.lock().namespaces.insert(name.to_string(), ns);
    }

    /// Serves this DaemonSet (keyed by its `metadata.namespace`/`metadata.name`), replacing one of that name.
    pub fn set_daemonset(&self, ds: Value) -> Result<(), ApiServerError> {
        let key = pod_key(&ds)?;
        self.shared.lock().daemonsets.insert(key, ds);
        Ok(())
    }

    /// Stops serving a DaemonSet (a GET of it is then `404`); whether it was there.
    pub fn remove_daemonset(&self, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        self.shared.lock().daemonsets.remove(&key).is_some()
    }

    /// GETs of DaemonSets.
    pub fn daemonset_gets(&self) -> usize {
        self.count(|k| matches!(k, RequestKind::DaemonSetGet { .. }))
    }

    /// Queues a fault for the next request that has none queued before it.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// Queues the same fault for the next `n` requests.
    pub fn push_faults(&self, n: usize, fault: Fault) {
        let mut st = self.shared.lock();
        for _ in 0..n {
            st.faults.push_back(fault.clone());
        }
    }

    /// Closes the listening socket now: every connection is refused (`ECONNREFUSED`, a server that is down) until
    /// `d` has passed; then the server listens on the same port again. Open connections are not touched.
    pub fn refuse_connections_for(&self, d: Duration) {
        *self
            .shared
            .refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now() + d);
        self.shared.listen_changed.notify_one();
        // The accept loop closes the socket on its own thread: wait until it did (bounded), so that the caller's
        // next connection is refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.shared.listening.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Connections reset by [`Fault::Reset`].
    pub fn connections_reset(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// From now on every error answer (4xx, 5xx: faults, refusals, 404s) carries the request as received in its
    /// `Status` message, headers included: the `Authorization` header with the bearer token too. A misbehaving
    /// server or proxy could do that; a client must never log the token it is shown back.
    pub fn echo_requests(&self, on: bool) {
        self.shared.lock().echo = on;
    }

    /// The core/v1 Events created so far (`POST /api/v1/namespaces/{ns}/events`), as received.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.len()
    }

    /// Requests received for this path (query excluded), faulted ones included.
    pub fn requests(&self, path: &str) -> usize {
        self.shared.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// Requests received for this pod's path.
    pub fn pod_requests(&self, namespace: &str, name: &str) -> usize {
        self.requests(&pod_path(namespace, name))
    }

    /// Every request received so far, in order.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.shared.lock().log.clone()
    }

    /// GETs of single pods (any pod), lists and watches excluded.
    pub fn pod_gets(&self) -> usize {
        self.count(|k| matches!(k, RequestKind::PodGet { .. }))
    }

    /// Lists of pods.
    pub fn pod_lists(&self) -> usize {
        self.count(|k| *k == RequestKind::PodList)
    }

    /// Watches of pods.
    pub fn pod_watches(&self) -> usize {
        self.count(|k| *k == RequestKind::PodWatch)
    }

    fn count(&self, f: impl Fn(&RequestKind) -> bool) -> usize {
        self.shared.lock().log.iter().filter(|r| f(&r.kind)).count()
    }

    /// All HTTP requests received.
    pub fn total_requests(&self) -> usize {
        self.shared.lock().total
    }

    /// TLS handshakes that failed (e.g. the client did not trust the certificate).
    pub fn tls_failures(&self) -> u64 {
        self.shared.tls_failures.load(Ordering::SeqCst)
    }

    /// A kubeconfig for this server: its URL, CA and token.
    pub fn kubeconfig(&self) -> KubeconfigSpec {
        KubeconfigSpec {
            server: self.url(),
            ca_pem: Some(self.ca_pem.clone()),
            token: self.token.clone(),
            insecure_skip_tls_verify: false,
        }
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        self.kubeconfig().write(path)
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca(&self, path: &Path) -> Result<(), ApiServerError> {
        std::fs::write(path, &self.ca_pem).map_err(|source| ApiServerError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Stops the server and waits for its thread (also done on drop).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// `/api/v1/namespaces/{ns}/pods/{name}`
pub fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{name}")
}

fn pod_key(pod: &Value) -> Result<(String, String), ApiServerError> {
    let meta = |k: &'static str| {
        pod.pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiServerError::PodWithoutMeta(k, truncate(&pod.to_string())))
    };
    Ok((meta("namespace")?, meta("name")?))
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Reads every `*.json` file of `dir` as one Pod.
pub fn read_pod_dir(dir: &Path) -> Result<Vec<Value>, ApiServerError> {
    let derr = |source| ApiServerError::PodDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(derr)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(derr)?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    let mut pods = Vec::new();
    for path in files {
        let ferr = |detail: String| ApiServerError::PodFile {
            path: path.clone(),
            detail,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ferr(e.to_string()))?;
        let pod: Value = serde_json::from_str(&text).map_err(|e| ferr(e.to_string()))?;
        pod_key(&pod).map_err(|e| ferr(e.to_string()))?;
        pods.push(pod);
    }
    Ok(pods)
}

fn register(listener: StdTcpListener) -> Option<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(listener)
        .map_err(|e| eprintln!("test apiserver: cannot register the listener: {e}"))
        .ok()
}

/// Until when connections are to be refused, if that is still ahead.
fn refusing(shared: &Shared) -> Option<tokio::time::Instant> {
    let until = *shared
        .refuse_until
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    until.filter(|t| *t > tokio::time::Instant::now())
}

async fn serve(
    listener: StdTcpListener,
    place: Place,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let Some(mut listener) = register(listener) else {
        return;
    };
    loop {
        if let Some(until) = refusing(&shared) {
            // Down: no listening socket at all, so the kernel refuses every connection.
            drop(listener);
            shared.listening.store(false, Ordering::SeqCst);
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(until) => {}
                _ = shared.listen_changed.notified() => {}
            }
            listener = loop {
                if refusing(&shared).is_some() {
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = shared.listen_changed.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                    continue;
                }
                match place.bind().map(register) {
                    Ok(Some(l)) => {
                        shared.listening.store(true, Ordering::SeqCst);
                        break l;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        eprintln!("test apiserver: listening again: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            continue;
        }
        let accepted = tokio::select! {
            _ = &mut stop => return,
            _ = shared.listen_changed.notified() => continue,
            a = listener.accept() => a,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                eprintln!("test apiserver: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if take_reset(&shared) {
            reset(tcp);
            shared.resets.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(_) => {
                    shared.tls_failures.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            let svc = service_fn(move |req| handle(req, shared.clone()));
            // A `Fault::Drop` ends the connection with a service error: nothing more to do with it.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Pops a [`Fault::Reset`] at the head of the queue.
fn take_reset(shared: &Shared) -> bool {
    let mut st = shared.lock();
    let reset = st.faults.front() == Some(&Fault::Reset);
    if reset {
        st.faults.pop_front();
    }
    reset
}

/// Closes the connection with a TCP RST: `SO_LINGER` with a zero timeout, then close (nothing blocks).
fn reset(tcp: tokio::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::Linger, &linger) {
        eprintln!("test apiserver: SO_LINGER for a reset: {e}");
    }
    drop(tcp);
}

/// The answer of [`Fault::Partial`]: the headers promise 1 KiB more than `body`; after `body` the stream ends
/// (hyper then aborts the connection: the body is cut) or never yields again.
fn partial(status: u16, body: String, hang: bool) -> Resp {
    let declared = body.len() + 1024;
    let chunks = futures::stream::unfold(Some(body), move |left| async move {
        match left {
            Some(body) => Some((Ok::<_, Infallible>(Frame::data(Bytes::from(body))), None)),
            None => {
                if hang {
                    std::future::pending::<()>().await;
                }
                // Let hyper flush the head and the part first: ending at once aborts the connection before it
                // sent anything.
                tokio::time::sleep(Duration::from_millis(50)).await;
                None
            }
        }
    });
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CONTENT_LENGTH, declared)
        .body(UnsyncBoxBody::new(StreamBody::new(chunks.boxed())))
        .unwrap_or_else(|e| status_response(500, &format!("bad partial fault: {e}")))
}

#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
struct Dropped;

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Resp = Response<Body>;

/// What a request is, from its path and query.
fn classify(method: &hyper::Method, path: &str, query: &str) -> RequestKind {
    if method != hyper::Method::GET {
        return RequestKind::Other;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let list = || {
        if Query::parse(query).watch() {
            RequestKind::PodWatch
        } else {
            RequestKind::PodList
        }
    };
    match parts.as_slice() {
        ["version"] => RequestKind::Version,
        ["api", "v1", "namespaces", ns, "pods", name] => RequestKind::PodGet {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        ["api", "v1", "pods"] | ["api", "v1", "namespaces", _, "pods"] => list(),
        ["api", "v1", "namespaces", _] => RequestKind::Namespace,
        ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] => RequestKind::DaemonSetGet {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        _ => RequestKind::Other,
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Resp, Dropped> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let kind = classify(&parts.method, &path, &query);
    let list_or_watch = matches!(kind, RequestKind::PodList | RequestKind::PodWatch);
    let (fault, refused, echo) = {
        let mut st = shared.lock();
        *st.requests.entry(path.clone()).or_insert(0) += 1;
        st.total += 1;
        st.log.push(LoggedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            kind,
        });
        let echo = st.echo;
        if list_or_watch {
            (None, st.refuse_list_watch, echo)
        } else {
            (st.faults.pop_front(), None, echo)
        }
    };
    // A body that cannot be read is an empty one: a write then fails to decode, with a 400.
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let resp = match fault {
        Some(Fault::Drop | Fault::Reset) => return Err(Dropped),
        // A body cut short or stuck half-way is not a Status to quote the request in.
        Some(Fault::Partial {
            status,
            body: partial_body,
            hang,
        }) => return Ok(partial(status, partial_body, hang)),
        Some(Fault::Status(code)) => status_response(code, &format!("injected fault: HTTP {code}")),
        Some(Fault::Raw {
            status,
            headers,
            body,
        }) => {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(full(Bytes::from(body)))
                .unwrap_or_else(|e| status_response(500, &format!("bad raw fault: {e}")))
        }
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            route(&parts, &body, &path, &query, refused, &shared)
        }
        None => route(&parts, &body, &path, &query, refused, &shared),
    };
    Ok(if echo { echoed(resp, &parts) } else { resp })
}

/// An error answer turned into one that quotes the request as received (method, URI, every header).
fn echoed(resp: Resp, parts: &hyper::http::request::Parts) -> Resp {
    let code = resp.status().as_u16();
    if code < 400 {
        return resp;
    }
    let headers: Vec<String> = parts
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    status_response(
        code,
        &format!(
            "HTTP {code} for the request as received: {} {} {}",
            parts.method,
            parts.uri,
            headers.join("; ")
        ),
    )
}

fn route(
    req: &hyper::http::request::Parts,
    body: &Bytes,
    path: &str,
    query: &str,
    refused: Option<u16>,
    shared: &Arc<Shared>,
) -> Resp {
    let get = req.method == hyper::Method::GET;
    if get && path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-meshcni-stub", "platform": "linux/amd64"}),
        );
    }
    if !path.starts_with("/api/") && !path.starts_with("/apis/") {
        return status_response(
            404,
            &format!("the server could not find the requested resource {path}"),
        );
    }
    let expected = format!("Bearer {}", shared.token);
    let authorized = req
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return status_response(401, "Unauthorized");
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = &req.method;
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let st = reload(shared);
            match st.served.get(&(ns.to_string(), name.to_string())) {
                Some((_, pod)) => json_response(200, pod),
                None => not_found("pods", name),
            }
        }
        ("GET", ["api", "v1", "pods"]) => list_or_watch(shared, None, query, refused),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
            list_or_watch(shared, Some(ns), query, refused)
        }
        ("GET", ["api", "v1", "namespaces", ns]) => {
            let st = reload(shared);
            if let Some(n) = st.namespaces.get(*ns) {
                return json_response(200, n);
            }
            if st.has_pods_in(ns) {
                let n = json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns}, "status": {"phase": "Active"},
                });
                return json_response(200, &n);
            }
            not_found("namespaces", ns)
        }
        ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
            delete_pod(shared, (ns, name), body)
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            let merge = req
                .headers
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == b"application/merge-patch+json");
            if !merge {
                return status_response(
                    415,
                    "the stub applies merge patches (application/merge-patch+json) only",
                );
            }
            patch_pod(shared, (ns, name), body)
        }
        ("POST", ["api", "v1", "namespaces", ns, "events"]) => create_event(shared, ns, body),
        ("GET", ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
            let st = shared.lock();
            match st.daemonsets.get(&(ns.to_string(), name.to_string())) {
                Some(ds) => json_response(200, ds),
                None => not_found("daemonsets.apps", name),
            }
        }
        ("GET", _) => status_response(
            404,
            &format!("the server could not find the requested resource {path}"),
        ),
        _ => status_response(405, &format!("method {method} not allowed on {path}")),
    }
}

/// `DELETE` of a pod added with [`ApiServer::add_pod`], honouring the `preconditions` (UID, resource version) of
/// the `DeleteOptions` body: the pod as it was served (200), then a DELETED watch event.
fn delete_pod(shared: &Arc<Shared>, (ns, name): (&str, &str), body: &[u8]) -> Resp {
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status_response(400, &format!("DeleteOptions: {e}")),
        }
    };
    let key = (ns.to_string(), name.to_string());
    let served = {
        let mut st = reload(shared);
        let Some((_, served)) = st.served.get(&key).cloned() else {
            return not_found("pods", name);
        };
        if st.dir_pods.contains_key(&key) {
            return status_response(405, "the stub cannot delete a pod of its pod dir");
        }
        for (field, pointer) in [
            ("uid", "/metadata/uid"),
            ("resourceVersion", "/metadata/resourceVersion"),
        ] {
            let Some(want) = options["preconditions"][field].as_str() else {
                continue;
            };
            let have = served
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            if want != have {
                return status_response(
                    409,
                    &format!("Precondition failed: {field} in precondition: {want}, {field} in object meta: {have}"),
                );
            }
        }
        st.pods.remove(&key);
        st.publish(&key);
        served
    };
    shared.notify();
    json_response(200, &served)
}

/// A merge patch (RFC 7386) of a pod added with [`ApiServer::add_pod`], through its `status` subresource: the
/// patched pod (200), a new resource version and a MODIFIED watch event.
fn patch_pod(shared: &Arc<Shared>, (ns, name): (&str, &str), body: &[u8]) -> Resp {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_response(400, &format!("merge patch: {e}")),
    };
    let key = (ns.to_string(), name.to_string());
    let patched = {
        let mut st = reload(shared);
        let Some(source) = st.pods.get_mut(&key) else {
            return not_found("pods", name);
        };
        merge_patch(source, &patch);
        st.publish(&key);
        st.served.get(&key).map(|(_, v)| v.clone())
    };
    shared.notify();
    match patched {
        Some(pod) => json_response(200, &pod),
        None => not_found("pods", name),
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in fields {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `POST` of a core/v1 Event into `ns`: kept (see [`ApiServer::events`]) and answered as created (201).
fn create_event(shared: &Arc<Shared>, ns: &str, body: &[u8]) -> Resp {
    let event: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_response(400, &format!("Event: {e}")),
    };
    if let Some(other) = event
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| *n != ns)
    {
        return status_response(
            400,
            &format!("the namespace of the provided object ({other}) does not match the namespace sent on the request ({ns})"),
        );
    }
    shared.lock().events.push(event.clone());
    json_response(201, &event)
}

/// Locks the state after re-reading the pod dir (a broken dir is logged; the last good read stays served).
fn reload(shared: &Shared) -> MutexGuard<'_, State> {
    let mut st = shared.lock();
    let before = st.rv;
    if let Err(e) = reload_pod_dir(&mut st) {
        eprintln!("test apiserver: {e}");
    }
    if st.rv != before {
        shared.notify();
    }
    st
}

/// Re-reads the pod dir, if any, into `dir_pods` (removed files vanish) and publishes what changed.
fn reload_pod_dir(st: &mut State) -> Result<(), ApiServerError> {
    let Some(dir) = st.pod_dir.as_deref() else {
        return Ok(());
    };
    let mut dir_pods = BTreeMap::new();
    for pod in read_pod_dir(dir)? {
        dir_pods.insert(pod_key(&pod)?, pod);
    }
    let old = std::mem::replace(&mut st.dir_pods, dir_pods);
    let keys: Vec<Key> = old.keys().chain(st.dir_pods.keys()).cloned().collect();
    for key in keys {
        st.publish(&key);
    }
    Ok(())
}

impl State {
    fn has_pods_in(&self, namespace: &str) -> bool {
        self.served.keys().any(|(ns, _)| ns == namespace)
    }

    /// Makes what is served for `key` what the sources say (the pod dir before the added pods); a change gets the
    /// next resource version and a logged change.
    fn publish(&mut self, key: &Key) {
        let source = self
            .dir_pods
            .get(key)
            .or_else(|| self.pods.get(key))
            .cloned();
        let old = self.served.get(key).cloned();
        let (new, removed) = match (&old, source) {
            (None, None) => return,
            (Some((old_src, _)), Some(src)) if *old_src == src => return,
            (_, Some(src)) => (src, false),
            (Some((_, stamped)), None) => (stamped.clone(), true),
        };
        self.rv += 1;
        let mut stamped = new.clone();
        if let Some(meta) = stamped.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        }
        if removed {
            self.served.remove(key);
        } else {
            self.served.insert(key.clone(), (new, stamped.clone()));
        }
        self.changes.push_back(Change {
            rv: self.rv,
            old: old.map(|(_, stamped)| stamped),
            new: stamped,
            removed,
        });
        while self.changes.len() > MAX_CHANGES {
            self.changes.pop_front();
        }
    }

    /// The served pods `sel` matches, in key order.
    fn matching<'a>(
        &'a self,
        sel: &'a Selector,
        after: Option<&'a Key>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.served
            .iter()
            .filter(move |(k, _)| after.is_none_or(|a| *k > a))
            .map(|(k, (_, stamped))| (k, stamped))
            .filter(move |(_, pod)| sel.matches(pod))
    }
}

/// The query parameters of a list or watch that the stub understands.
#[derive(Debug, Default)]
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            })
            .collect();
        Query { pairs }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn watch(&self) -> bool {
        self.flag("watch")
    }
}

/// `%XX` and `+` decoding of one query component (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields a selector may name.
const KNOWN_FIELDS: &str = "spec.nodeName, metadata.name, metadata.namespace";

/// A field selector of pods: every term must hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Selector {
    /// (JSON pointer of the field, value, equal)
    terms: Vec<(&'static str, String, bool)>,
}

impl Selector {
    /// `namespace` from the path, `fieldSelector` from the query; an unknown field or any label selector is an
    /// error message (400), never silently ignored.
    fn new(namespace: Option<&str>, q: &Query) -> Result<Selector, String> {
        let mut sel = Selector::default();
        if let Some(ns) = namespace {
            sel.terms
                .push(("/metadata/namespace", ns.to_string(), true));
        }
        if let Some(l) = q.get("labelSelector").filter(|l| !l.is_empty()) {
            return Err(format!(
                "labelSelector {l:?}: the test API server does not implement label selectors"
            ));
        }
        for term in q
            .get("fieldSelector")
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let pointer = match field {
                "spec.nodeName" => "/spec/nodeName",
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => {
                    return Err(format!(
                    "field label not supported: {other} (the test API server knows {KNOWN_FIELDS})"
                ))
                }
            };
            sel.terms.push((pointer, value.to_string(), equal));
        }
        Ok(sel)
    }

    fn matches(&self, pod: &Value) -> bool {
        self.terms.iter().all(|(pointer, value, equal)| {
            // An unset field is the empty string, as for a real server (an unscheduled pod has nodeName "").
            let got = pod.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (got == value) == *equal
        })
    }
}

fn list_or_watch(
    shared: &Arc<Shared>,
    namespace: Option<&str>,
    query: &str,
    refused: Option<u16>,
) -> Resp {
    if let Some(code) = refused {
        return status_response(code, &format!("list/watch of pods refused: HTTP {code}"));
    }
    let q = Query::parse(query);
    let sel = match Selector::new(namespace, &q) {
        Ok(s) => s,
        Err(e) => return status_response(400, &e),
    };
    if q.watch() {
        watch_pods(shared, sel, &q)
    } else {
        list_pods(shared, &sel, &q)
    }
}

/// A `PodList`: `limit` pods at most, the rest behind a `continue` token (`<rv>/<namespace>/<name>` of the last
/// pod given; the next page starts after it, from the pods as they are then, with the first page's version).
fn list_pods(shared: &Shared, sel: &Selector, q: &Query) -> Resp {
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(l) => match l.parse::<usize>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => return status_response(400, &format!("limit {l:?} is not a number")),
        },
    };
    let st = reload(shared);
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(token) => {
            let mut it = token.splitn(3, '/');
            match (
                it.next().and_then(|r| r.parse::<u64>().ok()),
                it.next(),
                it.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_string(), name.to_string()))),
                _ => return status_response(400, &format!("invalid continue token {token:?}")),
            }
        }
    };
    let mut items = Vec::new();
    let mut more = false;
    let mut last = None;
    for (key, pod) in st.matching(sel, after.as_ref()) {
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            break;
        }
        items.push(pod.clone());
        last = Some(key.clone());
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (true, Some((ns, name))) = (more, last) {
        metadata["continue"] = json!(format!("{rv}/{ns}/{name}"));
    }
    json_response(
        200,
        &json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// One open watch stream.
struct WatchStream {
    shared: Arc<Shared>,
    rx: watch::Receiver<u64>,
    sel: Selector,
    /// Changes after this version are still to be sent.
    after: u64,
    pending: VecDeque<Bytes>,
    deadline: tokio::time::Instant,
    generation: u64,
    done: bool,
}

impl WatchStream {
    /// Queues the changes after `self.after` this watcher sees (unless paused); ends the stream on an expired
    /// version or after [`ApiServer::end_watches`].
    fn collect(&mut self) {
        let st = reload(&self.shared);
        if st.watch_generation != self.generation {
            self.done = true;
            return;
        }
        if st.watches_paused || st.rv <= self.after {
            return;
        }
        let oldest = st.changes.front().map_or(st.rv + 1, |c| c.rv);
        if oldest > self.after + 1 {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {} ({})", self.after, oldest - 1),
                "reason": "Expired", "code": 410,
            });
            self.pending.push_back(event_line("ERROR", &status));
            self.done = true;
            return;
        }
        for c in st.changes.iter().filter(|c| c.rv > self.after) {
            let was = c.old.as_ref().is_some_and(|o| self.sel.matches(o));
            let is = self.sel.matches(&c.new);
            let kind = match (was, is, c.removed) {
                (true, true, true) => "DELETED",
                (false, true, false) => "ADDED",
                (true, true, false) => "MODIFIED",
                // It no longer matches: gone, for this watcher.
                (true, false, _) => "DELETED",
                _ => continue,
            };
            self.pending.push_back(event_line(kind, &c.new));
        }
        self.after = st.rv;
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            if self.done || tokio::time::Instant::now() >= self.deadline {
                return None;
            }
            // Mark the current notification seen before reading the state: a change after it wakes us.
            self.rx.borrow_and_update();
            self.collect();
            if !self.pending.is_empty() || self.done {
                continue;
            }
            let polls_dir = self.shared.lock().pod_dir.is_some();
            let wake = if polls_dir {
                self.deadline
                    .min(tokio::time::Instant::now() + POD_DIR_POLL)
            } else {
                self.deadline
            };
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// A watch: the changes after `resourceVersion` (or every current pod as ADDED first), then each new change,
/// one JSON line each, until `timeoutSeconds`.
fn watch_pods(shared: &Arc<Shared>, sel: Selector, q: &Query) -> Resp {
    let timeout = match q.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        None => Duration::from_secs(1800),
        Some(t) => match t.parse::<u64>() {
            Ok(s) => Duration::from_secs(s),
            Err(_) => {
                return status_response(400, &format!("timeoutSeconds {t:?} is not a number"))
            }
        },
    };
    let initial = q.flag("sendInitialEvents");
    let from = match q.get("resourceVersion").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => {
                return status_response(400, &format!("resourceVersion {v:?} is not a number"))
            }
        },
    };
    let mut pending = VecDeque::new();
    let (after, generation) = {
        let st = reload(shared);
        let after = if initial || from.is_none() {
            for (_, pod) in st.matching(&sel, None) {
                pending.push_back(event_line("ADDED", pod));
            }
            if initial {
                let bookmark = json!({
                    "kind": "Pod", "apiVersion": "v1",
                    "metadata": {"resourceVersion": st.rv.to_string(),
                                 "annotations": {"k8s.io/initial-events-end": "true"}},
                });
                pending.push_back(event_line("BOOKMARK", &bookmark));
            }
            st.rv
        } else {
            // A version from the future is "now" (a real server would wait for it).
            from.unwrap_or(0).min(st.rv)
        };
        (after, st.watch_generation)
    };
    let stream = WatchStream {
        shared: shared.clone(),
        rx: shared.changed.subscribe(),
        sel,
        after,
        pending,
        deadline: tokio::time::Instant::now() + timeout,
        generation,
        done: false,
    };
    let lines = futures::stream::unfold(stream, |mut s| async move {
        let line = s.next_line().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), s))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(UnsyncBoxBody::new(StreamBody::new(lines.boxed())))
        .unwrap_or_else(|e| status_response(500, &format!("watch response: {e}")))
}

fn full(b: Bytes) -> Body {
    UnsyncBoxBody::new(Full::new(b))
}

fn json_response(code: u16, v: &Value) -> Resp {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(v.to_string())))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn reason_for(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        408 => "Timeout",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "",
    }
}

/// A response with a Kubernetes `Status` body.
fn status_response(code: u16, message: &str) -> Resp {
    let v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason_for(code), "code": code,
    });
    json_response(code, &v)
}

fn not_found(resource: &str, name: &str) -> Resp {
    let v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("{resource} \"{name}\" not found"),
        "reason": "NotFound", "details": {"name": name, "kind": resource}, "code": 404,
    });
    json_response(404, &v)
}

/// A minimal sidecar-injected Pod object (an `istio-proxy` container, the injector's status annotation), for tests
/// that only need "a pod that exists".
pub fn sample_pod(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("uid-{namespace}-{name}"),
            "annotations": {"sidecar.istio.io/status": "{\"initContainers\":null,\"containers\":[\"istio-proxy\"]}"},
            "labels": {"app": name},
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "istio-proxy", "image": "proxyv2:1", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}},
            ],
        },
    })
}

/// A DaemonSet as the API server answers it (what the agent reads on shutdown): `deleting` sets
/// `metadata.deletionTimestamp`, as on a DaemonSet whose deletion waits for its finalizers or its pods (foreground).
pub fn sample_daemonset(namespace: &str, name: &str, deleting: bool) -> Value {
    let mut ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-ds-{name}"), "generation": 1},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": name}},
            "template": {
                "metadata": {"labels": {"k8s-app": name}},
                "spec": {"containers": [{"name": "install-cni", "image": "localhost/meshcni/node-agent:0.1.0"}]},
            },
        },
        "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 1},
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    }
    ds
}
