//! The one place where module errors become CNI error codes, and the crate's walk of error chains.

use std::error::Error as StdError;

use crate::apply::ApplyError;
use crate::cni::{codes, CniError};
use crate::config::ConfigError;
use crate::lookup::LookupError;
use crate::redirect::RedirectError;

/// Everything that can fail an invocation of the plugin. Module errors are boxed: they are large and rare.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Protocol-level failure, already carrying its code.
    #[error("{0}")]
    Cni(#[from] CniError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The lookup error names the pod itself.
    #[error("pod {}: {}", .0.pod, .0)]
    Lookup(#[source] Box<LookupError>),
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

/// The error and its causes, outermost first: each `source()`, and also the error an `io::Error` wraps (its
/// `source()` skips that one; hyper-util wraps rustls' errors so). The crate's one walk of error chains.
pub fn causes<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        }
    })
}

/// The error's text and its causes', joined by ": ", leaving out a cause whose text is already shown.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    for text in causes(err).map(|e| e.to_string()) {
        if out.is_empty() {
            out = text;
        } else if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

impl PluginError {
    /// The CNI error code of this failure.
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Cni(e) => e.code,
            PluginError::Config(ConfigError::Decode(_)) => codes::DECODING_FAILURE,
            PluginError::Config(_) => codes::INVALID_NETWORK_CONFIG,
            PluginError::Lookup(e) if e.is_transient() => codes::TRY_AGAIN_LATER,
            PluginError::Lookup(_) => codes::POD_LOOKUP,
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
            other => CniError::new(
                other.code(),
                other.to_string(),
                StdError::source(other).map(error_chain).unwrap_or_default(),
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// kube's outermost error around a connection failure.
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    pub(crate) struct Outer(#[source] pub(crate) std::io::Error);

    /// What rustls reports for a certificate from an unknown CA.
    pub(crate) fn unknown_issuer() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        )
    }

    #[test]
    fn chain_shows_every_cause_once_also_inside_a_wrapped_io_error() {
        let wrapped = Outer(std::io::Error::other(unknown_issuer()));
        assert_eq!(
            error_chain(&wrapped),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        let kinds: Vec<_> = causes(&wrapped)
            .filter_map(|e| e.downcast_ref::<std::io::Error>().map(|io| io.kind()))
            .collect();
        assert_eq!(
            kinds,
            [std::io::ErrorKind::Other, std::io::ErrorKind::InvalidData]
        );
    }

    #[test]
    fn cni_details_carry_the_cause_chain_without_the_message() {
        let e = PluginError::Config(crate::config::ConfigError::Decode(
            serde_json::from_str::<u8>("x").unwrap_err(),
        ));
        let cni = e.to_cni();
        assert_eq!(cni.code, codes::DECODING_FAILURE);
        assert!(cni.msg.contains("expected value"), "{cni:?}");
        assert!(cni.details.starts_with("expected value"), "{cni:?}");
    }
}
