//! Telling the host's resolver about `.vm`: where systemd-resolved runs,
//! the bridge link gets the guests' DNS server (the gateway, port 53) and
//! the routing-only domain `~vm`, so `<name>.vm` resolves on the host with
//! no setup, and nothing else is routed there. The D-Bus side is
//! `os::resolved::Resolved`; core code sees only [`LinkDns`].

use std::net::Ipv4Addr;

use crate::BoxFuture;
use banger_error::{Error, Result};

/// systemd-resolved's bus name.
pub const RESOLVED_NAME: &str = "org.freedesktop.resolve1";

/// A resolver that takes per-link DNS settings.
pub trait LinkDns: Send + Sync + std::fmt::Debug {
    /// Whether it runs (systemd-resolved on the bus).
    fn present<'a>(&'a self) -> BoxFuture<'a, bool>;
    /// Route `domain` (routing-only) on link `ifindex` to `server`:53.
    fn register<'a>(
        &'a self,
        ifindex: u32,
        server: Ipv4Addr,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
}

/// No resolver to tell (tests, hosts without systemd-resolved).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLinkDns;

impl LinkDns for NoLinkDns {
    fn present<'a>(&'a self) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
    fn register<'a>(&'a self, _: u32, _: Ipv4Addr, _: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Err(Error::unavailable("systemd-resolved is not running")) })
    }
}

/// What became of the registration, for `doctor`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Registration {
    /// Not tried yet: the bridge comes up with the first VM.
    #[default]
    Pending,
    /// systemd-resolved is not running.
    Absent,
    /// `.vm` goes to this server on this bridge.
    Active {
        /// The bridge.
        bridge: String,
        /// The gateway address.
        server: Ipv4Addr,
    },
    /// systemd-resolved refused.
    Failed(String),
}
