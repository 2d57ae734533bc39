//! Two real `node-agent`s on one temp node, as in a rolling update whose new pod starts before the old one is gone:
//! an upgrade (another plugin binary, another entry), where without an owner each agent would rewrite the other's
//! files forever; the older one's SIGTERM deciding to uninstall while the newer one runs; and the newer one dying,
//! after which the older one takes the installation back.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_millis(2);
const NEW_PLUGIN: &[u8] = b"#!/bin/sh\n# the upgraded istio-cni plugin\nexit 0\n";

fn calico(node: &Node) -> PathBuf {
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist")
}

/// The image of the next version: its own source dir with another plugin binary.
fn new_image(node: &Node) -> PathBuf {
    let src = node.root.join("image-v2/opt/cni/bin");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("istio-cni"), NEW_PLUGIN).unwrap();
    fs::set_permissions(src.join("istio-cni"), fs::Permissions::from_mode(0o755)).unwrap();
    src
}

fn log_level_of_entry(path: &Path) -> Option<String> {
    let v = read_json(path);
    v["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == "istio-cni")
        .and_then(|p| p["plugin_log_level"].as_str().map(String::from))
}

/// (inode, mtime) of each file we write: a rewrite changes them.
fn stamps(paths: &[&Path]) -> Vec<(u64, i64, i64)> {
    paths
        .iter()
        .map(|p| {
            let md = fs::metadata(p).unwrap();
            (md.ino(), md.mtime(), md.mtime_nsec())
        })
        .collect()
}

fn owner_record(node: &Node) -> Value {
    read_json(&node.run.join("agent.owner"))
}

/// The old version runs; the new one starts beside it with another binary and another entry (LOG_LEVEL). The newer
/// one's files win and stay: no loop. The old one's SIGTERM (an uninstall here: DAEMONSET_NAME is empty) removes
/// none of them. Without the owner record the two would rewrite binary and entry after each other forever.
#[test]
fn an_upgrade_overlap_has_one_owner_no_rewrite_loop_and_the_old_one_removes_nothing() {
    let node = Node::new("upgrade");
    let path = calico(&node);
    let src_v2 = new_image(&node);
    let mut old = Agent::start_named(
        &node,
        &[("LOG_LEVEL", "info"), ("POD_NAME", "istio-cni-node-old")],
        "old",
    );
    old.wait_ready();
    assert_eq!(fs::read(node.plugin()).unwrap(), PLUGIN_BYTES);
    assert_eq!(log_level_of_entry(&path).as_deref(), Some("info"));
    assert_eq!(owner_record(&node)["pod"], "istio-cni-node-old");

    let src = src_v2.display().to_string();
    let mut new = Agent::start_named(
        &node,
        &[
            ("LOG_LEVEL", "debug"),
            ("POD_NAME", "istio-cni-node-new"),
            ("CNI_BINARIES_SOURCE_DIR", src.as_str()),
        ],
        "new",
    );
    new.wait_ready();
    assert_eq!(owner_record(&node)["pod"], "istio-cni-node-new");
    old.expect("the old agent to step back", WAIT, || {
        (old.ready() == Some(false)).then_some(())
    });
    assert_eq!(fs::read(node.plugin()).unwrap(), NEW_PLUGIN);
    assert_eq!(log_level_of_entry(&path).as_deref(), Some("debug"));
    // No loop: nothing of ours is rewritten for a while, by either.
    let files = [path.as_path(), &node.plugin(), &node.kubeconfig()];
    let before = stamps(&files);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        stamps(&files),
        before,
        "files rewritten while both agents run; old log:\n{}\nnew log:\n{}",
        old.log_text(),
        new.log_text()
    );
    assert_eq!(entries(&read_json(&path)), 1);
    let status = http_get(old.health, "/readyz").unwrap();
    assert_eq!(status.0, 503, "{status:?}");
    assert!(
        old.log_text()
            .contains("a newer agent on this node owns the installation")
            && old.log_text().contains("istio-cni-node-new"),
        "{}",
        old.log_text()
    );
    // The primary rewrites its file: only the owner puts the entry back (its own, once).
    fs::copy(corpus("install-e2e/pre/calico.conflist"), &path).unwrap();
    wait_for("the entry back", WAIT, STEP, || {
        has_entry_last(&path).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(log_level_of_entry(&path).as_deref(), Some("debug"));

    // The old one goes (decided: uninstall) while the new one runs: the new one's files stay untouched.
    let before = stamps(&files);
    assert!(old.stop(libc::SIGTERM).success());
    assert_eq!(
        stamps(&files),
        before,
        "the old agent touched the new one's files; its log:\n{}",
        old.log_text()
    );
    assert!(old.log_text().contains("nothing of it is removed"));
    assert_eq!(fs::read(node.plugin()).unwrap(), NEW_PLUGIN);
    assert_eq!(owner_record(&node)["pod"], "istio-cni-node-new");
    new.wait_ready();
    node.assert_no_temp_files();

    // The new one's own uninstall removes everything, its owner record included.
    assert!(new.stop(libc::SIGTERM).success());
    assert!(!node.plugin().exists() && !node.kubeconfig().exists());
    assert_eq!(entries(&read_json(&path)), 0);
    assert!(!node.run.join("agent.owner").exists());
}

/// The newer agent dies without a word (SIGKILL): its lock goes with it, and the older one, still running, takes the
/// installation back at once, with its own content. A newer agent started after that owns it again.
#[test]
fn the_older_agent_takes_over_when_the_newer_one_dies() {
    let node = Node::new("takeover");
    let path = calico(&node);
    let src_v2 = new_image(&node);
    let mut old = Agent::start_named(&node, &[("POD_NAME", "istio-cni-node-old")], "old");
    old.wait_ready();
    let src = src_v2.display().to_string();
    let mut new = Agent::start_named(
        &node,
        &[
            ("POD_NAME", "istio-cni-node-new"),
            ("CNI_BINARIES_SOURCE_DIR", src.as_str()),
        ],
        "new",
    );
    new.wait_ready();
    assert_eq!(fs::read(node.plugin()).unwrap(), NEW_PLUGIN);
    old.expect("the old agent to step back", WAIT, || {
        (old.ready() == Some(false)).then_some(())
    });

    new.signal(libc::SIGKILL);
    let _ = new.child.wait();
    // Its owner record stays, but nobody holds it: the old agent takes over and restores its own binary.
    old.expect("the old agent to take over", Duration::from_secs(3), || {
        (fs::read(node.plugin()).ok().as_deref() == Some(PLUGIN_BYTES) && old.ready() == Some(true))
            .then_some(())
    });
    assert!(
        old.log_text()
            .contains("the agent that owned this node is gone: taking the installation over"),
        "{}",
        old.log_text()
    );
    assert_eq!(owner_record(&node)["pod"], "istio-cni-node-old");
    assert!(has_entry_last(&path));

    // Another newer agent (the DaemonSet's replacement) owns it again; the old one's uninstall removes nothing.
    let mut again = Agent::start_named(
        &node,
        &[
            ("POD_NAME", "istio-cni-node-new2"),
            ("CNI_BINARIES_SOURCE_DIR", src.as_str()),
        ],
        "again",
    );
    again.wait_ready();
    assert!(old.stop(libc::SIGTERM).success());
    assert_eq!(fs::read(node.plugin()).unwrap(), NEW_PLUGIN);
    assert!(has_entry_last(&path) && node.kubeconfig().exists());
    assert!(again.stop(libc::SIGTERM).success());
    assert!(!node.plugin().exists());
}
