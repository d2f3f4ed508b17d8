//! Wire types: what travels in method arguments, replies and properties.

use serde::{Deserialize, Serialize};
use zbus::Type;

/// One line of `Manager.Doctor()`: signature `(ssss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct DoctorCheck {
    /// Short stable name, e.g. `tun`.
    pub name: String,
    /// `pass`, `warn` or `fail`.
    pub verdict: String,
    /// What was found.
    pub detail: String,
    /// What to do about it; empty on pass.
    pub hint: String,
}

/// One entry of `Manager.ListAvailable()`: signature `(ssssstssbb)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct CatalogEntry {
    /// Name to pull it by.
    pub name: String,
    /// Its own version.
    pub version: String,
    /// Machine architecture, e.g. `x86_64`.
    pub arch: String,
    /// One line for listings.
    pub description: String,
    /// The bundle's URL.
    pub url: String,
    /// The bundle's size in bytes.
    pub size: u64,
    /// Images: the kernel entry it boots with; empty for kernels.
    pub kernel: String,
    /// The oldest banger that can use it.
    pub min_banger: String,
    /// A kernel or image of that name is registered on this host.
    pub installed: bool,
    /// This banger is new enough for it.
    pub usable: bool,
}

/// One finished stage of a job, in the `Stages` property: signature `(st)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct StageTiming {
    /// Stage name, as sent in `Progress`.
    pub stage: String,
    /// How long the stage took, in microseconds.
    pub duration_usec: u64,
}

/// What became of a job, from `Manager.JobOutcome`: signature
/// `(sssoa(st))`. Answered for live jobs and for finished ones long after
/// their object is gone (until the history is pruned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct JobOutcome {
    /// A [`job_state`] value.
    pub state: String,
    /// The error's D-Bus name; empty unless it failed or was cancelled.
    pub error_name: String,
    /// The error's message; empty unless it failed or was cancelled.
    pub message: String,
    /// The object the job made, or `/`.
    pub result: zbus::OwnedObjectPath,
    /// Its finished stages with their durations.
    pub stages: Vec<StageTiming>,
}

/// Values of the `State` property of a job.
pub mod job_state {
    /// The job is running.
    pub const RUNNING: &str = "running";
    /// The job finished successfully.
    pub const SUCCEEDED: &str = "succeeded";
    /// The job failed; `Completed` carries the error.
    pub const FAILED: &str = "failed";
    /// The job was cancelled.
    pub const CANCELLED: &str = "cancelled";
}

/// Values of `DoctorCheck::verdict`.
pub mod verdict {
    /// All good.
    pub const PASS: &str = "pass";
    /// Works, with a caveat.
    pub const WARN: &str = "warn";
    /// Broken; the hint says what to do.
    pub const FAIL: &str = "fail";
}

/// One guest service of an image, in its `Services` property:
/// signature `(sq)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ServicePort {
    /// Short name, e.g. `ssh`.
    pub name: String,
    /// The guest TCP port readiness waits for.
    pub port: u16,
}
