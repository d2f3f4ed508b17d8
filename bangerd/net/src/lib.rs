//! Host networking for VMs: leases (addresses and MACs), the bridge, TAPs,
//! NAT and `.vm` DNS; [`host::HostNetwork`] is the service over them.
//!
//! It knows no VM, no daemon and no database: leases are kept by whatever
//! implements [`leases::LeaseStore`] (the daemon's store), and the host's
//! resolver is told about `.vm` through [`resolved::LinkDns`].

use std::future::Future;
use std::pin::Pin;

pub mod dns;
pub mod firewall;
pub mod host;
pub mod leases;
pub mod link;
pub mod network;
pub mod pool;
pub mod resolved;

/// A boxed future, for the object-safe traits here.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
