//! The CNI protocol: the request (environment + stdin), versions, result conversion and error objects.
//! Pure apart from [`Request::from_process`], which reads the process environment and stdin.

mod args;
mod error;
mod result;
mod version;

pub use args::CniArgs;
pub use error::{codes, CniError};
pub use result::{convert_result, empty_result};
pub use version::{supported_versions_json, CniVersion, SUPPORTED_VERSIONS};

use std::io::Read;
use std::path::PathBuf;

/// Largest network configuration accepted on stdin. Real conflist entries with a prevResult are a few KiB.
pub const MAX_STDIN: usize = 1 << 20;

/// The CNI operation requested by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "ADD" => Some(Command::Add),
            "DEL" => Some(Command::Del),
            "CHECK" => Some(Command::Check),
            "VERSION" => Some(Command::Version),
            "STATUS" => Some(Command::Status),
            "GC" => Some(Command::Gc),
            _ => None,
        }
    }

    /// The spelling used in CNI_COMMAND.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// The network configuration fields the protocol layer needs. The plugin's own keys are read by
/// [`crate::config::PluginConfig`] from the same JSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub plugin_type: String,
    /// The previous plugin's result, as sent (in `cni_version`'s format).
    pub prev_result: Option<serde_json::Value>,
    /// The whole configuration.
    pub raw: serde_json::Value,
}

/// One invocation of the plugin, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`; `None` when empty (allowed for DEL).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    /// Present for every command but VERSION.
    pub conf: Option<NetConf>,
}

fn required(cmd: Command, var: &str) -> bool {
    match cmd {
        Command::Add | Command::Check => matches!(
            var,
            "CNI_CONTAINERID" | "CNI_NETNS" | "CNI_IFNAME" | "CNI_PATH"
        ),
        Command::Del => matches!(var, "CNI_CONTAINERID" | "CNI_IFNAME" | "CNI_PATH"),
        Command::Version | Command::Status | Command::Gc => false,
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, the CNI rule for container IDs and network names.
fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The kernel's rule for interface names (dev_valid_name), as CNI's ValidateInterfaceName.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Request {
    /// Reads the request from the process: environment and stdin (bounded by [`MAX_STDIN`]).
    pub fn from_process() -> Result<Self, CniError> {
        let get = |k: &str| std::env::var(k).ok();
        let cmd = Self::command_from_env(&get)?;
        let mut stdin = Vec::new();
        if cmd != Command::Version {
            std::io::stdin()
                .take(MAX_STDIN as u64 + 1)
                .read_to_end(&mut stdin)
                .map_err(|e| {
                    CniError::new(codes::IO_FAILURE, "cannot read stdin", e.to_string())
                })?;
        }
        Self::parse(&get, &stdin)
    }

    fn command_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
        let raw = get("CNI_COMMAND").unwrap_or_default();
        if raw.is_empty() {
            return Err(CniError::new(
                codes::INVALID_ENVIRONMENT,
                "required env variables [CNI_COMMAND] missing",
                "",
            ));
        }
        Command::parse(&raw).ok_or_else(|| {
            CniError::new(
                codes::INVALID_ENVIRONMENT,
                format!("unknown CNI_COMMAND: {raw:?}"),
                "expected one of ADD, DEL, CHECK, VERSION, STATUS, GC",
            )
        })
    }

    /// Validates environment and stdin into a request. `get` reads an environment variable.
    pub fn parse(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Self, CniError> {
        let command = Self::command_from_env(get)?;
        let var = |k: &str| get(k).unwrap_or_default();
        let missing: Vec<&str> = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            .into_iter()
            .filter(|k| required(command, k) && var(k).is_empty())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                codes::INVALID_ENVIRONMENT,
                format!("required env variables [{}] missing", missing.join(",")),
                "",
            ));
        }
        let args = CniArgs::parse(&var("CNI_ARGS"))?;
        let mut req = Request {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: Some(var("CNI_NETNS"))
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
            args,
            conf: None,
        };
        if command == Command::Version {
            return Ok(req);
        }
        if matches!(command, Command::Add | Command::Check | Command::Del) {
            if !valid_identifier(&req.container_id) {
                return Err(CniError::new(
                    codes::INVALID_ENVIRONMENT,
                    format!("invalid CNI_CONTAINERID {:?}", req.container_id),
                    "must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
                ));
            }
            if !valid_ifname(&req.ifname) {
                return Err(CniError::new(
                    codes::INVALID_ENVIRONMENT,
                    format!("invalid CNI_IFNAME {:?}", req.ifname),
                    "1 to 15 bytes, no '/', ':' or whitespace, not '.' or '..'",
                ));
            }
        }
        let conf = NetConf::parse(stdin)?;
        match command {
            Command::Check if conf.cni_version < CniVersion::V0_4_0 => {
                return Err(CniError::new(
                    codes::INCOMPATIBLE_VERSION,
                    "config version does not allow CHECK",
                    format!("cniVersion {} < 0.4.0", conf.cni_version),
                ))
            }
            Command::Status | Command::Gc if conf.cni_version < CniVersion::V1_1_0 => {
                return Err(CniError::new(
                    codes::INCOMPATIBLE_VERSION,
                    format!("config version does not allow {}", command.as_str()),
                    format!("cniVersion {} < 1.1.0", conf.cni_version),
                ))
            }
            _ => {}
        }
        req.conf = Some(conf);
        Ok(req)
    }
}

impl NetConf {
    /// Decodes and validates the network configuration on stdin.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.len() > MAX_STDIN {
            return Err(CniError::new(
                codes::DECODING_FAILURE,
                format!("network configuration on stdin exceeds {MAX_STDIN} bytes"),
                "",
            ));
        }
        if stdin.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(CniError::new(
                codes::DECODING_FAILURE,
                "network configuration on stdin is empty",
                "",
            ));
        }
        let raw: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                codes::DECODING_FAILURE,
                "error decoding network configuration",
                e.to_string(),
            )
        })?;
        let obj = raw.as_object().ok_or_else(|| {
            CniError::new(
                codes::DECODING_FAILURE,
                "network configuration is not a JSON object",
                "",
            )
        })?;
        let str_field = |k: &str| -> Result<String, CniError> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(String::new()),
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(CniError::new(
                    codes::DECODING_FAILURE,
                    format!("network configuration field {k:?} is not a string"),
                    other.to_string(),
                )),
            }
        };
        let version_str = str_field("cniVersion")?;
        // An absent cniVersion means 0.1.0, as in libcni.
        let cni_version = if version_str.is_empty() {
            CniVersion::V0_1_0
        } else {
            CniVersion::parse(&version_str).ok_or_else(|| {
                CniError::new(
                    codes::INCOMPATIBLE_VERSION,
                    "incompatible CNI versions",
                    format!(
                        "config is {version_str:?}, plugin supports [{}]",
                        SUPPORTED_VERSIONS.join(" ")
                    ),
                )
            })?
        };
        let name = str_field("name")?;
        if name.is_empty() {
            return Err(CniError::new(
                codes::INVALID_NETWORK_CONFIG,
                "missing network name",
                "",
            ));
        }
        if !valid_identifier(&name) {
            return Err(CniError::new(
                codes::INVALID_NETWORK_CONFIG,
                format!("invalid network name {name:?}"),
                "must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
            ));
        }
        let plugin_type = str_field("type")?;
        let prev_result = match obj.get("prevResult") {
            None | Some(serde_json::Value::Null) => None,
            Some(v @ serde_json::Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(CniError::new(
                    codes::DECODING_FAILURE,
                    "prevResult is not a JSON object",
                    other.to_string(),
                ))
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            prev_result,
            raw,
        })
    }
}

#[cfg(test)]
mod tests;
