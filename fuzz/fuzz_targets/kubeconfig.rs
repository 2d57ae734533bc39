//! The kubeconfig writer of the agent (`install::kubeconfig::render`) and the plugin's reader of it (kube's
//! `Kubeconfig::from_yaml`, what `lookup::kubeconfig::load_config` reads the file with).
//!
//! Input: NUL-separated protocol, host, port (decimal; 443 otherwise), trust (`skip`, or the CA bundle's bytes),
//! token.
//!
//! Invariants: the writer refuses only an empty CA bundle (it would read back as no CA); otherwise the file has
//! exactly the template's lines, in order, with only the three values (CA data, server, token) in their places, so
//! a newline, quote, `#` or `: ` in an input never creates a key or a line; the reader finds exactly one cluster, user and context, no key beyond the template's, and the
//! same server URL, CA bytes (or skip-verify) and token. The plugin's own reader of the layout
//! (`agent_written_text`), when it takes the file, reads the same server, token and CA certificates.
#![no_main]

use std::time::Duration;

use base64::Engine;
// The lines of the file (the plugin's reader takes the same), a value after each that ends in `: `.
use cni_plugin::lookup::kubeconfig::{
    agent_written_text, AGENT_TEMPLATE as TEMPLATE, SKIP_VERIFY_LINE,
};
use kube::config::Kubeconfig;
use libfuzzer_sys::fuzz_target;
use meshcni_fuzz::text::nul_fields;
use node_agent::install::kubeconfig::{render, ApiServer, KubeconfigError, Trust};
use secrecy::ExposeSecret;

fuzz_target!(|data: &[u8]| {
    let f = nul_fields(data, 5);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let server = ApiServer {
        protocol: text(f[0]),
        host: text(f[1]),
        port: text(f[2]).parse().unwrap_or(443),
    };
    let trust = if f[3] == b"skip" {
        Trust::SkipVerify
    } else {
        Trust::Ca(f[3])
    };
    let token = text(f[4]);
    let file = match render(&server, &trust, &token) {
        Ok(file) => file,
        Err(KubeconfigError::EmptyCa) => {
            assert_eq!(
                trust,
                Trust::Ca(b""),
                "refused a CA bundle that is not empty"
            );
            return;
        }
    };

    let lines: Vec<&str> = file.lines().collect();
    let template: Vec<&str> = TEMPLATE
        .iter()
        .copied()
        .map(|l| match (&trust, l) {
            (Trust::SkipVerify, "    certificate-authority-data: ") => SKIP_VERIFY_LINE,
            _ => l,
        })
        .collect();
    assert_eq!(
        lines.len(),
        template.len(),
        "an input added or removed a line:\n{file}"
    );
    assert!(file.ends_with('\n') && !file.contains('\r'), "{file:?}");
    for (line, want) in lines.iter().zip(&template) {
        if want.ends_with(": ") {
            assert!(
                line.starts_with(want) && line.len() > want.len(),
                "{line:?} is not {want:?}VALUE"
            );
        } else {
            assert_eq!(line, want);
        }
    }

    let kc = match Kubeconfig::from_yaml(&file) {
        Ok(kc) => kc,
        Err(e) => panic!("the plugin cannot read the kubeconfig the agent wrote: {e}\n{file}"),
    };
    assert_eq!(kc.current_context.as_deref(), Some("istio-cni-context"));
    assert_eq!(
        (kc.clusters.len(), kc.auth_infos.len(), kc.contexts.len()),
        (1, 1, 1)
    );
    assert!(kc.other.is_empty(), "extra keys {:?}", kc.other);
    let named = &kc.clusters[0];
    assert_eq!(named.name, "local");
    assert!(named.other.is_empty(), "extra keys {:?}", named.other);
    let cluster = named.cluster.as_ref().expect("a cluster");
    assert!(
        cluster.other.is_empty(),
        "extra cluster keys {:?}",
        cluster.other
    );
    assert_eq!(
        cluster.server.as_deref(),
        Some(server.url().as_str()),
        "the server reads back\n{file}"
    );
    match trust {
        Trust::SkipVerify => {
            assert_eq!(cluster.insecure_skip_tls_verify, Some(true));
            assert_eq!(cluster.certificate_authority_data, None);
        }
        Trust::Ca(ca) => {
            assert_eq!(cluster.insecure_skip_tls_verify, None);
            let b64 = cluster
                .certificate_authority_data
                .as_deref()
                .expect("CA data");
            let back = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            assert_eq!(back, ca, "the CA reads back");
        }
    }
    let user = &kc.auth_infos[0];
    assert_eq!(user.name, "istio-cni");
    let auth = user.auth_info.as_ref().expect("a user");
    assert!(auth.other.is_empty(), "extra user keys {:?}", auth.other);
    let read = auth.token.as_ref().map(|t| t.expose_secret().to_string());
    assert_eq!(
        read.as_deref(),
        Some(token.as_str()),
        "the token reads back\n{file}"
    );
    let ctx = kc.contexts[0].context.as_ref().expect("a context");
    assert_eq!(
        (ctx.cluster.as_str(), ctx.user.as_deref()),
        ("local", Some("istio-cni"))
    );

    // The plugin reads this layout without YAML when its values are plain (a JWT, a PEM CA bundle, an https
    // URL): then it must read exactly what was written.
    let Some(fast) = agent_written_text(&file, Duration::from_secs(1)) else {
        return;
    };
    let url = server.url();
    let written = kube::Config::new(url.parse().expect("the fast reader parsed it too"));
    assert_eq!(fast.cluster_url, written.cluster_url, "{file}");
    assert_eq!(
        fast.auth_info
            .token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        Some(token.clone())
    );
    match trust {
        Trust::SkipVerify => assert!(fast.accept_invalid_certs && fast.root_cert.is_none()),
        Trust::Ca(ca) => {
            use rustls::pki_types::pem::PemObject;
            let want: Vec<Vec<u8>> = rustls::pki_types::CertificateDer::pem_slice_iter(ca)
                .map(|c| c.expect("the fast reader took it").to_vec())
                .collect();
            assert!(!fast.accept_invalid_certs);
            assert_eq!(fast.root_cert, Some(want), "the CA certificates read back");
        }
    }
});
