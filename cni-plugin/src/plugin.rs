//! One invocation of the plugin, from a validated request to the value printed on stdout.
//! The order of checks is Istio's: no Kubernetes args, excluded namespace and the agent's own pod are passed
//! through before the kubeconfig is read; then the pod lookup, the decision, the redirect, and the rules.

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::apply;
use crate::cni::{
    codes, convert_result, empty_result, supported_versions_json, CniError, Command, Request,
};
use crate::config::{LogLevel, PluginConfig};
use crate::error::PluginError;
use crate::lookup::{self, LookupPolicy, PodRef};
use crate::pod::{decide, Decision};
use crate::redirect::Redirect;

/// What an ADD decided; returned for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// CNI_ARGS carry no pod name/namespace.
    NotKubernetes,
    NamespaceExcluded,
    AgentPod,
    /// The pod was looked up and needs no redirect.
    Skipped(String),
    /// Rules were programmed with the named backend.
    Redirected(&'static str),
}

/// Runs a request. `init_logging` is called once the configuration (and so the log level) is known.
/// Returns what goes to stdout (nothing for DEL/CHECK/STATUS/GC).
pub fn execute(
    req: &Request,
    init_logging: impl FnOnce(LogLevel),
) -> Result<Option<Value>, PluginError> {
    let Some(conf) = req.conf.as_ref() else {
        init_logging(LogLevel::Info);
        return Ok(Some(supported_versions_json()));
    };
    let cfg = PluginConfig::from_json(&conf.raw)?;
    init_logging(cfg.log_level);
    let span = tracing::info_span!(
        "cni",
        command = req.command.as_str(),
        container_id = %req.container_id,
        namespace = req.args.k8s_pod_namespace.as_deref().unwrap_or(""),
        pod = req.args.k8s_pod_name.as_deref().unwrap_or(""),
        netns = %req.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
    );
    let _enter = span.enter();
    match req.command {
        Command::Add => {
            // The answer is computed first: a malformed prevResult fails the ADD before anything happens.
            let answer = match conf.prev_result.as_ref() {
                Some(prev) => convert_result(prev, conf.cni_version)?,
                None => empty_result(conf.cni_version),
            };
            let outcome = add(req, &cfg)?;
            info!(outcome = ?outcome, "ADD done");
            Ok(Some(answer))
        }
        Command::Version => Ok(Some(supported_versions_json())),
        // Istio's plugin keeps no per-pod state: the rules go away with the netns.
        Command::Del | Command::Check | Command::Status | Command::Gc => {
            debug!("nothing to do");
            Ok(None)
        }
    }
}

/// Runs `f`, turning a panic into [`PluginError::Panic`] so that it ends as a CNI error, never a crash.
pub fn catch_panic<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, PluginError> {
    std::panic::catch_unwind(f).map_err(|p| PluginError::Panic(crate::panic_message(p.as_ref())))
}

/// The ADD decision and programming.
pub fn add(req: &Request, cfg: &PluginConfig) -> Result<AddOutcome, PluginError> {
    let Some((namespace, name)) = req.args.pod() else {
        debug!("no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS: not a Kubernetes pod");
        return Ok(AddOutcome::NotKubernetes);
    };
    if cfg.namespace_excluded(namespace) {
        info!("namespace {namespace} is excluded");
        return Ok(AddOutcome::NamespaceExcluded);
    }
    if cfg.is_agent_pod(namespace, name) {
        info!("{name} is the istio-cni agent's own pod");
        return Ok(AddOutcome::AgentPod);
    }
    if cfg.ambient_enabled {
        warn!("ambient_enabled is set but this plugin implements sidecar mode only; ambient pods are not captured");
    }
    let policy = LookupPolicy {
        deadline: cfg.pod_lookup_timeout,
        ..LookupPolicy::default()
    };
    let pod = PodRef::new(namespace, name);
    let uid = req.args.k8s_pod_uid.as_deref();
    // The agent's cache first; on any miss our own GET, so a broken or absent agent never decides for a pod.
    let pi = match lookup::agent::ask(
        &cfg.agent_run_dir,
        &pod,
        uid,
        lookup::agent::DEFAULT_DEADLINE,
    ) {
        Ok(pi) => {
            debug!("pod found in the agent's cache");
            pi
        }
        Err(miss) => {
            match miss {
                lookup::agent::Miss::NoSocket { .. } => debug!(%miss, "asking the API server"),
                _ => info!(%miss, "not answered by the agent's cache; asking the API server"),
            }
            lookup::pod(&cfg.kubeconfig, &pod, &policy).map_err(PluginError::Lookup)?
        }
    };
    if let Decision::Skip(reason) = decide(&pi) {
        info!(%reason, "no redirect");
        return Ok(AddOutcome::Skipped(reason.to_string()));
    }
    let redirect = Redirect::from_pod(&pi).map_err(|source| PluginError::Redirect {
        namespace: namespace.into(),
        name: name.into(),
        source: Box::new(source),
    })?;
    // Only now is the netns opened: a pod that needs nothing never pays for it.
    let netns = req.netns.as_deref().ok_or_else(|| {
        // Unreachable through Request::parse (CNI_NETNS is required for ADD), kept as a closed failure.
        CniError::new(
            codes::INVALID_ENVIRONMENT,
            "required env variables [CNI_NETNS] missing",
            "",
        )
    })?;
    let programmed = apply::program(netns, cfg.backend, &apply::Target::Redirect(redirect))
        .map_err(|source| PluginError::Apply {
            namespace: namespace.into(),
            name: name.into(),
            source: Box::new(source),
        })?;
    info!(backend = programmed.backend.name(), v4 = ?programmed.v4, v6 = ?programmed.v6, "rules programmed");
    Ok(AddOutcome::Redirected(programmed.backend.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_cni_error() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = catch_panic(|| -> u32 { panic!("boom {}", 42) });
        std::panic::set_hook(prev);
        let e = r.unwrap_err();
        assert_eq!(e.code(), codes::INTERNAL);
        let cni = e.to_cni();
        assert!(cni.msg.contains("boom 42"), "{cni:?}");
        assert_eq!(catch_panic(|| 7).unwrap(), 7);
    }
}
