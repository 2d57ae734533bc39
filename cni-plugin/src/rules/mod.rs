//! CONTRACT (to be implemented): Redirect -> CaptureConfig -> rendered rules.
use crate::redirect::Redirect;

/// istio-iptables' configuration (tools/common/config), typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {}

impl CaptureConfig {
    /// The configuration the plugin derives for a redirect, as Istio's `sidecar_iptables_linux.go` does.
    /// `enable_ipv6` comes from the pod netns addresses (see [`ipv6_enabled`]).
    pub fn from_redirect(_r: &Redirect, _enable_ipv6: bool) -> Self {
        CaptureConfig {}
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

/// Renders the iptables-restore payloads for a capture configuration.
pub fn render_iptables(_cfg: &CaptureConfig) -> Ruleset {
    Ruleset::default()
}

/// Istio's `getLocalIP`: IPv6 is enabled when the first non-loopback, non-link-local address of the netns is IPv6,
/// or, with dual stack, when any is. `None` when there is no such address (Istio fails the ADD then).
pub fn ipv6_enabled(addrs: &[std::net::IpAddr], dual_stack: bool) -> Option<bool> {
    let _ = (addrs, dual_stack);
    None
}
