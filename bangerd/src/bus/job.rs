//! `org.banger.Job` at `/org/banger/Manager/job/<n>`.

use std::sync::Arc;
use std::time::SystemTime;

use banger_dbus::{StageTiming, job_path};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectServer, OwnedObjectPath, interface};

use super::{caller, to_wire};
use crate::core::Core;
use crate::jobs::{JobId, JobSnapshot, StageRecord};

/// One job object; properties read the core's registry.
#[derive(Debug)]
pub struct JobObject {
    core: Arc<Core>,
    id: JobId,
}

impl JobObject {
    fn snapshot(&self) -> zbus::fdo::Result<JobSnapshot> {
        self.core
            .job(self.id)
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("job {} is gone", self.id)))
    }
}

/// What every method that starts a job answers: the wire error when the
/// job could not start, else the job's path, once its object exists (so
/// the caller can look at it at once).
pub async fn answer(
    conn: &zbus::Connection,
    core: &Arc<Core>,
    started: crate::error::Result<JobId>,
) -> Result<zbus::OwnedObjectPath, banger_dbus::Reply> {
    let id = started.map_err(super::to_wire)?;
    register(conn.object_server(), core, id)
        .await
        .map_err(|e| {
            banger_dbus::Reply::Banger(banger_dbus::Error::Failed(format!(
                "cannot publish the job: {e}"
            )))
        })?;
    Ok(banger_dbus::job_path(id))
}

/// `stages` as the bus carries them.
pub(super) fn stage_timings(stages: Vec<StageRecord>) -> Vec<StageTiming> {
    stages
        .into_iter()
        .map(|s| StageTiming {
            duration_usec: s.usec(),
            stage: s.name,
        })
        .collect()
}

/// Put job `id` on the bus (no-op when it is already there).
pub async fn register(server: &ObjectServer, core: &Arc<Core>, id: JobId) -> zbus::Result<()> {
    if core.job(id).is_none() {
        return Ok(());
    }
    let object = JobObject {
        core: core.clone(),
        id,
    };
    // `Some` means it was already registered, which is fine.
    let _ = server.at(job_path(id), object).await?;
    Ok(())
}

/// A long operation. Properties change as it runs; it ends with exactly one
/// Completed signal and stays a few seconds before it disappears.
#[interface(name = "org.banger.Job")]
impl JobObject {
    /// Ask the job to stop. It completes with State "cancelled" and the error
    /// org.banger.Error.Cancelled. Needs the polkit action that started the
    /// job, and org.banger.vm.manage-others for another user's job.
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        self.core
            .cancel_job(&caller, self.id)
            .await
            .map_err(to_wire)
    }

    /// Kind of job, e.g. "maintain".
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> zbus::fdo::Result<String> {
        Ok(self.snapshot()?.kind.to_owned())
    }

    /// Current (or last) stage.
    #[zbus(property)]
    fn stage(&self) -> zbus::fdo::Result<String> {
        Ok(self.snapshot()?.stage)
    }

    /// Overall progress from 0 to 1.
    #[zbus(property)]
    fn progress(&self) -> zbus::fdo::Result<f64> {
        Ok(self.snapshot()?.progress)
    }

    /// Bytes processed so far (jobs that move data).
    #[zbus(property)]
    fn bytes(&self) -> zbus::fdo::Result<u64> {
        Ok(self.snapshot()?.bytes)
    }

    /// Start time in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> zbus::fdo::Result<u64> {
        let started = self.snapshot()?.started_at;
        Ok(started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or_default())
    }

    /// Uid of the caller that started the job.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> zbus::fdo::Result<u32> {
        Ok(self.snapshot()?.owner_uid)
    }

    /// Whether Cancel can still have an effect.
    #[zbus(property)]
    fn cancelable(&self) -> zbus::fdo::Result<bool> {
        Ok(self.snapshot()?.cancelable())
    }

    /// "running", "succeeded", "failed" or "cancelled".
    #[zbus(property)]
    fn state(&self) -> zbus::fdo::Result<String> {
        Ok(self.snapshot()?.state.as_str().to_owned())
    }

    /// Finished stages with their durations in microseconds.
    #[zbus(property)]
    fn stages(&self) -> zbus::fdo::Result<Vec<StageTiming>> {
        Ok(stage_timings(self.snapshot()?.stages))
    }

    /// A stage started (detail empty) or advanced; fraction is the overall
    /// progress from 0 to 1.
    #[zbus(signal, name = "Progress")]
    pub async fn progress_signal(
        emitter: &SignalEmitter<'_>,
        stage: &str,
        detail: &str,
        fraction: f64,
    ) -> zbus::Result<()>;

    /// A stage finished after duration_usec microseconds.
    #[zbus(signal)]
    pub async fn stage_finished(
        emitter: &SignalEmitter<'_>,
        stage: &str,
        duration_usec: u64,
    ) -> zbus::Result<()>;

    /// The job ended. error_name and message are empty on success; result
    /// is the object the job made, or "/".
    #[zbus(signal)]
    pub async fn completed(
        emitter: &SignalEmitter<'_>,
        success: bool,
        error_name: &str,
        message: &str,
        result: OwnedObjectPath,
    ) -> zbus::Result<()>;
}
