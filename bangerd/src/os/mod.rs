//! OS backends behind the core's traits.

pub mod activation;
pub mod bus_names;
pub mod dm;
pub mod notify;
pub mod polkit;
pub mod resolved;
pub mod sandbox;
pub mod systemd;
