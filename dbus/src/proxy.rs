//! Client proxies for every served interface.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

use crate::{CatalogEntry, DoctorCheck, Error, ServicePort, StageTiming};

/// `org.banger.Manager` at `/org/banger/Manager`.
#[proxy(
    interface = "org.banger.Manager",
    default_service = "org.banger.Manager",
    default_path = "/org/banger/Manager"
)]
pub trait Manager {
    /// Run the host checks and return them.
    fn doctor(&self) -> Result<Vec<DoctorCheck>, Error>;

    /// Start store maintenance as a job; returns the job's path.
    #[zbus(allow_interactive_auth)]
    fn maintain(&self, options: HashMap<&str, &Variant<'_>>) -> Result<OwnedObjectPath, Error>;

    /// Update from the signed release channel (or check, or roll back) as
    /// a job; returns the job's path.
    #[zbus(allow_interactive_auth)]
    fn update(&self, options: HashMap<&str, &Variant<'_>>) -> Result<OwnedObjectPath, Error>;

    /// Pull a kernel-catalog entry as a job; returns the job's path.
    #[zbus(allow_interactive_auth)]
    fn pull_kernel(
        &self,
        name: &str,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Pull an image-catalog entry (and its kernel) as a job; returns the
    /// job's path.
    #[zbus(allow_interactive_auth)]
    fn pull_image(
        &self,
        reference: &str,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// The kernel or image catalog in use: (serial, fetched, entries).
    fn list_available(&self, kind: &str) -> Result<(u64, bool, Vec<CatalogEntry>), Error>;

    /// Re-read bangerd.toml; a bad file is refused and the old one stays.
    #[zbus(allow_interactive_auth)]
    fn reload(&self) -> Result<(), Error>;

    /// Import a kernel (ELF vmlinux or bzImage) from a host path into
    /// managed storage; returns the job, whose result is the kernel object.
    #[zbus(allow_interactive_auth)]
    fn import_kernel(
        &self,
        name: &str,
        kernel: &str,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Import a kernel from descriptors (`initrd` and `modules` options are
    /// descriptors too); returns the job, whose result is the kernel.
    #[zbus(allow_interactive_auth)]
    fn import_kernel_fd(
        &self,
        name: &str,
        kernel: zbus::Fd<'_>,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Import an image from descriptors into managed storage; returns the
    /// job, whose result is the image.
    #[zbus(allow_interactive_auth)]
    fn import_image_fd(
        &self,
        name: &str,
        rootfs: zbus::Fd<'_>,
        kernel: &str,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Delete a kernel (by name or id); refused while an image uses it.
    #[zbus(allow_interactive_auth)]
    fn delete_kernel(&self, kernel: &str) -> Result<(), Error>;

    /// Record an unmanaged image from host paths; returns the image object.
    #[zbus(allow_interactive_auth)]
    fn register_image(
        &self,
        name: &str,
        rootfs: &str,
        kernel: &str,
        options: HashMap<&str, &Variant<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Copy an image into managed storage; returns the job.
    #[zbus(allow_interactive_auth)]
    fn promote_image(&self, image: &str) -> Result<OwnedObjectPath, Error>;

    /// Delete an image (by name or id); refused while VMs use it.
    #[zbus(allow_interactive_auth)]
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
