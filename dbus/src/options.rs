//! Option keys of `a{sv}` arguments.

/// Keys of `Manager.Maintain(a{sv} options)`.
pub mod maintain {
    /// `b`: also run `VACUUM` on the store (slower; reclaims space).
    pub const VACUUM: &str = "vacuum";
}
