use super::*;

fn now() -> jiff::Timestamp {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

fn add(
    pod: &str,
    outcome: &str,
    reason: &str,
    backend: &str,
    secs: f64,
    at: &str,
    detail: &str,
) -> AddEvent {
    AddEvent {
        at: at.into(),
        namespace: "default".into(),
        pod: pod.into(),
        container_id: "0123456789abcdef0123".into(),
        outcome: outcome.into(),
        reason: reason.into(),
        backend: backend.into(),
        latency_seconds: secs,
        detail: detail.into(),
    }
}

fn agent() -> AgentStatus {
    AgentStatus {
        node: "node-1".into(),
        version: "0.1.0".into(),
        pid: 42,
        install: InstallState {
            ready: true,
            detail: "istio-cni installed and in place".into(),
            conflist: Some("/host/etc/cni/net.d/10-calico.conflist".into()),
            since: "2026-03-01T11:00:00Z".into(),
        },
        adds: vec![
            add(
                "web-0",
                "redirected",
                "",
                "iptables-legacy",
                0.0041,
                "2026-03-01T11:59:58Z",
                "",
            ),
            add(
                "batch-7",
                "skipped",
                "no_sidecar_status",
                "none",
                0.00062,
                "2026-03-01T11:58:30Z",
                "pod has no sidecar.istio.io/status annotation",
            ),
            add(
                "api-1",
                "failed",
                "pod_lookup",
                "none",
                1.5,
                "2026-03-01T09:00:00Z",
                "pod default/api-1: the API server answered 403",
            ),
        ],
        repairs: vec![RepairEvent {
            at: "2026-03-01T11:59:00Z".into(),
            namespace: "default".into(),
            pod: "old-0".into(),
            action: "delete".into(),
            reason: "istio-validation exited 126".into(),
            result: "ok".into(),
        }],
    }
}

fn local() -> Local {
    Local {
        node: "node-1".into(),
        conf_dir: "/host/etc/cni/net.d".into(),
        entry: Ok((
            "/host/etc/cni/net.d/10-calico.conflist".into(),
            serde_json::json!({"type": "istio-cni", "plugin_log_level": "info"}),
        )),
        binary: Ok(Binary {
            path: "/host/opt/cni/bin/istio-cni".into(),
            size: 11_600_000,
            sha256: "ab".repeat(32),
            version: Ok("istio-cni (meshcni) 0.1.0".into()),
            same_as_image: Some(true),
            image_copy: "/opt/cni/bin/istio-cni".into(),
        }),
    }
}

#[test]
fn renders_the_whole_status_at_a_glance() {
    let text = render(&local(), &Ok(agent()), 20, now());
    let want = format!(
        "\
node node-1 · meshcni node agent 0.1.0 (pid 42)

INSTALLATION
  ready     yes, since 1h00m ago (istio-cni installed and in place)
  conflist  /host/etc/cni/net.d/10-calico.conflist
  entry     {{\"plugin_log_level\":\"info\",\"type\":\"istio-cni\"}}
  binary    /host/opt/cni/bin/istio-cni (11600000 bytes)
  version   istio-cni (meshcni) 0.1.0
  sha256    {} (same as this image's /opt/cni/bin/istio-cni)

LAST ADD DECISIONS (3 of 3 kept, newest first)
  WHEN       POD              CONTAINER     OUTCOME     REASON             BACKEND          LATENCY  DETAIL
  2s ago     default/web-0    0123456789a…  redirected  -                  iptables-legacy  4.1ms
  1m30s ago  default/batch-7  0123456789a…  skipped     no_sidecar_status  none             620µs    pod has no sidecar.istio.io/status annotation
  3h00m ago  default/api-1    0123456789a…  failed      pod_lookup         none             1.50s    pod default/api-1: the API server answered 403

REPAIR ACTIONS (1 of 1 kept, newest first)
  WHEN       POD            ACTION  REASON                       RESULT
  1m00s ago  default/old-0  delete  istio-validation exited 126  ok
",
        "ab".repeat(32)
    );
    assert_eq!(text, want, "got:\n{text}");
}

#[test]
fn says_what_is_wrong_and_keeps_the_files_side_without_the_agent() {
    let mut a = agent();
    a.install.ready = false;
    a.install.detail = "CREATE_CNI_CONFIG_FAILURE: cannot write /x".into();
    a.adds.clear();
    let mut l = local();
    if let Ok(b) = &mut l.binary {
        b.same_as_image = Some(false);
        b.version = Err("cannot run it".into());
    }
    let text = render(&l, &Ok(a), 1, now());
    assert!(
        text.contains(
            "  ready     NO, since 1h00m ago: CREATE_CNI_CONFIG_FAILURE: cannot write /x\n"
        ),
        "{text}"
    );
    assert!(text.contains("DIFFERS from this image's"), "{text}");
    assert!(
        text.contains("  version   unknown: cannot run it\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "LAST ADD DECISIONS (0 of 0 kept, newest first)\n  none since the agent started\n"
        ),
        "{text}"
    );

    l.entry = Err("no istio-cni entry in any file of /x".into());
    let text = render(
        &l,
        &Err("cannot connect to /run/status.sock: refused".into()),
        5,
        now(),
    );
    assert!(
        text.starts_with("node node-1 · node agent not answering\n"),
        "{text}"
    );
    assert!(
        text.contains("  ready     unknown: cannot connect to /run/status.sock: refused\n"),
        "{text}"
    );
    assert!(
        text.contains("  conflist  NONE: no istio-cni entry"),
        "{text}"
    );
    assert!(text.contains("  sha256    "), "{text}");
    assert!(text.contains("unknown: the agent did not answer"), "{text}");
}

#[test]
fn last_n_limits_the_rows() {
    let text = render(&local(), &Ok(agent()), 1, now());
    assert!(
        text.contains("LAST ADD DECISIONS (1 of 3 kept, newest first)"),
        "{text}"
    );
    assert!(
        text.contains("web-0") && !text.contains("batch-7"),
        "{text}"
    );
}

#[test]
fn times_and_latencies_read_shortly() {
    let n = now();
    assert_eq!(ago("2026-03-01T12:00:00Z", n), "now");
    assert_eq!(ago("2026-03-01T12:00:05Z", n), "now");
    assert_eq!(ago("2026-03-01T11:59:59.5Z", n), "now");
    assert_eq!(ago("2026-03-01T11:59:15Z", n), "45s ago");
    assert_eq!(ago("2026-03-01T10:30:00Z", n), "1h30m ago");
    assert_eq!(ago("2026-02-27T10:00:00Z", n), "2d02h ago");
    assert_eq!(ago("yesterday", n), "yesterday");
    assert_eq!(latency(0.000_25), "250µs");
    assert_eq!(latency(0.0123), "12.3ms");
    assert_eq!(latency(2.0), "2.00s");
}

#[test]
fn the_state_keeps_its_since_while_it_holds() {
    let first = InstallState::of(&Status::Ready, None);
    let mut older = first.clone();
    older.since = "2026-01-01T00:00:00Z".into();
    assert_eq!(first.clone().after(&older).since, older.since);
    let failed = InstallState::of(
        &Status::Failed {
            step: crate::install::Step::CopyBinaries,
            error: "disk full".into(),
        },
        None,
    );
    assert!(!failed.ready);
    assert_eq!(failed.detail, "COPY_BINARIES_FAILURE: disk full");
    assert_ne!(failed.after(&older).since, older.since);
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("meshcni-status-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

#[test]
fn finds_the_entry_preferring_the_agents_file() {
    let d = dir("entry");
    let list = |n: &str| {
        serde_json::json!({"cniVersion": "1.0.0", "name": n,
            "plugins": [{"type": "bridge"}, {"type": "istio-cni", "name": n}]})
        .to_string()
    };
    std::fs::write(
        d.0.join("05-other.json"),
        list("ignored: not a config name"),
    )
    .unwrap();
    std::fs::write(d.0.join("10-a.conflist"), list("a")).unwrap();
    std::fs::write(d.0.join("20-b.conflist"), list("b")).unwrap();
    std::fs::write(
        d.0.join("00-plain.conflist"),
        r#"{"plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let (file, entry) = find_entry(&d.0, None).unwrap();
    assert_eq!(
        (file, entry["name"].as_str()),
        (d.0.join("10-a.conflist"), Some("a"))
    );
    let (file, _) = find_entry(&d.0, Some(&d.0.join("20-b.conflist"))).unwrap();
    assert_eq!(file, d.0.join("20-b.conflist"));
    // A standalone .conf is the entry itself.
    let e = dir("entry-standalone");
    std::fs::write(
        e.0.join("YYY-istio-cni.conf"),
        r#"{"type":"istio-cni","name":"s"}"#,
    )
    .unwrap();
    assert_eq!(find_entry(&e.0, None).unwrap().1["name"], "s");
    std::fs::remove_file(e.0.join("YYY-istio-cni.conf")).unwrap();
    let err = find_entry(&e.0, None).unwrap_err();
    assert!(err.contains(&e.0.display().to_string()), "{err}");
}

#[test]
fn the_binary_its_checksum_and_version() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir("bin");
    let (bin, src) = (d.0.join("bin"), d.0.join("src"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&src).unwrap();
    let script = "#!/bin/sh\n[ \"$1\" = --version ] && echo 'istio-cni (test) 9.9'\n";
    for dir in [&bin, &src] {
        let p = dir.join(PLUGIN_BINARY);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let b = binary(&bin, &src).unwrap();
    assert_eq!(b.version.as_deref(), Ok("istio-cni (test) 9.9"));
    assert_eq!(b.same_as_image, Some(true));
    assert_eq!(b.size, script.len() as u64);
    assert_eq!(b.sha256.len(), 64);
    // sha256 of "abc" (FIPS 180-2's example).
    std::fs::write(d.0.join("abc"), "abc").unwrap();
    assert_eq!(
        sha256_file(&d.0.join("abc")).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    std::fs::write(src.join(PLUGIN_BINARY), "other").unwrap();
    assert_eq!(binary(&bin, &src).unwrap().same_as_image, Some(false));
    let hang = bin.join("hang");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    let start = Instant::now();
    let e = binary_version(&hang, Duration::from_millis(200)).unwrap_err();
    assert!(e.contains("no answer"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let e = binary(&d.0, &src).unwrap_err();
    assert!(e.contains(PLUGIN_BINARY), "{e}");
}
