//! Option keys of `a{sv}` arguments.

/// Keys of `Manager.Maintain(a{sv} options)`.
pub mod maintain {
    /// `b`: also run `VACUUM` on the store (slower; reclaims space).
    pub const VACUUM: &str = "vacuum";
}

/// Keys of `Manager.Update(a{sv} options)`.
pub mod update {
    /// `b`: only report what the channel offers; change nothing.
    pub const CHECK: &str = "check";
    /// `s`: release channel URL instead of the configured one.
    pub const CHANNEL: &str = "channel";
    /// `b`: return to the set installed before the last update.
    pub const ROLLBACK: &str = "rollback";
}

/// Keys of `Manager.PullImage(s reference, a{sv} options)` for an OCI
/// reference.
pub mod pull_image {
    /// `s`: name to record the image under (default from the repository
    /// and tag).
    pub const NAME: &str = "name";
    /// `s`: kernel (name or id) the image boots with (default the default
    /// image's).
    pub const KERNEL: &str = "kernel";
    /// `s`: registry username; with [`PASSWORD`], the pull sends both to
    /// the registry's token service (or as basic auth); anonymous without.
    pub const USERNAME: &str = "username";
    /// `s`: registry password or access token; only with [`USERNAME`].
    pub const PASSWORD: &str = "password";
}

/// Keys of `Manager.ImportKernel(s name, s kernel, a{sv} options)`.
pub mod import_kernel {
    /// `s`: host path of an initramfs to boot with the kernel.
    pub const INITRD: &str = "initrd";
    /// `s`: host path of the kernel's `lib/modules/<version>` directory.
    pub const MODULES: &str = "modules";
}

/// Keys of `Manager.ImportKernelFd(s name, h kernel, a{sv} options)`.
pub mod import_kernel_fd {
    /// `h`: an initramfs to boot with the kernel, opened for reading.
    pub const INITRD: &str = "initrd";
    /// `h`: an uncompressed tar of the kernel's `lib/modules/<version>`
    /// directory's contents, in a regular file (the CLI writes one as the
    /// caller).
    pub const MODULES: &str = "modules";
}

/// Keys of `Manager.ImportImageFd(s name, h rootfs, s kernel, a{sv} options)`.
pub mod import_image_fd {
    /// `h`: an ext4 image holding the rootfs's `/root`, opened for reading.
    pub const WORK_SEED: &str = "work_seed";
    /// `as`: guest services readiness waits for, each `name:port`.
    pub const SERVICES: &str = "services";
    /// `s`: the init the kernel starts (e.g. `/sbin/banger-init`).
    pub const INIT: &str = "init";
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

/// Keys of `Manager.CreateVM(s name, s image, a{sv} options)`.
pub mod create_vm {
    /// `u`: virtual CPUs.
    pub const VCPUS: &str = "vcpus";
    /// `u`: memory in MiB.
    pub const MEMORY_MIB: &str = "memory_mib";
    /// `t`: size of the work disk (/root) in bytes.
    pub const DISK_BYTES: &str = "disk_bytes";
    /// `b`: NAT the VM's traffic to the outside.
    pub const NAT: &str = "nat";
    /// `as`: SSH public key lines for root's authorized_keys.
    pub const SSH_KEYS: &str = "ssh_keys";
    /// `b`: start the VM once it is made (default true).
    pub const START: &str = "start";
}

/// Keys of `VM.Set(a{sv} changes)`.
pub mod set_vm {
    pub use super::create_vm::{DISK_BYTES, MEMORY_MIB, NAT, VCPUS};
}
