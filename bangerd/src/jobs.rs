//! Long operations as jobs: a registry, an explicit state machine, stages
//! with durations, cancellation and retention.
//!
//! The registry knows nothing about D-Bus. It sends [`JobEvent`]s, in order,
//! to one channel; the D-Bus front end turns them into objects and signals.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Action;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{JobEnd, JobRowState, Store, unix_us};

/// Something the front ends publish: a kernel, an image or a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Kernel `id`.
    Kernel(String),
    /// Image `id`.
    Image(String),
    /// VM `id`.
    Vm(String),
}

/// A job number; also the last part of its object path.
pub type JobId = u64;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Working.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped by `Cancel`.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        self != Self::Running
    }

    /// The only transitions: running to one of the final states.
    pub fn can_become(self, next: JobState) -> bool {
        self == Self::Running && next.is_final()
    }

    /// Wire name (`running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    fn row_state(self) -> JobRowState {
        match self {
            Self::Running => JobRowState::Running,
            Self::Succeeded => JobRowState::Succeeded,
            Self::Failed => JobRowState::Failed,
            Self::Cancelled => JobRowState::Cancelled,
        }
    }
}

impl Resource {
    /// As the job history records it: `vm:ID`, `image:ID`, `kernel:ID`.
    pub fn to_record(&self) -> String {
        match self {
            Self::Kernel(id) => format!("kernel:{id}"),
            Self::Image(id) => format!("image:{id}"),
            Self::Vm(id) => format!("vm:{id}"),
        }
    }

    /// Back from [`Resource::to_record`].
    pub fn from_record(text: &str) -> Option<Self> {
        let (kind, id) = text.split_once(':')?;
        let id = id.to_owned();
        match kind {
            "kernel" => Some(Self::Kernel(id)),
            "image" => Some(Self::Image(id)),
            "vm" => Some(Self::Vm(id)),
            _ => None,
        }
    }
}

/// What became of a job: from the registry while it is there, else from
/// the history (`Manager.JobOutcome`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub owner_uid: u32,
    pub state: JobState,
    /// Why it did not succeed.
    pub error: Option<Error>,
    /// What it made.
    pub result: Option<Resource>,
    pub stages: Vec<StageRecord>,
}

impl JobOutcome {
    /// From a history row (an interrupted job reads as failed).
    fn from_row(row: &crate::store::JobRow) -> JobOutcome {
        let message = row.message.clone().unwrap_or_default();
        let kind = row.error_kind.as_deref().and_then(ErrorKind::from_name);
        let (state, error) = match row.state.as_str() {
            "running" => (JobState::Running, None),
            "succeeded" => (JobState::Succeeded, None),
            "cancelled" => (
                JobState::Cancelled,
                Some(Error::new(ErrorKind::Cancelled, message)),
            ),
            // Failed, or interrupted: bangerd stopped while it ran.
            _ => (
                JobState::Failed,
                Some(Error::new(kind.unwrap_or(ErrorKind::Failed), message)),
            ),
        };
        let stages: Vec<(String, u64)> = row
            .stages
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        JobOutcome {
            owner_uid: row.owner_uid,
            state,
            error,
            result: row.result.as_deref().and_then(Resource::from_record),
            stages: stages
                .into_iter()
                .map(|(name, usec)| StageRecord {
                    name,
                    duration: Duration::from_micros(usec),
                })
                .collect(),
        }
    }
}

/// A finished stage and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRecord {
    /// Stage name.
    pub name: String,
    /// Wall time from the stage's start to the next stage (or the end).
    pub duration: Duration,
}

impl StageRecord {
    /// Its duration in microseconds, as the bus and the history carry it.
    pub fn usec(&self) -> u64 {
        u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX)
    }
}

/// Everything known about one job.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    /// Job number.
    pub id: JobId,
    /// Kind, e.g. `maintain`.
    pub kind: &'static str,
    /// Uid that started it.
    pub owner_uid: u32,
    /// The polkit action that allowed it; cancelling needs the same.
    pub action: Action,
    /// Current (or last) stage.
    pub stage: String,
    /// Detail of the latest progress report.
    pub detail: String,
    /// Overall progress 0..1.
    pub progress: f64,
    /// Bytes processed so far.
    pub bytes: u64,
    /// Wall-clock start.
    pub started_at: SystemTime,
    /// State.
    pub state: JobState,
    /// Finished stages, in order.
    pub stages: Vec<StageRecord>,
    /// Why it failed or was cancelled.
    pub error: Option<Error>,
    /// What it made, once it succeeded.
    pub result: Option<Resource>,
}

impl JobSnapshot {
    /// Whether `Cancel` can still change anything.
    pub fn cancelable(&self) -> bool {
        self.state == JobState::Running
    }
}

/// What the registry reports, in the order things happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A job was created.
    Added(JobId),
    /// A stage started or advanced.
    Progress {
        /// Job.
        id: JobId,
        /// Stage name.
        stage: String,
        /// Human detail, may be empty.
        detail: String,
        /// Overall progress 0..1.
        fraction: f64,
    },
    /// A stage ended.
    StageFinished {
        /// Job.
        id: JobId,
        /// Stage name.
        stage: String,
        /// How long it took.
        duration: Duration,
    },
    /// The job ended; `error` is `None` on success.
    Completed {
        /// Job.
        id: JobId,
        /// Why it did not succeed.
        error: Option<Error>,
        /// What it made, if anything.
        result: Option<Resource>,
        /// The job's retention starts when the last copy of this event is
        /// dropped: once the front end has published it, however far
        /// behind it is.
        retire: Retire,
    },
    /// A kernel or image appeared or changed. Sent before the
    /// `Completed` of the job that made it.
    ResourceChanged(Resource),
    /// A kernel or image is gone.
    ResourceRemoved(Resource),
    /// The job's retention ended; it is gone.
    Removed(JobId),
    /// Nothing happened: whoever sent it is woken once the front end
    /// has dealt with every event before it ([`Jobs::published`]).
    Flush(Flush),
}

/// Wakes the sender of a [`JobEvent::Flush`] when the last clone is
/// dropped, i.e. once the front end is past it. Equal to any other.
#[derive(Clone)]
pub struct Flush {
    _wake: Arc<FlushOnDrop>,
}

struct FlushOnDrop(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        if let Some(sender) = self.0.take() {
            let _ = sender.send(());
        }
    }
}

impl PartialEq for Flush {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Flush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flush")
    }
}

/// Starts a finished job's retention when the last clone is dropped (see
/// [`JobEvent::Completed`]). Equal to any other.
#[derive(Clone)]
pub struct Retire {
    _held: Arc<RetireOnDrop>,
}

impl std::fmt::Debug for Retire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retire")
    }
}

impl PartialEq for Retire {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

struct RetireOnDrop {
    jobs: Arc<Jobs>,
    id: JobId,
}

impl Drop for RetireOnDrop {
    fn drop(&mut self) {
        let (jobs, id) = (self.jobs.clone(), self.id);
        let retention = jobs.settings().retention;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(retention).await;
                    jobs.remove(id);
                });
            }
            // Outside the runtime (shutdown): nobody is left to look.
            Err(_) => jobs.remove(id),
        }
    }
}

struct Entry {
    snapshot: JobSnapshot,
    token: CancellationToken,
    stage_started: Option<Instant>,
    cancelled_by: Option<u32>,
}

/// Tunables of the registry.
#[derive(Debug, Clone, Copy)]
pub struct JobSettings {
    /// How long finished jobs stay.
    pub retention: Duration,
    /// Pause at the start of each stage (testing aid, normally zero).
    pub stage_delay: Duration,
}

/// The registry of live and recently finished jobs.
pub struct Jobs {
    entries: Mutex<HashMap<JobId, Entry>>,
    /// How many entries are running, kept as they start and end.
    running: std::sync::atomic::AtomicUsize,
    events: UnboundedSender<JobEvent>,
    store: Arc<Store>,
    settings: Mutex<JobSettings>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

impl Jobs {
    /// A registry persisting history to `store` and reporting to `events`.
    pub fn new(
        store: Arc<Store>,
        events: UnboundedSender<JobEvent>,
        settings: JobSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            running: std::sync::atomic::AtomicUsize::new(0),
            events,
            store,
            settings: Mutex::new(settings),
        })
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<JobId, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> JobSettings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change retention and stage delay (on configuration reload).
    pub fn set_settings(&self, settings: JobSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    pub(crate) fn send(&self, event: JobEvent) {
        // The receiver lives as long as the daemon; after shutdown there is
        // nobody left to tell.
        let _ = self.events.send(event);
    }

    /// Wait until the front end has published every event sent before
    /// this call (at most `limit`): a method that changed something and
    /// answers after this lets its caller read the change back at once.
    pub async fn published(&self, limit: Duration) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.send(JobEvent::Flush(Flush {
            _wake: Arc::new(FlushOnDrop(Some(sender))),
        }));
        let _ = tokio::time::timeout(limit, receiver).await;
    }

    /// Start `work` as a job of `kind` owned by `owner_uid`, allowed by `action`.
    /// Returns once the job is registered; the work runs on its own task.
    pub async fn start<F, Fut>(
        self: &Arc<Self>,
        kind: &'static str,
        owner_uid: u32,
        action: Action,
        work: F,
    ) -> Result<JobId>
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.start_with_result(kind, owner_uid, action, move |ctx| async move {
            work(ctx).await.map(|()| None)
        })
        .await
    }

    /// Like [`Jobs::start`], for work that makes a resource: it is the
    /// job's result (the `result` of `Completed`).
    pub async fn start_with_result<F, Fut>(
        self: &Arc<Self>,
        kind: &'static str,
        owner_uid: u32,
        action: Action,
        work: F,
    ) -> Result<JobId>
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Resource>>> + Send + 'static,
    {
        self.spawn_job(kind, owner_uid, action, false, work).await
    }

    /// Like [`Jobs::start_with_result`], but cancellation only cancels the
    /// token: the work is never dropped midway, so it can undo what it
    /// made before the job completes (it must watch [`JobContext::token`]).
    pub async fn start_cooperative<F, Fut>(
        self: &Arc<Self>,
        kind: &'static str,
        owner_uid: u32,
        action: Action,
        work: F,
    ) -> Result<JobId>
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Resource>>> + Send + 'static,
    {
        self.spawn_job(kind, owner_uid, action, true, work).await
    }

    async fn spawn_job<F, Fut>(
        self: &Arc<Self>,
        kind: &'static str,
        owner_uid: u32,
        action: Action,
        cooperative: bool,
        work: F,
    ) -> Result<JobId>
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Resource>>> + Send + 'static,
    {
        let started_at = SystemTime::now();
        let store = self.store.clone();
        let id =
            crate::blocking::run(move || store.insert_job(kind, owner_uid, unix_us(started_at)))
                .await
                .map_err(|e| Error::failed_with("recording the job failed", &e))?;

        let token = CancellationToken::new();
        {
            let mut entries = self.entries();
            entries.insert(
                id,
                Entry {
                    snapshot: JobSnapshot {
                        id,
                        kind,
                        owner_uid,
                        action,
                        stage: String::new(),
                        detail: String::new(),
                        progress: 0.0,
                        bytes: 0,
                        started_at,
                        state: JobState::Running,
                        stages: Vec::new(),
                        error: None,
                        result: None,
                    },
                    token: token.clone(),
                    stage_started: None,
                    cancelled_by: None,
                },
            );
            self.running
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Sent under the lock so no event of this job can precede it.
            self.send(JobEvent::Added(id));
        }
        tracing::info!(
            banger_job_id = id,
            banger_job_kind = kind,
            owner_uid,
            "job started"
        );

        let ctx = JobContext {
            id,
            jobs: self.clone(),
            token: token.clone(),
        };
        let jobs = self.clone();
        let span = tracing::info_span!("job", banger_job_id = id, banger_job_kind = kind);
        tokio::spawn(
            async move {
                let outcome = if cooperative {
                    let r = work(ctx).await;
                    match r {
                        Err(e) if token.is_cancelled() && e.kind != ErrorKind::Cancelled => {
                            Err(Error::cancelled(format!("cancelled ({})", e.message)))
                        }
                        r => r,
                    }
                } else {
                    tokio::select! {
                        biased;
                        () = token.cancelled() => Err(Error::cancelled("cancelled")),
                        r = work(ctx) => r,
                    }
                };
                jobs.complete(id, outcome).await;
            }
            .instrument(span),
        );
        Ok(id)
    }

    async fn complete(self: &Arc<Self>, id: JobId, outcome: Result<Option<Resource>>) {
        let (state, error) = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&id) else {
                return;
            };
            let (state, error) = match outcome {
                Ok(made) => {
                    entry.snapshot.result = made;
                    (JobState::Succeeded, None)
                }
                Err(e) if e.kind == ErrorKind::Cancelled => {
                    let by = entry
                        .cancelled_by
                        .map(|uid| format!("job {id} was cancelled by uid {uid}"))
                        .unwrap_or_else(|| format!("job {id} was cancelled: {}", e.message));
                    (JobState::Cancelled, Some(Error::cancelled(by)))
                }
                Err(e) => (JobState::Failed, Some(e)),
            };
            assert!(
                entry.snapshot.state.can_become(state),
                "job {id}: {:?} -> {state:?}",
                entry.snapshot.state
            );
            if state == JobState::Succeeded {
                if let Some(started) = entry.stage_started.take() {
                    let record = StageRecord {
                        name: entry.snapshot.stage.clone(),
                        duration: started.elapsed(),
                    };
                    self.send(JobEvent::StageFinished {
                        id,
                        stage: record.name.clone(),
                        duration: record.duration,
                    });
                    entry.snapshot.stages.push(record);
                }
                entry.snapshot.progress = 1.0;
            }
            entry.snapshot.state = state;
            entry.snapshot.error = error.clone();
            self.running
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            (state, error)
        };

        match &error {
            None => tracing::info!(banger_job_id = id, "job succeeded"),
            Some(e) => tracing::warn!(banger_job_id = id, state = state.as_str(), "job ended: {e}"),
        }
        let store = self.store.clone();
        let kind = error.as_ref().map(|e| e.kind.name().to_owned());
        let message = error.as_ref().map(|e| e.message.clone());
        let (result, stages) = self
            .get(id)
            .map(|s| {
                let stages: Vec<(String, u64)> = s
                    .stages
                    .iter()
                    .map(|r| (r.name.clone(), r.usec()))
                    .collect();
                (s.result, stages)
            })
            .unwrap_or_default();
        let record = result.as_ref().map(Resource::to_record);
        let stages = serde_json::to_string(&stages).unwrap_or_else(|_| "[]".to_owned());
        let persisted = crate::blocking::run(move || {
            store.finish_job(
                id,
                &JobEnd {
                    state: state.row_state(),
                    error_kind: kind.as_deref(),
                    message: message.as_deref(),
                    result: record.as_deref(),
                    stages: &stages,
                    finished_at_us: unix_us(SystemTime::now()),
                },
            )
        })
        .await;
        if persisted.is_err() {
            tracing::error!(
                banger_job_id = id,
                "could not record the end of the job: {persisted:?}"
            );
        }

        let retire = Retire {
            _held: Arc::new(RetireOnDrop {
                jobs: self.clone(),
                id,
            }),
        };
        self.send(JobEvent::Completed {
            id,
            error,
            result,
            retire,
        });
        if self.running() == 0 {
            // The burst is over: what it allocated goes back to the kernel.
            crate::blocking::detach(crate::memory::trim);
        }
    }

    /// The end of job `id`'s retention: it is gone.
    fn remove(&self, id: JobId) {
        self.entries().remove(&id);
        self.send(JobEvent::Removed(id));
    }

    /// Ask job `id` to stop, on behalf of `by_uid`.
    pub fn cancel(&self, id: JobId, by_uid: u32) -> Result<()> {
        let mut entries = self.entries();
        let entry = entries
            .get_mut(&id)
            .ok_or_else(|| Error::not_found(format!("there is no job {id}")))?;
        if entry.snapshot.state.is_final() {
            return Err(Error::failed(format!(
                "job {id} has already {}",
                entry.snapshot.state.as_str()
            )));
        }
        entry.cancelled_by.get_or_insert(by_uid);
        entry.token.cancel();
        tracing::info!(banger_job_id = id, by_uid, "job cancel requested");
        Ok(())
    }

    /// Cancel every running job (daemon shutdown).
    pub fn cancel_all(&self) {
        for entry in self.entries().values() {
            entry.token.cancel();
        }
    }

    /// The job, if it is live or within retention.
    pub fn get(&self, id: JobId) -> Option<JobSnapshot> {
        self.entries().get(&id).map(|e| e.snapshot.clone())
    }

    /// All jobs, oldest first.
    pub fn list(&self) -> Vec<JobSnapshot> {
        let mut all: Vec<_> = self
            .entries()
            .values()
            .map(|e| e.snapshot.clone())
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// What became of job `id`: the registry's snapshot while it is
    /// there, else its history row; `None` when neither has it.
    pub async fn outcome(&self, id: JobId) -> Result<Option<JobOutcome>> {
        if let Some(s) = self.get(id) {
            return Ok(Some(JobOutcome {
                owner_uid: s.owner_uid,
                state: s.state,
                error: s.error,
                result: s.result,
                stages: s.stages,
            }));
        }
        let store = self.store.clone();
        let row = crate::blocking::run(move || store.job(id))
            .await
            .map_err(|e| Error::failed_with("reading the job history failed", &e))?;
        Ok(row.as_ref().map(JobOutcome::from_row))
    }

    /// How many jobs are running.
    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a job's work uses to report and to notice cancellation.
#[derive(Debug, Clone)]
pub struct JobContext {
    id: JobId,
    jobs: Arc<Jobs>,
    token: CancellationToken,
}

impl JobContext {
    /// The job's number.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// Cancelled when someone cancels the job.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Fail with `Cancelled` if the job was cancelled.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.token.is_cancelled() {
            Err(Error::cancelled("cancelled"))
        } else {
            Ok(())
        }
    }

    /// End the current stage (reporting its duration) and begin `name` at
    /// overall progress `fraction`.
    pub async fn stage(&self, name: &str, fraction: f64) -> Result<()> {
        self.check_cancelled()?;
        {
            let mut entries = self.jobs.entries();
            let Some(entry) = entries.get_mut(&self.id) else {
                return Err(Error::failed("job vanished"));
            };
            let now = Instant::now();
            if let Some(started) = entry.stage_started.replace(now) {
                let record = StageRecord {
                    name: entry.snapshot.stage.clone(),
                    duration: now.duration_since(started),
                };
                self.jobs.send(JobEvent::StageFinished {
                    id: self.id,
                    stage: record.name.clone(),
                    duration: record.duration,
                });
                entry.snapshot.stages.push(record);
            }
            entry.snapshot.stage = name.to_owned();
            entry.snapshot.detail.clear();
            entry.snapshot.progress = clamp_progress(entry.snapshot.progress, fraction);
            self.jobs.send(JobEvent::Progress {
                id: self.id,
                stage: name.to_owned(),
                detail: String::new(),
                fraction: entry.snapshot.progress,
            });
        }
        tracing::debug!(banger_job_id = self.id, stage = name, "stage started");
        let delay = self.jobs.settings().stage_delay;
        if !delay.is_zero() {
            tokio::select! {
                () = self.token.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.check_cancelled()
    }

    /// Report progress within the current stage.
    pub fn progress(&self, detail: &str, fraction: f64, bytes: Option<u64>) {
        let mut entries = self.jobs.entries();
        let Some(entry) = entries.get_mut(&self.id) else {
            return;
        };
        entry.snapshot.detail = detail.to_owned();
        entry.snapshot.progress = clamp_progress(entry.snapshot.progress, fraction);
        if let Some(bytes) = bytes {
            entry.snapshot.bytes = bytes;
        }
        self.jobs.send(JobEvent::Progress {
            id: self.id,
            stage: entry.snapshot.stage.clone(),
            detail: detail.to_owned(),
            fraction: entry.snapshot.progress,
        });
    }
}

/// Progress never goes backwards and stays within 0..1.
fn clamp_progress(current: f64, reported: f64) -> f64 {
    if reported.is_nan() {
        return current;
    }
    reported.clamp(0.0, 1.0).max(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn registry(retention_ms: u64) -> (Arc<Jobs>, UnboundedReceiver<JobEvent>) {
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let (tx, rx) = unbounded_channel();
        let jobs = Jobs::new(
            store,
            tx,
            JobSettings {
                retention: Duration::from_millis(retention_ms),
                stage_delay: Duration::ZERO,
            },
        );
        (jobs, rx)
    }

    /// What happened, by name, until the job is removed. Each event is
    /// dropped once named, as the front end does once it published it.
    async fn events_until_removed(rx: &mut UnboundedReceiver<JobEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(event) = rx.recv().await {
            let done = matches!(event, JobEvent::Removed(_));
            out.push(name(&event));
            if done {
                break;
            }
        }
        out
    }

    fn name(event: &JobEvent) -> String {
        match event {
            JobEvent::Added(_) => "added".into(),
            JobEvent::Progress { stage, detail, .. } => format!("progress {stage} {detail}"),
            JobEvent::StageFinished { stage, .. } => format!("finished {stage}"),
            JobEvent::Completed { error, .. } => format!("completed {}", error.is_none()),
            JobEvent::Removed(_) => "removed".into(),
            JobEvent::ResourceChanged(r) | JobEvent::ResourceRemoved(r) => format!("{r:?}"),
            JobEvent::Flush(_) => "flush".into(),
        }
    }

    #[tokio::test]
    async fn published_waits_for_the_front_end_to_pass_what_came_before() {
        let (jobs, mut rx) = registry(10);
        jobs.send(JobEvent::ResourceChanged(Resource::Vm("a".into())));
        // A front end that takes 300 ms over the change.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let front = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    if matches!(event, JobEvent::ResourceChanged(_)) {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    seen.lock().expect("lock").push(name(&event));
                }
            })
        };
        let started = Instant::now();
        jobs.published(Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            seen.lock().expect("lock").first().map(String::as_str),
            Some("Vm(\"a\")")
        );
        front.abort();

        // Nobody reading: it gives up after its limit.
        let (jobs, _rx) = registry(10);
        let started = Instant::now();
        jobs.published(Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Nobody left at all: at once.
        let (jobs, rx) = registry(10);
        drop(rx);
        let started = Instant::now();
        jobs.published(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn state_machine_allows_only_running_to_final() {
        use JobState::*;
        let all = [Running, Succeeded, Failed, Cancelled];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    from == Running && to != Running,
                    "{from:?}->{to:?}"
                );
            }
        }
    }

    #[test]
    fn progress_is_monotonic_and_bounded() {
        assert_eq!(clamp_progress(0.5, 0.2), 0.5);
        assert_eq!(clamp_progress(0.5, 2.0), 1.0);
        assert_eq!(clamp_progress(0.0, -1.0), 0.0);
        assert_eq!(clamp_progress(0.3, f64::NAN), 0.3);
    }

    #[tokio::test]
    async fn events_arrive_in_order_with_stage_durations() {
        let (jobs, mut rx) = registry(10);
        let id = jobs
            .start("test", 1000, Action::Maintain, |ctx| async move {
                ctx.stage("one", 0.0).await?;
                ctx.progress("half", 0.25, Some(10));
                ctx.stage("two", 0.5).await?;
                Ok(())
            })
            .await
            .expect("start");
        let names = events_until_removed(&mut rx).await;
        assert_eq!(
            names,
            [
                "added",
                "progress one ",
                "progress one half",
                "finished one",
                "progress two ",
                "finished two",
                "completed true",
                "removed"
            ]
        );
        assert!(jobs.get(id).is_none(), "removed after retention");
    }

    #[tokio::test]
    async fn retention_starts_once_the_completion_is_published() {
        let (jobs, mut rx) = registry(50);
        let id = jobs
            .start("test", 1000, Action::Maintain, |_| async { Ok(()) })
            .await
            .expect("start");
        assert_eq!(jobs.running(), 1);
        let completed = loop {
            let event = rx.recv().await.expect("event");
            if matches!(event, JobEvent::Completed { .. }) {
                break event;
            }
        };
        assert_eq!(jobs.running(), 0);
        // A front end far behind still finds the job when it publishes
        // the completion, however long after the retention that is.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(jobs.get(id).is_some(), "gone before it was published");
        let copy = completed.clone();
        drop(completed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(jobs.get(id).is_some(), "a copy still holds it");
        drop(copy);
        let started = Instant::now();
        assert_eq!(name(&rx.recv().await.expect("removed")), "removed");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(jobs.get(id).is_none());
    }

    #[tokio::test]
    async fn failure_is_reported_and_recorded() {
        let (jobs, mut rx) = registry(1000);
        let id = jobs
            .start("test", 0, Action::Maintain, |ctx| async move {
                ctx.stage("doomed", 0.0).await?;
                Err(Error::unavailable("no such thing"))
            })
            .await
            .expect("start");
        loop {
            if let Some(JobEvent::Completed { error, .. }) = rx.recv().await {
                let error = error.expect("failed");
                assert_eq!(error.kind, ErrorKind::Unavailable);
                break;
            }
        }
        let snap = jobs.get(id).expect("retained");
        assert_eq!(snap.state, JobState::Failed);
        assert!(!snap.cancelable());
        assert!(snap.stages.is_empty(), "a failed stage has no duration");
        let row = jobs.store.job(id).expect("query").expect("row");
        assert_eq!(row.state, "failed");
        assert_eq!(row.message.as_deref(), Some("no such thing"));
    }

    #[tokio::test]
    async fn cancel_stops_the_work_and_is_final() {
        let (jobs, mut rx) = registry(1000);
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let id = jobs
            .start("test", 1000, Action::Maintain, |ctx| async move {
                ctx.stage("waiting", 0.0).await?;
                let _ = reached_tx.send(());
                std::future::pending::<()>().await;
                Ok(())
            })
            .await
            .expect("start");
        reached_rx.await.expect("work started");
        jobs.cancel(id, 1000).expect("cancel");
        loop {
            if let Some(JobEvent::Completed { error, .. }) = rx.recv().await {
                let error = error.expect("cancelled");
                assert_eq!(error.kind, ErrorKind::Cancelled);
                assert!(error.message.contains("uid 1000"), "{}", error.message);
                break;
            }
        }
        assert_eq!(jobs.get(id).expect("retained").state, JobState::Cancelled);
        let again = jobs.cancel(id, 1000).expect_err("already over");
        assert!(
            again.message.contains("already cancelled"),
            "{}",
            again.message
        );
        assert_eq!(
            jobs.cancel(999, 0).expect_err("unknown").kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            jobs.store.job(id).expect("q").expect("row").state,
            "cancelled"
        );
    }

    #[tokio::test]
    async fn ids_are_unique_and_running_is_counted() {
        let (jobs, _rx) = registry(1000);
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut ids = Vec::new();
        for _ in 0..3 {
            let mut release = release_rx.clone();
            ids.push(
                jobs.start("test", 0, Action::Maintain, |_ctx| async move {
                    let _ = release.wait_for(|v| *v).await;
                    Ok(())
                })
                .await
                .expect("start"),
            );
        }
        ids.dedup();
        assert_eq!(ids.len(), 3);
        assert_eq!(jobs.running(), 3);
        release_tx.send(true).expect("release");
        for _ in 0..100 {
            if jobs.running() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(jobs.running(), 0);
        assert_eq!(jobs.list().len(), 3);
    }
}
