//! Shared harness of the end-to-end tests of the real binaries: one test's "cluster" (the HTTPS API stub and
//! the agent's run dir the plugin reads its kubeconfig from) and a runner that checks every case (backend,
//! flavour, family...) and fails naming each one that failed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::apiserver::ApiServer;
use crate::netns::require_root;

/// The API stub and the agent's run dir holding `istio-cni-kubeconfig` (removed on drop).
#[derive(Debug)]
pub struct StubCluster {
    pub srv: ApiServer,
    pub run_dir: PathBuf,
}

impl Drop for StubCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

static N: AtomicUsize = AtomicUsize::new(0);

impl StubCluster {
    /// A started API stub and a fresh run dir `meshcni-e2e-<pid>-<n>-<tag>` in the temp dir.
    pub fn new(tag: &str) -> StubCluster {
        require_root();
        let srv = ApiServer::start().expect("start the API stub");
        let run_dir = std::env::temp_dir().join(format!(
            "meshcni-e2e-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&run_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", run_dir.display()));
        let cluster = StubCluster { srv, run_dir };
        let kubeconfig = cluster.run_dir.join("istio-cni-kubeconfig");
        cluster
            .srv
            .write_kubeconfig(&kubeconfig)
            .unwrap_or_else(|e| panic!("write {}: {e}", kubeconfig.display()));
        cluster
    }
}

/// Runs `check` for every case. All run (a failure in one does not hide another's result); then it panics
/// naming every case that failed (`label`) with its message. Fixtures are dropped while unwinding.
pub fn for_each_case<T>(
    cases: impl IntoIterator<Item = T>,
    label: impl Fn(&T) -> String,
    mut check: impl FnMut(T),
) {
    let mut failed = Vec::new();
    for case in cases {
        let name = label(&case);
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| check(case))) {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            failed.push(format!("{name}: {msg}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
