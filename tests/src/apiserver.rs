//! A small HTTPS Kubernetes API server stub for tests: serves Pod JSON, checks a bearer token, injects faults.
//!
//! * TLS with a real chain: a fresh CA and a leaf for `IP:127.0.0.1` (rustls refuses a CA certificate used as the
//!   server's own). [`ApiServerBuilder::expired_cert`] issues a leaf that expired in 2000.
//! * `GET /api/v1/namespaces/{ns}/pods/{name}`: the Pod from the in-memory map (or from a directory of Pod JSON
//!   files, re-read on every request), `404` with a Kubernetes `Status` body when unknown.
//!   `GET /api/v1/namespaces/{ns}`: a Namespace when a pod lives there or it was added. `GET /version`: a version
//!   object (no token needed, as on a real server). Anything else: `404`. Every `/api` request needs
//!   `Authorization: Bearer <token>` (`401` Status otherwise).
//! * Faults, consumed one per request in FIFO order whatever the path: a canned status, a raw answer, a delay
//!   before the normal answer, or dropping the connection without an answer.
//! * Request counts per path (query excluded) and a count of failed TLS handshakes, so a test can assert "no API
//!   call was made" or "the client gave up during the handshake".
//! * The server runs on its own thread with its own current-thread tokio runtime, bound to `127.0.0.1` (port 0 by
//!   default). [`ApiServerBuilder::netns`] creates the listening socket inside a given network namespace (a
//!   socket stays in the netns where it was created): the server is then reachable on that netns's loopback only.
//!   Dropping the handle stops the server and joins its thread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::oneshot;
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

#[derive(Default)]
struct State {
    pods: BTreeMap<(String, String), Value>,
    /// Pods of the pod dir as last read; looked up before `pods`.
    dir_pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    pod_dir: Option<PathBuf>,
    faults: VecDeque<Fault>,
    requests: HashMap<String, usize>,
    total: usize,
}

struct Shared {
    state: Mutex<State>,
    token: String,
    tls_failures: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let listener = match &self.netns {
            None => StdTcpListener::bind(addr).map_err(|source| ApiServerError::Bind {
                port: self.port,
                netns: None,
                source,
            })?,
            Some(ns) => bind_in_netns(ns, addr)?,
        };
        let bind_err = |source| ApiServerError::Bind {
            port: self.port,
            netns: self.netns.clone(),
            source,
        };
        let port = listener.local_addr().map_err(bind_err)?.port();
        listener.set_nonblocking(true).map_err(bind_err)?;

        let token = self.token.unwrap_or_else(random_token);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pod_dir: self.pod_dir,
                ..State::default()
            }),
            token: token.clone(),
            tls_failures: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let srv_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-apiserver-{port}"))
            .spawn(move || rt.block_on(serve(listener, acceptor, srv_shared, stop_rx)))
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

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::from("meshcni-test-");
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
    pub fn add_pod(&self, pod: Value) -> Result<(), ApiServerError> {
        let key = pod_key(&pod)?;
        self.shared.lock().pods.insert(key, pod);
        Ok(())
    }

    /// Removes a pod; whether it was there.
    pub fn remove_pod(&self, namespace: &str, name: &str) -> bool {
        self.shared
            .lock()
            .pods
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
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

async fn serve(
    listener: StdTcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test apiserver: cannot register the listener: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
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

#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
struct Dropped;

type Resp = Response<Full<Bytes>>;

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Resp, Dropped> {
    let path = req.uri().path().to_string();
    let fault = {
        let mut st = shared.lock();
        *st.requests.entry(path.clone()).or_insert(0) += 1;
        st.total += 1;
        st.faults.pop_front()
    };
    match fault {
        None => {}
        Some(Fault::Drop) => return Err(Dropped),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Status(code)) => {
            return Ok(status_response(
                code,
                &format!("injected fault: HTTP {code}"),
            ))
        }
        Some(Fault::Raw {
            status,
            headers,
            body,
        }) => {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            return Ok(b
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|e| status_response(500, &format!("bad raw fault: {e}"))));
        }
    }
    Ok(route(&req, &path, &shared))
}

fn route(req: &Request<Incoming>, path: &str, shared: &Shared) -> Resp {
    if req.method() != hyper::Method::GET {
        return status_response(405, &format!("method {} not allowed", req.method()));
    }
    if path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-meshcni-stub", "platform": "linux/amd64"}),
        );
    }
    if !path.starts_with("/api/") {
        return status_response(
            404,
            &format!("the server could not find the requested resource {path}"),
        );
    }
    let expected = format!("Bearer {}", shared.token);
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return status_response(401, "Unauthorized");
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name] => {
            let mut st = shared.lock();
            if let Err(e) = reload_pod_dir(&mut st) {
                return status_response(500, &e.to_string());
            }
            match st.pod(ns, name) {
                Some(pod) => json_response(200, pod),
                None => not_found("pods", name),
            }
        }
        ["api", "v1", "namespaces", ns] => {
            let mut st = shared.lock();
            if let Err(e) = reload_pod_dir(&mut st) {
                return status_response(500, &e.to_string());
            }
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
        _ => status_response(
            404,
            &format!("the server could not find the requested resource {path}"),
        ),
    }
}

/// Re-reads the pod dir, if any, into `dir_pods` (removed files vanish).
fn reload_pod_dir(st: &mut State) -> Result<(), ApiServerError> {
    let Some(dir) = st.pod_dir.as_deref() else {
        return Ok(());
    };
    let mut dir_pods = BTreeMap::new();
    for pod in read_pod_dir(dir)? {
        dir_pods.insert(pod_key(&pod)?, pod);
    }
    st.dir_pods = dir_pods;
    Ok(())
}

impl State {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Value> {
        let key = (namespace.to_string(), name.to_string());
        self.dir_pods.get(&key).or_else(|| self.pods.get(&key))
    }

    fn has_pods_in(&self, namespace: &str) -> bool {
        let in_ns = |(ns, _): &(String, String)| ns == namespace;
        self.dir_pods.keys().any(in_ns) || self.pods.keys().any(in_ns)
    }
}

fn json_response(code: u16, v: &Value) -> Resp {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
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
