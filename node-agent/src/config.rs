//! The agent's configuration: flags with environment fallbacks, Istio's install-cni names where Istio has them.
//! Every variable name is a constant here; parsing and validation happen once, at start, and a bad value stops the
//! agent with a message naming the variable.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::install::conflist::EntrySettings;
use crate::install::kubeconfig::ApiServer;

pub const MOUNTED_CNI_NET_DIR: &str = "MOUNTED_CNI_NET_DIR";
pub const MOUNTED_CNI_BIN_DIR: &str = "MOUNTED_CNI_BIN_DIR";
pub const CNI_BINARIES_SOURCE_DIR: &str = "CNI_BINARIES_SOURCE_DIR";
pub const CNI_CONF_NAME: &str = "CNI_CONF_NAME";
pub const CHAINED_CNI_PLUGIN: &str = "CHAINED_CNI_PLUGIN";
pub const CNI_CONF_GROUP_READ: &str = "CNI_CONF_GROUP_READ";
pub const CNI_AGENT_RUN_DIR: &str = "CNI_AGENT_RUN_DIR";
pub const KUBECONFIG_MODE: &str = "KUBECONFIG_MODE";
pub const KUBE_CA_FILE: &str = "KUBE_CA_FILE";
pub const SKIP_TLS_VERIFY: &str = "SKIP_TLS_VERIFY";
pub const SERVICE_ACCOUNT_DIR: &str = "SERVICE_ACCOUNT_DIR";
pub const KUBERNETES_SERVICE_PROTOCOL: &str = "KUBERNETES_SERVICE_PROTOCOL";
pub const KUBERNETES_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
pub const KUBERNETES_SERVICE_PORT: &str = "KUBERNETES_SERVICE_PORT";
pub const KUBERNETES_NODE_NAME: &str = "KUBERNETES_NODE_NAME";
pub const EXCLUDE_NAMESPACES: &str = "EXCLUDE_NAMESPACES";
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const LOG_LEVEL: &str = "LOG_LEVEL";
pub const NATIVE_NFTABLES: &str = "NATIVE_NFTABLES";
pub const AMBIENT_ENABLED: &str = "AMBIENT_ENABLED";
pub const MONITORING_PORT: &str = "MONITORING_PORT";
pub const HEALTH_PORT: &str = "HEALTH_PORT";
pub const BIND_ADDRESS: &str = "BIND_ADDRESS";
/// Ours: serve the plugin's pod lookups from a node-scoped pod watch (`<run dir>/pod-cache.sock`).
pub const POD_CACHE_ENABLED: &str = "POD_CACHE_ENABLED";

/// Command line and environment, as given.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "meshcni node agent: installs the istio-cni plugin on this node and keeps it installed",
    long_about = "meshcni node agent (Istio's install-cni): copies the istio-cni binary into the host's CNI bin dir, \
writes the plugin's kubeconfig from this pod's service account, inserts the istio-cni entry last in the node's \
primary CNI configuration, and keeps all three in place until SIGTERM/SIGINT, when it removes them.\n\n\
Every option can be set by its environment variable (shown as [env: NAME=]); the flag wins over the variable."
)]
pub struct Args {
    /// Host CNI configuration directory, as mounted in this container.
    #[arg(long, env = MOUNTED_CNI_NET_DIR, value_name = MOUNTED_CNI_NET_DIR, default_value = "/host/etc/cni/net.d")]
    pub mounted_cni_net_dir: PathBuf,

    /// Host CNI binary directory, as mounted in this container: the plugin is copied here.
    #[arg(long, env = MOUNTED_CNI_BIN_DIR, value_name = MOUNTED_CNI_BIN_DIR, default_value = "/host/opt/cni/bin")]
    pub mounted_cni_bin_dir: PathBuf,

    /// Directory in this container whose files (the istio-cni binary) are copied to the host bin dir.
    #[arg(long, env = CNI_BINARIES_SOURCE_DIR, value_name = CNI_BINARIES_SOURCE_DIR, default_value = "/opt/cni/bin")]
    pub cni_binaries_source_dir: PathBuf,

    /// Name of the CNI configuration file to insert into (chained) or to write (standalone). Unset: the primary
    /// file kubelet would use (chained) or YYY-istio-cni.conf (standalone).
    #[arg(long, env = CNI_CONF_NAME, value_name = CNI_CONF_NAME)]
    pub cni_conf_name: Option<String>,

    /// Chain istio-cni after the primary CNI plugin (true) or write a standalone configuration file (false).
    #[arg(long, env = CHAINED_CNI_PLUGIN, value_name = CHAINED_CNI_PLUGIN, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub chained_cni_plugin: bool,

    /// Standalone file mode 0640 instead of 0600.
    #[arg(long, env = CNI_CONF_GROUP_READ, value_name = CNI_CONF_GROUP_READ, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub cni_conf_group_read: bool,

    /// Host directory of the agent (holds the plugin's kubeconfig); written into the entry as cni_agent_run_dir.
    #[arg(long, env = CNI_AGENT_RUN_DIR, value_name = CNI_AGENT_RUN_DIR, default_value = cni_plugin::config::DEFAULT_AGENT_RUN_DIR)]
    pub cni_agent_run_dir: PathBuf,

    /// File mode of the kubeconfig, octal.
    #[arg(long, env = KUBECONFIG_MODE, value_name = KUBECONFIG_MODE, default_value = "0600", value_parser = parse_mode)]
    pub kubeconfig_mode: u32,

    /// CA bundle embedded in the kubeconfig. Default: ca.crt of the service-account directory.
    #[arg(long, env = KUBE_CA_FILE, value_name = KUBE_CA_FILE)]
    pub kube_ca_file: Option<String>,

    /// Write insecure-skip-tls-verify into the kubeconfig instead of a CA.
    #[arg(long, env = SKIP_TLS_VERIFY, value_name = SKIP_TLS_VERIFY, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub skip_tls_verify: bool,

    /// Service-account directory (token, ca.crt), a projected volume kubelet rotates.
    #[arg(long, env = SERVICE_ACCOUNT_DIR, value_name = SERVICE_ACCOUNT_DIR, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub service_account_dir: PathBuf,

    /// Scheme of the API server URL in the kubeconfig.
    #[arg(long, env = KUBERNETES_SERVICE_PROTOCOL, value_name = KUBERNETES_SERVICE_PROTOCOL, default_value = "https", value_parser = ["https", "http"])]
    pub kubernetes_service_protocol: String,

    /// API server host (set by kubelet in every pod).
    #[arg(long, env = KUBERNETES_SERVICE_HOST, value_name = KUBERNETES_SERVICE_HOST)]
    pub kubernetes_service_host: Option<String>,

    /// API server port (set by kubelet in every pod).
    #[arg(long, env = KUBERNETES_SERVICE_PORT, value_name = KUBERNETES_SERVICE_PORT, value_parser = parse_port)]
    pub kubernetes_service_port: Option<u16>,

    /// This node's name (the DaemonSet passes spec.nodeName). Default: the host name.
    #[arg(long, env = KUBERNETES_NODE_NAME, value_name = KUBERNETES_NODE_NAME)]
    pub kubernetes_node_name: Option<String>,

    /// Comma-separated namespaces the plugin leaves alone.
    #[arg(long, env = EXCLUDE_NAMESPACES, value_name = EXCLUDE_NAMESPACES, default_value = "")]
    pub exclude_namespaces: String,

    /// Namespace of this agent (its own pods are never redirected).
    #[arg(long, env = POD_NAMESPACE, value_name = POD_NAMESPACE, default_value = "")]
    pub pod_namespace: String,

    /// Log level of the agent and of the plugin (written as plugin_log_level): debug, info, warn, error, none.
    #[arg(long, env = LOG_LEVEL, value_name = LOG_LEVEL, default_value = "info")]
    pub log_level: String,

    /// Program native nftables instead of iptables (written into the entry as native_nftables).
    #[arg(long, env = NATIVE_NFTABLES, value_name = NATIVE_NFTABLES, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub native_nftables: bool,

    /// Istio's ambient mode: not supported by meshcni (sidecar mode only); must be false.
    #[arg(long, env = AMBIENT_ENABLED, value_name = AMBIENT_ENABLED, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub ambient_enabled: bool,

    /// Watch the pods of this node and answer the plugin's lookups on `<CNI_AGENT_RUN_DIR>/pod-cache.sock`, so a
    /// pod start needs no API request (ours; the plugin falls back to its own GET whenever the cache cannot answer).
    #[arg(long, env = POD_CACHE_ENABLED, value_name = POD_CACHE_ENABLED, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub pod_cache_enabled: bool,

    /// Port of the Prometheus metrics server (/metrics); 0 disables it.
    #[arg(long, env = MONITORING_PORT, value_name = MONITORING_PORT, default_value = "15014", value_parser = parse_port_or_zero)]
    pub monitoring_port: u16,

    /// Port of the health server (/healthz, /readyz); 0 disables it.
    #[arg(long, env = HEALTH_PORT, value_name = HEALTH_PORT, default_value = "8000", value_parser = parse_port_or_zero)]
    pub health_port: u16,

    /// Address the health and metrics servers listen on.
    #[arg(long, env = BIND_ADDRESS, value_name = BIND_ADDRESS, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// Without a subcommand: run the agent.
    #[command(subcommand)]
    pub command: Option<Subcommand>,
}

/// What else the binary does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Print this node's installation and the last ADD decisions and repair actions (asks the running agent on
    /// `<CNI_AGENT_RUN_DIR>/status.sock`; run it in the agent's pod: `kubectl exec ds/istio-cni-node -- node-agent
    /// status`). Exits 1 when the node is not ready or the agent does not answer.
    Status(crate::status::StatusArgs),
}

/// Go's strconv.ParseBool, which Istio's flags use.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true/false, 1/0, t/f)")),
    }
}

/// An octal file mode: `0600`, `600` or `0o600`, at most 0777.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = if !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        u32::from_str_radix(digits, 8).map_err(|e| format!("{s:?}: {e}"))?
    } else {
        return Err(format!("{s:?} is not an octal file mode (like 0600)"));
    };
    if mode > 0o777 {
        return Err(format!("{s:?} is more than 0777"));
    }
    Ok(mode)
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port number (1-65535)")),
    }
}

fn parse_port_or_zero(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("{s:?} is not a port number (0-65535)"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var} is not set (the API server address; kubelet sets it in every pod)")]
    Missing { var: &'static str },
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{var}={path}: {reason}")]
    Dir {
        var: &'static str,
        path: String,
        reason: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub source_dir: PathBuf,
    pub conf_name: Option<String>,
    pub chained: bool,
    /// Mode of the standalone file (0600, or 0640 with CNI_CONF_GROUP_READ).
    pub standalone_mode: u32,
    pub run_dir: PathBuf,
    pub kubeconfig_mode: u32,
    pub ca_file: PathBuf,
    pub skip_tls_verify: bool,
    pub service_account_dir: PathBuf,
    pub api_server: ApiServer,
    pub node_name: String,
    pub log_level: String,
    pub entry: EntrySettings,
    pub monitoring_port: u16,
    pub health_port: u16,
    pub bind_address: IpAddr,
    pub pod_cache: bool,
}

impl Config {
    /// The kubeconfig the agent writes (the plugin reads `<cni_agent_run_dir>/istio-cni-kubeconfig`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.run_dir.join(cni_plugin::config::KUBECONFIG_NAME)
    }

    pub fn token_path(&self) -> PathBuf {
        self.service_account_dir.join("token")
    }
}

fn require_dir(var: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(ConfigError::Dir {
            var,
            path: path.display().to_string(),
            reason: "not a directory".into(),
        }),
        Err(e) => Err(ConfigError::Dir {
            var,
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

impl Args {
    /// Validates the arguments against each other and against the file system (the directories must exist; the run
    /// dir is created, as kubelet's DirectoryOrCreate would).
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.kubernetes_service_protocol != "https" {
            // The plugin refuses a plain-http API server (the kubeconfig carries a bearer token): writing one would
            // make every pod start fail, so refuse it here, at start, naming the variable.
            return Err(ConfigError::Invalid {
                var: KUBERNETES_SERVICE_PROTOCOL,
                value: self.kubernetes_service_protocol,
                reason:
                    "istio-cni only talks to the API server over https (it sends a bearer token)"
                        .into(),
            });
        }
        if self.ambient_enabled {
            return Err(ConfigError::Invalid {
                var: AMBIENT_ENABLED,
                value: "true".into(),
                reason: "ambient mode is not supported by meshcni (sidecar mode only)".into(),
            });
        }
        let host = self
            .kubernetes_service_host
            .filter(|h| !h.trim().is_empty())
            .ok_or(ConfigError::Missing {
                var: KUBERNETES_SERVICE_HOST,
            })?;
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(ConfigError::Invalid {
                var: KUBERNETES_SERVICE_HOST,
                value: host,
                reason: "not a host name or address".into(),
            });
        }
        let port = self.kubernetes_service_port.ok_or(ConfigError::Missing {
            var: KUBERNETES_SERVICE_PORT,
        })?;
        let level = self.log_level.to_ascii_lowercase();
        if !matches!(level.as_str(), "debug" | "info" | "warn" | "error" | "none") {
            return Err(ConfigError::Invalid {
                var: LOG_LEVEL,
                value: self.log_level,
                reason: "not one of debug, info, warn, error, none".into(),
            });
        }
        let conf_name = self.cni_conf_name.filter(|n| !n.is_empty());
        if let Some(name) = &conf_name {
            if name.contains('/') || name == "." || name == ".." {
                return Err(ConfigError::Invalid {
                    var: CNI_CONF_NAME,
                    value: name.clone(),
                    reason: "must be a file name inside MOUNTED_CNI_NET_DIR, not a path".into(),
                });
            }
            if self.chained_cni_plugin && !(name.ends_with(".conf") || name.ends_with(".conflist"))
            {
                return Err(ConfigError::Invalid {
                    var: CNI_CONF_NAME,
                    value: name.clone(),
                    reason: "kubelet only reads .conf and .conflist files".into(),
                });
            }
        }
        require_dir(MOUNTED_CNI_NET_DIR, &self.mounted_cni_net_dir)?;
        require_dir(MOUNTED_CNI_BIN_DIR, &self.mounted_cni_bin_dir)?;
        require_dir(CNI_BINARIES_SOURCE_DIR, &self.cni_binaries_source_dir)?;
        require_dir(SERVICE_ACCOUNT_DIR, &self.service_account_dir)?;
        if let Err(e) = std::fs::create_dir_all(&self.cni_agent_run_dir) {
            return Err(ConfigError::Dir {
                var: CNI_AGENT_RUN_DIR,
                path: self.cni_agent_run_dir.display().to_string(),
                reason: e.to_string(),
            });
        }
        require_dir(CNI_AGENT_RUN_DIR, &self.cni_agent_run_dir)?;
        let run_dir_str = self
            .cni_agent_run_dir
            .to_str()
            .ok_or_else(|| ConfigError::Invalid {
                var: CNI_AGENT_RUN_DIR,
                value: self.cni_agent_run_dir.display().to_string(),
                reason: "not valid UTF-8".into(),
            })?;
        if !self.cni_agent_run_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                var: CNI_AGENT_RUN_DIR,
                value: run_dir_str.to_string(),
                reason: "must be an absolute path (the plugin reads it on the host)".into(),
            });
        }
        // Empty means unset (Istio: the service account's ca.crt).
        let kube_ca_file = self
            .kube_ca_file
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        if let Some(ca) = &kube_ca_file {
            if !self.skip_tls_verify && !ca.is_file() {
                return Err(ConfigError::Invalid {
                    var: KUBE_CA_FILE,
                    value: ca.display().to_string(),
                    reason: "no such file".into(),
                });
            }
        }
        let entry = EntrySettings {
            plugin_log_level: level.clone(),
            cni_agent_run_dir: run_dir_str.to_string(),
            exclude_namespaces: split_namespaces(&self.exclude_namespaces),
            pod_namespace: self.pod_namespace.clone(),
            native_nftables: self.native_nftables,
        };
        // The plugin must accept what we write: validate the entry with the plugin's own parser.
        cni_plugin::config::PluginConfig::from_json(&entry.entry()).map_err(|e| {
            ConfigError::Invalid {
                var: LOG_LEVEL,
                value: level.clone(),
                reason: format!("the plugin would refuse its entry: {e}"),
            }
        })?;
        let node_name = match self.kubernetes_node_name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => hostname(),
        };
        Ok(Config {
            ca_file: kube_ca_file.unwrap_or_else(|| self.service_account_dir.join("ca.crt")),
            conf_dir: self.mounted_cni_net_dir,
            bin_dir: self.mounted_cni_bin_dir,
            source_dir: self.cni_binaries_source_dir,
            conf_name,
            chained: self.chained_cni_plugin,
            standalone_mode: if self.cni_conf_group_read {
                0o640
            } else {
                0o600
            },
            run_dir: self.cni_agent_run_dir,
            kubeconfig_mode: self.kubeconfig_mode,
            skip_tls_verify: self.skip_tls_verify,
            service_account_dir: self.service_account_dir,
            api_server: ApiServer {
                protocol: self.kubernetes_service_protocol,
                host,
                port,
            },
            node_name,
            log_level: level,
            entry,
            monitoring_port: self.monitoring_port,
            health_port: self.health_port,
            bind_address: self.bind_address,
            pod_cache: self.pod_cache_enabled,
        })
    }
}

/// Istio's split: comma-separated, trimmed, empty items dropped.
pub fn split_namespaces(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bools_like_go() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        for bad in ["yes", "on", "", "tRuE"] {
            assert!(parse_bool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        for bad in ["", "0o", "0800", "rw", "01000", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("443"), Ok(443));
        assert!(
            parse_port("0").is_err()
                && parse_port("https").is_err()
                && parse_port("70000").is_err()
        );
        assert_eq!(parse_port_or_zero("0"), Ok(0));
    }

    #[test]
    fn namespaces() {
        assert_eq!(split_namespaces(" a, ,b,"), vec!["a", "b"]);
        assert!(split_namespaces("").is_empty());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = Args::try_parse_from(["node-agent", "--monitoring-port", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MONITORING_PORT"), "{err}");
        let err = Args::try_parse_from(["node-agent", "--kubeconfig-mode", "0999"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KUBECONFIG_MODE"), "{err}");
    }
}
