//! meshcni's `istio-cni`: a chained CNI plugin that installs Istio's sidecar redirect rules in the pod's network
//! namespace. The core (config, pod, redirect, rules) is pure; the edges (cni I/O, kube, netns, apply) do the I/O.

pub mod apply;
pub mod cni;
pub mod config;
pub mod error;
pub mod kube;
pub mod netns;
pub mod plugin;
pub mod pod;
pub mod redirect;
pub mod rules;
