//! prevResult conversion between CNI versions (`cni::convert_result`).
//!
//! Input: one byte choosing the requested version, then the previous result (JSON).
//!
//! Invariants: a refusal is a decoding failure (code 6); an answer is stamped with the requested version and keeps
//! every field it does not convert; to 0.3.x/0.4.0/1.x every IP (address, gateway, interface index, other fields)
//! and route is kept in order, with `version` exactly in 0.3.x/0.4.0 and equal to the address's family, and the
//! interfaces kept; to 0.1.0/0.2.0 the first address of each family with its gateway, and the routes of that
//! family (dst, gw); converting an answer again to its own version changes nothing, and going through any other
//! version of the 0.3+ formats first gives the same answer.
#![no_main]

use cni_plugin::cni::{codes, convert_result, CniVersion};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const CONVERTED: [&str; 6] = ["cniVersion", "ips", "routes", "interfaces", "ip4", "ip6"];

fn family(addr: &Value) -> Option<&'static str> {
    match addr.as_str()?.parse::<ipnet::IpNet>().ok()? {
        ipnet::IpNet::V4(_) => Some("4"),
        ipnet::IpNet::V6(_) => Some("6"),
    }
}

/// An IP of a result in the 0.3+ shape, without `version`, with its family ("4" or "6").
type Ip = (&'static str, Map<String, Value>);

/// The IPs of a result and its routes.
fn normalised(v: &Value) -> (Vec<Ip>, Vec<Value>) {
    let obj = v.as_object().expect("an object");
    if obj.contains_key("ip4") || obj.contains_key("ip6") {
        let mut ips = Vec::new();
        let mut routes = Vec::new();
        for (key, fam) in [("ip4", "4"), ("ip6", "6")] {
            let Some(block) = obj.get(key) else { continue };
            let mut ip = Map::new();
            ip.insert("address".into(), block["ip"].clone());
            if let Some(gw) = block.get("gateway") {
                ip.insert("gateway".into(), gw.clone());
            }
            ips.push((fam, ip));
            routes.extend(
                block
                    .get("routes")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        return (ips, routes);
    }
    let ips = obj
        .get("ips")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|ip| {
                    let mut ip = ip.as_object().expect("an ip object").clone();
                    ip.remove("version");
                    (family(&ip["address"]).expect("an accepted address"), ip)
                })
                .collect()
        })
        .unwrap_or_default();
    let routes = obj
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    (ips, routes)
}

fn is_v03(v: CniVersion) -> bool {
    matches!(
        v,
        CniVersion::V0_3_0 | CniVersion::V0_3_1 | CniVersion::V0_4_0
    )
}

fn is_legacy(v: CniVersion) -> bool {
    matches!(v, CniVersion::V0_1_0 | CniVersion::V0_2_0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let Ok(prev) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let to = CniVersion::ALL[usize::from(pick) % CniVersion::ALL.len()];
    let out = match convert_result(&prev, to) {
        Ok(out) => out,
        Err(e) => {
            assert_eq!(e.code, codes::DECODING_FAILURE, "{e:?}");
            assert!(!e.msg.is_empty());
            return;
        }
    };
    assert_eq!(out["cniVersion"], to.as_str());
    let prev_obj = prev
        .as_object()
        .expect("an accepted prevResult is an object");
    let out_obj = out.as_object().expect("the answer is an object");
    for (k, v) in prev_obj
        .iter()
        .filter(|(k, _)| !CONVERTED.contains(&k.as_str()))
    {
        assert_eq!(out_obj.get(k), Some(v), "field {k} is kept");
    }
    let (ips, routes) = normalised(&prev);
    if is_legacy(to) {
        assert!(out_obj.get("ips").is_none() && out_obj.get("interfaces").is_none());
        for (key, fam) in [("ip4", "4"), ("ip6", "6")] {
            let first = ips.iter().find(|(f, _)| *f == fam).map(|(_, ip)| ip);
            let Some(first) = first else {
                assert!(
                    out_obj.get(key).is_none(),
                    "{key} without an IPv{fam} address"
                );
                continue;
            };
            let block = &out[key];
            assert_eq!(block["ip"], first["address"]);
            assert_eq!(block.get("gateway"), first.get("gateway"));
            let want: Vec<&Value> = routes
                .iter()
                .filter(|r| r.get("dst").and_then(family) == Some(fam))
                .collect();
            let got = block
                .get("routes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                got.len(),
                want.len(),
                "{key} keeps each route of its family"
            );
            for (g, w) in got.iter().zip(want) {
                let g = g.as_object().expect("a route object");
                assert!(
                    g.keys().all(|k| k == "dst" || k == "gw"),
                    "only dst and gw in 0.2.0: {g:?}"
                );
                assert_eq!(
                    (g.get("dst"), g.get("gw")),
                    (w.get("dst"), w.get("gw")),
                    "{key} route"
                );
            }
        }
    } else {
        let got_ips = out
            .get("ips")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert_eq!(got_ips.len(), ips.len(), "every IP is kept");
        for (got, (fam, want)) in got_ips.iter().zip(&ips) {
            let mut got = got.as_object().expect("an ip object").clone();
            let version = got.remove("version");
            assert_eq!(&got, want, "the IP is kept");
            match version {
                Some(v) => assert!(is_v03(to) && v == *fam, "version {v} in {to} for IPv{fam}"),
                None => assert!(!is_v03(to), "no version in {to}"),
            }
        }
        let got_routes = out
            .get("routes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert_eq!(got_routes, routes, "every route is kept");
        if !(prev_obj.contains_key("ip4") || prev_obj.contains_key("ip6")) {
            assert_eq!(
                out_obj.get("interfaces"),
                prev_obj.get("interfaces"),
                "interfaces are kept"
            );
        }
    }
    let again = convert_result(&out, to).expect("an answer converts again");
    assert_eq!(again, out, "converting to its own version changes nothing");
    for via in CniVersion::ALL.into_iter().filter(|v| !is_legacy(*v)) {
        let through = convert_result(&prev, via).expect("a 0.3+ conversion of an accepted result");
        let twice = convert_result(&through, to).expect("converting an answer");
        assert_eq!(
            twice, out,
            "{} -> {via} -> {to} differs from converting directly",
            prev["cniVersion"]
        );
    }
});
