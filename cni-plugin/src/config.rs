//! The plugin's entry in the conflist: Istio's current keys, the legacy ones still found in real clusters, our
//! additions, defaults and validation. Pure: parsing a JSON value, no I/O.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// File name of the kubeconfig the agent writes into `cni_agent_run_dir`.
pub const KUBECONFIG_NAME: &str = "istio-cni-kubeconfig";
/// Istio's default `cni_agent_run_dir`.
pub const DEFAULT_AGENT_RUN_DIR: &str = "/var/run/istio-cni";
/// Prefix of the agent's own pods (the DaemonSet `istio-cni-node`).
pub const AGENT_POD_PREFIX: &str = "istio-cni-node-";
/// Default deadline for retrying transient pod lookup failures.
pub const DEFAULT_POD_LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("network configuration is not valid for istio-cni: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("plugin_log_level {0:?} is not one of debug, info, warn, error, none")]
    LogLevel(String),
    #[error("iptables_backend {0:?} is not one of auto, legacy, nft, nftables")]
    Backend(String),
    #[error("native_nftables is true but iptables_backend is {0:?}: set one of them (nftables is the native backend)")]
    BackendConflict(String),
    #[error("pod_lookup_timeout_seconds {0} must be between 1 and 600")]
    LookupTimeout(u64),
}

/// Legacy `kubernetes` block (Istio ≤ 1.20 conflists).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct LegacyKubernetes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_bin_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_namespaces: Option<Vec<String>>,
}

/// The conflist entry: one schema, read by the plugin (then validated into [`PluginConfig`]) and written by the node
/// agent, so a key the agent writes is a field here. Istio's keys come first, in the order of Istio's plugin config
/// struct (the agent's standalone file lists them in this order, byte-identical to Istio's), then the legacy keys,
/// then ours. As in Go, `cniVersion` and `name` are left out when unset, Istio's own keys never (unset is `null`,
/// as Go writes a nil `exclude_namespaces`), legacy keys and ours are left out when unset. Unknown keys are ignored
/// when reading, as Istio does (the runtime passes the whole network configuration).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PluginEntry {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Not used by the plugin; Istio writes `{}`. Any value is accepted.
    #[serde(default)]
    pub ipam: Option<serde_json::Value>,
    /// Not used by the plugin; Istio writes `{}`. Any value is accepted.
    #[serde(default)]
    pub dns: Option<serde_json::Value>,
    #[serde(default)]
    pub plugin_log_level: Option<String>,
    #[serde(default)]
    pub cni_agent_run_dir: Option<String>,
    #[serde(default)]
    pub ambient_enabled: Option<bool>,
    #[serde(default)]
    pub enablement_selectors: Option<serde_json::Value>,
    #[serde(default)]
    pub exclude_namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub native_nftables: Option<bool>,
    #[serde(default)]
    pub enable_ambient_detection_retry: Option<bool>,
    /// Legacy key for the log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Legacy block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<LegacyKubernetes>,
    /// Ours: "auto" (default, detect per netns as Istio does), "legacy" or "nft".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_backend: Option<String>,
    /// Ours: how long transient pod lookup failures are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_lookup_timeout_seconds: Option<u64>,
}

impl PluginEntry {
    /// Every key of the entry, in declaration order, as serde names them.
    pub fn keys() -> &'static [&'static str] {
        serde_keys::of::<PluginEntry>()
    }

    /// The keys this entry serialises and their values, in declaration order: what Go's encoder writes for
    /// Istio's struct (nested objects are values, for the caller to render).
    pub fn fields(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut map = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            // Provably unreachable: a derived struct of strings, booleans, integers and JSON values.
            other => unreachable!("PluginEntry serialises to a JSON object, got {other:?}"),
        };
        Self::keys()
            .iter()
            .filter_map(|k| map.remove(*k).map(|v| (*k, v)))
            .collect()
    }
}

/// The field names serde derives for a struct, in declaration order (serde passes them to `deserialize_struct`).
mod serde_keys {
    use serde::de::{self, Deserialize, Deserializer, Visitor};

    struct Keys<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Keys<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("keys taken"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    /// The keys of `T`; empty when `T` is not a derived struct.
    pub fn of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        let mut keys: &'static [&'static str] = &[];
        let _ = T::deserialize(Keys(&mut keys));
        keys
    }
}

/// Log level of the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
    None,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "debug" | "trace" => Some(LogLevel::Debug),
            "info" | "" => Some(LogLevel::Info),
            "warn" | "warning" => Some(LogLevel::Warn),
            "error" | "fatal" => Some(LogLevel::Error),
            "none" => Some(LogLevel::None),
            _ => None,
        }
    }

    /// The level as a tracing filter: a plain level, so the plugin needs no directive parser.
    pub fn filter(self) -> tracing_subscriber::filter::LevelFilter {
        use tracing_subscriber::filter::LevelFilter;
        match self {
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::None => LevelFilter::OFF,
        }
    }

    /// The `tracing` filter directive for this level (the agent's own log level takes the same names).
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::None => "off",
        }
    }
}

/// Which firewall backend to program with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect the iptables flavour per netns, as Istio does.
    Auto,
    /// iptables-legacy (`iptables-legacy-restore`).
    Legacy,
    /// iptables-nft (`iptables-nft-restore`).
    Nft,
    /// Native nftables over netlink (`native_nftables: true`, or `iptables_backend: nftables`).
    Nftables,
}

/// The validated plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    pub log_level: LogLevel,
    pub agent_run_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub pod_namespace: String,
    pub native_nftables: bool,
    pub ambient_enabled: bool,
    pub backend: BackendChoice,
    pub pod_lookup_timeout: Duration,
}

impl PluginConfig {
    /// Reads the plugin's keys from the network configuration JSON (the whole stdin of the plugin).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let entry = PluginEntry::deserialize(value)?;
        Self::from_entry(&entry)
    }

    /// Validates an entry and applies defaults. Istio's keys first; legacy keys fill in what is absent, except that
    /// `kubernetes.kubeconfig` wins over the kubeconfig derived from `cni_agent_run_dir`.
    pub fn from_entry(e: &PluginEntry) -> Result<Self, ConfigError> {
        let legacy = e.kubernetes.clone().unwrap_or_default();
        let level_str = e
            .plugin_log_level
            .as_deref()
            .or(e.log_level.as_deref())
            .unwrap_or("info");
        let log_level =
            LogLevel::parse(level_str).ok_or_else(|| ConfigError::LogLevel(level_str.into()))?;
        let agent_run_dir = PathBuf::from(
            e.cni_agent_run_dir
                .as_deref()
                .filter(|d| !d.is_empty())
                .unwrap_or(DEFAULT_AGENT_RUN_DIR),
        );
        let kubeconfig = match legacy.kubeconfig.as_deref().filter(|k| !k.is_empty()) {
            Some(k) => PathBuf::from(k),
            None => agent_run_dir.join(KUBECONFIG_NAME),
        };
        let mut exclude_namespaces = e.exclude_namespaces.clone().unwrap_or_default();
        for ns in legacy.exclude_namespaces.iter().flatten() {
            if !exclude_namespaces.contains(ns) {
                exclude_namespaces.push(ns.clone());
            }
        }
        let native_nftables = e.native_nftables.unwrap_or(false);
        let backend = match (e.iptables_backend.as_deref().unwrap_or(""), native_nftables) {
            ("nftables", _) | ("", true) => BackendChoice::Nftables,
            (other, true) => return Err(ConfigError::BackendConflict(other.into())),
            ("auto" | "", false) => BackendChoice::Auto,
            ("legacy", false) => BackendChoice::Legacy,
            ("nft", false) => BackendChoice::Nft,
            (other, false) => return Err(ConfigError::Backend(other.into())),
        };
        let secs = e
            .pod_lookup_timeout_seconds
            .unwrap_or(DEFAULT_POD_LOOKUP_TIMEOUT.as_secs());
        if !(1..=600).contains(&secs) {
            return Err(ConfigError::LookupTimeout(secs));
        }
        Ok(PluginConfig {
            log_level,
            agent_run_dir,
            kubeconfig,
            exclude_namespaces,
            pod_namespace: e.pod_namespace.clone().unwrap_or_default(),
            native_nftables,
            ambient_enabled: e.ambient_enabled.unwrap_or(false),
            backend,
            pod_lookup_timeout: Duration::from_secs(secs),
        })
    }

    /// Is the namespace excluded? Decided before the kubeconfig is read.
    pub fn namespace_excluded(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }

    /// Is this the agent's own pod? Decided before the kubeconfig is read.
    pub fn is_agent_pod(&self, namespace: &str, name: &str) -> bool {
        name.starts_with(AGENT_POD_PREFIX) && namespace == self.pod_namespace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istio_head_keys() {
        let c = PluginConfig::from_json(&json!({
            "cniVersion": "0.3.1", "name": "k8s-pod-network", "type": "istio-cni",
            "plugin_log_level": "debug", "cni_agent_run_dir": "/tmp/run", "ambient_enabled": false,
            "exclude_namespaces": ["istio-system", "kube-system"], "pod_namespace": "istio-system",
            "native_nftables": false, "enablement_selectors": [{"podSelector": {}}],
            "some_future_key": {"ignored": true}
        }))
        .unwrap();
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.kubeconfig, PathBuf::from("/tmp/run/istio-cni-kubeconfig"));
        assert!(c.namespace_excluded("kube-system") && !c.namespace_excluded("default"));
        assert!(c.is_agent_pod("istio-system", "istio-cni-node-abcde"));
        assert!(!c.is_agent_pod("default", "istio-cni-node-abcde"));
        assert!(!c.is_agent_pod("istio-system", "istio-cni-nodes"));
        assert_eq!(c.pod_lookup_timeout, DEFAULT_POD_LOOKUP_TIMEOUT);
    }

    #[test]
    fn defaults() {
        let c = PluginConfig::from_json(&json!({"type": "istio-cni", "name": "n"})).unwrap();
        assert_eq!(c.agent_run_dir, PathBuf::from(DEFAULT_AGENT_RUN_DIR));
        assert_eq!(
            c.kubeconfig,
            PathBuf::from("/var/run/istio-cni/istio-cni-kubeconfig")
        );
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.backend, BackendChoice::Auto);
        // The agent pod check needs pod_namespace: empty never matches a real namespace.
        assert!(!c.is_agent_pod("kube-system", "istio-cni-node-x"));
    }

    #[test]
    fn legacy_keys_and_kubeconfig_precedence() {
        let c = PluginConfig::from_json(&json!({
            "type": "istio-cni", "log_level": "warn", "cni_agent_run_dir": "/tmp/run",
            "exclude_namespaces": ["a"],
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig", "cni_bin_dir": "/opt/cni/bin",
                           "exclude_namespaces": ["a", "b"]}
        }))
        .unwrap();
        assert_eq!(c.log_level, LogLevel::Warn);
        assert_eq!(
            c.kubeconfig,
            PathBuf::from("/etc/cni/net.d/ZZZ-istio-cni-kubeconfig")
        );
        assert_eq!(c.exclude_namespaces, ["a", "b"]);
        // plugin_log_level beats log_level.
        let c =
            PluginConfig::from_json(&json!({"plugin_log_level": "error", "log_level": "debug"}))
                .unwrap();
        assert_eq!(c.log_level, LogLevel::Error);
    }

    #[test]
    fn invalid_values_are_refused_with_the_value() {
        for (v, needle) in [
            (json!({"plugin_log_level": "loud"}), "loud"),
            (json!({"iptables_backend": "ebpf"}), "ebpf"),
            (json!({"pod_lookup_timeout_seconds": 0}), "0"),
            (json!({"exclude_namespaces": "kube-system"}), "sequence"),
            (json!({"native_nftables": "yes"}), "boolean"),
        ] {
            let e = PluginConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{v} -> {e}");
        }
    }

    #[test]
    fn backend_choice_from_istios_key_and_ours() {
        let backend = |v| PluginConfig::from_json(&v).map(|c| c.backend);
        assert_eq!(backend(json!({})).unwrap(), BackendChoice::Auto);
        assert_eq!(
            backend(json!({"iptables_backend": "legacy"})).unwrap(),
            BackendChoice::Legacy
        );
        assert_eq!(
            backend(json!({"iptables_backend": "nft"})).unwrap(),
            BackendChoice::Nft
        );
        for v in [
            json!({"native_nftables": true}),
            json!({"iptables_backend": "nftables"}),
            json!({"iptables_backend": "nftables", "native_nftables": true}),
            json!({"iptables_backend": "nftables", "native_nftables": false}),
        ] {
            assert_eq!(backend(v.clone()).unwrap(), BackendChoice::Nftables, "{v}");
        }
        for conflicting in ["legacy", "nft", "auto"] {
            let e = backend(json!({"iptables_backend": conflicting, "native_nftables": true}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("native_nftables") && e.contains(conflicting),
                "{e}"
            );
        }
    }

    #[test]
    fn keys_are_istios_in_istios_order_then_legacy_then_ours() {
        assert_eq!(
            PluginEntry::keys(),
            [
                "cniVersion",
                "name",
                "type",
                "ipam",
                "dns",
                "plugin_log_level",
                "cni_agent_run_dir",
                "ambient_enabled",
                "enablement_selectors",
                "exclude_namespaces",
                "pod_namespace",
                "native_nftables",
                "enable_ambient_detection_retry",
                "log_level",
                "kubernetes",
                "iptables_backend",
                "pod_lookup_timeout_seconds",
            ]
        );
    }

    /// Every key of the entry Istio's installer writes is a field, written back with the same value, and nothing
    /// else is written: the schema is Istio's.
    #[test]
    fn istios_written_entry_is_exactly_the_schema() {
        let golden: serde_json::Value =
            serde_json::from_slice(&crate::compat::read("install/istio-cni.conf")).unwrap();
        let entry: PluginEntry = serde_json::from_value(golden.clone()).unwrap();
        assert_eq!(serde_json::to_value(&entry).unwrap(), golden);
        let keys: Vec<&str> = entry.fields().iter().map(|(k, _)| *k).collect();
        let golden_keys: Vec<&str> = golden
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), golden_keys.len());
        assert!(keys.iter().all(|k| golden_keys.contains(k)), "{keys:?}");
        assert_eq!(keys, PluginEntry::keys()[..keys.len()]);
        // An unset entry writes Istio's keys as null and nothing of the legacy keys or ours.
        let unset: Vec<&str> = PluginEntry::default()
            .fields()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(unset, PluginEntry::keys()[2..13]);
    }

    #[test]
    fn tolerant_of_what_the_plugin_does_not_use() {
        let c = PluginConfig::from_json(&json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "ipam": "anything", "dns": {"nameservers": ["10.0.0.10"]}, "enablement_selectors": 5,
            "prevResult": {"ips": []}, "runtimeConfig": {}
        }))
        .unwrap();
        assert_eq!(c.log_level, LogLevel::Info);
    }

    #[test]
    fn entry_round_trips() {
        let e: PluginEntry = serde_json::from_value(json!({
            "type": "istio-cni", "name": "istio-cni", "plugin_log_level": "info", "cni_agent_run_dir": "/var/run/istio-cni",
            "exclude_namespaces": ["istio-system"], "pod_namespace": "istio-system", "native_nftables": false, "ambient_enabled": false
        }))
        .unwrap();
        let back: PluginEntry = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
