//! The host network the VMs share, as one service: the bridge with its TAP
//! pool and NAT (brought up when the first VM needs them), the `.vm` zone
//! and where it is served, the guests' DNS server on the bridge, the
//! registration with systemd-resolved, and the leases.
//!
//! It knows no VM and no configuration file: the caller passes the
//! settings and says which TAPs and NAT addresses running VMs hold.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::dns::{DnsServer, VmZone};
use crate::firewall::{Guest, Policy};
use crate::leases::LeaseStore;
use crate::leases::{Lease, Subnet};
use crate::network::Network;
use crate::resolved::{LinkDns, Registration};
use banger_error::Result;

/// How the network is laid out (from `[network]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The bridge's name.
    pub bridge: String,
    /// The VMs' subnet; the gateway is its first address.
    pub subnet: Subnet,
    /// Idle TAPs kept ready.
    pub tap_pool_size: usize,
    /// Whether guests may reach each other.
    pub guest_to_guest: bool,
    /// Host ports on the gateway guests may reach besides DNS.
    pub host_ports: Vec<u16>,
    /// Networks NAT may reach although the host is attached to them.
    pub nat_allow: Vec<ipnet::Ipv4Net>,
}

impl Settings {
    /// The firewall policy these settings ask for.
    pub fn policy(&self) -> Policy {
        Policy {
            bridge: self.bridge.clone(),
            gateway: self.subnet.gateway(),
            guest_to_guest: self.guest_to_guest,
            host_ports: self.host_ports.clone(),
            nat_allow: self.nat_allow.clone(),
        }
    }
}

/// What running VMs hold when the network comes up (after a restart).
#[derive(Debug, Clone, Default)]
pub struct InUse {
    /// Their TAPs, adopted by the pool.
    pub taps: Vec<String>,
    /// Their TAPs with their addresses, for the firewall.
    pub guests: Vec<Guest>,
    /// The addresses of those with NAT.
    pub nat_ips: Vec<Ipv4Addr>,
    /// The addresses of those that may talk with each other.
    pub peer_ips: Vec<Ipv4Addr>,
}

/// The host network service.
#[derive(Debug)]
pub struct HostNetwork {
    store: Arc<dyn LeaseStore>,
    link_dns: Arc<dyn LinkDns>,
    /// The bridge, pool and NAT, once the first VM needed them.
    network: tokio::sync::Mutex<Option<Network>>,
    /// The `.vm` DNS server on the bridge, for guests.
    guest_dns: Mutex<Option<DnsServer>>,
    /// Whether systemd-resolved routes `.vm` to the bridge.
    resolved: Mutex<Registration>,
    /// The `.vm` zone and where the host's DNS server serves it.
    dns: Mutex<Option<(VmZone, SocketAddr)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostNetwork {
    /// A network service over `store` (leases) telling `link_dns` (the
    /// host's resolver) where `.vm` names are answered.
    pub fn new(store: Arc<dyn LeaseStore>, link_dns: Arc<dyn LinkDns>) -> Self {
        Self {
            store,
            link_dns,
            network: Default::default(),
            guest_dns: Default::default(),
            resolved: Default::default(),
            dns: Default::default(),
        }
    }

    /// Record that the DNS server answers for `zone` on `addr`.
    pub fn set_dns(&self, zone: VmZone, addr: SocketAddr) {
        *lock(&self.dns) = Some((zone, addr));
    }

    /// Where the `.vm` DNS server listens, when it runs.
    pub fn dns_served(&self) -> Option<SocketAddr> {
        lock(&self.dns).as_ref().map(|(_, a)| *a)
    }

    /// The `.vm` zone, when the DNS server runs.
    pub fn dns_zone(&self) -> Option<VmZone> {
        lock(&self.dns).as_ref().map(|(z, _)| z.clone())
    }

    /// What became of the `.vm` registration with systemd-resolved.
    pub fn resolved(&self) -> Registration {
        lock(&self.resolved).clone()
    }

    /// The lease (address and MAC) `owner` holds, if any.
    pub async fn lease_of(&self, owner: &str) -> Option<Lease> {
        let store = self.store.clone();
        let owner = owner.to_owned();
        tokio::task::spawn_blocking(move || store.lease_of(&owner).ok().flatten())
            .await
            .ok()
            .flatten()
    }

    /// The network when it is up.
    pub async fn if_up(&self) -> Option<Network> {
        self.network.lock().await.clone()
    }

    /// The network, brought up on first use: the bridge, the TAP pool
    /// (adopting what `in_use` says running VMs hold), NAT for those that
    /// have it, and the `.vm` DNS server on the bridge's gateway for
    /// guests. Concurrent callers wait for one bring-up; `in_use` is asked
    /// only when the network is not up yet.
    pub async fn up(
        &self,
        settings: &Settings,
        in_use: impl Future<Output = Result<InUse>>,
    ) -> Result<Network> {
        let mut slot = self.network.lock().await;
        if let Some(net) = &*slot {
            return Ok(net.clone());
        }
        let in_use = in_use.await?;
        let zone = self.dns_zone();
        let net = Network::up(
            settings.policy(),
            settings.subnet,
            settings.tap_pool_size,
            self.store.clone(),
            zone.clone(),
            &in_use,
        )
        .await?;
        let gateway = settings.subnet.gateway();
        if let Some(zone) = zone {
            self.serve_guests(&zone, SocketAddr::from((gateway, 53)))
                .await;
        }
        self.register_vm_domain(&net, &settings.bridge, gateway)
            .await;
        let pool = net.pool().clone();
        tokio::spawn(async move {
            if let Err(e) = pool.fill().await {
                tracing::warn!("cannot fill the TAP pool: {e}");
            }
        });
        *slot = Some(net.clone());
        Ok(net)
    }

    /// Serve `zone` to guests on `addr`. Failing is not fatal: guests then
    /// have no `.vm` names, and the log says why.
    async fn serve_guests(&self, zone: &VmZone, addr: SocketAddr) {
        let bound = async {
            let udp = tokio::net::UdpSocket::bind(addr).await?;
            let tcp = tokio::net::TcpListener::bind(addr).await?;
            Ok::<_, std::io::Error>((udp, tcp))
        };
        match bound.await {
            Ok((udp, tcp)) => match crate::dns::serve_zone(zone, vec![udp], vec![tcp]) {
                Ok(server) => {
                    tracing::info!(address = %addr, "serving .vm DNS to guests");
                    *lock(&self.guest_dns) = Some(server);
                }
                Err(e) => tracing::warn!("no DNS for guests: {e}"),
            },
            Err(e) => tracing::warn!("no DNS for guests on {addr}: {e}"),
        }
    }

    /// Tell systemd-resolved, when it runs, to send `.vm` lookups to the
    /// guests' DNS server on the bridge. Failing is not fatal: doctor says.
    async fn register_vm_domain(&self, net: &Network, bridge: &str, gateway: Ipv4Addr) {
        let registration = if !self.link_dns.present().await {
            Registration::Absent
        } else {
            match self
                .link_dns
                .register(net.bridge_index(), gateway, "vm")
                .await
            {
                Ok(()) => {
                    tracing::info!("systemd-resolved routes ~vm to {gateway} on {bridge}");
                    Registration::Active {
                        bridge: bridge.to_owned(),
                        server: gateway,
                    }
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    Registration::Failed(e.message)
                }
            }
        };
        *lock(&self.resolved) = registration;
    }
}
