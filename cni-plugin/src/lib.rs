//! meshcni's `istio-cni`: a chained CNI plugin that installs Istio's sidecar redirect rules in the pod's network
//! namespace. The core (config, pod, redirect, rules) is pure; the edges (cni I/O, lookup, netns, apply) do the I/O.

pub mod apply;
pub mod arena;
pub mod cni;
#[doc(hidden)]
pub mod compat;
pub mod config;
pub mod error;
pub mod lookup;
pub mod netns;
pub mod plugin;
pub mod pod;
pub mod redact;
pub mod redirect;
pub mod report;
pub mod rules;
pub mod sockets;

/// The message of a panic payload (`panic!` with a literal or a formatted string), for turning panics into errors.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
