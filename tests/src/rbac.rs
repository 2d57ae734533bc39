//! What the API server's RBAC authorizer sees of a request, and what the rendered manifests grant our service
//! account: for the test that runs every code path talking to the API and compares the calls with the rules.
//!
//! - [`ApiCall::of`]: a request (method, path, query) as Kubernetes' request-info resolver reads it: verb (`get`,
//!   `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`), API group, resource,
//!   subresource, namespace, name. A path that names no resource (`/version`) is a non-resource URL.
//! - [`Grants::of`]: the rules bound to one service account in a set of manifests: ClusterRoles through
//!   ClusterRoleBindings (everywhere), Roles and ClusterRoles through RoleBindings (in the binding's namespace),
//!   with `resourceNames` and `*` as RBAC reads them.
//! - [`render`]: the manifests of `daemonset/` with components, rendered by `scripts/kustomize-subset.py` (which
//!   `scripts/validate-manifests.sh` checks against `kubectl kustomize` wherever one is new enough).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// One API request, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiCall {
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    pub resource: String,
    /// `""` when none.
    pub subresource: String,
    /// `""` for a cluster-scoped resource or a request across namespaces.
    pub namespace: String,
    /// `""` for a collection.
    pub name: String,
}

impl fmt::Display for ApiCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        match (self.namespace.as_str(), self.name.as_str()) {
            ("", "") => write!(f, " (all namespaces)"),
            ("", n) => write!(f, " {n}"),
            (ns, "") => write!(f, " in {ns}"),
            (ns, n) => write!(f, " {ns}/{n}"),
        }
    }
}

impl ApiCall {
    /// The request as RBAC sees it; `Err` with the path for a non-resource URL.
    pub fn of(method: &str, path: &str, query: &str) -> Result<ApiCall, String> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
            _ => return Err(path.to_string()),
        };
        let (namespace, rest): (&str, &[&str]) = match rest {
            // A namespace itself: its name is also its namespace, as the request-info resolver has it.
            ["namespaces", ns] => (ns, &["namespaces", ns][..]),
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns, rest),
            rest => ("", rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, "", ""),
            [resource, name] => (*resource, *name, ""),
            [resource, name, sub] => (*resource, *name, *sub),
            _ => return Err(path.to_string()),
        };
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match (method, name.is_empty()) {
            ("GET" | "HEAD", _) if watch => "watch",
            ("GET" | "HEAD", true) => "list",
            ("GET" | "HEAD", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "deletecollection",
            ("DELETE", false) => "delete",
            (other, _) => return Err(format!("{other} {path}")),
        };
        Ok(ApiCall {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// One rule of a role, where its binding makes it apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `ClusterRole/name via ClusterRoleBinding/name`, for messages.
    pub source: String,
    /// `None`: every namespace (a ClusterRoleBinding); `Some(ns)`: a RoleBinding's namespace.
    pub namespace: Option<String>,
    pub verbs: Vec<String>,
    pub groups: Vec<String>,
    /// `resource` or `resource/subresource`.
    pub resources: Vec<String>,
    /// Empty: any name.
    pub names: Vec<String>,
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl Grant {
    pub fn allows(&self, call: &ApiCall) -> bool {
        let resource = if call.subresource.is_empty() {
            call.resource.clone()
        } else {
            format!("{}/{}", call.resource, call.subresource)
        };
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == call.namespace)
            && matches(&self.verbs, &call.verb)
            && matches(&self.groups, &call.group)
            && matches(&self.resources, &resource)
            && (self.names.is_empty() || self.names.contains(&call.name))
    }

    /// Every (verb, group, resource) this rule grants, as one-verb, one-group, one-resource grants: each must be
    /// used by some call for the rule to hold nothing unused.
    pub fn atoms(&self) -> Vec<Grant> {
        let mut out = Vec::new();
        for verb in &self.verbs {
            for group in &self.groups {
                for resource in &self.resources {
                    out.push(Grant {
                        source: self.source.clone(),
                        namespace: self.namespace.clone(),
                        verbs: vec![verb.clone()],
                        groups: vec![group.clone()],
                        resources: vec![resource.clone()],
                        names: self.names.clone(),
                    });
                }
            }
        }
        out
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<&str> = self
            .groups
            .iter()
            .map(|g| if g.is_empty() { "core" } else { g.as_str() })
            .collect();
        write!(
            f,
            "{} {}/{}",
            self.verbs.join(","),
            groups.join(","),
            self.resources.join(",")
        )?;
        if !self.names.is_empty() {
            write!(f, " named {}", self.names.join(","))?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in {ns}")?,
            None => write!(f, " everywhere")?,
        }
        write!(f, " ({})", self.source)
    }
}

/// Everything bound to one service account.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub grants: Vec<Grant>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn meta<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj["metadata"][key].as_str().unwrap_or("")
}

impl Grants {
    /// The rules bound to the service account `namespace/name` by the bindings among `objects`. A binding whose
    /// role is missing is an error (it would grant nothing on a cluster, silently).
    pub fn of(objects: &[Value], namespace: &str, name: &str) -> Result<Grants, String> {
        let mut grants = Vec::new();
        for binding in objects {
            let kind = binding["kind"].as_str().unwrap_or("");
            if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
                continue;
            }
            let ours = binding["subjects"].as_array().is_some_and(|subjects| {
                subjects.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == name
                        && s["namespace"]
                            .as_str()
                            .unwrap_or(meta(binding, "namespace"))
                            == namespace
                })
            });
            if !ours {
                continue;
            }
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or("");
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or("");
            let scope = (kind == "RoleBinding").then(|| meta(binding, "namespace").to_string());
            let role = objects.iter().find(|o| {
                o["kind"] == role_kind
                    && meta(o, "name") == role_name
                    && (role_kind == "ClusterRole"
                        || Some(meta(o, "namespace")) == scope.as_deref())
            });
            let Some(role) = role else {
                return Err(format!(
                    "{kind}/{} refers to {role_kind}/{role_name}, which the manifests do not hold",
                    meta(binding, "name")
                ));
            };
            let source = format!(
                "{role_kind}/{role_name} via {kind}/{}",
                meta(binding, "name")
            );
            for rule in role["rules"].as_array().into_iter().flatten() {
                if rule.get("nonResourceURLs").is_some() {
                    return Err(format!("{source}: nonResourceURLs rules are not checked"));
                }
                grants.push(Grant {
                    source: source.clone(),
                    namespace: scope.clone(),
                    verbs: strings(&rule["verbs"]),
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    names: strings(&rule["resourceNames"]),
                });
            }
        }
        Ok(Grants { grants })
    }

    pub fn allows(&self, call: &ApiCall) -> bool {
        self.grants.iter().any(|g| g.allows(call))
    }

    /// The granted atoms (see [`Grant::atoms`]) no call in `calls` uses.
    pub fn unused<'a>(&self, calls: impl IntoIterator<Item = &'a ApiCall> + Clone) -> Vec<Grant> {
        self.grants
            .iter()
            .flat_map(Grant::atoms)
            .filter(|atom| !calls.clone().into_iter().any(|c| atom.allows(c)))
            .collect()
    }
}

/// The repository's root (this crate is `tests/` in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The variants of `daemonset/`: the base (`None`) and each of its `components/repair-*`.
pub fn variants() -> Vec<Option<String>> {
    let dir = repo_root().join("daemonset/components");
    let mut components: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with("repair-"))
                .collect()
        })
        .unwrap_or_default();
    components.sort();
    std::iter::once(None)
        .chain(components.into_iter().map(Some))
        .collect()
}

/// The objects of `daemonset/` with `component` (`None`: the base), rendered by `scripts/kustomize-subset.py`
/// through an overlay in `work` (a dir of the caller's), as JSON values. Needs python3 with PyYAML (as
/// `scripts/validate-manifests.sh` does; `bash scripts/ci-deps.sh` installs it).
pub fn render(component: Option<&str>, work: &Path) -> Result<Vec<Value>, String> {
    let root = repo_root();
    let overlay = work.join(format!("overlay-{}", component.unwrap_or("base")));
    std::fs::create_dir_all(&overlay).map_err(|e| format!("{}: {e}", overlay.display()))?;
    let base = root.join("daemonset");
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\n",
        base.display()
    );
    if let Some(c) = component {
        kustomization.push_str(&format!(
            "components: [{}]\n",
            base.join("components").join(c).display()
        ));
    }
    let file = overlay.join("kustomization.yaml");
    std::fs::write(&file, kustomization).map_err(|e| format!("{}: {e}", file.display()))?;
    let script = format!(
        "import json, subprocess, sys, yaml\n\
         out = subprocess.run([sys.executable, {:?}, {:?}], check=True, capture_output=True, text=True).stdout\n\
         print(json.dumps([d for d in yaml.safe_load_all(out) if d]))\n",
        root.join("scripts/kustomize-subset.py").display().to_string(),
        overlay.display().to_string(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("python3: {e} (bash scripts/ci-deps.sh installs what this needs)"))?;
    if !out.status.success() {
        return Err(format!(
            "rendering {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("rendered manifests: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(method: &str, path: &str, query: &str) -> String {
        ApiCall::of(method, path, query)
            .map(|c| c.to_string())
            .unwrap_or_else(|p| format!("non-resource {p}"))
    }

    #[test]
    fn requests_read_as_rbac_reads_them() {
        for (method, path, query, want) in [
            (
                "GET",
                "/api/v1/namespaces/default/pods/web-0",
                "",
                "get core/pods default/web-0",
            ),
            (
                "GET",
                "/api/v1/pods",
                "fieldSelector=spec.nodeName%3Dn&limit=500",
                "list core/pods (all namespaces)",
            ),
            (
                "GET",
                "/api/v1/pods",
                "watch=true&resourceVersion=7",
                "watch core/pods (all namespaces)",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/default/pods/web-0",
                "",
                "delete core/pods default/web-0",
            ),
            (
                "PATCH",
                "/api/v1/namespaces/d/pods/p/status",
                "",
                "patch core/pods/status d/p",
            ),
            (
                "POST",
                "/api/v1/namespaces/d/events",
                "",
                "create core/events in d",
            ),
            (
                "GET",
                "/apis/apps/v1/namespaces/kube-system/daemonsets/istio-cni-node",
                "",
                "get apps/daemonsets kube-system/istio-cni-node",
            ),
            (
                "GET",
                "/api/v1/namespaces/kube-system",
                "",
                "get core/namespaces kube-system/kube-system",
            ),
            ("GET", "/api/v1/nodes/node-1", "", "get core/nodes node-1"),
            (
                "DELETE",
                "/api/v1/namespaces/d/pods",
                "",
                "deletecollection core/pods in d",
            ),
            ("GET", "/version", "", "non-resource /version"),
        ] {
            assert_eq!(call(method, path, query), want, "{method} {path}?{query}");
        }
    }

    fn objects() -> Vec<Value> {
        let sa =
            json!([{"kind": "ServiceAccount", "name": "istio-cni", "namespace": "kube-system"}]);
        vec![
            json!({"kind": "ClusterRole", "metadata": {"name": "read"},
                   "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "read"}, "subjects": sa,
                   "roleRef": {"kind": "ClusterRole", "name": "read"}}),
            json!({"kind": "Role", "metadata": {"name": "own-ds", "namespace": "kube-system"},
                   "rules": [{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"],
                              "resourceNames": ["istio-cni-node"]}]}),
            json!({"kind": "RoleBinding", "metadata": {"name": "own-ds", "namespace": "kube-system"}, "subjects": sa,
                   "roleRef": {"kind": "Role", "name": "own-ds"}}),
            // Bound to someone else: not ours.
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "other"},
                   "subjects": [{"kind": "ServiceAccount", "name": "other", "namespace": "kube-system"}],
                   "roleRef": {"kind": "ClusterRole", "name": "all"}}),
        ]
    }

    #[test]
    fn grants_follow_bindings_scopes_and_names() {
        let g = Grants::of(&objects(), "kube-system", "istio-cni").unwrap();
        let c = |m, p| ApiCall::of(m, p, "").unwrap();
        assert!(g.allows(&c("GET", "/api/v1/namespaces/x/pods/p")));
        assert!(!g.allows(&c("DELETE", "/api/v1/namespaces/x/pods/p")));
        assert!(
            !g.allows(&c("PATCH", "/api/v1/namespaces/x/pods/p/status")),
            "a subresource is its own"
        );
        let own = c(
            "GET",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/istio-cni-node",
        );
        assert!(g.allows(&own));
        assert!(!g.allows(&c(
            "GET",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/other"
        )));
        assert!(!g.allows(&c(
            "GET",
            "/apis/apps/v1/namespaces/default/daemonsets/istio-cni-node"
        )));
        let used = [c("GET", "/api/v1/namespaces/x/pods/p"), own];
        let unused: Vec<String> = g
            .unused(used.iter())
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            unused,
            vec!["list core/pods everywhere (ClusterRole/read via ClusterRoleBinding/read)"]
        );
        let mut broken = objects();
        broken.remove(2);
        assert!(Grants::of(&broken, "kube-system", "istio-cni")
            .unwrap_err()
            .contains("Role/own-ds"));
    }
}
