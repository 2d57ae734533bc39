use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

use super::layer::{MAX_BYTES, MAX_LINES};
use super::*;

/// Istio's own parser test cases (`cni/pkg/log/uds_test.go` TestParseCniLog), as lines zap writes them.
#[test]
fn parses_lines_as_istios_agent_does() {
    let l = LogLine::parse(
        r#"{"level":"info","time":"2020-01-01T00:00:00.356374Z","msg":"my message"}"#,
    )
    .unwrap();
    assert_eq!(l.level, Level::Info);
    assert_eq!(l.time, "2020-01-01T00:00:00.356374Z");
    assert_eq!(l.msg, "my message");
    assert!(l.fields.is_empty());
    // zap ends each line with a newline; the message is trimmed; other keys are fields.
    let l = LogLine::parse(
        "{\"level\":\"warn\",\"time\":\"2020-01-01T00:00:00.356374Z\",\"msg\":\" my message \",\
         \"key\":\"string value\",\"bar\":2}\n",
    )
    .unwrap();
    assert_eq!(l.level, Level::Warn);
    assert_eq!(l.msg, "my message");
    assert_eq!(l.fields["key"], "string value");
    assert_eq!(l.fields["bar"], 2);
}

#[test]
fn a_line_without_level_time_or_msg_is_refused() {
    for (line, key) in [
        (r#"{"time":"t","msg":"m"}"#, "level"),
        (r#"{"level":"info","msg":"m"}"#, "time"),
        (r#"{"level":"info","time":"t"}"#, "msg"),
        (r#"{"level":"info","time":"t","msg":3}"#, "msg"),
    ] {
        match LogLine::parse(line) {
            Err(LineError::Missing { key: k, .. }) => assert_eq!(k, key, "{line}"),
            other => panic!("{line}: {other:?}"),
        }
    }
    assert!(matches!(
        LogLine::parse("[1]"),
        Err(LineError::NotObject(_))
    ));
    assert!(matches!(LogLine::parse("{"), Err(LineError::NotJson(_))));
    let e = LogLine::parse(r#"{"level":"loud","time":"t","msg":"m"}"#).unwrap_err();
    assert!(e.to_string().contains("\"loud\""), "{e}");
    // zap's levels above error are errors.
    let l = LogLine::parse(r#"{"level":"fatal","time":"t","msg":"m"}"#).unwrap();
    assert_eq!(l.level, Level::Error);
}

#[test]
fn formats_lines_as_istios_encoder_does() {
    let mut l = LogLine::new(Level::Info, "excluded \"x\"");
    l.time = "2026-01-02T03:04:05.000006Z".into();
    l.fields.insert("pod".into(), "web-0".into());
    l.fields.insert("n".into(), 3.into());
    // A field that would hide a key of the protocol is renamed.
    l.fields.insert("msg".into(), "shadow".into());
    let text = l.to_json();
    assert!(
        text.starts_with(
            r#"{"level":"info","time":"2026-01-02T03:04:05.000006Z","msg":"excluded \"x\"","#
        ),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pod"], "web-0");
    assert_eq!(v["n"], 3);
    assert_eq!(v["field.msg"], "shadow");
    let back = LogLine::parse(&text).unwrap();
    assert_eq!(back.msg, l.msg);
    assert_eq!(back.fields["field.msg"], "shadow");
}

#[test]
fn the_time_is_rfc3339_utc_with_microseconds() {
    let t = now();
    // 2026-01-02T03:04:05.123456Z: what Go's time.Time unmarshals, as Istio's formatDate writes it.
    assert_eq!(t.len(), 27, "{t}");
    assert!(
        t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.',
        "{t}"
    );
    assert!(t.parse::<jiff::Timestamp>().is_ok(), "{t}");
}

#[test]
fn the_body_is_a_json_array_of_strings() {
    let lines = vec![
        LogLine::new(Level::Info, "one").to_json(),
        LogLine::new(Level::Debug, "two").to_json(),
    ];
    let body = encode_body(&lines);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v.as_array().unwrap().iter().all(Value::is_string), "{v}");
    let parsed = parse_body(&body).unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[1].as_ref().unwrap().msg, "two");
    // One bad line does not lose the others; a body that is not an array of strings is refused whole.
    let mixed = encode_body(&["not json".into(), lines[0].clone()]);
    let parsed = parse_body(&mixed).unwrap();
    assert!(parsed[0].is_err() && parsed[1].is_ok());
    assert!(parse_body(br#"[{"level":"info"}]"#).is_err());
    assert!(parse_body(b"{}").is_err());
}

fn record() -> AddRecord {
    AddRecord {
        outcome: Outcome::Skipped,
        reason: "no_sidecar_status".into(),
        backend: NO_BACKEND.into(),
        latency: Duration::from_micros(2150),
        detail: "pod has no sidecar.istio.io/status annotation".into(),
    }
}

/// Runs `f` with a subscriber of only the buffer layer (at `level`) and returns the lines kept.
fn captured(level: &str, f: impl FnOnce()) -> Vec<String> {
    let buffer = LogBuffer::new();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(level))
        .with(BufferLayer::new(buffer.clone()));
    tracing::subscriber::with_default(subscriber, f);
    buffer.take()
}

#[test]
fn the_layer_keeps_events_with_their_span_fields_and_the_level_filter() {
    let lines = captured("info", || {
        let span = tracing::info_span!(
            "cni",
            namespace = "default",
            pod = "web-0",
            container_id = "c0ffee"
        );
        let _e = span.enter();
        tracing::debug!("not kept at info");
        tracing::info!(reason = %"no sidecar", n = 3u64, ok = true, "no redirect");
        let err = std::io::Error::other("boom");
        tracing::warn!(error = &err as &(dyn std::error::Error + 'static), "warned");
    });
    assert_eq!(lines.len(), 2, "{lines:?}");
    let l = LogLine::parse(&lines[0]).unwrap();
    assert_eq!(l.level, Level::Info);
    assert_eq!(l.msg, "no redirect");
    assert_eq!(l.str_field("namespace"), Some("default"));
    assert_eq!(l.str_field("pod"), Some("web-0"));
    assert_eq!(l.str_field("container_id"), Some("c0ffee"));
    assert_eq!(l.str_field("reason"), Some("no sidecar"));
    assert_eq!(l.fields["n"], 3);
    assert_eq!(l.fields["ok"], true);
    let l = LogLine::parse(&lines[1]).unwrap();
    assert_eq!((l.level, l.str_field("error")), (Level::Warn, Some("boom")));
}

#[test]
fn the_add_record_round_trips_through_the_layer() {
    let lines = captured("info", || {
        let span = tracing::info_span!("cni", namespace = "ns", pod = "p");
        let _e = span.enter();
        record().emit();
    });
    let line = LogLine::parse(&lines[0]).unwrap();
    assert_eq!(line.msg, ADD_RECORD);
    assert_eq!(line.str_field("pod"), Some("p"));
    assert_eq!(AddRecord::from_line(&line).unwrap().unwrap(), record());
    // Not a record; a malformed record names the field.
    assert!(AddRecord::from_line(&LogLine::new(Level::Info, "other")).is_none());
    let mut bad = line.clone();
    bad.fields.insert("outcome".into(), "maybe".into());
    let e = AddRecord::from_line(&bad).unwrap().unwrap_err();
    assert!(
        e.to_string().contains("outcome") && e.to_string().contains("maybe"),
        "{e}"
    );
    bad.fields.insert("outcome".into(), "failed".into());
    bad.fields.insert("latency_seconds".into(), json!(-1.0));
    let e = AddRecord::from_line(&bad).unwrap().unwrap_err();
    assert!(e.to_string().contains("latency_seconds"), "{e}");
}

#[test]
fn the_buffer_drops_the_oldest_lines_and_says_so() {
    let buffer = LogBuffer::new();
    for i in 0..MAX_LINES + 5 {
        buffer.push(format!("line {i}"));
    }
    let lines = buffer.take();
    assert_eq!(lines.len(), MAX_LINES + 1);
    let warn = LogLine::parse(&lines[0]).unwrap();
    assert_eq!(warn.level, Level::Warn);
    assert_eq!(warn.fields["dropped"], 5);
    assert_eq!(lines[1], "line 5");
    assert_eq!(lines.last().unwrap(), &format!("line {}", MAX_LINES + 4));
    assert!(buffer.take().is_empty());
    let big = "x".repeat(MAX_BYTES / 2 + 1);
    buffer.push(big.clone());
    buffer.push(big.clone());
    buffer.push("last".into());
    let lines = buffer.take();
    assert_eq!(lines.len(), 3, "a warning, the second big line, the last");
    assert_eq!(lines[2], "last");
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("meshcni-report-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads one request (headers and a Content-Length body) and answers `status`.
fn serve_one(listener: UnixListener, status: &'static str) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= len || n == 0 {
                    break;
                }
            }
        }
        let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        req
    })
}

#[test]
fn sends_one_post_and_reads_the_status() {
    let dir = TempDir::new("ok");
    let lines = vec![LogLine::new(Level::Info, "hello").to_json()];
    let listener = UnixListener::bind(dir.0.join(SOCKET_NAME)).unwrap();
    let server = serve_one(listener, "200 OK");
    assert_eq!(
        send(&dir.0, &lines, Duration::from_secs(5)).unwrap(),
        Delivery::Accepted
    );
    let req = String::from_utf8(server.join().unwrap()).unwrap();
    let (head, body) = req.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("POST /log HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/json"),
        "{head}"
    );
    let parsed = parse_body(body.as_bytes()).unwrap();
    assert_eq!(parsed[0].as_ref().unwrap().msg, "hello");

    std::fs::remove_file(dir.0.join(SOCKET_NAME)).unwrap();
    let listener = UnixListener::bind(dir.0.join(SOCKET_NAME)).unwrap();
    let server = serve_one(listener, "400 Bad Request");
    let e = send(&dir.0, &lines, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, SendError::Refused { .. }) && e.to_string().contains("400"),
        "{e}"
    );
    server.join().unwrap();
    assert_eq!(
        send(&dir.0, &[], Duration::from_secs(5)).unwrap(),
        Delivery::Empty
    );
}

#[test]
fn no_socket_or_someone_elses_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("trust");
    let lines = vec!["{}".to_string()];
    let e = send(&dir.0, &lines, DEADLINE).unwrap_err();
    assert!(matches!(e, SendError::NoSocket { .. }), "{e}");
    std::fs::write(dir.0.join(SOCKET_NAME), "").unwrap();
    let e = send(&dir.0, &lines, DEADLINE).unwrap_err();
    assert!(matches!(e, SendError::NotSocket { .. }), "{e}");
    std::fs::remove_file(dir.0.join(SOCKET_NAME)).unwrap();
    let path = dir.0.join(SOCKET_NAME);
    let _l = UnixListener::bind(&path).unwrap();
    // Istio's agent makes it 0666: the mode is not what is trusted, the owner is.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let other = nix::unistd::geteuid().as_raw() + 1;
    match nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(other)), None) {
        Ok(()) => {
            let e = send(&dir.0, &lines, DEADLINE).unwrap_err();
            assert!(matches!(e, SendError::Untrusted { .. }), "{e}");
            assert!(e.to_string().contains(&other.to_string()), "{e}");
        }
        // Only root can give a file away; the check is the same either way.
        Err(e) => assert!(!nix::unistd::geteuid().is_root(), "chown as root: {e}"),
    }
}

#[test]
fn a_listener_that_never_reads_costs_at_most_the_deadline() {
    // The margin over the deadline is for the scheduler of a loaded machine (85 ms seen at load ~7), not for the
    // code: a send that ignored the deadline would block for the socket's lifetime.
    const MARGIN: Duration = Duration::from_millis(200);
    let dir = TempDir::new("stuck");
    let path = dir.0.join(SOCKET_NAME);
    let listener = UnixListener::bind(&path).unwrap();
    // Accepted but never read, never answered: written into the socket buffer, unconfirmed.
    let lines = vec![LogLine::new(Level::Info, "x").to_json()];
    let start = Instant::now();
    assert_eq!(
        send(&dir.0, &lines, DEADLINE).unwrap(),
        Delivery::Unconfirmed
    );
    assert!(start.elapsed() < DEADLINE + MARGIN, "{:?}", start.elapsed());
    // More than the socket buffer holds: the write runs into the deadline (which starts after the request is
    // built: the encoding is the plugin's own work, timed here to be left out).
    let big = vec!["y".repeat(64 * 1024); 16];
    let t = Instant::now();
    let encoding = super::send::request(&encode_body(&big)).len();
    let encoding_time = t.elapsed();
    assert!(encoding > 1 << 20);
    let start = Instant::now();
    let e = send(&dir.0, &big, DEADLINE).unwrap_err();
    assert!(matches!(e, SendError::Write { .. }), "{e}");
    let spent = start.elapsed().saturating_sub(encoding_time);
    assert!(spent < DEADLINE + MARGIN, "{spent:?}");
    // A backlog that is full (nobody accepts; each connection waits in it, closed or not): refused at once, not
    // waited for.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    let listener = listener_with_backlog(&path, 1);
    let mut sent = 0;
    let busy = loop {
        match send(&dir.0, &lines, DEADLINE) {
            Err(e @ SendError::Busy { .. }) => break e,
            Ok(_) => sent += 1,
            Err(e) => panic!("after {sent}: {e}"),
        }
        assert!(sent < 100, "the backlog never filled");
    };
    let start = Instant::now();
    let e = send(&dir.0, &lines, DEADLINE).unwrap_err();
    assert!(matches!(e, SendError::Busy { .. }), "{busy} / {e}");
    assert!(
        start.elapsed() < Duration::from_millis(5),
        "{:?}",
        start.elapsed()
    );
    drop(listener);
}

/// A listening socket that nobody accepts on, with a backlog of `n`.
pub(crate) fn listener_with_backlog(path: &std::path::Path, n: i32) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &nix::sys::socket::UnixAddr::new(path).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(n).unwrap()).unwrap();
    fd
}
