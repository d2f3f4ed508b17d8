//! Host networking for VMs: leases (addresses and MACs), the bridge, TAPs,
//! NAT and `.vm` DNS; [`host::HostNetwork`] is the service over them.

pub mod dns;
pub mod host;
pub mod leases;
pub mod link;
pub mod nat;
pub mod network;
pub mod pool;
pub mod resolved;
