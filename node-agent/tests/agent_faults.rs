//! The real `node-agent` under faults of its node (root): killed with SIGKILL at random moments of its install,
//! 100 times, over the whole reconcile (the copy of a 16 MiB plugin binary, the kubeconfig, the conflist); its conf
//! dir full (a tiny tmpfs) or read-only.
//!
//! - After every kill each file it writes holds the old content or the complete new one (the binary byte for
//!   byte the image's or the previous one, the kubeconfig and the conflist exactly the old or the new text), and
//!   the temp files left are one agent's at most, one per file; a normal start then repairs everything and leaves
//!   none.
//! - A conf dir it cannot write makes it not ready with the reason (the file and the errno) on `/readyz`, in
//!   `istio_cni_install_ready`/`istio_cni_installs_total` and in `node-agent status`, while the file it could not
//!   rewrite stays byte-identical; once the dir can be written again it becomes ready without a restart.
//!
//! Mounts are made only inside the agent's own mount namespace (unshared in the child before `exec`, with private
//! propagation), so they vanish with the agent whatever happens to the test; the test reaches what the agent
//! sees through `/proc/<pid>/root`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use meshcni_tests::netns::require_root;

const WAIT: Duration = Duration::from_secs(15);
/// The plugin binary of these tests: large enough that a kill often lands inside its copy (about 100 ms with
/// its fsync on this machine's disk).
const BINARY_SIZE: usize = 16 << 20;
/// What the bin dir and the run dir hold before the agent's install: a previous version's files.
const OLD_BINARY: &[u8] = b"#!/bin/sh\n# the previous version of istio-cni\nexit 0\n";
const OLD_KUBECONFIG: &[u8] = b"apiVersion: v1\nkind: Config\n# written by the previous agent\n";
const KILLS: usize = 100;
const PRIMARY: &str = "10-calico.conflist";

/// xorshift64: reproducible pseudo-random numbers (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The install's desired and previous contents.
struct Contents {
    binary: Vec<u8>,
    kubeconfig: Vec<u8>,
    conflist_old: Vec<u8>,
    conflist_new: Vec<u8>,
}

/// How much of the install is still to do when the agent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Old binary, old kubeconfig, conflist without our entry: the copy dominates the reconcile.
    Everything,
    /// The binary already the image's: the reconcile compares it, then writes kubeconfig and conflist.
    BinaryCurrent,
    /// A running agent, ready, whose files are all set back to the old ones at once (a node upgrade, the primary
    /// CNI rewriting its file): the repair triggered by inotify, while the files still change.
    Running,
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Puts the node back in the state `start` describes; leaves any temp file where it is.
fn reset(node: &Node, start: Start, c: &Contents) {
    match start {
        Start::Everything | Start::Running => write_mode(&node.plugin(), OLD_BINARY, 0o755),
        Start::BinaryCurrent => {
            if fs::read(node.plugin()).ok().as_deref() != Some(c.binary.as_slice()) {
                write_mode(&node.plugin(), &c.binary, 0o755);
            }
        }
    }
    write_mode(&node.kubeconfig(), OLD_KUBECONFIG, 0o600);
    fs::write(node.conf.join(PRIMARY), &c.conflist_old).expect("write the primary conflist");
}

/// A temp file of ours: `<target>.tmp.<pid>.<n>.<64 random bits in hex>`; (target, pid).
fn temp_of(name: &str) -> Option<(String, u32)> {
    let (target, rest) = name.split_once(".tmp.")?;
    let (pid, rest) = rest.split_once('.')?;
    let (n, random) = rest.split_once('.')?;
    n.parse::<u64>().ok()?;
    u64::from_str_radix(random, 16).ok()?;
    Some((target.to_string(), pid.parse().ok()?))
}

/// The temp files in the conf, bin and run dirs, as (dir, target, pid); panics on a `.tmp` name of another
/// pattern.
fn temp_files(node: &Node) -> Vec<(PathBuf, String, u32)> {
    let mut out = Vec::new();
    for dir in [&node.conf, &node.bin, &node.run] {
        for name in Node::temp_files(dir) {
            let (target, pid) = temp_of(&name).unwrap_or_else(|| {
                panic!(
                    "a temp file not of our pattern in {}: {name}",
                    dir.display()
                )
            });
            out.push((dir.to_path_buf(), target, pid));
        }
    }
    out
}

/// Where a kill landed, from what it left.
fn check_after_kill(node: &Node, c: &Contents, round: usize) -> &'static str {
    let binary = fs::read(node.plugin()).unwrap_or_else(|e| panic!("round {round}: binary: {e}"));
    let binary_new = if binary == c.binary {
        let mode = fs::metadata(node.plugin()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "round {round}: the new binary's mode");
        true
    } else {
        assert!(
            binary == OLD_BINARY,
            "round {round}: torn binary ({} bytes)",
            binary.len()
        );
        false
    };
    let kubeconfig =
        fs::read(node.kubeconfig()).unwrap_or_else(|e| panic!("round {round}: kubeconfig: {e}"));
    let kubeconfig_new = kubeconfig == c.kubeconfig;
    assert!(
        kubeconfig_new || kubeconfig == OLD_KUBECONFIG,
        "round {round}: torn kubeconfig:\n{}",
        String::from_utf8_lossy(&kubeconfig)
    );
    let conflist = fs::read(node.conf.join(PRIMARY))
        .unwrap_or_else(|e| panic!("round {round}: conflist: {e}"));
    serde_json::from_slice::<serde_json::Value>(&conflist)
        .unwrap_or_else(|e| panic!("round {round}: the conflist is not JSON ({e})"));
    let conflist_new = conflist == c.conflist_new;
    assert!(
        conflist_new || conflist == c.conflist_old,
        "round {round}: torn conflist:\n{}",
        String::from_utf8_lossy(&conflist)
    );
    // Nothing else appears in the conf dir: kubelet would load any *.conf/*.conflist.
    let names: BTreeSet<String> = fs::read_dir(&node.conf)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| temp_of(n).is_none())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([PRIMARY.to_string()]),
        "round {round}"
    );
    // Temp files: of one agent at most (each start removes those of the agents before it), one per file.
    let temps = temp_files(node);
    let pids: BTreeSet<u32> = temps.iter().map(|(_, _, pid)| *pid).collect();
    assert!(
        pids.len() <= 1,
        "round {round}: temp files of several agents: {temps:?}"
    );
    let targets: BTreeSet<&String> = temps.iter().map(|(_, t, _)| t).collect();
    assert_eq!(
        targets.len(),
        temps.len(),
        "round {round}: two temp files of one file: {temps:?}"
    );
    let temp_of_target = |t: &str| temps.iter().any(|(_, target, _)| target == t);
    if conflist_new {
        "after the conflist"
    } else if temp_of_target(PRIMARY) {
        "inside the conflist write"
    } else if kubeconfig_new {
        "after the kubeconfig, before the conflist"
    } else if temp_of_target("istio-cni-kubeconfig") {
        "inside the kubeconfig write"
    } else if binary_new {
        "after the binary, before the kubeconfig"
    } else if temp_of_target("istio-cni") {
        "inside the binary copy"
    } else {
        "before any write"
    }
}

/// Time from start to ready for an agent starting at `start` (calibration of the kill delays).
fn time_to_ready(node: &Node, start: Start, c: &Contents) -> Duration {
    reset(node, start, c);
    let t = Instant::now();
    let mut agent = Agent::start(node, &[]);
    agent.wait_ready();
    let took = t.elapsed();
    agent.signal(libc::SIGKILL);
    let _ = agent.child.wait();
    took
}

/// SIGKILL 100 times at random moments of the install, in turn: from a node with everything to do (the copy of
/// the 16 MiB binary dominates), with the binary already current (the kubeconfig and conflist writes come right
/// after start-up), and in a running agent repairing files set back under it; each round's delay drawn over 1.25
/// times that start's measured time to ready (the first round of each kind: no delay). After each kill: every file old or new, never torn, temp files of
/// one agent at most. Then a normal start repairs everything and leaves no temp file.
#[test]
fn sigkill_during_the_install_100_times_leaves_old_or_new_files_and_no_temp_files() {
    require_root();
    let started = Instant::now();
    let node = Node::new("kill100");
    fs::create_dir_all(&node.run).unwrap();
    let seed = std::env::var("MESHCNI_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(0x9e37_79b9_7f4a_7c15)
        });
    eprintln!("seed {seed} (MESHCNI_KILL_SEED={seed} repeats the delays)");
    let mut rng = Rng(seed);
    // Not compressible, like a real binary.
    let mut binary = Vec::with_capacity(BINARY_SIZE);
    while binary.len() < BINARY_SIZE {
        binary.extend_from_slice(&rng.next().to_ne_bytes());
    }
    write_mode(&node.src.join("istio-cni"), &binary, 0o755);
    let calico = node.put(PRIMARY, "install-e2e/pre/calico.conflist");
    let mut c = Contents {
        binary,
        kubeconfig: Vec::new(),
        conflist_old: fs::read(&calico).unwrap(),
        conflist_new: node
            .expected_bytes("install-e2e/expected/10-calico.conflist-istioconfig")
            .into_bytes(),
    };

    let full = time_to_ready(&node, Start::Everything, &c);
    c.kubeconfig = fs::read(node.kubeconfig()).unwrap();
    assert_ne!(c.kubeconfig, OLD_KUBECONFIG);
    assert_eq!(fs::read(node.plugin()).unwrap(), c.binary);
    assert_eq!(fs::read(&calico).unwrap(), c.conflist_new);
    let short = time_to_ready(&node, Start::BinaryCurrent, &c);
    eprintln!(
        "time to ready: {} ms with the copy, {} ms with the binary current",
        full.as_millis(),
        short.as_millis()
    );

    let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut most_temps = 0;
    for round in 0..KILLS {
        let start = [Start::Everything, Start::BinaryCurrent, Start::Running][round % 3];
        let window = if start == Start::BinaryCurrent {
            short
        } else {
            full
        };
        // The first round of each start kills at once, so the phase before any write is always among them (a
        // random delay lands there only now and then: the agent's start-up is a small part of the window).
        let delay = if round < 3 {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.below(window.as_micros() as u64 * 5 / 4))
        };
        let mut agent = if start == Start::Running {
            let mut agent = Agent::start(&node, &[]);
            agent.wait_ready();
            reset(&node, start, &c);
            agent
        } else {
            reset(&node, start, &c);
            Agent::start(&node, &[])
        };
        std::thread::sleep(delay);
        agent.signal(libc::SIGKILL);
        let status = agent.child.wait().expect("reap the agent");
        assert!(
            !status.success(),
            "round {round}: the agent exited by itself: {status}"
        );
        *landed
            .entry(check_after_kill(&node, &c, round))
            .or_default() += 1;
        most_temps = most_temps.max(temp_files(&node).len());
    }
    eprintln!(
        "where the {KILLS} kills landed: {landed:?}; at most {most_temps} temp file(s) at once"
    );
    for phase in [
        "before any write",
        "inside the binary copy",
        "after the conflist",
    ] {
        assert!(
            landed.get(phase).is_some_and(|n| *n > 0),
            "no kill landed {phase}: {landed:?} (seed {seed})"
        );
    }

    // A normal start repairs everything and removes every temp file.
    reset(&node, Start::Everything, &c);
    let mut agent = Agent::start(&node, &[]);
    agent.wait_ready();
    assert_eq!(fs::read(node.plugin()).unwrap(), c.binary);
    assert_eq!(fs::read(node.kubeconfig()).unwrap(), c.kubeconfig);
    assert_eq!(fs::read(&calico).unwrap(), c.conflist_new);
    node.assert_no_temp_files();
    eprintln!(
        "{KILLS} kills and the repair in {} s",
        started.elapsed().as_secs_f64()
    );
}

// ---- A conf dir the agent cannot write ----

/// What replaces the conf dir in the agent's own mount namespace.
#[derive(Debug, Clone, Copy)]
enum ConfMount {
    /// A tmpfs of 16 KiB (four pages): the agent sees an empty dir, written through `/proc/<pid>/root`.
    SmallTmpfs,
    /// The dir bound onto itself: the same files, a mount of its own to remount read-only.
    Bind,
}

/// The agent, in a mount namespace of its own where the conf dir is replaced by `conf`.
fn start_with_conf_mount(node: &Node, conf: ConfMount) -> Agent {
    let dir = CString::new(node.conf.as_os_str().as_bytes()).expect("conf dir path");
    let (source, fstype, flags, data) = match conf {
        ConfMount::SmallTmpfs => (
            c"tmpfs".to_owned(),
            Some(c"tmpfs".to_owned()),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"size=16k,mode=0755".to_owned()),
        ),
        ConfMount::Bind => (dir.clone(), None, libc::MS_BIND, None),
    };
    // Runs between fork and exec: unshare(2) and mount(2) only, on C strings made before the fork; nothing
    // allocates.
    Agent::start_with_hook(
        node,
        "agent",
        Box::new(move || {
            let null: *const libc::c_char = std::ptr::null();
            let no_data: *const libc::c_void = std::ptr::null();
            // SAFETY: see above.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        null,
                        c"/".as_ptr(),
                        null,
                        libc::MS_REC | libc::MS_PRIVATE,
                        no_data,
                    ) != 0
                    || libc::mount(
                        source.as_ptr(),
                        dir.as_ptr(),
                        fstype.as_ref().map_or(null, |f| f.as_ptr()),
                        flags,
                        data.as_ref().map_or(no_data, |d| d.as_ptr().cast()),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        }),
    )
}

/// `path` as the agent sees it (through its mount namespace).
fn seen_by(agent: &Agent, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{}/root", agent.pid())).join(path.strip_prefix("/").unwrap_or(path))
}

/// Runs `mount args` in the agent's mount namespace.
fn mount_in(agent: &Agent, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", agent.pid()))
        .arg("mount")
        .args(args)
        .output()
        .expect("run nsenter (util-linux)");
    assert!(
        out.status.success(),
        "nsenter mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills the filesystem of `dir` to the last block with a file of page-sized writes; returns it.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f =
        fs::File::create(&filler).unwrap_or_else(|e| panic!("create {}: {e}", filler.display()));
    let page = [0xa5u8; 4096];
    loop {
        match f.write(&page) {
            Ok(n) if n == page.len() => {}
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", filler.display()),
        }
    }
    let free = nix::sys::statvfs::statvfs(dir)
        .expect("statvfs")
        .blocks_available();
    assert_eq!(free, 0, "{} is not full", dir.display());
    filler
}

/// Waits for `/readyz` to answer 503 with a body holding each of `words`; returns the body.
fn wait_not_ready_saying(agent: &Agent, words: &[&str]) -> String {
    agent.expect(&format!("/readyz 503 saying {words:?}"), WAIT, || {
        let (status, body) = http_get(agent.health, "/readyz")?;
        (status == 503 && words.iter().all(|w| body.contains(w))).then_some(body)
    })
}

/// The agent reports the failed write everywhere: `/readyz`, the metrics, `node-agent status`; the conflist stays
/// `before`, byte for byte, with no temp file beside it, also after the retries.
fn assert_reports_and_keeps(
    agent: &Agent,
    node: &Node,
    conflist: &Path,
    before: &[u8],
    errno: &str,
) {
    let body = wait_not_ready_saying(agent, &["CREATE_CNI_CONFIG_FAILURE", PRIMARY, errno]);
    eprintln!("/readyz: {}", body.trim());
    let metrics = agent.metrics_text();
    assert!(metrics.contains("istio_cni_install_ready 0"), "{metrics}");
    assert!(
        metrics.contains("istio_cni_installs_total{result=\"CREATE_CNI_CONFIG_FAILURE\"}"),
        "{metrics}"
    );
    let (code, status) = agent.status(node, &[]);
    assert_eq!(code, 1, "{status}");
    assert!(
        status.contains(errno) && status.contains(PRIMARY),
        "{status}"
    );
    // Retried meanwhile (200, 400, 800 ms): still failing, the file untouched.
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(
        fs::read(conflist).unwrap(),
        before,
        "the conflist was changed"
    );
    let dir = conflist.parent().unwrap();
    assert!(
        Node::temp_files(dir).is_empty(),
        "temp files in {}",
        dir.display()
    );
    let metrics = agent.metrics_text();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("istio_cni_installs_total{result=\"CREATE_CNI_CONFIG_FAILURE\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 2, "not retried: {metrics}");
}

/// Waits for the agent to be ready again without a restart, the entry in the file; the time it took.
fn wait_recovered(agent: &mut Agent, conflist: &Path, node: &Node) -> Duration {
    let t = Instant::now();
    agent.wait_ready();
    let took = t.elapsed();
    let expected = node.expected_bytes("install-e2e/expected/10-calico.conflist-istioconfig");
    assert_eq!(fs::read_to_string(conflist).unwrap(), expected);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent restarted"
    );
    took
}

/// The conf dir full: the agent installed its entry; then the dir filled up to the last block and the primary
/// CNI rewrote its file without our entry. The agent cannot write its temp file (ENOSPC): not ready with the
/// file and the errno, the primary's file left as it is, no temp file; space freed, it is ready again on its
/// own.
#[test]
fn a_full_conf_dir_is_reported_and_the_file_kept() {
    require_root();
    let node = Node::new("confull");
    let mut agent = start_with_conf_mount(&node, ConfMount::SmallTmpfs);
    agent.wait_serving();
    let conf = seen_by(&agent, &node.conf);
    let primary = fs::read(corpus("install-e2e/pre/calico.conflist")).unwrap();
    let conflist = conf.join(PRIMARY);
    fs::write(&conflist, &primary).unwrap();
    agent.wait_ready();
    // The tmpfs is the agent's alone: the test's own view of the conf dir is still empty.
    assert!(!node.conf.join(PRIMARY).exists());

    let filler = fill(&conf);
    fs::write(&conflist, &primary).expect("the primary's in-place rewrite fits in its own page");
    assert_reports_and_keeps(&agent, &node, &conflist, &primary, "ENOSPC");

    fs::remove_file(&filler).unwrap();
    let took = wait_recovered(&mut agent, &conflist, &node);
    eprintln!("ready again {} ms after space returned", took.as_millis());
}

/// The conf dir read-only (for the agent: its bind mount remounted read-only, as a read-only hostPath would be):
/// the primary CNI rewrites its file without our entry; the agent cannot create its temp file (EROFS): not ready
/// with the file and the errno, the file left as it is; the mount made writable again, it is ready on its own.
#[test]
fn a_read_only_conf_dir_is_reported_and_the_file_kept() {
    require_root();
    let node = Node::new("confro");
    let conflist = node.put(PRIMARY, "install-e2e/pre/calico.conflist");
    let primary = fs::read(&conflist).unwrap();
    let mut agent = start_with_conf_mount(&node, ConfMount::Bind);
    agent.wait_ready();
    let conf = node.conf.display().to_string();
    mount_in(&agent, &["-o", "remount,bind,ro", &conf]);
    // Written through the test's own (writable) view of the same dir.
    fs::write(&conflist, &primary).unwrap();
    assert_reports_and_keeps(&agent, &node, &conflist, &primary, "EROFS");

    mount_in(&agent, &["-o", "remount,bind,rw", &conf]);
    let took = wait_recovered(&mut agent, &conflist, &node);
    eprintln!(
        "ready again {} ms after the dir became writable",
        took.as_millis()
    );
}
