//! Option keys of `a{sv}` arguments.

/// Keys of `Manager.Maintain(a{sv} options)`.
pub mod maintain {
    /// `b`: also run `VACUUM` on the store (slower; reclaims space).
    pub const VACUUM: &str = "vacuum";
}

/// Keys of `Manager.ImportKernel(s name, s kernel, a{sv} options)`.
pub mod import_kernel {
    /// `s`: host path of an initramfs to boot with the kernel.
    pub const INITRD: &str = "initrd";
    /// `s`: host path of the kernel's `lib/modules/<version>` directory.
    pub const MODULES: &str = "modules";
}

/// Keys of `Manager.RegisterImage(s name, s rootfs, s kernel, a{sv} options)`.
pub mod register_image {
    /// `s`: host path of an ext4 image holding the rootfs's `/root`.
    pub const WORK_SEED: &str = "work_seed";
    /// `as`: guest services readiness waits for, each `name:port`.
    pub const SERVICES: &str = "services";
    /// `s`: the init the kernel starts (e.g. `/sbin/banger-init`).
    pub const INIT: &str = "init";
}
