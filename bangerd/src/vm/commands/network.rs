//! The host network the VMs share: the bridge, NAT, leases and the `.vm`
//! DNS zone, brought up when the first VM needs them.

use std::net::Ipv4Addr;

use crate::core::Core;
use crate::error::Result;
use crate::net::network::Network;
use crate::vm::Vm;

use super::{blocking, store_err};

impl Core {
    /// The lease of VM `id` (address and MAC), if it has one.
    pub async fn vm_lease(&self, id: &str) -> Option<crate::net::leases::Lease> {
        let store = self.deps.store.clone();
        let id = id.to_owned();
        blocking(move || {
            Ok(store
                .leases()
                .map_err(store_err("reading leases failed"))?
                .into_iter()
                .find(|l| l.owner == id))
        })
        .await
        .ok()
        .flatten()
    }

    /// The lease address of VM `id`, if it has one.
    pub async fn vm_ipv4(&self, id: &str) -> Option<Ipv4Addr> {
        self.vm_lease(id).await.map(|l| l.ipv4)
    }

    /// Host networking, brought up on first use: the bridge, the TAP pool
    /// (adopting the TAPs of VMs that run), NAT for those that have it,
    /// and the `.vm` DNS server on the bridge's gateway for guests.
    pub async fn network(&self) -> Result<Network> {
        let mut slot = self.vm_runtime().network.lock().await;
        if let Some(net) = &*slot {
            return Ok(net.clone());
        }
        let config = self.config();
        let subnet = config.network.subnet()?;
        let vms = self.vms().await?;
        let running: Vec<&Vm> = vms.iter().filter(|v| v.state.has_process()).collect();
        let taps: Vec<String> = running.iter().filter_map(|v| v.tap.clone()).collect();
        let mut nat_ips = Vec::new();
        for vm in running.iter().filter(|v| v.nat) {
            if let Some(ip) = self.vm_ipv4(&vm.id).await {
                nat_ips.push(ip);
            }
        }
        let net = Network::up(
            &config.network.bridge,
            subnet,
            config.network.tap_pool_size as usize,
            self.deps.store.clone(),
            self.dns_zone(),
            &taps,
            &nat_ips,
        )
        .await?;
        if let Some(zone) = self.dns_zone() {
            let addr = std::net::SocketAddr::from((subnet.gateway(), 53));
            match bind_dns(addr).await {
                Ok((udp, tcp)) => match crate::net::dns::serve_zone(&zone, vec![udp], vec![tcp]) {
                    Ok(server) => {
                        tracing::info!(address = %addr, "serving .vm DNS to guests");
                        *self
                            .vm_runtime()
                            .guest_dns
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(server);
                    }
                    Err(e) => tracing::warn!("no DNS for guests: {e}"),
                },
                Err(e) => tracing::warn!("no DNS for guests on {addr}: {e}"),
            }
        }
        self.register_vm_domain(&net, &config.network.bridge, subnet.gateway())
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

    /// Tell systemd-resolved, when it runs, to send `.vm` lookups to the
    /// guests' DNS server on the bridge. Failing is not fatal: doctor says.
    async fn register_vm_domain(&self, net: &Network, bridge: &str, gateway: Ipv4Addr) {
        use crate::net::resolved::Registration;
        let link_dns = &self.deps.link_dns;
        let registration = if !link_dns.present().await {
            Registration::Absent
        } else {
            match link_dns.register(net.bridge_index(), gateway, "vm").await {
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
        *self
            .vm_runtime()
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = registration;
    }

    pub(super) async fn network_if_up(&self) -> Option<Network> {
        self.vm_runtime().network.lock().await.clone()
    }
}

async fn bind_dns(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}
