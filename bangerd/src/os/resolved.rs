//! [`LinkDns`] backed by systemd-resolved (`org.freedesktop.resolve1`):
//! `SetLinkDNS`, `SetLinkDomains` (routing-only) and
//! `SetLinkDefaultRoute(false)` on the bridge.

use std::net::Ipv4Addr;

use zbus::Connection;

use crate::auth::BoxFuture;
use crate::error::{Error, Result};
use crate::net::resolved::LinkDns;
use crate::net::resolved::RESOLVED_NAME;

#[zbus::proxy(
    interface = "org.freedesktop.resolve1.Manager",
    default_service = "org.freedesktop.resolve1",
    default_path = "/org/freedesktop/resolve1"
)]
trait Resolve {
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addresses: &[(i32, Vec<u8>)]) -> zbus::Result<()>;
    fn set_link_domains(&self, ifindex: i32, domains: &[(&str, bool)]) -> zbus::Result<()>;
    fn set_link_default_route(&self, ifindex: i32, enable: bool) -> zbus::Result<()>;
}

/// systemd-resolved on the system bus.
#[derive(Debug, Clone)]
pub struct Resolved {
    conn: Connection,
}

impl Resolved {
    /// On `conn`, the system bus.
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }
}

/// `AF_INET`.
const AF_INET: i32 = 2;

impl LinkDns for Resolved {
    fn present<'a>(&'a self) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            crate::os::bus_names::name_state(&self.conn, RESOLVED_NAME)
                .await
                .reachable()
        })
    }

    fn register<'a>(
        &'a self,
        ifindex: u32,
        server: Ipv4Addr,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let fail = |what: &str, e: zbus::Error| {
                Error::failed(format!("systemd-resolved refused {what}: {e}"))
            };
            let index = i32::try_from(ifindex).map_err(|_| {
                Error::invalid(format!("interface index {ifindex} is out of range"))
            })?;
            let resolve = ResolveProxy::new(&self.conn)
                .await
                .map_err(|e| fail("a connection", e))?;
            resolve
                .set_link_dns(index, &[(AF_INET, server.octets().to_vec())])
                .await
                .map_err(|e| fail("SetLinkDNS", e))?;
            resolve
                .set_link_domains(index, &[(domain, true)])
                .await
                .map_err(|e| fail("SetLinkDomains", e))?;
            // Only .vm goes there; older resolveds lack this and route by
            // domain anyway.
            if let Err(e) = resolve.set_link_default_route(index, false).await {
                tracing::debug!("SetLinkDefaultRoute: {e}");
            }
            Ok(())
        })
    }
}
