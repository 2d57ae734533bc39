//! `meshcni-runtime`: a container runtime's CNI calls in miniature, for the demo and scripts. Picks the primary
//! network configuration of a conf dir as kubelet/containerd do (the first `.conf`/`.conflist`/`.json` by name that
//! parses; a single-plugin `.conf` is wrapped into a list), runs it for one pod (ADD in order, CHECK, DEL in reverse,
//! with the cached result), and prints the result JSON on stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use meshcni_tests::chain::{Attachment, Runtime};
use serde_json::{json, Value};

const HELP: &str = "\
meshcni-runtime: run a node's CNI configuration for one pod, as a container runtime does (demo/testing tool)

USAGE:
    meshcni-runtime (add|check|del) --conf-dir DIR --cni-path DIR[:DIR..] --netns PATH --container-id ID
                    --pod NAMESPACE/NAME [--node-netns PATH] [--result FILE]

    --result FILE   add: write the result there; check/del: read the cached result from there (if it exists)
    --node-netns P  run every plugin process inside this netns (the node's)
";

/// kubelet's choice: files sorted by name, the first that is valid JSON with a name and at least one plugin.
pub fn primary_conf(dir: &Path) -> Result<(PathBuf, Value), String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read(&f) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let list = if v.get("plugins").is_some() {
            v
        } else if v.get("type").is_some() {
            json!({"cniVersion": v.get("cniVersion").cloned().unwrap_or(json!("0.2.0")),
                   "name": v.get("name").cloned().unwrap_or(Value::Null), "plugins": [v]})
        } else {
            continue;
        };
        let ok = list
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
            && list
                .get("plugins")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
        if ok {
            return Ok((f, list));
        }
    }
    Err(format!(
        "no valid network configuration in {}",
        dir.display()
    ))
}

fn run() -> Result<(), String> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or("missing command")?;
    if cmd == "-h" || cmd == "--help" {
        print!("{HELP}");
        return Ok(());
    }
    let (mut conf_dir, mut cni_path, mut netns, mut cid, mut pod, mut node, mut result) =
        (None, None, None, None, None, None, None);
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--conf-dir" => conf_dir = Some(PathBuf::from(v)),
            "--cni-path" => cni_path = Some(v),
            "--netns" => netns = Some(v),
            "--container-id" => cid = Some(v),
            "--pod" => pod = Some(v),
            "--node-netns" => node = Some(PathBuf::from(v)),
            "--result" => result = Some(PathBuf::from(v)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let conf_dir = conf_dir.ok_or("--conf-dir is required")?;
    let (file, conflist) = primary_conf(&conf_dir)?;
    eprintln!("meshcni-runtime: using {}", file.display());
    let (ns, name) = pod
        .as_deref()
        .and_then(|p| p.split_once('/'))
        .ok_or("--pod NAMESPACE/NAME is required")?;
    let runtime = Runtime {
        conflist,
        cni_path: std::env::split_paths(&cni_path.ok_or("--cni-path is required")?).collect(),
        node_netns: node,
    };
    let att = Attachment {
        container_id: cid.ok_or("--container-id is required")?,
        netns: netns.unwrap_or_default(),
        ifname: "eth0".into(),
        cni_args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
    };
    let cached = || -> Option<Value> {
        let p = result.as_ref()?;
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    match cmd.as_str() {
        "add" => {
            let r = runtime.add(&att).map_err(|e| e.to_string())?;
            if let Some(p) = &result {
                std::fs::write(p, r.to_string())
                    .map_err(|e| format!("write {}: {e}", p.display()))?;
            }
            println!("{r}");
        }
        "check" => {
            let r = cached().ok_or("check needs --result with the cached ADD result")?;
            runtime.check(&att, &r).map_err(|e| e.to_string())?;
        }
        "del" => runtime
            .del(&att, cached().as_ref())
            .map_err(|e| e.to_string())?,
        other => return Err(format!("unknown command {other:?} (add|check|del)")),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshcni-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
