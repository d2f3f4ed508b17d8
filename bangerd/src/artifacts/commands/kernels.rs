//! Kernel commands: import (from descriptors, or root's paths), record, delete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::{
    StagedKernel, TmpDir, already_exists, blocking, kernel_magic, only_root_names_paths,
    place_kernel, ticker,
};
use crate::artifacts::Artifacts;
use crate::artifacts::files;
use crate::artifacts::store::{is_fk_violation, is_unique_violation};
use crate::artifacts::validate::{self, Kind, Reader};
use crate::artifacts::{Kernel, KernelImport, Modules, kernels_dir};
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobEvent, JobId, Resource};
use crate::store::unix_us;

impl Artifacts {
    /// `ImportKernel` with host paths: root only, since bangerd never
    /// opens a path another caller named (they pass descriptors to
    /// [`Artifacts::import_kernel`]). Root's files are opened, then imported
    /// as descriptors are.
    pub async fn import_kernel_paths(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        modules: Option<PathBuf>,
    ) -> Result<JobId> {
        self.authorizer
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
        self.authorizer
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
        let state = self.state.clone();
        std::fs::create_dir_all(kernels_dir(&state))
            .map_err(|e| Error::failed(format!("cannot create the kernel directory: {e}")))?;
        crate::space::check_space(&kernels_dir(&state), needed)?;
        self.quotas
            .enforce_disk(
                caller,
                uid,
                kernel_len + initrd_len + modules_len,
                &format!("kernel {name}"),
            )
            .await?;

        let core = self.clone();
        self.jobs()
            .start_with_result(
                "kernel-import",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let id = crate::artifacts::new_id()
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
                        // The copy is what is kept, so the copy is checked
                        // (a failure drops the staging directory with it).
                        let (bz, version) = place_kernel(&dir, &copy)?;
                        if bz != is_bzimage {
                            return Err(Error::invalid("the kernel changed while it was copied"));
                        }
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
    pub(in crate::artifacts) async fn record_kernel(
        &self,
        ctx: &JobContext,
        tmp: TmpDir,
        k: StagedKernel,
    ) -> Result<Option<Resource>> {
        let state = self.state.clone();
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
        let stored = crate::blocking::run(move || store.insert_kernel(&row)).await;
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
        self.authorizer
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
        let deleted = crate::blocking::run(move || store.delete_kernel(&id)).await;
        match deleted {
            Ok(_) => {}
            Err(e) if is_fk_violation(&e) => return Err(kernel_in_use(&kernel.name, &[])),
            Err(e) => return Err(Error::failed_with("deleting the kernel failed", &e)),
        }
        let dir = kernels_dir(&self.state).join(&kernel.id);
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
