//! Following a job: the signal subscription (made before the call that
//! starts the job), decoding of `org.banger.Job` signals, the live stage
//! display, and the final [`JobReport`].

use std::io::{IsTerminal, Write};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use banger_dbus::{StageTiming, job_state};
use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{MatchRule, Message, MessageStream, OwnedObjectPath};

use crate::client::Client;
use crate::exit::{Failure, Kind, RemoteError};

/// Every job object lives under this path.
const JOB_NAMESPACE: &str = "/org/banger/Manager/job";

/// Check on the job when no signal came for this long.
const POLL_AFTER: Duration = Duration::from_secs(3);
/// After Ctrl-C and Cancel, wait this long for `Completed`.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// How long a check on a silent job, or a Cancel after Ctrl-C, may take.
const QUICK_CALL: Duration = Duration::from_secs(10);

/// The stage whose details are a setup script's output lines.
const SETUP_STAGE: &str = "setup";

/// A decoded `org.banger.Job` signal.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// `Progress(s stage, s detail, d fraction)`.
    Progress {
        stage: String,
        detail: String,
        fraction: f64,
    },
    /// `StageFinished(s stage, t duration_usec)`.
    StageFinished { stage: String, duration_usec: u64 },
    /// `Completed(b success, s error_name, s message, o result)`.
    Completed {
        success: bool,
        error_name: String,
        message: String,
        result: String,
    },
}

impl JobEvent {
    /// Decode a signal; `Ok(None)` for members this banger does not know.
    pub fn decode(msg: &Message) -> zbus::Result<Option<Self>> {
        let header = msg.header();
        let Some(member) = header.member() else {
            return Ok(None);
        };
        let body = msg.body();
        Ok(Some(match member.as_str() {
            "Progress" => {
                let (stage, detail, fraction): (String, String, f64) = body.deserialize()?;
                JobEvent::Progress {
                    stage,
                    detail,
                    fraction,
                }
            }
            "StageFinished" => {
                let (stage, duration_usec): (String, u64) = body.deserialize()?;
                JobEvent::StageFinished {
                    stage,
                    duration_usec,
                }
            }
            "Completed" => {
                let (success, error_name, message, result): (
                    bool,
                    String,
                    String,
                    OwnedObjectPath,
                ) = body.deserialize()?;
                JobEvent::Completed {
                    success,
                    error_name,
                    message,
                    result: result.to_string(),
                }
            }
            _ => return Ok(None),
        }))
    }
}

/// Signals of every job of bangerd, subscribed before a job is started so
/// that none is missed.
#[derive(Debug)]
pub struct Subscription {
    stream: MessageStream,
    /// SIGINT, listened for from the moment of subscribing (before the
    /// call), so a Ctrl-C right after the job starts cancels it instead of
    /// killing banger and leaving the job running.
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Subscription {
    /// Add the match rule (sender `org.banger.Manager`, interface
    /// `org.banger.Job`, path namespace of the jobs) on the bus.
    pub async fn new(client: &Client) -> Result<Self, Failure> {
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(banger_dbus::BUS_NAME)
            .interface(banger_dbus::JOB_INTERFACE)
            .path_namespace(JOB_NAMESPACE)
            .build()
            .map_err(Failure::from_zbus)?;
        let stream =
            MessageStream::for_match_rule(rule, client.connection(), NonZeroUsize::new(4096))
                .await
                .map_err(Failure::from_zbus)?;
        let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| {
            Failure::new(Kind::Failed, format!("cannot listen for Ctrl-C: {e}"))
        })?;
        Ok(Self {
            stream,
            interrupt: Some(interrupt),
        })
    }

    /// The next event of the job at `path` (other jobs' signals are skipped).
    /// `None` when the connection closed.
    async fn next_for(&mut self, path: &str, verbose: u8) -> Option<JobEvent> {
        loop {
            let msg = match self.stream.next().await? {
                Ok(msg) => msg,
                Err(e) => {
                    if verbose > 0 {
                        eprintln!("banger: skipping a malformed message: {e}");
                    }
                    continue;
                }
            };
            if msg.header().path().map(|p| p.as_str()) != Some(path) {
                continue;
            }
            match JobEvent::decode(&msg) {
                Ok(Some(event)) => return Some(event),
                Ok(None) => {}
                Err(e) => {
                    if verbose > 0 {
                        eprintln!("banger: skipping a job signal banger cannot decode: {e}");
                    }
                }
            }
        }
    }
}

/// Human duration: `850 µs`, `3 ms`, `1.2 s`, `2 min 5 s`, `1 h 3 min`.
pub fn format_duration(usec: u64) -> String {
    const MS: u64 = 1_000;
    const S: u64 = 1_000_000;
    if usec < MS {
        format!("{usec} µs")
    } else if usec < S {
        format!("{} ms", usec / MS)
    } else if usec < 60 * S {
        let tenths = usec / (S / 10);
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else if usec < 3600 * S {
        let secs = usec / S;
        format!("{} min {} s", secs / 60, secs % 60)
    } else {
        let mins = usec / (60 * S);
        format!("{} h {} min", mins / 60, mins % 60)
    }
}

/// Microseconds in a duration, saturating.
pub fn usec(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How a job ended, as `banger` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    /// Object path of the job.
    pub job: String,
    /// Whether it succeeded.
    pub success: bool,
    /// The error it ended with (for failure and cancellation).
    pub error: Option<RemoteError>,
    /// Finished stages with durations.
    pub stages: Vec<StageTiming>,
    /// Wall time from start to completion.
    pub total_usec: u64,
    /// The object the job made (e.g. a kernel), if any.
    pub result: Option<String>,
    /// The last non-empty progress detail seen (e.g. what an update did).
    pub detail: String,
}

impl JobReport {
    /// The error of an unsuccessful job, as a failure (kind from its name).
    pub fn failure(&self) -> Option<Failure> {
        if self.success {
            return None;
        }
        let error = self.error.clone().unwrap_or(RemoteError {
            name: "org.banger.Error.Failed".to_owned(),
            message: String::new(),
        });
        let job = job_label(&self.job);
        let message = if error.message.is_empty() {
            if is_cancelled(&error.name) {
                format!("job {job} was cancelled")
            } else {
                format!("job {job} failed")
            }
        } else if is_cancelled(&error.name) {
            format!("job {job} was cancelled: {}", error.message)
        } else {
            format!("job {job} failed: {}", error.message)
        };
        Some(Failure::new(Kind::of_error_name(&error.name), message).with_name(error.name))
    }
}

fn is_cancelled(error_name: &str) -> bool {
    error_name.rsplit('.').next() == Some("Cancelled")
}

/// `7` for `/org/banger/Manager/job/7`, else the path.
pub fn job_label(path: &str) -> String {
    banger_dbus::parse_job_path(path).map_or_else(|| path.to_owned(), |n| n.to_string())
}

/// Where stage lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Nothing (for `--json`).
    Quiet,
    /// One line per event (not a terminal).
    Lines,
    /// Rewrite the current stage's line in place (a terminal).
    Live,
}

impl Display {
    /// `Quiet` with `--json`, else `Live` on a terminal and `Lines` otherwise.
    pub fn for_stdout(json: bool) -> Self {
        Self::for_stream(json, Stream::Stdout)
    }

    /// [`Display::for_stdout`] for progress written on `stream`.
    pub fn for_stream(json: bool, stream: Stream) -> Self {
        let terminal = match stream {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        if json {
            Display::Quiet
        } else if terminal {
            Display::Live
        } else {
            Display::Lines
        }
    }
}

/// Where progress and a job's summary go: stdout, or stderr when stdout
/// carries something else (the output of `vm run -- CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stream {
    #[default]
    Stdout,
    Stderr,
}

impl Stream {
    /// Write `text` (and a newline it lacks) to the stream and flush.
    pub fn write(self, text: &[u8]) -> std::io::Result<()> {
        fn to(out: &mut dyn Write, text: &[u8]) -> std::io::Result<()> {
            out.write_all(text)?;
            out.flush()
        }
        match self {
            Stream::Stdout => to(&mut std::io::stdout().lock(), text),
            Stream::Stderr => to(&mut std::io::stderr().lock(), text),
        }
    }
}

/// A 20-cell bar with the percentage, e.g. `[#####---------------]  25%`.
pub fn bar(fraction: f64) -> String {
    const CELLS: usize = 20;
    let fraction = fraction.clamp(0.0, 1.0);
    let full = (fraction * CELLS as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(full),
        "-".repeat(CELLS - full),
        fraction * 100.0
    )
}

/// The state of a followed job and its display. Pure apart from writing
/// lines to `out`, so it is tested with a buffer.
#[derive(Debug)]
pub struct Tracker {
    path: String,
    display: Display,
    current: Option<String>,
    /// Whether a live (unterminated) line is on screen.
    live_line: bool,
    stages: Vec<StageTiming>,
    completed: Option<(bool, Option<RemoteError>)>,
    /// The object the job made (`Completed`'s result), if any.
    result: Option<String>,
    /// The last non-empty progress detail.
    detail: String,
    /// Where it writes.
    stream: Stream,
}

impl Tracker {
    /// A tracker for `path` that already knows `stages` (from the `Stages` property).
    pub fn new(path: &str, display: Display, stages: Vec<StageTiming>) -> Self {
        Self {
            path: path.to_owned(),
            display,
            current: None,
            live_line: false,
            stages,
            completed: None,
            result: None,
            detail: String::new(),
            stream: Stream::Stdout,
        }
    }

    /// The same, writing on `stream`.
    pub fn on(mut self, stream: Stream) -> Self {
        self.stream = stream;
        self
    }

    /// Where it writes.
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// [`Tracker::clear`] on its stream; a closed one is ignored.
    pub fn clear_out(&mut self) {
        let mut text = Vec::new();
        let _ = self.clear(&mut text);
        let _ = self.stream.write(&text);
    }

    /// Whether `Completed` was seen.
    pub fn is_done(&self) -> bool {
        self.completed.is_some()
    }

    /// Record one event and print what it changes. The state is updated
    /// even when writing fails (a closed stdout must not lose `Completed`).
    pub fn apply(&mut self, event: JobEvent, out: &mut dyn Write) -> std::io::Result<()> {
        let text = self.update(event);
        if text.is_empty() {
            return Ok(());
        }
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// Update the state; returns what to print.
    fn update(&mut self, event: JobEvent) -> String {
        let mut text = String::new();
        match event {
            JobEvent::Progress {
                stage,
                detail,
                fraction,
            } => {
                if !detail.is_empty() {
                    self.detail.clone_from(&detail);
                }
                let new_stage = self.current.as_deref() != Some(stage.as_str());
                // A setup script's output: every line, as it comes.
                let output = stage == SETUP_STAGE && !detail.is_empty();
                match self.display {
                    Display::Quiet => {}
                    Display::Lines => {
                        if new_stage {
                            text.push_str(&format!("→ {stage}\n"));
                        }
                        if output {
                            text.push_str(&format!("  {detail}\n"));
                        }
                    }
                    Display::Live if output => {
                        self.end_live_line(&mut text);
                        text.push_str(&format!("  {detail}\n\x1b[2K→ {stage}"));
                        self.live_line = true;
                    }
                    Display::Live => {
                        text.push_str(&format!("\r\x1b[2K→ {stage}"));
                        if fraction > 0.0 && fraction <= 1.0 {
                            text.push_str(&format!(" {}", bar(fraction)));
                        }
                        if !detail.is_empty() {
                            text.push_str(": ");
                            text.push_str(&detail);
                        }
                        self.live_line = true;
                    }
                }
                self.current = Some(stage);
            }
            JobEvent::StageFinished {
                stage,
                duration_usec,
            } => {
                if self.display != Display::Quiet {
                    self.end_live_line(&mut text);
                    text.push_str(&format!("✓ {stage}  {}\n", format_duration(duration_usec)));
                }
                if self.current.as_deref() == Some(stage.as_str()) {
                    self.current = None;
                }
                self.stages.push(StageTiming {
                    stage,
                    duration_usec,
                });
            }
            JobEvent::Completed {
                success,
                error_name,
                message,
                result,
            } => {
                if self.display != Display::Quiet {
                    self.end_live_line(&mut text);
                    if !success && let Some(stage) = &self.current {
                        text.push_str(&format!("✗ {stage}\n"));
                    }
                }
                self.current = None;
                let error = (!success).then(|| RemoteError {
                    name: if error_name.is_empty() {
                        "org.banger.Error.Failed".to_owned()
                    } else {
                        error_name
                    },
                    message,
                });
                self.completed = Some((success, error));
                self.result = (result != "/").then_some(result);
            }
        }
        text
    }

    fn end_live_line(&mut self, text: &mut String) {
        if self.live_line {
            text.push_str("\r\x1b[2K");
            self.live_line = false;
        }
    }

    /// Clear a live line left on screen (before printing anything else).
    pub fn clear(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        let mut text = String::new();
        self.end_live_line(&mut text);
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// The report, once `Completed` was seen.
    pub fn report(&self, total_usec: u64) -> Option<JobReport> {
        let (success, error) = self.completed.clone()?;
        Some(JobReport {
            job: self.path.clone(),
            success,
            error,
            stages: self.stages.clone(),
            total_usec,
            result: self.result.clone(),
            detail: self.detail.clone(),
        })
    }

    /// A report made from what bangerd recorded of a job that ended
    /// without banger seeing its `Completed` signal (`Manager.JobOutcome`).
    pub fn outcome(&self, outcome: banger_dbus::JobOutcome, total_usec: u64) -> JobReport {
        let success = outcome.state == job_state::SUCCEEDED;
        let error = (!success).then_some(RemoteError {
            name: outcome.error_name,
            message: outcome.message,
        });
        let result = (outcome.result.as_str() != "/").then(|| outcome.result.to_string());
        JobReport {
            job: self.path.clone(),
            success,
            error,
            stages: outcome.stages,
            total_usec,
            result,
            detail: self.detail.clone(),
        }
    }

    /// A report made from the job's properties, for a job that ended
    /// without banger seeing its `Completed` signal.
    pub fn ended(&self, state: &str, stages: Vec<StageTiming>, total_usec: u64) -> JobReport {
        let success = state == job_state::SUCCEEDED;
        let error = (!success).then(|| RemoteError {
            name: if state == job_state::CANCELLED {
                "org.banger.Error.Cancelled".to_owned()
            } else {
                "org.banger.Error.Failed".to_owned()
            },
            message: format!("the job ended as {state}; its error message was not received"),
        });
        JobReport {
            job: self.path.clone(),
            success,
            error,
            stages,
            total_usec,
            result: None,
            detail: self.detail.clone(),
        }
    }
}

/// How following ended.
#[derive(Debug)]
pub enum Followed {
    /// The job completed (successfully or not).
    Completed(JobReport),
    /// Ctrl-C: banger asked the job to cancel. `report` is there when the job
    /// completed within the grace period; `cancel_error` when Cancel failed.
    Interrupted {
        report: Option<JobReport>,
        cancel_error: Option<Failure>,
    },
}

/// Follow the job at `path` until it completes, printing stages on the
/// tracker's stream.
/// `started` is when the job started (for the total). Ctrl-C cancels the job.
pub async fn follow(
    client: &Client,
    subscription: &mut Subscription,
    path: &OwnedObjectPath,
    tracker: &mut Tracker,
    started: Instant,
    verbose: u8,
) -> Result<Followed, Failure> {
    let job = job_label(path.as_str());
    let mut interrupt = subscription.interrupt.take();
    let ctrl_c = async {
        match interrupt.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(ctrl_c);
    let mut last_news = Instant::now();
    let mut ended_state: Option<String> = None;
    let mut poll = tokio::time::interval(POLL_AFTER);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;

    loop {
        tokio::select! {
            event = subscription.next_for(path.as_str(), verbose) => {
                let Some(event) = event else {
                    tracker.clear_out();
                    return Err(Failure::new(
                        Kind::Unreachable,
                        format!("lost the connection to the system bus while following job {job}: \
                                 see `banger job show {job}`"),
                    ));
                };
                last_news = Instant::now();
                print_event(tracker, event);
                if let Some(report) = tracker.report(usec(started.elapsed())) {
                    return Ok(Followed::Completed(report));
                }
            }
            _ = &mut ctrl_c => {
                tracker.clear_out();
                return Ok(interrupted(client, subscription, path, tracker, started, verbose).await);
            }
            _ = poll.tick() => {
                if last_news.elapsed() < POLL_AFTER {
                    continue;
                }
                // No news for a while: is the job (and bangerd) still there?
                let Ok(checked) = tokio::time::timeout(QUICK_CALL, client.job_state(path)).await else {
                    if verbose > 0 {
                        eprintln!("banger: bangerd did not say how job {job} is doing; still waiting");
                    }
                    continue;
                };
                match checked {
                    Ok(state) if state == job_state::RUNNING => ended_state = None,
                    Ok(state) => {
                        // Completed is sent right after the state changes;
                        // give it one more period before making do without it.
                        if ended_state.is_some() {
                            tracker.clear_out();
                            let total = usec(started.elapsed());
                            if let Some(outcome) = finished_outcome(client, path).await {
                                return Ok(Followed::Completed(tracker.outcome(outcome, total)));
                            }
                            let stages = client.job_stages(path).await.unwrap_or_default();
                            let report = tracker.ended(&state, stages, total);
                            return Ok(Followed::Completed(report));
                        }
                        ended_state = Some(state);
                    }
                    Err(f) if f.kind() == Kind::NotFound => {
                        tracker.clear_out();
                        // Its object is gone; bangerd's history says how it ended.
                        if let Some(outcome) = finished_outcome(client, path).await {
                            let total = usec(started.elapsed());
                            return Ok(Followed::Completed(tracker.outcome(outcome, total)));
                        }
                        return Err(Failure::new(
                            Kind::Failed,
                            format!("job {job} disappeared before banger saw it complete: \
                                     bangerd may have restarted; see `journalctl -u bangerd`"),
                        ));
                    }
                    Err(f) if f.kind() == Kind::Unreachable => {
                        tracker.clear_out();
                        return Err(Failure::new(
                            Kind::Unreachable,
                            format!("bangerd went away while job {job} was running: \
                                     see `journalctl -u bangerd`"),
                        )
                        .with_source(f));
                    }
                    Err(f) => {
                        if verbose > 0 {
                            eprintln!("banger: cannot check on job {job}: {f}");
                        }
                    }
                }
            }
        }
    }
}

/// The outcome bangerd recorded for the job at `path`, once it has ended.
async fn finished_outcome(
    client: &Client,
    path: &OwnedObjectPath,
) -> Option<banger_dbus::JobOutcome> {
    match tokio::time::timeout(QUICK_CALL, client.job_outcome(path)).await {
        Ok(Ok(outcome)) if outcome.state != job_state::RUNNING => Some(outcome),
        _ => None,
    }
}

fn print_event(tracker: &mut Tracker, event: JobEvent) {
    let mut text = Vec::new();
    let _ = tracker.apply(event, &mut text);
    // A closed stream must not stop the job from being followed.
    let _ = tracker.stream.write(&text);
}

async fn interrupted(
    client: &Client,
    subscription: &mut Subscription,
    path: &OwnedObjectPath,
    tracker: &mut Tracker,
    started: Instant,
    verbose: u8,
) -> Followed {
    let job = job_label(path.as_str());
    eprintln!("banger: interrupted, cancelling job {job}");
    // No prompt here: the user just asked to stop.
    let cancel = client.cancel(path, crate::client::Interaction::NotAllowed);
    let cancelled = match tokio::time::timeout(QUICK_CALL, cancel).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new(
            Kind::Unreachable,
            format!("bangerd did not answer within {} s", QUICK_CALL.as_secs()),
        )),
    };
    if let Err(f) = cancelled {
        return Followed::Interrupted {
            report: None,
            cancel_error: Some(f),
        };
    }
    let wait = async {
        while let Some(event) = subscription.next_for(path.as_str(), verbose).await {
            print_event(tracker, event);
            if tracker.is_done() {
                break;
            }
        }
    };
    let second_ctrl_c = tokio::signal::ctrl_c();
    tokio::select! {
        _ = tokio::time::timeout(CANCEL_GRACE, wait) => {}
        _ = second_ctrl_c => {}
    }
    Followed::Interrupted {
        report: tracker.report(usec(started.elapsed())),
        cancel_error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (usec, text) in [
            (0, "0 µs"),
            (999, "999 µs"),
            (1_000, "1 ms"),
            (3_400, "3 ms"),
            (999_999, "999 ms"),
            (1_000_000, "1.0 s"),
            (1_250_000, "1.2 s"),
            (59_999_999, "59.9 s"),
            (60_000_000, "1 min 0 s"),
            (125_000_000, "2 min 5 s"),
            (3_600_000_000, "1 h 0 min"),
            (3_780_000_000, "1 h 3 min"),
            (u64::MAX, "5124095576 h 1 min"),
        ] {
            assert_eq!(format_duration(usec), text, "{usec}");
        }
    }

    #[test]
    fn a_recorded_outcome_reports_like_the_signal_would() {
        let tracker = Tracker::new("/org/banger/Manager/job/3", Display::Quiet, Vec::new());
        let stages = vec![StageTiming {
            stage: "stop".into(),
            duration_usec: 5,
        }];
        let done = tracker.outcome(
            banger_dbus::JobOutcome {
                state: job_state::SUCCEEDED.into(),
                error_name: String::new(),
                message: String::new(),
                result: banger_dbus::vm_path("abc"),
                stages: stages.clone(),
            },
            9,
        );
        assert!(done.failure().is_none());
        assert_eq!(done.stages, stages);
        assert_eq!(done.result.as_deref(), Some("/org/banger/Manager/vm/abc"));
        let failed = tracker.outcome(
            banger_dbus::JobOutcome {
                state: job_state::FAILED.into(),
                error_name: "org.banger.Error.Busy".into(),
                message: "vm x is starting".into(),
                result: banger_dbus::no_object(),
                stages: Vec::new(),
            },
            9,
        );
        let failure = failed.failure().expect("failed");
        assert!(
            failure.to_string().contains("vm x is starting"),
            "{failure}"
        );
        assert_eq!(failed.result, None);
    }

    fn run(display: Display, events: Vec<JobEvent>) -> (String, Tracker) {
        let mut tracker = Tracker::new("/org/banger/Manager/job/3", display, Vec::new());
        let mut out = Vec::new();
        for event in events {
            tracker.apply(event, &mut out).expect("write to a Vec");
        }
        (String::from_utf8(out).expect("utf-8"), tracker)
    }

    fn progress(stage: &str, detail: &str, fraction: f64) -> JobEvent {
        JobEvent::Progress {
            stage: stage.into(),
            detail: detail.into(),
            fraction,
        }
    }

    fn finished(stage: &str, duration_usec: u64) -> JobEvent {
        JobEvent::StageFinished {
            stage: stage.into(),
            duration_usec,
        }
    }

    fn completed(success: bool, error_name: &str, message: &str) -> JobEvent {
        JobEvent::Completed {
            success,
            error_name: error_name.into(),
            message: message.into(),
            result: "/".into(),
        }
    }

    #[test]
    fn lines_display() {
        let (out, tracker) = run(
            Display::Lines,
            vec![
                progress("integrity-check", "", 0.0),
                progress("integrity-check", "page 3", 0.5),
                finished("integrity-check", 3_000),
                progress("checkpoint", "", 0.0),
                finished("checkpoint", 1_200_000),
                completed(true, "", ""),
            ],
        );
        assert_eq!(
            out,
            "→ integrity-check\n✓ integrity-check  3 ms\n→ checkpoint\n✓ checkpoint  1.2 s\n"
        );
        let report = tracker.report(1_300_000).expect("completed");
        assert!(report.success);
        assert_eq!(report.error, None);
        assert_eq!(report.stages.len(), 2);
        assert_eq!(report.stages[1].duration_usec, 1_200_000);
        assert!(report.failure().is_none());
    }

    #[test]
    fn a_setup_scripts_output_is_shown_line_by_line() {
        let events = || {
            vec![
                progress("setup", "", 0.95),
                progress("setup", "installing", 0.95),
                progress("setup", "done", 0.95),
                finished("setup", 2_000_000),
                completed(true, "", ""),
            ]
        };
        let (out, _) = run(Display::Lines, events());
        assert_eq!(out, "→ setup\n  installing\n  done\n✓ setup  2.0 s\n");
        let (out, _) = run(Display::Live, events());
        assert!(
            out.contains("  installing\n") && out.contains("  done\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_failed_job_marks_its_stage_and_exits_with_its_error() {
        let (out, tracker) = run(
            Display::Lines,
            vec![
                progress("check integrity", "", 0.0),
                finished("check integrity", 3_000),
                progress("checkpoint", "", 0.25),
                completed(
                    false,
                    "org.banger.Error.Busy",
                    "the store is locked by a migration: retry in a minute",
                ),
            ],
        );
        assert_eq!(
            out,
            "→ check integrity\n✓ check integrity  3 ms\n→ checkpoint\n✗ checkpoint\n"
        );
        let report = tracker.report(1_500_000).expect("completed");
        assert_eq!(report.stages.len(), 1);
        let failure = report.failure().expect("a failure");
        assert_eq!(failure.kind().code(), crate::exit::BUSY);
        assert_eq!(failure.name(), "org.banger.Error.Busy");
        assert_eq!(
            failure.to_string(),
            "job 3 failed: the store is locked by a migration: retry in a minute"
        );
        assert_eq!(
            crate::output::job_report_human(&report),
            "job 3 ended after 1.5 s"
        );
    }

    #[test]
    fn a_job_that_ended_unseen_is_reported_from_its_state() {
        let tracker = Tracker::new("/org/banger/Manager/job/3", Display::Lines, Vec::new());
        let stages = vec![StageTiming {
            stage: "checkpoint".into(),
            duration_usec: 10,
        }];
        let report = tracker.ended(job_state::SUCCEEDED, stages.clone(), 20);
        assert!(report.success && report.failure().is_none());
        assert_eq!(report.stages, stages);
        let failure = tracker
            .ended(job_state::CANCELLED, Vec::new(), 20)
            .failure()
            .expect("a failure");
        assert_eq!(failure.name(), "org.banger.Error.Cancelled");
        assert_eq!(failure.kind().code(), crate::exit::FAILURE);
        assert!(failure.message().starts_with("job 3 was cancelled: "));
        let failure = tracker
            .ended(job_state::FAILED, Vec::new(), 20)
            .failure()
            .expect("a failure");
        assert_eq!(failure.name(), "org.banger.Error.Failed");
    }

    #[test]
    fn bars_fill_with_the_fraction() {
        assert_eq!(bar(0.0), "[--------------------]   0%");
        assert_eq!(bar(0.5), "[##########----------]  50%");
        assert_eq!(bar(1.0), "[####################] 100%");
        assert_eq!(bar(7.0), bar(1.0));
    }

    #[test]
    fn live_display_rewrites_the_line() {
        let (out, _) = run(
            Display::Live,
            vec![
                progress("vacuum", "copying", 0.25),
                finished("vacuum", 2_000),
                progress("checkpoint", "", 0.0),
                completed(
                    false,
                    "org.banger.Error.Busy",
                    "store is locked: retry later",
                ),
            ],
        );
        assert_eq!(
            out,
            "\r\x1b[2K→ vacuum [#####---------------]  25%: copying\r\x1b[2K✓ vacuum  2 ms\n\
             \r\x1b[2K→ checkpoint\r\x1b[2K✗ checkpoint\n"
        );
    }

    #[test]
    fn quiet_display_prints_nothing_and_reports_failure() {
        let (out, tracker) = run(
            Display::Quiet,
            vec![
                progress("checkpoint", "", 0.0),
                finished("checkpoint", 10),
                completed(
                    false,
                    "org.banger.Error.Busy",
                    "store is locked: retry later",
                ),
            ],
        );
        assert_eq!(out, "");
        let report = tracker.report(20).expect("completed");
        assert!(!report.success);
        let failure = report.failure().expect("a failure");
        assert_eq!(failure.kind(), Kind::Busy);
        assert_eq!(failure.name(), "org.banger.Error.Busy");
        assert_eq!(
            failure.message(),
            "job 3 failed: store is locked: retry later"
        );
    }

    #[test]
    fn cancelled_jobs() {
        let (_, tracker) = run(
            Display::Quiet,
            vec![completed(
                false,
                "org.banger.Error.Cancelled",
                "cancelled by uid 0",
            )],
        );
        let failure = tracker
            .report(1)
            .and_then(|r| r.failure())
            .expect("a failure");
        assert_eq!(failure.kind(), Kind::Failed);
        assert_eq!(failure.message(), "job 3 was cancelled: cancelled by uid 0");
    }

    #[test]
    fn missing_error_name_is_a_failure() {
        let (_, tracker) = run(Display::Quiet, vec![completed(false, "", "")]);
        let failure = tracker
            .report(1)
            .and_then(|r| r.failure())
            .expect("a failure");
        assert_eq!(failure.name(), "org.banger.Error.Failed");
        assert_eq!(failure.message(), "job 3 failed");
    }

    /// A writer that always fails, like a closed pipe.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn closed_output_loses_no_state() {
        let mut tracker = Tracker::new("/org/banger/Manager/job/3", Display::Lines, Vec::new());
        assert!(tracker.apply(progress("a", "", 0.0), &mut Closed).is_err());
        assert!(tracker.apply(finished("a", 5), &mut Closed).is_err());
        let _ = tracker.apply(completed(true, "", ""), &mut Closed);
        let report = tracker
            .report(9)
            .expect("completed despite the closed output");
        assert!(report.success);
        assert_eq!(report.stages.len(), 1);
    }

    #[test]
    fn not_done_until_completed() {
        let (_, tracker) = run(Display::Quiet, vec![finished("a", 1)]);
        assert!(!tracker.is_done());
        assert!(tracker.report(1).is_none());
    }

    #[test]
    fn decode_signals() {
        let path = "/org/banger/Manager/job/3";
        let signal = |member: &'static str| {
            zbus::message::Message::signal(path, banger_dbus::JOB_INTERFACE, member)
        };
        let msg = signal("Progress")
            .build(&("checkpoint", "", 0.5f64))
            .expect("message");
        assert_eq!(
            JobEvent::decode(&msg).expect("decodes"),
            Some(progress("checkpoint", "", 0.5))
        );
        let msg = signal("StageFinished")
            .build(&("checkpoint", 42u64))
            .expect("message");
        assert_eq!(
            JobEvent::decode(&msg).expect("decodes"),
            Some(finished("checkpoint", 42))
        );
        let msg = signal("Completed")
            .build(&(
                false,
                "org.banger.Error.Failed",
                "broken",
                banger_dbus::no_object(),
            ))
            .expect("message");
        assert_eq!(
            JobEvent::decode(&msg).expect("decodes"),
            Some(completed(false, "org.banger.Error.Failed", "broken"))
        );
        let msg = signal("SomethingNew").build(&(1u32,)).expect("message");
        assert_eq!(JobEvent::decode(&msg).expect("decodes"), None);
        let msg = signal("Progress").build(&(1u32,)).expect("message");
        assert!(JobEvent::decode(&msg).is_err());
    }
}
