//! The leases table: where [`crate::net::leases::LeaseStore`] keeps its
//! leases. A new lease gets the lowest free address, found from a floor
//! below which every address is leased (kept as leases come and go), one
//! index lookup per address tried: a thousand leases cost no more than
//! ten.

use std::net::Ipv4Addr;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Store, StoreError};
use crate::net::leases::{Lease, LeaseError, LeaseStore, Subnet, mac_for};

fn failed(e: impl Into<StoreError>) -> LeaseError {
    LeaseError::Store(Box::new(e.into()))
}

impl Store {
    /// The lease of `owner`, making one if it has none (or if its address
    /// left `subnet`). Stable: asking again returns the same lease.
    pub fn lease(&self, owner: &str, subnet: &Subnet) -> Result<Lease, LeaseError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        let existing: Option<(String, String)> = tx
            .query_row(
                "SELECT ipv4, mac FROM leases WHERE owner = ?1",
                [owner],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(failed)?;
        if let Some((ip, mac)) = existing {
            let ipv4: Ipv4Addr = ip.parse().map_err(|_| LeaseError::Corrupt(ip.clone()))?;
            if subnet.contains(ipv4) {
                return Ok(Lease {
                    owner: owner.to_owned(),
                    ipv4,
                    mac,
                });
            }
            // The subnet changed: this lease is no longer valid.
            tx.execute("DELETE FROM leases WHERE owner = ?1", [owner])
                .map_err(failed)?;
        }
        let range = subnet.guest_range();
        let mut next = match *self.floor() {
            Some((s, floor)) if s == *subnet => floor.max(*range.start()),
            _ => *range.start(),
        };
        let ipv4 = loop {
            if next > *range.end() {
                let in_use: i64 = tx
                    .query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0))
                    .map_err(failed)?;
                return Err(LeaseError::Exhausted {
                    subnet: *subnet,
                    in_use: usize::try_from(in_use).unwrap_or(0),
                });
            }
            let candidate = Ipv4Addr::from(next);
            let taken = tx
                .query_row(
                    "SELECT 1 FROM leases WHERE ipv4 = ?1",
                    [candidate.to_string()],
                    |_| Ok(()),
                )
                .optional()
                .map_err(failed)?
                .is_some();
            if !taken {
                break candidate;
            }
            next += 1;
        };
        let mac = mac_for(ipv4);
        tx.execute(
            "INSERT INTO leases (owner, ipv4, mac) VALUES (?1, ?2, ?3)",
            params![owner, ipv4.to_string(), mac],
        )
        .map_err(failed)?;
        tx.commit().map_err(failed)?;
        *self.floor() = Some((*subnet, u32::from(ipv4) + 1));
        Ok(Lease {
            owner: owner.to_owned(),
            ipv4,
            mac,
        })
    }

    fn floor(&self) -> std::sync::MutexGuard<'_, Option<(Subnet, u32)>> {
        self.lease_floor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `owner`'s leased address, on `conn` (before its lease goes).
    pub(crate) fn leased_address(
        conn: &rusqlite::Connection,
        owner: &str,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        let ip: Option<String> = conn
            .query_row("SELECT ipv4 FROM leases WHERE owner = ?1", [owner], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(ip.and_then(|ip| ip.parse().ok()))
    }

    /// The lease of `ip` went: searches start no higher than it.
    pub(crate) fn lease_gone(&self, ip: Option<Ipv4Addr>) {
        if let (Some(ip), Some((_, floor))) = (ip, self.floor().as_mut()) {
            *floor = (*floor).min(u32::from(ip));
        }
    }

    /// The lease `owner` holds, if any.
    pub fn lease_of(&self, owner: &str) -> Result<Option<Lease>, StoreError> {
        let found: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT ipv4, mac FROM leases WHERE owner = ?1",
                [owner],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(found.and_then(|(ip, mac)| {
            Some(Lease {
                owner: owner.to_owned(),
                ipv4: ip.parse().ok()?,
                mac,
            })
        }))
    }

    /// Give `owner`'s lease back. Returns whether it had one.
    pub fn release_lease(&self, owner: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let ip = Self::leased_address(&conn, owner)?;
        let gone = conn.execute("DELETE FROM leases WHERE owner = ?1", [owner])? == 1;
        self.lease_gone(ip);
        Ok(gone)
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

impl LeaseStore for Store {
    fn lease(&self, owner: &str, subnet: &Subnet) -> Result<Lease, LeaseError> {
        Store::lease(self, owner, subnet)
    }

    fn lease_of(&self, owner: &str) -> Result<Option<Lease>, LeaseError> {
        Store::lease_of(self, owner).map_err(failed)
    }

    fn release_lease(&self, owner: &str) -> Result<bool, LeaseError> {
        Store::release_lease(self, owner).map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};

    #[test]
    fn every_lease_is_the_lowest_free_address_whatever_came_and_went() {
        let store = Store::open_in_memory().expect("store");
        let s = Subnet::parse("10.9.0.0/22").expect("subnet");
        let mut held: Vec<String> = Vec::new();
        // A fixed pseudo-random walk of leases and releases.
        let mut x: u32 = 12345;
        for i in 0..1500 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if held.len() > 50 && x.is_multiple_of(3) {
                let owner = held.swap_remove((x as usize / 7) % held.len());
                assert!(store.release_lease(&owner).expect("release"));
                continue;
            }
            let used: Vec<Ipv4Addr> = store
                .leases()
                .expect("leases")
                .iter()
                .map(|l| l.ipv4)
                .collect();
            let want = crate::net::leases::first_free(&s, &used).expect("room");
            let owner = format!("o{i}");
            assert_eq!(
                store.lease(&owner, &s).expect("lease").ipv4,
                want,
                "lease {i}"
            );
            held.push(owner);
        }
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
        assert_eq!(store.lease_of("a").expect("of"), Some(a.clone()));
        assert_eq!(store.lease_of("z").expect("none"), None);
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

        let dyn_store: &dyn LeaseStore = &store;
        assert!(dyn_store.release_lease("b").expect("release"));
        assert!(!dyn_store.release_lease("b").expect("twice"));
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
}
