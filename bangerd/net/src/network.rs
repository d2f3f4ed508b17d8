//! One VM's network, end to end: [`Network::attach`] gives a VM its lease,
//! a TAP from the pool, its `.vm` name and (on demand) NAT; [`Network::detach`]
//! takes all of it back. A failed attach undoes what it did.
//!
//! The VM lifecycle calls these; this module only composes `leases`,
//! `link`/`pool`, `firewall` and `dns`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::dns::VmZone;
use super::firewall::{Firewall, Guest, Policy};
use super::host::InUse;
use super::leases::{Lease, Subnet};
use super::link::{LONE_TAP_PREFIX, Links};
use super::pool::TapPool;
use crate::leases::LeaseStore;
use banger_error::Error;

/// What a VM got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNet {
    /// Its TAP device.
    pub tap: String,
    /// Its lease (address and MAC).
    pub lease: Lease,
    /// The kernel `ip=` value (gateway as DNS server).
    pub ip_arg: String,
}

/// The host side of VM networking.
#[derive(Debug, Clone)]
pub struct Network {
    subnet: Subnet,
    store: Arc<dyn LeaseStore>,
    pool: TapPool,
    links: Links,
    firewall: Firewall,
    zone: Option<VmZone>,
    held: Arc<Mutex<Held>>,
}

/// What the firewall lets through: the guests on their TAPs, and which
/// addresses have NAT.
#[derive(Debug, Default)]
struct Held {
    /// TAP → the guest's address.
    guests: BTreeMap<String, Ipv4Addr>,
    nat: BTreeSet<Ipv4Addr>,
    /// Addresses of guests that may talk with each other.
    peers: BTreeSet<Ipv4Addr>,
}

/// A VM's switches on the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// Out to the world, masqueraded.
    pub nat: bool,
    /// To and from the other VMs with this switch on.
    pub peers: bool,
}

/// Put `ip` in `set` or take it out; whether that changed it.
fn switch(set: &mut BTreeSet<Ipv4Addr>, ip: Ipv4Addr, on: bool) -> bool {
    if on { set.insert(ip) } else { set.remove(&ip) }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::failed(format!("internal task failed: {e}"))))
}

impl Network {
    /// Bring up the bridge, adopt and fill the TAP pool (`in_use` says
    /// what running VMs hold) and apply the firewall (`policy`) for them,
    /// in the calling thread's network namespace.
    pub async fn up(
        policy: Policy,
        subnet: Subnet,
        pool_size: usize,
        store: Arc<dyn LeaseStore>,
        zone: Option<VmZone>,
        in_use: &InUse,
    ) -> Result<Self, Error> {
        let links = Links::connect()?;
        let index = links.ensure_bridge(&policy.bridge, &subnet).await?;
        // Lone TAPs live only while a template is made, and none is
        // made before the network is up: these are left by a crash.
        for lone in links.names_with_prefix(LONE_TAP_PREFIX).await? {
            links.delete(&lone).await?;
        }
        let pool = TapPool::new(links.clone(), index, pool_size);
        pool.adopt(&in_use.taps).await?;
        let held = Held {
            guests: in_use
                .guests
                .iter()
                .map(|g| (g.tap.clone(), g.ipv4))
                .collect(),
            nat: in_use.nat_ips.iter().copied().collect(),
            peers: in_use.peer_ips.iter().copied().collect(),
        };
        let net = Self {
            subnet,
            store,
            pool,
            links,
            firewall: Firewall::new(policy),
            zone,
            held: Arc::new(Mutex::new(held)),
        };
        net.change(|_| true).await?;
        Ok(net)
    }

    /// The bridge's interface index.
    pub fn bridge_index(&self) -> u32 {
        self.pool.bridge_index()
    }

    /// The subnet.
    pub fn subnet(&self) -> &Subnet {
        &self.subnet
    }

    /// The `.vm` zone, when DNS is served.
    pub fn zone(&self) -> Option<&VmZone> {
        self.zone.as_ref()
    }

    /// The TAP pool.
    pub fn pool(&self) -> &TapPool {
        &self.pool
    }

    /// Change what the firewall holds with `f` and, when it says it
    /// changed something, apply the whole firewall (the lock is held
    /// through the apply, so applies never overtake each other).
    async fn change(&self, f: impl FnOnce(&mut Held) -> bool) -> Result<(), Error> {
        let mut held = self.held.lock().await;
        if !f(&mut held) {
            return Ok(());
        }
        let guests: Vec<Guest> = held
            .guests
            .iter()
            .map(|(tap, ip)| Guest {
                tap: tap.clone(),
                ipv4: *ip,
            })
            .collect();
        let nat: Vec<Ipv4Addr> = held.nat.iter().copied().collect();
        let peers: Vec<Ipv4Addr> = held.peers.iter().copied().collect();
        let host = self.links.host_networks(Some(self.bridge_index())).await?;
        self.firewall.apply(&guests, &nat, &peers, &host).await
    }

    /// The lone TAP `bglone<tag>` (`tag` at most 9 bytes), owned by
    /// `uid`: on no bridge and down, for a guest whose NIC must lead
    /// nowhere ([`Links::create_lone_tap`]). Its name; removed with
    /// [`Network::drop_lone_tap`], or when the network next comes up.
    pub async fn lone_tap(&self, tag: &str, uid: u32) -> Result<String, Error> {
        let name = format!("{LONE_TAP_PREFIX}{tag}");
        if tag.is_empty() || name.len() > 15 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::invalid(format!("{name:?} cannot name a TAP")));
        }
        if let Err(e) = self.links.create_lone_tap(&name, uid).await {
            let _ = self.links.delete(&name).await;
            return Err(e);
        }
        Ok(name)
    }

    /// Delete the lone TAP `name`; absent is fine.
    pub async fn drop_lone_tap(&self, name: &str) -> Result<(), Error> {
        if !name.starts_with(LONE_TAP_PREFIX) {
            return Err(Error::invalid(format!("{name} is not a lone TAP")));
        }
        self.links.delete(name).await
    }

    /// Give VM `owner` (named `name`, its VMM running as `uid`) its
    /// network. On any failure, everything this call made is undone.
    pub async fn attach(
        &self,
        owner: &str,
        name: &str,
        uid: u32,
        switches: Switches,
    ) -> Result<VmNet, Error> {
        let lease = {
            let (store, owner, subnet) = (self.store.clone(), owner.to_owned(), self.subnet);
            blocking(move || store.lease(&owner, &subnet).map_err(Error::from)).await?
        };
        let undo_lease = || async {
            let (store, owner) = (self.store.clone(), owner.to_owned());
            let _ = blocking(move || {
                store
                    .release_lease(&owner)
                    .map_err(|e| Error::failed(e.to_string()))
            })
            .await;
        };
        let tap = match self.pool.acquire(uid).await {
            Ok(t) => t,
            Err(e) => {
                undo_lease().await;
                return Err(e);
            }
        };
        let ip = lease.ipv4;
        let result = async {
            self.change(|h| {
                h.guests.insert(tap.clone(), ip);
                switch(&mut h.nat, ip, switches.nat);
                switch(&mut h.peers, ip, switches.peers);
                true
            })
            .await?;
            if let Some(zone) = &self.zone {
                zone.set(name, lease.ipv4).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = self
                .change(|h| {
                    let gone = h.guests.remove(&tap).is_some();
                    let nat = h.nat.remove(&ip);
                    h.peers.remove(&ip) || nat || gone
                })
                .await;
            if let Some(zone) = &self.zone {
                let _ = zone.remove(name).await;
            }
            let _ = self.pool.release(&tap).await;
            undo_lease().await;
            return Err(e);
        }
        let ip_arg = lease.kernel_ip_arg(&self.subnet, name, Some(self.subnet.gateway()));
        Ok(VmNet { tap, lease, ip_arg })
    }

    /// Switch NAT for `ip` on or off.
    pub async fn set_nat(&self, ip: Ipv4Addr, on: bool) -> Result<(), Error> {
        self.change(|h| switch(&mut h.nat, ip, on)).await
    }

    /// Let `ip` talk with the other peers, or not.
    pub async fn set_peers(&self, ip: Ipv4Addr, on: bool) -> Result<(), Error> {
        self.change(|h| switch(&mut h.peers, ip, on)).await
    }

    /// Take back what [`Network::attach`] gave a VM that stops: its name,
    /// NAT, its place in the firewall and TAP. The lease stays (the VM
    /// keeps its address).
    pub async fn detach(&self, name: &str, ipv4: Ipv4Addr, tap: Option<&str>) -> Result<(), Error> {
        if let Some(zone) = &self.zone {
            zone.remove(name).await?;
        }
        self.change(|h| {
            let nat = h.nat.remove(&ipv4) | h.peers.remove(&ipv4);
            let before = h.guests.len();
            h.guests
                .retain(|t, ip| *ip != ipv4 && tap.is_none_or(|tap| tap != t));
            nat || h.guests.len() != before
        })
        .await?;
        if let Some(tap) = tap {
            self.pool.release(tap).await?;
        }
        Ok(())
    }

    /// Give a VM that kept running while bangerd was away its name, NAT
    /// and place in the firewall back (its TAP was adopted by
    /// [`Network::up`]).
    pub async fn adopt(
        &self,
        owner: &str,
        name: &str,
        switches: Switches,
        tap: Option<&str>,
    ) -> Result<Lease, Error> {
        let lease = {
            let (store, owner, subnet) = (self.store.clone(), owner.to_owned(), self.subnet);
            blocking(move || store.lease(&owner, &subnet).map_err(Error::from)).await?
        };
        if let Some(zone) = &self.zone {
            zone.set(name, lease.ipv4).await?;
        }
        let ip = lease.ipv4;
        self.change(|h| {
            let mut changed = switch(&mut h.nat, ip, switches.nat);
            changed |= switch(&mut h.peers, ip, switches.peers);
            if let Some(tap) = tap {
                changed |= h.guests.insert(tap.to_owned(), ip) != Some(ip);
            }
            changed
        })
        .await?;
        Ok(lease)
    }

    /// Take back everything: [`Network::detach`] and the lease.
    pub async fn forget(
        &self,
        owner: &str,
        name: &str,
        ipv4: Ipv4Addr,
        tap: Option<&str>,
    ) -> Result<(), Error> {
        self.detach(name, ipv4, tap).await?;
        let (store, owner) = (self.store.clone(), owner.to_owned());
        blocking(move || {
            store
                .release_lease(&owner)
                .map(|_| ())
                .map_err(|e| Error::failed(format!("cannot release the lease: {e}")))
        })
        .await
    }
}
