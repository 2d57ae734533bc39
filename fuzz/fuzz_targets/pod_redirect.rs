//! Pod -> redirect: a Pod as the API server sends it (arbitrary annotations, labels, containers, proxy env, args
//! and ids; see `meshcni_fuzz::text::pod_lines`; a first line `6` enables IPv6) through the real path: the API
//! answer read by `lookup::response::interpret`, `pod::decide`, `Redirect::from_pod`, `CaptureConfig::from_redirect`,
//! both renderers.
//!
//! Invariants: the decision is Istio's first matching rule and never panics; a redirect either fails validation
//! with an error naming an annotation of the pod and its exact value (or the proxy id), or gives a configuration
//! that validates, whose typed values are the annotations' (TPROXY iff asked, uid/gid the pod's or 1337), and
//! whose rendered rules hold only the renderers' words and typed values (`meshcni_fuzz::check_capture`), never
//! raw annotation text. The `PodInfo` (the agent socket's payload) survives its JSON round trip. The plugin's
//! lean decode of the answer gives k8s-openapi's `PodInfo::from(&Pod)` whenever k8s-openapi decodes it.
#![no_main]

use cni_plugin::lookup::response::interpret;
use cni_plugin::lookup::PodRef;
use cni_plugin::pod::{decide, Decision, PodInfo};
use cni_plugin::redirect::{self, InterceptionMode, Redirect, RedirectError};
use cni_plugin::rules::CaptureConfig;
use libfuzzer_sys::fuzz_target;
use meshcni_fuzz::check_capture;
use meshcni_fuzz::text::pod_lines;

const ANNOTATIONS: [&str; 10] = [
    redirect::INTERCEPTION_MODE,
    redirect::INCLUDE_OUTBOUND_IP_RANGES,
    redirect::EXCLUDE_OUTBOUND_IP_RANGES,
    redirect::INCLUDE_INBOUND_PORTS,
    redirect::EXCLUDE_INBOUND_PORTS,
    redirect::INCLUDE_OUTBOUND_PORTS,
    redirect::EXCLUDE_OUTBOUND_PORTS,
    redirect::EXCLUDE_INTERFACES,
    redirect::REROUTE_VIRTUAL_INTERFACES,
    redirect::KUBEVIRT_INTERFACES,
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ipv6 = text.lines().next() == Some("6");
    let pod = pod_lines(&text);
    let body = serde_json::to_vec(&pod).expect("serialise the pod");
    // The plugin decodes only the fields it reads; k8s-openapi's whole Pod must give the same PodInfo whenever
    // it decodes the answer at all.
    let typed = serde_json::from_slice::<k8s_openapi::api::core::v1::Pod>(&body)
        .ok()
        .map(|p| PodInfo::from(&p));
    let pi = match interpret(200, &body, &PodRef::new("ns", "pod"), None) {
        Ok(pi) => pi,
        Err(e) => {
            assert!(
                typed.is_none(),
                "k8s-openapi decodes a pod the plugin refuses: {e:?}"
            );
            return;
        }
    };
    if let Some(typed) = &typed {
        assert_eq!(typed, &pi, "the plugin's decode differs from k8s-openapi's");
    }
    let wire = serde_json::to_string(&pi).expect("serialise PodInfo");
    assert_eq!(
        serde_json::from_str::<PodInfo>(&wire).expect("PodInfo from its JSON"),
        pi
    );
    let decision = decide(&pi);
    if decision == Decision::Redirect {
        assert!(pi.containers.contains(cni_plugin::pod::ISTIO_PROXY));
        assert!(pi.annotations.contains_key(cni_plugin::pod::STATUS_KEY));
    }
    match Redirect::from_pod(&pi) {
        Err(RedirectError::Annotation {
            annotation,
            value,
            reason,
        }) => {
            assert!(
                ANNOTATIONS.contains(&annotation),
                "{annotation} is not a redirect annotation"
            );
            assert_eq!(
                pi.annotations.get(annotation),
                Some(&value),
                "the error quotes {annotation} exactly"
            );
            let msg = RedirectError::Annotation {
                annotation,
                value: value.clone(),
                reason,
            }
            .to_string();
            assert!(
                msg.contains(annotation) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
        Err(RedirectError::ProxyId { field, value }) => {
            let id = if field == "runAsUser" {
                pi.proxy_uid
            } else {
                pi.proxy_gid
            };
            assert_eq!(id, Some(value), "{field} is the pod's");
        }
        Ok(r) => {
            let tproxy = pi
                .annotations
                .get(redirect::INTERCEPTION_MODE)
                .map(String::as_str)
                == Some("TPROXY");
            assert_eq!(r.interception_mode == InterceptionMode::Tproxy, tproxy);
            let id = |v: Option<i64>| match v {
                None | Some(0) => redirect::DEFAULT_PROXY_ID,
                Some(v) => u32::try_from(v).expect("an accepted id fits"),
            };
            assert_eq!(
                (r.proxy_uid, r.proxy_gid),
                (id(pi.proxy_uid), id(pi.proxy_gid))
            );
            for p in redirect::ALWAYS_EXCLUDED_INBOUND_PORTS {
                assert!(r.exclude_inbound_ports.contains(&p));
            }
            let cfg = CaptureConfig::from_redirect(&r, ipv6);
            if let Err(e) = cfg.validate() {
                panic!("a redirect's configuration is refused: {e}\n{cfg:#?}");
            }
            check_capture(&cfg);
        }
    }
});
