//! Image commands: register, import, promote, delete, and the lazily made
//! work seed.

use std::sync::Arc;
use std::time::SystemTime;

use super::{
    ImageClaim, TmpDir, already_exists, blocking, only_root_names_paths, paths_of_root, ticker,
};
use crate::artifacts::Artifacts;
use crate::artifacts::files;
use crate::artifacts::store::{is_fk_violation, is_unique_violation};
use crate::artifacts::validate::{self, Kind, Reader};
use crate::artifacts::{Image, ImageImport, ImageRegistration, images_dir};
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobEvent, JobId, Resource};
use crate::store::unix_us;

impl Artifacts {
    /// Register an unmanaged image from host paths: root only (everyone
    /// else imports from descriptors with [`Artifacts::import_image`]).
    pub async fn register_image(&self, caller: &Caller, req: ImageRegistration) -> Result<Image> {
        self.authorizer
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
            id: crate::artifacts::new_id()
                .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?,
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
        let stored = crate::blocking::run({
            let store = self.store().clone();
            move || store.insert_image(&row)
        })
        .await;
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
        self.authorizer
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
        let state = self.state.clone();
        std::fs::create_dir_all(images_dir(&state))
            .map_err(|e| Error::failed(format!("cannot create the image directory: {e}")))?;
        let needed = rootfs_used + seed.as_ref().map_or(64 << 20, |(_, (_, used))| *used);
        crate::space::check_space(&images_dir(&state), needed)?;
        self.quotas
            .enforce_disk(caller, caller.uid, rootfs_len, &format!("image {name}"))
            .await?;

        let core = self.clone();
        let uid = caller.uid;
        self.jobs()
            .start_with_result(
                "image-import",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let id = crate::artifacts::new_id()
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
                        crate::artifacts::pull::StagedImage {
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
        self.authorizer
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
        let state = self.state.clone();
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
                let tools = self.tools.clone();
                blocking(move || files::make_work_seed(&*tools, &rootfs, &dst)).await?;
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
        self.authorizer
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
        let dir = images_dir(&self.state).join(&image.id);
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
        let dir = images_dir(&self.state).join(&image.id);
        let rootfs = image.rootfs.clone();
        let tools = self.tools.clone();
        let sha_and_path = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
            let scratch = TmpDir::create(dir.join(".tmp-seed"))?;
            let tmp_seed = scratch.path().join("work-seed.ext4");
            files::make_work_seed(&*tools, &rootfs, &tmp_seed)?;
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
}
