//! Where Istio's compatibility corpus (`shared/compat/istio`: goldens, capture cases, install fixtures) is, for the
//! tests of every crate of the workspace. One rule everywhere: `$MESHCNI_COMPAT_DIR` when set (the `istio`
//! directory itself or its parent), otherwise the first `shared/compat/istio` found walking up from this crate.
//! Not finding it is a failure, never a skip. Test support only: nothing in the plugin or the agent reads it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable that points at the corpus.
pub const ENV: &str = "MESHCNI_COMPAT_DIR";

/// A file at the root of the `istio` directory, telling it from its parent.
const MARKER: &str = "capture-cases.json";

/// The corpus directory per `env` (the value of [`ENV`], if set) and, without it, walking up from `start`.
pub fn locate(env: Option<OsString>, start: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return [dir.clone(), dir.join("istio")]
            .into_iter()
            .find(|c| c.join(MARKER).is_file())
            .ok_or_else(|| {
                format!(
                    "{ENV}={} holds neither {MARKER} nor istio/{MARKER}",
                    dir.display()
                )
            });
    }
    start
        .ancestors()
        .map(|a| a.join("shared/compat/istio"))
        .find(|c| c.join(MARKER).is_file())
        .ok_or_else(|| {
            format!(
                "Istio compat corpus not found: no shared/compat/istio/{MARKER} above {}; set {ENV}",
                start.display()
            )
        })
}

/// The corpus directory. Panics (failing the test) when it cannot be found.
pub fn istio_dir() -> PathBuf {
    locate(std::env::var_os(ENV), Path::new(env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A path inside the corpus (`rel` such as `install/istio-cni.conf`). Panics when it does not exist.
pub fn path(rel: &str) -> PathBuf {
    let p = istio_dir().join(rel);
    assert!(p.exists(), "missing Istio corpus file {}", p.display());
    p
}

/// The bytes of a corpus file. Panics when it cannot be read.
pub fn read(rel: &str) -> Vec<u8> {
    let p = path(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The pod of one case of `plugin/cases.json`, as Istio's plugin test builds it: containers test, istio-proxy and
/// istio-validate, the case's annotations, proxy env and proxy uid/gid. Panics on a field it does not understand
/// (a new corpus must not be half read).
pub fn plugin_case_pod(case: &serde_json::Value) -> crate::pod::PodInfo {
    let strings = |key: &str| -> std::collections::BTreeMap<String, String> {
        match case.get(key) {
            None => Default::default(),
            Some(v) => v
                .as_object()
                .unwrap_or_else(|| panic!("plugin case: {key} is not an object"))
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .unwrap_or_else(|| panic!("plugin case: {key}.{k} is not a string"));
                    (k.clone(), v.to_string())
                })
                .collect(),
        }
    };
    let id = |key: &str| {
        case.get(key).map(|v| {
            v.as_i64()
                .unwrap_or_else(|| panic!("plugin case: {key} is not an integer"))
        })
    };
    let fields = case
        .as_object()
        .unwrap_or_else(|| panic!("plugin case is not an object"));
    for key in fields.keys() {
        assert!(
            [
                "name",
                "annotations",
                "proxy_env",
                "run_as_user",
                "run_as_group",
                "golden"
            ]
            .contains(&key.as_str()),
            "plugin case field {key:?} is not understood"
        );
    }
    crate::pod::PodInfo {
        containers: ["test", "istio-proxy", "istio-validate"]
            .into_iter()
            .map(String::from)
            .collect(),
        annotations: strings("annotations"),
        proxy_env: strings("proxy_env"),
        proxy_uid: id("run_as_user"),
        proxy_gid: id("run_as_group"),
        ..Default::default()
    }
}

/// The case named `name` of `plugin/cases.json`, as a pod ([`plugin_case_pod`]).
pub fn plugin_case_pod_named(name: &str) -> crate::pod::PodInfo {
    let path = path("plugin/cases.json");
    let cases: serde_json::Value = serde_json::from_slice(&read("plugin/cases.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let case = cases["cases"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no plugin case {name:?} in {}", path.display()));
    plugin_case_pod(case)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_the_istio_dir_or_its_parent_and_must_hold_the_corpus() {
        let found = istio_dir();
        assert!(found.join(MARKER).is_file());
        let nowhere = Path::new("/nonexistent");
        assert_eq!(
            locate(Some(found.clone().into()), nowhere),
            Ok(found.clone())
        );
        let parent = found.parent().expect("parent").to_path_buf();
        assert_eq!(locate(Some(parent.into()), nowhere), Ok(found.clone()));
        let e = locate(
            Some("/nonexistent/x".into()),
            Path::new(env!("CARGO_MANIFEST_DIR")),
        )
        .unwrap_err();
        assert!(e.contains(ENV) && e.contains("/nonexistent/x"), "{e}");
        let e = locate(None, nowhere).unwrap_err();
        assert!(e.contains("/nonexistent") && e.contains(ENV), "{e}");
        // An empty value counts as unset.
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(locate(Some(OsString::new()), here), locate(None, here));
    }
}
