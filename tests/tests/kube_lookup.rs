//! `cni_plugin::lookup::pod` against the HTTPS API server stub: success, permanent failures (at once,
//! one request), transient failures (retried), TLS failures (whole chain shown), kubeconfig problems (no request),
//! the proxy environment (ignored), the stub inside a private netns, and the stub's binary.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cni_plugin::lookup::{self, LookupErrorKind, LookupPolicy, PodRef};
use cni_plugin::pod::PodInfo;
use meshcni_tests::apiserver::{sample_pod, ApiServer, Fault};
use meshcni_tests::tempdir::TempDir;

/// A quick policy for tests: short backoff, bounded deadline.
fn policy(deadline: Duration) -> LookupPolicy {
    LookupPolicy {
        deadline,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
    }
}

/// A stub with pod default/web-1 and a kubeconfig for it.
fn setup(tag: &str) -> (ApiServer, TempDir, PathBuf) {
    let srv = ApiServer::start().expect("start stub");
    srv.add_pod(sample_pod("default", "web-1"))
        .expect("add pod");
    let dir = TempDir::new(&format!("kube-lookup-{tag}"));
    let kc = dir.join("istio-cni-kubeconfig");
    srv.write_kubeconfig(&kc).expect("write kubeconfig");
    (srv, dir, kc)
}

/// A TCP port on 127.0.0.1 that is bound but not listening, held while the value lives: connecting is refused,
/// and nothing else can take the port meanwhile.
struct DeadPort {
    _fd: OwnedFd,
    port: u16,
}

impl DeadPort {
    fn new() -> Self {
        use nix::sys::socket::{
            bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
        let addr: SockaddrIn = getsockname(fd.as_raw_fd()).expect("getsockname");
        DeadPort {
            _fd: fd,
            port: addr.port(),
        }
    }
}

/// The `app` label, which `sample_pod` sets to the pod's name.
fn app_label(pod: &PodInfo) -> Option<&str> {
    pod.labels.get("app").map(String::as_str)
}

#[test]
fn found_pod_is_returned_with_one_request() {
    let (srv, _dir, kc) = setup("found");
    let pod = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(10)),
    )
    .expect("lookup");
    let object: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(sample_pod("default", "web-1")).expect("sample pod");
    assert_eq!(pod, PodInfo::from(&object));
    assert_eq!(
        pod.containers.iter().collect::<Vec<_>>(),
        ["app", "istio-proxy"]
    );
    assert_eq!(pod.proxy_uid, Some(1337));
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
    assert_eq!(srv.total_requests(), 1);
}

#[test]
fn kubeconfig_written_as_json_works_too() {
    let (srv, dir, _) = setup("json");
    // The same kubeconfig as JSON (a valid kubeconfig format; kube parses it as YAML's JSON subset).
    let spec = srv.kubeconfig();
    let ca_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(spec.ca_pem.as_deref().expect("ca"))
    };
    let json = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": spec.server, "certificate-authority-data": ca_b64}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": spec.token}}],
    });
    let kc = dir.join("kubeconfig.json");
    std::fs::write(&kc, serde_json::to_vec_pretty(&json).expect("json")).expect("write");
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(10)),
    )
    .expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

#[test]
fn not_found_fails_at_once() {
    let (srv, _dir, kc) = setup("404");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "gone"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("404");
    assert!(matches!(e.kind, LookupErrorKind::NotFound), "{e:?}");
    assert!(!e.is_transient());
    assert_eq!(e.http_status(), Some(404));
    assert!(
        e.to_string()
            .contains("pod default/gone not found (deleted?)"),
        "{e}"
    );
    assert_eq!(srv.pod_requests("default", "gone"), 1);
    assert_eq!(srv.total_requests(), 1);
}

#[test]
fn removed_pod_is_not_found() {
    let (srv, _dir, kc) = setup("removed");
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(10)),
    )
    .expect("lookup");
    assert!(srv.remove_pod("default", "web-1"));
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(10)),
    )
    .expect_err("404");
    assert_eq!(e.http_status(), Some(404), "{e}");
    assert_eq!(srv.pod_requests("default", "web-1"), 2);
}

#[test]
fn wrong_token_gets_401_at_once_naming_the_token() {
    let (srv, dir, _) = setup("401");
    let mut spec = srv.kubeconfig();
    spec.token = "expired-token".into();
    let kc = dir.join("kubeconfig-bad-token");
    spec.write(&kc).expect("write");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("401");
    assert!(!e.is_transient());
    assert_eq!(e.http_status(), Some(401));
    let s = e.to_string();
    assert!(
        s.contains("HTTP 401") && s.contains("service-account token"),
        "{s}"
    );
    assert!(s.contains(&kc.display().to_string()), "{s}");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

#[test]
fn forbidden_gets_403_at_once_naming_rbac() {
    let (srv, _dir, kc) = setup("403");
    srv.push_fault(Fault::Status(403));
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("403");
    assert!(!e.is_transient());
    assert_eq!(e.http_status(), Some(403));
    let s = e.to_string();
    assert!(s.contains("HTTP 403") && s.contains("RBAC"), "{s}");
    assert!(s.contains(&kc.display().to_string()), "{s}");
    assert!(
        s.contains("injected fault"),
        "the server's Status message is shown: {s}"
    );
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

#[test]
fn other_client_errors_are_not_retried() {
    let (srv, _dir, kc) = setup("400");
    srv.push_fault(Fault::Status(400));
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("400");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("HTTP 400"), "{e}");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

#[test]
fn two_500s_then_ok_succeeds_on_the_third_request() {
    let (srv, _dir, kc) = setup("500");
    srv.push_faults(2, Fault::Status(500));
    let pod = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect("lookup");
    assert_eq!(app_label(&pod), Some("web-1"));
    assert_eq!(srv.pod_requests("default", "web-1"), 3);
    assert_eq!(srv.pending_faults(), 0);
}

#[test]
fn too_many_requests_then_ok() {
    let (srv, _dir, kc) = setup("429");
    srv.push_fault(Fault::Status(429));
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 2);
}

#[test]
fn non_status_error_body_then_ok() {
    let (srv, _dir, kc) = setup("502");
    srv.push_fault(Fault::Raw {
        status: 502,
        headers: vec![("content-type".into(), "text/html".into())],
        body: "<html>bad gateway</html>".into(),
    });
    srv.push_fault(Fault::Raw {
        status: 503,
        headers: vec![("retry-after".into(), "0".into())],
        body: String::new(),
    });
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 3);
}

#[test]
fn persistent_503_gives_up_at_the_deadline_with_the_last_status() {
    let (srv, _dir, kc) = setup("503");
    srv.push_faults(10_000, Fault::Status(503));
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_millis(500)),
    )
    .expect_err("deadline");
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.http_status(), Some(503));
    let LookupErrorKind::DeadlineExceeded { attempts, .. } = &e.kind else {
        panic!("expected DeadlineExceeded, got {e:?}");
    };
    assert!(*attempts >= 2, "{e}");
    // The last attempt may have been cut short by the deadline before it reached the server.
    let seen = srv.pod_requests("default", "web-1");
    assert!(
        seen == *attempts as usize || seen + 1 == *attempts as usize,
        "{seen} requests: {e}"
    );
    assert!(e.to_string().contains("HTTP 503"), "{e}");
}

#[test]
fn dropped_connection_is_retried() {
    let (srv, _dir, kc) = setup("drop");
    srv.push_fault(Fault::Drop);
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 2);
}

#[test]
fn a_request_without_answer_times_out_and_is_retried() {
    let (srv, _dir, kc) = setup("slow");
    srv.push_fault(Fault::Delay(Duration::from_secs(20)));
    let p = LookupPolicy {
        request_timeout: Duration::from_millis(300),
        ..policy(Duration::from_secs(30))
    };
    lookup::pod(&kc, &PodRef::new("default", "web-1"), None, &p).expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 2);
}

#[test]
fn a_request_timeout_never_exceeds_the_deadline() {
    let (srv, _dir, kc) = setup("slow-deadline");
    srv.push_faults(100, Fault::Delay(Duration::from_secs(20)));
    // The per-request timeout (20 s) is longer than the deadline: the deadline wins, and the error says timeout.
    let p = LookupPolicy {
        request_timeout: Duration::from_secs(20),
        ..policy(Duration::from_millis(400))
    };
    let e = lookup::pod(&kc, &PodRef::new("default", "web-1"), None, &p).expect_err("deadline");
    assert!(e.is_transient(), "{e}");
    assert!(
        matches!(e.kind, LookupErrorKind::DeadlineExceeded { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("no answer"), "{e}");
}

#[test]
fn connection_refused_is_retried_until_the_deadline() {
    let dead = DeadPort::new();
    let srv = ApiServer::start().expect("stub");
    let dir = TempDir::new("kube-lookup-refused");
    let mut spec = srv.kubeconfig();
    spec.server = format!("https://127.0.0.1:{}", dead.port);
    let kc = dir.join("kubeconfig");
    spec.write(&kc).expect("write");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(1)),
    )
    .expect_err("refused");
    assert!(e.is_transient(), "{e}");
    let LookupErrorKind::DeadlineExceeded { attempts, last, .. } = &e.kind else {
        panic!("expected DeadlineExceeded, got {e:?}");
    };
    assert!(*attempts >= 2, "retried: {e}");
    assert!(
        matches!(**last, LookupErrorKind::Transport { .. }),
        "{last:?}"
    );
    let s = e.to_string();
    assert!(
        s.to_lowercase().contains("connection refused"),
        "the io cause is shown: {s}"
    );
    assert!(
        s.contains(&dead.port.to_string()),
        "the server is named: {s}"
    );
    assert_eq!(srv.total_requests(), 0);
}

#[test]
fn missing_kubeconfig_fails_at_once_naming_it() {
    let dir = TempDir::new("kube-lookup-missing");
    let kc = dir.join("no-such-kubeconfig");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("missing");
    assert!(
        matches!(e.kind, LookupErrorKind::KubeconfigUnreadable { .. }),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(e.to_string().contains(&kc.display().to_string()), "{e}");
}

#[test]
fn invalid_kubeconfigs_fail_at_once_without_a_request() {
    let (srv, dir, _) = setup("invalid");
    let good = srv.kubeconfig().to_yaml();
    let cases = [
        ("garbage", "this: [is not: a kubeconfig".to_string()),
        ("empty", String::new()),
        (
            "no-context",
            good.replace(
                "current-context: istio-cni-context",
                "current-context: nope",
            ),
        ),
        ("bad-ca", {
            let mut s = srv.kubeconfig();
            s.ca_pem = Some(
                "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
                    .into(),
            );
            s.to_yaml()
        }),
        ("plain-http", good.replace("https://", "http://")),
        (
            "no-server",
            good.replace(&format!("    server: {}\n", srv.url()), ""),
        ),
    ];
    for (name, text) in cases {
        let kc = dir.join(name);
        std::fs::write(&kc, &text).expect("write");
        let e = lookup::pod(
            &kc,
            &PodRef::new("default", "web-1"),
            None,
            &policy(Duration::from_secs(30)),
        )
        .expect_err(name);
        assert!(!e.is_transient(), "{name}: {e}");
        assert!(
            matches!(e.kind, LookupErrorKind::KubeconfigInvalid { .. }),
            "{name}: {e:?}"
        );
        assert!(
            e.to_string().contains(&kc.display().to_string()),
            "{name}: {e}"
        );
    }
    assert_eq!(srv.total_requests(), 0);
}

#[test]
fn unreadable_kubeconfig_directory_fails_naming_it() {
    let dir = TempDir::new("kube-lookup-dir-as-kubeconfig");
    let e = lookup::pod(
        &dir.0,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("dir");
    assert!(!e.is_transient());
    assert!(e.to_string().contains(&dir.0.display().to_string()), "{e}");
}

#[test]
fn invalid_pod_reference_makes_no_request() {
    let (srv, _dir, kc) = setup("badref");
    for (ns, name) in [
        ("default", "a/b"),
        ("default", "../secrets"),
        ("Default", "web-1"),
        ("", "web-1"),
    ] {
        let e = lookup::pod(
            &kc,
            &PodRef::new(ns, name),
            None,
            &policy(Duration::from_secs(30)),
        )
        .expect_err(name);
        assert!(
            matches!(e.kind, LookupErrorKind::InvalidPodRef { .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());
    }
    assert_eq!(srv.total_requests(), 0);
}

#[test]
fn wrong_ca_is_a_permanent_tls_error_showing_the_cause() {
    let (srv, dir, _) = setup("wrong-ca");
    let other = ApiServer::start().expect("second stub");
    let mut spec = srv.kubeconfig();
    spec.ca_pem = Some(other.ca_pem().to_string());
    let kc = dir.join("kubeconfig-wrong-ca");
    spec.write(&kc).expect("write");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("tls");
    assert!(matches!(e.kind, LookupErrorKind::Tls { .. }), "{e:?}");
    assert!(!e.is_transient());
    let s = e.to_string();
    assert!(
        s.contains("invalid peer certificate: UnknownIssuer"),
        "the rustls cause is in the message: {s}"
    );
    assert!(
        s.contains(&kc.display().to_string()) && s.contains(&srv.url()),
        "{s}"
    );
    assert_eq!(srv.total_requests(), 0);
    assert_eq!(other.total_requests(), 0);
    // The server saw the client abort the handshake (counted on the server's thread: wait, bounded).
    for _ in 0..500 {
        if srv.tls_failures() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.tls_failures(), 1, "one attempt, one failed handshake");
    assert_eq!(other.tls_failures(), 0);
}

#[test]
fn expired_server_certificate_is_a_permanent_tls_error() {
    let srv = ApiServer::builder()
        .expired_cert(true)
        .start()
        .expect("stub");
    srv.add_pod(sample_pod("default", "web-1")).expect("add");
    let dir = TempDir::new("kube-lookup-expired");
    let kc = dir.join("kubeconfig");
    srv.write_kubeconfig(&kc).expect("write");
    let e = lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(30)),
    )
    .expect_err("expired");
    assert!(matches!(e.kind, LookupErrorKind::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("certificate expired"), "{e}");
    assert_eq!(srv.total_requests(), 0);
}

#[test]
fn insecure_skip_tls_verify_is_honoured() {
    let (srv, dir, _) = setup("skip-tls");
    let mut spec = srv.kubeconfig();
    spec.ca_pem = None;
    spec.insecure_skip_tls_verify = true;
    let kc = dir.join("kubeconfig-skip-tls");
    spec.write(&kc).expect("write");
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(10)),
    )
    .expect("lookup");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

#[test]
fn stub_answers_namespace_version_and_unknown_paths() {
    // Exercised through kube's client to keep the stub honest about the wire format.
    let (srv, _dir, kc) = setup("paths");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let config = cni_plugin::lookup::kubeconfig::load_config(&kc, Duration::from_secs(5))
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");
        let v = client.apiserver_version().await.expect("version");
        assert_eq!(v.major, "1");
        let nss: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
        let ns = nss.get("default").await.expect("namespace of a pod");
        assert_eq!(ns.metadata.name.as_deref(), Some("default"));
        let e = nss.get("nope").await.expect_err("unknown namespace");
        assert!(
            matches!(e, kube::Error::Api(ref s) if s.code == 404),
            "{e:?}"
        );
        let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, "default");
        let e = cms.get("x").await.expect_err("unknown path");
        assert!(
            matches!(e, kube::Error::Api(ref s) if s.code == 404),
            "{e:?}"
        );
    });
    assert_eq!(srv.requests("/version"), 1);
    assert_eq!(srv.requests("/api/v1/namespaces/default"), 1);
    assert_eq!(srv.requests("/api/v1/namespaces/nope"), 1);
    assert_eq!(srv.requests("/api/v1/namespaces/default/configmaps/x"), 1);
}

// ---- The proxy environment: run in a subprocess, since the environment is process-global. ----

const CHILD_KUBECONFIG: &str = "MESHCNI_TEST_CHILD_KUBECONFIG";

/// Run only by `proxy_environment_is_ignored`, in a child process whose environment carries the proxy variables.
#[test]
#[ignore = "run by proxy_environment_is_ignored in a subprocess with HTTPS_PROXY set"]
fn proxy_env_child() {
    let kc = std::env::var(CHILD_KUBECONFIG)
        .expect("MESHCNI_TEST_CHILD_KUBECONFIG must be set by the parent test");
    assert!(
        std::env::var("HTTPS_PROXY").is_ok(),
        "the parent sets HTTPS_PROXY"
    );
    let pod = lookup::pod(
        Path::new(&kc),
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(5)),
    )
    .unwrap_or_else(|e| panic!("lookup with HTTPS_PROXY set: {e}"));
    assert_eq!(app_label(&pod), Some("web-1"));
}

fn run_child(kc: &Path, proxy: &str) -> std::process::Output {
    let exe = std::env::current_exe().expect("current exe");
    Command::new(exe)
        .args([
            "proxy_env_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_KUBECONFIG, kc)
        .env("HTTPS_PROXY", proxy)
        .env("https_proxy", proxy)
        .env("HTTP_PROXY", proxy)
        .env("ALL_PROXY", proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("run the child test")
}

#[test]
fn proxy_environment_is_ignored() {
    let (srv, _dir, kc) = setup("proxy");
    let dead = DeadPort::new();
    for proxy in [
        format!("http://127.0.0.1:{}", dead.port),
        "socks5://127.0.0.1:1".to_string(),
        "http://not a url:3128".to_string(),
    ] {
        let before = srv.pod_requests("default", "web-1");
        let out = run_child(&kc, &proxy);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child with HTTPS_PROXY={proxy:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert_eq!(
            srv.pod_requests("default", "web-1"),
            before + 1,
            "the child reached the server directly"
        );
    }
}

// ---- The stub inside a private network namespace. ----

/// A named netns (`ip netns add`) with lo up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CI runs as root): it creates a network namespace"
        );
        let name = format!("meshcni-kube-{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a fresh thread that entered `netns` first.
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn stub_in_a_netns_is_reachable_there_only() {
    let ns = Netns::new("stub");
    let srv = ApiServer::builder()
        .netns(ns.path())
        .start()
        .expect("stub in netns");
    srv.add_pod(sample_pod("default", "web-1")).expect("add");
    let dir = TempDir::new("kube-lookup-netns");
    let kc = dir.join("kubeconfig");
    srv.write_kubeconfig(&kc).expect("write");

    let kc2 = kc.clone();
    let got = in_netns(&ns.path(), move || {
        lookup::pod(
            &kc2,
            &PodRef::new("default", "web-1"),
            None,
            &policy(Duration::from_secs(10)),
        )
        .map(|p| app_label(&p).map(str::to_string))
    });
    assert_eq!(
        got.expect("lookup inside the netns"),
        Some("web-1".to_string())
    );
    assert_eq!(srv.pod_requests("default", "web-1"), 1);

    // From the host netns the same address is the host's loopback: whatever is there (most likely nothing), it
    // is not our server, so the lookup fails and the server sees no request.
    lookup::pod(
        &kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_millis(300)),
    )
    .expect_err("from the host");
    assert_eq!(srv.total_requests(), 1);
}

// ---- The stub's binary. ----

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn binary_serves_a_pod_dir_until_sigterm() {
    let dir = TempDir::new("kube-lookup-bin");
    let pods = dir.join("pods");
    std::fs::create_dir(&pods).expect("mkdir");
    let pod_file = |name: &str| pods.join(format!("{name}.json"));
    std::fs::write(pod_file("web-1"), sample_pod("demo", "web-1").to_string()).expect("pod file");
    std::fs::write(pods.join("README.txt"), "not a pod").expect("ignored file");
    let kc = dir.join("kubeconfig");
    let ca = dir.join("ca.crt");
    let port_file = dir.join("port");

    let mut child = Command::new(env!("CARGO_BIN_EXE_meshcni-test-apiserver"))
        .arg("--pods-dir")
        .arg(&pods)
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--ca-file")
        .arg(&ca)
        .arg("--port-file")
        .arg(&port_file)
        .args(["--token", "demo-token"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the stub binary");
    let stdout = child.stdout.take().expect("stdout");
    let proc_ = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the port");
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("port line {line:?}: {e}"));
    assert_eq!(
        std::fs::read_to_string(&port_file)
            .expect("port file")
            .trim(),
        line.trim()
    );
    let kc_text = std::fs::read_to_string(&kc).expect("kubeconfig");
    assert!(
        kc_text.contains(&format!("server: https://127.0.0.1:{port}")),
        "{kc_text}"
    );
    assert!(kc_text.contains("token: demo-token"), "{kc_text}");
    assert!(std::fs::read_to_string(&ca)
        .expect("ca")
        .contains("BEGIN CERTIFICATE"));

    let p = policy(Duration::from_secs(10));
    let pod = lookup::pod(&kc, &PodRef::new("demo", "web-1"), None, &p).expect("pod from the dir");
    assert_eq!(app_label(&pod), Some("web-1"));
    // The dir is re-read on each request: a new file is served, a removed one is gone.
    std::fs::write(pod_file("web-2"), sample_pod("demo", "web-2").to_string()).expect("pod file");
    lookup::pod(&kc, &PodRef::new("demo", "web-2"), None, &p).expect("new pod from the dir");
    std::fs::remove_file(pod_file("web-1")).expect("rm");
    let e = lookup::pod(&kc, &PodRef::new("demo", "web-1"), None, &p).expect_err("removed");
    assert_eq!(e.http_status(), Some(404), "{e}");

    let mut proc_ = proc_;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(proc_.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = proc_.0.wait().expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn binary_help_and_bad_args() {
    let bin = env!("CARGO_BIN_EXE_meshcni-test-apiserver");
    let out = Command::new(bin).arg("--help").output().expect("help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--pods-dir",
        "--kubeconfig",
        "--port",
        "--token",
        "--ca-file",
        "--port-file",
        "--netns",
    ] {
        assert!(help.contains(flag), "help documents {flag}:\n{help}");
    }
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg("/tmp/x")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pods-dir is required"));
    let out = Command::new(bin)
        .args(["--port", "http"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"http\""));

    let dir = TempDir::new("kube-lookup-bin-bad");
    std::fs::write(dir.join("broken.json"), "{not json").expect("write");
    let out = Command::new(bin)
        .arg("--pods-dir")
        .arg(&dir.0)
        .arg("--kubeconfig")
        .arg(dir.join("kc"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.json"), "{err}");
}

/// `srv`'s kubeconfig with `edit` applied to its YAML, written into `dir` as `name`.
fn edited_kubeconfig(
    srv: &ApiServer,
    dir: &TempDir,
    name: &str,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    let yaml = edit(srv.kubeconfig().to_yaml());
    let kc = dir.join(name);
    std::fs::write(&kc, yaml).expect("write kubeconfig");
    kc
}

fn get_web1(kc: &Path) -> Result<PodInfo, Box<lookup::LookupError>> {
    lookup::pod(
        kc,
        &PodRef::new("default", "web-1"),
        None,
        &policy(Duration::from_secs(5)),
    )
}

/// A `tokenFile` is read (and its trailing newline dropped) by the plugin's own client.
#[test]
fn token_file_is_read() {
    let (srv, dir, _) = setup("token-file");
    let token = dir.join("token");
    std::fs::write(&token, format!("{}\n", srv.token())).expect("token");
    let kc = edited_kubeconfig(&srv, &dir, "kc-token-file", |y| {
        y.replace(
            &format!("token: {}", srv.token()),
            &format!("tokenFile: {}", token.display()),
        )
    });
    get_web1(&kc).expect("lookup with tokenFile");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
    std::fs::write(&token, "not-the-token").expect("token");
    let e = get_web1(&kc).expect_err("wrong token");
    assert_eq!(e.http_status(), Some(401), "{e}");
}

/// A server named by a DNS name is resolved; `tls-server-name` is the name its certificate is checked against.
#[test]
fn tls_server_name_is_the_name_checked() {
    let (srv, dir, _) = setup("tls-server-name");
    let by_name = |tls_name: &'static str| {
        let url = srv.url();
        move |y: String| {
            y.replace(&url, &url.replace("127.0.0.1", "localhost"))
                .replace(
                    "    server:",
                    &format!("    tls-server-name: {tls_name}\n    server:"),
                )
        }
    };
    let kc = edited_kubeconfig(&srv, &dir, "kc-good-name", by_name("127.0.0.1"));
    get_web1(&kc).expect("the certificate is valid for 127.0.0.1");
    let kc = edited_kubeconfig(&srv, &dir, "kc-bad-name", by_name("api.example"));
    let e = get_web1(&kc).expect_err("not valid for api.example");
    assert!(matches!(e.kind, LookupErrorKind::Tls { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("certificate not valid for name \"api.example\""),
        "{e}"
    );
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}

/// A kubeconfig the plugin's own client does not serve (an exec credential plugin) goes through kube's client,
/// which runs the plugin for the token.
#[test]
fn an_exec_credential_kubeconfig_is_served_by_kubes_client() {
    let (srv, dir, _) = setup("exec-credential");
    let script = dir.join("credential.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s' '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{}\"}}}}'\n",
            srv.token()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let kc = edited_kubeconfig(&srv, &dir, "kc-exec", |y| {
        y.replace(
            &format!("    token: {}", srv.token()),
            &format!(
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never",
                script.display()
            ),
        )
    });
    get_web1(&kc).expect("lookup through the exec plugin's token");
    assert_eq!(srv.pod_requests("default", "web-1"), 1);
}
