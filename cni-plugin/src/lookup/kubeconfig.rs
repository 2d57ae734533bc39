//! The plugin's kubeconfig (YAML or JSON, written by the node agent) into a kube `Config`: current context,
//! `https` only, proxies cleared, kube's own retries off.

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Config;
use tracing::warn;

use super::LookupErrorKind;
use crate::error::error_chain;

/// A value for the kubeconfig's `proxy-url` while the kube config is built. kube reads `HTTPS_PROXY` from the
/// environment only when the kubeconfig names no proxy, and fails on a value it cannot parse; a placeholder here
/// keeps the environment out entirely. The resulting `proxy_url` is cleared before the client is built.
const PROXY_PLACEHOLDER: &str = "http://127.0.0.1:9";

/// Reads and parses the kubeconfig and builds the kube `Config` from its current context, with the proxy cleared,
/// kube's own retries off and the connect timeout set. No I/O beyond reading the files the kubeconfig names (CA
/// file, if any).
pub fn load_config(
    kubeconfig: &Path,
    request_timeout: Duration,
) -> Result<Config, LookupErrorKind> {
    let invalid = |detail: String| LookupErrorKind::KubeconfigInvalid { detail };
    // Read it ourselves first: a missing or unreadable file is reported as such, not as a parse error.
    if let Err(e) = std::fs::metadata(kubeconfig) {
        return Err(LookupErrorKind::KubeconfigUnreadable {
            detail: e.to_string(),
        });
    }
    let mut kc = Kubeconfig::read_from(kubeconfig).map_err(|e| match e {
        kube::config::KubeconfigError::ReadConfig(io, _) => LookupErrorKind::KubeconfigUnreadable {
            detail: io.to_string(),
        },
        other => invalid(error_chain(&other)),
    })?;
    for named in kc.clusters.iter_mut() {
        if let Some(cluster) = named.cluster.as_mut() {
            if let Some(p) = cluster.proxy_url.as_deref().filter(|p| !p.is_empty()) {
                warn!(
                    kubeconfig = %kubeconfig.display(),
                    cluster = %named.name,
                    proxy_url = p,
                    "ignoring proxy-url of the kubeconfig: the plugin talks to the API server directly"
                );
            }
            cluster.proxy_url = Some(PROXY_PLACEHOLDER.to_string());
        }
    }
    register_tokens(&kc);
    let mut config = now_or_on_a_runtime(Config::from_custom_kubeconfig(
        kc,
        &KubeConfigOptions::default(),
    ))?
    .map_err(|e| invalid(error_chain(&e)))?;
    config.proxy_url = None;
    config.default_retry = false;
    config.connect_timeout = Some(request_timeout);
    if config.cluster_url.scheme_str() != Some("https") {
        return Err(invalid(format!(
            "server {} is not https: the bearer token must not travel in clear text",
            config.cluster_url
        )));
    }
    if config.accept_invalid_certs {
        warn!(
            kubeconfig = %kubeconfig.display(),
            "insecure-skip-tls-verify is set: the API server's certificate is not verified"
        );
    }
    Ok(config)
}

/// The output of `f`, which does no I/O of its own for a kubeconfig (kube's `from_custom_kubeconfig` is async but
/// awaits nothing): polled once, and run on a runtime only if a future version ever made it wait.
fn now_or_on_a_runtime<F: std::future::Future>(f: F) -> Result<F::Output, LookupErrorKind> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
        return Ok(out);
    }
    let rt = super::client::runtime().map_err(LookupErrorKind::Runtime)?;
    Ok(rt.block_on(f))
}

/// Makes the kubeconfig's tokens (inline, or in a `tokenFile`) known to [`crate::redact`], before anything that
/// could quote one (an error of the client, an API server echoing the request) is logged.
fn register_tokens(kc: &Kubeconfig) {
    use secrecy::ExposeSecret;
    for named in &kc.auth_infos {
        let Some(auth) = named.auth_info.as_ref() else {
            continue;
        };
        if let Some(token) = auth.token.as_ref() {
            crate::redact::register(token.expose_secret());
        }
        if let Some(file) = auth.token_file.as_deref() {
            if let Ok(token) = std::fs::read_to_string(file) {
                crate::redact::register(&token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("meshcni-kube-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn istio_golden_kubeconfigs_load_without_proxy() {
        for f in [
            "kubeconfig-tls",
            "kubeconfig-newhost",
            "kubeconfig-skip-tls",
        ] {
            let p = crate::compat::path(&format!("install/{f}"));
            let c = load_config(&p, Duration::from_secs(5)).expect(f);
            assert!(c.proxy_url.is_none(), "{f}");
            assert!(!c.default_retry, "{f}");
            assert_eq!(c.connect_timeout, Some(Duration::from_secs(5)));
            assert_eq!(c.cluster_url.scheme_str(), Some("https"));
            assert_eq!(c.accept_invalid_certs, f == "kubeconfig-skip-tls", "{f}");
            assert_eq!(c.root_cert.is_some(), f != "kubeconfig-skip-tls", "{f}");
        }
    }

    #[test]
    fn kubeconfig_proxy_url_is_ignored_and_json_accepted() {
        let d = tempdir("proxy");
        let json = r#"{"apiVersion":"v1","kind":"Config","current-context":"c",
            "clusters":[{"name":"l","cluster":{"server":"https://127.0.0.1:6443","proxy-url":"http://proxy:3128",
              "insecure-skip-tls-verify":true}}],
            "contexts":[{"name":"c","context":{"cluster":"l","user":"u"}}],
            "users":[{"name":"u","user":{"token":"t"}}]}"#;
        let p = write(&d, "kc.json", json);
        let c = load_config(&p, Duration::from_secs(1)).expect("json kubeconfig");
        assert!(c.proxy_url.is_none());
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:6443/");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_kubeconfigs_fail_as_unreadable_or_invalid() {
        let d = tempdir("bad");
        let missing = d.join("nope");
        let e = load_config(&missing, Duration::from_secs(1)).expect_err("missing");
        assert!(
            matches!(e, LookupErrorKind::KubeconfigUnreadable { .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());

        let cases = [
            ("empty", ""),
            ("garbage", "{{{ not yaml"),
            ("nocontext", "apiVersion: v1\nkind: Config\nclusters: []\n"),
            (
                "http",
                "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: l\n  cluster:\n    server: \
                 http://127.0.0.1:8080\ncontexts:\n- name: c\n  context:\n    cluster: l\n    user: u\nusers:\n- \
                 name: u\n  user:\n    token: t\n",
            ),
            (
                "badca",
                "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: l\n  cluster:\n    server: \
                 https://127.0.0.1:6443\n    certificate-authority-data: '!!!notbase64'\ncontexts:\n- name: c\n  \
                 context:\n    cluster: l\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
            ),
        ];
        for (name, text) in cases {
            let p = write(&d, name, text);
            let e = load_config(&p, Duration::from_secs(1)).expect_err(name);
            assert!(
                matches!(e, LookupErrorKind::KubeconfigInvalid { .. }),
                "{name}: {e:?}"
            );
            assert!(!e.is_transient(), "{name}");
            if name == "http" {
                assert!(format!("{e:?}").contains("is not https"), "{e:?}");
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
