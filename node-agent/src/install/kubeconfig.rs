//! The kubeconfig the plugin uses: rendered as the YAML Istio writes (client-go's v1 Config through sigs.k8s.io/yaml:
//! keys sorted, two-space indentation, lists not indented). Pure: inputs are the token and CA bytes.

use base64::Engine;

/// Where the API server is, as the agent's pod sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServer {
    pub protocol: String,
    pub host: String,
    pub port: u16,
}

impl ApiServer {
    /// `protocol://host:port`, with an IPv6 host in brackets (Go's net.JoinHostPort). A host given already in
    /// brackets is not bracketed twice.
    pub fn url(&self) -> String {
        let host = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        if host.contains(':') {
            format!("{}://[{}]:{}", self.protocol, host, self.port)
        } else {
            format!("{}://{}:{}", self.protocol, host, self.port)
        }
    }
}

/// How the plugin trusts the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust<'a> {
    /// PEM bytes of the CA bundle, embedded as `certificate-authority-data`.
    Ca(&'a [u8]),
    /// `insecure-skip-tls-verify: true` (SKIP_TLS_VERIFY; no CA is embedded then, as in Istio).
    SkipVerify,
}

/// Inputs the kubeconfig cannot be written from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    /// An empty `certificate-authority-data` reads back as absent: the plugin would then verify the API server
    /// against the system's roots instead, and fail with a TLS error far from the cause.
    #[error("the CA bundle is empty (0 bytes): the plugin could not verify the API server")]
    EmptyCa,
}

/// Renders the kubeconfig file.
pub fn render(
    server: &ApiServer,
    trust: &Trust<'_>,
    token: &str,
) -> Result<String, KubeconfigError> {
    let mut cluster = String::new();
    match trust {
        Trust::Ca([]) => return Err(KubeconfigError::EmptyCa),
        Trust::Ca(pem) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
            cluster.push_str(&format!("    certificate-authority-data: {b64}\n"));
        }
        Trust::SkipVerify => cluster.push_str("    insecure-skip-tls-verify: true\n"),
    }
    cluster.push_str(&format!("    server: {}\n", scalar(&server.url())));
    Ok(format!(
        "apiVersion: v1\n\
         clusters:\n\
         - cluster:\n\
         {cluster}  name: local\n\
         contexts:\n\
         - context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\n\
         current-context: istio-cni-context\n\
         kind: Config\n\
         users:\n\
         - name: istio-cni\n  user:\n    token: {}\n",
        scalar(token)
    ))
}

/// A YAML scalar for a string: plain when that reads back as the same string, else double-quoted.
fn scalar(s: &str) -> String {
    if plain_safe(s) {
        s.to_string()
    } else {
        double_quoted(s)
    }
}

/// A YAML double-quoted scalar: Go's JSON escapes (valid YAML escapes: controls, U+2028/U+2029, which a YAML 1.1
/// reader takes as line breaks) and also every other character YAML does not allow as it is (`c-printable`: DEL, the
/// C1 range, U+FFFE/U+FFFF) and the byte order mark, so any string reads back unchanged.
fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    super::gojson::write_string_escaping(&mut out, s, |c| {
        matches!(
            c,
            '\u{7f}'..='\u{9f}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
        )
    });
    out
}

fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if "-?:,[]{}#&*!|>'\"%@`~ ".contains(first) || s.ends_with(' ') || s.ends_with(':') {
        return false;
    }
    if s.contains(": ") || s.contains(" #") {
        return false;
    }
    if !s.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return false;
    }
    // Strings YAML (1.1, as go-yaml reads them) would resolve to another type.
    let lower = s.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "true"
            | "false"
            | "yes"
            | "no"
            | "on"
            | "off"
            | "y"
            | "n"
            | "null"
            | "~"
            | ".nan"
            | ".inf"
            | "-.inf"
            | "+.inf"
    ) {
        return false;
    }
    let numeric = s.trim_start_matches(['+', '-']).chars().all(|c| {
        c.is_ascii_digit() || matches!(c, '.' | '_' | 'e' | 'E' | '+' | '-' | 'x' | 'o' | 'b')
    }) && s.chars().any(|c| c.is_ascii_digit());
    !numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    use cni_plugin::compat::read as corpus;

    fn server(host: &str) -> ApiServer {
        ApiServer {
            protocol: "https".into(),
            host: host.into(),
            port: 443,
        }
    }

    #[test]
    fn matches_istio_goldens() {
        let ca = corpus("install/kube-ca.crt");
        let token = "service_account_token_string";
        assert_eq!(
            render(&server("10.96.0.1"), &Trust::Ca(&ca), token).unwrap(),
            String::from_utf8(corpus("install/kubeconfig-tls")).unwrap()
        );
        assert_eq!(
            render(&server("10.96.0.1"), &Trust::SkipVerify, token).unwrap(),
            String::from_utf8(corpus("install/kubeconfig-skip-tls")).unwrap()
        );
        assert_eq!(
            render(&server("50.76.2.1"), &Trust::Ca(&ca), token).unwrap(),
            String::from_utf8(corpus("install/kubeconfig-newhost")).unwrap()
        );
    }

    /// install-e2e's expected kubeconfig comes from Istio's older installer (another key order, a comment, the host
    /// in brackets): the same content, compared field by field.
    #[test]
    fn same_content_as_e2e_expected() {
        let ca = corpus("install/kube-ca.crt");
        let expected = String::from_utf8(corpus(
            "install-e2e/expected/ZZZ-istio-cni-kubeconfig.expected",
        ))
        .unwrap();
        let field = |text: &str, key: &str| -> String {
            text.lines()
                .find_map(|l| {
                    l.trim()
                        .strip_prefix(&format!("{key}: "))
                        .map(|v| v.trim_matches('"').to_string())
                })
                .unwrap_or_else(|| panic!("{key} missing"))
        };
        let token = field(&expected, "token");
        let ours = render(&server("10.110.0.1"), &Trust::Ca(&ca), &token).unwrap();
        for key in [
            "certificate-authority-data",
            "token",
            "current-context",
            "cluster",
            "user",
            "kind",
            "apiVersion",
        ] {
            assert_eq!(field(&ours, key), field(&expected, key), "{key}");
        }
        assert_eq!(field(&ours, "server"), "https://10.110.0.1:443");
        assert_eq!(field(&expected, "server"), "https://[10.110.0.1]:443");
    }

    #[test]
    fn ipv6_hosts_are_bracketed_once() {
        assert_eq!(server("fd00::1").url(), "https://[fd00::1]:443");
        assert_eq!(server("[fd00::1]").url(), "https://[fd00::1]:443");
        assert_eq!(server("10.0.0.1").url(), "https://10.0.0.1:443");
        let text = render(&server("fd00::1"), &Trust::SkipVerify, "t").unwrap();
        assert!(
            text.contains("    server: https://[fd00::1]:443\n"),
            "{text}"
        );
    }

    #[test]
    fn odd_tokens_are_quoted() {
        for (token, want) in [
            ("abc.def-ghi_j", "abc.def-ghi_j"),
            ("true", "\"true\""),
            ("123", "\"123\""),
            ("tok\n", "\"tok\\n\""),
            ("", "\"\""),
            ("a: b", "\"a: b\""),
            ("-x", "\"-x\""),
        ] {
            let text = render(&server("h"), &Trust::SkipVerify, token).unwrap();
            assert!(
                text.ends_with(&format!("    token: {want}\n")),
                "{token:?}: {text}"
            );
        }
    }

    /// Found by the kubeconfig fuzz target: a DEL (0x7f) in a token was written raw inside double quotes (JSON's
    /// escapes), which YAML does not allow: the plugin could not read its kubeconfig at all.
    #[test]
    fn unprintable_characters_are_escaped() {
        for (token, want) in [
            ("a\u{7f}b", "\"a\\u007fb\""),
            ("\u{85}\u{2028}\u{feff}", "\"\\u0085\\u2028\\ufeff\""),
            ("q\"\\\u{1}é", "\"q\\\"\\\\\\u0001é\""),
        ] {
            let text = render(&server("h"), &Trust::SkipVerify, token).unwrap();
            assert!(
                text.ends_with(&format!("    token: {want}\n")),
                "{token:?}: {text}"
            );
        }
    }

    /// Found by the kubeconfig fuzz target: an empty CA bundle was written as `certificate-authority-data: ` (no
    /// value), which reads back as no CA at all.
    #[test]
    fn an_empty_ca_bundle_is_refused() {
        assert_eq!(
            render(&server("h"), &Trust::Ca(b""), "t"),
            Err(KubeconfigError::EmptyCa)
        );
        assert!(render(&server("h"), &Trust::Ca(b"x"), "t").is_ok());
    }
}
