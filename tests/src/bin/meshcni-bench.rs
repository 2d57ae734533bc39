//! `meshcni-bench`: ADD latency of the real `istio-cni` binary against the floor measured in the same run.
//!
//! Per sample a fresh pod netns (with an address, as after the primary CNI) is made outside the timed part. Timed:
//! - ADD, injected pod, per backend (iptables-legacy, iptables-nft, native nftables): the whole plugin process
//!   (API lookup over HTTPS, decision, rules in the netns);
//! - ADD, non-injected pod: the plugin process that looks the pod up and passes it through;
//! - VERSION: the plugin's own start-up and exit;
//! - floor: one `iptables-restore --noflush` (legacy or nft) of the same rules into a fresh netns, spawned the
//!   same way: what the iptables backends cannot go below, and what the native backend is compared with.
//!
//! The three are interleaved so that drift affects them alike. Then, per backend, a burst of concurrent ADDs
//! (each its own pod and netns; the plugin processes made before the clock starts and released together): wall
//! time, when half had ended, failures, against the bound the CPU time of one ADD gives (`1.3 × burst × median CPU time / cores`). Results as a markdown table on stdout, and an SVG chart (`--svg`).
//! Run it through `scripts/bench-add.sh` (release build, root). Touches only netns it creates.

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use cni_plugin::config::BackendChoice;
use cni_plugin::lookup::response::interpret;
use cni_plugin::lookup::PodRef;
use cni_plugin::redirect::Redirect;
use cni_plugin::rules::{render_iptables, CaptureConfig};
use meshcni_tests::apiserver::{sample_pod, ApiServer};
use meshcni_tests::gated::{Gated, Spec};
use serde_json::json;

const HELP: &str = "\
meshcni-bench: ADD latency of istio-cni vs. the iptables-restore floor (root; creates its own netns only)

OPTIONS:
    --samples N      samples per measurement (default 40)
    --burst N        concurrent ADDs in the burst (default 50)
    --backend B      legacy, nft, nftables or all (default all; both = legacy and nft)
    --svg FILE       also write the latencies as an SVG chart to FILE
    --bin-dir DIR    where istio-cni is (default: this binary's directory)
    -h, --help       this help
";

struct Args {
    samples: usize,
    burst: usize,
    backends: Vec<BackendChoice>,
    bin_dir: PathBuf,
    svg: Option<PathBuf>,
}

const ALL: [BackendChoice; 3] = [
    BackendChoice::Legacy,
    BackendChoice::Nft,
    BackendChoice::Nftables,
];

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        samples: 40,
        burst: 50,
        backends: ALL.to_vec(),
        svg: None,
        bin_dir: std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--samples" => a.samples = val()?.parse().map_err(|e| format!("--samples: {e}"))?,
            "--burst" => a.burst = val()?.parse().map_err(|e| format!("--burst: {e}"))?,
            "--bin-dir" => a.bin_dir = PathBuf::from(val()?),
            "--svg" => a.svg = Some(PathBuf::from(val()?)),
            "--backend" => {
                a.backends = match val()?.as_str() {
                    "legacy" => vec![BackendChoice::Legacy],
                    "nft" => vec![BackendChoice::Nft],
                    "nftables" => vec![BackendChoice::Nftables],
                    "both" => vec![BackendChoice::Legacy, BackendChoice::Nft],
                    "all" => ALL.to_vec(),
                    other => {
                        return Err(format!(
                            "--backend {other:?}: expected legacy, nft, nftables, both or all"
                        ))
                    }
                }
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.samples == 0 || a.burst == 0 {
        return Err("--samples and --burst must be at least 1".into());
    }
    Ok(a)
}

/// A pod netns with one address on a veth (both ends inside it, nothing on the host); deleted on drop.
struct BenchNetns(String);

impl BenchNetns {
    fn new(i: usize) -> Result<Self, String> {
        let name = format!("meshcni-bench-{}-{i}", std::process::id());
        let ns = BenchNetns(name.clone());
        let addr = format!("10.77.{}.{}/16", (i / 250) % 250, i % 250 + 2);
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
            vec![
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
            vec!["-n", &name, "addr", "add", &addr, "dev", "eth0"],
            vec!["-n", &name, "link", "set", "eth0", "up"],
        ] {
            let st = Command::new("ip")
                .args(&args)
                .status()
                .map_err(|e| format!("ip: {e}"))?;
            if !st.success() {
                return Err(format!("ip {} failed", args.join(" ")));
            }
        }
        Ok(ns)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The netns of `n` samples (one for the ADD, one for the floor each) and of the untimed warm-up before them, all
/// made before any sample is timed: a netns deleted between samples is torn down by the kernel afterwards, in a
/// worker, while the next samples run (on 2 vCPUs that made single ADDs up to a third slower, the floor less).
/// After they are made the machine is let settle ([`settle`]); the warm-up then runs in the first pair, so the
/// samples do not start on a machine that has just been idle either.
fn sample_netns(n: usize) -> Result<Vec<(BenchNetns, BenchNetns)>, String> {
    let nss = std::iter::once(9000)
        .chain(0..n)
        .map(|i| Ok((BenchNetns::new(i)?, BenchNetns::new(i + 1000)?)))
        .collect::<Result<_, String>>()?;
    settle();
    Ok(nss)
}

/// Busy CPU time of the machine so far, in clock ticks (`/proc/stat`).
fn busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is part of user)
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum())
}

/// Waits (up to 3 s) until the machine is idle: at most one tick of CPU time busy in a window of 100 ms, so the
/// kernel's deferred work after making or deleting netns (and anything else) does not run into timed samples.
/// Called after the netns of a block or a burst are made, which is also after the last ones were deleted.
fn settle() {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let Some(b0) = busy_ticks() else {
            break;
        };
        std::thread::sleep(Duration::from_millis(100));
        let Some(b1) = busy_ticks() else {
            break;
        };
        if b1.saturating_sub(b0) <= 1 {
            break;
        }
    }
}

/// Spawns `bin` inside the netns with `input` on stdin and waits; returns the elapsed time.
fn restore_in(netns: &str, bin: &str, input: &str) -> Result<Duration, String> {
    let f = std::fs::File::open(netns).map_err(|e| format!("open {netns}: {e}"))?;
    let fd = f.as_raw_fd();
    let start = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe and only changes the child's netns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn {bin}: {e}"))?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(input.as_bytes())
            .map_err(|e| format!("{bin} stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    let el = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{bin} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(el)
}

struct Setup {
    /// The plugin's `cni_agent_run_dir` (the kubeconfig, and the agent's socket when one runs).
    run_dir: PathBuf,
    plugin: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn backend_key(backend: BackendChoice) -> &'static str {
    match backend {
        BackendChoice::Legacy => "legacy",
        BackendChoice::Nft => "nft",
        BackendChoice::Nftables => "nftables",
        BackendChoice::Auto => "auto",
    }
}

fn backend_name(backend: BackendChoice) -> &'static str {
    match backend {
        BackendChoice::Legacy => "iptables-legacy",
        BackendChoice::Nft => "iptables-nft",
        BackendChoice::Nftables => "nftables (native)",
        BackendChoice::Auto => "auto",
    }
}

/// One plugin run, timed: wall time, the child's CPU time (user + system) and its minor page faults (the code
/// and data it paged in, which the machine's load does not change).
struct Timed {
    wall: Duration,
    cpu: Duration,
    faults: u64,
}

/// CPU time and minor page faults of this process's waited-for children so far.
fn children_usage() -> (Duration, u64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt as u64)
}

/// The plugin's whole environment: the CNI variables `env` and a PATH (as a runtime passes).
fn plugin_env(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .chain([(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )])
        .collect()
}

/// Runs the plugin with `env` and `stdin` and waits. The CPU time and faults are right only when no other child
/// of this process ends meanwhile (the sequential samples; not the burst).
fn run_plugin(plugin: &Path, env: &[(&str, String)], stdin: &[u8]) -> Result<Timed, String> {
    let (cpu0, faults0) = children_usage();
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .envs(plugin_env(env))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", plugin.display()))?;
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", plugin.display()))?;
    let wall = start.elapsed();
    let (cpu1, faults1) = children_usage();
    let (cpu, faults) = (cpu1.saturating_sub(cpu0), faults1.saturating_sub(faults0));
    if !out.status.success() {
        return Err(format!(
            "{} failed: {} {}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    warn_of_misses("ADD", &out.stderr);
    Ok(Timed { wall, cpu, faults })
}

/// Shows a plugin's warning that the agent's cache did not answer (the run then did its own GET), on stderr.
fn warn_of_misses(what: &str, stderr: &[u8]) {
    for l in String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains("not answered by the agent's cache"))
    {
        eprintln!("{what}: {l}");
    }
}

/// Why ADDs with the agent up did their own GET: the pods asked for and the agent's lists and watches meanwhile (a
/// new list means a broken watch: the cache was unsynced), and what the plugins and the agent said of it (the
/// plugins warn of every miss a healthy agent should not cause, and the agent re-logs their warnings).
fn explain_gets(log: &[meshcni_tests::apiserver::LoggedRequest], agent_log: &str) {
    use meshcni_tests::apiserver::RequestKind;
    let gets: Vec<String> = log
        .iter()
        .filter_map(|r| match &r.kind {
            RequestKind::PodGet { namespace, name } => Some(format!("{namespace}/{name}")),
            _ => None,
        })
        .collect();
    let lists = log
        .iter()
        .filter(|r| r.kind == RequestKind::PodList)
        .count();
    let watches = log
        .iter()
        .filter(|r| r.kind == RequestKind::PodWatch)
        .count();
    println!(
        "\nGETs with the agent up: {} ({}); meanwhile the agent listed the pods {lists} time(s), watched {watches} time(s)",
        gets.len(),
        gets.join(", ")
    );
    for l in agent_log
        .lines()
        .filter(|l| l.contains("not answered by the agent's cache") || l.contains("pod watch"))
        .take(20)
    {
        println!("  agent log: {l}");
    }
}

/// The targets missed so far, each with its numbers (printed at the end).
static MISSED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// Numbers worth showing that are no target (printed at the end).
static NOTES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note(what: String) {
    if let Ok(mut n) = NOTES.lock() {
        n.push(what);
    }
}

/// Remembers `what` when a target is not `met` (the bench's verdict is whether any was missed).
fn target(met: bool, what: impl FnOnce() -> String) {
    if !met {
        if let Ok(mut m) = MISSED.lock() {
            m.push(what());
        }
    }
}

/// Every ADD run so far (pod starts, for the API requests per pod start).
static ADDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One ADD's environment and stdin, ready to run.
struct AddCall {
    pod: String,
    env: Vec<(&'static str, String)>,
    stdin: Vec<u8>,
}

fn add_call(s: &Setup, backend: BackendChoice, pod: &str, netns: &str) -> Result<AddCall, String> {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": s.run_dir, "plugin_log_level": "warn",
        "iptables_backend": backend_key(backend),
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.2/16"}], "dns": {}}
    });
    let env = vec![
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", format!("bench{pod}")),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        (
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}"),
        ),
    ];
    let stdin = serde_json::to_vec(&conf).map_err(|e| e.to_string())?;
    Ok(AddCall {
        pod: pod.to_string(),
        env,
        stdin,
    })
}

fn run_add(s: &Setup, call: &AddCall) -> Result<Timed, String> {
    ADDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    run_plugin(&s.plugin, &call.env, &call.stdin).map_err(|e| format!("ADD {}: {e}", call.pod))
}

fn add(s: &Setup, backend: BackendChoice, pod: &str, netns: &str) -> Result<Timed, String> {
    run_add(s, &add_call(s, backend, pod, netns)?)
}

/// The plugin's `VERSION` call: its start-up and exit, nothing else.
fn version(s: &Setup) -> Result<Timed, String> {
    run_plugin(
        &s.plugin,
        &[("CNI_COMMAND", "VERSION".to_string())],
        br#"{"cniVersion":"1.0.0"}"#,
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn run(a: &Args) -> Result<(), String> {
    let plugin = a.bin_dir.join("istio-cni");
    if !plugin.is_file() {
        return Err(format!(
            "{} not found (cargo build --release --workspace --bins)",
            plugin.display()
        ));
    }
    let srv = std::sync::Arc::new(ApiServer::start().map_err(|e| e.to_string())?);
    let run_dir = std::env::temp_dir().join(format!("meshcni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
        .map_err(|e| e.to_string())?;
    let setup = Setup {
        run_dir,
        plugin: plugin.clone(),
    };
    let on_node = |mut p: serde_json::Value| {
        p["spec"]["nodeName"] = json!(meshcni_tests::agent::NODE);
        p
    };
    let injected = on_node(sample_pod("bench", "injected"));
    let rules = {
        // What the plugin makes of the API server's answer.
        let answer = injected.to_string();
        let pod = interpret(
            200,
            answer.as_bytes(),
            &PodRef::new("bench", "injected"),
            None,
        )
        .map_err(|e| format!("{e:?}"))?;
        let redirect = Redirect::from_pod(&pod).map_err(|e| e.to_string())?;
        render_iptables(&CaptureConfig::from_redirect(&redirect, false))
    };
    srv.add_pod(injected).map_err(|e| e.to_string())?;
    srv.add_pod(on_node(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": "bench", "uid": "plain-uid"},
                        "spec": {"containers": [{"name": "app"}]}})))
        .map_err(|e| e.to_string())?;
    for i in 0..a.burst {
        let mut p = on_node(sample_pod("bench", &format!("burst-{i}")));
        p["metadata"]["name"] = json!(format!("burst-{i}"));
        srv.add_pod(p).map_err(|e| e.to_string())?;
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut chart = Vec::new();

    // Without the agent: every pod start looks its pod up on the API server.
    println!("### Without the agent (the plugin's own API GET)\n");
    let adds = || ADDS.load(std::sync::atomic::Ordering::SeqCst);
    let (before, adds_before) = (srv.pod_gets(), adds());
    measure(&setup, a, cores, &rules.v4, "", &mut chart)?;
    let (gets_without, starts_without) = (srv.pod_gets() - before, adds() - adds_before);

    // With the agent's pod cache: the real node-agent against the same stub, its socket in the plugin's run dir.
    println!("\n### With the agent's pod cache (socket)\n");
    let node = meshcni_tests::agent::Node::new("bench", &srv);
    let mut agent = meshcni_tests::agent::Agent::start(&node, &srv);
    agent.wait_ready();
    agent.wait_synced();
    let with_agent = Setup {
        run_dir: node.run.clone(),
        plugin,
    };
    let (before, adds_before, log_before) = (srv.pod_gets(), adds(), srv.request_log().len());
    measure(&with_agent, a, cores, &rules.v4, " + socket", &mut chart)?;
    let (gets_with, starts_with) = (srv.pod_gets() - before, adds() - adds_before);
    if gets_with > 0 {
        explain_gets(&srv.request_log()[log_before..], &agent.log_text());
    }
    println!(
        "\nAPI requests (GETs of a pod) per pod start: without the agent {:.2} ({gets_without} for {starts_without} ADDs), with the agent's cache {:.2} ({gets_with} for {starts_with} ADDs, bursts included)",
        gets_without as f64 / starts_without as f64,
        gets_with as f64 / starts_with as f64
    );
    target(gets_with == 0, || {
        format!("API requests per pod start with the agent: {gets_with}, not 0")
    });

    // The agent with 1,000 pods in its cache: memory, and CPU while nothing happens.
    for i in 0..1000 {
        let mut p = on_node(sample_pod("fleet", &format!("pod-{i}")));
        p["metadata"]["name"] = json!(format!("pod-{i}"));
        p["metadata"]["uid"] = json!(format!("fleet-{i}"));
        srv.add_pod(p).map_err(|e| e.to_string())?;
    }
    agent.wait_cached("fleet", "pod-999", "fleet-999");
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = rss_kib(agent.pid())?;
    let cpu0 = proc_cpu(agent.pid())?;
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle);
    let cpu = proc_cpu(agent.pid())?.saturating_sub(cpu0);
    println!(
        "agent with 1,000 pods of its node in the cache: VmRSS {:.1} MB (VmHWM {:.1} MB); CPU while idle {:.2}% ({:?} in {idle:?})",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        100.0 * cpu.as_secs_f64() / idle.as_secs_f64(),
        cpu
    );
    target(rss <= 20 * 1024, || {
        format!(
            "agent RSS with 1,000 pods: {:.1} MB > 20 MB",
            rss as f64 / 1024.0
        )
    });
    agent.stop();

    println!(
        "\nsamples per measurement: {}; cores: {cores}; targets: without the agent native nftables ADD <= 1.0x the iptables-nft floor, non-injected <= 5 ms; with the socket iptables ADD <= 1.3x its floor and native <= 0.4x the iptables-nft floor (stretch 0.3x), non-injected <= 2 ms; 0 API requests per pod start with the agent; bursts 0 failures, with the socket within 1.3 x burst x median CPU / cores; agent RSS <= 20 MB",
        a.samples
    );
    if let Some(path) = &a.svg {
        std::fs::write(path, svg(&chart, a.samples))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64), String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU time of `pid` (all its threads).
fn proc_cpu(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// The measurements with one setup (with or without the agent): the non-injected ADD and VERSION next to the
/// iptables-nft floor, then per backend the injected ADD next to its floor and a burst. Prints the tables; adds
/// the bars (labels suffixed with `suffix`) to `chart`; records the targets missed ([`target`]).
fn measure(
    setup: &Setup,
    a: &Args,
    cores: usize,
    rules: &str,
    suffix: &str,
    chart: &mut Vec<Bar>,
) -> Result<(), String> {
    let with_socket = !suffix.is_empty();
    let (mut plain, mut ver, mut nft_floor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_faults, mut ver_faults) = (Vec::new(), Vec::new());
    let nss = sample_netns(a.samples)?;
    warm_up(setup, BackendChoice::Nft, rules, &nss[0])?;
    for (ns, ns_floor) in &nss[1..] {
        let t = add(setup, BackendChoice::Nft, "plain", &ns.path())?;
        plain.push(t.wall);
        plain_faults.push(t.faults);
        let t = version(setup)?;
        ver.push(t.wall);
        ver_faults.push(t.faults);
        nft_floor.push(restore_in(&ns_floor.path(), "iptables-nft-restore", rules)?);
    }
    drop(nss);
    let (p50, p90) = (percentile(&mut plain, 0.5), percentile(&mut plain, 0.9));
    let (v50, v90) = (percentile(&mut ver, 0.5), percentile(&mut ver, 0.9));
    let nf50 = percentile(&mut nft_floor, 0.5);
    println!(
        "| measurement | p50 (p90) | page faults p50 |\n|---|---|---|\n| ADD non-injected | {:.2} ms ({:.2}) | {} |\n| VERSION (start-up) | {:.2} ms ({:.2}) | {} |\n| iptables-nft floor | {:.2} ms | |\n",
        ms(p50), ms(p90), median(&mut plain_faults), ms(v50), ms(v90), median(&mut ver_faults), ms(nf50)
    );
    chart.push(Bar::new(
        &format!("non-injected ADD{suffix}"),
        &mut plain,
        None,
    ));
    if !with_socket {
        chart.push(Bar::new("VERSION", &mut ver, None));
    }
    let limit = if with_socket { 2.0 } else { 5.0 };
    target(ms(p50) <= limit, || {
        format!("non-injected ADD{suffix}: {:.2} ms > {limit} ms", ms(p50))
    });

    println!("| backend | ADD injected p50 (p90) | floor p50 (p90) | ratio p50 | ratio to iptables-nft floor | CPU p50 | page faults p50 | burst {} wall / bound / half done / failures |", a.burst);
    println!("|---|---|---|---|---|---|---|---|");
    for &backend in &a.backends {
        let restore = floor_restore(backend);
        let (mut inj, mut cpu, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        let mut faults = Vec::new();
        let nss = sample_netns(a.samples)?;
        warm_up(setup, backend, rules, &nss[0])?;
        for (ns, ns_floor) in &nss[1..] {
            let t = add(setup, backend, "injected", &ns.path())?;
            inj.push(t.wall);
            cpu.push(t.cpu);
            faults.push(t.faults);
            floor.push(restore_in(&ns_floor.path(), restore, rules)?);
        }
        drop(nss);
        let burst = burst(setup, backend, a.burst)?;
        let (i50, i90) = (percentile(&mut inj, 0.5), percentile(&mut inj, 0.9));
        let (f50, f90) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.9));
        let c50 = percentile(&mut cpu, 0.5);
        let ratio = ms(i50) / ms(f50);
        let ratio_nft = ms(i50) / ms(nf50);
        let bound = c50.mul_f64(1.3 * a.burst as f64 / cores as f64);
        println!(
            "| {} | {:.2} ms ({:.2}) | {:.2} ms ({:.2}) | {:.2}x | {:.2}x | {:.2} ms | {} | {:.0} ms / {:.0} ms / {:.0} ms / {} |",
            backend_name(backend), ms(i50), ms(i90), ms(f50), ms(f90), ratio, ratio_nft, ms(c50),
            median(&mut faults), ms(burst.wall), ms(bound), ms(burst.half), burst.failures
        );
        let floor_label = restore.trim_end_matches("-restore");
        chart.push(Bar::new(
            &format!("{} ADD{suffix}", backend_name(backend)),
            &mut inj,
            Some((format!("{floor_label} floor"), f50)),
        ));
        let name = backend_name(backend);
        target(burst.failures == 0, || {
            format!(
                "{name}{suffix}: {} of {} burst ADDs failed",
                burst.failures, a.burst
            )
        });
        match (backend, with_socket) {
            // Issue 2 asked ADD <= 1.3x the floor when every ADD did its own GET; issue 8 moved that target to the
            // ADD with the agent's socket (below). Without the agent it is the fallback's cost, shown, not judged.
            (BackendChoice::Legacy | BackendChoice::Nft | BackendChoice::Auto, false) => {
                note(format!(
                    "{name} with the plugin's own GET: ADD {ratio:.3}x its floor (issue 2's 1.3x, before the pod cache; the target is now with the socket)"
                ));
            }
            (_, _) => {
                // Native's own floor is an iptables-nft-restore measured interleaved with its samples: the
                // iptables-nft floor that drifted as they did (the first block's, `ratio_nft`, is shown beside it).
                let (got, limit, of) = match (backend, with_socket) {
                    (BackendChoice::Nftables, false) => (ratio, 1.0, "the iptables-nft floor"),
                    (BackendChoice::Nftables, true) => (ratio, 0.4, "the iptables-nft floor"),
                    _ => (ratio, 1.3, "its floor"),
                };
                target(got <= limit, || {
                    format!("{name}{suffix}: ADD {got:.3}x {of}, target <= {limit}x")
                });
                if backend == BackendChoice::Nftables && with_socket {
                    let reached = if got <= 0.3 { "reached" } else { "not reached" };
                    note(format!(
                        "{name}{suffix}: ADD {got:.3}x the iptables-nft floor, the 0.3x stretch {reached}"
                    ));
                }
            }
        }
        note(format!(
            "{name}{suffix}: CPU per ADD in the burst of {} {:.2} ms, alone {:.2} ms",
            a.burst,
            ms(burst.cpu_per_add),
            ms(c50)
        ));
        if with_socket {
            target(burst.wall <= bound, || {
                format!(
                    "{name}{suffix}: burst of {} took {:.1} ms, bound {:.1} ms",
                    a.burst,
                    ms(burst.wall),
                    ms(bound)
                )
            });
        }
    }
    Ok(())
}

/// One ADD and one floor restore in `nss`, not counted (page cache, kernel modules, the API stub's first TLS
/// session, a machine that was just idle).
fn warm_up(
    setup: &Setup,
    backend: BackendChoice,
    rules: &str,
    nss: &(BenchNetns, BenchNetns),
) -> Result<(), String> {
    add(setup, backend, "injected", &nss.0.path())?;
    restore_in(&nss.1.path(), floor_restore(backend), rules)?;
    Ok(())
}

/// The restore binary whose run is a backend's floor: legacy's for legacy, nft's for nft and native nftables.
fn floor_restore(backend: BackendChoice) -> &'static str {
    match backend {
        BackendChoice::Legacy => "iptables-legacy-restore",
        _ => "iptables-nft-restore",
    }
}

struct Burst {
    wall: Duration,
    /// When half of the ADDs had ended.
    half: Duration,
    failures: usize,
    /// The CPU time (user + system) of the burst's plugin processes, per ADD.
    cpu_per_add: Duration,
}

/// `n` ADDs at once, each its own pod and netns (all made before the clock starts). The plugin processes are
/// made ahead, each with its whole stdin in its pipe, and started together ([`Gated`]): the burst times the
/// plugins and the agent, not this harness spawning them. Timed from the release to the last exit.
fn burst(setup: &Setup, backend: BackendChoice, n: usize) -> Result<Burst, String> {
    let nss: Vec<BenchNetns> = (0..n)
        .map(|i| BenchNetns::new(3000 + i))
        .collect::<Result<_, _>>()?;
    let calls: Vec<AddCall> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| add_call(setup, backend, &format!("burst-{i}"), &ns.path()))
        .collect::<Result<_, _>>()?;
    let warm = BenchNetns::new(9002)?;
    settle();
    // Untimed, as before the samples: the burst starts on a machine as warm as theirs.
    add(setup, backend, "injected", &warm.path())?;
    let specs: Vec<Spec> = calls
        .iter()
        .map(|call| Spec {
            program: &setup.plugin,
            env: plugin_env(&call.env),
            stdin: &call.stdin,
        })
        .collect();
    let gated =
        Gated::prepare(&specs).map_err(|e| format!("burst: making {n} plugin processes: {e}"))?;
    ADDS.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    let (cpu0, _) = children_usage();
    let outcomes = gated
        .release()
        .map_err(|e| format!("burst: waiting for {n} plugin processes: {e}"))?;
    let (cpu1, _) = children_usage();
    drop(nss);
    let cpu_per_add = cpu1.saturating_sub(cpu0) / n.max(1) as u32;
    let mut took: Vec<Duration> = outcomes.iter().map(|o| o.took).collect();
    let wall = took.iter().max().copied().unwrap_or_default();
    let half = if took.is_empty() {
        Duration::ZERO
    } else {
        percentile(&mut took, 0.5)
    };
    let mut failures = 0;
    for (call, o) in calls.iter().zip(&outcomes).filter(|(_, o)| o.success()) {
        warn_of_misses(&format!("burst ADD {}", call.pod), &o.stderr);
    }
    for (call, o) in calls.iter().zip(&outcomes).filter(|(_, o)| !o.success()) {
        eprintln!(
            "burst failure ({}): ADD {}: wait status {:#x}: {} {}",
            backend_name(backend),
            call.pod,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        failures += 1;
    }
    Ok(Burst {
        wall,
        half,
        failures,
        cpu_per_add,
    })
}

/// One bar of the chart: p50 with a p10..p90 whisker, and the floor it is compared with, if any.
struct Bar {
    label: String,
    p10: f64,
    p50: f64,
    p90: f64,
    floor: Option<(String, f64)>,
}

impl Bar {
    fn new(label: &str, samples: &mut [Duration], floor: Option<(String, Duration)>) -> Bar {
        Bar {
            label: label.to_string(),
            p10: ms(percentile(samples, 0.1)),
            p50: ms(percentile(samples, 0.5)),
            p90: ms(percentile(samples, 0.9)),
            floor: floor.map(|(l, d)| (l, ms(d))),
        }
    }
}

/// A horizontal bar chart of the latencies (ms), the floors marked as red ticks on their bars.
fn svg(bars: &[Bar], samples: usize) -> String {
    let (left, width, row, top) = (190.0, 520.0, 34.0, 40.0);
    let max = bars
        .iter()
        .flat_map(|b| [b.p90, b.floor.as_ref().map_or(0.0, |f| f.1)])
        .fold(1.0_f64, f64::max)
        * 1.1;
    let x = |v: f64| left + v / max * width;
    let height = top + row * bars.len() as f64 + 50.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 60.0
    );
    let _ = writeln!(
        o,
        r#"<text x="10" y="20" font-size="14">istio-cni ADD latency, p50 with p10–p90 ({samples} samples each); red tick: floor</text>"#
    );
    for (i, b) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let _ = writeln!(o, r#"<text x="10" y="{:.1}">{}</text>"#, y + 16.0, b.label);
        let _ = writeln!(
            o,
            r##"<rect x="{left}" y="{:.1}" width="{:.1}" height="20" fill="#4a7ebb"/>"##,
            y + 2.0,
            x(b.p50) - left
        );
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
            x(b.p10),
            x(b.p90),
            y + 12.0,
            y + 12.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}">{:.2} ms</text>"#,
            x(b.p90) + 4.0,
            y + 16.0,
            b.p50
        );
        if let Some((label, f)) = &b.floor {
            let _ = writeln!(
                o,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="red" stroke-width="3"><title>{label}: {f:.2} ms</title></line>"#,
                x(*f),
                x(*f),
                y,
                y + 24.0
            );
        }
    }
    let axis_y = top + row * bars.len() as f64 + 10.0;
    let _ = writeln!(
        o,
        r#"<line x1="{left}" x2="{:.1}" y1="{axis_y}" y2="{axis_y}" stroke="black"/>"#,
        left + width
    );
    let step = if max > 20.0 {
        5.0
    } else if max > 8.0 {
        2.0
    } else {
        1.0
    };
    let mut t = 0.0;
    while t <= max {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            x(t),
            axis_y + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">ms</text></svg>"#,
        left + width / 2.0,
        axis_y + 34.0
    );
    o
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshcni-bench: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("meshcni-bench: needs root (it creates network namespaces)");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => {
            for n in NOTES.lock().map(|n| n.clone()).unwrap_or_default() {
                println!("not a target: {n}");
            }
            let missed = MISSED.lock().map(|m| m.clone()).unwrap_or_default();
            if missed.is_empty() {
                return ExitCode::SUCCESS;
            }
            println!("some targets were missed:");
            for m in missed {
                println!("- {m}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("meshcni-bench: {e}");
            ExitCode::from(2)
        }
    }
}
