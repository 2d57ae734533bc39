//! `LD_PRELOAD` shims of the fault tests, built on first use with the toolchain's `rustc` (a single file each,
//! no crate, no dependency) into `<target>/meshcni-preload/`, next to the binaries under test. They only wrap what
//! the dynamically linked debug build of `istio-cni` calls through glibc; the shipped static build is never
//! preloaded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::chain::target_bin;

/// `tests/preload/nft_refuse_last.rs`: every nf_tables batch whose last message is a rule gets that rule's chain
/// renamed, so the kernel refuses the batch's last message (see the file).
pub fn nft_refuse_last() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| build("nft_refuse_last"))
}

/// The `rustc` of the toolchain that runs the tests: `$RUSTC`, else the one beside `$CARGO` (cargo sets it for
/// the tests it runs), else the first on PATH.
fn rustc() -> PathBuf {
    if let Some(r) = std::env::var_os("RUSTC") {
        return r.into();
    }
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|c| Some(c.parent()?.join("rustc")))
        .filter(|r| r.is_file())
        .unwrap_or_else(|| "rustc".into())
}

fn build(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("preload")
        .join(format!("{name}.rs"));
    let plugin = target_bin("istio-cni");
    let dir = plugin
        .parent()
        .unwrap_or(Path::new("."))
        .join("meshcni-preload");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    // Built under a name of this process, then renamed into place: two test processes building at once never
    // write the same file, and a process loading the shim never sees a half-written one.
    let out = dir.join(format!("lib{name}.so"));
    let tmp = dir.join(format!("lib{name}.so.{}.tmp", std::process::id()));
    let rustc = rustc();
    let status = Command::new(&rustc)
        .args(["--edition", "2021", "--crate-type", "cdylib", "-O", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", rustc.display()));
    assert!(
        status.success(),
        "{} {}: {status}",
        rustc.display(),
        src.display()
    );
    std::fs::rename(&tmp, &out)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), out.display()));
    out
}
