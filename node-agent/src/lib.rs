//! meshcni's node agent (Istio's install-cni): installs the istio-cni plugin on a node (binary, kubeconfig, the
//! entry in the primary CNI configuration), keeps it in place while it runs, and removes it on SIGTERM/SIGINT.
//! The core (config validation, conflist editing, kubeconfig rendering, fight detection) is pure; `install` applies
//! it with atomic writes; `watch`, `server` and `agent` are the edges.

pub mod agent;
pub mod config;
pub mod events;
pub mod install;
pub mod pluginlog;
pub mod podcache;
pub mod podsock;
pub mod repair;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod uds;
pub mod watch;
