//! Client proxies for every served interface.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

use crate::{DoctorCheck, Error, StageTiming};

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

    /// Re-read bangerd.toml; a bad file is refused and the old one stays.
    #[zbus(allow_interactive_auth)]
    fn reload(&self) -> Result<(), Error>;

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
