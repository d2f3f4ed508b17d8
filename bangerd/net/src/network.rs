//! One VM's network, end to end: [`Network::attach`] gives a VM its lease,
//! a TAP from the pool, its `.vm` name and (on demand) NAT; [`Network::detach`]
//! takes all of it back. A failed attach undoes what it did.
//!
//! The VM lifecycle calls these; this module only composes `leases`,
//! `link`/`pool`, `nat` and `dns`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::dns::VmZone;
use super::leases::{Lease, Subnet};
use super::link::Links;
use super::nat::Nat;
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
    nat: Nat,
    zone: Option<VmZone>,
    nat_set: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::failed(format!("internal task failed: {e}"))))
}

impl Network {
    /// Bring up the bridge, adopt and fill the TAP pool (`in_use` are the
    /// TAPs VMs hold) and apply NAT for `nat_vms`, in the calling thread's
    /// network namespace.
    pub async fn up(
        bridge: &str,
        subnet: Subnet,
        pool_size: usize,
        store: Arc<dyn LeaseStore>,
        zone: Option<VmZone>,
        in_use: &[String],
        nat_vms: &[Ipv4Addr],
    ) -> Result<Self, Error> {
        let links = Links::connect()?;
        let index = links.ensure_bridge(bridge, &subnet).await?;
        let pool = TapPool::new(links, index, pool_size);
        pool.adopt(in_use).await?;
        let nat = Nat::new(bridge);
        nat.apply(nat_vms).await?;
        Ok(Self {
            subnet,
            store,
            pool,
            nat,
            zone,
            nat_set: Arc::new(Mutex::new(nat_vms.iter().copied().collect())),
        })
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

    async fn apply_nat(&self) -> Result<(), Error> {
        let set: Vec<Ipv4Addr> = self.nat_set.lock().await.iter().copied().collect();
        self.nat.apply(&set).await
    }

    /// Give VM `owner` (named `name`, its VMM running as `uid`) its
    /// network. On any failure, everything this call made is undone.
    pub async fn attach(
        &self,
        owner: &str,
        name: &str,
        uid: u32,
        nat: bool,
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
        let result = async {
            if nat {
                self.nat_set.lock().await.insert(lease.ipv4);
                self.apply_nat().await?;
            }
            if let Some(zone) = &self.zone {
                zone.set(name, lease.ipv4).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            if nat && self.nat_set.lock().await.remove(&lease.ipv4) {
                let _ = self.apply_nat().await;
            }
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
        let changed = {
            let mut set = self.nat_set.lock().await;
            if on { set.insert(ip) } else { set.remove(&ip) }
        };
        if changed {
            self.apply_nat().await?;
        }
        Ok(())
    }

    /// Take back what [`Network::attach`] gave a VM that stops: its name,
    /// NAT and TAP. The lease stays (the VM keeps its address).
    pub async fn detach(&self, name: &str, ipv4: Ipv4Addr, tap: Option<&str>) -> Result<(), Error> {
        if let Some(zone) = &self.zone {
            zone.remove(name).await?;
        }
        self.set_nat(ipv4, false).await?;
        if let Some(tap) = tap {
            self.pool.release(tap).await?;
        }
        Ok(())
    }

    /// Give a VM that kept running while bangerd was away its name and NAT
    /// back (its TAP was adopted by [`Network::up`]).
    pub async fn adopt(&self, owner: &str, name: &str, nat: bool) -> Result<Lease, Error> {
        let lease = {
            let (store, owner, subnet) = (self.store.clone(), owner.to_owned(), self.subnet);
            blocking(move || store.lease(&owner, &subnet).map_err(Error::from)).await?
        };
        if let Some(zone) = &self.zone {
            zone.set(name, lease.ipv4).await?;
        }
        self.set_nat(lease.ipv4, nat).await?;
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
