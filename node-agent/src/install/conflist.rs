//! The CNI network configuration: our entry, inserting it into (and removing it from) the primary conflist, and
//! choosing the primary file as kubelet and Istio do. Pure: bytes and values in, bytes and values out.

use cni_plugin::config::PluginEntry;
use serde_json::{json, Map, Value};

use super::gojson;

/// `type` and `name` of our entry.
pub const PLUGIN_TYPE: &str = "istio-cni";
/// The `cniVersion` Istio writes (standalone file, and the list made from a single-plugin `.conf`).
pub const CNI_VERSION: &str = "0.3.1";
/// Name of the list Istio makes from a single-plugin `.conf`.
pub const CONVERTED_LIST_NAME: &str = "k8s-pod-network";
/// File written in standalone mode when `CNI_CONF_NAME` is not set.
pub const DEFAULT_STANDALONE_NAME: &str = "YYY-istio-cni.conf";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConflistError {
    #[error("{file}: not valid JSON: {reason}")]
    Json { file: String, reason: String },
    #[error("{file}: a CNI configuration must be a JSON object, found {found}")]
    NotAnObject { file: String, found: &'static str },
    #[error("{file}: \"plugins\" must be a list of objects, found {found}")]
    Plugins { file: String, found: String },
    #[error("{file}: is itself an istio-cni configuration (a standalone file?), not a primary network to chain after")]
    OursAlone { file: String },
}

/// The settings our entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySettings {
    pub plugin_log_level: String,
    pub cni_agent_run_dir: String,
    pub exclude_namespaces: Vec<String>,
    pub pod_namespace: String,
    pub native_nftables: bool,
}

impl EntrySettings {
    /// Our entry in the plugin's own schema, as Istio's installer fills it; `cni_version` only for the standalone
    /// file (Istio drops it inside a list). Every field is named here, none left to a default.
    pub fn plugin_entry(&self, cni_version: Option<&str>) -> PluginEntry {
        PluginEntry {
            cni_version: cni_version.map(str::to_string),
            name: Some(PLUGIN_TYPE.to_string()),
            plugin_type: PLUGIN_TYPE.to_string(),
            ipam: Some(json!({})),
            dns: Some(json!({})),
            plugin_log_level: Some(self.plugin_log_level.clone()),
            cni_agent_run_dir: Some(self.cni_agent_run_dir.clone()),
            ambient_enabled: Some(false),
            enablement_selectors: Some(json!([])),
            // Istio writes a nil slice (`null`) when no namespace is excluded.
            exclude_namespaces: (!self.exclude_namespaces.is_empty())
                .then(|| self.exclude_namespaces.clone()),
            pod_namespace: Some(self.pod_namespace.clone()),
            native_nftables: Some(self.native_nftables),
            enable_ambient_detection_retry: Some(false),
            log_level: None,
            kubernetes: None,
            iptables_backend: None,
            pod_lookup_timeout_seconds: None,
        }
    }

    /// Our entry as it appears inside a list.
    pub fn entry(&self) -> Value {
        object(self.plugin_entry(None).fields())
    }

    /// The whole file written in standalone mode (`CHAINED_CNI_PLUGIN=false`), byte-identical to Istio's: the
    /// struct's keys in its order, as Go writes a struct.
    pub fn standalone_file(&self) -> Vec<u8> {
        gojson::render_ordered(&self.plugin_entry(Some(CNI_VERSION)).fields())
    }

    /// The standalone file as a JSON value (for comparing with what is on disk).
    pub fn standalone_value(&self) -> Value {
        object(self.plugin_entry(Some(CNI_VERSION)).fields())
    }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Parses a CNI configuration file's bytes; `file` names it in errors.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Value, ConflistError> {
    serde_json::from_slice(bytes).map_err(|e| ConflistError::Json {
        file: file.to_string(),
        reason: e.to_string(),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The plugin list of a conflist (every element an object), or why not.
fn plugins<'a>(file: &str, map: &'a Map<String, Value>) -> Result<&'a Vec<Value>, ConflistError> {
    match map.get("plugins") {
        Some(Value::Array(list)) => {
            if let Some(bad) = list.iter().find(|p| !p.is_object()) {
                return Err(ConflistError::Plugins {
                    file: file.to_string(),
                    found: format!("an element that is {}", kind(bad)),
                });
            }
            Ok(list)
        }
        Some(other) => Err(ConflistError::Plugins {
            file: file.to_string(),
            found: kind(other).to_string(),
        }),
        None => Err(ConflistError::Plugins {
            file: file.to_string(),
            found: "no \"plugins\" key".to_string(),
        }),
    }
}

/// What the primary configuration must become: a single-plugin configuration (it has `type`) becomes a list of
/// itself (without its `cniVersion`) and our entry, named `k8s-pod-network`, version 0.3.1; a list keeps everything
/// but its previous `istio-cni` entries, and gets our entry appended last.
///
/// A single-plugin configuration that is itself an `istio-cni` entry is refused: chaining after it would run the
/// plugin twice, a second insert would change the list again, and removing ours would leave a list of no plugin.
pub fn insert_entry(file: &str, existing: &Value, entry: &Value) -> Result<Value, ConflistError> {
    let map = existing
        .as_object()
        .ok_or_else(|| ConflistError::NotAnObject {
            file: file.to_string(),
            found: kind(existing),
        })?;
    if map.contains_key("type") {
        if is_ours(existing) {
            return Err(ConflistError::OursAlone {
                file: file.to_string(),
            });
        }
        let mut single = map.clone();
        single.remove("cniVersion");
        return Ok(json!({
            "cniVersion": CNI_VERSION,
            "name": CONVERTED_LIST_NAME,
            "plugins": [Value::Object(single), entry.clone()],
        }));
    }
    let mut list: Vec<Value> = plugins(file, map)?
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    list.push(entry.clone());
    let mut out = map.clone();
    out.insert("plugins".to_string(), Value::Array(list));
    Ok(Value::Object(out))
}

/// The list without any `istio-cni` entry (a converted `.conf` stays a list, as Istio leaves it).
pub fn remove_entry(file: &str, existing: &Value) -> Result<Value, ConflistError> {
    let map = existing
        .as_object()
        .ok_or_else(|| ConflistError::NotAnObject {
            file: file.to_string(),
            found: kind(existing),
        })?;
    let list: Vec<Value> = plugins(file, map)?
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    let mut out = map.clone();
    out.insert("plugins".to_string(), Value::Array(list));
    Ok(Value::Object(out))
}

/// Does the configuration hold an `istio-cni` entry?
pub fn has_entry(value: &Value) -> bool {
    value
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(is_ours))
}

/// The `istio-cni` entry of a configuration: in its plugin list, or the file itself (a standalone `.conf`).
pub fn entry(value: &Value) -> Option<&Value> {
    value
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|list| list.iter().find(|p| is_ours(p)))
        .or_else(|| is_ours(value).then_some(value))
}

/// The file as Istio writes it.
pub fn render(value: &Value) -> Vec<u8> {
    gojson::render_sorted(value)
}

/// Is `name` a CNI configuration file name kubelet reads (`.conf` or `.conflist`)?
pub fn is_config_name(name: &str) -> bool {
    extension(name).is_some_and(|e| e == "conf" || e == "conflist")
}

fn extension(name: &str) -> Option<&str> {
    // As Go's filepath.Ext: the suffix after the last dot ("a.conf" -> "conf"; ".conf" -> "conf").
    name.rsplit_once('.').map(|(_, ext)| ext)
}

/// Would libcni load this file as a network with at least one plugin? The reason when not.
pub fn loadable(name: &str, bytes: &[u8]) -> Result<(), String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if extension(name) == Some("conflist") {
        check_list(&value)
    } else {
        check_plugin(&value).map_err(|e| {
            if value.get("plugins").is_some() {
                format!("{e}; perhaps this is a .conflist?")
            } else {
                e
            }
        })
    }
}

fn check_list(value: &Value) -> Result<(), String> {
    let map = value.as_object().ok_or_else(|| {
        format!(
            "a configuration list must be an object, found {}",
            kind(value)
        )
    })?;
    match map.get("name") {
        Some(Value::String(_)) => {}
        Some(other) => return Err(format!("invalid name type ({})", kind(other))),
        None => return Err("no name".to_string()),
    }
    match map.get("cniVersion") {
        None | Some(Value::String(_)) => {}
        Some(other) => return Err(format!("invalid cniVersion type ({})", kind(other))),
    }
    if let Some(vs) = map.get("cniVersions") {
        let ok = vs
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err("cniVersions must be a list of strings".to_string());
        }
    }
    for key in ["disableCheck", "disableGC", "loadOnlyInlinedPlugins"] {
        match map.get(key) {
            None | Some(Value::Bool(_)) => {}
            Some(Value::String(s)) if matches!(s.to_lowercase().as_str(), "true" | "false") => {}
            Some(other) => return Err(format!("invalid value for {key}: {other}")),
        }
    }
    let list = match map.get("plugins") {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(format!("invalid 'plugins' type ({})", kind(other))),
        None => return Err("no 'plugins' key".to_string()),
    };
    if list.is_empty() {
        return Err("no plugins in list".to_string());
    }
    for (i, plugin) in list.iter().enumerate() {
        check_plugin(plugin).map_err(|e| format!("plugin {i}: {e}"))?;
    }
    Ok(())
}

/// The checks Go's decoding of a plugin configuration (`types.PluginConf`) makes, then "type" must be set.
fn check_plugin(value: &Value) -> Result<(), String> {
    let map = match value {
        Value::Object(m) => m,
        Value::Null => return Err("missing 'type'".to_string()),
        other => {
            return Err(format!(
                "a plugin configuration must be an object, found {}",
                kind(other)
            ))
        }
    };
    let string_or_null = |key: &str, v: Option<&Value>| match v {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(other) => Err(format!("{key} must be a string, found {}", kind(other))),
    };
    let strings_or_null = |key: &str, v: Option<&Value>| match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.iter().all(|x| x.is_string() || x.is_null()) => Ok(()),
        Some(other) => Err(format!("{key} must be a list of strings, found {other}")),
    };
    for key in ["cniVersion", "name", "type"] {
        string_or_null(key, map.get(key))?;
    }
    match map.get("capabilities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) if c.values().all(|v| v.is_boolean() || v.is_null()) => {}
        Some(other) => {
            return Err(format!(
                "capabilities must map names to booleans, found {other}"
            ))
        }
    }
    match map.get("ipam") {
        None | Some(Value::Null) => {}
        Some(Value::Object(i)) => string_or_null("ipam.type", i.get("type"))?,
        Some(other) => return Err(format!("ipam must be an object, found {}", kind(other))),
    }
    match map.get("dns") {
        None | Some(Value::Null) => {}
        Some(Value::Object(d)) => {
            strings_or_null("dns.nameservers", d.get("nameservers"))?;
            string_or_null("dns.domain", d.get("domain"))?;
            strings_or_null("dns.search", d.get("search"))?;
            strings_or_null("dns.options", d.get("options"))?;
        }
        Some(other) => return Err(format!("dns must be an object, found {}", kind(other))),
    }
    match map.get("prevResult") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(other) => {
            return Err(format!(
                "prevResult must be an object, found {}",
                kind(other)
            ))
        }
    }
    match map.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Ok(()),
        _ => Err("missing 'type'".to_string()),
    }
}

/// The primary configuration among the files of the conf dir, as kubelet picks it: names with `.conf` or `.conflist`
/// sorted bytewise, the first one libcni can load, except a single-plugin file that is itself an `istio-cni` entry
/// (a standalone file: no network to chain after, see [`insert_entry`]). Also returns why each skipped file was
/// skipped.
pub fn choose_primary(files: &[(String, Vec<u8>)]) -> (Option<&str>, Vec<(&str, String)>) {
    let mut candidates: Vec<&(String, Vec<u8>)> =
        files.iter().filter(|(n, _)| is_config_name(n)).collect();
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    let mut skipped = Vec::new();
    for (name, bytes) in candidates {
        let standalone_ours = || {
            serde_json::from_slice::<Value>(bytes)
                .is_ok_and(|v| v.get("plugins").is_none() && is_ours(&v))
        };
        match loadable(name, bytes) {
            Ok(()) if standalone_ours() => skipped.push((
                name.as_str(),
                "an istio-cni configuration itself, not a primary network".to_string(),
            )),
            Ok(()) => return (Some(name.as_str()), skipped),
            Err(reason) => skipped.push((name.as_str(), reason)),
        }
    }
    (None, skipped)
}

/// For a configured `CNI_CONF_NAME`: the name to use given which names exist (Istio accepts the other extension:
/// `x.conf` when `x.conflist` was named and the reverse).
pub fn resolve_named(conf_name: &str, exists: impl Fn(&str) -> bool) -> Option<String> {
    if exists(conf_name) {
        return Some(conf_name.to_string());
    }
    if let Some(stem) = conf_name.strip_suffix(".conflist") {
        let alt = format!("{stem}.conf");
        if exists(&alt) {
            return Some(alt);
        }
    } else if conf_name.ends_with(".conf") {
        let alt = format!("{conf_name}list");
        if exists(&alt) {
            return Some(alt);
        }
    }
    None
}

/// The name a configuration is written under: a `.conf` that became a list is written as `.conflist`.
pub fn target_name(source_name: &str) -> String {
    if source_name.ends_with(".conf") {
        format!("{source_name}list")
    } else {
        source_name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use cni_plugin::compat::read;

    /// The settings Istio's unit tests used for install/*.golden (from install/istio-cni.conf).
    fn unit_settings() -> EntrySettings {
        EntrySettings {
            plugin_log_level: "debug".into(),
            cni_agent_run_dir: "/path/to/kubeconfig".into(),
            exclude_namespaces: vec![],
            pod_namespace: "my-namespace".into(),
            native_nftables: false,
        }
    }

    /// The settings of Istio's install e2e test.
    fn e2e_settings() -> EntrySettings {
        EntrySettings {
            plugin_log_level: "debug".into(),
            cni_agent_run_dir: "/tmp".into(),
            exclude_namespaces: vec!["istio-system".into()],
            pod_namespace: String::new(),
            native_nftables: false,
        }
    }

    #[test]
    fn standalone_entry_matches_istio_bytes() {
        let ours = unit_settings().standalone_file();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(read("install/istio-cni.conf")).unwrap()
        );
        let ours = e2e_settings().standalone_file();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(read("install-e2e/expected/YYY-istio-cni.conf")).unwrap()
        );
    }

    /// What the agent writes (standalone file, entry, entry inside a rendered list), the plugin reads back as the
    /// same typed entry and as the settings it was made from.
    #[test]
    fn agent_to_plugin_round_trips() {
        use cni_plugin::config::{PluginConfig, KUBECONFIG_NAME};
        let custom = EntrySettings {
            plugin_log_level: "warn".into(),
            cni_agent_run_dir: "/var/run/istio-cni".into(),
            exclude_namespaces: vec!["kube-system".into(), "istio-system".into()],
            pod_namespace: "istio-system".into(),
            native_nftables: true,
        };
        for settings in [unit_settings(), e2e_settings(), custom] {
            let file = settings.standalone_file();
            let from_file: PluginEntry = serde_json::from_slice(&file).unwrap();
            assert_eq!(from_file, settings.plugin_entry(Some(CNI_VERSION)));
            let in_list: PluginEntry = serde_json::from_value(settings.entry()).unwrap();
            assert_eq!(in_list, settings.plugin_entry(None));
            let calico = "install-e2e/pre/calico.conflist";
            let list = insert_entry(
                calico,
                &parse(calico, &read(calico)).unwrap(),
                &settings.entry(),
            )
            .unwrap();
            let rendered = parse("rendered", &render(&list)).unwrap();
            let last = rendered["plugins"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .clone();
            assert_eq!(
                serde_json::from_value::<PluginEntry>(last.clone()).unwrap(),
                in_list
            );

            for value in [
                serde_json::from_slice::<Value>(&file).unwrap(),
                settings.entry(),
                last,
            ] {
                let cfg = PluginConfig::from_json(&value).unwrap();
                assert_eq!(cfg.log_level.directive(), settings.plugin_log_level);
                let run_dir = std::path::PathBuf::from(&settings.cni_agent_run_dir);
                assert_eq!(cfg.kubeconfig, run_dir.join(KUBECONFIG_NAME));
                assert_eq!(cfg.agent_run_dir, run_dir);
                assert_eq!(cfg.exclude_namespaces, settings.exclude_namespaces);
                assert_eq!(cfg.pod_namespace, settings.pod_namespace);
                assert_eq!(cfg.native_nftables, settings.native_nftables);
                assert!(!cfg.ambient_enabled);
            }
        }
    }

    fn check_golden(input: &str, golden: &str) {
        let existing = parse(input, &read(input)).unwrap();
        let out = insert_entry(input, &existing, &unit_settings().entry()).unwrap();
        let want = parse(golden, &read(golden)).unwrap();
        assert_eq!(out, want, "{input} -> {golden} (as JSON)");
        // And byte for byte, as Istio's own tests compare.
        assert_eq!(
            String::from_utf8(render(&out)).unwrap(),
            String::from_utf8(read(golden)).unwrap()
        );
        // Idempotent: inserting again changes nothing.
        assert_eq!(
            insert_entry(golden, &out, &unit_settings().entry()).unwrap(),
            out
        );
    }

    #[test]
    fn unit_goldens() {
        check_golden("install/bridge.conf", "install/bridge.conf.golden");
        check_golden("install/list.conflist", "install/list.conflist.golden");
        check_golden(
            "install/list-with-istio.conflist",
            "install/list-with-istio.conflist.golden",
        );
    }

    #[test]
    fn invalid_configs_are_refused() {
        let entry = unit_settings().entry();
        for f in [
            "install/invalid-map.conflist",
            "install/invalid-arr.conflist",
        ] {
            let v = parse(f, &read(f)).unwrap();
            let err = insert_entry(f, &v, &entry).unwrap_err();
            assert!(err.to_string().contains(f), "{err}");
        }
        let err = insert_entry("x", &json!({"plugins": [1]}), &entry).unwrap_err();
        assert!(err.to_string().contains("a number"), "{err}");
        assert!(parse("x.conflist", b"{")
            .unwrap_err()
            .to_string()
            .contains("x.conflist"));
    }

    #[test]
    fn e2e_goldens_and_cleanup() {
        let entry = e2e_settings().entry();
        let cases = [
            (
                "install-e2e/pre/calico.conflist",
                "install-e2e/expected/10-calico.conflist-istioconfig",
                "install-e2e/pre/calico.conflist",
            ),
            (
                "install-e2e/pre/minikube_cni.conf",
                "install-e2e/expected/minikube_cni.conflist.expected",
                "install-e2e/expected/minikube_cni.conflist.clean",
            ),
        ];
        for (pre, expected, clean) in cases {
            let v = parse(pre, &read(pre)).unwrap();
            let out = insert_entry(pre, &v, &entry).unwrap();
            assert_eq!(
                String::from_utf8(render(&out)).unwrap(),
                String::from_utf8(read(expected)).unwrap()
            );
            let cleaned = remove_entry(expected, &out).unwrap();
            assert_eq!(cleaned, parse(clean, &read(clean)).unwrap(), "{clean}");
            assert!(has_entry(&out) && !has_entry(&cleaned));
        }
    }

    /// Found by the conflist_edit fuzz target: a standalone istio-cni `.conf` was chained as a primary network into
    /// `[istio-cni, istio-cni]`, which a second insert changed again and a removal left with no plugin.
    #[test]
    fn a_standalone_istio_cni_file_is_no_primary() {
        let entry = unit_settings().entry();
        let standalone = read("install/istio-cni.conf");
        let v = parse("YYY-istio-cni.conf", &standalone).unwrap();
        let err = insert_entry("YYY-istio-cni.conf", &v, &entry).unwrap_err();
        assert_eq!(
            err,
            ConflistError::OursAlone {
                file: "YYY-istio-cni.conf".into()
            }
        );
        assert!(err.to_string().contains("YYY-istio-cni.conf"), "{err}");
        let files = vec![
            ("YYY-istio-cni.conf".to_string(), standalone),
            ("ZZZ-bridge.conf".to_string(), read("install/bridge.conf")),
        ];
        let (primary, skipped) = choose_primary(&files);
        assert_eq!(primary, Some("ZZZ-bridge.conf"));
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].1.contains("istio-cni"), "{skipped:?}");
        assert_eq!(choose_primary(&files[..1]).0, None);
    }

    #[test]
    fn duplicates_are_collapsed_and_entry_moved_last() {
        let entry = unit_settings().entry();
        let v = json!({"name": "n", "plugins": [{"type": "istio-cni"}, {"type": "bridge"}, {"type": "istio-cni", "x": 1}]});
        let out = insert_entry("f", &v, &entry).unwrap();
        let list = out["plugins"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["type"], "bridge");
        assert_eq!(list[1], entry);
    }

    #[test]
    fn e2e_invalid_files_are_skipped_when_choosing() {
        let names = [
            "non_json.conf",
            "bad_minikube_cni.conf",
            "noname_calico.conflist",
            "noplugins_calico.conflist",
        ];
        for n in names {
            let bytes = read(&format!("install-e2e/pre/{n}"));
            assert!(loadable(n, &bytes).is_err(), "{n} must be skipped");
        }
        for n in [
            "calico.conflist",
            "minikube_cni.conf",
            "nover_calico.conflist",
        ] {
            let bytes = read(&format!("install-e2e/pre/{n}"));
            loadable(n, &bytes).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        // Istio's e2e layout: 00-noname, 01-noplugins, 02-minikube.conf, 03-calico -> 02 is primary.
        let files: Vec<(String, Vec<u8>)> = vec![
            (
                "03-calico.conflist".into(),
                read("install-e2e/pre/calico.conflist"),
            ),
            (
                "00-noname_calico.conflist".into(),
                read("install-e2e/pre/noname_calico.conflist"),
            ),
            (
                "01-noplugins_calico.conflist".into(),
                read("install-e2e/pre/noplugins_calico.conflist"),
            ),
            (
                "02-minikube_cni.conf".into(),
                read("install-e2e/pre/minikube_cni.conf"),
            ),
            ("README".into(), b"{}".to_vec()),
        ];
        let (primary, skipped) = choose_primary(&files);
        assert_eq!(primary, Some("02-minikube_cni.conf"));
        assert_eq!(skipped.len(), 2);
        assert_eq!(choose_primary(&files[1..3]).0, None);
    }

    #[test]
    fn plugin_shapes() {
        assert!(loadable("a.conf", br#"{"type":"bridge","ipam":{"type":5}}"#).is_err());
        assert!(loadable("a.conf", br#"{"type":""}"#).is_err());
        assert!(loadable("a.conf", br#"null"#).is_err());
        assert!(loadable("a.conflist", br#"{"name":"x","plugins":[]}"#).is_err());
        assert!(loadable(
            "a.conflist",
            br#"{"name":"x","cniVersion":1,"plugins":[{"type":"a"}]}"#
        )
        .is_err());
        assert!(loadable(
            "a.conflist",
            br#"{"name":"x","disableCheck":"yes","plugins":[{"type":"a"}]}"#
        )
        .is_err());
        assert!(loadable(
            "a.conflist",
            br#"{"name":"x","disableCheck":"True","plugins":[{"type":"a"}]}"#
        )
        .is_ok());
        assert!(
            loadable("a.conf", br#"{"name":"x","plugins":[{"type":"a"}]}"#)
                .unwrap_err()
                .contains("conflist")
        );
        assert!(is_config_name("10-a.conf") && is_config_name("a.conflist"));
        assert!(
            !is_config_name("a.conf.tmp.1") && !is_config_name("a.json") && !is_config_name("conf")
        );
    }

    #[test]
    fn named_file_swaps_extension() {
        let exists = |n: &str| n == "a.conflist" || n == "b.conf";
        assert_eq!(
            resolve_named("a.conf", exists).as_deref(),
            Some("a.conflist")
        );
        assert_eq!(
            resolve_named("b.conflist", exists).as_deref(),
            Some("b.conf")
        );
        assert_eq!(
            resolve_named("a.conflist", exists).as_deref(),
            Some("a.conflist")
        );
        assert_eq!(resolve_named("c.conf", exists), None);
        assert_eq!(target_name("b.conf"), "b.conflist");
        assert_eq!(target_name("a.conflist"), "a.conflist");
    }
}
