//! The host network as the VMs see it: [`crate::net::host::HostNetwork`]
//! brought up with what running VMs hold.

use std::net::Ipv4Addr;

use super::Vms;
use crate::error::Result;
use crate::net::firewall::Guest;
use crate::net::host::{InUse, Settings};
use crate::net::network::Network;

impl Vms {
    /// The lease of VM `id` (address and MAC), if it has one.
    pub async fn vm_lease(&self, id: &str) -> Option<crate::net::leases::Lease> {
        self.net.lease_of(id).await
    }

    /// The lease address of VM `id`, if it has one.
    pub async fn vm_ipv4(&self, id: &str) -> Option<Ipv4Addr> {
        self.vm_lease(id).await.map(|l| l.ipv4)
    }

    /// Host networking, brought up on first use ([`crate::net::host::HostNetwork::up`]),
    /// adopting the TAPs of VMs that run and NAT for those that have it.
    pub async fn network(&self) -> Result<Network> {
        let config = self.config();
        let settings = Settings {
            bridge: config.network.bridge.clone(),
            subnet: config.network.subnet()?,
            tap_pool_size: config.network.tap_pool_size as usize,
            guest_to_guest: config.network.guest_to_guest,
            host_ports: config.network.host_ports.clone(),
            nat_allow: config
                .network
                .nat_allow()
                .map_err(crate::error::Error::invalid)?,
        };
        self.net.up(&settings, self.in_use()).await
    }

    /// What running VMs hold on the network.
    async fn in_use(&self) -> Result<InUse> {
        let mut held = InUse::default();
        for vm in self.list().await?.iter().filter(|v| v.state.has_process()) {
            held.taps.extend(vm.tap.clone());
            let Some(ip) = self.vm_ipv4(&vm.id).await else {
                continue;
            };
            if let Some(tap) = &vm.tap {
                held.guests.push(Guest {
                    tap: tap.clone(),
                    ipv4: ip,
                });
            }
            if vm.nat {
                held.nat_ips.push(ip);
            }
            if vm.peers {
                held.peer_ips.push(ip);
            }
        }
        Ok(held)
    }

    pub(super) async fn network_if_up(&self) -> Option<Network> {
        self.net.if_up().await
    }
}
