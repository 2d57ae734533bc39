//! The agent works with exactly the capabilities its DaemonSet grants, and needs the one every variant keeps:
//! for the base and each repair component, the real agent runs as root with its bounding set cut down to the
//! rendered DaemonSet's `capabilities.add` (what the container runtime leaves a container that drops ALL), on a
//! node whose CNI dirs and primary conflist belong to another user (a primary CNI that does not run as root).
//! It installs, is ready and cleans up; its effective set is the manifest's. Without DAC_OVERRIDE the same node
//! defeats it: that capability is what lets root write into directories it does not own.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{has_entry_last, Agent, Node};
use meshcni_tests::netns::require_root;
use meshcni_tests::rbac;

/// Linux capability numbers (linux/capability.h) of the names the manifests use.
const CAPS: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("NET_BIND_SERVICE", 10),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_ADMIN", 21),
];

fn cap_number(name: &str) -> u32 {
    CAPS.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("capability {name} is not in this test's table"))
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The agent's CapEff (a bit mask), from /proc.
fn effective(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// A node whose CNI conf, bin and run dirs and primary conflist belong to uid/gid 4321 (mode 0755 / 0644): root
/// without DAC_OVERRIDE may read them but not write into the dirs.
fn foreign_node(tag: &str) -> Node {
    let node = Node::new(tag);
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    std::fs::create_dir_all(&node.run).unwrap();
    for dir in [&node.conf, &node.bin, &node.run] {
        std::os::unix::fs::chown(dir, Some(4321), Some(4321)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let primary = node.conf.join("10-calico.conflist");
    std::os::unix::fs::chown(&primary, Some(4321), Some(4321)).unwrap();
    std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o644)).unwrap();
    node
}

/// Starts the agent on `node` with only the capabilities `keep` left in its bounding set (root's permitted and
/// effective sets after exec are the bounding set), and no_new_privs when `no_new_privs` (the manifest's
/// `allowPrivilegeEscalation: false`).
fn start_bounded(node: &Node, keep: &[u32], no_new_privs: bool, name: &str) -> Agent {
    let drop: Vec<u32> = (0..=last_cap()).filter(|c| !keep.contains(c)).collect();
    // prctl(2) is async-signal-safe: the child only drops privileges before exec.
    let hook = move || {
        for &cap in &drop {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: as above.
        if no_new_privs && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    Agent::start_with_hook(node, name, Box::new(hook))
}

#[test]
fn the_manifests_capabilities_are_enough_and_dac_override_is_needed() {
    require_root();
    let work = std::env::temp_dir().join(format!("meshcni-caps-render-{}", std::process::id()));
    let variants = rbac::variants();
    assert!(variants.len() > 1, "no repair components found");
    for component in variants {
        let variant = component.as_deref().unwrap_or("base");
        let objects =
            rbac::render(component.as_deref(), &work).unwrap_or_else(|e| panic!("{variant}: {e}"));
        let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{variant}"
        );
        let names: Vec<String> = sc["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let keep: Vec<u32> = names.iter().map(|n| cap_number(n)).collect();
        let nnp = sc["allowPrivilegeEscalation"] == false;
        let node = foreign_node(&format!("caps-{variant}"));
        let mut agent = start_bounded(&node, &keep, nnp, variant);
        let ready = agent.ready_within(Duration::from_secs(15));
        assert_eq!(
            ready,
            Ok(true),
            "{variant}: not ready with {names:?}; log:\n{}",
            agent.log_text()
        );
        let want: u64 = keep.iter().map(|c| 1u64 << c).sum();
        assert_eq!(
            effective(agent.child.id()),
            want,
            "{variant}: the agent's CapEff is not {names:?}"
        );
        let nnp_now = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
            .unwrap()
            .contains("NoNewPrivs:\t1");
        assert_eq!(nnp_now, nnp, "{variant}: no_new_privs");
        assert!(has_entry_last(&node.conf.join("10-calico.conflist")));
        assert!(node.plugin().is_file() && node.kubeconfig().is_file());
        let status = agent.stop(libc::SIGTERM);
        assert!(
            status.success(),
            "{variant}: {status}; log:\n{}",
            agent.log_text()
        );
        assert!(!has_entry_last(&node.conf.join("10-calico.conflist")));
        assert!(!node.plugin().exists() && !node.kubeconfig().exists());

        // The control: the same node without DAC_OVERRIDE.
        let node = foreign_node(&format!("caps-{variant}-no-dac"));
        let fewer: Vec<u32> = keep
            .iter()
            .copied()
            .filter(|c| *c != cap_number("DAC_OVERRIDE"))
            .collect();
        let mut agent = start_bounded(&node, &fewer, nnp, &format!("{variant}-no-dac"));
        // It stops at start (its sockets cannot be bound in the run dir), or installs nothing.
        let ready = agent.ready_within(Duration::from_secs(2));
        assert_ne!(
            ready,
            Ok(true),
            "{variant}: ready without DAC_OVERRIDE: the capability would be unused"
        );
        let log = agent.log_text();
        assert!(log.contains("Permission denied"), "{variant}: {log}");
        assert!(!node.plugin().exists() && !has_entry_last(&node.conf.join("10-calico.conflist")));
        if ready.is_ok() {
            agent.stop(libc::SIGTERM);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
