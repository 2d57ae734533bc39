//! The plugin's own HTTPS GET of a pod: one TLS connection made from the calling thread (std's `TcpStream` and
//! rustls, no async runtime, no connection pool, no proxy), one HTTP/1.1 request with `Connection: close`, the
//! answer read until it is complete. A plugin process makes one request per attempt and exits: everything a
//! general client sets up for a long life (a runtime, a pool, a service stack) is start-up cost here.
//!
//! It serves the kubeconfigs the node agent writes and the usual hand-written ones: a bearer token (inline or a
//! `tokenFile`, read at each attempt), client certificates, a CA (`certificate-authority(-data)`),
//! `insecure-skip-tls-verify`, `tls-server-name` and a server URL with a path prefix. A kubeconfig that needs more
//! (an `exec` or `auth-provider` plugin, basic auth, impersonation, the system's CA store) goes to kube's client
//! instead ([`Endpoint::from_config`] returns `None`), so nothing kube supported is lost.
//!
//! Failures are classified as with kube's client: a TLS failure (unknown CA, expired or misnamed certificate, not
//! TLS at all) is permanent; a refused, reset or closed connection and a malformed HTTP answer are transient; no
//! answer within the per-request timeout (connect, handshake, request and whole answer) is a timeout.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use secrecy::{ExposeSecret, SecretString};

use super::LookupErrorKind;

/// The most of an answer (headers and body) the plugin reads: a Pod is far smaller (etcd refuses objects above
/// 1.5 MiB); a longer answer is not a Pod.
pub const MAX_ANSWER: usize = 8 << 20;
/// The most response headers parsed.
const MAX_HEADERS: usize = 64;
const USER_AGENT: &str = "istio-cni (meshcni)";

/// One API server as a kubeconfig names it, ready for requests.
pub(super) struct Endpoint {
    /// Host to connect to: an IP address or a DNS name (no brackets).
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority as written.
    authority: String,
    /// The URL's path, without a trailing `/` ("" for none): an API server behind a path-routing proxy.
    base_path: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    auth: Auth,
}

enum Auth {
    None,
    Token(SecretString),
    /// Read at each attempt: the file is rotated under a running node.
    TokenFile(PathBuf),
}

/// A complete HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Answer {
    pub status: u16,
    /// The server's `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// Why kube's client must serve a kubeconfig rather than [`Endpoint`].
fn needs_kube(config: &kube::Config) -> Option<&'static str> {
    let a = &config.auth_info;
    if a.exec.is_some() {
        Some("an exec credential plugin")
    } else if a.auth_provider.is_some() {
        Some("an auth-provider")
    } else if a.username.is_some() || a.password.is_some() {
        Some("basic auth")
    } else if a.impersonate.is_some()
        || a.impersonate_groups.is_some()
        || a.impersonate_uid.is_some()
    {
        Some("impersonation")
    } else if config.root_cert.is_none()
        && config.root_cert_file.is_none()
        && !config.accept_invalid_certs
    {
        Some("the system's CA store (no certificate-authority)")
    } else {
        None
    }
}

impl Endpoint {
    /// The endpoint of `config`, or `Ok(Err(reason))` when it needs kube's client (see the module docs).
    pub(super) fn from_config(
        config: &kube::Config,
    ) -> Result<Result<Self, &'static str>, LookupErrorKind> {
        if let Some(reason) = needs_kube(config) {
            return Ok(Err(reason));
        }
        let invalid = |detail: String| LookupErrorKind::KubeconfigInvalid { detail };
        let url = &config.cluster_url;
        let authority = url
            .authority()
            .ok_or_else(|| invalid(format!("server {url} has no host")))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(443);
        let name = config
            .tls_server_name
            .clone()
            .unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| invalid(format!("server name {name:?} for TLS: {e}")))?;
        Ok(Ok(Endpoint {
            host,
            port,
            authority: authority.as_str().to_string(),
            base_path: url.path().trim_end_matches('/').to_string(),
            server_name,
            tls: Arc::new(tls_config(config)?),
            auth: auth(&config.auth_info),
        }))
    }

    /// GETs `path` (below the server URL's own path) within `timeout`: connect, TLS handshake, request and the
    /// whole answer.
    pub(super) fn get(&self, path: &str, timeout: Duration) -> Result<Answer, LookupErrorKind> {
        let deadline = Instant::now() + timeout;
        let timed_out = || LookupErrorKind::Timeout { timeout };
        let request = self.request(path)?;
        let sock = self.connect(deadline, timeout)?;
        let _ = sock.set_nodelay(true);
        let mut conn =
            ClientConnection::new(self.tls.clone(), self.server_name.clone()).map_err(|e| {
                LookupErrorKind::Client {
                    chain: format!("starting the TLS connection: {e}"),
                }
            })?;
        // Buffered until the handshake is done, then sent with the client's Finished: no round trip of its own.
        conn.writer()
            .write_all(request.expose_secret().as_bytes())
            .map_err(|e| LookupErrorKind::Client {
                chain: format!("queueing the request: {e}"),
            })?;
        let mut io = Deadlined {
            sock: &sock,
            deadline,
        };
        let mut plain: Vec<u8> = Vec::new();
        loop {
            while conn.wants_write() {
                conn.write_tls(&mut io).map_err(|e| {
                    io_error(e, timed_out, &answer_context(&plain, "sending the request"))
                })?;
            }
            let eof = match conn.read_tls(&mut io) {
                Ok(n) => n == 0,
                Err(e) => {
                    let what = if conn.is_handshaking() {
                        "TLS handshake"
                    } else {
                        "reading the answer"
                    };
                    return Err(io_error(e, timed_out, &answer_context(&plain, what)));
                }
            };
            let state = conn
                .process_new_packets()
                .map_err(|e| LookupErrorKind::Tls {
                    chain: format!("{e}"),
                })?;
            let closed = state.peer_has_closed();
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let old = plain.len();
                plain.resize(old + n, 0);
                conn.reader().read_exact(&mut plain[old..]).map_err(|e| {
                    LookupErrorKind::Transport {
                        chain: format!("reading the answer: {e}"),
                    }
                })?;
            }
            let end = if closed {
                End::Closed
            } else if eof {
                End::Cut
            } else {
                End::Open
            };
            if end != End::Open && conn.is_handshaking() {
                return Err(LookupErrorKind::Transport {
                    chain: "the server closed the connection during the TLS handshake".into(),
                });
            }
            if let Some(answer) = parse_answer(&plain, end).map_err(AnswerError::into_kind)? {
                return Ok(answer);
            }
        }
    }

    /// The request, with the credentials: secret as a whole.
    fn request(&self, path: &str) -> Result<SecretString, LookupErrorKind> {
        let token = match &self.auth {
            Auth::None => None,
            Auth::Token(t) => Some(t.expose_secret().trim().to_string()),
            Auth::TokenFile(file) => {
                let token = std::fs::read_to_string(file).map_err(|e| LookupErrorKind::Client {
                    chain: format!("reading tokenFile {}: {e}", file.display()),
                })?;
                // Read again at each attempt (the file rotates): redacted from the first read on. An inline token
                // was registered when the kubeconfig was read.
                crate::redact::register(&token);
                Some(token.trim().to_string())
            }
        };
        let mut req = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {USER_AGENT}\r\nAccept: application/json\r\n",
            self.base_path, self.authority
        );
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            if token.chars().any(char::is_control) {
                return Err(LookupErrorKind::KubeconfigInvalid {
                    detail: "the bearer token contains control characters".into(),
                });
            }
            req.push_str("Authorization: Bearer ");
            req.push_str(&token);
            req.push_str("\r\n");
        }
        req.push_str("Connection: close\r\n\r\n");
        Ok(SecretString::from(req))
    }

    /// A connected socket to the server's first address that answers.
    fn connect(&self, deadline: Instant, timeout: Duration) -> Result<TcpStream, LookupErrorKind> {
        let timed_out = || LookupErrorKind::Timeout { timeout };
        let addrs = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => resolve(&self.host, self.port, deadline).ok_or_else(timed_out)??,
        };
        let mut last = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => return Ok(s),
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => last = Some(format!("connecting to {addr}: {e}")),
            }
        }
        Err(LookupErrorKind::Transport {
            chain: last.unwrap_or_else(|| format!("{}: no address", self.host)),
        })
    }
}

/// Resolves a DNS name on a helper thread (getaddrinfo has no timeout of its own); `None` when the deadline came
/// first. The thread is made from the calling thread, so it resolves in the same network namespace.
fn resolve(
    host: &str,
    port: u16,
    deadline: Instant,
) -> Option<Result<Vec<SocketAddr>, LookupErrorKind>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = (host.to_string(), port);
    let spawned = std::thread::Builder::new()
        .name("resolve".into())
        .spawn(move || {
            let _ = tx.send(target.to_socket_addrs().map(Iterator::collect::<Vec<_>>));
        });
    if let Err(e) = spawned {
        return Some(Err(LookupErrorKind::Client {
            chain: format!("starting the resolver thread: {e}"),
        }));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(left) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Some(Ok(addrs)),
        Ok(Ok(_)) => Some(Err(LookupErrorKind::Transport {
            chain: format!("resolving {host}: no address"),
        })),
        Ok(Err(e)) => Some(Err(LookupErrorKind::Transport {
            chain: format!("resolving {host}: {e}"),
        })),
        Err(_) => None,
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// An I/O failure of the exchange: a timeout, a TLS failure (rustls reports those as `InvalidData`), or a
/// network one.
fn io_error(e: io::Error, timed_out: impl Fn() -> LookupErrorKind, what: &str) -> LookupErrorKind {
    if is_timeout(&e) {
        timed_out()
    } else if e.kind() == io::ErrorKind::InvalidData {
        LookupErrorKind::Tls {
            chain: format!("{what}: {e}"),
        }
    } else {
        LookupErrorKind::Transport {
            chain: format!("{what}: {e}"),
        }
    }
}

/// What failed, with the status when the headers had already come.
fn answer_context(plain: &[u8], what: &str) -> String {
    match answer_status(plain) {
        Some(status) => format!("HTTP {status}, then reading the body failed: {what}"),
        None => what.to_string(),
    }
}

fn answer_status(plain: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(plain) {
        Ok(httparse::Status::Complete(_)) => res.code,
        _ => None,
    }
}

/// The socket, each read and write bounded by what is left before the deadline.
struct Deadlined<'a> {
    sock: &'a TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

/// `op` again after a signal interrupted it (EINTR): rustls passes every I/O error through.
fn uninterrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        uninterrupted(|| {
            self.sock.set_read_timeout(Some(self.left()?))?;
            self.sock.read(buf)
        })
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        uninterrupted(|| {
            self.sock.set_write_timeout(Some(self.left()?))?;
            self.sock.write(buf)
        })
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        uninterrupted(|| {
            self.sock.set_write_timeout(Some(self.left()?))?;
            self.sock.write_vectored(bufs)
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How the bytes read so far end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The connection is open: more may come.
    Open,
    /// The server closed it properly (TLS close_notify).
    Closed,
    /// The connection ended without close_notify: what came may be cut short.
    Cut,
}

/// Why the bytes of an answer are not one.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AnswerError {
    /// Not HTTP, or headers we cannot use (transient, as a broken proxy's answer).
    Malformed(String),
    /// The connection ended before the answer did.
    Incomplete {
        status: Option<u16>,
    },
    TooLarge,
}

impl AnswerError {
    fn into_kind(self) -> LookupErrorKind {
        match self {
            AnswerError::Malformed(detail) => LookupErrorKind::Transport {
                chain: format!("malformed HTTP answer: {detail}"),
            },
            AnswerError::Incomplete { status: None } => LookupErrorKind::Transport {
                chain: "connection closed before the answer".into(),
            },
            AnswerError::Incomplete {
                status: Some(status),
            } => LookupErrorKind::Transport {
                chain: format!(
                    "HTTP {status}, then reading the body failed: the connection ended before the body did"
                ),
            },
            AnswerError::TooLarge => LookupErrorKind::BadResponse {
                detail: format!("an answer longer than {MAX_ANSWER} bytes is not a Pod"),
            },
        }
    }
}

/// The answer in `buf` (everything the server sent so far, decrypted), `None` while incomplete. Pure.
/// Informational (1xx) answers before it are skipped; the body is framed by `Transfer-Encoding: chunked`, by
/// `Content-Length`, or else by the end of the connection (only a proper close then: a cut is an error).
pub(super) fn parse_answer(buf: &[u8], end: End) -> Result<Option<Answer>, AnswerError> {
    if buf.len() > MAX_ANSWER {
        return Err(AnswerError::TooLarge);
    }
    let mut rest = buf;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        let head_len = match res.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if end == End::Open => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(AnswerError::Incomplete { status: None }),
            Err(e) => return Err(AnswerError::Malformed(e.to_string())),
        };
        let status = res.code.unwrap_or(0);
        let body = &rest[head_len..];
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            continue;
        }
        let mut chunked = false;
        let mut length: Option<usize> = None;
        let mut retry_after = None;
        for h in res.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| AnswerError::Malformed(format!("header {} is not UTF-8", h.name)))?
                .trim();
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if h.name.eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .parse()
                    .map_err(|_| AnswerError::Malformed(format!("content-length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(AnswerError::Malformed(
                        "two different content-lengths".into(),
                    ));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse::<u64>().ok().map(Duration::from_secs);
            }
        }
        let incomplete = || AnswerError::Incomplete {
            status: Some(status),
        };
        let body = if status == 204 || status == 304 {
            Some(Vec::new())
        } else if chunked {
            match dechunk(body)? {
                Some(b) => Some(b),
                None if end == End::Open => None,
                None => return Err(incomplete()),
            }
        } else if let Some(n) = length {
            if n > MAX_ANSWER {
                return Err(AnswerError::TooLarge);
            }
            match body.get(..n) {
                Some(b) => Some(b.to_vec()),
                None if end == End::Open => None,
                None => return Err(incomplete()),
            }
        } else {
            match end {
                End::Open => None,
                End::Closed => Some(body.to_vec()),
                End::Cut => return Err(incomplete()),
            }
        };
        return Ok(body.map(|body| Answer {
            status,
            retry_after,
            body,
        }));
    }
}

/// The body of a chunked transfer coding, `None` while incomplete (trailers are read and dropped).
fn dechunk(mut buf: &[u8]) -> Result<Option<Vec<u8>>, AnswerError> {
    let mut body = Vec::new();
    loop {
        let (start, size) = match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete(c)) => c,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(AnswerError::Malformed("invalid chunk size".into())),
        };
        buf = &buf[start..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                match buf.iter().position(|&b| b == b'\n') {
                    None => return Ok(None),
                    Some(0) => return Ok(Some(body)),
                    Some(1) if buf[0] == b'\r' => return Ok(Some(body)),
                    Some(i) => buf = &buf[i + 1..],
                }
            }
        }
        let size = usize::try_from(size).map_err(|_| AnswerError::TooLarge)?;
        if size > MAX_ANSWER || body.len() + size > MAX_ANSWER {
            return Err(AnswerError::TooLarge);
        }
        let Some(data) = buf.get(..size) else {
            return Ok(None);
        };
        body.extend_from_slice(data);
        buf = &buf[size..];
        match buf {
            [b'\r', b'\n', rest @ ..] => buf = rest,
            [] | [b'\r'] => return Ok(None),
            _ => return Err(AnswerError::Malformed("chunk not followed by CRLF".into())),
        }
    }
}

fn auth(a: &kube::config::AuthInfo) -> Auth {
    if let Some(t) = a.token.as_ref().filter(|t| !t.expose_secret().is_empty()) {
        return Auth::Token(t.clone());
    }
    match a.token_file.as_deref().filter(|f| !f.is_empty()) {
        Some(f) => Auth::TokenFile(PathBuf::from(f)),
        None => Auth::None,
    }
}

/// The crypto of every connection: ring (as kube's client), TLS 1.3 and 1.2, AES-128-GCM first (with AES-NI
/// and SHA-NI the cheapest of rustls' suites), ALPN http/1.1.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    let prefer = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.sort_by_key(|s| s.suite() != prefer);
    p
}

fn tls_config(config: &kube::Config) -> Result<ClientConfig, LookupErrorKind> {
    let invalid = |detail: String| LookupErrorKind::KubeconfigInvalid { detail };
    let provider = Arc::new(provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS versions: {e}")))?;
    let builder = if config.accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        for der in config.root_cert.iter().flatten() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| invalid(format!("certificate-authority: {e}")))?;
        }
        if let Some(file) = &config.root_cert_file {
            let pem = std::fs::read(file)
                .map_err(|e| invalid(format!("certificate-authority {}: {e}", file.display())))?;
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| {
                    invalid(format!("certificate-authority {}: {e}", file.display()))
                })?;
                roots.add(der).map_err(|e| {
                    invalid(format!("certificate-authority {}: {e}", file.display()))
                })?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut tls = match identity(&config.auth_info)? {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid(format!("client certificate and key: {e}")))?,
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate chain and key (each inline base64 or a file), when the user has them.
fn identity(a: &kube::config::AuthInfo) -> Result<Option<Identity>, LookupErrorKind> {
    let invalid = |detail: String| LookupErrorKind::KubeconfigInvalid { detail };
    let cert = load(
        "client-certificate",
        a.client_certificate_data.as_deref(),
        a.client_certificate.as_deref(),
    )?;
    let key_data = a
        .client_key_data
        .as_ref()
        .map(|k| k.expose_secret().to_string());
    let key = load("client-key", key_data.as_deref(), a.client_key.as_deref())?;
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => return Err(invalid("client-certificate without client-key".into())),
        (None, Some(_)) => return Err(invalid("client-key without client-certificate".into())),
    };
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("client-certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("client-certificate holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| invalid(format!("client-key: {e}")))?;
    Ok(Some((certs, key)))
}

/// `name-data` (base64) or the file `name`, as kube reads them.
fn load(
    name: &str,
    data: Option<&str>,
    file: Option<&str>,
) -> Result<Option<Vec<u8>>, LookupErrorKind> {
    use base64::Engine;
    let invalid = |detail: String| LookupErrorKind::KubeconfigInvalid { detail };
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| invalid(format!("{name}-data is not base64: {e}")))?;
        return Ok(Some(bytes));
    }
    match file.filter(|f| !f.is_empty()) {
        Some(f) => std::fs::read(f)
            .map(Some)
            .map_err(|e| invalid(format!("{name} {f}: {e}"))),
        None => Ok(None),
    }
}

/// `insecure-skip-tls-verify`: any certificate is accepted (the handshake's signatures are still checked, so the
/// peer holds the key of the certificate it showed).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8], end: End) -> Answer {
        parse_answer(buf, end).expect("parses").expect("complete")
    }

    #[test]
    fn content_length_frames_the_body() {
        let full =
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello";
        for cut in 0..full.len() {
            assert_eq!(
                parse_answer(&full[..cut], End::Open),
                Ok(None),
                "cut at {cut}"
            );
        }
        let a = complete(full, End::Open);
        assert_eq!(
            (a.status, a.body.as_slice(), a.retry_after),
            (200, &b"hello"[..], None)
        );
        // Bytes after the body are not part of it.
        assert_eq!(
            complete(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiXX",
                End::Open
            )
            .body,
            b"hi"
        );
        // The connection ending before the body did: the status is kept for the message.
        assert_eq!(
            parse_answer(&full[..full.len() - 1], End::Closed),
            Err(AnswerError::Incomplete { status: Some(200) })
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Le", End::Cut),
            Err(AnswerError::Incomplete { status: None })
        );
    }

    #[test]
    fn chunked_bodies_are_decoded_whatever_the_cut() {
        let full = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 2\r\n\r\n\
                     4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_answer(&full[..cut], End::Open),
                Ok(None),
                "cut at {cut}"
            );
        }
        let a = complete(full, End::Open);
        assert_eq!(a.status, 503);
        assert_eq!(a.body, b"Wikipedia");
        assert_eq!(a.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(
            parse_answer(&full[..full.len() - 3], End::Cut),
            Err(AnswerError::Incomplete { status: Some(503) })
        );
        assert!(matches!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                End::Open
            ),
            Err(AnswerError::Malformed(_))
        ));
        assert!(matches!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX",
                End::Open
            ),
            Err(AnswerError::Malformed(_))
        ));
    }

    #[test]
    fn a_body_without_length_ends_only_with_a_proper_close() {
        let buf = b"HTTP/1.1 200 OK\r\n\r\n{\"kind\":\"Pod\"}";
        assert_eq!(parse_answer(buf, End::Open), Ok(None));
        assert_eq!(complete(buf, End::Closed).body, b"{\"kind\":\"Pod\"}");
        assert_eq!(
            parse_answer(buf, End::Cut),
            Err(AnswerError::Incomplete { status: Some(200) })
        );
    }

    #[test]
    fn informational_answers_are_skipped_and_empty_statuses_have_no_body() {
        let a = complete(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
            End::Open,
        );
        assert_eq!((a.status, a.body.as_slice()), (404, &b"{}"[..]));
        assert_eq!(
            complete(b"HTTP/1.1 204 No Content\r\n\r\n", End::Open).body,
            b""
        );
    }

    #[test]
    fn garbage_and_oversized_answers_are_refused() {
        for garbage in [&b"<html>502</html>\r\n\r\n"[..], b"HTTP/1.1 2x0 OK\r\n\r\n"] {
            assert!(
                matches!(
                    parse_answer(garbage, End::Open),
                    Err(AnswerError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
        assert!(matches!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                End::Open
            ),
            Err(AnswerError::Malformed(_))
        ));
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_ANSWER + 1
        );
        assert_eq!(
            parse_answer(big.as_bytes(), End::Open),
            Err(AnswerError::TooLarge)
        );
        let huge = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_ANSWER + 1
        );
        assert_eq!(
            parse_answer(huge.as_bytes(), End::Open),
            Err(AnswerError::TooLarge)
        );
        assert!(!AnswerError::TooLarge.into_kind().is_transient());
        assert!(AnswerError::Malformed("x".into())
            .into_kind()
            .is_transient());
        assert!(AnswerError::Incomplete { status: None }
            .into_kind()
            .is_transient());
    }

    #[test]
    fn the_body_error_names_the_status_already_received() {
        assert_eq!(
            answer_context(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
                "reading the answer"
            ),
            "HTTP 200, then reading the body failed: reading the answer"
        );
        assert_eq!(
            answer_context(b"HTTP/1.1 20", "TLS handshake"),
            "TLS handshake"
        );
    }

    fn config(server: &str) -> kube::Config {
        let mut c = kube::Config::new(server.parse().expect("url"));
        c.root_cert = Some(Vec::new());
        c
    }

    #[test]
    fn what_needs_kubes_client() {
        let plain = config("https://10.96.0.1:443");
        assert_eq!(needs_kube(&plain), None);
        let mut exec = plain.clone();
        exec.auth_info.exec =
            Some(serde_json::from_value(serde_json::json!({"command": "x"})).expect("exec"));
        assert!(needs_kube(&exec).is_some_and(|r| r.contains("exec")));
        let mut basic = plain.clone();
        basic.auth_info.username = Some("u".into());
        assert_eq!(needs_kube(&basic), Some("basic auth"));
        let mut system_roots = plain.clone();
        system_roots.root_cert = None;
        assert!(needs_kube(&system_roots).is_some());
        system_roots.accept_invalid_certs = true;
        assert_eq!(needs_kube(&system_roots), None);
    }

    #[test]
    fn the_url_gives_host_port_path_and_name() {
        let e = Endpoint::from_config(&config("https://[fd00::1]:6443/k8s/clusters/c-1/"))
            .expect("valid")
            .expect("lean");
        assert_eq!((e.host.as_str(), e.port), ("fd00::1", 6443));
        assert_eq!(e.authority, "[fd00::1]:6443");
        assert_eq!(e.base_path, "/k8s/clusters/c-1");
        assert!(matches!(e.server_name, ServerName::IpAddress(_)));
        let e = Endpoint::from_config(&config("https://api.example"))
            .expect("valid")
            .expect("lean");
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("api.example", 443, "")
        );
        assert!(matches!(e.server_name, ServerName::DnsName(_)));
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_token_no_control_characters() {
        let mut c = config("https://10.96.0.1:443");
        c.auth_info.client_certificate_data = Some("bm90IGEgY2VydA==".into());
        let e = Endpoint::from_config(&c).err().expect("no key");
        assert!(
            format!("{e:?}").contains("client-certificate without client-key"),
            "{e:?}"
        );
        c.auth_info.client_key_data = Some("bm90IGEga2V5".to_string().into());
        let e = Endpoint::from_config(&c).err().expect("not PEM");
        assert!(
            matches!(e, LookupErrorKind::KubeconfigInvalid { .. }),
            "{e:?}"
        );
        let mut c = config("https://10.96.0.1:443");
        c.auth_info.token = Some("abc\r\nX-Evil: 1".to_string().into());
        let e = Endpoint::from_config(&c).expect("valid").expect("lean");
        let err = e.request("/api").expect_err("refused");
        assert!(format!("{err:?}").contains("control characters"), "{err:?}");
        let mut c = config("https://10.96.0.1:443/");
        c.auth_info.token = Some("t0k3n".to_string().into());
        let e = Endpoint::from_config(&c).expect("valid").expect("lean");
        let req = e.request("/api/v1/namespaces/ns/pods/p").expect("request");
        assert_eq!(
            req.expose_secret(),
            "GET /api/v1/namespaces/ns/pods/p HTTP/1.1\r\nHost: 10.96.0.1:443\r\nUser-Agent: istio-cni (meshcni)\r\n\
             Accept: application/json\r\nAuthorization: Bearer t0k3n\r\nConnection: close\r\n\r\n"
        );
    }

    /// A signal delivered while the socket is read (a handler without SA_RESTART, as test harnesses and runtimes
    /// install for SIGCHLD) does not end the exchange: the read is made again, within the same deadline.
    #[test]
    fn a_signal_during_a_read_is_not_a_failure() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        extern "C" fn nothing(_: libc::c_int) {}
        let act = SigAction::new(
            SigHandler::Handler(nothing),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing; SIGUSR2 is used by nothing else in this test binary.
        unsafe { sigaction(Signal::SIGUSR2, &act) }.expect("sigaction");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).expect("send");
            let mut io = Deadlined {
                sock: &client,
                deadline: Instant::now() + Duration::from_secs(5),
            };
            let mut buf = [0u8; 4];
            io.read(&mut buf).map(|n| buf[..n].to_vec())
        });
        let thread = rx.recv().expect("thread");
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: the thread is alive (it is blocked in the read until the server writes below).
            unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
        }
        server.write_all(b"ok").expect("write");
        assert_eq!(reader.join().expect("join").expect("read"), b"ok");
    }
}
