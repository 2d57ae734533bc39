//! The CNI error object printed on stdout when the plugin fails.

use std::fmt;

/// CNI error codes: the spec's, and ours from 100.
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The pod could not be looked up and retrying will not help (not found, unauthorized, bad kubeconfig).
    pub const POD_LOOKUP: u32 = 100;
    /// A pod annotation or proxy setting is invalid; no rule was installed.
    pub const INVALID_REDIRECT: u32 = 101;
    /// The pod's network namespace cannot be used (missing, not a netns, or the host's own).
    pub const NETNS: u32 = 102;
    /// Programming the rules or routes in the pod netns failed; nothing of ours is left behind.
    pub const APPLY: u32 = 103;
    /// An internal error (a bug, e.g. a panic).
    pub const INTERNAL: u32 = 104;

    /// The code's name in snake_case, for metric labels (`other` for a code this plugin never returns).
    pub fn name(code: u32) -> &'static str {
        match code {
            INCOMPATIBLE_VERSION => "incompatible_version",
            UNSUPPORTED_FIELD => "unsupported_field",
            UNKNOWN_CONTAINER => "unknown_container",
            INVALID_ENVIRONMENT => "invalid_environment",
            IO_FAILURE => "io_failure",
            DECODING_FAILURE => "decoding_failure",
            INVALID_NETWORK_CONFIG => "invalid_network_config",
            TRY_AGAIN_LATER => "try_again_later",
            POD_LOOKUP => "pod_lookup",
            INVALID_REDIRECT => "invalid_redirect",
            NETNS => "netns",
            APPLY => "apply",
            INTERNAL => "internal",
            _ => "other",
        }
    }
}

/// A CNI error: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object printed on stdout; `cni_version` is the request's (or the newest when unknown).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
