//! The kernel and image commands of the internal API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::files;
use super::store::{is_fk_violation, is_unique_violation};
use super::validate::{self, Kind, Reader};
use super::{
    Image, ImageImport, ImageRegistration, Kernel, KernelImport, Modules, images_dir, kernels_dir,
};
use crate::auth::{Action, Caller};
use crate::core::Core;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobEvent, JobId, Resource};
use crate::store::{Store, StoreError, unix_us};
use crate::vm::quota::Demand;

/// Run blocking work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::failed(format!("internal task failed: {e}"))))
}

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

pub(super) fn extract_vmlinux(bytes: &[u8]) -> Result<Vec<u8>> {
    banger_vmlinux::extract_vmlinux(bytes)
        .map_err(|e| Error::invalid(format!("cannot extract a vmlinux from the bzImage: {e}")))
}

impl Core {
    pub(super) fn store(&self) -> &Arc<Store> {
        &self.deps.store
    }

    pub(super) async fn on_store<T: Send + 'static>(
        &self,
        context: &'static str,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T> {
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())))
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
        let state = self.deps.dirs.state.clone();
        let removed =
            blocking(move || Ok(super::cleanup_orphans(&state, &kernels, &images))).await?;
        for path in removed {
            tracing::warn!(path = %path.display(), "removed a leftover of an interrupted operation");
        }
        Ok(())
    }

    /// `ImportKernel` with host paths: root only, since bangerd never
    /// opens a path another caller named (they pass descriptors to
    /// [`Core::import_kernel`]). Root's files are opened, then imported
    /// as descriptors are.
    pub async fn import_kernel_paths(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        modules: Option<PathBuf>,
    ) -> Result<JobId> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        only_root_names_paths(
            caller,
            "ImportKernel",
            "ImportKernelFd",
            "banger kernel import",
        )?;
        let opened = blocking(move || {
            let root = Reader::for_uid(0);
            let open = |what: &str, path: &Path| {
                let path = validate::host_path(what, path, Kind::File, &root)?;
                std::fs::File::open(&path)
                    .map_err(|e| Error::invalid(format!("{what} {}: {e}", path.display())))
            };
            let kernel = open("kernel", &kernel)?;
            let initrd = initrd.as_deref().map(|p| open("initrd", p)).transpose()?;
            let modules = modules
                .as_deref()
                .map(|p| validate::host_path("modules", p, Kind::Dir, &root).map(Modules::Dir))
                .transpose()?;
            Ok((kernel, initrd, modules))
        })
        .await?;
        let (kernel, initrd, modules) = opened;
        self.import_kernel(
            caller,
            KernelImport {
                name,
                kernel,
                initrd,
                modules,
            },
        )
        .await
    }

    /// Import a kernel as a job (action `org.banger.image.manage`) from
    /// the descriptors in `req`. What can be checked is checked before
    /// the job starts (name, regular files, size caps, the kernel's magic,
    /// free space); the job copies, then validates and extracts the copy.
    /// Its result is the kernel.
    pub async fn import_kernel(
        self: &Arc<Self>,
        caller: &Caller,
        req: KernelImport,
    ) -> Result<JobId> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        validate::name("kernel", &req.name)?;
        self.authorize_name(caller, banger_catalog::Kind::Kernels, &req.name)
            .await?;
        let uid = caller.uid;
        let limits = self.config().limits.clone();
        let modules_cap = limits.modules_max_mib.saturating_mul(1 << 20);
        let KernelImport {
            name,
            kernel,
            initrd,
            modules,
        } = req;
        let checked = blocking(move || {
            let mib = |m: u64| m.saturating_mul(1 << 20);
            let kernel_len = files::checked_input(
                "the kernel",
                &kernel,
                mib(limits.kernel_max_mib),
                "limits.kernel_max_mib",
            )?;
            let is_bzimage = kernel_magic(&files::head(&kernel, 0x206)?)?;
            let initrd_len = initrd
                .as_ref()
                .map(|f| {
                    files::checked_input(
                        "the initrd",
                        f,
                        mib(limits.initrd_max_mib),
                        "limits.initrd_max_mib",
                    )
                })
                .transpose()?
                .unwrap_or(0);
            let modules_len = match &modules {
                Some(Modules::Tar(f)) => files::checked_input(
                    "the modules archive",
                    f,
                    mib(limits.modules_max_mib),
                    "limits.modules_max_mib",
                )?,
                Some(Modules::Dir(dir)) => files::disk_usage(dir),
                None => 0,
            };
            Ok((
                kernel,
                kernel_len,
                is_bzimage,
                initrd,
                initrd_len,
                modules,
                modules_len,
            ))
        })
        .await?;
        let (kernel, kernel_len, is_bzimage, initrd, initrd_len, modules, modules_len) = checked;
        let owned = name.clone();
        if self
            .on_store("reading kernels failed", move |s| s.kernel_by_name(&owned))
            .await?
            .is_some()
        {
            return Err(already_exists("kernel", &name));
        }
        // The kernel twice (a bzImage and its vmlinux), its initrd, modules.
        let needed = kernel_len
            .saturating_mul(if is_bzimage { 6 } else { 2 })
            .saturating_add(initrd_len)
            .saturating_add(modules_len);
        let state = self.deps.dirs.state.clone();
        std::fs::create_dir_all(kernels_dir(&state))
            .map_err(|e| Error::failed(format!("cannot create the kernel directory: {e}")))?;
        crate::vm::disk::check_space(&kernels_dir(&state), needed)?;
        let demand = Demand::disk(kernel_len + initrd_len + modules_len);
        self.enforce_quota(caller, uid, &demand, None, &format!("kernel {name}"))
            .await?;

        let core = self.clone();
        self.jobs()
            .start_with_result(
                "kernel-import",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let id = super::new_id()
                        .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
                    let tmp = TmpDir::create(kernels_dir(&state).join(format!(".tmp-{id}")))?;

                    ctx.stage(
                        if is_bzimage {
                            "extract vmlinux"
                        } else {
                            "copy vmlinux"
                        },
                        0.0,
                    )
                    .await?;
                    let dir = tmp.path().to_owned();
                    let mut tick = ticker(&ctx, "kernel", kernel_len, 0.0, 0.2);
                    let version = blocking(move || {
                        let copy = dir.join(".kernel");
                        files::sparse_copy_file(
                            &kernel,
                            "the kernel",
                            kernel_len,
                            &copy,
                            &mut tick,
                        )?;
                        // The copy is what is kept, so the copy is checked.
                        let bytes = std::fs::read(&copy)
                            .map_err(|e| Error::failed(format!("cannot read the copy: {e}")))?;
                        let (bz, version) = kernel_format(&bytes)?;
                        if bz != is_bzimage {
                            return Err(Error::invalid("the kernel changed while it was copied"));
                        }
                        if bz {
                            std::fs::write(dir.join("vmlinux"), extract_vmlinux(&bytes)?).map_err(
                                |e| Error::failed(format!("cannot write the vmlinux: {e}")),
                            )?;
                            std::fs::rename(&copy, dir.join("vmlinuz"))
                        } else {
                            std::fs::rename(&copy, dir.join("vmlinux"))
                        }
                        .map_err(|e| Error::failed(format!("cannot keep the kernel: {e}")))?;
                        Ok(version)
                    })
                    .await?;

                    let has_initrd = initrd.is_some();
                    if let Some(src) = initrd {
                        ctx.stage("copy initrd", 0.3).await?;
                        let dst = tmp.path().join("initrd.img");
                        let mut tick = ticker(&ctx, "initrd", initrd_len, 0.3, 0.4);
                        blocking(move || {
                            files::sparse_copy_file(&src, "the initrd", initrd_len, &dst, &mut tick)
                                .map(|_| ())
                        })
                        .await?;
                    }
                    let has_modules = modules.is_some();
                    if let Some(src) = modules {
                        ctx.stage("copy modules", 0.4).await?;
                        let dst = tmp.path().join("modules");
                        let mut tick = ticker(&ctx, "modules", modules_len, 0.4, 0.85);
                        blocking(move || match src {
                            Modules::Tar(file) => files::unpack_modules(
                                &file,
                                modules_len,
                                &dst,
                                modules_cap,
                                "limits.modules_max_mib",
                                &mut tick,
                            )
                            .map(|_| ()),
                            Modules::Dir(dir) => {
                                files::copy_tree(&dir, &dst, &mut tick).map(|_| ())
                            }
                        })
                        .await?;
                    }

                    let staged = StagedKernel {
                        id,
                        name,
                        version,
                        is_bzimage,
                        initrd: has_initrd,
                        modules: has_modules,
                        uid,
                    };
                    core.record_kernel(&ctx, tmp, staged).await
                },
            )
            .await
    }

    /// The last stages of a kernel import or pull: digest the vmlinux
    /// staged in `tmp`, move `tmp` into place and record the kernel.
    pub(super) async fn record_kernel(
        &self,
        ctx: &JobContext,
        tmp: TmpDir,
        k: StagedKernel,
    ) -> Result<Option<Resource>> {
        let state = self.deps.dirs.state.clone();
        let final_dir = kernels_dir(&state).join(&k.id);
        ctx.stage("digest", 0.85).await?;
        let vmlinux_tmp = tmp.path().join("vmlinux");
        let mut tick = ticker(ctx, "sha256", 0, 0.85, 0.95);
        let sha256 = blocking(move || files::sha256_file(&vmlinux_tmp, &mut tick)).await?;
        let size_bytes = files::disk_usage(tmp.path());

        ctx.stage("record", 0.95).await?;
        tmp.persist(&final_dir)?;
        let kernel = Kernel {
            id: k.id.clone(),
            name: k.name.clone(),
            version: k.version,
            vmlinux: final_dir.join("vmlinux"),
            bzimage: k.is_bzimage.then(|| final_dir.join("vmlinuz")),
            initrd: k.initrd.then(|| final_dir.join("initrd.img")),
            modules: k.modules.then(|| final_dir.join("modules")),
            sha256,
            size_bytes,
            created_at: unix_us(SystemTime::now()),
            owner_uid: k.uid,
        };
        let row = kernel.clone();
        let store = self.store().clone();
        let stored = tokio::task::spawn_blocking(move || store.insert_kernel(&row))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
        if let Err(e) = stored {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(if is_unique_violation(&e) {
                already_exists("kernel", &k.name)
            } else {
                Error::failed_with("recording the kernel failed", &e)
            });
        }
        tracing::info!(banger_kernel = %k.name, banger_kernel_id = %k.id, "kernel recorded");
        self.publish(JobEvent::ResourceChanged(Resource::Kernel(k.id.clone())));
        Ok(Some(Resource::Kernel(k.id)))
    }

    /// Delete a kernel; refused while an image uses it.
    pub async fn delete_kernel(&self, caller: &Caller, reference: &str) -> Result<()> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        let kernel = self.kernel(reference).await?;
        self.authorize_change(caller, &kernel).await?;
        let id = kernel.id.clone();
        let users = self
            .on_store("reading images failed", move |s| s.images_using_kernel(&id))
            .await?;
        if !users.is_empty() {
            return Err(kernel_in_use(&kernel.name, &users));
        }
        let id = kernel.id.clone();
        let store = self.store().clone();
        let deleted = tokio::task::spawn_blocking(move || store.delete_kernel(&id))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
        match deleted {
            Ok(_) => {}
            Err(e) if is_fk_violation(&e) => return Err(kernel_in_use(&kernel.name, &[])),
            Err(e) => return Err(Error::failed_with("deleting the kernel failed", &e)),
        }
        let dir = kernels_dir(&self.deps.dirs.state).join(&kernel.id);
        blocking(move || {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::failed(format!("cannot remove {}: {e}", dir.display())))?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(banger_kernel = %kernel.name, "kernel deleted");
        self.publish(JobEvent::ResourceRemoved(Resource::Kernel(kernel.id)));
        Ok(())
    }

    /// Register an unmanaged image from host paths: root only (everyone
    /// else imports from descriptors with [`Core::import_image`]).
    pub async fn register_image(&self, caller: &Caller, req: ImageRegistration) -> Result<Image> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        only_root_names_paths(
            caller,
            "RegisterImage",
            "ImportImageFd",
            "banger image register",
        )?;
        validate::name("image", &req.name)?;
        let services = validate::services(&req.services)?;
        if let Some(init) = &req.init {
            validate::init_path(init)?;
        }
        self.authorize_name(caller, banger_catalog::Kind::Images, &req.name)
            .await?;
        let kernel = self.kernel(&req.kernel).await?;
        self.authorize_use(caller, &kernel).await?;
        let uid = caller.uid;
        let (rootfs, work_seed, rootfs_bytes) = {
            let rootfs = req.rootfs.clone();
            let work_seed = req.work_seed.clone();
            blocking(move || {
                let reader = Reader::for_uid(uid);
                let rootfs = validate::host_path("rootfs", &rootfs, Kind::File, &reader)?;
                validate::ext4_image("rootfs", &rootfs)?;
                let work_seed = work_seed
                    .as_deref()
                    .map(|p| {
                        let p = validate::host_path("work-seed", p, Kind::File, &reader)?;
                        validate::ext4_image("work-seed", &p)?;
                        Ok::<_, Error>(p)
                    })
                    .transpose()?;
                let bytes = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
                Ok((rootfs, work_seed, bytes))
            })
            .await?
        };
        let work_seed_sha256 = match work_seed.clone() {
            Some(p) => blocking(move || files::sha256_file(&p, &mut |_| Ok(()))).await?,
            None => String::new(),
        };
        let image = Image {
            id: super::new_id().map_err(|e| Error::failed(format!("cannot make an id: {e}")))?,
            name: req.name.clone(),
            managed: false,
            rootfs,
            rootfs_bytes,
            work_seed,
            work_seed_sha256,
            kernel_id: kernel.id,
            services,
            init: req.init,
            created_at: unix_us(SystemTime::now()),
            owner_uid: uid,
        };
        let row = image.clone();
        let stored = tokio::task::spawn_blocking({
            let store = self.store().clone();
            move || store.insert_image(&row)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
        match stored {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => return Err(already_exists("image", &req.name)),
            Err(e) if is_fk_violation(&e) => {
                return Err(Error::not_found(format!(
                    "kernel {} was deleted meanwhile; import it again",
                    req.kernel
                )));
            }
            Err(e) => return Err(Error::failed_with("recording the image failed", &e)),
        }
        tracing::info!(banger_image = %image.name, banger_image_id = %image.id, "image registered");
        self.publish(JobEvent::ResourceChanged(Resource::Image(image.id.clone())));
        Ok(image)
    }

    /// Import an image from the descriptors in `req` into managed storage,
    /// as a job (action `org.banger.image.manage`): the rootfs and the
    /// work-seed (made from the rootfs's `/root` when there is none) are
    /// copied, the copies checked and recorded. Its result is the image.
    pub async fn import_image(
        self: &Arc<Self>,
        caller: &Caller,
        req: ImageImport,
    ) -> Result<JobId> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        validate::name("image", &req.name)?;
        let services = validate::services(&req.services)?;
        if let Some(init) = &req.init {
            validate::init_path(init)?;
        }
        self.authorize_name(caller, banger_catalog::Kind::Images, &req.name)
            .await?;
        let kernel = self.kernel(&req.kernel).await?;
        self.authorize_use(caller, &kernel).await?;
        let cap = self.config().limits.image_max_gib.saturating_mul(1 << 30);
        let ImageImport {
            name,
            rootfs,
            work_seed,
            init,
            ..
        } = req;
        let checked = blocking(move || {
            let ext4 = |what: &str, file: &std::fs::File| -> Result<(u64, u64)> {
                let len = files::checked_input(what, file, cap, "limits.image_max_gib")?;
                if !validate::has_ext4_magic(&files::head(file, 1 << 11)?) {
                    return Err(Error::invalid(format!(
                        "{what} is not an ext4 filesystem image: build it with mkfs.ext4"
                    )));
                }
                use std::os::unix::fs::MetadataExt;
                let used = file.metadata().map(|m| m.blocks() * 512).unwrap_or(len);
                Ok((len, used.min(len)))
            };
            let (rootfs_len, rootfs_used) = ext4("the rootfs", &rootfs)?;
            let seed = work_seed
                .map(|f| ext4("the work-seed", &f).map(|sizes| (f, sizes)))
                .transpose()?;
            Ok((rootfs, rootfs_len, rootfs_used, seed))
        })
        .await?;
        let (rootfs, rootfs_len, rootfs_used, seed) = checked;
        let owned = name.clone();
        if self
            .on_store("reading images failed", move |s| s.image_by_name(&owned))
            .await?
            .is_some()
        {
            return Err(already_exists("image", &name));
        }
        let state = self.deps.dirs.state.clone();
        std::fs::create_dir_all(images_dir(&state))
            .map_err(|e| Error::failed(format!("cannot create the image directory: {e}")))?;
        let needed = rootfs_used + seed.as_ref().map_or(64 << 20, |(_, (_, used))| *used);
        crate::vm::disk::check_space(&images_dir(&state), needed)?;
        let demand = Demand::disk(rootfs_len);
        self.enforce_quota(caller, caller.uid, &demand, None, &format!("image {name}"))
            .await?;

        let core = self.clone();
        let uid = caller.uid;
        self.jobs()
            .start_with_result(
                "image-import",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let id = super::new_id()
                        .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
                    let tmp = TmpDir::create(images_dir(&state).join(format!(".tmp-{id}")))?;
                    ctx.stage("copy rootfs", 0.0).await?;
                    let dst = tmp.path().join("rootfs.ext4");
                    let mut tick = ticker(&ctx, "rootfs", rootfs_used, 0.0, 0.6);
                    blocking(move || {
                        files::sparse_copy_file(
                            &rootfs,
                            "the rootfs",
                            rootfs_len,
                            &dst,
                            &mut tick,
                        )?;
                        // The copy is what is kept, so the copy is checked.
                        validate::ext4_image("the rootfs", &dst)
                    })
                    .await?;
                    if let Some((file, (len, used))) = seed {
                        ctx.stage("copy work-seed", 0.6).await?;
                        let dst = tmp.path().join("work-seed.ext4");
                        let mut tick = ticker(&ctx, "work-seed", used, 0.6, 0.8);
                        blocking(move || {
                            files::sparse_copy_file(&file, "the work-seed", len, &dst, &mut tick)?;
                            validate::ext4_image("the work-seed", &dst)
                        })
                        .await?;
                    }
                    core.record_image(
                        &ctx,
                        tmp,
                        super::pull::StagedImage {
                            id,
                            name,
                            kernel_id: kernel.id,
                            kernel_name: kernel.name,
                            services,
                            init,
                            uid,
                        },
                    )
                    .await
                },
            )
            .await
    }

    /// Copy an unmanaged image into managed storage, as a job.
    pub async fn promote_image(
        self: &Arc<Self>,
        caller: &Caller,
        reference: &str,
    ) -> Result<JobId> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        let image = self.image(reference).await?;
        self.authorize_change(caller, &image).await?;
        if image.managed {
            return Err(Error::invalid(format!(
                "image {} is already managed; nothing to promote",
                image.name
            )));
        }
        paths_of_root(&image)?;
        // Claimed for the whole job; released when the job's work ends.
        self.claim_image(&image.id, &image.name)?.forget();
        let core = self.clone();
        let uid = caller.uid;
        let id = image.id.clone();
        let started = self
            .jobs()
            .start_with_result(
                "image-promote",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let _claim = ImageClaim {
                        core: &core,
                        id: image.id.clone(),
                    };
                    core.promote(&ctx, image).await
                },
            )
            .await;
        if started.is_err() {
            self.release_image(&id);
        }
        started
    }

    async fn promote(&self, ctx: &JobContext, image: Image) -> Result<Option<Resource>> {
        let state = self.deps.dirs.state.clone();
        let tmp = TmpDir::create(images_dir(&state).join(format!(".tmp-{}", image.id)))?;
        let final_dir = images_dir(&state).join(&image.id);

        ctx.stage("copy rootfs", 0.0).await?;
        let src = image.rootfs.clone();
        let dst = tmp.path().join("rootfs.ext4");
        let mut tick = ticker(ctx, "rootfs", image.rootfs_bytes, 0.0, 0.7);
        blocking(move || files::sparse_copy(&src, &dst, &mut tick).map(|_| ())).await?;

        let seed = tmp.path().join("work-seed.ext4");
        match image.work_seed.clone() {
            Some(src) => {
                ctx.stage("copy work-seed", 0.7).await?;
                let total = files::disk_usage(&src);
                let dst = seed.clone();
                let mut tick = ticker(ctx, "work-seed", total, 0.7, 0.85);
                blocking(move || files::sparse_copy(&src, &dst, &mut tick).map(|_| ())).await?;
            }
            None => {
                ctx.stage("make work-seed", 0.7).await?;
                let rootfs = tmp.path().join("rootfs.ext4");
                let dst = seed.clone();
                blocking(move || files::make_work_seed(&rootfs, &dst)).await?;
            }
        }

        ctx.stage("digest", 0.85).await?;
        let hashed = seed.clone();
        let mut tick = ticker(ctx, "sha256", 0, 0.85, 0.95);
        let sha = blocking(move || files::sha256_file(&hashed, &mut tick)).await?;

        ctx.stage("record", 0.95).await?;
        tmp.persist(&final_dir)?;
        let promoted = Image {
            managed: true,
            rootfs: final_dir.join("rootfs.ext4"),
            work_seed: Some(final_dir.join("work-seed.ext4")),
            work_seed_sha256: sha,
            ..image
        };
        let row = promoted.clone();
        if let Err(e) = self
            .on_store("recording the promotion failed", move |s| {
                s.update_image_files(&row)
            })
            .await
        {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e);
        }
        tracing::info!(banger_image = %promoted.name, "image promoted");
        self.publish(JobEvent::ResourceChanged(Resource::Image(
            promoted.id.clone(),
        )));
        Ok(Some(Resource::Image(promoted.id)))
    }

    /// Delete an image; refused while it is busy or VMs use it. Managed
    /// files go with it.
    pub async fn delete_image(&self, caller: &Caller, reference: &str) -> Result<()> {
        self.deps
            .authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        let image = self.image(reference).await?;
        self.authorize_change(caller, &image).await?;
        let _claim = self.claim_image(&image.id, &image.name)?;
        let id = image.id.clone();
        let users = self
            .on_store("reading VMs failed", move |s| s.vms_using_image(&id))
            .await?;
        if !users.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {} is used by vm {}; delete those VMs first",
                    image.name,
                    users.join(", ")
                ),
            ));
        }
        let id = image.id.clone();
        self.on_store("deleting the image failed", move |s| s.delete_image(&id))
            .await?;
        let dir = images_dir(&self.deps.dirs.state).join(&image.id);
        blocking(move || {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::failed(format!("cannot remove {}: {e}", dir.display())))?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(banger_image = %image.name, "image deleted");
        self.publish(JobEvent::ResourceRemoved(Resource::Image(image.id)));
        Ok(())
    }

    /// Give `image` a work-seed if it has none (images registered without
    /// one, or promoted by an older bangerd): built from its rootfs into
    /// managed storage and recorded with its digest. VM creation calls this.
    pub async fn ensure_work_seed(&self, image_id: &str) -> Result<Image> {
        let image = self.image_by_id(image_id).await?;
        if image.work_seed.is_some() {
            return Ok(image);
        }
        let _claim = self.claim_image(&image.id, &image.name)?;
        let dir = images_dir(&self.deps.dirs.state).join(&image.id);
        let rootfs = image.rootfs.clone();
        let sha_and_path = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
            let scratch = TmpDir::create(dir.join(".tmp-seed"))?;
            let tmp_seed = scratch.path().join("work-seed.ext4");
            files::make_work_seed(&rootfs, &tmp_seed)?;
            let sha = files::sha256_file(&tmp_seed, &mut |_| Ok(()))?;
            let seed = dir.join("work-seed.ext4");
            std::fs::rename(&tmp_seed, &seed)
                .map_err(|e| Error::failed(format!("cannot move the work-seed into place: {e}")))?;
            Ok((sha, seed))
        })
        .await?;
        let (sha, seed) = sha_and_path;
        let updated = Image {
            work_seed: Some(seed),
            work_seed_sha256: sha,
            ..image
        };
        let row = updated.clone();
        self.on_store("recording the work-seed failed", move |s| {
            s.update_image_files(&row)
        })
        .await?;
        tracing::info!(banger_image = %updated.name, "made the missing work-seed");
        self.publish(JobEvent::ResourceChanged(Resource::Image(
            updated.id.clone(),
        )));
        Ok(updated)
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
    core: &'a Core,
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

fn kernel_in_use(name: &str, users: &[String]) -> Error {
    let who = if users.is_empty() {
        "images".to_owned()
    } else {
        format!("image(s) {}", users.join(", "))
    };
    Error::new(
        ErrorKind::Busy,
        format!("kernel {name} is used by {who}; delete those first"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Authorizer, BoxFuture};
    use crate::config::Config;
    use crate::core::CoreDeps;
    use crate::doctor::{BusProbe, HostPaths, NameState};
    use crate::paths::Dirs;

    #[derive(Debug)]
    struct AllowAll;

    impl Authorizer for AllowAll {
        fn authorize<'a>(&'a self, _: &'a Caller, _: Action) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[derive(Debug)]
    struct NoBus;

    impl BusProbe for NoBus {
        fn name_state<'a>(&'a self, _: &'a str) -> BoxFuture<'a, NameState> {
            Box::pin(async { NameState::Absent })
        }
    }

    fn core(dir: &Path) -> Arc<Core> {
        let dirs = Dirs::from_lookup(|var| Some(dir.join(var)));
        dirs.create().expect("dirs");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        Core::new(
            Config::default(),
            CoreDeps {
                config_file: dirs.config_file(),
                dirs,
                store: Arc::new(Store::open_in_memory().expect("store")),
                authorizer: Arc::new(AllowAll),
                bus: Arc::new(NoBus),
                host: HostPaths::default(),
                supervisor: Arc::new(crate::vm::supervise::Direct),
                dm: Arc::new(crate::vm::snapshot::Absent),
                link_dns: Arc::new(crate::net::resolved::NoLinkDns),
                releases: banger_release::Releases::new(dir.join("releases")),
                restart: Arc::new(crate::update::NoRestart),
            },
            tx,
        )
    }

    #[tokio::test]
    async fn a_missing_work_seed_is_made_lazily_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = core(dir.path());
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
        assert!(seed.starts_with(images_dir(&core.deps.dirs.state).join(&image.id)));
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
        let core = core(dir.path());
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
