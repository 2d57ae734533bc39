//! Addresses, policy rules and routes of the calling thread's netns, over rtnetlink (Istio's
//! `tproxy.ConfigureRoutes`), all idempotent: a second ADD leaves exactly one of each.
//!
//! Every socket is opened on the calling thread, so call these on the netns thread: a socket belongs to the netns
//! it was opened in for its whole life. [`addresses`], which every ADD needs, is one synchronous dump; only the
//! routes that some captures need ([`Netlink`]: IPv6's loopback address, TPROXY) start a current-thread tokio
//! runtime for rtnetlink.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::rules::{RouteSetup, TproxyRoute};

/// The address Istio puts on lo for IPv6 pods (the source of inbound passthrough, like 127.0.0.6 in IPv4).
pub const IPV6_INBOUND_PASSTHROUGH: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("the netns has no loopback interface \"lo\"")]
    NoLoopback,
    #[error("netlink address dump failed: {0}")]
    Dump(std::io::Error),
    #[error("netlink address dump failed: the kernel answered error {errno} ({})", std::io::Error::from_raw_os_error(*errno))]
    DumpRefused { errno: i32 },
    #[error("netlink address dump failed: cannot parse the kernel's answer: {0}")]
    DumpMalformed(String),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    let op = op.into();
    move |source| RouteError::Netlink { op, source }
}

/// What [`Netlink::configure`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutesOutcome {
    /// Things added (e.g. `ip -6 addr add ::6/128 dev lo`).
    pub added: Vec<String>,
    /// Things that were already there.
    pub present: Vec<String>,
}

/// All interface addresses of the calling thread's netns, in the kernel's dump order (IPv4 first, then IPv6, each
/// by interface), like Go's `net.InterfaceAddrs` which Istio's `getLocalIP` walks: one `RTM_GETADDR` dump on a
/// plain netlink socket, no runtime.
pub fn addresses() -> Result<Vec<IpAddr>, RouteError> {
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use rtnetlink::packet_route::address::AddressMessage;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_ROUTE).map_err(RouteError::Socket)?;
    socket.bind_auto().map_err(RouteError::Socket)?;
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket
        .send_to(&bytes, &SocketAddr::new(0, 0), 0)
        .map_err(RouteError::Dump)?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0).map_err(RouteError::Dump)?;
        let mut at = 0;
        while at < buf.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..])
                .map_err(|e| RouteError::DumpMalformed(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(RouteError::DumpMalformed("a message of length 0".into()));
            }
            // Messages are 4-byte aligned in a datagram.
            at += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(RouteError::DumpRefused { errno: -code.get() });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
                    if let Some(ip) = address_of(&m) {
                        out.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
}

/// An address message's address: its local address when it has one (point-to-point), else its address.
fn address_of(msg: &rtnetlink::packet_route::address::AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address)
}

/// An rtnetlink connection bound to the calling thread's netns.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens the socket in the calling thread's netns.
    pub fn open() -> Result<Self, RouteError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(RouteError::Runtime)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Socket)?;
            tokio::spawn(conn);
            Ok::<_, RouteError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    async fn loopback_index(&self) -> Result<u32, RouteError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute();
        while let Some(msg) = links.try_next().await.map_err(nl("link get lo"))? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == "lo"))
            {
                return Ok(msg.header.index);
            }
        }
        Err(RouteError::NoLoopback)
    }

    /// Whether `setup` has anything for [`Netlink::configure`] to do (most captures have not: no connection is
    /// opened for them).
    pub fn needed_for(setup: &RouteSetup) -> bool {
        setup.ipv6_loopback_addr || setup.tproxy.is_some()
    }

    /// Programs the routes of a ruleset: `::6/128` on lo, and TPROXY's policy rule and local default route per
    /// family. Each item is checked first and added only when absent.
    pub fn configure(&self, setup: &RouteSetup) -> Result<RoutesOutcome, RouteError> {
        let mut outcome = RoutesOutcome::default();
        if !Self::needed_for(setup) {
            return Ok(outcome);
        }
        self.rt.block_on(async {
            let lo = self.loopback_index().await?;
            if setup.ipv6_loopback_addr {
                self.ensure_loopback_v6(lo, &mut outcome).await?;
            }
            if let Some(tp) = &setup.tproxy {
                self.ensure_tproxy(lo, tp, &mut outcome).await?;
            }
            Ok::<_, RouteError>(())
        })?;
        Ok(outcome)
    }

    async fn ensure_loopback_v6(
        &self,
        lo: u32,
        outcome: &mut RoutesOutcome,
    ) -> Result<(), RouteError> {
        let what = format!("address {IPV6_INBOUND_PASSTHROUGH}/128 dev lo");
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(lo)
            .execute();
        while let Some(msg) = dump.try_next().await.map_err(nl("address dump lo"))? {
            let has = msg.header.prefix_len == 128
                && msg.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(IpAddr::V6(ip)) | AddressAttribute::Local(IpAddr::V6(ip))
                        if *ip == IPV6_INBOUND_PASSTHROUGH)
                });
            if has {
                outcome.present.push(what);
                return Ok(());
            }
        }
        self.handle
            .address()
            .add(lo, IpAddr::V6(IPV6_INBOUND_PASSTHROUGH), 128)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add {what}")))?;
        outcome.added.push(what);
        Ok(())
    }

    async fn ensure_tproxy(
        &self,
        lo: u32,
        tp: &TproxyRoute,
        outcome: &mut RoutesOutcome,
    ) -> Result<(), RouteError> {
        let mut versions = vec![IpVersion::V4];
        if tp.ipv6 {
            versions.push(IpVersion::V6);
        }
        for version in versions {
            let fam = match version {
                IpVersion::V4 => "-4",
                IpVersion::V6 => "-6",
            };
            let what = format!("rule {fam} fwmark {:#x} lookup {}", tp.mark, tp.table);
            if self.has_rule(version.clone(), tp).await? {
                outcome.present.push(what);
            } else {
                let add = self
                    .handle
                    .rule()
                    .add()
                    .fw_mark(tp.mark)
                    .table_id(tp.table)
                    .action(RuleAction::ToTable);
                let res = match version {
                    IpVersion::V4 => add.v4().execute().await,
                    IpVersion::V6 => add.v6().execute().await,
                };
                res.map_err(nl(format!("add {what}")))?;
                outcome.added.push(what);
            }
            let what = format!("route {fam} local default dev lo table {}", tp.table);
            if self
                .has_local_default(version.clone(), lo, tp.table)
                .await?
            {
                outcome.present.push(what);
                continue;
            }
            let msg = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .output_interface(lo)
                    .table_id(tp.table)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                    .output_interface(lo)
                    .table_id(tp.table)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .build(),
            };
            // Replace rather than exclusive create: should the route appear between the dump and here, the
            // result is still exactly one route.
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add {what}")))?;
            outcome.added.push(what);
        }
        Ok(())
    }

    async fn has_local_default(
        &self,
        version: IpVersion,
        lo: u32,
        table: u32,
    ) -> Result<bool, RouteError> {
        let filter = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(route) = routes.try_next().await.map_err(nl("route dump"))? {
            let rt_table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            let oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if rt_table == table
                && route.header.kind == RouteType::Local
                && route.header.destination_prefix_length == 0
                && oif == Some(lo)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn has_rule(&self, version: IpVersion, tp: &TproxyRoute) -> Result<bool, RouteError> {
        let mut rules = self.handle.rule().get(version).execute();
        while let Some(rule) = rules.try_next().await.map_err(nl("rule dump"))? {
            let mark = rule.attributes.iter().find_map(|a| match a {
                RuleAttribute::FwMark(m) => Some(*m),
                _ => None,
            });
            let table = rule
                .attributes
                .iter()
                .find_map(|a| match a {
                    RuleAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(rule.header.table));
            if mark == Some(tp.mark)
                && table == tp.table
                && rule.header.action == RuleAction::ToTable
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
