//! `kernel pull` and `image pull` of catalog entries: download the bundle
//! (a dropped connection resumed, size and SHA-256 checked while it
//! streams, progress with rate and ETA), unpack it into a staging
//! directory beside managed storage, and record it; an image's kernel is
//! pulled first when it is missing. A pull of an entry already being
//! pulled joins that job. A failed or cancelled pull leaves nothing: the
//! staging directory goes with the job (and with a restart, see
//! `clean_up_artifacts`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use banger_catalog::{Entry, Kind};

use super::bundle::{self, Layout};
use super::commands::{StagedKernel, TmpDir, already_exists, blocking, place_kernel, ticker};
use super::owner::SYSTEM_UID;
use super::store::{is_fk_violation, is_unique_violation};
use super::{Image, files, images_dir, kernels_dir, validate};
use crate::artifacts::Artifacts;
use crate::auth::{Action, BoxFuture, Caller};
use crate::error::{Error, Result};
use crate::jobs::Resource;
use crate::jobs::{JobContext, JobEvent, JobId, JobState};
use crate::store::unix_us;
use crate::update::Fetcher;

/// How often a running download reports.
const REPORT_EVERY: Duration = Duration::from_millis(250);

fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Kernels => "kernel",
        Kind::Images => "image",
    }
}

impl Artifacts {
    /// Pull the kernel-catalog entry `name` as a job (polkit
    /// `org.banger.image.manage`); joins a pull of it already running.
    pub async fn pull_kernel(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<JobId> {
        self.authorize_pull(caller, Kind::Kernels, name).await?;
        self.start_pull(Kind::Kernels, name, caller.uid).await
    }

    /// Pull the image-catalog entry `name` ("" for `vm.default_image`)
    /// and its kernel when missing, as a job (polkit
    /// `org.banger.image.manage`); joins a pull of it already running.
    pub async fn pull_image(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<JobId> {
        let name = if name.is_empty() {
            self.config().vm.default_image.clone()
        } else {
            name.to_owned()
        };
        self.authorize_pull(caller, Kind::Images, &name).await?;
        self.start_pull(Kind::Images, &name, caller.uid).await
    }

    async fn authorize_pull(&self, caller: &Caller, kind: Kind, name: &str) -> Result<()> {
        self.authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        validate::name(noun(kind), name)
    }

    /// The catalog of `kind` in use, with what is installed here.
    pub async fn available(&self, kind: Kind) -> Result<crate::catalog::Available> {
        let installed: Vec<String> = match kind {
            Kind::Kernels => self.kernels().await?.into_iter().map(|k| k.name).collect(),
            Kind::Images => self.images().await?.into_iter().map(|i| i.name).collect(),
        };
        self.catalogs().available(kind, &installed).await
    }

    /// The usable catalog entry `name` of `kind`.
    pub(crate) async fn catalog_entry(&self, kind: Kind, name: &str) -> Result<Entry> {
        let available = self.available(kind).await?;
        let Some(found) = available.entries.into_iter().find(|a| a.entry.name == name) else {
            return Err(Error::not_found(format!(
                "the {} catalog (serial {}) has no {} {name}; `banger {} list --available` lists what it has, `banger update --check` fetches a newer catalog",
                noun(kind),
                available.serial,
                noun(kind),
                noun(kind)
            )));
        };
        if !found.usable {
            return Err(Error::invalid(format!(
                "{} {name} needs banger {} or newer (this is {}); run `banger update` first",
                noun(kind),
                found.entry.min_banger,
                banger_release::VERSION
            )));
        }
        Ok(found.entry)
    }

    /// The running pull of `key`, after dropping the finished ones from
    /// `pulls` (so the map holds only running pulls).
    pub(crate) fn running_pull(
        &self,
        pulls: &mut std::collections::HashMap<(Kind, String), JobId>,
        key: &(Kind, String),
    ) -> Option<JobId> {
        let jobs = self.jobs();
        pulls.retain(|_, id| jobs.get(*id).is_some_and(|j| !j.state.is_final()));
        pulls.get(key).copied()
    }

    /// Start (or join) the pull of `kind` entry `name` for `uid`; no
    /// authorization here. (Boxed: an image pull starts its kernel's.)
    fn start_pull<'a>(
        self: &'a Arc<Self>,
        kind: Kind,
        name: &'a str,
        uid: u32,
    ) -> BoxFuture<'a, Result<JobId>> {
        Box::pin(async move {
            let mut pulls = self.pulls.lock().await;
            let key = (kind, name.to_owned());
            if let Some(id) = self.running_pull(&mut pulls, &key) {
                tracing::info!(banger_job_id = id, "joining the running pull of {name}");
                return Ok(id);
            }
            let entry = self.catalog_entry(kind, name).await?;
            let exists = {
                let name = name.to_owned();
                self.on_store("reading the store failed", move |s| {
                    Ok(match kind {
                        Kind::Kernels => s.kernel_by_name(&name)?.is_some(),
                        Kind::Images => s.image_by_name(&name)?.is_some(),
                    })
                })
                .await?
            };
            if exists {
                return Err(already_exists(noun(kind), name));
            }
            let core = self.clone();
            let id = match kind {
                Kind::Kernels => {
                    self.jobs()
                        .start_with_result(
                            "kernel-pull",
                            uid,
                            Action::ImageManage,
                            move |ctx| async move { core.pull_kernel_job(&ctx, entry).await },
                        )
                        .await?
                }
                Kind::Images => {
                    self.jobs()
                        .start_with_result(
                            "image-pull",
                            uid,
                            Action::ImageManage,
                            move |ctx| async move { core.pull_image_job(&ctx, entry, uid).await },
                        )
                        .await?
                }
            };
            pulls.insert(key, id);
            Ok(id)
        })
    }

    /// Download `entry`'s bundle to `to`, reporting bytes, rate and ETA
    /// onto `[from, until)` of the job.
    async fn download(
        &self,
        ctx: &JobContext,
        entry: &Entry,
        to: &Path,
        from: f64,
        until: f64,
    ) -> Result<()> {
        ctx.stage("download", from).await?;
        let max_gib = self.config().limits.image_max_gib;
        if entry.size > max_gib.saturating_mul(1 << 30) {
            return Err(Error::limit(format!(
                "bundle {} is {} bytes, more than the {max_gib} GiB a pull may bring here (limits.image_max_gib)",
                entry.name, entry.size
            )));
        }
        if let Some(dir) = to.parent() {
            crate::space::check_room(dir, entry.size, &format!("bundle {}", entry.name))?;
        }
        let url = reqwest::Url::parse(&entry.url)
            .map_err(|e| Error::invalid(format!("bad bundle URL {}: {e}", entry.url)))?;
        let stall = Duration::from_secs(self.config().update.stall_timeout_secs);
        let fetcher = Fetcher::new(stall)?;
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        let size = entry.size;
        let report = |got: u64| {
            if got < size && last.is_some_and(|l| l.elapsed() < REPORT_EVERY) {
                return;
            }
            last = Some(Instant::now());
            let share = got as f64 / size as f64;
            ctx.progress(
                &download_detail(got, size, started.elapsed()),
                from + (until - from) * share,
                Some(got),
            );
        };
        fetcher
            .artifact(&entry.name, &url, to, size, &entry.sha256, report)
            .await?;
        tracing::info!(
            bundle = %entry.name,
            bytes = size,
            secs = started.elapsed().as_secs_f64(),
            "bundle downloaded"
        );
        Ok(())
    }

    async fn pull_kernel_job(&self, ctx: &JobContext, entry: Entry) -> Result<Option<Resource>> {
        let id = super::new_id().map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        let state = self.state.clone();
        let tmp = TmpDir::create(kernels_dir(&state).join(format!(".tmp-{id}")))?;
        let archive = tmp.path().join(".bundle.tar.zst");
        self.download(ctx, &entry, &archive, 0.0, 0.6).await?;

        ctx.stage("unpack", 0.6).await?;
        let dir = tmp.path().to_owned();
        let mut tick = ticker(ctx, "unpack", 0, 0.6, 0.8);
        let top = blocking(move || {
            let top = bundle::unpack(&archive, &dir, Layout::Kernel, &mut tick)?;
            std::fs::remove_file(&archive)
                .map_err(|e| Error::failed(format!("cannot remove the bundle: {e}")))?;
            Ok(top)
        })
        .await?;

        ctx.stage("check vmlinux", 0.8).await?;
        let dir = tmp.path().to_owned();
        let (is_bzimage, version) = blocking(move || {
            let shipped = if top.iter().any(|t| t == "vmlinuz") {
                dir.join("vmlinuz")
            } else {
                dir.join("vmlinux")
            };
            place_kernel(&dir, &shipped)
        })
        .await?;
        let has = |name: &str| tmp.path().join(name).exists();
        let staged = StagedKernel {
            id,
            name: entry.name.clone(),
            version: if version.is_empty() {
                entry.version.clone()
            } else {
                version
            },
            is_bzimage,
            initrd: has("initrd.img"),
            modules: has("modules"),
            // Vouched for by the catalog's signature, not the caller.
            uid: SYSTEM_UID,
        };
        self.record_kernel(ctx, tmp, staged).await
    }

    /// Waits for the job `id` (a pull or build, `doing` says which) of
    /// kernel `name`, mirroring its progress, and returns the kernel's id.
    pub(super) async fn await_kernel_job(
        &self,
        ctx: &JobContext,
        id: JobId,
        name: &str,
        doing: &str,
    ) -> Result<String> {
        loop {
            ctx.check_cancelled()?;
            let Some(job) = self.jobs().get(id) else {
                break;
            };
            match job.state {
                JobState::Running => {
                    if !job.detail.is_empty() {
                        ctx.progress(
                            &format!("kernel {name}: {}", job.detail),
                            0.3 * job.progress,
                            None,
                        );
                    }
                }
                JobState::Succeeded => break,
                JobState::Failed | JobState::Cancelled => {
                    let why = job
                        .error
                        .map_or_else(|| job.state.as_str().to_owned(), |e| e.message);
                    return Err(Error::failed(format!(
                        "{doing} kernel {name} failed: {why}"
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.kernel_id(name).await
    }

    /// The id of the kernel named `name`.
    pub(super) async fn kernel_id(&self, name: &str) -> Result<String> {
        let owned = name.to_owned();
        let kernel = self
            .on_store("reading kernels failed", move |s| s.kernel_by_name(&owned))
            .await?;
        kernel
            .filter(|k| k.owner_uid == SYSTEM_UID)
            .map(|k| k.id)
            .ok_or_else(|| Error::failed(format!("kernel {name} is gone after it was made")))
    }

    async fn pull_image_job(
        self: &Arc<Self>,
        ctx: &JobContext,
        entry: Entry,
        uid: u32,
    ) -> Result<Option<Resource>> {
        let kernel_name = entry.kernel.clone().unwrap_or_default();
        let kernel = {
            let name = kernel_name.clone();
            self.on_store("reading kernels failed", move |s| s.kernel_by_name(&name))
                .await?
        };
        let kernel_id = match kernel {
            Some(k) if k.owner_uid == SYSTEM_UID => k.id,
            Some(k) => {
                return Err(Error::failed(format!(
                    "kernel {kernel_name}, which the catalog's image {} boots, belongs to uid {}, not the system; \
                     an administrator must delete it so the catalog's kernel can be pulled",
                    entry.name, k.owner_uid
                )));
            }
            None => {
                ctx.stage(&format!("pull kernel {kernel_name}"), 0.0)
                    .await?;
                match self.start_pull(Kind::Kernels, &kernel_name, uid).await {
                    Ok(job) => {
                        self.await_kernel_job(ctx, job, &kernel_name, "pulling")
                            .await?
                    }
                    // Pulled meanwhile by someone else.
                    Err(e) if e.kind == crate::error::ErrorKind::AlreadyExists => {
                        self.kernel_id(&kernel_name).await?
                    }
                    Err(e) => return Err(e),
                }
            }
        };

        let id = super::new_id().map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        let state = self.state.clone();
        let tmp = TmpDir::create(images_dir(&state).join(format!(".tmp-{id}")))?;
        let archive = tmp.path().join(".bundle.tar.zst");
        self.download(ctx, &entry, &archive, 0.3, 0.7).await?;

        ctx.stage("unpack", 0.7).await?;
        let dir = tmp.path().to_owned();
        let mut tick = ticker(ctx, "unpack", entry.size, 0.7, 0.8);
        let meta = blocking(move || {
            bundle::unpack(&archive, &dir, Layout::Image, &mut tick)?;
            std::fs::remove_file(&archive)
                .map_err(|e| Error::failed(format!("cannot remove the bundle: {e}")))?;
            validate::ext4_image("the bundle's rootfs", &dir.join("rootfs.ext4"))?;
            bundle::image_meta(&dir)
        })
        .await?;
        let services = validate::services(&meta.service_specs())?;
        if let Some(init) = &meta.init {
            validate::init_path(init)?;
        }

        self.record_image(
            ctx,
            tmp,
            StagedImage {
                id,
                name: entry.name.clone(),
                kernel_id,
                kernel_name,
                services,
                init: meta.init,
                // Vouched for by the catalog's signature, not the caller.
                uid: SYSTEM_UID,
            },
        )
        .await
    }
}

/// An image staged in a [`TmpDir`] (`rootfs.ext4`, maybe
/// `work-seed.ext4`), ready to record.
pub(super) struct StagedImage {
    /// Its new id (also the staging directory's suffix).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The kernel it boots with.
    pub kernel_id: String,
    /// That kernel's name, for messages.
    pub kernel_name: String,
    /// Services readiness waits for.
    pub services: Vec<super::Service>,
    /// The init the kernel starts.
    pub init: Option<String>,
    /// Who pulled it.
    pub uid: u32,
}

impl Artifacts {
    /// The last stages of an image pull: make the work-seed when the
    /// staged image has none, digest it, move `tmp` into place and record
    /// the image.
    pub(super) async fn record_image(
        &self,
        ctx: &JobContext,
        tmp: TmpDir,
        i: StagedImage,
    ) -> Result<Option<Resource>> {
        let state = self.state.clone();
        let seed = tmp.path().join("work-seed.ext4");
        if seed.exists() {
            let seed = seed.clone();
            blocking(move || validate::ext4_image("the bundle's work-seed", &seed)).await?;
        } else {
            ctx.stage("make work-seed", 0.8).await?;
            let rootfs = tmp.path().join("rootfs.ext4");
            let dst = seed.clone();
            let tools = self.tools.clone();
            blocking(move || files::make_work_seed(&*tools, &rootfs, &dst)).await?;
        }

        ctx.stage("digest", 0.9).await?;
        let hashed = seed.clone();
        let mut tick = ticker(ctx, "sha256", 0, 0.9, 0.95);
        let work_seed_sha256 = blocking(move || files::sha256_file(&hashed, &mut tick)).await?;

        ctx.stage("record", 0.95).await?;
        let final_dir = images_dir(&state).join(&i.id);
        let rootfs_bytes = std::fs::metadata(tmp.path().join("rootfs.ext4"))
            .map(|m| m.len())
            .unwrap_or(0);
        tmp.persist(&final_dir)?;
        let image = Image {
            id: i.id.clone(),
            name: i.name.clone(),
            managed: true,
            rootfs: final_dir.join("rootfs.ext4"),
            rootfs_bytes,
            work_seed: Some(final_dir.join("work-seed.ext4")),
            work_seed_sha256,
            kernel_id: i.kernel_id.clone(),
            services: i.services,
            init: i.init,
            created_at: unix_us(SystemTime::now()),
            owner_uid: i.uid,
        };
        let row = image.clone();
        let store = self.store().clone();
        let stored = crate::blocking::run(move || store.insert_image(&row)).await;
        if let Err(e) = stored {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(if is_unique_violation(&e) {
                already_exists("image", &i.name)
            } else if is_fk_violation(&e) {
                Error::not_found(format!(
                    "kernel {} was deleted meanwhile; pull the image again",
                    i.kernel_name
                ))
            } else {
                Error::failed_with("recording the image failed", &e)
            });
        }
        tracing::info!(banger_image = %image.name, banger_image_id = %i.id, "image pulled");
        self.publish(JobEvent::ResourceChanged(Resource::Image(i.id.clone())));
        Ok(Some(Resource::Image(i.id)))
    }
}

/// "12.0 of 100.0 MiB, 5.1 MiB/s, ETA 17 s".
pub fn download_detail(got: u64, size: u64, elapsed: Duration) -> String {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { got as f64 / secs } else { 0.0 };
    let eta = if got >= size {
        "done".to_owned()
    } else if rate > 0.0 {
        format!("ETA {} s", ((size - got) as f64 / rate).ceil())
    } else {
        "ETA -".to_owned()
    };
    format!(
        "{:.1} of {:.1} MiB, {:.1} MiB/s, {eta}",
        mib(got),
        mib(size),
        rate / f64::from(1 << 20)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_details_give_rate_and_eta() {
        let mib = 1u64 << 20;
        assert_eq!(
            download_detail(10 * mib, 100 * mib, Duration::from_secs(2)),
            "10.0 of 100.0 MiB, 5.0 MiB/s, ETA 18 s"
        );
        assert_eq!(
            download_detail(100 * mib, 100 * mib, Duration::from_secs(4)),
            "100.0 of 100.0 MiB, 25.0 MiB/s, done"
        );
        assert_eq!(
            download_detail(0, mib, Duration::ZERO),
            "0.0 of 1.0 MiB, 0.0 MiB/s, ETA -"
        );
    }
}
