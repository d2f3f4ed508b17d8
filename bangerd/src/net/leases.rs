//! IPv4 and MAC leases: one per VM, stable for its life, kept in the store.
//!
//! The subnet's first host address is the gateway (the bridge); the network
//! and broadcast addresses are never handed out. Allocation takes the lowest
//! free address, so a deleted VM's address is reused first. The MAC is
//! derived from the address (`0a:b6:` + its four bytes: locally
//! administered, unicast), so it is unique whenever the address is.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, ErrorKind};
use crate::store::{Store, StoreError};

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

impl Store {
    /// The lease of `owner`, making one if it has none. Stable: asking again
    /// returns the same lease.
    pub fn lease(&self, owner: &str, subnet: &Subnet) -> Result<Lease, LeaseError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let existing: Option<(String, String)> = tx
            .query_row(
                "SELECT ipv4, mac FROM leases WHERE owner = ?1",
                [owner],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(StoreError::from)?;
        if let Some((ip, mac)) = existing {
            let ipv4: Ipv4Addr = ip.parse().map_err(|_| LeaseError::Corrupt(ip.clone()))?;
            if subnet.net.contains(&ipv4) {
                return Ok(Lease {
                    owner: owner.to_owned(),
                    ipv4,
                    mac,
                });
            }
            // The subnet changed: this lease is no longer valid.
            tx.execute("DELETE FROM leases WHERE owner = ?1", [owner])
                .map_err(StoreError::from)?;
        }
        let used: Vec<u32> = {
            let mut st = tx
                .prepare("SELECT ipv4 FROM leases")
                .map_err(StoreError::from)?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(StoreError::from)?;
            let mut used = Vec::new();
            for row in rows {
                if let Ok(ip) = row.map_err(StoreError::from)?.parse::<Ipv4Addr>() {
                    used.push(u32::from(ip));
                }
            }
            used
        };
        let free =
            subnet
                .guest_range()
                .find(|a| !used.contains(a))
                .ok_or(LeaseError::Exhausted {
                    subnet: *subnet,
                    in_use: used.len(),
                })?;
        let ipv4 = Ipv4Addr::from(free);
        let mac = mac_for(ipv4);
        tx.execute(
            "INSERT INTO leases (owner, ipv4, mac) VALUES (?1, ?2, ?3)",
            params![owner, ipv4.to_string(), mac],
        )
        .map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(Lease {
            owner: owner.to_owned(),
            ipv4,
            mac,
        })
    }

    /// Give `owner`'s lease back. Returns whether it had one.
    pub fn release_lease(&self, owner: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM leases WHERE owner = ?1", [owner])?
            == 1)
    }

    /// Every lease.
    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT owner, ipv4, mac FROM leases ORDER BY owner")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (owner, ip, mac) = row?;
            if let Ok(ipv4) = ip.parse() {
                out.push(Lease { owner, ipv4, mac });
            }
        }
        Ok(out)
    }
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
    #[error(transparent)]
    Store(#[from] StoreError),
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
    fn leases_are_stable_skip_reserved_reuse_and_run_out() {
        let store = Store::open_in_memory().expect("store");
        let s = Subnet::parse("10.9.0.0/29").expect("subnet");
        let a = store.lease("a", &s).expect("a");
        assert_eq!(
            a.ipv4,
            Ipv4Addr::new(10, 9, 0, 2),
            "gateway .1 and network .0 are skipped"
        );
        assert_eq!(a.mac, "0a:b6:0a:09:00:02");
        assert_eq!(store.lease("a", &s).expect("again"), a, "stable");
        let b = store.lease("b", &s).expect("b");
        assert_eq!(b.ipv4, Ipv4Addr::new(10, 9, 0, 3));
        for owner in ["c", "d", "e"] {
            store.lease(owner, &s).expect(owner);
        }
        // .2-.6 are taken; .7 is the broadcast address.
        let err = store.lease("f", &s).expect_err("exhausted");
        assert!(
            matches!(err, LeaseError::Exhausted { in_use: 5, .. }),
            "{err}"
        );
        let e = Error::from(err);
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("network.subnet"), "{}", e.message);

        assert!(store.release_lease("b").expect("release"));
        assert!(!store.release_lease("b").expect("twice"));
        assert_eq!(
            store.lease("f", &s).expect("f").ipv4,
            b.ipv4,
            "freed address reused"
        );
        assert_eq!(store.leases().expect("all").len(), 5);

        // A new subnet: old leases are replaced on demand.
        let s2 = Subnet::parse("10.10.0.0/24").expect("subnet");
        assert_eq!(
            store.lease("a", &s2).expect("moved").ipv4,
            Ipv4Addr::new(10, 10, 0, 2)
        );
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
