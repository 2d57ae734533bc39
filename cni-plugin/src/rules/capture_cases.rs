//! Istio's capture cases (`capture-cases.json` of the compat corpus, `shared/compat/istio/`) as typed
//! configurations. Test support shared by the unit goldens and the netns tests; not part of the plugin's API.
//!
//! The JSON uses istio-iptables' string forms (comma lists, `*`); they are parsed with the plugin's own parsers,
//! and a field this code does not know is an error, so a new case cannot be half understood.

use serde_json::{Map, Value};

use super::{CaptureConfig, DnsServer, IpRanges, OwnerGroups, PortSelector};
use ipnet::IpNet;

/// The cases file in the corpus directory.
pub const CASES_FILE: &str = "capture-cases.json";

/// One case: its configuration and the golden files it has (file names, relative to `capture-iptables/` and
/// `capture-nftables/`).
#[derive(Debug, Clone)]
pub struct CaptureCase {
    pub name: String,
    pub config: CaptureConfig,
    pub iptables_golden: Option<String>,
    pub nftables_golden: Option<String>,
}

/// Every case of a `capture-cases.json` text: `base` with each case's `overrides` applied.
pub fn parse(json: &str) -> Result<Vec<CaptureCase>, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("{CASES_FILE}: {e}"))?;
    let base = doc
        .get("base")
        .and_then(Value::as_object)
        .ok_or("base is not an object")?;
    let cases = doc
        .get("cases")
        .and_then(Value::as_array)
        .ok_or("cases is not an array")?;
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a case has no name")?;
        let mut cfg = base.clone();
        let overrides = case
            .get("overrides")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{name}: overrides is not an object"))?;
        for (k, v) in overrides {
            cfg.insert(k.clone(), v.clone());
        }
        let golden = |key: &str| -> Result<Option<String>, String> {
            match case.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{name}: {key} is not a string")),
            }
        };
        out.push(CaptureCase {
            name: name.to_string(),
            config: capture_config(&cfg).map_err(|e| format!("{name}: {e}"))?,
            iptables_golden: golden("iptables_golden")?,
            nftables_golden: golden("nftables_golden")?,
        });
    }
    Ok(out)
}

fn field<'a>(cfg: &'a Map<String, Value>, key: &str) -> Result<&'a Value, String> {
    cfg.get(key).ok_or_else(|| format!("no {key:?}"))
}

fn string<'a>(cfg: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    field(cfg, key)?
        .as_str()
        .ok_or_else(|| format!("{key} is not a string"))
}

fn boolean(cfg: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match cfg.get(key) {
        None => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| format!("{key} is not a bool")),
    }
}

fn port(cfg: &Map<String, Value>, key: &str) -> Result<u16, String> {
    let n = field(cfg, key)?
        .as_u64()
        .ok_or_else(|| format!("{key} is not a number"))?;
    u16::try_from(n).map_err(|_| format!("{key}={n} is not a port"))
}

/// istio-iptables' `config.Split`: comma-separated, empty items dropped, no trimming.
fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|x| !x.is_empty())
}

fn parsed<T: std::str::FromStr<Err: std::fmt::Display>>(
    cfg: &Map<String, Value>,
    key: &str,
) -> Result<Vec<T>, String> {
    split(string(cfg, key)?)
        .map(|x| x.parse().map_err(|e| format!("{key}: {e}")))
        .collect()
}

fn ports(cfg: &Map<String, Value>, key: &str) -> Result<Vec<u16>, String> {
    split(string(cfg, key)?)
        .map(|x| crate::redirect::parse_port(x).map_err(|e| format!("{key}: {e}")))
        .collect()
}

fn cidrs(key: &str, s: &str) -> Result<Vec<IpNet>, String> {
    split(s)
        .map(|x| crate::redirect::parse_cidr(x).map_err(|e| format!("{key}: {e}")))
        .collect()
}

fn dns_servers(cfg: &Map<String, Value>, key: &str) -> Result<Vec<DnsServer>, String> {
    field(cfg, key)?
        .as_array()
        .ok_or_else(|| format!("{key} is not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("{key} item is not a string"))?
                .parse()
                .map_err(|e| format!("{key}: {e}"))
        })
        .collect()
}

fn number_string<T: std::str::FromStr>(cfg: &Map<String, Value>, key: &str) -> Result<T, String> {
    let s = string(cfg, key)?;
    s.parse()
        .map_err(|_| format!("{key}={s:?} is not a number"))
}

/// The typed configuration of one case's fields (istio-iptables' flags); it must pass
/// [`CaptureConfig::validate`].
pub fn capture_config(cfg: &Map<String, Value>) -> Result<CaptureConfig, String> {
    const KNOWN: [&str; 26] = [
        "proxy_port",
        "inbound_capture_port",
        "inbound_tunnel_port",
        "proxy_uid",
        "proxy_gid",
        "inbound_tproxy_mark",
        "inbound_tproxy_route_table",
        "owner_groups_include",
        "owner_groups_exclude",
        "host_ipv4_loopback_cidr",
        "inbound_ports_include",
        "inbound_ports_exclude",
        "outbound_ip_ranges_include",
        "outbound_ip_ranges_exclude",
        "outbound_ports_include",
        "outbound_ports_exclude",
        "inbound_interception_mode",
        "enable_ipv6",
        "redirect_dns",
        "dns_servers_v4",
        "dns_servers_v6",
        "exclude_interfaces",
        "reroute_virtual_interfaces",
        "drop_invalid",
        "capture_all_dns",
        "dual_stack",
    ];
    if let Some(key) = cfg.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("capture case field {key:?} is not understood"));
    }
    let groups_include = string(cfg, "owner_groups_include")?;
    let inbound_include = string(cfg, "inbound_ports_include")?;
    let ranges_include = string(cfg, "outbound_ip_ranges_include")?;
    let config = CaptureConfig {
        proxy_port: port(cfg, "proxy_port")?,
        inbound_capture_port: port(cfg, "inbound_capture_port")?,
        inbound_tunnel_port: port(cfg, "inbound_tunnel_port")?,
        proxy_uids: parsed(cfg, "proxy_uid")?,
        proxy_gids: parsed(cfg, "proxy_gid")?,
        interception_mode: string(cfg, "inbound_interception_mode")?
            .parse()
            .map_err(|e| format!("inbound_interception_mode: {e}"))?,
        inbound_tproxy_mark: number_string(cfg, "inbound_tproxy_mark")?,
        inbound_tproxy_route_table: number_string(cfg, "inbound_tproxy_route_table")?,
        inbound_ports_include: if inbound_include == "*" {
            PortSelector::All
        } else {
            PortSelector::Only(ports(cfg, "inbound_ports_include")?)
        },
        inbound_ports_exclude: ports(cfg, "inbound_ports_exclude")?,
        owner_groups_include: if groups_include == "*" {
            OwnerGroups::All
        } else {
            OwnerGroups::Only(parsed(cfg, "owner_groups_include")?)
        },
        owner_groups_exclude: parsed(cfg, "owner_groups_exclude")?,
        outbound_ports_include: ports(cfg, "outbound_ports_include")?,
        outbound_ports_exclude: ports(cfg, "outbound_ports_exclude")?,
        outbound_ip_ranges_include: if ranges_include == "*" {
            IpRanges::All
        } else {
            IpRanges::Only(cidrs("outbound_ip_ranges_include", ranges_include)?)
        },
        outbound_ip_ranges_exclude: cidrs(
            "outbound_ip_ranges_exclude",
            string(cfg, "outbound_ip_ranges_exclude")?,
        )?,
        reroute_virtual_interfaces: parsed(cfg, "reroute_virtual_interfaces")?,
        exclude_interfaces: parsed(cfg, "exclude_interfaces")?,
        redirect_dns: boolean(cfg, "redirect_dns")?,
        capture_all_dns: boolean(cfg, "capture_all_dns")?,
        dns_servers_v4: dns_servers(cfg, "dns_servers_v4")?,
        dns_servers_v6: dns_servers(cfg, "dns_servers_v6")?,
        drop_invalid: boolean(cfg, "drop_invalid")?,
        dual_stack: boolean(cfg, "dual_stack")?,
        enable_ipv6: boolean(cfg, "enable_ipv6")?,
        host_ipv4_loopback_cidr: string(cfg, "host_ipv4_loopback_cidr")?
            .parse()
            .map_err(|e| format!("host_ipv4_loopback_cidr: {e}"))?,
    };
    config
        .validate()
        .map_err(|e| format!("capture case config is invalid: {e}"))?;
    Ok(config)
}
