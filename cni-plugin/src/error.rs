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

/// The causes of `err` that `msg` does not already show, outermost first, joined by ": ". Our messages embed their
/// cause (`"...: {source}"`), so this is usually empty; a cause whose text a message leaves out (an `io::Error`
/// behind "cannot read X") is kept. The runtime prints `msg; details` (libcni), so repeating `msg` there showed
/// every failure twice in the pod's events.
fn details(msg: &str, err: &dyn std::error::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !msg.contains(&text) && !out.iter().any(|o| o.contains(&text)) {
            out.push(text);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    struct Outer(#[source] Terse);

    #[test]
    fn details_keep_the_causes_msg_leaves_out() {
        let err = Outer(Terse {
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
