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

    /// The CNI error object: `msg` says what failed and with which value; `details` adds only the causes `msg`
    /// does not already show (empty when it shows them all).
    pub fn to_cni(&self) -> CniError {
        match self {
            PluginError::Cni(e) => e.clone(),
            other => {
                let msg = other.to_string();
                let details = details(&msg, other);
                CniError::new(other.code(), msg, details)
            }
        }
    }
}

/// The causes of `err` that `msg` does not already show, outermost first, joined by ": ". Our messages embed their
/// cause (`"...: {source}"`), so this is usually empty; a cause whose text a message leaves out (an `io::Error`
/// behind "cannot read X") is kept. The runtime prints `msg; details` (libcni), so repeating `msg` there showed
/// every failure twice in the pod's events.
fn details(msg: &str, err: &(dyn StdError + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    for text in causes(err).skip(1).map(|e| e.to_string()) {
        if !text.is_empty() && !msg.contains(&text) && !out.iter().any(|o| o.contains(&text)) {
            out.push(text);
        }
    }
    out.join(": ")
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
    fn cni_details_do_not_repeat_what_msg_shows() {
        let e = PluginError::Config(crate::config::ConfigError::Decode(
            serde_json::from_str::<u8>("x").unwrap_err(),
        ));
        let cni = e.to_cni();
        assert_eq!(cni.code, codes::DECODING_FAILURE);
        assert!(cni.msg.contains("expected value"), "{cni:?}");
        assert_eq!(cni.details, "", "{cni:?}");
    }

    /// As containerd shows a failed ADD in the pod's events: libcni's `msg; details` (`msg` alone when empty).
    fn as_event(e: &CniError) -> String {
        if e.details.is_empty() {
            e.msg.clone()
        } else {
            format!("{}; {}", e.msg, e.details)
        }
    }

    #[test]
    fn a_bad_annotation_is_named_once_with_its_value() {
        let err = PluginError::Redirect {
            namespace: "default".into(),
            name: "bad".into(),
            source: Box::new(RedirectError::Annotation {
                annotation: "traffic.sidecar.istio.io/includeInboundPorts",
                value: "80,http".into(),
                reason: "\"http\" is not a decimal port number".into(),
            }),
        };
        let cni = err.to_cni();
        assert_eq!(cni.code, codes::INVALID_REDIRECT);
        assert_eq!(
            cni.msg,
            "pod default/bad: annotation traffic.sidecar.istio.io/includeInboundPorts has an invalid value \
             \"80,http\": \"http\" is not a decimal port number"
        );
        assert_eq!(cni.details, "", "details must not repeat msg");
        let event = as_event(&cni);
        assert_eq!(event.matches("includeInboundPorts").count(), 1, "{event}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Terse {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("kubeconfig: {0}")]
    struct KubeconfigOuter(#[source] Terse);

    #[test]
    fn details_keep_the_causes_msg_leaves_out() {
        let err = KubeconfigOuter(Terse {
            path: "/etc/cni/net.d/istio-cni-kubeconfig",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        let msg = err.to_string();
        assert_eq!(
            msg,
            "kubeconfig: cannot read /etc/cni/net.d/istio-cni-kubeconfig"
        );
        // The middle cause is in msg already; the io::Error at the end is not.
        assert_eq!(
            details(&msg, &err),
            "No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_cause_already_in_msg_is_dropped() {
        let io = std::io::Error::other("connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot reach the API server: {source}")]
        struct Verbose {
            source: std::io::Error,
        }
        let err = Verbose { source: io };
        assert_eq!(details(&err.to_string(), &err), "");
    }
}
