//! `meshcni-test-apiserver`: the test API server stub as a process, for the demo (simulated node) and scripts.
//! Serves the pods of a directory of Pod JSON files, writes a kubeconfig for itself, prints its port, runs until
//! SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use meshcni_tests::apiserver::ApiServer;
use nix::sys::signal::{SigSet, Signal};

const HELP: &str = "\
meshcni-test-apiserver: an HTTPS Kubernetes API server stub serving Pod JSON (for tests and the demo only)

USAGE:
    meshcni-test-apiserver --pods-dir DIR --kubeconfig PATH [OPTIONS]

REQUIRED:
    --pods-dir DIR       serve GET /api/v1/namespaces/NS/pods/NAME from the *.json files of DIR, one Pod object
                         per file (keyed by metadata.namespace and metadata.name), re-read on every request
    --kubeconfig PATH    write a kubeconfig for this server there (server https://127.0.0.1:PORT, the CA as
                         certificate-authority-data, the bearer token; mode 0600)

OPTIONS:
    --port N             listen on 127.0.0.1:N (default 0: any free port)
    --token TOKEN        the bearer token to require (default: random)
    --ca-file PATH       also write the CA certificate (PEM) there
    --port-file PATH     also write the port there, once the kubeconfig is written
    --netns PATH         create the listening socket inside this network namespace (e.g. /run/netns/node); the
                         server is then reachable on that netns's 127.0.0.1 only, whose lo must be up
    -h, --help           print this help

Once serving, prints the port on stdout (one line), then runs until SIGTERM or SIGINT and exits 0.
Also serves GET /api/v1/namespaces/NS and GET /version; every /api request needs the bearer token.
Lists and watches pods as a node agent's watcher asks: GET /api/v1/pods?fieldSelector=spec.nodeName=NODE (limit,
continue), and with watch=true&resourceVersion=RV a stream of ADDED/MODIFIED/DELETED events, one JSON line each,
until timeoutSeconds. A file added to, changed in or removed from --pods-dir is a watch event within 100 ms.
";

#[derive(Debug, Default)]
struct Args {
    pods_dir: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    port: u16,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    port_file: Option<PathBuf>,
    netns: Option<PathBuf>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(Parsed::Help);
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pods-dir" => a.pods_dir = Some(value()?.into()),
            "--kubeconfig" => a.kubeconfig = Some(value()?.into()),
            "--port" => {
                let v = value()?;
                a.port = v
                    .parse()
                    .map_err(|e| format!("--port {v:?} is not a port number: {e}"))?;
            }
            "--token" => a.token = Some(value()?),
            "--ca-file" => a.ca_file = Some(value()?.into()),
            "--port-file" => a.port_file = Some(value()?.into()),
            "--netns" => a.netns = Some(value()?.into()),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if a.pods_dir.is_none() {
        return Err("--pods-dir is required (see --help)".into());
    }
    if a.kubeconfig.is_none() {
        return Err("--kubeconfig is required (see --help)".into());
    }
    Ok(Parsed::Run(a))
}

fn run(a: Args) -> Result<(), String> {
    let (Some(pods_dir), Some(kubeconfig)) = (a.pods_dir, a.kubeconfig) else {
        return Err("--pods-dir and --kubeconfig are required".into());
    };
    // Fail at start on an unreadable dir or a bad file rather than on the first request.
    let pods = meshcni_tests::apiserver::read_pod_dir(&pods_dir).map_err(|e| e.to_string())?;

    // Block the signals before any thread starts (threads inherit the mask), then wait for them synchronously.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block()
        .map_err(|e| format!("blocking SIGTERM/SIGINT: {e}"))?;

    let mut b = ApiServer::builder().port(a.port).pod_dir(&pods_dir);
    if let Some(t) = a.token {
        b = b.token(t);
    }
    if let Some(ns) = a.netns {
        b = b.netns(ns);
    }
    let server = b.start().map_err(|e| e.to_string())?;
    server
        .write_kubeconfig(&kubeconfig)
        .map_err(|e| e.to_string())?;
    if let Some(p) = &a.ca_file {
        server.write_ca(p).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &a.port_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", server.port()))
            .and_then(|()| std::fs::rename(&tmp, p))
            .map_err(|e| format!("writing port file {}: {e}", p.display()))?;
    }
    eprintln!(
        "meshcni-test-apiserver: serving {} pod(s) of {} on {} (kubeconfig {})",
        pods.len(),
        pods_dir.display(),
        server.url(),
        kubeconfig.display()
    );
    println!("{}", server.port());
    use std::io::Write;
    std::io::stdout()
        .flush()
        .map_err(|e| format!("writing the port to stdout: {e}"))?;

    let sig = sigs
        .wait()
        .map_err(|e| format!("waiting for SIGTERM/SIGINT: {e}"))?;
    eprintln!(
        "meshcni-test-apiserver: {sig:?}, stopping after {} request(s)",
        server.total_requests()
    );
    server.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(Parsed::Help) => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(a)) => match run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshcni-test-apiserver: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("meshcni-test-apiserver: {e}");
            ExitCode::from(2)
        }
    }
}
