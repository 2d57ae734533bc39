//! What the agent writes on the host, with the real binary against a temp node: symlinks planted at the names it
//! writes (the primary conflist, the plugin binary, the kubeconfig, its sockets) and at the temp names it used to
//! draw predictably, pointing at files in another temp dir, are replaced, never followed: every outside file keeps
//! its content and mode, every target ends up a regular file (a socket for the sockets) of the right mode. A FIFO
//! planted as a config file or as the kubeconfig cannot hang it. `CNI_CONF_NAME` must be a plain file name.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{corpus, has_entry_last, Agent, Node, AGENT, PLUGIN_BYTES};
use meshcni_tests::netns::require_root;

const WAIT: Duration = Duration::from_secs(10);

/// A temp dir outside the node's tree, holding the files the planted symlinks point at; removed on drop.
struct Outside {
    dir: PathBuf,
}

impl Outside {
    fn new(tag: &str) -> Outside {
        let dir =
            std::env::temp_dir().join(format!("meshcni-outside-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Outside { dir }
    }

    /// A file with `content` and `mode`.
    fn file(&self, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// Every file's (content, mode, inode), to compare before and after.
    fn snapshot(&self) -> BTreeMap<String, (Vec<u8>, u32, u64)> {
        fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let md = fs::symlink_metadata(e.path()).unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (
                    name,
                    (fs::read(e.path()).unwrap(), md.mode() & 0o7777, md.ino()),
                )
            })
            .collect()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Replaces whatever is at `link` by a symlink to `to`.
fn plant(link: &Path, to: &Path) {
    let _ = fs::remove_file(link);
    symlink(to, link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

/// Asserts `path` is itself (lstat) a regular file with `mode`, the agent's (root's).
#[track_caller]
fn assert_regular(path: &Path, mode: u32) {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        md.file_type().is_file(),
        "{} is not a regular file: {:?}",
        path.display(),
        md.file_type()
    );
    assert_eq!(md.mode() & 0o7777, mode, "{}", path.display());
    assert_eq!((md.uid(), md.gid()), (0, 0), "{}", path.display());
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// The temp names an agent with `pid` drew before they had a random part: `<name>.tmp.<pid>.<n>` for the files,
/// `.<name>.<pid>.tmp` for the sockets. Symlinks to one outside file each are planted there.
fn plant_predictable_temps(node: &Node, outside: &Outside, pid: i32, upto: u32) -> Vec<PathBuf> {
    let mut planted = Vec::new();
    for (dir, name) in [
        (&node.conf, "10-calico.conflist"),
        (&node.bin, "istio-cni"),
        (&node.run, "istio-cni-kubeconfig"),
    ] {
        let victim = outside.dir.join(format!("temp-victim-{name}"));
        for n in 0..upto {
            let link = dir.join(format!("{name}.tmp.{pid}.{n}"));
            plant(&link, &victim);
            planted.push(link);
        }
    }
    for sock in ["log.sock", "status.sock", "pod-cache.sock"] {
        let link = node.run.join(format!(".{sock}.{pid}.tmp"));
        plant(&link, &outside.dir.join(format!("temp-victim-{sock}")));
        planted.push(link);
    }
    planted
}

#[test]
fn planted_symlinks_are_replaced_never_followed() {
    // Files of another owner are planted outside.
    require_root();
    let mut node = Node::new("symlinks");
    let outside = Outside::new("symlinks");
    let calico = node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    fs::create_dir_all(&node.run).unwrap();

    // What the agent writes on this node, to plant outside copies it would find "already right" through a link.
    let (want_conf, want_kubeconfig) = {
        let mut agent = Agent::start(&node, &[]);
        agent.wait_ready();
        let got = (
            fs::read(&calico).unwrap(),
            fs::read(node.kubeconfig()).unwrap(),
        );
        assert!(agent.stop(libc::SIGTERM).success());
        got
    };
    let victims = [
        // An odd mode and owner: the replacing file must not copy them from the link's target.
        ("conf", want_conf.as_slice(), 0o666),
        ("kubeconfig", want_kubeconfig.as_slice(), 0o600),
        ("istio-cni", PLUGIN_BYTES, 0o755),
        ("log.sock", b"not a socket".as_slice(), 0o644),
        ("status.sock", b"not a socket".as_slice(), 0o644),
    ];
    for (name, content, mode) in victims {
        outside.file(name, content, mode);
    }
    std::os::unix::fs::chown(outside.dir.join("conf"), Some(4321), Some(4321)).unwrap();
    for name in ["10-calico.conflist", "istio-cni", "istio-cni-kubeconfig"] {
        outside.file(&format!("temp-victim-{name}"), b"temp victim", 0o644);
    }
    for sock in ["log.sock", "status.sock", "pod-cache.sock"] {
        outside.file(&format!("temp-victim-{sock}"), b"temp victim", 0o644);
    }
    // The primary itself, the binary, the kubeconfig and the sockets: links to outside files holding exactly what
    // the agent wants there (a link followed would look "already installed").
    plant(&calico, &outside.dir.join("conf"));
    plant(&node.plugin(), &outside.dir.join("istio-cni"));
    plant(&node.kubeconfig(), &outside.dir.join("kubeconfig"));
    plant(&node.run.join("log.sock"), &outside.dir.join("log.sock"));
    plant(
        &node.run.join("status.sock"),
        &outside.dir.join("status.sock"),
    );
    // A FIFO named like a configuration, sorting first: never read (it would block), never the primary.
    mkfifo(&node.conf.join("00-fifo.conflist"));
    let before = outside.snapshot();

    let mut agent = Agent::start_paused(&node, &[], "paused");
    let pid = agent.pid();
    let mut planted = plant_predictable_temps(&node, &outside, pid, 64);
    agent.resume();
    agent.wait_ready();
    // Installed over the links: files of their own, the outside ones untouched.
    let installed = |node: &Node| {
        assert_eq!(
            outside.snapshot(),
            before,
            "a file outside the node was changed"
        );
        assert_regular(&calico, 0o644);
        assert!(has_entry_last(&calico));
        assert_regular(&node.plugin(), 0o755);
        assert_regular(&node.kubeconfig(), 0o600);
    };
    installed(&node);
    // A crashed run's temp names are cleaned at start (they may be ours): plant them again for the rewrites.
    planted.extend(plant_predictable_temps(&node, &outside, pid, 256));
    planted.sort();
    planted.dedup();
    // Make it write each file again: a rotated token, the primary rewritten without our entry, the binary changed.
    let ca = fs::read(corpus("install/kube-ca.crt")).unwrap();
    node.project_sa("eyJhbGciOiJSUzI1NiJ9.hygiene-rotated.sig", &ca);
    fs::write(
        &calico,
        fs::read(corpus("install-e2e/pre/calico.conflist")).unwrap(),
    )
    .unwrap();
    fs::write(node.plugin(), b"tampered").unwrap();
    agent.expect("every file rewritten", WAIT, || {
        let kc = fs::read_to_string(node.kubeconfig()).ok()?;
        (kc.contains("hygiene-rotated")
            && has_entry_last(&calico)
            && fs::read(node.plugin()).ok()? == PLUGIN_BYTES)
            .then_some(())
    });
    agent.wait_ready();
    installed(&node);
    for sock in ["log.sock", "status.sock"] {
        let md = fs::symlink_metadata(node.run.join(sock)).unwrap();
        assert!(md.file_type().is_socket(), "{sock}: {:?}", md.file_type());
        assert_eq!(md.mode() & 0o777, 0o600, "{sock}");
    }
    assert!(fs::symlink_metadata(node.conf.join("00-fifo.conflist"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Nothing of the agent's own is left behind: the only temp names are the planted ones (each still a link).
    let mut left: Vec<PathBuf> = [&node.conf, &node.bin, &node.run]
        .into_iter()
        .flat_map(|d| {
            fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains(".tmp") || name.contains(".bind.")
        })
        .collect();
    left.sort();
    assert_eq!(left, planted, "temp files the agent left");
    assert!(left
        .iter()
        .all(|p| fs::symlink_metadata(p).unwrap().file_type().is_symlink()));

    assert!(agent.stop(libc::SIGTERM).success(), "{}", agent.log_text());
    assert_eq!(
        outside.snapshot(),
        before,
        "the cleanup changed a file outside"
    );
    assert!(!has_entry_last(&calico));
    assert_regular(&calico, 0o644);
}

#[test]
fn standalone_file_and_a_fifo_kubeconfig() {
    let node = Node::new("standalone-links");
    let outside = Outside::new("standalone-links");
    fs::create_dir_all(&node.run).unwrap();
    let standalone = node.conf.join("YYY-istio-cni.conf");
    let env = [("CHAINED_CNI_PLUGIN", "false")];
    let want = {
        let mut agent = Agent::start(&node, &env);
        agent.wait_ready();
        let got = fs::read(&standalone).unwrap();
        assert!(agent.stop(libc::SIGTERM).success());
        got
    };
    outside.file("standalone", &want, 0o600);
    plant(&standalone, &outside.dir.join("standalone"));
    // A FIFO where the kubeconfig goes: reading it would block forever.
    mkfifo(&node.kubeconfig());
    let before = outside.snapshot();
    let mut agent = Agent::start(&node, &env);
    agent.wait_ready();
    assert_eq!(outside.snapshot(), before);
    assert_regular(&standalone, 0o600);
    assert_eq!(fs::read(&standalone).unwrap(), want);
    assert_regular(&node.kubeconfig(), 0o600);
    assert!(agent.stop(libc::SIGTERM).success());
    assert_eq!(outside.snapshot(), before);
    assert!(!standalone.exists() && !node.kubeconfig().exists());
}

#[test]
fn cni_conf_name_must_be_a_plain_file_name() {
    let node = Node::new("confname");
    node.put("10-calico.conflist", "install-e2e/pre/calico.conflist");
    let pre = fs::read(node.conf.join("10-calico.conflist")).unwrap();
    let escape = format!(
        "../../{}/10-calico.conflist",
        node.conf.strip_prefix(&node.root).unwrap().display()
    );
    for chained in ["true", "false"] {
        for value in [
            "../x.conflist",
            "/etc/passwd",
            "a/b",
            "..",
            ".",
            "./10-calico.conflist",
            escape.as_str(),
        ] {
            let out = std::process::Command::new(AGENT)
                .env_clear()
                .envs(node.env(0, 0))
                .env("CHAINED_CNI_PLUGIN", chained)
                .env("CNI_CONF_NAME", value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
            assert!(
                stderr.contains("CNI_CONF_NAME") && stderr.contains(&format!("{value:?}")),
                "{value} not named: {stderr}"
            );
            assert!(stderr.contains("not a path"), "{value}: {stderr}");
        }
    }
    // Nothing was written anywhere.
    assert_eq!(fs::read_dir(&node.conf).unwrap().count(), 1);
    assert_eq!(fs::read(node.conf.join("10-calico.conflist")).unwrap(), pre);
    assert!(!node.plugin().exists() && !node.kubeconfig().exists());
}

/// The kubeconfig holds the token: a mode that lets others read it (or a group change it) stops the agent at start.
/// (0600 and 0640 work: `settings_reach_the_entry` in agent_behaviour.rs runs with 0640.)
#[test]
fn kubeconfig_mode_must_keep_the_token_from_others() {
    let node = Node::new("kcmode");
    for mode in ["0644", "0660", "0606", "0601", "0777"] {
        let out = std::process::Command::new(AGENT)
            .env_clear()
            .envs(node.env(0, 0))
            .env("KUBECONFIG_MODE", mode)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{mode}: {stderr}");
        assert!(
            stderr.contains(&format!("KUBECONFIG_MODE=\"{mode}\"")) && stderr.contains("token"),
            "{mode}: {stderr}"
        );
    }
    assert!(!node.kubeconfig().exists());
}
