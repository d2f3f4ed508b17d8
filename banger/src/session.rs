//! What the commands share: reaching the daemon ([`connect`]), the polkit
//! agent around one mutating call ([`Authorization`]), following a job to
//! its end and reporting it ([`follow_and_report`]), and turning a user's
//! reference into one object's id ([`kernel_id`], [`image_id`]).

use std::time::Instant;

use zbus::OwnedObjectPath;

use crate::artifacts;
use crate::cli::Options;
use crate::client::{Client, Interaction};
use crate::exit::{self, Failure, Kind};
use crate::output::{self, emit_json};
use crate::polkit_agent::{self, Agent};
use crate::progress::{self, Followed, JobReport, Subscription, Tracker};

/// The id of the kernel `reference` names (see [`artifacts::resolve`]).
pub async fn kernel_id(client: &Client, reference: &str) -> Result<String, Failure> {
    let catalog = client.catalog().await?;
    artifacts::resolve(&catalog.kernels, reference, "kernel").map(|k| k.id.clone())
}

/// The id of the image `reference` names (see [`artifacts::resolve`]).
pub async fn image_id(client: &Client, reference: &str) -> Result<String, Failure> {
    let catalog = client.catalog().await?;
    artifacts::resolve(&catalog.images, reference, "image").map(|i| i.id.clone())
}

/// A line on stderr with `-v`.
pub fn note(opts: Options, message: &str) {
    if opts.verbose > 0 {
        eprintln!("banger: {message}");
    }
}

pub async fn connect(opts: Options) -> Result<Client, Failure> {
    note(
        opts,
        &format!(
            "connecting to the system bus at {}",
            crate::client::system_bus_address()
        ),
    );
    Client::connect().await
}

/// The authentication agent for one mutating call, and how to make the call.
pub struct Authorization {
    pub interaction: Interaction,
    agent: Option<Agent>,
    /// Why no agent runs although the user could have been asked.
    no_agent: Option<String>,
}

impl Authorization {
    /// Start pkttyagent when banger may prompt (a terminal, no `--no-ask-password`).
    pub async fn prepare(opts: Options) -> Self {
        if !polkit_agent::can_prompt(opts.ask_password) {
            note(
                opts,
                "not asking for a password (--no-ask-password, or not on a terminal)",
            );
            return Self {
                interaction: Interaction::NotAllowed,
                agent: None,
                no_agent: None,
            };
        }
        match Agent::start().await {
            Ok(agent) => {
                note(opts, "started pkttyagent so polkit can ask for a password");
                Self {
                    interaction: Interaction::Allowed,
                    agent: Some(agent),
                    no_agent: None,
                }
            }
            Err(why) => {
                note(opts, &format!("no authentication agent: {why}"));
                // A session agent (desktop) may still answer the prompt.
                Self {
                    interaction: Interaction::Allowed,
                    agent: None,
                    no_agent: Some(why),
                }
            }
        }
    }

    /// Stop the agent, and explain a permission failure that may come from
    /// the missing agent.
    pub async fn finish<T>(self, result: Result<T, Failure>) -> Result<T, Failure> {
        if let Some(agent) = self.agent {
            agent.stop().await;
        }
        if let (Err(f), Some(why)) = (&result, &self.no_agent)
            && f.kind() == Kind::Permission
        {
            eprintln!("banger: note: no password prompt was possible: {why}");
        }
        result
    }
}

pub async fn follow_and_report(
    client: &Client,
    subscription: &mut Subscription,
    path: &OwnedObjectPath,
    mut tracker: Tracker,
    started: Instant,
    opts: Options,
) -> anyhow::Result<u8> {
    let followed = progress::follow(
        client,
        subscription,
        path,
        &mut tracker,
        started,
        opts.verbose,
    )
    .await?;
    match followed {
        Followed::Completed(report) => report_job_on(&report, opts, tracker.stream()),
        other => report_followed(path, other, opts),
    }
}

/// Print how following a job ended and pick the exit code.
pub fn report_followed(
    path: &OwnedObjectPath,
    followed: Followed,
    opts: Options,
) -> anyhow::Result<u8> {
    match followed {
        Followed::Completed(report) => report_job(&report, opts),
        Followed::Interrupted {
            report,
            cancel_error,
        } => {
            let job = progress::job_label(path.as_str());
            let message = match (&report, &cancel_error) {
                (_, Some(_)) => format!(
                    "interrupted: could not cancel job {job}, it keeps running: \
                     see `banger job show {job}`"
                ),
                (Some(r), None) if r.success => {
                    format!("interrupted: job {job} had already finished")
                }
                (Some(_), None) => format!("interrupted: job {job} was cancelled"),
                (None, None) => {
                    format!("interrupted: asked job {job} to cancel; see `banger job show {job}`")
                }
            };
            let failure = Failure::new(Kind::Interrupted, message);
            let failure = match cancel_error {
                Some(e) => failure.with_source(e),
                None => failure,
            };
            match report {
                Some(report) if opts.json => {
                    // One JSON object on stdout: the job's.
                    emit_json(&output::job_report_json(&report))?;
                    eprintln!("error: {failure}");
                    Ok(exit::INTERRUPTED)
                }
                _ => Err(failure.into()),
            }
        }
    }
}

/// Print how a job ended; its error becomes the exit code (also when
/// stdout is gone: the job's result matters more than the printing).
pub fn report_job(report: &JobReport, opts: Options) -> anyhow::Result<u8> {
    report_job_on(report, opts, progress::Stream::Stdout)
}

/// [`report_job`], its human summary on `stream` (JSON always goes to
/// stdout).
pub fn report_job_on(
    report: &JobReport,
    opts: Options,
    stream: progress::Stream,
) -> anyhow::Result<u8> {
    let printed = if opts.json {
        emit_json(&output::job_report_json(report))
    } else {
        let mut text = output::job_report_human(report);
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        stream.write(text.as_bytes())
    };
    match report.failure() {
        // The JSON object already carries the error: one object on stdout.
        Some(f) if opts.json => {
            eprintln!("error: {f}");
            Ok(f.kind().code())
        }
        Some(f) => Err(f.into()),
        None => {
            printed?;
            Ok(exit::OK)
        }
    }
}
