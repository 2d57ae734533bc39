//! One invocation of the plugin, from a validated request to the value printed on stdout.
//! The order of checks is Istio's: no Kubernetes args, excluded namespace and the agent's own pod are passed
//! through before the kubeconfig is read; then the pod lookup, the decision, the redirect, and the rules.

use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::apply;
use crate::cni::{
    codes, convert_result, empty_result, supported_versions_json, CniError, Command, Request,
};
use crate::config::PluginConfig;
use crate::error::PluginError;
use crate::lookup::{self, LookupPolicy, PodRef};
use crate::pod::{decide, Decision, SkipReason};
use crate::redirect::Redirect;
use crate::report::{AddRecord, Outcome, NO_BACKEND};

/// What an ADD decided; returned for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// CNI_ARGS carry no pod name/namespace.
    NotKubernetes,
    NamespaceExcluded,
    AgentPod,
    /// The pod was looked up and needs no redirect.
    Skipped(SkipReason),
    /// Rules were programmed with the named backend.
    Redirected(&'static str),
}

/// The ADD record of a result (`latency`: from the plugin's start), as the agent counts it.
pub fn add_record(result: Result<&AddOutcome, &PluginError>, latency: Duration) -> AddRecord {
    let (outcome, reason, backend, detail) = match result {
        Ok(AddOutcome::Redirected(backend)) => (Outcome::Redirected, "", *backend, String::new()),
        Ok(AddOutcome::NotKubernetes) => (
            Outcome::Skipped,
            "not_kubernetes",
            NO_BACKEND,
            "no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS".to_string(),
        ),
        Ok(AddOutcome::NamespaceExcluded) => (
            Outcome::Skipped,
            "namespace_excluded",
            NO_BACKEND,
            "the namespace is in exclude_namespaces".to_string(),
        ),
        Ok(AddOutcome::AgentPod) => (
            Outcome::Skipped,
            "agent_pod",
            NO_BACKEND,
            "the istio-cni agent's own pod".to_string(),
        ),
        Ok(AddOutcome::Skipped(reason)) => (
            Outcome::Skipped,
            reason.label(),
            NO_BACKEND,
            reason.to_string(),
        ),
        Err(e) => (
            Outcome::Failed,
            codes::name(e.code()),
            NO_BACKEND,
            e.to_string(),
        ),
    };
    AddRecord {
        outcome,
        reason: reason.to_string(),
        backend: backend.to_string(),
        latency,
        detail,
    }
}

/// Runs a request. `init_logging` is called once the configuration (and so the log level) is known; `started` is
/// when the plugin started, for the ADD's latency. Every error after `init_logging` is logged here, in the
/// invocation's span; an ADD ends with its [`AddRecord`] line.
/// Returns what goes to stdout (nothing for DEL/CHECK/STATUS/GC).
pub fn execute(
    req: &Request,
    started: Instant,
    init_logging: impl FnOnce(&PluginConfig),
) -> Result<Option<Value>, PluginError> {
    let Some(conf) = req.conf.as_ref() else {
        return Ok(Some(supported_versions_json()));
    };
    let cfg = PluginConfig::from_json(&conf.raw)?;
    init_logging(&cfg);
    let span = tracing::info_span!(
        "cni",
        command = req.command.as_str(),
        container_id = %req.container_id,
        namespace = req.args.k8s_pod_namespace.as_deref().unwrap_or(""),
        pod = req.args.k8s_pod_name.as_deref().unwrap_or(""),
        netns = %req.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
    );
    let _enter = span.enter();
    let result = match req.command {
        Command::Add => {
            // The answer is computed first: a malformed prevResult fails the ADD before anything happens.
            let answer = match conf.prev_result.as_ref() {
                Some(prev) => convert_result(prev, conf.cni_version).map_err(PluginError::from),
                None => Ok(empty_result(conf.cni_version)),
            };
            let outcome = answer.and_then(|a| add(req, &cfg).map(|o| (a, o)));
            if let Ok((_, outcome)) = &outcome {
                info!(outcome = ?outcome, "ADD done");
            }
            let result = outcome.map(|(answer, outcome)| (Some(answer), outcome));
            let record = add_record(result.as_ref().map(|(_, o)| o), started.elapsed());
            if let Err(e) = &result {
                log_error(e);
            }
            record.emit();
            return result.map(|(answer, _)| answer);
        }
        Command::Version => Ok(Some(supported_versions_json())),
        // Istio's plugin keeps no per-pod state: the rules go away with the netns.
        Command::Del | Command::Check | Command::Status | Command::Gc => {
            debug!("nothing to do");
            Ok(None)
        }
    };
    if let Err(e) = &result {
        log_error(e);
    }
    result
}

/// The one log line of a failure.
pub fn log_error(e: &PluginError) {
    let cni = e.to_cni();
    error!(code = cni.code, error = %cni.msg, details = %cni.details, "istio-cni failed");
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
                _ if miss.is_expected() => {
                    info!(%miss, "not answered by the agent's cache; asking the API server")
                }
                _ => warn!(%miss, "not answered by the agent's cache; asking the API server"),
            }
            lookup::pod(&cfg.kubeconfig, &pod, uid, &policy).map_err(PluginError::Lookup)?
        }
    };
    if let Decision::Skip(reason) = decide(&pi) {
        info!(%reason, "no redirect");
        return Ok(AddOutcome::Skipped(reason));
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
    // The plugin exits after this: the netns work runs on this thread (no worker thread to hand over to).
    let programmed = apply::program_with(
        netns,
        cfg.backend,
        &apply::Target::Redirect(redirect),
        apply::Worker::CallingThreadThenExit,
    )
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
    fn every_outcome_has_its_record_labels() {
        let t = Duration::from_millis(2);
        let r = add_record(Ok(&AddOutcome::Redirected("iptables-nft")), t);
        assert_eq!(
            (r.outcome, r.reason.as_str(), r.backend.as_str(), r.latency),
            (Outcome::Redirected, "", "iptables-nft", t)
        );
        for (outcome, reason) in [
            (AddOutcome::NotKubernetes, "not_kubernetes"),
            (AddOutcome::NamespaceExcluded, "namespace_excluded"),
            (AddOutcome::AgentPod, "agent_pod"),
            (
                AddOutcome::Skipped(SkipReason::NoSidecarStatus),
                "no_sidecar_status",
            ),
            (
                AddOutcome::Skipped(SkipReason::InjectDisabled("false".into())),
                "inject_disabled",
            ),
        ] {
            let r = add_record(Ok(&outcome), t);
            assert_eq!((r.outcome, r.reason.as_str()), (Outcome::Skipped, reason));
            assert_eq!(r.backend, NO_BACKEND);
            assert!(!r.detail.is_empty());
        }
        let e = PluginError::Panic("boom".into());
        let r = add_record(Err(&e), t);
        assert_eq!(
            (r.outcome, r.reason.as_str()),
            (Outcome::Failed, "internal")
        );
        assert!(r.detail.contains("boom"), "{r:?}");
        let e = PluginError::Cni(CniError::new(codes::TRY_AGAIN_LATER, "later", ""));
        assert_eq!(add_record(Err(&e), t).reason, "try_again_later");
    }

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
