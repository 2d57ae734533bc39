//! Redirect -> [`CaptureConfig`] -> rendered rules. Pure: no I/O.
//!
//! [`CaptureConfig`] is istio-iptables' configuration (tools/common/config) with typed values; the renderers turn
//! it into what is applied in the pod netns: [`iptables`] (Istio's iptables-restore payloads) and [`nftables`]
//! (Istio's native nftables ruleset, typed, for the netlink applier), both from the same [`CaptureConfig`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use crate::redirect::Redirect;
pub use crate::redirect::{InterceptionMode, InterfaceName, IpRanges, PortSelector};

pub mod iptables;
pub mod nftables;

#[doc(hidden)]
pub mod capture_cases;

#[cfg(test)]
mod golden_tests;

pub use iptables::render_iptables;

/// Istio's limit on the owner groups whose traffic is captured (they end up in one iptables rule).
pub const MAX_OWNER_GROUPS_INCLUDE: usize = 64;

/// A group in an owner match: a numeric gid or a group name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroup {
    Id(u32),
    /// A name made of `[A-Za-z0-9_.-]`, starting with a letter or `_`, at most 32 bytes.
    Name(String),
}

impl FromStr for OwnerGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            if s.len() > 1 && s.starts_with('0') {
                return Err(format!("group id {s:?} has a leading zero"));
            }
            return s
                .parse()
                .map(OwnerGroup::Id)
                .map_err(|_| format!("group id {s:?} is out of range"));
        }
        let mut bytes = s.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || s.len() > 32 {
            return Err(format!("{s:?} is neither a group id nor a group name"));
        }
        Ok(OwnerGroup::Name(s.to_string()))
    }
}

impl fmt::Display for OwnerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnerGroup::Id(id) => write!(f, "{id}"),
            OwnerGroup::Name(n) => f.write_str(n),
        }
    }
}

/// Groups whose outbound traffic is captured: all (`*`, then [`CaptureConfig::owner_groups_exclude`] applies) or
/// only the listed ones (an empty list captures no group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    All,
    Only(Vec<OwnerGroup>),
}

/// A DNS server as istio-iptables gets it: a validated address, rendered in the spelling it was given
/// (Istio keeps these as strings, so `::127.0.0.53` is written as such, not as `::7f00:35`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServer {
    addr: IpAddr,
    spelling: String,
}

impl DnsServer {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl From<IpAddr> for DnsServer {
    fn from(addr: IpAddr) -> Self {
        DnsServer {
            addr,
            spelling: addr.to_string(),
        }
    }
}

impl FromStr for DnsServer {
    type Err = String;
    /// Any spelling the standard parser accepts: only hex digits, `:` and `.` can get through.
    fn from_str(s: &str) -> Result<Self, String> {
        let addr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address"))?;
        Ok(DnsServer {
            addr,
            spelling: s.to_string(),
        })
    }
}

impl fmt::Display for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spelling)
    }
}

/// istio-iptables' configuration (tools/common/config), typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Envoy's outbound port (`ISTIO_REDIRECT` target).
    pub proxy_port: u16,
    /// Envoy's inbound port (`ISTIO_IN_REDIRECT` and TPROXY target).
    pub inbound_capture_port: u16,
    /// The HBONE tunnel port, never captured inbound.
    pub inbound_tunnel_port: u16,
    /// Owners whose traffic bypasses capture (the proxy).
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub interception_mode: InterceptionMode,
    /// Mark of TPROXY-diverted packets (and of the policy route).
    pub inbound_tproxy_mark: u32,
    /// Routing table of the TPROXY policy route.
    pub inbound_tproxy_route_table: u32,
    pub inbound_ports_include: PortSelector,
    /// Only used when [`Self::inbound_ports_include`] is `All`.
    pub inbound_ports_exclude: Vec<u16>,
    pub owner_groups_include: OwnerGroups,
    /// Only used when [`Self::owner_groups_include`] is `All`.
    pub owner_groups_exclude: Vec<OwnerGroup>,
    pub outbound_ports_include: Vec<u16>,
    pub outbound_ports_exclude: Vec<u16>,
    pub outbound_ip_ranges_include: IpRanges,
    pub outbound_ip_ranges_exclude: Vec<IpNet>,
    /// Interfaces whose inbound traffic is treated as outbound (KubeVirt).
    pub reroute_virtual_interfaces: Vec<InterfaceName>,
    /// Interfaces whose traffic is never captured.
    pub exclude_interfaces: Vec<InterfaceName>,
    pub redirect_dns: bool,
    /// Capture DNS to any server (the CNI case) instead of only [`Self::dns_servers_v4`]/[`Self::dns_servers_v6`].
    pub capture_all_dns: bool,
    pub dns_servers_v4: Vec<DnsServer>,
    pub dns_servers_v6: Vec<DnsServer>,
    pub drop_invalid: bool,
    /// Used only to detect IPv6 (see [`ipv6_enabled`]); kept for logging.
    pub dual_stack: bool,
    /// Render the IPv6 ruleset (and the `::6` loopback address).
    pub enable_ipv6: bool,
    /// The IPv4 loopback range that is not captured (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`).
    pub host_ipv4_loopback_cidr: Ipv4Net,
}

impl Default for CaptureConfig {
    /// Istio's `DefaultConfig()` after `FillConfigFromEnvironment` with no environment: proxy uid/gid 1337, owner
    /// groups `*`, loopback `127.0.0.1/32`, nothing captured by port or address yet.
    fn default() -> Self {
        CaptureConfig {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            inbound_tunnel_port: 15008,
            proxy_uids: vec![crate::redirect::DEFAULT_PROXY_ID],
            proxy_gids: vec![crate::redirect::DEFAULT_PROXY_ID],
            interception_mode: InterceptionMode::Redirect,
            inbound_tproxy_mark: 1337,
            inbound_tproxy_route_table: 133,
            inbound_ports_include: PortSelector::Only(Vec::new()),
            inbound_ports_exclude: Vec::new(),
            owner_groups_include: OwnerGroups::All,
            owner_groups_exclude: Vec::new(),
            outbound_ports_include: Vec::new(),
            outbound_ports_exclude: Vec::new(),
            outbound_ip_ranges_include: IpRanges::Only(Vec::new()),
            outbound_ip_ranges_exclude: Vec::new(),
            reroute_virtual_interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            drop_invalid: false,
            dual_stack: false,
            enable_ipv6: false,
            host_ipv4_loopback_cidr: Ipv4Net::from(Ipv4Addr::LOCALHOST),
        }
    }
}

/// A [`CaptureConfig`] that istio-iptables would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureConfigError {
    #[error("{count} owner groups to capture, more than the {MAX_OWNER_GROUPS_INCLUDE} allowed")]
    TooManyOwnerGroups { count: usize },
    #[error(
        "host IPv4 loopback CIDR {cidr} must be a loopback address with a prefix length of 8 to 32"
    )]
    LoopbackCidr { cidr: Ipv4Net },
    #[error("DNS server {server} is listed as IPv{family} but is not")]
    DnsServerFamily { server: String, family: u8 },
}

impl CaptureConfig {
    /// The configuration the plugin derives for a redirect, as Istio's `sidecar_iptables_linux.go` does.
    /// `enable_ipv6` comes from the pod netns addresses (see [`ipv6_enabled`]).
    ///
    /// DNS capture in the plugin is "capture all": the pod's resolv.conf is never read, so no DNS server is listed.
    pub fn from_redirect(r: &Redirect, enable_ipv6: bool) -> Self {
        CaptureConfig {
            proxy_port: r.target_port,
            proxy_uids: vec![r.proxy_uid],
            proxy_gids: vec![r.proxy_gid],
            interception_mode: r.interception_mode,
            inbound_ports_include: r.include_inbound_ports.clone(),
            inbound_ports_exclude: r.exclude_inbound_ports.clone(),
            outbound_ports_include: r.include_outbound_ports.clone(),
            outbound_ports_exclude: r.exclude_outbound_ports.clone(),
            outbound_ip_ranges_include: r.include_outbound_ip_ranges.clone(),
            outbound_ip_ranges_exclude: r.exclude_outbound_ip_ranges.clone(),
            reroute_virtual_interfaces: r.reroute_virtual_interfaces.clone(),
            exclude_interfaces: r.exclude_interfaces.clone(),
            redirect_dns: r.dns_capture,
            capture_all_dns: r.dns_capture,
            drop_invalid: r.invalid_drop,
            dual_stack: r.dual_stack,
            enable_ipv6,
            ..CaptureConfig::default()
        }
    }

    /// istio-iptables' own checks (`Config.Validate`) plus the families of the DNS servers.
    /// [`CaptureConfig::from_redirect`] always passes.
    pub fn validate(&self) -> Result<(), CaptureConfigError> {
        if let OwnerGroups::Only(groups) = &self.owner_groups_include {
            if groups.len() > MAX_OWNER_GROUPS_INCLUDE {
                return Err(CaptureConfigError::TooManyOwnerGroups {
                    count: groups.len(),
                });
            }
        }
        let cidr = self.host_ipv4_loopback_cidr;
        if !cidr.addr().is_loopback() || cidr.prefix_len() < 8 {
            return Err(CaptureConfigError::LoopbackCidr { cidr });
        }
        for (servers, v4, family) in [
            (&self.dns_servers_v4, true, 4),
            (&self.dns_servers_v6, false, 6),
        ] {
            if let Some(bad) = servers.iter().find(|s| s.addr().is_ipv4() != v4) {
                return Err(CaptureConfigError::DnsServerFamily {
                    server: bad.to_string(),
                    family,
                });
            }
        }
        Ok(())
    }

    /// Whether the TPROXY policy routes are needed (Istio's `configureTProxyRoutes` condition).
    fn needs_tproxy_routes(&self) -> bool {
        self.interception_mode == InterceptionMode::Tproxy && !self.inbound_ports_include.is_empty()
    }

    /// Routes and addresses that go with the rules (Istio's `tproxy.ConfigureRoutes`).
    pub fn route_setup(&self) -> RouteSetup {
        RouteSetup {
            ipv6_loopback_addr: self.enable_ipv6,
            tproxy: self.needs_tproxy_routes().then_some(TproxyRoute {
                mark: self.inbound_tproxy_mark,
                table: self.inbound_tproxy_route_table,
                ipv6: self.enable_ipv6,
            }),
        }
    }
}

/// The ranges of a list, each in its family's list (Istio's `SeparateV4V6`); shared by the renderers.
#[derive(Default)]
struct Ranges {
    all: bool,
    v4: Vec<IpNet>,
    v6: Vec<IpNet>,
}

impl Ranges {
    fn split(list: &[IpNet]) -> Self {
        let (v4, v6) = list.iter().partition(|n| matches!(n, IpNet::V4(_)));
        Ranges { all: false, v4, v6 }
    }

    fn of(ranges: &IpRanges) -> Self {
        match ranges {
            IpRanges::All => Ranges {
                all: true,
                ..Ranges::default()
            },
            IpRanges::Only(list) => Ranges::split(list),
        }
    }

    /// Go's `netip.Addr.IsLoopback` on any range's address (a v4-mapped IPv6 address counts as IPv4).
    fn has_loopback(&self) -> bool {
        self.v4
            .iter()
            .chain(&self.v6)
            .any(|n| n.addr().to_canonical().is_loopback())
    }
}

/// Routes and addresses that go with the rules (Istio's tproxy.ConfigureRoutes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteSetup {
    /// Add `::6/128` on lo (IPv6 enabled).
    pub ipv6_loopback_addr: bool,
    /// TPROXY: `ip rule fwmark MARK lookup TABLE` + `local default dev lo table TABLE`, per family.
    pub tproxy: Option<TproxyRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TproxyRoute {
    pub mark: u32,
    pub table: u32,
    /// Also for IPv6 (rule + `local ::/0` route), besides IPv4.
    pub ipv6: bool,
}

/// Everything to program in one pod netns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// iptables-restore payload (IPv4), tables in Istio's order, each `* table` ... `COMMIT`.
    pub v4: String,
    /// ip6tables-restore payload when IPv6 is enabled.
    pub v6: Option<String>,
    pub routes: RouteSetup,
}

/// Istio's `getLocalIP`: IPv6 is enabled when the first non-loopback, non-link-local address of the netns is IPv6,
/// or, with dual stack, when any is. `None` when there is no such address (Istio fails the ADD then).
///
/// IPv4-mapped IPv6 addresses count as IPv4.
pub fn ipv6_enabled(addrs: &[IpAddr], dual_stack: bool) -> Option<bool> {
    let mut usable = addrs
        .iter()
        .map(|a| a.to_canonical())
        .filter(|a| !a.is_loopback() && !is_link_local_unicast(a) && !is_link_local_multicast(a));
    if dual_stack {
        let mut usable = usable.peekable();
        usable.peek()?;
        Some(usable.any(|a| a.is_ipv6()))
    } else {
        usable.next().map(|a| a.is_ipv6())
    }
}

/// Go's `netip.Addr.IsLinkLocalUnicast` (on an unmapped address).
fn is_link_local_unicast(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.octets()[..2] == [169, 254],
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Go's `netip.Addr.IsLinkLocalMulticast` (on an unmapped address).
fn is_link_local_multicast(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        IpAddr::V6(v6) => v6.segments()[0] & 0xff0f == 0xff02,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::PodInfo;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ipv6_detection_single_stack_takes_the_first_usable_address() {
        assert_eq!(ipv6_enabled(&ips(&["10.0.0.5"]), false), Some(false));
        assert_eq!(ipv6_enabled(&ips(&["2001:db8::5"]), false), Some(true));
        assert_eq!(
            ipv6_enabled(&ips(&["10.0.0.5", "2001:db8::5"]), false),
            Some(false)
        );
        assert_eq!(
            ipv6_enabled(&ips(&["2001:db8::5", "10.0.0.5"]), false),
            Some(true)
        );
        // Loopback, link-local unicast and link-local multicast are skipped.
        assert_eq!(
            ipv6_enabled(
                &ips(&[
                    "127.0.0.1",
                    "::1",
                    "fe80::1",
                    "febf::1",
                    "169.254.1.1",
                    "224.0.0.251",
                    "ff02::1",
                    "ff12::1",
                    "10.0.0.5"
                ]),
                false
            ),
            Some(false)
        );
        // Not link-local: fec0::/10 and ff05:: are usable.
        assert_eq!(ipv6_enabled(&ips(&["fec0::1"]), false), Some(true));
        assert_eq!(ipv6_enabled(&ips(&["ff05::1"]), false), Some(true));
        assert_eq!(ipv6_enabled(&ips(&["224.0.1.1"]), false), Some(false));
    }

    #[test]
    fn ipv6_detection_unmaps_v4_mapped_addresses() {
        assert_eq!(ipv6_enabled(&ips(&["::ffff:10.0.0.5"]), false), Some(false));
        assert_eq!(ipv6_enabled(&ips(&["::ffff:127.0.0.1"]), false), None);
        assert_eq!(ipv6_enabled(&ips(&["::ffff:169.254.0.1"]), true), None);
    }

    #[test]
    fn ipv6_detection_dual_stack_looks_for_any_ipv6() {
        assert_eq!(
            ipv6_enabled(&ips(&["10.0.0.5", "2001:db8::5"]), true),
            Some(true)
        );
        assert_eq!(
            ipv6_enabled(&ips(&["10.0.0.5", "fe80::5"]), true),
            Some(false)
        );
        assert_eq!(
            ipv6_enabled(&ips(&["10.0.0.5", "10.0.0.6"]), true),
            Some(false)
        );
        assert_eq!(ipv6_enabled(&ips(&["2001:db8::5"]), true), Some(true));
    }

    #[test]
    fn ipv6_detection_none_without_usable_address() {
        assert_eq!(ipv6_enabled(&[], false), None);
        assert_eq!(ipv6_enabled(&[], true), None);
        assert_eq!(
            ipv6_enabled(&ips(&["127.0.0.1", "::1", "fe80::1"]), false),
            None
        );
        assert_eq!(
            ipv6_enabled(&ips(&["127.0.0.1", "::1", "fe80::1"]), true),
            None
        );
    }

    #[test]
    fn from_redirect_maps_like_istio() {
        let mut pi = PodInfo::default();
        pi.annotations
            .insert(crate::redirect::INTERCEPTION_MODE.into(), "TPROXY".into());
        pi.proxy_env
            .insert(crate::redirect::ENV_DNS_CAPTURE.into(), "true".into());
        pi.proxy_env
            .insert(crate::redirect::ENV_DUAL_STACK.into(), "true".into());
        pi.proxy_uid = Some(1000);
        let r = Redirect::from_pod(&pi).unwrap();
        let c = CaptureConfig::from_redirect(&r, true);
        assert_eq!(c.proxy_uids, [1000]);
        assert_eq!(c.proxy_gids, [1337]);
        assert!(c.redirect_dns && c.capture_all_dns);
        assert!(c.dns_servers_v4.is_empty() && c.dns_servers_v6.is_empty());
        assert!(c.dual_stack && c.enable_ipv6);
        assert_eq!(c.owner_groups_include, OwnerGroups::All);
        assert!(c.owner_groups_exclude.is_empty());
        assert_eq!(c.host_ipv4_loopback_cidr.to_string(), "127.0.0.1/32");
        assert_eq!(c.inbound_ports_exclude, [15020, 15021, 15090]);
        assert_eq!(c.outbound_ports_exclude, [15020]);
        assert_eq!(c.outbound_ip_ranges_include, IpRanges::All);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.route_setup(),
            RouteSetup {
                ipv6_loopback_addr: true,
                tproxy: Some(TproxyRoute {
                    mark: 1337,
                    table: 133,
                    ipv6: true
                })
            }
        );
    }

    #[test]
    fn tproxy_routes_only_with_inbound_capture() {
        let mut c = CaptureConfig {
            interception_mode: InterceptionMode::Tproxy,
            ..CaptureConfig::default()
        };
        assert_eq!(c.route_setup(), RouteSetup::default());
        c.inbound_ports_include = PortSelector::Only(vec![80]);
        assert_eq!(
            c.route_setup().tproxy,
            Some(TproxyRoute {
                mark: 1337,
                table: 133,
                ipv6: false
            })
        );
        c.interception_mode = InterceptionMode::Redirect;
        assert_eq!(c.route_setup().tproxy, None);
        c.enable_ipv6 = true;
        assert!(c.route_setup().ipv6_loopback_addr);
    }

    #[test]
    fn validate_catches_what_istio_iptables_refuses() {
        let mut c = CaptureConfig {
            owner_groups_include: OwnerGroups::Only(vec![OwnerGroup::Id(1); 65]),
            ..CaptureConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(CaptureConfigError::TooManyOwnerGroups { count: 65 })
        );
        c.owner_groups_include = OwnerGroups::Only(vec![OwnerGroup::Id(1); 64]);
        assert_eq!(c.validate(), Ok(()));
        c.host_ipv4_loopback_cidr = "10.0.0.1/32".parse().unwrap();
        assert!(c.validate().is_err());
        c.host_ipv4_loopback_cidr = "127.0.0.1/7".parse().unwrap();
        assert!(c.validate().is_err());
        c.host_ipv4_loopback_cidr = "127.0.0.1/8".parse().unwrap();
        assert_eq!(c.validate(), Ok(()));
        c.dns_servers_v4 = vec!["::1".parse().unwrap()];
        assert!(matches!(
            c.validate(),
            Err(CaptureConfigError::DnsServerFamily { family: 4, .. })
        ));
    }

    #[test]
    fn owner_groups_parse() {
        assert_eq!("202".parse(), Ok(OwnerGroup::Id(202)));
        assert_eq!("java".parse(), Ok(OwnerGroup::Name("java".into())));
        assert_eq!("_x.y-z".parse(), Ok(OwnerGroup::Name("_x.y-z".into())));
        for bad in [
            "",
            "-g",
            "!g",
            "0202",
            "g g",
            "9group",
            "4294967296",
            "a\n-A",
        ] {
            assert!(bad.parse::<OwnerGroup>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_servers_keep_their_spelling() {
        let s: DnsServer = "::127.0.0.53".parse().unwrap();
        assert_eq!(s.to_string(), "::127.0.0.53");
        assert_eq!(s.addr(), "::7f00:35".parse::<IpAddr>().unwrap());
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4 -j ACCEPT",
            "fe80::1%eth0",
            "1.2.3.4/32",
        ] {
            assert!(bad.parse::<DnsServer>().is_err(), "{bad:?}");
        }
    }
}
