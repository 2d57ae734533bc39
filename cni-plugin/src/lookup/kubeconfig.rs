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
    plugin_settings(&mut config, request_timeout);
    if config.cluster_url.scheme_str() != Some("https") {
        return Err(invalid(format!(
            "server {} is not https: the bearer token must not travel in clear text",
            config.cluster_url
        )));
    }
    warn_if_unverified(&config, kubeconfig);
    Ok(config)
}

/// What the plugin sets on every configuration, whichever reader made it: no proxy, none of kube's own retries
/// (the lookup has its own policy), the connect timeout.
fn plugin_settings(config: &mut Config, request_timeout: Duration) {
    config.proxy_url = None;
    config.default_retry = false;
    config.connect_timeout = Some(request_timeout);
}

fn warn_if_unverified(config: &Config, kubeconfig: &Path) {
    if config.accept_invalid_certs {
        warn!(
            kubeconfig = %kubeconfig.display(),
            "insecure-skip-tls-verify is set: the API server's certificate is not verified"
        );
    }
}

/// The kubeconfig exactly as the node agent (and Istio's install-cni) writes it: these lines, in this order, with
/// a value after each `: ` that ends a line here.
pub const AGENT_TEMPLATE: [&str; 17] = [
    "apiVersion: v1",
    "clusters:",
    "- cluster:",
    "    certificate-authority-data: ",
    "    server: ",
    "  name: local",
    "contexts:",
    "- context:",
    "    cluster: local",
    "    user: istio-cni",
    "  name: istio-cni-context",
    "current-context: istio-cni-context",
    "kind: Config",
    "users:",
    "- name: istio-cni",
    "  user:",
    "    token: ",
];
/// The line that takes the CA line's place with `insecure-skip-tls-verify`.
pub const SKIP_VERIFY_LINE: &str = "    insecure-skip-tls-verify: true";
/// The template's lines that end in a value.
const CA_LINE: &str = AGENT_TEMPLATE[3];
const SERVER_LINE: &str = AGENT_TEMPLATE[4];
const TOKEN_LINE: &str = AGENT_TEMPLATE[16];

/// The kube `Config` of a kubeconfig file in the agent's exact layout, read without a YAML parser (which was a
/// tenth of an ADD that GETs its pod): `None` for any other file, and for values outside the plain forms read
/// here (a base64 CA bundle holding PEM certificates, an `https://` URL of host characters, a JWT token); the
/// caller then reads the file with [`load_config`]. For a file read here both give the same configuration (a
/// unit test, and the `kubeconfig` fuzz target on every file the agent can write).
pub fn agent_written(kubeconfig: &Path, request_timeout: Duration) -> Option<Config> {
    let text = std::fs::read_to_string(kubeconfig).ok()?;
    let config = agent_written_text(&text, request_timeout)?;
    warn_if_unverified(&config, kubeconfig);
    Some(config)
}

/// [`agent_written`] of the file's text. Pure but for registering the token with [`crate::redact`].
pub fn agent_written_text(text: &str, request_timeout: Duration) -> Option<Config> {
    let (server, ca, token) = parse_agent_written(text)?;
    let mut config = Config::new(server.parse().ok()?);
    match ca {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject;
            let ders = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.map(|der| der.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .ok()
                .filter(|d| !d.is_empty())?;
            config.root_cert = Some(ders);
        }
        None => config.accept_invalid_certs = true,
    }
    crate::redact::register(token);
    config.auth_info.token = Some(token.to_string().into());
    plugin_settings(&mut config, request_timeout);
    Some(config)
}

/// `(server, CA bundle or None for skip-verify, token)` of a file in the agent's layout. Pure.
fn parse_agent_written(text: &str) -> Option<(&str, Option<Vec<u8>>, &str)> {
    use base64::Engine;
    let body = text.strip_suffix('\n')?;
    let lines: Vec<&str> = body.split('\n').collect();
    if lines.len() != AGENT_TEMPLATE.len() {
        return None;
    }
    let (mut server, mut ca, mut token) = (None, None, None);
    for (&line, want) in lines.iter().zip(AGENT_TEMPLATE) {
        match want {
            CA_LINE if line == SKIP_VERIFY_LINE => {}
            CA_LINE => ca = Some(line.strip_prefix(want)?),
            SERVER_LINE => server = Some(line.strip_prefix(want)?),
            TOKEN_LINE => token = Some(line.strip_prefix(want)?),
            _ if line == want => {}
            _ => return None,
        }
    }
    let server = server.filter(|s| plain_url(s))?;
    let token = token.filter(|t| plain_jwt(t))?;
    let ca = match ca {
        None => None,
        Some(b64) => {
            let base64_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
            if b64.is_empty() || !b64.chars().all(base64_chars) {
                return None;
            }
            Some(base64::engine::general_purpose::STANDARD.decode(b64).ok()?)
        }
    };
    Some((server, ca, token))
}

/// An `https://` URL of host, port and path characters only: a YAML plain scalar that reads back as itself.
fn plain_url(s: &str) -> bool {
    s.strip_prefix("https://").is_some_and(|rest| {
        !rest.is_empty()
            && rest.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '/')
            })
    })
}

/// A JWT (what a service-account token is): `eyJ` then base64url characters in three dot-separated parts. A
/// YAML plain scalar that reads back as itself, never as a number, a boolean or null.
fn plain_jwt(s: &str) -> bool {
    let b64url = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    };
    s.starts_with("eyJ") && s.split('.').count() == 3 && s.split('.').all(b64url)
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

    #[test]
    fn the_value_lines_are_the_templates() {
        assert_eq!(CA_LINE, "    certificate-authority-data: ");
        assert_eq!(SERVER_LINE, "    server: ");
        assert_eq!(TOKEN_LINE, "    token: ");
    }

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

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl-_x";

    /// What the plugin uses of a configuration, to compare the two readers: the URL, the CA certificates, skip
    /// verify, the token and the connect timeout, as text.
    fn essentials(c: &Config) -> String {
        use secrecy::ExposeSecret;
        format!(
            "{} {:?} {} {:?} {:?}",
            c.cluster_url,
            c.root_cert,
            c.accept_invalid_certs,
            c.auth_info
                .token
                .as_ref()
                .map(|t| t.expose_secret().to_string()),
            c.connect_timeout,
        )
    }

    /// Istio's kubeconfigs (with a JWT as their token, as a service account's is) are read without YAML, and
    /// give exactly what kube's reader gives; any change to the layout or a value outside the plain forms sends
    /// the file to kube's reader.
    #[test]
    fn the_agents_layout_is_read_without_yaml_and_as_kube_reads_it() {
        let d = tempdir("agent-written");
        for f in [
            "kubeconfig-tls",
            "kubeconfig-newhost",
            "kubeconfig-skip-tls",
        ] {
            let golden =
                std::fs::read_to_string(crate::compat::path(&format!("install/{f}"))).expect(f);
            let text = golden.replace("service_account_token_string", JWT);
            let p = write(&d, f, &text);
            let fast = agent_written(&p, Duration::from_secs(5)).expect("the agent's layout");
            let kube = load_config(&p, Duration::from_secs(5)).expect(f);
            assert_eq!(essentials(&fast), essentials(&kube), "{f}");
            assert!(fast.proxy_url.is_none() && !fast.default_retry);
            // Istio's own token is not a JWT: kube's reader then.
            assert!(agent_written(&write(&d, "golden", &golden), Duration::from_secs(5)).is_none());
            for (what, changed) in [
                (
                    "a comment",
                    text.replacen("clusters:\n", "clusters: # x\n", 1),
                ),
                ("CRLF", text.replace('\n', "\r\n")),
                ("a line more", format!("{text}preferences: {{}}\n")),
                ("no final newline", text.trim_end().to_string()),
                ("a quoted token", text.replace(JWT, &format!("\"{JWT}\""))),
                (
                    "another user",
                    text.replace("user: istio-cni", "user: other"),
                ),
                ("http", text.replace("https://", "http://")),
                ("a token that is no JWT", text.replace(JWT, "12345")),
                (
                    "a space in the server",
                    text.replace("server: https://", "server: https:// x"),
                ),
            ] {
                let p = write(&d, "changed", &changed);
                assert!(
                    agent_written(&p, Duration::from_secs(5)).is_none(),
                    "{f}: {what}"
                );
            }
        }
        let bad_ca = std::fs::read_to_string(crate::compat::path("install/kubeconfig-tls"))
            .expect("golden")
            .replace("service_account_token_string", JWT)
            .replace(
                "certificate-authority-data: LS0t",
                "certificate-authority-data: !!!!",
            );
        assert!(agent_written(&write(&d, "bad-ca", &bad_ca), Duration::from_secs(5)).is_none());
        assert!(agent_written(&d.join("missing"), Duration::from_secs(5)).is_none());
        let _ = std::fs::remove_dir_all(&d);
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
