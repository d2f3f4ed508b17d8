//! OS backends behind the core's traits.

pub mod notify;
pub mod polkit;
