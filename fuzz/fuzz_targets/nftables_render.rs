//! The renderers of a capture configuration: `rules::nftables::render` (the native backend's typed ruleset and its
//! nft script) and, from the same configuration, `rules::render_iptables`.
//!
//! Input: either a capture case as JSON in the form of Istio's `capture-cases.json` (every field of its `base`,
//! parsed by the plugin's own `rules::capture_cases`; the seeds are Istio's cases), or any other bytes, read by
//! `arbitrary` as a typed configuration (ports, ids, marks, CIDRs, interface and group names, DNS servers in any
//! spelling the address parser accepts), so every input reaches the renderer.
//!
//! Invariant (`meshcni_fuzz::check_capture`): for a configuration that validates, every token of every rendered
//! rule is a word of the renderer or a typed value of the configuration, every value in the typed nftables
//! ruleset is the configuration's, every jump has a declared target, each family's payload names only its own
//! addresses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use cni_plugin::rules::capture_cases;
use cni_plugin::rules::{
    CaptureConfig, DnsServer, InterceptionMode, InterfaceName, IpRanges, OwnerGroup, OwnerGroups,
    PortSelector,
};
use ipnet::{IpNet, Ipv4Net};
use libfuzzer_sys::fuzz_target;
use meshcni_fuzz::check_capture;

#[derive(Arbitrary, Debug)]
struct Net {
    v6: bool,
    addr: [u8; 16],
    len: u8,
}

impl Net {
    fn net(&self) -> Option<IpNet> {
        let addr = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ))
        };
        IpNet::new(addr, self.len).ok()
    }
}

#[derive(Arbitrary, Debug)]
enum Group {
    Id(u32),
    Name(String),
}

#[derive(Arbitrary, Debug)]
struct Typed {
    proxy_port: u16,
    inbound_capture_port: u16,
    inbound_tunnel_port: u16,
    proxy_uids: Vec<u32>,
    proxy_gids: Vec<u32>,
    tproxy: bool,
    mark: u32,
    table: u32,
    inbound_all: bool,
    inbound_include: Vec<u16>,
    inbound_exclude: Vec<u16>,
    groups_all: bool,
    groups_include: Vec<Group>,
    groups_exclude: Vec<Group>,
    outbound_ports_include: Vec<u16>,
    outbound_ports_exclude: Vec<u16>,
    ranges_all: bool,
    ranges_include: Vec<Net>,
    ranges_exclude: Vec<Net>,
    reroute: Vec<String>,
    exclude_interfaces: Vec<String>,
    redirect_dns: bool,
    capture_all_dns: bool,
    dns_servers: Vec<String>,
    dns_addrs: Vec<Net>,
    drop_invalid: bool,
    dual_stack: bool,
    enable_ipv6: bool,
    loopback: [u8; 3],
    loopback_len: u8,
}

fn groups(list: &[Group]) -> Vec<OwnerGroup> {
    list.iter()
        .filter_map(|g| match g {
            Group::Id(id) => Some(OwnerGroup::Id(*id)),
            Group::Name(n) => n.parse().ok(),
        })
        .collect()
}

fn names(list: &[String]) -> Vec<InterfaceName> {
    list.iter().filter_map(|n| n.parse().ok()).collect()
}

impl Typed {
    fn config(&self) -> CaptureConfig {
        let nets = |l: &[Net]| l.iter().filter_map(Net::net).collect::<Vec<_>>();
        let mut dns: Vec<DnsServer> = self
            .dns_servers
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        dns.extend(
            self.dns_addrs
                .iter()
                .filter_map(Net::net)
                .map(|n| DnsServer::from(n.addr())),
        );
        let (v4, v6): (Vec<DnsServer>, Vec<DnsServer>) =
            dns.into_iter().partition(|d| d.addr().is_ipv4());
        let [a, b, c] = self.loopback;
        CaptureConfig {
            proxy_port: self.proxy_port,
            inbound_capture_port: self.inbound_capture_port,
            inbound_tunnel_port: self.inbound_tunnel_port,
            proxy_uids: self.proxy_uids.clone(),
            proxy_gids: self.proxy_gids.clone(),
            interception_mode: if self.tproxy {
                InterceptionMode::Tproxy
            } else {
                InterceptionMode::Redirect
            },
            inbound_tproxy_mark: self.mark,
            inbound_tproxy_route_table: self.table,
            inbound_ports_include: if self.inbound_all {
                PortSelector::All
            } else {
                PortSelector::Only(self.inbound_include.clone())
            },
            inbound_ports_exclude: self.inbound_exclude.clone(),
            owner_groups_include: if self.groups_all {
                OwnerGroups::All
            } else {
                OwnerGroups::Only(groups(&self.groups_include))
            },
            owner_groups_exclude: groups(&self.groups_exclude),
            outbound_ports_include: self.outbound_ports_include.clone(),
            outbound_ports_exclude: self.outbound_ports_exclude.clone(),
            outbound_ip_ranges_include: if self.ranges_all {
                IpRanges::All
            } else {
                IpRanges::Only(nets(&self.ranges_include))
            },
            outbound_ip_ranges_exclude: nets(&self.ranges_exclude),
            reroute_virtual_interfaces: names(&self.reroute),
            exclude_interfaces: names(&self.exclude_interfaces),
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            dns_servers_v4: v4,
            dns_servers_v6: v6,
            drop_invalid: self.drop_invalid,
            dual_stack: self.dual_stack,
            enable_ipv6: self.enable_ipv6,
            host_ipv4_loopback_cidr: Ipv4Net::new(
                Ipv4Addr::new(127, a, b, c),
                self.loopback_len.min(32),
            )
            .unwrap_or_else(|_| Ipv4Net::from(Ipv4Addr::LOCALHOST)),
        }
    }
}

/// A capture case in the JSON form of `capture-cases.json`, or `None` when the bytes are not a JSON object.
fn from_case(data: &[u8]) -> Option<Option<CaptureConfig>> {
    let base: serde_json::Value = serde_json::from_slice(data).ok()?;
    base.as_object()?;
    let doc = serde_json::json!({"base": base, "cases": [{"name": "fuzz", "overrides": {}}]});
    Some(
        capture_cases::parse(&doc.to_string())
            .ok()
            .and_then(|mut c| c.pop())
            .map(|c| c.config),
    )
}

fuzz_target!(|data: &[u8]| {
    let cfg = match from_case(data) {
        Some(Some(cfg)) => cfg,
        // A JSON object the case parser refuses (a bad value, a missing field): nothing to render.
        Some(None) => return,
        None => match Typed::arbitrary(&mut arbitrary::Unstructured::new(data)) {
            Ok(t) => t.config(),
            Err(_) => return,
        },
    };
    if cfg.validate().is_err() {
        return;
    }
    check_capture(&cfg);
});
