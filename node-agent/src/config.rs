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
// Istio's repair controller (cni/pkg/cmd/root.go, the chart's ConfigMap).
pub const REPAIR_ENABLED: &str = "REPAIR_ENABLED";
pub const REPAIR_REPAIR_PODS: &str = "REPAIR_REPAIR_PODS";
pub const REPAIR_DELETE_PODS: &str = "REPAIR_DELETE_PODS";
pub const REPAIR_LABEL_PODS: &str = "REPAIR_LABEL_PODS";
pub const REPAIR_SIDECAR_ANNOTATION: &str = "REPAIR_SIDECAR_ANNOTATION";
pub const REPAIR_INIT_CONTAINER_NAME: &str = "REPAIR_INIT_CONTAINER_NAME";
pub const REPAIR_INIT_CONTAINER_EXIT_CODE: &str = "REPAIR_INIT_CONTAINER_EXIT_CODE";
pub const REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE: &str =
    "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE";
pub const REPAIR_BROKEN_POD_LABEL_KEY: &str = "REPAIR_BROKEN_POD_LABEL_KEY";
pub const REPAIR_BROKEN_POD_LABEL_VALUE: &str = "REPAIR_BROKEN_POD_LABEL_VALUE";
/// Ours: where the host's /proc is mounted in the agent's container (Istio hard-codes /host/proc).
pub const REPAIR_HOST_PROC_DIR: &str = "REPAIR_HOST_PROC_DIR";
/// The agent's own pod (Istio's chart passes it with the downward API): named in the owner record of the run dir.
pub const POD_NAME: &str = "POD_NAME";
/// Ours: the agent's own DaemonSet in POD_NAMESPACE, read on SIGTERM to tell an uninstall from a restart or upgrade
/// (Istio reads `istio-cni-node`, a fixed name).
pub const DAEMONSET_NAME: &str = "DAEMONSET_NAME";
/// Ours: how long that read may take, retries included.
pub const SHUTDOWN_CHECK_SECONDS: &str = "SHUTDOWN_CHECK_SECONDS";
/// Istio's DaemonSet name, the default of DAEMONSET_NAME.
pub const DEFAULT_DAEMONSET_NAME: &str = "istio-cni-node";

/// Command line and environment, as given.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "meshcni node agent: installs the istio-cni plugin on this node and keeps it installed",
    long_about = "meshcni node agent (Istio's install-cni): copies the istio-cni binary into the host's CNI bin dir, \
writes the plugin's kubeconfig from this pod's service account, inserts the istio-cni entry last in the node's \
primary CNI configuration, and keeps all three in place until SIGTERM/SIGINT. Then it reads its own DaemonSet \
(DAEMONSET_NAME): gone or being deleted means an uninstall, and it removes all three; still there means a restart or \
an upgrade, and it leaves them in place for the next agent (as it does when the API server cannot tell).\n\n\
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

    /// Watch this node's injected pods for ones that started before the plugin was in place (their
    /// REPAIR_INIT_CONTAINER_NAME init container fails with REPAIR_INIT_CONTAINER_EXIT_CODE) and act on each once:
    /// repair, delete or label it (REPAIR_REPAIR_PODS > REPAIR_DELETE_PODS > REPAIR_LABEL_PODS).
    #[arg(long, env = REPAIR_ENABLED, value_name = REPAIR_ENABLED, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub repair_enabled: bool,

    /// Repair a broken pod in place: find its network namespace through the host's /proc and program its rules
    /// as the plugin would have (needs the host's /proc and CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN,
    /// CAP_NET_RAW; no extra RBAC). Istio's chart default.
    #[arg(long, env = REPAIR_REPAIR_PODS, value_name = REPAIR_REPAIR_PODS, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub repair_repair_pods: bool,

    /// Delete a broken pod so that its controller recreates it (needs RBAC: delete pods).
    #[arg(long, env = REPAIR_DELETE_PODS, value_name = REPAIR_DELETE_PODS, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub repair_delete_pods: bool,

    /// Label a broken pod with REPAIR_BROKEN_POD_LABEL_KEY=REPAIR_BROKEN_POD_LABEL_VALUE (needs RBAC: patch
    /// pods/status).
    #[arg(long, env = REPAIR_LABEL_PODS, value_name = REPAIR_LABEL_PODS, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub repair_label_pods: bool,

    /// Only pods with this annotation (any value) are considered; empty: every pod.
    #[arg(long, env = REPAIR_SIDECAR_ANNOTATION, value_name = REPAIR_SIDECAR_ANNOTATION, default_value = "sidecar.istio.io/status")]
    pub repair_sidecar_annotation: String,

    /// The init container that fails when the pod's traffic is not redirected; empty: any init container.
    #[arg(long, env = REPAIR_INIT_CONTAINER_NAME, value_name = REPAIR_INIT_CONTAINER_NAME, default_value = "istio-validation")]
    pub repair_init_container_name: String,

    /// Its exit code in that case (istio-validation's 126); 0: any non-zero exit code.
    #[arg(long, env = REPAIR_INIT_CONTAINER_EXIT_CODE, value_name = REPAIR_INIT_CONTAINER_EXIT_CODE, default_value = "126", value_parser = parse_exit_code)]
    pub repair_init_container_exit_code: i32,

    /// Its termination message in that case (compared without surrounding white space); empty: any message.
    #[arg(long, env = REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE, value_name = REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE, default_value = "")]
    pub repair_init_container_termination_message: String,

    /// Key of the label that REPAIR_LABEL_PODS sets.
    #[arg(long, env = REPAIR_BROKEN_POD_LABEL_KEY, value_name = REPAIR_BROKEN_POD_LABEL_KEY, default_value = "cni.istio.io/uninitialized")]
    pub repair_broken_pod_label_key: String,

    /// Value of the label that REPAIR_LABEL_PODS sets.
    #[arg(long, env = REPAIR_BROKEN_POD_LABEL_VALUE, value_name = REPAIR_BROKEN_POD_LABEL_VALUE, default_value = "true")]
    pub repair_broken_pod_label_value: String,

    /// The host's /proc as mounted in this container (read-only), where REPAIR_REPAIR_PODS finds pod network
    /// namespaces.
    #[arg(long, env = REPAIR_HOST_PROC_DIR, value_name = REPAIR_HOST_PROC_DIR, default_value = "/host/proc")]
    pub repair_host_proc_dir: PathBuf,

    /// This agent's pod name (the DaemonSet passes metadata.name): recorded in the run dir's owner record, which
    /// tells two agents on one node (a rolling update) which one is the newer.
    #[arg(long, env = POD_NAME, value_name = POD_NAME, default_value = "")]
    pub pod_name: String,

    /// The agent's own DaemonSet, in POD_NAMESPACE. On SIGTERM/SIGINT the agent reads it: not found, or being
    /// deleted, means an uninstall (the entry, the kubeconfig and the binary are removed); present means a restart or
    /// an upgrade (all three stay for the next agent, so no pod starts outside the mesh meanwhile). An answer it cannot
    /// get within SHUTDOWN_CHECK_SECONDS (a timeout, 403, no network) also leaves them in place; a 401 (the service
    /// account is gone) counts as an uninstall. Empty: no check, always remove them (outside Kubernetes). Needs RBAC:
    /// get on daemonsets/<this name> in POD_NAMESPACE.
    #[arg(long, env = DAEMONSET_NAME, value_name = DAEMONSET_NAME, default_value = DEFAULT_DAEMONSET_NAME)]
    pub daemonset_name: String,

    /// How long, retries included, the agent asks for its DaemonSet on SIGTERM before it gives up and leaves
    /// everything in place (1-300; keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = SHUTDOWN_CHECK_SECONDS, value_name = SHUTDOWN_CHECK_SECONDS, default_value = "5", value_parser = parse_check_seconds)]
    pub shutdown_check_seconds: u64,

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

fn parse_check_seconds(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=300).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of seconds (1-300)")),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port number (1-65535)")),
    }
}

/// A container exit code to match: 0 (any) to 255.
fn parse_exit_code(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(c) if (0..=255).contains(&c) => Ok(c),
        _ => Err(format!(
            "{s:?} is not an exit code (0-255; 0 matches any non-zero code)"
        )),
    }
}

/// A Kubernetes qualified name (label or annotation key): an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
pub fn check_qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) {
            return Err(format!(
                "prefix {p:?} is not a DNS subdomain (lower-case labels separated by dots, at most 253 characters)"
            ));
        }
    }
    check_label_value(name).and_then(|()| {
        if name.is_empty() {
            Err("the name part is empty".into())
        } else {
            Ok(())
        }
    })
}

/// A Kubernetes label value: empty, or at most 63 alphanumerics with `-`, `_`, `.` inside.
pub fn check_label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let bytes = s.as_bytes();
    if s.len() > 63
        || !bytes.iter().all(|&b| inner(b))
        || !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
    {
        return Err(format!(
            "{s:?} must be at most 63 characters, alphanumerics with '-', '_' or '.' inside"
        ));
    }
    Ok(())
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
    /// The repair controller; `None` when REPAIR_ENABLED is false or no mode is selected.
    pub repair: Option<RepairConfig>,
    /// This agent's pod (POD_NAME; empty outside a pod).
    pub pod_name: String,
    /// What to read on shutdown to tell an uninstall from a restart; `None` when DAEMONSET_NAME is empty.
    pub shutdown_check: Option<ShutdownCheck>,
}

/// The agent's own DaemonSet, read on shutdown, and how long the read may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownCheck {
    pub namespace: String,
    pub name: String,
    pub timeout: std::time::Duration,
}

/// What the repair controller does with a broken pod (Istio's precedence: repair > delete > label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    Repair,
    Delete,
    Label,
}

impl RepairMode {
    /// The mode from Istio's three switches, in Istio's precedence.
    pub fn select(repair: bool, delete: bool, label: bool) -> Option<RepairMode> {
        if repair {
            Some(RepairMode::Repair)
        } else if delete {
            Some(RepairMode::Delete)
        } else if label {
            Some(RepairMode::Label)
        } else {
            None
        }
    }

    /// The `type` label of `istio_cni_repair_pods_repaired_total` (Istio's values).
    pub fn as_str(self) -> &'static str {
        match self {
            RepairMode::Repair => "repair",
            RepairMode::Delete => "delete",
            RepairMode::Label => "label",
        }
    }
}

/// Which pods are broken: Istio's filter (`matchesFilter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenPodFilter {
    pub node_name: String,
    /// Empty: no annotation needed.
    pub sidecar_annotation: String,
    /// Empty: any init container.
    pub init_container_name: String,
    /// 0: any exit code.
    pub init_exit_code: i32,
    /// Trimmed; empty: any message.
    pub init_termination_message: String,
}

impl BrokenPodFilter {
    /// Istio's defaults (istio-validation failing with 126 in a pod with `sidecar.istio.io/status`) on `node`.
    pub fn istio(node: &str) -> BrokenPodFilter {
        BrokenPodFilter {
            node_name: node.to_string(),
            sidecar_annotation: cni_plugin::pod::STATUS_KEY.to_string(),
            init_container_name: "istio-validation".to_string(),
            init_exit_code: 126,
            init_termination_message: String::new(),
        }
    }
}

/// The validated repair settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairConfig {
    pub mode: RepairMode,
    pub filter: BrokenPodFilter,
    pub label_key: String,
    pub label_value: String,
    pub host_proc: PathBuf,
    /// The plugin's own configuration, as the entry the agent writes makes it: the repair takes the same
    /// decisions (excluded namespaces, the agent's own pods) and the same firewall backend as the plugin.
    pub plugin: cni_plugin::config::PluginConfig,
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
        if self.kubeconfig_mode & 0o027 != 0 {
            // It holds the service-account token: any host user who can read it can act as the agent.
            return Err(ConfigError::Invalid {
                var: KUBECONFIG_MODE,
                value: format!("{:04o}", self.kubeconfig_mode),
                reason: "the kubeconfig holds the service-account token: no access for others and no group \
                         write (0600, or 0640 for a group that may read it)"
                    .into(),
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
        let plugin = cni_plugin::config::PluginConfig::from_json(&entry.entry()).map_err(|e| {
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
        let shutdown_check = shutdown_check(
            self.daemonset_name.trim(),
            &self.pod_namespace,
            self.shutdown_check_seconds,
        )?;
        let repair = repair_config(
            RepairArgs {
                enabled: self.repair_enabled,
                repair: self.repair_repair_pods,
                delete: self.repair_delete_pods,
                label: self.repair_label_pods,
                sidecar_annotation: self.repair_sidecar_annotation,
                init_container_name: self.repair_init_container_name,
                init_exit_code: self.repair_init_container_exit_code,
                init_termination_message: self.repair_init_container_termination_message,
                label_key: self.repair_broken_pod_label_key,
                label_value: self.repair_broken_pod_label_value,
                host_proc: self.repair_host_proc_dir,
            },
            &node_name,
            plugin,
        )?;
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
            repair,
            pod_name: self.pod_name,
            shutdown_check,
        })
    }
}

/// The shutdown check's settings: `None` when DAEMONSET_NAME is empty; a name that cannot be a DaemonSet's, or a
/// name without the namespace to look in, stops the agent at start.
fn shutdown_check(
    name: &str,
    namespace: &str,
    seconds: u64,
) -> Result<Option<ShutdownCheck>, ConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    if !is_dns_subdomain(name) {
        return Err(ConfigError::Invalid {
            var: DAEMONSET_NAME,
            value: name.to_string(),
            reason:
                "not an object name (lower-case alphanumerics, '-' and '.', at most 253 characters)"
                    .into(),
        });
    }
    if namespace.is_empty() {
        return Err(ConfigError::Invalid {
            var: POD_NAMESPACE,
            value: String::new(),
            reason: format!(
                "{DAEMONSET_NAME}={name} is read in this namespace on shutdown: set it (the DaemonSet passes \
                 metadata.namespace), or set {DAEMONSET_NAME}=\"\" to always uninstall on shutdown"
            ),
        });
    }
    Ok(Some(ShutdownCheck {
        namespace: namespace.to_string(),
        name: name.to_string(),
        timeout: std::time::Duration::from_secs(seconds),
    }))
}

/// A DNS subdomain (a Kubernetes object name, a key prefix): at most 253 characters, labels of at most 63
/// lower-case alphanumerics and inner '-', separated by dots.
fn is_dns_subdomain(s: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(label_ok)
}

/// The repair arguments, as given.
struct RepairArgs {
    enabled: bool,
    repair: bool,
    delete: bool,
    label: bool,
    sidecar_annotation: String,
    init_container_name: String,
    init_exit_code: i32,
    init_termination_message: String,
    label_key: String,
    label_value: String,
    host_proc: PathBuf,
}

/// Validates the repair settings (only those the selected mode uses, so a setting Istio would ignore cannot stop
/// the agent); `None` when the repair is off.
fn repair_config(
    a: RepairArgs,
    node_name: &str,
    plugin: cni_plugin::config::PluginConfig,
) -> Result<Option<RepairConfig>, ConfigError> {
    if !a.enabled {
        return Ok(None);
    }
    let Some(mode) = RepairMode::select(a.repair, a.delete, a.label) else {
        return Ok(None);
    };
    let invalid = |var, value: &str, reason: String| ConfigError::Invalid {
        var,
        value: value.to_string(),
        reason,
    };
    let annotation = a.sidecar_annotation.trim().to_string();
    if !annotation.is_empty() {
        check_qualified_name(&annotation)
            .map_err(|r| invalid(REPAIR_SIDECAR_ANNOTATION, &annotation, r))?;
    }
    let container = a.init_container_name.trim().to_string();
    if container.len() > 63
        || !container
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            REPAIR_INIT_CONTAINER_NAME,
            &container,
            "not a container name (at most 63 lower-case alphanumerics and '-')".into(),
        ));
    }
    if mode == RepairMode::Label {
        check_qualified_name(&a.label_key)
            .map_err(|r| invalid(REPAIR_BROKEN_POD_LABEL_KEY, &a.label_key, r))?;
        check_label_value(&a.label_value)
            .map_err(|r| invalid(REPAIR_BROKEN_POD_LABEL_VALUE, &a.label_value, r))?;
    }
    if mode == RepairMode::Repair && !a.host_proc.is_absolute() {
        return Err(invalid(
            REPAIR_HOST_PROC_DIR,
            &a.host_proc.display().to_string(),
            "must be an absolute path".into(),
        ));
    }
    if node_name.is_empty() {
        return Err(invalid(
            KUBERNETES_NODE_NAME,
            "",
            "the repair controller watches this node's pods: set it (the DaemonSet passes spec.nodeName)"
                .into(),
        ));
    }
    Ok(Some(RepairConfig {
        mode,
        filter: BrokenPodFilter {
            node_name: node_name.to_string(),
            sidecar_annotation: annotation,
            init_container_name: container,
            init_exit_code: a.init_exit_code,
            init_termination_message: a.init_termination_message.trim().to_string(),
        },
        label_key: a.label_key,
        label_value: a.label_value,
        host_proc: a.host_proc,
        plugin,
    }))
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

    #[test]
    fn the_shutdown_check_needs_a_valid_name_and_its_namespace() {
        let check = shutdown_check("istio-cni-node", "kube-system", 5)
            .unwrap()
            .unwrap();
        assert_eq!(
            check,
            ShutdownCheck {
                namespace: "kube-system".into(),
                name: "istio-cni-node".into(),
                timeout: std::time::Duration::from_secs(5),
            }
        );
        // Empty: no check, whatever the namespace.
        assert_eq!(shutdown_check("", "", 5), Ok(None));
        let e = shutdown_check("istio-cni-node", "", 5).unwrap_err();
        assert!(
            e.to_string().starts_with("POD_NAMESPACE=\"\"")
                && e.to_string().contains("DAEMONSET_NAME"),
            "{e}"
        );
        for bad in ["Istio", "a_b", "-a", "a..b", "x/y", &"a".repeat(254)] {
            let e = shutdown_check(bad, "kube-system", 5).unwrap_err();
            assert!(e.to_string().starts_with("DAEMONSET_NAME="), "{bad}: {e}");
        }
        for bad in ["0", "301", "x", ""] {
            assert!(parse_check_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_check_seconds("300"), Ok(300));
        let a = Args::try_parse_from(["node-agent"]).unwrap();
        assert_eq!(
            (a.daemonset_name.as_str(), a.shutdown_check_seconds),
            ("istio-cni-node", 5)
        );
    }

    fn repair_args() -> RepairArgs {
        RepairArgs {
            enabled: true,
            repair: true,
            delete: false,
            label: false,
            sidecar_annotation: "sidecar.istio.io/status".into(),
            init_container_name: "istio-validation".into(),
            init_exit_code: 126,
            init_termination_message: String::new(),
            label_key: "cni.istio.io/uninitialized".into(),
            label_value: "true".into(),
            host_proc: PathBuf::from("/host/proc"),
        }
    }

    fn plugin() -> cni_plugin::config::PluginConfig {
        cni_plugin::config::PluginConfig::from_json(&serde_json::json!({"type": "istio-cni"}))
            .unwrap()
    }

    #[test]
    fn repair_defaults_are_istios() {
        let a = Args::try_parse_from(["node-agent"]).unwrap();
        assert!(a.repair_enabled && a.repair_repair_pods);
        assert!(!a.repair_delete_pods && !a.repair_label_pods);
        assert_eq!(a.repair_sidecar_annotation, "sidecar.istio.io/status");
        assert_eq!(a.repair_init_container_name, "istio-validation");
        assert_eq!(a.repair_init_container_exit_code, 126);
        assert_eq!(a.repair_init_container_termination_message, "");
        assert_eq!(a.repair_broken_pod_label_key, "cni.istio.io/uninitialized");
        assert_eq!(a.repair_broken_pod_label_value, "true");
        assert_eq!(a.repair_host_proc_dir, PathBuf::from("/host/proc"));
        let r = repair_config(repair_args(), "node-1", plugin())
            .unwrap()
            .unwrap();
        assert_eq!(r.mode, RepairMode::Repair);
        assert_eq!(r.filter.node_name, "node-1");
    }

    #[test]
    fn repair_modes_in_istios_precedence_or_off() {
        let mode = |repair, delete, label| {
            repair_config(
                RepairArgs {
                    repair,
                    delete,
                    label,
                    ..repair_args()
                },
                "n",
                plugin(),
            )
            .unwrap()
            .map(|r| r.mode)
        };
        assert_eq!(mode(true, true, true), Some(RepairMode::Repair));
        assert_eq!(mode(false, true, true), Some(RepairMode::Delete));
        assert_eq!(mode(false, false, true), Some(RepairMode::Label));
        assert_eq!(mode(false, false, false), None);
        let off = RepairArgs {
            enabled: false,
            ..repair_args()
        };
        assert_eq!(repair_config(off, "n", plugin()).unwrap(), None);
    }

    #[test]
    fn bad_repair_values_name_the_variable() {
        for bad in ["x", "-1", "256", "1.5"] {
            let flag = format!("--repair-init-container-exit-code={bad}");
            let err = Args::try_parse_from(["node-agent", flag.as_str()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("REPAIR_INIT_CONTAINER_EXIT_CODE"), "{err}");
        }
        let err = Args::try_parse_from(["node-agent", "--repair-label-pods", "yes"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("REPAIR_LABEL_PODS"), "{err}");
        let label = |key: &str, value: &str| RepairArgs {
            repair: false,
            label: true,
            label_key: key.into(),
            label_value: value.into(),
            ..repair_args()
        };
        for (args, var) in [
            (label("bad key", "true"), REPAIR_BROKEN_POD_LABEL_KEY),
            (label("Example.com/x", "true"), REPAIR_BROKEN_POD_LABEL_KEY),
            (label("cni.istio.io/", "true"), REPAIR_BROKEN_POD_LABEL_KEY),
            (label("ok", "-bad"), REPAIR_BROKEN_POD_LABEL_VALUE),
            (
                RepairArgs {
                    sidecar_annotation: "a/b/c".into(),
                    ..repair_args()
                },
                REPAIR_SIDECAR_ANNOTATION,
            ),
            (
                RepairArgs {
                    init_container_name: "Istio_Validation".into(),
                    ..repair_args()
                },
                REPAIR_INIT_CONTAINER_NAME,
            ),
            (
                RepairArgs {
                    host_proc: PathBuf::from("host/proc"),
                    ..repair_args()
                },
                REPAIR_HOST_PROC_DIR,
            ),
        ] {
            let e = repair_config(args, "n", plugin()).unwrap_err();
            assert!(e.to_string().starts_with(var), "{e}");
        }
        // A label Istio would not use (repair mode) cannot stop the agent.
        let unused = RepairArgs {
            label_key: "bad key".into(),
            ..repair_args()
        };
        assert!(repair_config(unused, "n", plugin()).is_ok());
        assert!(repair_config(label("example.com/x-y_z.1", ""), "n", plugin()).is_ok());
    }
}
