//! IPv4 and MAC leases: one per VM, stable for its life, kept in the store.
//!
//! The subnet's first host address is the gateway (the bridge); the network
//! and broadcast addresses are never handed out. Allocation takes the lowest
//! free address, so a deleted VM's address is reused first. The MAC is
//! derived from the address (`0a:b6:` + its four bytes: locally
//! administered, unicast), so it is unique whenever the address is.

use std::net::Ipv4Addr;

use banger_error::{Error, ErrorKind};
use ipnet::Ipv4Net;

/// The subnet banger's VMs live in, and its gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    net: Ipv4Net,
}

impl Subnet {
    /// Parse `a.b.c.d/n`: the network address itself, prefix 16 to 29.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let net: Ipv4Net = text.parse().map_err(|_| {
            Error::invalid(format!(
                "network subnet {text:?} is not an IPv4 network like 10.213.42.0/24"
            ))
        })?;
        if !(16..=29).contains(&net.prefix_len()) {
            return Err(Error::invalid(format!(
                "network subnet {text} must have a prefix from /16 to /29"
            )));
        }
        if net.addr() != net.network() {
            return Err(Error::invalid(format!(
                "network subnet {text} is not a network address; did you mean {}?",
                net.trunc()
            )));
        }
        Ok(Self { net })
    }

    /// The network.
    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.net.contains(&ip)
    }

    /// The gateway: the first host address, on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network()) + 1)
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        self.net.netmask()
    }

    /// Addresses VMs may get: every host address but the gateway.
    pub fn guest_range(&self) -> std::ops::RangeInclusive<u32> {
        let first = u32::from(self.net.network()) + 2;
        let last = u32::from(self.net.broadcast()) - 1;
        first..=last
    }

    /// `ip`'s offset from the network address, when it is in the subnet
    /// (below 65536: subnets are /16 or smaller).
    pub fn host_index(&self, ip: Ipv4Addr) -> Option<u32> {
        self.net
            .contains(&ip)
            .then(|| u32::from(ip) - u32::from(self.net.network()))
    }

    /// How many VMs fit.
    pub fn capacity(&self) -> u32 {
        let r = self.guest_range();
        r.end() - r.start() + 1
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.net.fmt(f)
    }
}

/// A VM's address and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The VM (or other owner) the lease belongs to.
    pub owner: String,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its MAC, `0a:b6:..`.
    pub mac: String,
}

impl Lease {
    /// The kernel `ip=` argument for this lease:
    /// `CLIENT::GW:NETMASK:HOSTNAME:DEVICE:off[:DNS]`.
    pub fn kernel_ip_arg(&self, subnet: &Subnet, hostname: &str, dns: Option<Ipv4Addr>) -> String {
        let mut arg = format!(
            "{}::{}:{}:{}:eth0:off",
            self.ipv4,
            subnet.gateway(),
            subnet.netmask(),
            hostname
        );
        if let Some(dns) = dns {
            arg.push_str(&format!(":{dns}"));
        }
        arg
    }
}

/// The MAC of the VM with address `ip`.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("0a:b6:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The lowest address of `subnet` VMs may get that `used` does not hold.
pub fn first_free(subnet: &Subnet, used: &[Ipv4Addr]) -> Result<Ipv4Addr, LeaseError> {
    let used: std::collections::BTreeSet<u32> = used.iter().map(|a| u32::from(*a)).collect();
    subnet
        .guest_range()
        .find(|a| !used.contains(a))
        .map(Ipv4Addr::from)
        .ok_or(LeaseError::Exhausted {
            subnet: *subnet,
            in_use: used.len(),
        })
}

/// Where leases are kept (the daemon's store). Calls block: run them off
/// the async executor.
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// The lease of `owner`, making one with [`first_free`] if it has none
    /// or if its address is outside `subnet`. Stable: asking again returns
    /// the same lease.
    fn lease(&self, owner: &str, subnet: &Subnet) -> Result<Lease, LeaseError>;
    /// The lease `owner` holds, if any.
    fn lease_of(&self, owner: &str) -> Result<Option<Lease>, LeaseError>;
    /// Give `owner`'s lease back. Returns whether it had one.
    fn release_lease(&self, owner: &str) -> Result<bool, LeaseError>;
}

/// Why no lease could be given.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every address is taken.
    #[error(
        "subnet {subnet} has no free address ({in_use} in use); delete a VM or set network.subnet to a larger network"
    )]
    Exhausted {
        /// The subnet.
        subnet: Subnet,
        /// Leases held.
        in_use: usize,
    },
    /// A stored address does not parse.
    #[error("the store holds a bad lease address {0:?}")]
    Corrupt(String),
    /// The store failed.
    #[error("the lease store failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<LeaseError> for Error {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Exhausted { .. } => Error::new(ErrorKind::Unavailable, e.to_string()),
            other => Error::failed(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_refuse_nonsense() {
        let s = Subnet::parse("10.213.42.0/24").expect("ok");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 42, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.capacity(), 253);
        assert_eq!(s.host_index(Ipv4Addr::new(10, 213, 42, 2)), Some(2));
        assert_eq!(s.host_index(Ipv4Addr::new(10, 213, 43, 2)), None);
        let wide = Subnet::parse("10.200.0.0/16").expect("ok");
        assert_eq!(
            wide.host_index(Ipv4Addr::new(10, 200, 255, 254)),
            Some(65534)
        );
        assert_eq!(
            *s.guest_range().start(),
            u32::from(Ipv4Addr::new(10, 213, 42, 2))
        );
        assert_eq!(
            *s.guest_range().end(),
            u32::from(Ipv4Addr::new(10, 213, 42, 254))
        );
        assert_eq!(Subnet::parse("10.0.0.0/29").expect("/29").capacity(), 5);
        for bad in [
            "10.213.42.0",
            "10.213.42.5/24",
            "10.0.0.0/8",
            "10.0.0.0/30",
            "fd00::/64",
            "x",
        ] {
            let e = Subnet::parse(bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}");
        }
        assert!(
            Subnet::parse("10.213.42.5/24")
                .expect_err("host")
                .message
                .contains("10.213.42.0/24")
        );
    }

    #[test]
    fn first_free_skips_reserved_and_held_addresses_and_runs_out() {
        let s = Subnet::parse("10.9.0.0/29").expect("subnet");
        let ip = |d| Ipv4Addr::new(10, 9, 0, d);
        assert_eq!(
            first_free(&s, &[]).expect("empty"),
            ip(2),
            "gateway .1 and network .0 are skipped"
        );
        assert_eq!(
            first_free(&s, &[ip(2), ip(4)]).expect("gap"),
            ip(3),
            "lowest free first"
        );
        let err = first_free(&s, &[ip(2), ip(3), ip(4), ip(5), ip(6)]).expect_err("full");
        assert!(
            matches!(err, LeaseError::Exhausted { in_use: 5, .. }),
            "{err}"
        );
        let e = Error::from(err);
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("network.subnet"), "{}", e.message);
        assert_eq!(mac_for(ip(2)), "0a:b6:0a:09:00:02");
    }

    #[test]
    fn kernel_ip_argument() {
        let s = Subnet::parse("10.213.42.0/24").expect("subnet");
        let l = Lease {
            owner: "x".into(),
            ipv4: Ipv4Addr::new(10, 213, 42, 7),
            mac: mac_for(Ipv4Addr::new(10, 213, 42, 7)),
        };
        assert_eq!(
            l.kernel_ip_arg(&s, "box", Some(s.gateway())),
            "10.213.42.7::10.213.42.1:255.255.255.0:box:eth0:off:10.213.42.1"
        );
        assert_eq!(
            l.kernel_ip_arg(&s, "box", None),
            "10.213.42.7::10.213.42.1:255.255.255.0:box:eth0:off"
        );
    }
}
