//! The kernel and image commands of the internal API.

mod images;
mod kernels;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::{Image, Kernel};
use crate::auth::{Authorizer, BoxFuture, Caller};
use crate::catalog::Catalogs;
use crate::config::{Config, SharedConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobEvent, JobId, Jobs};
use crate::store::{Store, StoreError};

/// The kernels and images: their rows, their files, imports, pulls and
/// the catalogs they come from. Defined here; its commands live in one
/// file per concern (kernels, images, `pull`, `oci`, `owner`).
#[derive(Debug)]
pub struct Artifacts {
    pub(super) config: SharedConfig,
    /// The state directory (kernels/ and images/ under it).
    pub(super) state: PathBuf,
    /// The cache directory (kernel builds' apt state and downloads).
    pub(super) cache: PathBuf,
    pub(super) store: Arc<Store>,
    pub(super) authorizer: Arc<dyn Authorizer>,
    pub(super) jobs: Arc<Jobs>,
    pub(super) catalogs: Catalogs,
    pub(super) quotas: Arc<dyn DiskQuota>,
    /// Images some operation holds exclusively (promote, delete, seeding).
    pub(super) busy_images: Mutex<HashSet<String>>,
    /// Running catalog and registry pulls, so a second pull of an entry
    /// joins the first; finished ones are dropped at the next pull.
    pub(super) pulls: tokio::sync::Mutex<HashMap<(banger_catalog::Kind, String), JobId>>,
    /// Kernel builds share banger's apt lists: one uses apt at a time.
    pub(super) apt: tokio::sync::Mutex<()>,
    /// Runs image builds' privileged steps.
    pub(super) steps: Arc<dyn crate::artifacts::build::steps::StepRunner>,
    /// Runs e2fsprogs on users' images (sandboxed).
    pub(super) tools: Arc<dyn banger_formats::tool::Tools>,
    /// bangerd's own binary, which applies OCI layers in a step.
    pub(super) helper: PathBuf,
}

/// The per-user limits as the artifact commands meet them: disk an
/// import adds to what its owner holds (`vm::quota::Quotas` is the real
/// one; defined here so that artifacts know no VM).
pub trait DiskQuota: Send + Sync + std::fmt::Debug {
    /// Fail with `LimitExceeded` unless `uid` may hold `bytes` more for
    /// `what`, or `caller` is exempt.
    fn enforce_disk<'a>(
        &'a self,
        caller: &'a Caller,
        uid: u32,
        bytes: u64,
        what: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
}

/// What [`Artifacts`] is made of.
#[derive(Debug)]
pub struct ArtifactsDeps {
    /// The configuration in force.
    pub config: SharedConfig,
    /// The state directory.
    pub state: PathBuf,
    /// The cache directory.
    pub cache: PathBuf,
    /// The open store.
    pub store: Arc<Store>,
    /// Decides who may do what.
    pub authorizer: Arc<dyn Authorizer>,
    /// Where imports and pulls run.
    pub jobs: Arc<Jobs>,
    /// The kernel and image catalogs in use.
    pub catalogs: Catalogs,
    /// The per-user limits.
    pub quotas: Arc<dyn DiskQuota>,
    /// Runs image builds' privileged steps.
    pub steps: Arc<dyn crate::artifacts::build::steps::StepRunner>,
    /// Runs e2fsprogs on users' images (sandboxed).
    pub tools: Arc<dyn banger_formats::tool::Tools>,
    /// bangerd's own binary, which applies OCI layers in a step
    /// (`oci::unpack`).
    pub helper: PathBuf,
}

pub(super) use crate::blocking::blocking;

fn store_err(context: &str) -> impl Fn(StoreError) -> Error + '_ {
    move |e| Error::failed_with(context, &e)
}

/// Removes a directory when dropped, unless disarmed: a failed or
/// cancelled job leaves nothing behind.
pub(super) struct TmpDir(Option<PathBuf>);

impl TmpDir {
    pub(super) fn create(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", path.display())))?;
        Ok(Self(Some(path)))
    }

    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Rename into `dst` and stop guarding.
    pub(super) fn persist(mut self, dst: &Path) -> Result<()> {
        let src = self.0.take().unwrap_or_default();
        std::fs::rename(&src, dst).map_err(|e| {
            let _ = std::fs::remove_dir_all(&src);
            Error::failed(format!("cannot move {} into place: {e}", dst.display()))
        })
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A kernel staged in a [`TmpDir`] (`vmlinux`, and `vmlinuz`,
/// `initrd.img`, `modules/` as the flags say), ready to record.
pub(super) struct StagedKernel {
    /// Its new id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The version the bzImage header names (empty for an ELF).
    pub version: String,
    /// A `vmlinuz` (bzImage) is kept beside the `vmlinux`.
    pub is_bzimage: bool,
    /// An `initrd.img` is there.
    pub initrd: bool,
    /// A `modules/` tree is there.
    pub modules: bool,
    /// Who imported or pulled it.
    pub uid: u32,
}

/// A progress callback for blocking work: reports `label` with the bytes
/// done, mapping them onto `[from, to)` of the job, and stops the work when
/// the job is cancelled.
pub(super) fn ticker(
    ctx: &JobContext,
    label: &'static str,
    total: u64,
    from: f64,
    to: f64,
) -> impl FnMut(u64) -> Result<()> + Send + 'static {
    let ctx = ctx.clone();
    let mut last = std::time::Instant::now();
    move |done| {
        ctx.check_cancelled()?;
        if last.elapsed().as_millis() >= 200 {
            last = std::time::Instant::now();
            let share = if total == 0 {
                0.0
            } else {
                (done as f64 / total as f64).min(1.0)
            };
            ctx.progress(
                &format!("{label}: {} of {} MiB", done >> 20, total >> 20),
                from + (to - from) * share,
                Some(done),
            );
        }
        Ok(())
    }
}

/// From a kernel file's first bytes: whether it is a bzImage (`HdrS` at
/// 0x202), an ELF (false), or neither (`InvalidArgument`).
pub(super) fn kernel_magic(head: &[u8]) -> Result<bool> {
    if head.starts_with(b"\x7fELF") {
        Ok(false)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Ok(true)
    } else {
        Err(Error::invalid(
            "the kernel is neither an ELF vmlinux nor an x86 bzImage",
        ))
    }
}

/// Whether `bytes` is a bzImage (else an ELF vmlinux), and its version.
pub(super) fn kernel_format(bytes: &[u8]) -> Result<(bool, String)> {
    match banger_vmlinux::inspect(bytes) {
        Ok(banger_vmlinux::KernelImage::Elf(elf)) => {
            elf.check_firecracker()
                .map_err(|e| Error::invalid(format!("kernel: {e}")))?;
            Ok((false, String::new()))
        }
        Ok(banger_vmlinux::KernelImage::BzImage(bz)) => Ok((true, bz.version.unwrap_or_default())),
        Err(e) => Err(Error::invalid(format!("kernel: {e}"))),
    }
}

fn extract_vmlinux(bytes: &[u8]) -> Result<Vec<u8>> {
    banger_vmlinux::extract_vmlinux(bytes)
        .map_err(|e| Error::invalid(format!("cannot extract a vmlinux from the bzImage: {e}")))
}

/// Put the kernel image `file`, staged on `dir`'s file system, where
/// managed storage keeps it in `dir`: a bzImage as `vmlinuz` with the ELF
/// `vmlinux` Firecracker needs extracted beside it, an ELF as `vmlinux`.
/// Returns whether it is a bzImage and the version its header names.
pub(super) fn place_kernel(dir: &Path, file: &Path) -> Result<(bool, String)> {
    let bytes = std::fs::read(file)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", file.display())))?;
    let (is_bzimage, version) = kernel_format(&bytes)?;
    let keep = dir.join(if is_bzimage { "vmlinuz" } else { "vmlinux" });
    std::fs::rename(file, &keep)
        .map_err(|e| Error::failed(format!("cannot keep the kernel: {e}")))?;
    if is_bzimage {
        std::fs::write(dir.join("vmlinux"), extract_vmlinux(&bytes)?)
            .map_err(|e| Error::failed(format!("cannot write the vmlinux: {e}")))?;
    }
    Ok((is_bzimage, version))
}

impl Artifacts {
    /// The service made of `deps`.
    pub fn new(deps: ArtifactsDeps) -> Self {
        Self {
            config: deps.config,
            state: deps.state,
            cache: deps.cache,
            store: deps.store,
            authorizer: deps.authorizer,
            jobs: deps.jobs,
            catalogs: deps.catalogs,
            quotas: deps.quotas,
            busy_images: Mutex::default(),
            pulls: tokio::sync::Mutex::default(),
            apt: tokio::sync::Mutex::default(),
            steps: deps.steps,
            tools: deps.tools,
            helper: deps.helper,
        }
    }

    pub(super) fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    pub(super) fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The kernel and image catalogs in use.
    pub fn catalogs(&self) -> &Catalogs {
        &self.catalogs
    }

    pub(super) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The default image (`vm.default_image`) and its kernel, when both
    /// are registered.
    pub async fn default_image(&self) -> Option<(Image, Kernel)> {
        let image = self.image(&self.config().vm.default_image).await.ok()?;
        let kernel = self.kernel_by_id(&image.kernel_id).await.ok()?;
        Some((image, kernel))
    }

    pub(super) async fn on_store<T: Send + 'static>(
        &self,
        context: &'static str,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T> {
        let store = self.store().clone();
        crate::blocking::run(move || f(&store))
            .await
            .map_err(store_err(context))
    }

    /// All kernels.
    pub async fn kernels(&self) -> Result<Vec<Kernel>> {
        self.on_store("listing kernels failed", Store::kernels)
            .await
    }

    /// All images.
    pub async fn images(&self) -> Result<Vec<Image>> {
        self.on_store("listing images failed", Store::images).await
    }

    /// The kernel a user's `reference` names: by id when it has the shape
    /// of one ([`super::is_id`]), else by name; never one for the other.
    pub async fn kernel(&self, reference: &str) -> Result<Kernel> {
        let r = reference.to_owned();
        let found = if super::is_id(reference) {
            self.on_store("reading kernels failed", move |s| s.kernel_by_id(&r))
                .await?
        } else {
            self.on_store("reading kernels failed", move |s| s.kernel_by_name(&r))
                .await?
        };
        found.ok_or_else(|| {
            Error::not_found(format!(
                "there is no kernel {reference:?}; see `banger kernel list`"
            ))
        })
    }

    /// The kernel with id `id` (internal references).
    pub async fn kernel_by_id(&self, id: &str) -> Result<Kernel> {
        let r = id.to_owned();
        self.on_store("reading kernels failed", move |s| s.kernel_by_id(&r))
            .await?
            .ok_or_else(|| Error::not_found(format!("there is no kernel with id {id}")))
    }

    /// The image a user's `reference` names: by id when it has the shape
    /// of one, else by name; never one for the other.
    pub async fn image(&self, reference: &str) -> Result<Image> {
        let r = reference.to_owned();
        let found = if super::is_id(reference) {
            self.on_store("reading images failed", move |s| s.image_by_id(&r))
                .await?
        } else {
            self.on_store("reading images failed", move |s| s.image_by_name(&r))
                .await?
        };
        found.ok_or_else(|| {
            Error::not_found(format!(
                "there is no image {reference:?}; see `banger image list`"
            ))
        })
    }

    /// The image with id `id` (internal references).
    pub async fn image_by_id(&self, id: &str) -> Result<Image> {
        let r = id.to_owned();
        self.on_store("reading images failed", move |s| s.image_by_id(&r))
            .await?
            .ok_or_else(|| Error::not_found(format!("there is no image with id {id}")))
    }

    pub(super) fn publish(&self, event: JobEvent) {
        self.jobs().send(event);
    }

    /// Take `image_id` for exclusive work (promote, delete, work-seed).
    fn claim_image(&self, image_id: &str, name: &str) -> Result<ImageClaim<'_>> {
        let mut busy = self.busy_images.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(image_id.to_owned()) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("image {name} is busy with another operation; try again when it ends"),
            ));
        }
        Ok(ImageClaim {
            core: self,
            id: image_id.to_owned(),
        })
    }

    /// Remove what a crash left in the kernel and image directories.
    pub async fn clean_up_artifacts(&self) -> Result<()> {
        let kernels = self
            .kernels()
            .await?
            .into_iter()
            .map(|k| k.id)
            .collect::<Vec<_>>();
        let images = self
            .images()
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>();
        let state = self.state.clone();
        let removed =
            blocking(move || Ok(super::cleanup_orphans(&state, &kernels, &images))).await?;
        for path in removed {
            tracing::warn!(path = %path.display(), "removed a leftover of an interrupted operation");
        }
        Ok(())
    }

    fn release_image(&self, id: &str) {
        self.busy_images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Exclusive use of an image; released on drop.
struct ImageClaim<'a> {
    core: &'a Artifacts,
    id: String,
}

impl ImageClaim<'_> {
    /// Keep the claim past this value (a job releases it later).
    fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for ImageClaim<'_> {
    fn drop(&mut self) {
        self.core.release_image(&self.id);
    }
}

/// Refuse an unmanaged image whose paths someone other than root named
/// (registered by an older bangerd): bangerd opens those only for root.
pub(crate) fn paths_of_root(image: &Image) -> Result<()> {
    if image.managed || image.owner_uid == super::owner::SYSTEM_UID {
        return Ok(());
    }
    Err(Error::denied(format!(
        "image {} points at files uid {} named, and bangerd opens paths only for root: \
         register it again (banger image register copies it through descriptors) and delete this one",
        image.name, image.owner_uid
    )))
}

/// Refuse a caller other than root a method that takes host paths.
fn only_root_names_paths(caller: &Caller, method: &str, instead: &str, cli: &str) -> Result<()> {
    if caller.uid == 0 {
        return Ok(());
    }
    Err(Error::denied(format!(
        "{method} takes host paths, and bangerd opens paths only for root: \
         open the files yourself and pass their descriptors to {instead} ({cli} does)"
    )))
}

pub(super) fn already_exists(what: &str, name: &str) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("a {what} named {name} already exists; pick another name or delete it first"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{ImageRegistration, images_dir, validate};
    use crate::auth::Action;
    use crate::vm::quota::Quotas;

    #[derive(Debug)]
    struct AllowAll;

    impl Authorizer for AllowAll {
        fn authorize<'a>(&'a self, _: &'a Caller, _: Action) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// The artifacts service alone, on an in-memory store.
    fn artifacts(dir: &Path) -> Arc<Artifacts> {
        artifacts_with(dir, Config::default())
    }

    /// [`artifacts`] with `config`.
    fn artifacts_with(dir: &Path, config: Config) -> Arc<Artifacts> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let config = SharedConfig::new(config);
        let authorizer: Arc<dyn Authorizer> = Arc::new(AllowAll);
        Arc::new(Artifacts::new(ArtifactsDeps {
            config: config.clone(),
            state: dir.join("state"),
            cache: dir.join("cache"),
            store: store.clone(),
            authorizer: authorizer.clone(),
            jobs: Jobs::new(
                store.clone(),
                tx,
                crate::jobs::JobSettings {
                    retention: std::time::Duration::from_secs(10),
                    stage_delay: std::time::Duration::ZERO,
                },
            ),
            catalogs: Catalogs {
                config: config.clone(),
                config_file: dir.join("bangerd.toml"),
                state: dir.join("state"),
            },
            quotas: Arc::new(Quotas::new(config, store, authorizer)),
            steps: Arc::new(crate::artifacts::build::steps::Direct),
            tools: Arc::new(banger_formats::tool::Unconfined),
            helper: PathBuf::from("bangerd"),
        }))
    }

    #[tokio::test]
    async fn builds_are_refused_when_configured_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.images.build_from = crate::config::BuildFrom::None;
        let core = artifacts_with(dir.path(), config);
        let caller = Caller::root();
        let kernel = core
            .build_kernel(
                &caller,
                crate::artifacts::build::KernelBuild {
                    name: "k".into(),
                    package: None,
                },
            )
            .await
            .expect_err("kernel builds are off");
        let image = core
            .build_image(
                &caller,
                crate::artifacts::build::image::ImageBuild {
                    recipe: "debian-bookworm".into(),
                    name: None,
                    kernel: None,
                },
            )
            .await
            .expect_err("image builds are off");
        for e in [kernel, image] {
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert!(e.message.contains("build_from"), "{}", e.message);
        }
    }

    #[tokio::test]
    async fn a_missing_work_seed_is_made_lazily_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = artifacts(dir.path());
        let inputs = dir.path().join("in");
        std::fs::create_dir_all(inputs.join("tree/root")).expect("mkdir");
        std::fs::write(inputs.join("tree/root/.bashrc"), b"alias ll='ls -l'\n").expect("write");
        std::fs::write(inputs.join("vmlinux"), b"\x7fELF fake").expect("write");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(inputs.join("tree"))
            .arg(inputs.join("rootfs.ext4"))
            .arg("16M")
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
        // A kernel row straight into the store (kernel import is tested
        // through the daemon).
        let kernel = Kernel {
            id: "00000000000000aa".into(),
            name: "k".into(),
            version: String::new(),
            vmlinux: inputs.join("vmlinux"),
            bzimage: None,
            initrd: None,
            modules: None,
            sha256: String::new(),
            size_bytes: 0,
            created_at: 0,
            owner_uid: 0,
        };
        core.store().insert_kernel(&kernel).expect("kernel");
        let image = core
            .register_image(
                &Caller::root(),
                ImageRegistration {
                    name: "old".into(),
                    rootfs: inputs.join("rootfs.ext4"),
                    kernel: "k".into(),
                    work_seed: None,
                    services: vec![],
                    init: None,
                },
            )
            .await
            .expect("register");
        assert_eq!(image.work_seed, None);

        let seeded = core.ensure_work_seed(&image.id).await.expect("seed");
        let seed = seeded.work_seed.clone().expect("has a seed now");
        assert!(seed.starts_with(images_dir(&core.state).join(&image.id)));
        assert!(validate::is_ext4(&seed).expect("read"));
        assert_eq!(seeded.work_seed_sha256.len(), 64);
        assert_eq!(core.image("old").await.expect("row"), seeded);
        let mtime = std::fs::metadata(&seed)
            .expect("meta")
            .modified()
            .expect("mtime");
        let again = core.ensure_work_seed(&image.id).await.expect("again");
        assert_eq!(again, seeded);
        assert_eq!(
            std::fs::metadata(&seed)
                .expect("meta")
                .modified()
                .expect("mtime"),
            mtime
        );
        // No scratch left behind.
        let leftovers: Vec<_> = std::fs::read_dir(seed.parent().expect("dir"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, ["work-seed.ext4"]);
    }

    /// The pulls map keeps only running pulls: a finished one is dropped
    /// at the next lookup, a running one is found and kept.
    #[tokio::test]
    async fn finished_pulls_leave_the_pulls_map() {
        use banger_catalog::Kind as Catalog;
        let dir = tempfile::tempdir().expect("tempdir");
        let core = artifacts(dir.path());
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let running = core
            .jobs()
            .start("image-pull", 0, Action::ImageManage, |_| async move {
                let _ = held.await;
                Ok(())
            })
            .await
            .expect("running job");
        let done = core
            .jobs()
            .start("image-pull", 0, Action::ImageManage, |_| async { Ok(()) })
            .await
            .expect("done job");
        for _ in 0..200 {
            if core.jobs().get(done).is_some_and(|j| j.state.is_final()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (a, b) = (
            (Catalog::Images, "a".to_owned()),
            (Catalog::Images, "b".to_owned()),
        );
        let mut pulls = std::collections::HashMap::from([(a.clone(), running), (b.clone(), done)]);
        assert_eq!(core.running_pull(&mut pulls, &b), None);
        assert_eq!(pulls.len(), 1, "{pulls:?}");
        assert_eq!(core.running_pull(&mut pulls, &a), Some(running));
        let _ = release.send(());
    }
}
