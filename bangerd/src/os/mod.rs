//! OS backends behind the core's traits.

pub mod agent;
pub mod notify;
pub mod polkit;
