//! The redirect of one pod: Istio's `NewRedirect` (cni/pkg/plugin/sidecar_redirect.go), parsed into typed values.
//!
//! Istio keeps every annotation as the raw string and pastes it into iptables arguments later; here each value is
//! parsed once, strictly, and the rules are rendered from the typed result. Where Istio accepts a value that it then
//! fails on (or misreads) at `iptables-restore` time, we refuse it up front, naming the annotation and the value:
//!
//! - ports are decimal `1..=65535` without leading zeros (Istio accepts `0`, which matches no real connection, and
//!   `080`/`0100`, which iptables reads as octal: an error, or port 64);
//! - `*` is accepted only in `includeInboundPorts` (Istio's validator accepts it in the other port lists, and then
//!   writes `--dport *`, which iptables rejects);
//! - `runAsUser`/`runAsGroup` of the proxy must fit an owner match (`1..=4294967294`; 0 means "default", as in Istio);
//! - a blank (spaces only) port list is refused, except for `excludeInboundPorts` (Istio trims that one; the others
//!   it writes into the rule as a blank port, and iptables fails).
//!
//! Everything else is Istio's own validation: the interception mode is exactly `REDIRECT` or `TPROXY`, CIDRs are
//! `addr/bits` with no spaces, interface names follow `^[a-zA-Z0-9_][a-zA-Z0-9_.-]*$` and are at most 15 bytes.
//! Spaces around ports and interface names are trimmed, as Istio does; an empty value is an empty list.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::pod::{parse_go_bool, PodInfo};

/// `sidecar.istio.io/interceptionMode`
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// `traffic.sidecar.istio.io/includeOutboundIPRanges`
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// `traffic.sidecar.istio.io/excludeOutboundIPRanges`
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// `traffic.sidecar.istio.io/includeInboundPorts`
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// `traffic.sidecar.istio.io/excludeInboundPorts`
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// `traffic.sidecar.istio.io/includeOutboundPorts`
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// `traffic.sidecar.istio.io/excludeOutboundPorts`
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// `traffic.sidecar.istio.io/excludeInterfaces`
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// `istio.io/reroute-virtual-interfaces`
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// `traffic.sidecar.istio.io/kubevirtInterfaces`: deprecated, read only when [`REROUTE_VIRTUAL_INTERFACES`] is absent.
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";

/// Proxy env: DNS capture (`ISTIO_META_DNS_CAPTURE`).
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
/// Proxy env: dual stack (`ISTIO_DUAL_STACK`).
pub const ENV_DUAL_STACK: &str = "ISTIO_DUAL_STACK";
/// Proxy env: drop conntrack-INVALID packets (`INVALID_DROP`).
pub const ENV_INVALID_DROP: &str = "INVALID_DROP";

/// Envoy's outbound listener, the only redirect target the plugin uses.
pub const DEFAULT_TARGET_PORT: u16 = 15001;
/// The proxy's uid and gid when the pod does not set them (or sets 0).
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// The agent's status port: the default of both exclude-port annotations.
pub const PROXY_STATUS_PORT: u16 = 15020;
/// Always excluded from inbound capture (status, health, Prometheus), appended after the annotation's ports.
pub const ALWAYS_EXCLUDED_INBOUND_PORTS: [u16; 3] = [15020, 15021, 15090];

/// Largest uid/gid an owner match accepts (`(uid_t)-1` is "no id").
const MAX_OWNER_ID: u32 = u32::MAX - 1;
/// Linux IFNAMSIZ - 1.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedirectError {
    #[error("annotation {annotation} has an invalid value {value:?}: {reason}")]
    Annotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    /// The `istio-proxy` container's `securityContext.runAsUser`/`runAsGroup` cannot be an owner match.
    #[error("istio-proxy securityContext.{field} is {value}, which is not a valid owner id (1-{MAX_OWNER_ID})")]
    ProxyId { field: &'static str, value: i64 },
}

/// How inbound connections reach the proxy (`sidecar.istio.io/interceptionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// NAT `REDIRECT` (the default).
    #[default]
    Redirect,
    /// `TPROXY` in the mangle table, keeping the original source address.
    Tproxy,
}

impl InterceptionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InterceptionMode::Redirect => "REDIRECT",
            InterceptionMode::Tproxy => "TPROXY",
        }
    }
}

impl FromStr for InterceptionMode {
    type Err = String;
    /// Exactly Istio's spellings: case-sensitive, no trimming.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "REDIRECT" => Ok(InterceptionMode::Redirect),
            "TPROXY" => Ok(InterceptionMode::Tproxy),
            _ => Err("interception mode must be REDIRECT or TPROXY".to_string()),
        }
    }
}

impl fmt::Display for InterceptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Inbound ports to capture: all (`*`) or a list (an empty list captures nothing inbound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelector {
    All,
    Only(Vec<u16>),
}

impl PortSelector {
    /// True when nothing is selected (Istio's empty string).
    pub fn is_empty(&self) -> bool {
        matches!(self, PortSelector::Only(p) if p.is_empty())
    }
}

/// Outbound destinations to capture: all (`*`) or a list of CIDRs (an empty list captures nothing by address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpRanges {
    All,
    Only(Vec<IpNet>),
}

/// A network interface name as Istio accepts it: `^[a-zA-Z0-9_][a-zA-Z0-9_.-]*$`, 1 to 15 bytes.
///
/// This is a subset of what the kernel accepts (`dev_valid_name`), and no such name can be read as an iptables
/// option, negation, wildcard (`+`) or quote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty interface name".to_string());
        }
        if s.len() > MAX_IFNAME_LEN {
            return Err(format!(
                "interface name {s:?} is longer than {MAX_IFNAME_LEN} bytes"
            ));
        }
        let mut bytes = s.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok {
            return Err(format!(
                "interface name {s:?} must match [a-zA-Z0-9_][a-zA-Z0-9_.-]*"
            ));
        }
        Ok(InterfaceName(s.to_string()))
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The typed, validated redirect of one pod (Istio's `Redirect`, but parsed, never raw strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Envoy's outbound port (always [`DEFAULT_TARGET_PORT`], as in Istio).
    pub target_port: u16,
    pub interception_mode: InterceptionMode,
    /// The proxy's uid: `runAsUser` of `istio-proxy`, or 1337 when absent or 0.
    pub proxy_uid: u32,
    /// The proxy's gid: `runAsGroup` of `istio-proxy`, or 1337 when absent or 0.
    pub proxy_gid: u32,
    /// `includeOutboundIPRanges`, default `*`.
    pub include_outbound_ip_ranges: IpRanges,
    /// `excludeOutboundIPRanges`, default empty.
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// `includeInboundPorts`, default `*`.
    pub include_inbound_ports: PortSelector,
    /// `excludeInboundPorts` (default 15020) followed by 15020,15021,15090, duplicates removed (first one kept).
    pub exclude_inbound_ports: Vec<u16>,
    /// `includeOutboundPorts`, default empty.
    pub include_outbound_ports: Vec<u16>,
    /// `excludeOutboundPorts`, default 15020.
    pub exclude_outbound_ports: Vec<u16>,
    /// `excludeInterfaces`, default empty.
    pub exclude_interfaces: Vec<InterfaceName>,
    /// `istio.io/reroute-virtual-interfaces`, or the deprecated `kubevirtInterfaces` when the former is absent.
    pub reroute_virtual_interfaces: Vec<InterfaceName>,
    /// `ISTIO_META_DNS_CAPTURE` on the proxy.
    pub dns_capture: bool,
    /// `ISTIO_DUAL_STACK` on the proxy: decides how IPv6 is detected (see [`crate::rules::ipv6_enabled`]).
    pub dual_stack: bool,
    /// `INVALID_DROP` on the proxy.
    pub invalid_drop: bool,
}

impl Redirect {
    /// Derives the redirect from the pod, with Istio's defaults; fails on any invalid value.
    pub fn from_pod(pi: &PodInfo) -> Result<Self, RedirectError> {
        let ann = |key: &'static str| pi.annotations.get(key).map(|v| (key, v.as_str()));

        let interception_mode = match ann(INTERCEPTION_MODE) {
            Some((key, v)) => v.parse().map_err(|reason| invalid(key, v, reason))?,
            None => InterceptionMode::Redirect,
        };
        let proxy_uid = proxy_id("runAsUser", pi.proxy_uid)?;
        let proxy_gid = proxy_id("runAsGroup", pi.proxy_gid)?;

        let include_outbound_ip_ranges = match ann(INCLUDE_OUTBOUND_IP_RANGES) {
            None => IpRanges::All,
            Some((_, "*")) => IpRanges::All,
            Some((key, v)) => IpRanges::Only(parse_cidr_list(v).map_err(|r| invalid(key, v, r))?),
        };
        let exclude_outbound_ip_ranges = match ann(EXCLUDE_OUTBOUND_IP_RANGES) {
            None => Vec::new(),
            Some((key, v)) => parse_cidr_list(v).map_err(|r| invalid(key, v, r))?,
        };
        let exclude_inbound = match ann(EXCLUDE_INBOUND_PORTS) {
            None => vec![PROXY_STATUS_PORT],
            Some((key, v)) => parse_exclude_inbound_ports(v).map_err(|r| invalid(key, v, r))?,
        };
        let include_inbound_ports = match ann(INCLUDE_INBOUND_PORTS) {
            None => PortSelector::All,
            Some((_, "*")) => PortSelector::All,
            Some((key, v)) => {
                PortSelector::Only(parse_port_list(v).map_err(|r| invalid(key, v, r))?)
            }
        };
        let exclude_outbound_ports = match ann(EXCLUDE_OUTBOUND_PORTS) {
            None => vec![PROXY_STATUS_PORT],
            Some((key, v)) => parse_port_list(v).map_err(|r| invalid(key, v, r))?,
        };
        let include_outbound_ports = match ann(INCLUDE_OUTBOUND_PORTS) {
            None => Vec::new(),
            Some((key, v)) => parse_port_list(v).map_err(|r| invalid(key, v, r))?,
        };
        let exclude_interfaces = match ann(EXCLUDE_INTERFACES) {
            None => Vec::new(),
            Some((key, v)) => parse_interface_list(v).map_err(|r| invalid(key, v, r))?,
        };
        // The deprecated key is read only when the new one is absent (even an empty new one wins).
        let reroute_virtual_interfaces =
            match ann(REROUTE_VIRTUAL_INTERFACES).or_else(|| ann(KUBEVIRT_INTERFACES)) {
                None => Vec::new(),
                Some((key, v)) => parse_interface_list(v).map_err(|r| invalid(key, v, r))?,
            };

        Ok(Redirect {
            target_port: DEFAULT_TARGET_PORT,
            interception_mode,
            proxy_uid,
            proxy_gid,
            include_outbound_ip_ranges,
            exclude_outbound_ip_ranges,
            include_inbound_ports,
            exclude_inbound_ports: with_always_excluded(exclude_inbound),
            include_outbound_ports,
            exclude_outbound_ports,
            exclude_interfaces,
            reroute_virtual_interfaces,
            dns_capture: env_bool(pi, ENV_DNS_CAPTURE),
            dual_stack: env_bool(pi, ENV_DUAL_STACK),
            invalid_drop: env_bool(pi, ENV_INVALID_DROP),
        })
    }

    /// `ISTIO_DUAL_STACK`: pass it to [`crate::rules::ipv6_enabled`].
    pub fn dual_stack(&self) -> bool {
        self.dual_stack
    }
}

fn invalid(annotation: &'static str, value: &str, reason: String) -> RedirectError {
    RedirectError::Annotation {
        annotation,
        value: value.to_string(),
        reason,
    }
}

/// `runAsUser`/`runAsGroup`: absent or 0 means the default 1337, as in Istio.
fn proxy_id(field: &'static str, id: Option<i64>) -> Result<u32, RedirectError> {
    match id {
        None | Some(0) => Ok(DEFAULT_PROXY_ID),
        Some(v) => match u32::try_from(v) {
            Ok(id) if id <= MAX_OWNER_ID => Ok(id),
            _ => Err(RedirectError::ProxyId { field, value: v }),
        },
    }
}

/// Istio reads these with Go's `strconv.ParseBool`; an unparsable value counts as false, with a warning.
fn env_bool(pi: &PodInfo, name: &'static str) -> bool {
    let Some(v) = pi.proxy_env.get(name) else {
        return false;
    };
    parse_go_bool(v).unwrap_or_else(|| {
        tracing::warn!(env = name, value = %v, "cannot parse boolean proxy environment variable; using false");
        false
    })
}

/// The user's exclusions, then Istio's always-excluded ports, each port once, first occurrence kept.
fn with_always_excluded(mut ports: Vec<u16>) -> Vec<u16> {
    ports.extend(ALWAYS_EXCLUDED_INBOUND_PORTS);
    let mut seen = std::collections::HashSet::new();
    ports.retain(|p| seen.insert(*p));
    ports
}

/// One port: surrounding whitespace trimmed (as Istio), then decimal `1..=65535` without leading zeros.
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty port in list".to_string());
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a decimal port number"));
    }
    if t.len() > 1 && t.starts_with('0') {
        return Err(format!(
            "port {s:?} has a leading zero (iptables would read it as octal)"
        ));
    }
    match t.parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!("port {s:?} is out of range 1-65535")),
    }
}

/// A comma-separated port list; the empty string is the empty list. `*` is not a port here.
///
/// A blank value (spaces only) is refused: Istio validates it as empty but then writes the blank as a port into the
/// rule, and iptables fails. Only `excludeInboundPorts` is trimmed before use (see [`parse_exclude_inbound_ports`]).
pub(crate) fn parse_port_list(s: &str) -> Result<Vec<u16>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if s.trim().is_empty() {
        return Err("blank port list (use an empty value for no ports)".to_string());
    }
    if s.trim() == "*" {
        return Err(
            "'*' (all ports) is accepted only as the whole value of includeInboundPorts"
                .to_string(),
        );
    }
    s.trim().split(',').map(parse_port).collect()
}

/// `excludeInboundPorts`: Istio trims the whole value before use, so a blank value is the empty list here.
fn parse_exclude_inbound_ports(s: &str) -> Result<Vec<u16>, String> {
    parse_port_list(s.trim())
}

/// One CIDR as Go's `netip.ParsePrefix`: `addr/bits`, no spaces, no zone, decimal bits without leading zeros.
/// The address keeps its host bits (`127.0.0.1/8` stays `127.0.0.1/8`).
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let Some((addr, bits)) = s.split_once('/') else {
        return Err(format!("{s:?} is not a CIDR (no '/')"));
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR (bad address {addr:?})"))?;
    let bad_bits = || format!("{s:?} is not a CIDR (bad prefix length {bits:?})");
    if bits.is_empty()
        || !bits.bytes().all(|b| b.is_ascii_digit())
        || (bits.len() > 1 && bits.starts_with('0'))
    {
        return Err(bad_bits());
    }
    let len: u8 = bits.parse().map_err(|_| bad_bits())?;
    IpNet::new(addr, len).map_err(|_| bad_bits())
}

/// A comma-separated CIDR list as Istio's `validateCIDRList`: the empty string is the empty list, no trimming.
pub(crate) fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(parse_cidr).collect()
}

/// A comma-separated interface list as Istio's `ValidateInterfaceNames`: each name trimmed, none empty.
pub(crate) fn parse_interface_list(s: &str) -> Result<Vec<InterfaceName>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(|n| n.trim().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod(annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    fn redirect(annotations: &[(&str, &str)]) -> Redirect {
        match Redirect::from_pod(&pod(annotations)) {
            Ok(r) => r,
            Err(e) => panic!("unexpected error for {annotations:?}: {e}"),
        }
    }

    /// Asserts the annotation is refused, with the annotation and the value in the error.
    fn refused(key: &str, value: &str) -> String {
        let err = match Redirect::from_pod(&pod(&[(key, value)])) {
            Ok(r) => panic!("{key}={value:?} was accepted: {r:?}"),
            Err(e) => e,
        };
        match &err {
            RedirectError::Annotation {
                annotation,
                value: v,
                ..
            } => {
                assert_eq!(*annotation, key);
                assert_eq!(v, value);
            }
            other => panic!("wrong error {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(key), "{msg}");
        assert!(msg.contains(&format!("{value:?}")), "{msg}");
        msg
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_istios() {
        let r = redirect(&[]);
        assert_eq!(
            r,
            Redirect {
                target_port: 15001,
                interception_mode: InterceptionMode::Redirect,
                proxy_uid: 1337,
                proxy_gid: 1337,
                include_outbound_ip_ranges: IpRanges::All,
                exclude_outbound_ip_ranges: vec![],
                include_inbound_ports: PortSelector::All,
                exclude_inbound_ports: vec![15020, 15021, 15090],
                include_outbound_ports: vec![],
                exclude_outbound_ports: vec![15020],
                exclude_interfaces: vec![],
                reroute_virtual_interfaces: vec![],
                dns_capture: false,
                dual_stack: false,
                invalid_drop: false,
            }
        );
        assert!(!r.dual_stack());
    }

    #[test]
    fn interception_mode() {
        assert_eq!(
            redirect(&[(INTERCEPTION_MODE, "TPROXY")]).interception_mode,
            InterceptionMode::Tproxy
        );
        assert_eq!(
            redirect(&[(INTERCEPTION_MODE, "REDIRECT")]).interception_mode,
            InterceptionMode::Redirect
        );
        for bad in ["tproxy", "NONE", "", " TPROXY", "TPROXY -j ACCEPT"] {
            refused(INTERCEPTION_MODE, bad);
        }
    }

    #[test]
    fn proxy_ids() {
        let mut pi = pod(&[]);
        pi.proxy_uid = Some(1000670000);
        pi.proxy_gid = Some(1000670001);
        let r = Redirect::from_pod(&pi).unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (1000670000, 1000670001));

        pi.proxy_uid = Some(0);
        pi.proxy_gid = None;
        let r = Redirect::from_pod(&pi).unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (1337, 1337));

        pi.proxy_uid = Some(1);
        pi.proxy_gid = Some(4294967294);
        let r = Redirect::from_pod(&pi).unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (1, 4294967294));

        for (uid, gid, field, value) in [
            (Some(-1), None, "runAsUser", -1),
            (None, Some(4294967295), "runAsGroup", 4294967295),
            (Some(1 << 40), None, "runAsUser", 1 << 40),
        ] {
            pi.proxy_uid = uid;
            pi.proxy_gid = gid;
            let err = Redirect::from_pod(&pi).unwrap_err();
            assert_eq!(err, RedirectError::ProxyId { field, value });
            assert!(err.to_string().contains(&value.to_string()));
            assert!(err.to_string().contains(field));
        }
    }

    #[test]
    fn outbound_ip_ranges() {
        let r = redirect(&[
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,2001:db8::/32"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.1.0.0/16"),
        ]);
        assert_eq!(
            r.include_outbound_ip_ranges,
            IpRanges::Only(vec![net("10.0.0.0/8"), net("2001:db8::/32")])
        );
        assert_eq!(r.exclude_outbound_ip_ranges, vec![net("10.1.0.0/16")]);

        assert_eq!(
            redirect(&[(INCLUDE_OUTBOUND_IP_RANGES, "*")]).include_outbound_ip_ranges,
            IpRanges::All
        );
        // Empty include: nothing captured by address; empty exclude: nothing excluded.
        let r = redirect(&[
            (INCLUDE_OUTBOUND_IP_RANGES, ""),
            (EXCLUDE_OUTBOUND_IP_RANGES, ""),
        ]);
        assert_eq!(r.include_outbound_ip_ranges, IpRanges::Only(vec![]));
        assert!(r.exclude_outbound_ip_ranges.is_empty());
        // Host bits are kept, as Go's netip.Prefix does.
        assert_eq!(
            redirect(&[(INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.1/8")]).include_outbound_ip_ranges,
            IpRanges::Only(vec![net("127.0.0.1/8")])
        );

        for key in [INCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_IP_RANGES] {
            for bad in [
                "10.0.0.0",
                "10.0.0.0/33",
                "2001:db8::/129",
                "10.0.0.0/8\n-A OUTPUT -j ACCEPT",
                "10.0.0.0/8 -j ACCEPT",
                " 10.0.0.0/8",
                "10.0.0.0/8,",
                "10.0.0.0/8,,10.1.0.0/16",
                "010.0.0.0/8",
                "10.0.0.0/08",
                "10.0.0.0/+8",
                "fe80::1%eth0/64",
                "*,10.0.0.0/8",
                "foo",
                " ",
            ] {
                refused(key, bad);
            }
        }
        // The wildcard is not an exclusion.
        refused(EXCLUDE_OUTBOUND_IP_RANGES, "*");
    }

    #[test]
    fn inbound_ports() {
        let r = redirect(&[(INCLUDE_INBOUND_PORTS, "1111,2222")]);
        assert_eq!(
            r.include_inbound_ports,
            PortSelector::Only(vec![1111, 2222])
        );
        assert_eq!(
            redirect(&[(INCLUDE_INBOUND_PORTS, "*")]).include_inbound_ports,
            PortSelector::All
        );
        let empty = redirect(&[(INCLUDE_INBOUND_PORTS, "")]).include_inbound_ports;
        assert_eq!(empty, PortSelector::Only(vec![]));
        assert!(empty.is_empty());
        // Istio trims around each port and around the list.
        assert_eq!(
            redirect(&[(INCLUDE_INBOUND_PORTS, " 80 , 81 ")]).include_inbound_ports,
            PortSelector::Only(vec![80, 81])
        );
        // Duplicates are kept, as Istio does (only the exclusion list is de-duplicated).
        assert_eq!(
            redirect(&[(INCLUDE_INBOUND_PORTS, "80,80")]).include_inbound_ports,
            PortSelector::Only(vec![80, 80])
        );
    }

    #[test]
    fn exclude_inbound_ports_always_get_istio_ports_deduplicated() {
        let ex = |v: &str| redirect(&[(EXCLUDE_INBOUND_PORTS, v)]).exclude_inbound_ports;
        assert_eq!(ex("3333,4444"), vec![3333, 4444, 15020, 15021, 15090]);
        assert_eq!(ex(""), vec![15020, 15021, 15090]);
        assert_eq!(ex("   "), vec![15020, 15021, 15090]);
        assert_eq!(ex("15090,80"), vec![15090, 80, 15020, 15021]);
        assert_eq!(ex("80,80,15021"), vec![80, 15021, 15020, 15090]);
        assert_eq!(ex(" 80, 80 "), vec![80, 15020, 15021, 15090]);
        // Default (absent): 15020, then the appended ports without the duplicate.
        assert_eq!(
            redirect(&[]).exclude_inbound_ports,
            vec![15020, 15021, 15090]
        );
    }

    #[test]
    fn outbound_ports() {
        let r = redirect(&[
            (INCLUDE_OUTBOUND_PORTS, "32000,31000"),
            (EXCLUDE_OUTBOUND_PORTS, "5555,6666"),
        ]);
        assert_eq!(r.include_outbound_ports, vec![32000, 31000]);
        assert_eq!(r.exclude_outbound_ports, vec![5555, 6666]);
        // An empty exclusion replaces the default 15020.
        assert!(redirect(&[(EXCLUDE_OUTBOUND_PORTS, "")])
            .exclude_outbound_ports
            .is_empty());
    }

    #[test]
    fn bad_ports_are_refused_in_every_port_annotation() {
        for key in [
            INCLUDE_INBOUND_PORTS,
            EXCLUDE_INBOUND_PORTS,
            INCLUDE_OUTBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
        ] {
            for bad in [
                "80 -j ACCEPT",
                "80\n-A OUTPUT -j ACCEPT",
                "80,,81",
                "80,",
                ",80",
                "0",
                "65536",
                "99999999999999999999",
                "-1",
                "+80",
                "080",
                "0x50",
                "http",
                "80-90",
                "80:90",
                "8 0",
                "*,80",
                "**",
            ] {
                let msg = refused(key, bad);
                assert!(!msg.is_empty());
            }
        }
        // `*` is meaningful only for the inbound include; Istio would write `--dport *` for the others.
        for key in [
            EXCLUDE_INBOUND_PORTS,
            INCLUDE_OUTBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
        ] {
            refused(key, "*");
        }
        // Istio compares the wildcard untrimmed.
        refused(INCLUDE_INBOUND_PORTS, " *");
        // A blank list is written as a blank port by Istio (iptables fails), except for excludeInboundPorts,
        // which Istio trims first.
        for key in [
            INCLUDE_INBOUND_PORTS,
            INCLUDE_OUTBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
        ] {
            refused(key, " ");
            refused(key, "\t");
        }
        assert_eq!(
            redirect(&[(EXCLUDE_INBOUND_PORTS, " \t")]).exclude_inbound_ports,
            vec![15020, 15021, 15090]
        );
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("\t443\n"), Ok(443));
    }

    #[test]
    fn interfaces() {
        let r = redirect(&[(EXCLUDE_INTERFACES, "eth1, net_2 ,k6t-eth0,a.b")]);
        let names: Vec<&str> = r.exclude_interfaces.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["eth1", "net_2", "k6t-eth0", "a.b"]);
        assert!(redirect(&[(EXCLUDE_INTERFACES, "")])
            .exclude_interfaces
            .is_empty());
        assert_eq!(
            redirect(&[(EXCLUDE_INTERFACES, "abcdefghijklmno")]).exclude_interfaces[0].as_str(),
            "abcdefghijklmno"
        );

        for key in [
            EXCLUDE_INTERFACES,
            REROUTE_VIRTUAL_INTERFACES,
            KUBEVIRT_INTERFACES,
        ] {
            for bad in [
                "abcdefghijklmnop",
                "-j",
                "!eth0",
                "eth0 -j ACCEPT",
                "eth0\n-A OUTPUT",
                "eth+",
                "eth0,,eth1",
                "eth0,",
                " ",
                ".",
                "..",
                ".eth",
                "eth/0",
                "eth:0",
                "eth\"0",
                "eth'0",
                "eth\\0",
                "eth#0",
                "ethé",
                "veth@if3",
            ] {
                refused(key, bad);
            }
        }
    }

    #[test]
    fn reroute_virtual_interfaces_prefers_the_new_annotation() {
        let names = |r: Redirect| -> Vec<String> {
            r.reroute_virtual_interfaces
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(
            names(redirect(&[(KUBEVIRT_INTERFACES, "eth1,eth2")])),
            ["eth1", "eth2"]
        );
        assert_eq!(
            names(redirect(&[
                (REROUTE_VIRTUAL_INTERFACES, "eth3"),
                (KUBEVIRT_INTERFACES, "eth1,eth2")
            ])),
            ["eth3"]
        );
        // Present but empty still wins; the deprecated value is then not even validated.
        assert!(names(redirect(&[
            (REROUTE_VIRTUAL_INTERFACES, ""),
            (KUBEVIRT_INTERFACES, "not valid!")
        ]))
        .is_empty());
        // A bad deprecated value is refused under its own name when it is the one used.
        refused(KUBEVIRT_INTERFACES, "eth 1");
    }

    #[test]
    fn proxy_env_booleans() {
        let with_env = |name: &str, v: &str| {
            let mut pi = pod(&[]);
            pi.proxy_env.insert(name.to_string(), v.to_string());
            Redirect::from_pod(&pi).unwrap()
        };
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert!(with_env(ENV_DNS_CAPTURE, t).dns_capture);
            assert!(with_env(ENV_DUAL_STACK, t).dual_stack);
            assert!(with_env(ENV_INVALID_DROP, t).invalid_drop);
        }
        // False spellings and anything unparsable (warned) are false; the ADD goes on.
        for f in ["0", "false", "F", "", "yes", "on", " true", "tRUE"] {
            let r = with_env(ENV_DNS_CAPTURE, f);
            assert!(!r.dns_capture, "{f:?}");
            assert!(!with_env(ENV_DUAL_STACK, f).dual_stack);
            assert!(!with_env(ENV_INVALID_DROP, f).invalid_drop);
        }
    }

    #[test]
    fn unrelated_annotations_are_ignored() {
        // Istio registers sidecar.istio.io/statusPort but NewRedirect never reads it.
        let r = redirect(&[
            ("sidecar.istio.io/statusPort", "not a port"),
            ("sidecar.istio.io/status", "{}"),
            ("sidecar.istio.io/inject", "true"),
        ]);
        assert_eq!(r, redirect(&[]));
    }

    #[test]
    fn first_bad_annotation_fails_the_whole_redirect() {
        let err = Redirect::from_pod(&pod(&[
            (INCLUDE_INBOUND_PORTS, "80"),
            (EXCLUDE_OUTBOUND_PORTS, "5555,bad"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains(EXCLUDE_OUTBOUND_PORTS));
        assert!(err.to_string().contains("bad"));
    }
}
