//! `meshcni-bench`: ADD latency of the real `istio-cni` binary against the floor measured in the same run.
//!
//! Per sample a fresh pod netns (with an address, as after the primary CNI) is made outside the timed part. Timed:
//! - ADD, injected pod: the whole plugin process (API lookup over HTTPS, decision, rules in the netns);
//! - ADD, non-injected pod: the plugin process that looks the pod up and passes it through;
//! - floor: one `iptables-restore --noflush` per family of the same rules into a fresh netns, spawned the same way.
//!
//! Then a burst of concurrent ADDs (each its own pod and netns): wall time, slowest, failures.
//! Run it through `scripts/bench-add.sh` (release build, root). Touches only netns it creates.

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
use meshcni_tests::chain::Invocation;
use serde_json::json;

const HELP: &str = "\
meshcni-bench: ADD latency of istio-cni vs. the iptables-restore floor (root; creates its own netns only)

OPTIONS:
    --samples N      samples per measurement (default 40)
    --burst N        concurrent ADDs in the burst (default 50)
    --backend B      legacy, nft or both (default both)
    --bin-dir DIR    where istio-cni is (default: this binary's directory)
    -h, --help       this help
";

struct Args {
    samples: usize,
    burst: usize,
    backends: Vec<BackendChoice>,
    bin_dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        samples: 40,
        burst: 50,
        backends: vec![BackendChoice::Nft, BackendChoice::Legacy],
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
            "--backend" => {
                a.backends = match val()?.as_str() {
                    "legacy" => vec![BackendChoice::Legacy],
                    "nft" => vec![BackendChoice::Nft],
                    "both" => vec![BackendChoice::Nft, BackendChoice::Legacy],
                    other => {
                        return Err(format!("--backend {other:?}: expected legacy, nft or both"))
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
    srv: ApiServer,
    run_dir: PathBuf,
    plugin: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn add(s: &Setup, backend: BackendChoice, pod: &str, netns: &str) -> Result<Duration, String> {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "cni_agent_run_dir": s.run_dir, "plugin_log_level": "warn",
        "iptables_backend": match backend { BackendChoice::Legacy => "legacy", _ => "nft" },
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.2/16"}], "dns": {}}
    });
    let inv = Invocation::new(&s.plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("bench{pod}"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}"),
        )
        .stdin(serde_json::to_vec(&conf).map_err(|e| e.to_string())?);
    let start = Instant::now();
    let out = inv.run_with_timeout(Duration::from_secs(60));
    let el = start.elapsed();
    if !out.success {
        return Err(format!("ADD {pod} failed: {} {}", out.stdout, out.stderr));
    }
    Ok(el)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn measure(
    n: usize,
    mut f: impl FnMut(usize) -> Result<Duration, String>,
) -> Result<Vec<Duration>, String> {
    (0..n).map(&mut f).collect()
}

fn run(a: &Args) -> Result<bool, String> {
    let plugin = a.bin_dir.join("istio-cni");
    if !plugin.is_file() {
        return Err(format!(
            "{} not found (cargo build --release --workspace --bins)",
            plugin.display()
        ));
    }
    let srv = ApiServer::start().map_err(|e| e.to_string())?;
    let run_dir = std::env::temp_dir().join(format!("meshcni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
        .map_err(|e| e.to_string())?;
    let setup = Setup {
        srv,
        run_dir,
        plugin,
    };
    let injected = sample_pod("bench", "injected");
    let rules = {
        // What the plugin makes of the API server's answer.
        let answer = injected.to_string();
        let pod = interpret(200, answer.as_bytes(), &PodRef::new("bench", "injected"))
            .map_err(|e| format!("{e:?}"))?;
        let redirect = Redirect::from_pod(&pod).map_err(|e| e.to_string())?;
        render_iptables(&CaptureConfig::from_redirect(&redirect, false))
    };
    setup.srv.add_pod(injected).map_err(|e| e.to_string())?;
    setup
        .srv
        .add_pod(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": "bench"},
                        "spec": {"containers": [{"name": "app"}]}}))
        .map_err(|e| e.to_string())?;
    for i in 0..a.burst {
        let mut p = sample_pod("bench", &format!("burst-{i}"));
        p["metadata"]["name"] = json!(format!("burst-{i}"));
        setup.srv.add_pod(p).map_err(|e| e.to_string())?;
    }

    let mut ok = true;
    println!("| backend | ADD injected p50 (p90) | floor p50 (p90) | ratio p50 | ADD non-injected p50 (p90) | burst {} wall / slowest / failures |", a.burst);
    println!("|---|---|---|---|---|---|");
    for &backend in &a.backends {
        let (restore, name) = match backend {
            BackendChoice::Legacy => ("iptables-legacy-restore", "iptables-legacy"),
            _ => ("iptables-nft-restore", "iptables-nft"),
        };
        // Warm-up (page cache, kernel modules), not counted.
        {
            let ns = BenchNetns::new(9000)?;
            add(&setup, backend, "injected", &ns.path())?;
            let ns2 = BenchNetns::new(9001)?;
            restore_in(&ns2.path(), restore, &rules.v4)?;
        }
        // Interleave the three measurements so drift affects them alike.
        let (mut inj, mut floor, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        measure(a.samples, |i| {
            let ns = BenchNetns::new(i)?;
            inj.push(add(&setup, backend, "injected", &ns.path())?);
            let ns = BenchNetns::new(i + 1000)?;
            floor.push(restore_in(&ns.path(), restore, &rules.v4)?);
            let ns = BenchNetns::new(i + 2000)?;
            plain.push(add(&setup, backend, "plain", &ns.path())?);
            Ok(Duration::ZERO)
        })?;
        // Burst: all netns first, then every ADD at once.
        let nss: Vec<BenchNetns> = (0..a.burst)
            .map(|i| BenchNetns::new(3000 + i))
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        let results: Vec<Result<Duration, String>> = std::thread::scope(|sc| {
            let hs: Vec<_> = nss
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    let setup = &setup;
                    sc.spawn(move || add(setup, backend, &format!("burst-{i}"), &ns.path()))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("burst thread panicked".into()))
                })
                .collect()
        });
        let wall = start.elapsed();
        drop(nss);
        let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        let slowest = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max()
            .copied()
            .unwrap_or_default();
        for f in &failures {
            eprintln!("burst failure: {f}");
        }
        let (i50, i90) = (percentile(&mut inj, 0.5), percentile(&mut inj, 0.9));
        let (f50, f90) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.9));
        let (p50, p90) = (percentile(&mut plain, 0.5), percentile(&mut plain, 0.9));
        let ratio = ms(i50) / ms(f50);
        println!(
            "| {name} | {:.2} ms ({:.2}) | {:.2} ms ({:.2}) | {:.2}x | {:.2} ms ({:.2}) | {:.0} ms / {:.0} ms / {} |",
            ms(i50), ms(i90), ms(f50), ms(f90), ratio, ms(p50), ms(p90), ms(wall), ms(slowest), failures.len()
        );
        ok &= ratio <= 1.3 && ms(p50) <= 5.0 && failures.is_empty();
    }
    println!("\nsamples per measurement: {}; targets: ADD <= 1.3x floor, non-injected <= 5 ms, burst 0 failures", a.samples);
    Ok(ok)
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("some targets were missed");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("meshcni-bench: {e}");
            ExitCode::from(2)
        }
    }
}
