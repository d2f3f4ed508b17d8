//! Client proxies for every served interface.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

use crate::{CatalogEntry, DoctorCheck, Error, JobOutcome, ServicePort, StageTiming};

macro_rules! manager_proxy {
    ($(#[$outer:meta])* $name:ident $(, #[$auth:meta])?) => {
        $(#[$outer])*
        #[proxy(
            interface = "org.banger.Manager",
            default_service = "org.banger.Manager",
            default_path = "/org/banger/Manager"
        )]
        pub trait $name {
            /// Run the host checks and return them.
            fn doctor(&self) -> Result<Vec<DoctorCheck>, Error>;

            /// Start store maintenance as a job; returns the job's path.
            $(#[$auth])?
            fn maintain(&self, options: HashMap<&str, &Variant<'_>>) -> Result<OwnedObjectPath, Error>;

            /// Update from the signed release channel (or check, or roll back) as
            /// a job; returns the job's path.
            $(#[$auth])?
            fn update(&self, options: HashMap<&str, &Variant<'_>>) -> Result<OwnedObjectPath, Error>;

            /// Pull a kernel-catalog entry as a job; returns the job's path.
            $(#[$auth])?
            fn pull_kernel(
                &self,
                name: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Build a kernel from the host's Debian archive as a job; returns
            /// the job's path.
            $(#[$auth])?
            fn build_kernel(
                &self,
                name: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Build an image from a recipe (and its kernel when missing) as a
            /// job; returns the job's path.
            $(#[$auth])?
            fn build_image(
                &self,
                recipe: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// What became of job `job` (its number), live or finished.
            fn job_outcome(&self, job: u64) -> Result<JobOutcome, Error>;

            /// Pull an image-catalog entry (and its kernel) as a job; returns the
            /// job's path.
            $(#[$auth])?
            fn pull_image(
                &self,
                reference: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// The kernel or image catalog in use: (serial, fetched, entries).
            fn list_available(&self, kind: &str) -> Result<(u64, bool, Vec<CatalogEntry>), Error>;

            /// Record a VM from an image and create its disks as a job (and boot
            /// it unless `options` say `start = false`); returns the VM and the job.
            $(#[$auth])?
            #[zbus(name = "CreateVM")]
            fn create_vm(
                &self,
                name: &str,
                image: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<(OwnedObjectPath, OwnedObjectPath), Error>;

            /// Re-read bangerd.toml; a bad file is refused and the old one stays.
            $(#[$auth])?
            fn reload(&self) -> Result<(), Error>;

            /// Import a kernel (ELF vmlinux or bzImage) from a host path into
            /// managed storage; returns the job, whose result is the kernel object.
            $(#[$auth])?
            fn import_kernel(
                &self,
                name: &str,
                kernel: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Import a kernel from descriptors (`initrd` and `modules` options are
            /// descriptors too); returns the job, whose result is the kernel.
            $(#[$auth])?
            fn import_kernel_fd(
                &self,
                name: &str,
                kernel: zbus::Fd<'_>,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Import an image from descriptors into managed storage; returns the
            /// job, whose result is the image.
            $(#[$auth])?
            fn import_image_fd(
                &self,
                name: &str,
                rootfs: zbus::Fd<'_>,
                kernel: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Delete a kernel (by name or id); refused while an image uses it.
            $(#[$auth])?
            fn delete_kernel(&self, kernel: &str) -> Result<(), Error>;

            /// Record an unmanaged image from host paths; returns the image object.
            $(#[$auth])?
            fn register_image(
                &self,
                name: &str,
                rootfs: &str,
                kernel: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<OwnedObjectPath, Error>;

            /// Copy an image into managed storage; returns the job.
            $(#[$auth])?
            fn promote_image(&self, image: &str) -> Result<OwnedObjectPath, Error>;

            /// Delete an image (by name or id); refused while VMs use it.
            $(#[$auth])?
            fn delete_image(&self, image: &str) -> Result<(), Error>;

            /// Daemon version.
            #[zbus(property(emits_changed_signal = "const"))]
            fn version(&self) -> zbus::Result<String>;

            /// API version.
            #[zbus(property(emits_changed_signal = "const"), name = "ApiVersion")]
            fn api_version(&self) -> zbus::Result<u32>;

            /// One-line status summary.
            #[zbus(property)]
            fn status(&self) -> zbus::Result<String>;
        }
    };
}

manager_proxy!(
    /// `org.banger.Manager` at `/org/banger/Manager`. Calls that may need
    /// authorization carry ALLOW_INTERACTIVE_AUTH: a polkit agent may
    /// prompt, so they may take as long as the user does.
    Manager,
    #[zbus(allow_interactive_auth)]
);

manager_proxy!(
    /// [`ManagerProxy`] without ALLOW_INTERACTIVE_AUTH: polkit answers at
    /// once, and the daemon replies `InteractiveAuthorizationRequired`
    /// where it would have to ask (`--no-ask-password`, no terminal).
    ManagerQuiet
);

/// `org.banger.Job` at `/org/banger/Manager/job/<n>`.
#[proxy(
    interface = "org.banger.Job",
    default_service = "org.banger.Manager",
    assume_defaults = false
)]
pub trait Job {
    /// Ask the job to stop; it completes as cancelled.
    #[zbus(allow_interactive_auth)]
    fn cancel(&self) -> Result<(), Error>;

    /// Kind of job, e.g. `maintain`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> zbus::Result<String>;

    /// Current stage.
    #[zbus(property)]
    fn stage(&self) -> zbus::Result<String>;

    /// Overall progress, 0..1.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;

    /// Bytes processed so far (when the job moves data).
    #[zbus(property)]
    fn bytes(&self) -> zbus::Result<u64>;

    /// Start time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> zbus::Result<u64>;

    /// Uid of the caller that started the job.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> zbus::Result<u32>;

    /// Whether `Cancel` can still have an effect.
    #[zbus(property)]
    fn cancelable(&self) -> zbus::Result<bool>;

    /// `running`, `succeeded`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// Finished stages with their durations.
    #[zbus(property)]
    fn stages(&self) -> zbus::Result<Vec<StageTiming>>;

    /// A stage started or advanced.
    #[zbus(signal, name = "Progress")]
    fn progress_signal(&self, stage: &str, detail: &str, fraction: f64) -> zbus::Result<()>;

    /// A stage finished, with its duration in microseconds.
    #[zbus(signal)]
    fn stage_finished(&self, stage: &str, duration_usec: u64) -> zbus::Result<()>;

    /// The job ended. `error_name` and `message` are empty on success;
    /// `result` is the object the job made, or `/`.
    #[zbus(signal)]
    fn completed(
        &self,
        success: bool,
        error_name: &str,
        message: &str,
        result: OwnedObjectPath,
    ) -> zbus::Result<()>;
}

/// `Job.Cancel` without ALLOW_INTERACTIVE_AUTH (see [`ManagerQuietProxy`]).
#[proxy(
    interface = "org.banger.Job",
    default_service = "org.banger.Manager",
    assume_defaults = false
)]
pub trait JobQuiet {
    /// Ask the job to stop; it completes as cancelled.
    fn cancel(&self) -> Result<(), Error>;
}

/// `org.banger.Kernel` at `/org/banger/Manager/kernel/<id>`.
#[proxy(
    interface = "org.banger.Kernel",
    default_service = "org.banger.Manager",
    assume_defaults = false
)]
pub trait Kernel {
    /// Stable id (lowercase hex).
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> zbus::Result<String>;
    /// Name (a DNS label).
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> zbus::Result<String>;
    /// Kernel version string from the image, when it has one.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> zbus::Result<String>;
    /// Managed ELF vmlinux (what Firecracker boots).
    #[zbus(property(emits_changed_signal = "const"))]
    fn vmlinux(&self) -> zbus::Result<String>;
    /// Managed bzImage as imported; empty when an ELF was imported.
    #[zbus(property(emits_changed_signal = "const"), name = "BzImage")]
    fn bz_image(&self) -> zbus::Result<String>;
    /// Managed initramfs; empty when none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn initrd(&self) -> zbus::Result<String>;
    /// Managed modules directory; empty when none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn modules(&self) -> zbus::Result<String>;
    /// sha256 of the vmlinux, hex.
    #[zbus(property(emits_changed_signal = "const"))]
    fn sha256(&self) -> zbus::Result<String>;
    /// Bytes on disk of everything managed for this kernel.
    #[zbus(property(emits_changed_signal = "const"))]
    fn size_bytes(&self) -> zbus::Result<u64>;
    /// Import time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> zbus::Result<u64>;
    /// Uid that imported it.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> zbus::Result<u32>;
}

/// `org.banger.Image` at `/org/banger/Manager/image/<id>`.
#[proxy(
    interface = "org.banger.Image",
    default_service = "org.banger.Manager",
    assume_defaults = false
)]
pub trait Image {
    /// Stable id (lowercase hex).
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> zbus::Result<String>;
    /// Name (a DNS label).
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> zbus::Result<String>;
    /// Whether banger owns the files (promoted) or only points at them.
    #[zbus(property)]
    fn managed(&self) -> zbus::Result<bool>;
    /// Path of the rootfs ext4 image.
    #[zbus(property)]
    fn rootfs(&self) -> zbus::Result<String>;
    /// Apparent size of the rootfs in bytes.
    #[zbus(property)]
    fn rootfs_bytes(&self) -> zbus::Result<u64>;
    /// Path of the work-seed ext4 image; empty until one exists.
    #[zbus(property)]
    fn work_seed(&self) -> zbus::Result<String>;
    /// sha256 of the work-seed, hex; empty until one exists.
    #[zbus(property)]
    fn work_seed_sha256(&self) -> zbus::Result<String>;
    /// The kernel object the image boots.
    #[zbus(property)]
    fn kernel(&self) -> zbus::Result<OwnedObjectPath>;
    /// Guest services readiness waits for.
    #[zbus(property(emits_changed_signal = "const"))]
    fn services(&self) -> zbus::Result<Vec<ServicePort>>;
    /// The init the kernel starts; empty for the kernel's default.
    #[zbus(property(emits_changed_signal = "const"))]
    fn init(&self) -> zbus::Result<String>;
    /// Registration time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> zbus::Result<u64>;
    /// Uid that registered it.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> zbus::Result<u32>;
}

macro_rules! vm_proxy {
    ($(#[$outer:meta])* $name:ident $(, #[$auth:meta])?) => {
        $(#[$outer])*
        #[proxy(
            interface = "org.banger.VM",
            default_service = "org.banger.Manager",
            assume_defaults = false
        )]
        pub trait $name {
            /// Boot it; returns the job.
            $(#[$auth])?
            fn start(&self) -> Result<OwnedObjectPath, Error>;

            /// Shut it down cleanly (forced after `vm.stop_timeout_secs`);
            /// returns the job.
            $(#[$auth])?
            fn stop(&self) -> Result<OwnedObjectPath, Error>;

            /// Save its memory and end its VMM; the next start resumes it.
            /// Returns the job.
            $(#[$auth])?
            fn suspend(&self) -> Result<OwnedObjectPath, Error>;

            /// Stop (if running) and start; returns the job.
            $(#[$auth])?
            fn restart(&self) -> Result<OwnedObjectPath, Error>;

            /// Send signal number `signal` to the VMM process.
            $(#[$auth])?
            fn kill(&self, signal: i32) -> Result<(), Error>;

            /// Stop it if it runs, then remove everything of it; returns the
            /// job.
            $(#[$auth])?
            fn delete(&self) -> Result<OwnedObjectPath, Error>;

            /// Change it (keys in [`crate::options::set_vm`]).
            $(#[$auth])?
            fn set(&self, changes: HashMap<&str, &Variant<'_>>) -> Result<(), Error>;

            /// Up to 1 MiB of the serial console from byte `offset`, and the
            /// offset to ask for next.
            fn console_log(&self, offset: u64) -> Result<(Vec<u8>, u64), Error>;

            /// Run `command` in the running guest (options in
            /// [`crate::options::exec`]); returns a socket carrying its
            /// stream (`banger_agent_proto::stream`).
            $(#[$auth])?
            fn exec(
                &self,
                command: &[&str],
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<zbus::OwnedFd, Error>;

            /// Connect to TCP `port` on the guest's loopback (options in
            /// [`crate::options::connect_port`]); returns a socket carrying
            /// the connection as a stream.
            $(#[$auth])?
            fn connect_port(
                &self,
                port: u16,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<zbus::OwnedFd, Error>;

            /// Clone the stopped VM as `name` (options in
            /// [`crate::options::clone_vm`]); returns the clone and the job.
            $(#[$auth])?
            #[zbus(name = "Clone")]
            fn clone_vm(
                &self,
                name: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<(OwnedObjectPath, OwnedObjectPath), Error>;

            /// Fork the running VM as `name` (options in
            /// [`crate::options::fork_vm`]); returns the forks and the job.
            $(#[$auth])?
            fn fork(
                &self,
                name: &str,
                options: HashMap<&str, &Variant<'_>>,
            ) -> Result<(Vec<OwnedObjectPath>, OwnedObjectPath), Error>;

            /// Forward `address` ("" for loopback) port `host_port` (0: any)
            /// to `guest_port` for the VM's lifetime; returns the port.
            $(#[$auth])?
            fn add_forward(
                &self,
                address: &str,
                host_port: u16,
                guest_port: u16,
            ) -> Result<u16, Error>;

            /// Stop forwarding `address` port `host_port`.
            $(#[$auth])?
            fn remove_forward(&self, address: &str, host_port: u16) -> Result<(), Error>;

            /// Keep a copy of the stopped VM's disks as snapshot `name`;
            /// returns the job.
            $(#[$auth])?
            fn snapshot(&self, name: &str) -> Result<OwnedObjectPath, Error>;

            /// Put the stopped VM's disks back as in snapshot `name`;
            /// returns the job.
            $(#[$auth])?
            fn restore(&self, name: &str) -> Result<OwnedObjectPath, Error>;

            /// Delete snapshot `name`.
            $(#[$auth])?
            fn delete_snapshot(&self, name: &str) -> Result<(), Error>;

            /// Usage of a running VM (keys in the interface XML).
            fn stats(&self) -> Result<HashMap<String, zbus::OwnedVariant>, Error>;

            /// Stable id (lowercase hex).
            #[zbus(property(emits_changed_signal = "const"))]
            fn id(&self) -> zbus::Result<String>;
            /// Name (a DNS label).
            #[zbus(property)]
            fn name(&self) -> zbus::Result<String>;
            /// `creating`, `stopped`, `starting`, `running`, `stopping` or
            /// `failed`.
            #[zbus(property)]
            fn state(&self) -> zbus::Result<String>;
            /// Uid that owns it.
            #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
            fn owner_uid(&self) -> zbus::Result<u32>;
        }
    };
}

vm_proxy!(
    /// `org.banger.VM` at `/org/banger/Manager/vm/<id>`. Calls that may
    /// need authorization carry ALLOW_INTERACTIVE_AUTH.
    Vm,
    #[zbus(allow_interactive_auth)]
);

vm_proxy!(
    /// [`VmProxy`] without ALLOW_INTERACTIVE_AUTH.
    VmQuiet
);

#[cfg(test)]
mod tests {
    /// The D-Bus name zbus gives a proxy method: its own `name = "…"`, or
    /// the snake-case name in PascalCase.
    fn wire_name(fn_name: &str, attrs: &str) -> String {
        if let Some(at) = attrs.find("name = \"") {
            let rest = &attrs[at + 8..];
            return rest[..rest.find('"').expect("closing quote")].to_owned();
        }
        fn_name
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Every method a proxy here declares is a method of its interface's
    /// checked-in XML, under the name zbus sends (a proxy cannot call a
    /// method the daemon does not serve, e.g. `CreateVm` for `CreateVM`).
    #[test]
    fn proxy_methods_are_served_methods() {
        let source = include_str!("proxy.rs");
        let source = &source[..source.find("#[cfg(test)]").expect("tests")];
        let mut checked = 0;
        for block in source.split("#[proxy(").skip(1) {
            let interface = block
                .split("interface = \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("interface");
            let xml = crate::INTERFACE_XML
                .iter()
                .find(|(name, _)| *name == interface)
                .map(|(_, xml)| *xml)
                .expect("checked-in XML");
            let body = &block[..block.find("\n}").unwrap_or(block.len())];
            let mut attrs = String::new();
            for line in body.lines().map(str::trim) {
                if line.starts_with("#[zbus(") {
                    attrs.push_str(line);
                } else if let Some(rest) = line.strip_prefix("fn ") {
                    let name = &rest[..rest.find('(').expect("(")];
                    if !attrs.contains("property") && !attrs.contains("signal") {
                        let wire = wire_name(name, &attrs);
                        assert!(
                            xml.contains(&format!("<method name=\"{wire}\">")),
                            "{interface} serves no method {wire} (proxy fn {name})"
                        );
                        checked += 1;
                    }
                    attrs.clear();
                } else if !line.starts_with("///") && !line.starts_with("$(") {
                    attrs.clear();
                }
            }
        }
        assert!(checked >= 25, "only {checked} methods found");
    }
}
