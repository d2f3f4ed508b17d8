//! Host networking for VMs: leases (addresses and MACs), and (coming with
//! the rest of the networking work) the bridge, TAPs, NAT and `.vm` DNS.

pub mod dns;
pub mod leases;
pub mod link;
pub mod nat;
pub mod network;
pub mod pool;
pub mod resolved;
