//! Passing the previous result through, converted to the requested version's format.
//!
//! Unknown fields are kept (chained plugins may rely on them); only what differs between formats is changed:
//! 0.1/0.2 use `ip4`/`ip6` objects, 0.3.x/0.4.0 use `ips[]` with `version`, 1.x `ips[]` without it.

use serde_json::{json, Map, Value};

use super::version::{CniVersion, ResultFormat};
use super::{codes, CniError};

fn bad(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(codes::DECODING_FAILURE, msg, details)
}

/// The result printed when there is no previous result.
pub fn empty_result(version: CniVersion) -> Value {
    json!({ "cniVersion": version.as_str(), "dns": {} })
}

/// Family of an `a.b.c.d/n` or `x::y/n` string: "4" or "6".
fn family_of_cidr(s: &str) -> Option<&'static str> {
    match s.parse::<ipnet::IpNet>().ok()? {
        ipnet::IpNet::V4(_) => Some("4"),
        ipnet::IpNet::V6(_) => Some("6"),
    }
}

/// Normalised view of a result: IP configs (with their family) and routes, plus the rest of the object.
struct Parsed {
    /// (family, ip object without `version`).
    ips: Vec<(&'static str, Map<String, Value>)>,
    routes: Vec<Value>,
    rest: Map<String, Value>,
}

fn parse_new(mut obj: Map<String, Value>) -> Result<Parsed, CniError> {
    let ips_val = obj.remove("ips").unwrap_or(Value::Array(vec![]));
    let Value::Array(ips_arr) = ips_val else {
        return Err(bad("prevResult.ips is not an array", ips_val.to_string()));
    };
    let mut ips = Vec::with_capacity(ips_arr.len());
    for ip in ips_arr {
        let Value::Object(mut ip) = ip else {
            return Err(bad("prevResult.ips has a non-object entry", ip.to_string()));
        };
        let addr = ip
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let fam = family_of_cidr(&addr).ok_or_else(|| {
            bad(
                "prevResult.ips[].address is not an IP address with prefix",
                format!("{addr:?}"),
            )
        })?;
        if let Some(v) = ip.remove("version") {
            if v.as_str() != Some(fam) {
                return Err(bad(
                    "prevResult.ips[].version does not match its address",
                    format!("version {v} for address {addr:?}"),
                ));
            }
        }
        ips.push((fam, ip));
    }
    let routes = take_routes(&mut obj, "prevResult.routes")?;
    Ok(Parsed {
        ips,
        routes,
        rest: obj,
    })
}

fn take_routes(obj: &mut Map<String, Value>, what: &str) -> Result<Vec<Value>, CniError> {
    match obj.remove("routes") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(r)) => Ok(r),
        Some(other) => Err(bad(format!("{what} is not an array"), other.to_string())),
    }
}

fn parse_legacy(mut obj: Map<String, Value>) -> Result<Parsed, CniError> {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for (key, fam) in [("ip4", "4"), ("ip6", "6")] {
        let Some(block) = obj.remove(key) else {
            continue;
        };
        let Value::Object(mut block) = block else {
            return Err(bad(
                format!("prevResult.{key} is not an object"),
                block.to_string(),
            ));
        };
        let addr = block.remove("ip").unwrap_or(Value::Null);
        let addr_str = addr.as_str().unwrap_or("");
        if family_of_cidr(addr_str) != Some(fam) {
            return Err(bad(
                format!("prevResult.{key}.ip is not an IPv{fam} address with prefix"),
                addr.to_string(),
            ));
        }
        routes.extend(take_routes(
            &mut block,
            &format!("prevResult.{key}.routes"),
        )?);
        let mut ip = Map::new();
        ip.insert("address".into(), addr);
        if let Some(gw) = block.remove("gateway") {
            ip.insert("gateway".into(), gw);
        }
        ips.push((fam, ip));
    }
    Ok(Parsed {
        ips,
        routes,
        rest: obj,
    })
}

fn route_family(route: &Value) -> Option<&'static str> {
    family_of_cidr(route.get("dst")?.as_str()?)
}

/// Converts a previous result to `to`'s format and stamps it with `to`.
pub fn convert_result(prev: &Value, to: CniVersion) -> Result<Value, CniError> {
    let Value::Object(obj) = prev else {
        return Err(bad("prevResult is not a JSON object", prev.to_string()));
    };
    let mut obj = obj.clone();
    obj.remove("cniVersion");
    let legacy_shape = obj.contains_key("ip4") || obj.contains_key("ip6");
    // A top-level `routes` is 0.3.0+ too (0.2.0 keeps routes inside ip4/ip6): kept as an unknown field of a 0.2.0
    // result, it would collide with the routes a conversion writes (dropped, or left as a non-list).
    let new_shape = ["ips", "interfaces", "routes"]
        .iter()
        .any(|k| obj.contains_key(*k));
    if legacy_shape && new_shape {
        return Err(bad(
            "prevResult mixes the 0.2.0 (ip4/ip6) and 0.3.0+ (ips/interfaces/routes) formats",
            "",
        ));
    }
    let parsed = if legacy_shape {
        parse_legacy(obj)?
    } else {
        parse_new(obj)?
    };
    let mut out = parsed.rest;
    match to.result_format() {
        ResultFormat::V03 | ResultFormat::V1 => {
            let with_version = to.result_format() == ResultFormat::V03;
            let ips: Vec<Value> = parsed
                .ips
                .into_iter()
                .map(|(fam, mut ip)| {
                    if with_version {
                        ip.insert("version".into(), Value::String(fam.into()));
                    }
                    Value::Object(ip)
                })
                .collect();
            if !ips.is_empty() {
                out.insert("ips".into(), Value::Array(ips));
            }
            if !parsed.routes.is_empty() {
                out.insert("routes".into(), Value::Array(parsed.routes));
            }
        }
        ResultFormat::Legacy => {
            out.remove("interfaces");
            for (key, fam) in [("ip4", "4"), ("ip6", "6")] {
                // 0.2.0 holds one address per family: the first one, as libcni does.
                let Some((_, ip)) = parsed.ips.iter().find(|(f, _)| *f == fam) else {
                    continue;
                };
                let mut block = Map::new();
                block.insert(
                    "ip".into(),
                    ip.get("address").cloned().unwrap_or(Value::Null),
                );
                if let Some(gw) = ip.get("gateway") {
                    block.insert("gateway".into(), gw.clone());
                }
                let routes: Vec<Value> = parsed
                    .routes
                    .iter()
                    .filter(|r| route_family(r) == Some(fam))
                    .map(|r| {
                        let mut m = Map::new();
                        for k in ["dst", "gw"] {
                            if let Some(v) = r.get(k) {
                                m.insert(k.into(), v.clone());
                            }
                        }
                        Value::Object(m)
                    })
                    .collect();
                if !routes.is_empty() {
                    block.insert("routes".into(), Value::Array(routes));
                }
                out.insert(key.into(), Value::Object(block));
            }
        }
    }
    out.insert("cniVersion".into(), Value::String(to.as_str().into()));
    Ok(Value::Object(out))
}
