//! The one place where module errors become CNI error codes.

use crate::apply::ApplyError;
use crate::cni::{codes, CniError};
use crate::config::ConfigError;
use crate::kube::KubeError;
use crate::redirect::RedirectError;

/// Everything that can fail an invocation of the plugin. Module errors are boxed: they are large and rare.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Protocol-level failure, already carrying its code.
    #[error("{0}")]
    Cni(#[from] CniError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("pod {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("pod {namespace}/{name}: {source}")]
    Redirect {
        namespace: String,
        name: String,
        #[source]
        source: Box<RedirectError>,
    },
    #[error("pod {namespace}/{name}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: Box<ApplyError>,
    },
    #[error("istio-cni panicked: {0}")]
    Panic(String),
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out.join(": ")
}

impl PluginError {
    /// The CNI error code of this failure.
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Cni(e) => e.code,
            PluginError::Config(ConfigError::Decode(_)) => codes::DECODING_FAILURE,
            PluginError::Config(_) => codes::INVALID_NETWORK_CONFIG,
            PluginError::Kube { source, .. } if source.is_transient() => codes::TRY_AGAIN_LATER,
            PluginError::Kube { .. } => codes::POD_LOOKUP,
            PluginError::Redirect { .. } => codes::INVALID_REDIRECT,
            PluginError::Apply { source, .. } if source.is_netns() => codes::NETNS,
            PluginError::Apply { .. } => codes::APPLY,
            PluginError::Panic(_) => codes::INTERNAL,
        }
    }

    /// The CNI error object: `msg` says what failed, `details` carries the cause chain.
    pub fn to_cni(&self) -> CniError {
        match self {
            PluginError::Cni(e) => e.clone(),
            other => CniError::new(other.code(), other.to_string(), chain(other)),
        }
    }
}
