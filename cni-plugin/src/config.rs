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

/// The conflist entry exactly as it is written (by the agent) and read (by the plugin). Unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PluginEntry {
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_agent_run_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambient_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enablement_selectors: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_nftables: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

    /// The `tracing` filter directive for this level.
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
