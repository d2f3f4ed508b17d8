//! Signed self-update (`Manager.Update`, action `org.banger.update`).
//!
//! An update fetches the channel's `manifest.json` and its minisign
//! signature, verifies them against the release key built into this binary
//! (plus `update.extra_keys` from a root-owned configuration), refuses
//! anything not newer than the running version, downloads every artifact
//! into a staging directory beside the releases (size and SHA-256 checked
//! while streaming), moves the set into place and swaps the `current`
//! link ([`banger_release::Releases`]). Until that last rename nothing the
//! binaries run from has changed. The daemon then asks systemd to restart
//! it; VMs run in their own units and are not touched.

mod fetch;
mod manifest;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_release::signed::PublicKey;
use banger_release::{ReleaseError, Releases, Version};

pub use fetch::{Fetcher, channel_url, hex, is_loopback};
pub use manifest::{Artifact, MAX_ARTIFACT_BYTES, Manifest, Verified, parse_key, verify};

use crate::auth::Authorizer;
use crate::auth::{Action, BoxFuture, Caller};
use crate::channel::ChannelError;
use crate::config::SharedConfig;
use crate::error::{Error, Result};
use crate::jobs::Jobs;
use crate::jobs::{JobContext, JobId};

/// Largest `manifest.json` accepted.
const MANIFEST_LIMIT: usize = 256 << 10;
/// Largest signature file accepted.
const SIGNATURE_LIMIT: usize = 4 << 10;

/// Why an update was refused or failed. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The channel's URL or keys are not acceptable.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The job itself stopped (cancelled): passed through as it is.
    #[error("{0}")]
    Job(Box<Error>),
    /// No HTTP client: most likely no trusted CA certificates.
    #[error("cannot set up HTTPS ({0}); is the ca-certificates package installed?")]
    Http(String),
    /// The server has no such file.
    #[error("cannot fetch {url}: the server answered 404 Not Found")]
    Missing {
        /// What was fetched.
        url: String,
    },
    /// A download failed.
    #[error("cannot fetch {url}: {why}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// Why it failed.
        why: String,
    },
    /// The server stopped sending.
    #[error("{url} sent nothing for {secs} s; the server stalled, try again later")]
    Stalled {
        /// What was fetched.
        url: String,
        /// The stall timeout.
        secs: u64,
    },
    /// No trusted key verifies the manifest.
    #[error(
        "the release manifest's signature does not verify with banger's release key ({0}); it was not published by banger or it was altered, so nothing was installed"
    )]
    Signature(String),
    /// The signed version and the manifest's disagree.
    #[error(
        "the signature vouches for version {signed:?} but the manifest says {manifest:?}; refusing a manifest passed off as another release"
    )]
    VersionMismatch {
        /// `version:` of the trusted comment.
        signed: String,
        /// The manifest's `version`.
        manifest: String,
    },
    /// The manifest is malformed.
    #[error("the release manifest is invalid: {0}")]
    Manifest(String),
    /// The channel offers an older release.
    #[error(
        "the channel offers {available}, older than the running {running}; refusing a downgrade (`banger update --rollback` returns to the previous set)"
    )]
    Downgrade {
        /// Offered.
        available: Version,
        /// Running.
        running: Version,
    },
    /// The channel offers the running release.
    #[error("banger {0} is already running; nothing to update")]
    Current(Version),
    /// An artifact ended early.
    #[error("{name}: the download stopped after {got} of {expected} bytes; try again")]
    Truncated {
        /// Artifact.
        name: String,
        /// Promised size.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// An artifact is larger than promised.
    #[error("{name}: more than the {expected} bytes it was signed for ({got}); refusing it")]
    TooLarge {
        /// Artifact.
        name: String,
        /// Promised size.
        expected: u64,
        /// Received or announced.
        got: u64,
    },
    /// An artifact's digest is wrong.
    #[error(
        "{name}: SHA-256 {got} does not match the signed {expected}; the file was altered or corrupted, nothing was installed"
    )]
    Digest {
        /// Artifact.
        name: String,
        /// From the manifest.
        expected: String,
        /// Computed.
        got: String,
    },
    /// Nothing to roll back to.
    #[error("no update is installed, so there is nothing to roll back to")]
    NothingToRollBack,
    /// The releases directory.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A local file operation.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<UpdateError> for Error {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Job(e) => *e,
            UpdateError::Channel(e) => e.into(),
            UpdateError::Http(_) => Error::unavailable(e.to_string()),
            UpdateError::Fetch { .. }
            | UpdateError::Missing { .. }
            | UpdateError::Stalled { .. } => Error::unavailable(e.to_string()),
            _ => Error::failed(e.to_string()),
        }
    }
}

/// What `Manager.Update` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateRequest {
    /// Report what the channel offers; change nothing.
    Check {
        /// Channel URL instead of `update.channel`.
        channel: Option<String>,
    },
    /// Install the channel's release when it is newer.
    Install {
        /// Channel URL instead of `update.channel`.
        channel: Option<String>,
    },
    /// Go back to the set before the last update.
    Rollback,
}

/// Restarts the daemon once an update or rollback is in place.
pub trait Restart: Send + Sync + std::fmt::Debug {
    /// Ask for a restart; `Ok(false)` when no service manager can do it
    /// (the daemon was started by hand).
    fn restart(&self) -> BoxFuture<'_, std::result::Result<bool, String>>;
}

/// No service manager: updates ask for a restart by hand.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRestart;

impl Restart for NoRestart {
    fn restart(&self) -> BoxFuture<'_, std::result::Result<bool, String>> {
        Box::pin(async { Ok(false) })
    }
}

pub use crate::channel::trusted_keys;
pub use banger_release::running_version;

/// Removes a staging directory unless the release was committed.
struct StagingGuard(Option<PathBuf>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl From<crate::blocking::Lost> for UpdateError {
    fn from(lost: crate::blocking::Lost) -> Self {
        UpdateError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(lost.0),
        }
    }
}

/// [`crate::blocking::run`] with an update's errors.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, UpdateError> + Send + 'static,
) -> std::result::Result<T, UpdateError> {
    crate::blocking::run(f).await
}

/// Begin a job stage; a cancelled job stops here.
async fn stage(
    ctx: &JobContext,
    name: &str,
    fraction: f64,
) -> std::result::Result<(), UpdateError> {
    ctx.stage(name, fraction)
        .await
        .map_err(|e| UpdateError::Job(Box::new(e)))
}

/// Fetch and verify the channel's manifest.
async fn fetch_manifest(
    ctx: &JobContext,
    fetcher: &Fetcher,
    channel: &reqwest::Url,
    keys: &[PublicKey],
) -> std::result::Result<Verified, UpdateError> {
    let url = |p: &str| {
        channel.join(p).map_err(|e| ChannelError::Url {
            url: channel.to_string(),
            why: e.to_string(),
        })
    };
    let manifest = fetcher
        .small(&url("manifest.json")?, MANIFEST_LIMIT)
        .await?;
    let signature = fetcher
        .small(&url("manifest.json.minisig")?, SIGNATURE_LIMIT)
        .await?;
    let signature = String::from_utf8(signature)
        .map_err(|_| UpdateError::Signature("the signature file is not text".into()))?;
    stage(ctx, "verify signature", 0.1).await?;
    verify(&manifest, &signature, keys)
}

/// Download, check and install `release`; returns once `current` points
/// at it.
async fn install(
    ctx: &JobContext,
    fetcher: &Fetcher,
    channel: &reqwest::Url,
    releases: &Releases,
    release: &Verified,
) -> std::result::Result<(), UpdateError> {
    let total: u64 = release.artifacts.iter().map(|a| a.size).sum();
    let staging = releases.staging(&release.version);
    {
        let releases = releases.clone();
        let staging = staging.clone();
        blocking(move || {
            releases.create()?;
            releases.prune()?;
            let _ = std::fs::remove_dir_all(&staging);
            // Readable by users, whatever bangerd's umask: they run it.
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&staging)
                .and_then(|()| {
                    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|source| UpdateError::Io {
                    path: staging.clone(),
                    source,
                })
        })
        .await?;
    }
    let mut guard = StagingGuard(Some(staging.clone()));
    let mut done = 0u64;
    for artifact in &release.artifacts {
        stage(
            ctx,
            &format!("download {}", artifact.name),
            0.15 + 0.75 * done as f64 / total as f64,
        )
        .await?;
        let url = channel
            .join(&artifact.path)
            .map_err(|e| ChannelError::Url {
                url: channel.to_string(),
                why: e.to_string(),
            })?;
        let base = done;
        fetcher
            .artifact(
                &artifact.name,
                &url,
                &staging.join(&artifact.name),
                artifact.size,
                &artifact.sha256,
                |got| {
                    let fraction = 0.15 + 0.75 * (base + got) as f64 / total as f64;
                    ctx.progress(
                        &format!("{} of {} bytes", base + got, total),
                        fraction,
                        Some(base + got),
                    );
                },
            )
            .await?;
        done += artifact.size;
    }
    stage(ctx, "install", 0.9).await?;
    let version = release.version.clone();
    let releases = releases.clone();
    // Each artifact was synced once its digest matched.
    blocking(move || {
        releases.commit(&version)?;
        releases.activate(&version)?;
        releases.prune()?;
        Ok(())
    })
    .await?;
    guard.0 = None;
    Ok(())
}

/// Releases: check, install and roll back banger itself. Owns what that
/// needs and nothing else; the daemon root builds it and the front end
/// calls it.
#[derive(Debug)]
pub struct Updates {
    /// The configuration in force (channel, keys, timeouts).
    pub config: SharedConfig,
    /// The configuration file: extra keys count only when root owns it.
    pub config_file: PathBuf,
    /// The state directory (catalogs fetched with a release).
    pub state: PathBuf,
    /// Decides who may update.
    pub authorizer: Arc<dyn Authorizer>,
    /// Where releases are installed.
    pub releases: Releases,
    /// Restarts the daemon after an install or rollback.
    pub restart: Arc<dyn Restart>,
    /// Runs the update as a job.
    pub jobs: Arc<Jobs>,
}

impl Updates {
    /// Check for, install, or roll back a release, as a job (action
    /// `org.banger.update`). The job's last detail says what happened.
    pub async fn update(&self, caller: &Caller, request: UpdateRequest) -> Result<JobId> {
        self.authorizer.authorize(caller, Action::Update).await?;
        let config = self.config.get();
        let channel = match &request {
            UpdateRequest::Check { channel } | UpdateRequest::Install { channel } => Some(
                channel_url(channel.as_deref().unwrap_or(&config.update.channel))?,
            ),
            UpdateRequest::Rollback => None,
        };
        let keys = trusted_keys(&config.update.extra_keys, &self.config_file)?;
        let fetcher = Fetcher::new(Duration::from_secs(config.update.stall_timeout_secs))?;
        let releases = self.releases.clone();
        let restart = self.restart.clone();
        let state = self.state.clone();
        let running = running_version();
        self.jobs
            .start(
                "update",
                caller.uid,
                Action::Update,
                move |ctx| async move {
                    let to_error = |e: UpdateError| Error::from(e);
                    let Some(channel) = channel else {
                        ctx.stage("roll back", 0.0).await?;
                        let r = releases.clone();
                        let (from, to) = blocking(move || {
                            let from = r.current()?.ok_or(UpdateError::NothingToRollBack)?;
                            Ok((from, r.rollback()?))
                        })
                        .await
                        .map_err(to_error)?;
                        let to =
                            to.map_or_else(|| "the packaged release".to_owned(), |v| v.to_string());
                        tracing::info!(from = %from, to = %to, "rolled back");
                        return finish(&ctx, restart, &format!("rolled back from {from} to {to}"))
                            .await;
                    };
                    ctx.stage("fetch manifest", 0.0).await?;
                    let release = fetch_manifest(&ctx, &fetcher, &channel, &keys)
                        .await
                        .map_err(to_error)?;
                    ctx.stage("refresh catalogs", 0.12).await?;
                    let catalogs = refresh_catalogs(&fetcher, &channel, &keys, &state).await;
                    let available = release.version.clone();
                    if matches!(request, UpdateRequest::Check { .. }) {
                        let detail = if available > running {
                            format!("available {available} (running {running})")
                        } else {
                            format!("up to date {running} (channel has {available})")
                        };
                        ctx.progress(&with_notes(detail, &catalogs), 1.0, None);
                        return Ok(());
                    }
                    if available < running {
                        return Err(to_error(UpdateError::Downgrade { available, running }));
                    }
                    if available == running {
                        return Err(to_error(UpdateError::Current(running)));
                    }
                    install(&ctx, &fetcher, &channel, &releases, &release)
                        .await
                        .map_err(to_error)?;
                    tracing::info!(from = %running, to = %available, "update installed");
                    finish(
                        &ctx,
                        restart,
                        &with_notes(format!("updated from {running} to {available}"), &catalogs),
                    )
                    .await
                },
            )
            .await
    }
}

/// `detail`, then each note, `; `-separated.
fn with_notes(detail: String, notes: &[String]) -> String {
    std::iter::once(detail)
        .chain(notes.iter().cloned())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Offer the channel's catalogs (`catalog/<kind>.json` and its
/// `.minisig`, both optional) to the state directory: a catalog is kept
/// when its signature verifies and its serial is higher than the one in
/// use. Returns notes for the job's detail; a refused catalog does not
/// fail the update.
async fn refresh_catalogs(
    fetcher: &Fetcher,
    channel: &reqwest::Url,
    keys: &[PublicKey],
    state: &Path,
) -> Vec<String> {
    let mut notes = Vec::new();
    for kind in banger_catalog::Kind::ALL {
        let fetched = async {
            let url = |suffix: &str| {
                channel
                    .join(&format!("catalog/{}{suffix}", kind.file_name()))
                    .map_err(|e| ChannelError::Url {
                        url: channel.to_string(),
                        why: e.to_string(),
                    })
            };
            let document = match fetcher.small(&url("")?, banger_catalog::MAX_BYTES).await {
                Ok(d) => d,
                Err(UpdateError::Missing { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let signature = fetcher.small(&url(".minisig")?, SIGNATURE_LIMIT).await?;
            Ok(Some((
                document,
                String::from_utf8_lossy(&signature).into_owned(),
            )))
        }
        .await;
        let note = match fetched {
            Ok(None) => continue,
            Ok(Some((document, signature))) => {
                let (state, keys) = (state.to_owned(), keys.to_vec());
                crate::blocking::value(move || {
                    crate::catalog::offer(&state, kind, &document, &signature, &keys)
                })
                .await
                .map_err(|e| e.0)
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            Err(e) => Err(e.to_string()),
        };
        match note {
            Ok(crate::catalog::Offered::Taken { from, to }) => {
                tracing::info!(catalog = %kind, from, to, "catalog updated");
                notes.push(format!("{kind} catalog serial {from} -> {to}"));
            }
            Ok(crate::catalog::Offered::NotNewer { .. }) => {}
            Err(why) => {
                tracing::warn!(catalog = %kind, "catalog refused: {why}");
                notes.push(format!("kept the {kind} catalog: {why}"));
            }
        }
    }
    notes
}

/// The last stage: ask for a restart shortly after the job has reported
/// (a restart inside the job would cut its `Completed` signal off).
async fn finish(ctx: &JobContext, restart: Arc<dyn Restart>, what: &str) -> Result<()> {
    ctx.stage("restart", 0.95).await?;
    let under_systemd = crate::idle::started_by_systemd();
    if under_systemd {
        ctx.progress(&format!("{what}; bangerd restarts now"), 1.0, None);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match restart.restart().await {
                Ok(true) => tracing::info!("restart requested"),
                Ok(false) => tracing::warn!("no service manager to restart bangerd"),
                Err(e) => tracing::error!("cannot restart bangerd: {e}; restart it by hand"),
            }
        });
    } else {
        ctx.progress(&format!("{what}; restart bangerd to run it"), 1.0, None);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_stage_stays_a_cancellation() {
        let e = Error::from(UpdateError::Job(Box::new(Error::cancelled("cancelled"))));
        assert_eq!(e.kind, crate::error::ErrorKind::Cancelled);
        let e = Error::from(UpdateError::Http("no roots".into()));
        assert!(e.to_string().contains("ca-certificates"), "{e}");
    }
}
