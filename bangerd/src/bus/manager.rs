//! `org.banger.Manager` at `/org/banger/Manager`.

use std::sync::Arc;

use banger_dbus::options as opts;
use banger_dbus::{API_VERSION, CatalogEntry, DoctorCheck, image_path};
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, interface};

use super::options::{Options, parsed};
use super::{caller, job, to_wire};
use crate::artifacts::{ImageImport, ImageRegistration, KernelImport, Modules};
use crate::core::{Core, MaintainOptions, VERSION};
use crate::jobs::Resource;
use crate::update::UpdateRequest;

/// The manager object.
#[derive(Debug)]
pub struct ManagerObject {
    core: Arc<Core>,
}

impl ManagerObject {
    /// Serve `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// The daemon. Long operations return a job object path at once; follow the
/// job's `Progress` and `Completed` signals (subscribe before calling).
#[interface(name = "org.banger.Manager")]
impl ManagerObject {
    /// Check the host and report what works: an array of (name, verdict,
    /// detail, hint) where verdict is pass, warn or fail. Open to everyone.
    #[zbus(out_args("checks"))]
    async fn doctor(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<DoctorCheck>, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let checks = self.core.doctor(&caller).await;
        Ok(checks
            .into_iter()
            .map(|c| DoctorCheck {
                name: c.name.to_owned(),
                verdict: c.verdict.as_str().to_owned(),
                detail: c.detail,
                hint: c.hint,
            })
            .collect())
    }

    /// What became of job `job` (its number), whether its object is
    /// still on the bus or long gone: (state, error_name, message, result,
    /// stages), as its properties and Completed signal said. For the
    /// job's owner, root, or with org.banger.vm.manage-others.
    #[zbus(out_args("outcome"))]
    async fn job_outcome(
        &self,
        job: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<banger_dbus::JobOutcome, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let outcome = self.core.job_outcome(&caller, job).await.map_err(to_wire)?;
        if outcome.state != crate::jobs::JobState::Running {
            // What the job did is on the bus before its caller hears it
            // ended (the outcome is recorded before the front end
            // publishes the job's last events).
            self.core.jobs().published(super::PUBLISHED_LIMIT).await;
        }
        let (error_name, message) = match &outcome.error {
            None => (String::new(), String::new()),
            Some(e) => (super::error_name(e), e.message.clone()),
        };
        Ok(banger_dbus::JobOutcome {
            state: outcome.state.as_str().to_owned(),
            error_name,
            message,
            result: outcome
                .result
                .as_ref()
                .map(super::artifacts::path_of)
                .unwrap_or_else(banger_dbus::no_object),
            stages: job::stage_timings(outcome.stages),
        })
    }

    /// Start store maintenance (integrity check, history pruning,
    /// checkpoint, optimize; option "vacuum" (b) also vacuums). Returns the
    /// job. polkit action org.banger.maintain.
    #[zbus(out_args("job"))]
    async fn maintain(
        &self,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let options = MaintainOptions {
            vacuum: parsed(opts::Maintain::parse(&options))?.vacuum,
        };
        job::answer(conn, &self.core, self.core.maintain(&caller, options).await).await
    }

    /// Import a kernel into managed storage from host paths: `kernel` an
    /// ELF vmlinux or a bzImage. Options: "initrd" (s), "modules" (s, its
    /// lib/modules/VERSION directory). bangerd opens paths for root only:
    /// everyone else passes descriptors with ImportKernelFd (banger kernel
    /// import does). Returns the job; its Completed result is the new
    /// kernel object. polkit action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn import_kernel(
        &self,
        name: String,
        kernel: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let opts::ImportKernel { initrd, modules } = parsed(opts::ImportKernel::parse(&options))?;
        job::answer(
            conn,
            &self.core,
            self.core
                .artifacts()
                .import_kernel_paths(
                    &caller,
                    name,
                    kernel.into(),
                    initrd.map(Into::into),
                    modules.map(Into::into),
                )
                .await,
        )
        .await
    }

    /// Import a kernel into managed storage from descriptors the caller
    /// opened: `kernel` an ELF vmlinux or a bzImage (an ELF vmlinux is
    /// extracted from it for Firecracker). Options: "initrd" (h) an
    /// initramfs, "modules" (h) an uncompressed tar of its
    /// lib/modules/VERSION directory's contents in a regular file. Sizes
    /// are capped (limits.*). Returns the job; its Completed result is the
    /// new kernel object. polkit action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn import_kernel_fd(
        &self,
        name: String,
        kernel: zbus::OwnedFd,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let opts::ImportKernelFd { initrd, modules } =
            parsed(opts::ImportKernelFd::parse(&options))?;
        let req = KernelImport {
            name,
            kernel: std::fs::File::from(std::os::fd::OwnedFd::from(kernel)),
            initrd,
            modules: modules.map(Modules::Tar),
        };
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().import_kernel(&caller, req).await,
        )
        .await
    }

    /// Import an image into managed storage from descriptors the caller
    /// opened: `rootfs` an ext4 image, `kernel` a kernel name or id.
    /// Options: "work_seed" (h) an ext4 image of the rootfs's /root (made
    /// from the rootfs when absent), "services" (as) guest services
    /// readiness waits for as name:port, "init" (s) the init the kernel
    /// starts. Returns the job; its Completed result is the image object.
    /// polkit action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn import_image_fd(
        &self,
        name: String,
        rootfs: zbus::OwnedFd,
        kernel: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let opts::ImportImageFd {
            work_seed,
            services,
            init,
        } = parsed(opts::ImportImageFd::parse(&options))?;
        let req = ImageImport {
            name,
            rootfs: std::fs::File::from(std::os::fd::OwnedFd::from(rootfs)),
            kernel,
            work_seed,
            services,
            init,
        };
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().import_image(&caller, req).await,
        )
        .await
    }

    /// Delete a kernel by name or id, with its managed files. Refused with
    /// Busy while an image uses it. polkit action org.banger.image.manage.
    async fn delete_kernel(
        &self,
        kernel: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let id = self
            .core
            .artifacts()
            .kernel(&kernel)
            .await
            .ok()
            .map(|k| k.id);
        self.core
            .artifacts()
            .delete_kernel(&caller, &kernel)
            .await
            .map_err(to_wire)?;
        // Gone from the bus before the reply, not only when the event
        // mirror gets to it.
        if let Some(id) = id {
            let _ = super::artifacts::remove(conn.object_server(), &Resource::Kernel(id)).await;
        }
        Ok(())
    }

    /// Record an unmanaged image from host paths: `rootfs` an ext4 image,
    /// `kernel` a kernel name or id. Options: "work_seed" (s) host path of
    /// an ext4 image of the rootfs's /root, "services" (as) guest services
    /// readiness waits for as name:port, "init" (s) the init the kernel
    /// starts. Root only: everyone else imports with ImportImageFd (banger
    /// image register does). Returns the image object. polkit action
    /// org.banger.image.manage.
    #[zbus(out_args("image"))]
    async fn register_image(
        &self,
        name: String,
        rootfs: String,
        kernel: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let opts::RegisterImage {
            work_seed,
            services,
            init,
        } = parsed(opts::RegisterImage::parse(&options))?;
        let req = ImageRegistration {
            name,
            rootfs: rootfs.into(),
            kernel,
            work_seed: work_seed.map(Into::into),
            services,
            init,
        };
        let image = self
            .core
            .artifacts()
            .register_image(&caller, req)
            .await
            .map_err(to_wire)?;
        // Publish now, so the returned path exists when the caller looks.
        super::artifacts::refresh(
            conn.object_server(),
            &self.core,
            &crate::jobs::Resource::Image(image.id.clone()),
        )
        .await
        .map_err(|e| {
            banger_dbus::Reply::Banger(banger_dbus::Error::Failed(format!(
                "cannot publish the image: {e}"
            )))
        })?;
        Ok(image_path(&image.id))
    }

    /// Copy an unmanaged image (by name or id) into managed storage, making
    /// its work-seed if it has none. Returns the job; its Completed result
    /// is the image object. polkit action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn promote_image(
        &self,
        image: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().promote_image(&caller, &image).await,
        )
        .await
    }

    /// Delete an image by name or id; managed files go with it. Refused
    /// with Busy while an operation or a VM uses it. polkit action
    /// org.banger.image.manage.
    async fn delete_image(
        &self,
        image: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let id = self.core.artifacts().image(&image).await.ok().map(|i| i.id);
        self.core
            .delete_image(&caller, &image)
            .await
            .map_err(to_wire)?;
        if let Some(id) = id {
            let _ = super::artifacts::remove(conn.object_server(), &Resource::Image(id)).await;
        }
        Ok(())
    }

    /// Create a VM named `name` (a DNS label) from `image` (name or id;
    /// empty for the configured default image). Options: "vcpus" (u),
    /// "memory_mib" (u), "disk_bytes" (t, the work disk), "nat" (b),
    /// "peers" (b, talk with the other VMs that have it on),
    /// "autostart" (b, start it when bangerd first starts after a host
    /// boot), "ssh_keys" (as, public key lines for root), "start" (b, default
    /// true), "setup" (ay, a script run once as root after the first boot,
    /// at most 256 KiB), "mounts" (a(ssb), host folders: host directory,
    /// guest directory, read-only; QEMU only, served as the caller). Returns
    /// the VM object (state creating) and the job; the job's stages are
    /// resolve image, system disk, work disk, and when starting network, vmm
    /// start, agent ready, host folders, one per image service and setup. A
    /// failed or cancelled create removes everything it made, but a
    /// failed setup script leaves the VM running. polkit action
    /// org.banger.vm.create, and org.banger.vm.nat with "nat".
    #[zbus(out_args("vm", "job"), name = "CreateVM")]
    async fn create_vm(
        &self,
        name: String,
        image: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(opts::CreateVm::parse(&options))?;
        let req = crate::vm::VmRequest {
            name,
            image,
            vcpus: o.vcpus,
            memory_mib: o.memory_mib,
            disk_bytes: o.disk_bytes,
            nat: o.nat,
            peers: o.peers,
            autostart: o.autostart,
            ssh_keys: o.ssh_keys,
            start: o.start,
            setup: o.setup,
            mounts: o.mounts.into_iter().map(super::mount_in).collect(),
            cold_boot: o.cold_boot,
        };
        let made = self.core.vms().create_vm(&caller, req).await;
        super::vm::answer_new(conn, &self.core, made).await
    }

    /// Re-read bangerd.toml. A bad file is refused with InvalidArgument
    /// naming the key, and the configuration in force stays. polkit action
    /// org.banger.maintain.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        self.core.reload_config(&caller).await.map_err(to_wire)?;
        Ok(())
    }

    /// Update banger from its signed release channel, as a job. Options:
    /// "check" (b) only report what the channel offers (the job's last
    /// detail), "channel" (s) a channel URL instead of update.channel,
    /// "rollback" (b) return to the set before the last update. bangerd
    /// restarts itself through systemd afterwards; VMs keep running.
    /// polkit action org.banger.update.
    #[zbus(out_args("job"))]
    async fn update(
        &self,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let opts::Update {
            check,
            channel,
            rollback,
        } = parsed(opts::Update::parse(&options))?;
        let request = match (check, rollback) {
            (true, true) => {
                return Err(to_wire(crate::error::Error::invalid(
                    "Update: \"check\" and \"rollback\" exclude each other",
                )));
            }
            (false, true) if channel.is_some() => {
                return Err(to_wire(crate::error::Error::invalid(
                    "Update: a rollback uses no channel; drop \"channel\"",
                )));
            }
            (false, true) => UpdateRequest::Rollback,
            (true, false) => UpdateRequest::Check { channel },
            (false, false) => UpdateRequest::Install { channel },
        };
        job::answer(
            conn,
            &self.core,
            self.core.updates().update(&caller, request).await,
        )
        .await
    }

    /// The catalog of `kind` ("kernels" or "images") in use: its serial,
    /// whether it was fetched from the release channel (else built in),
    /// and its entries as (name, version, arch, description, url, size,
    /// kernel, min_banger, installed, usable); kernel is empty for
    /// kernels. Open to everyone.
    #[zbus(out_args("serial", "fetched", "entries"))]
    async fn list_available(
        &self,
        kind: &str,
    ) -> Result<(u64, bool, Vec<CatalogEntry>), banger_dbus::Reply> {
        let kind = crate::catalog::kind(kind).map_err(to_wire)?;
        let available = self
            .core
            .artifacts()
            .available(kind)
            .await
            .map_err(to_wire)?;
        Ok((
            available.serial,
            available.fetched,
            available
                .entries
                .into_iter()
                .map(|a| CatalogEntry {
                    name: a.entry.name,
                    version: a.entry.version,
                    arch: a.entry.arch,
                    description: a.entry.description,
                    url: a.entry.url,
                    size: a.entry.size,
                    kernel: a.entry.kernel.unwrap_or_default(),
                    min_banger: a.entry.min_banger,
                    installed: a.installed,
                    usable: a.usable,
                })
                .collect(),
        ))
    }

    /// Pull the kernel-catalog entry `name` into managed storage, as a
    /// job: download (bytes, rate, ETA; a dropped connection is resumed),
    /// size and SHA-256 checked against the signed catalog, unpack,
    /// record. A pull of an entry already being pulled returns that job.
    /// No options yet. Its Completed result is the new kernel object.
    /// polkit action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn pull_kernel(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        parsed(opts::NoOptions::parse("PullKernel", &options))?;
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().pull_kernel(&caller, &name).await,
        )
        .await
    }

    /// Build a kernel from the host's Debian archive into managed storage,
    /// as a job: its apt sources (banger's own package lists, the host's
    /// left alone), the package (option "package" (s), default what
    /// linux-image-cloud-amd64 depends on) downloaded with its size and
    /// SHA-256 from the signed indexes, unpacked, a small initramfs made
    /// (virtio, vsock, virtiofs and console modules), recorded as a system
    /// kernel named `name` ("" for debian-CODENAME). Option "from" (s)
    /// is "debian", the only source. No package is installed on the
    /// host. Its Completed result is the new kernel object. polkit action
    /// org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn build_kernel(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(opts::BuildKernel::parse(&options))?;
        if let Some(from) = o.from.as_deref()
            && from != "debian"
        {
            return Err(to_wire(crate::error::Error::invalid(format!(
                "BuildKernel option from is {from:?}; the only source is \"debian\""
            ))));
        }
        let request = crate::artifacts::build::KernelBuild {
            name,
            package: o.package,
        };
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().build_kernel(&caller, request).await,
        )
        .await
    }

    /// Build an image from the recipe `recipe` (a directory under
    /// images.recipes; the package ships debian-bookworm; "" for the
    /// configured default image) into managed
    /// storage, as a job: the kernel it boots (option "kernel" (s),
    /// default the one BuildKernel makes here) built first when missing
    /// (stage "build kernel NAME"), the recipe's Debian suite and
    /// packages bootstrapped from images.mirror (cached per suite, mirror
    /// and packages), banger-agent and the kernel's modules put in, the
    /// recipe's configure run, the root filesystem and its work-seed made
    /// and a system image recorded under option "name" (s, default the
    /// recipe's). Its Completed result is the new image object. polkit
    /// action org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn build_image(
        &self,
        recipe: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(opts::BuildImage::parse(&options))?;
        let request = crate::artifacts::build::image::ImageBuild {
            recipe,
            name: o.name,
            kernel: o.kernel,
        };
        job::answer(
            conn,
            &self.core,
            self.core.artifacts().build_image(&caller, request).await,
        )
        .await
    }

    /// Pull the image-catalog entry `reference` ("" for the configured
    /// default image) into managed storage, as a job, pulling its kernel
    /// first when it is missing (stage "pull kernel NAME"); otherwise as
    /// PullKernel. A reference with a "/" is an OCI image
    /// (registry/repo[:tag|@digest]): its linux/amd64 layers are fetched,
    /// applied and made an ext4 image; options "name" (s), "kernel" (s),
    /// and "username" (s) with "password" (s) for a registry that wants
    /// credentials, apply to it only. The image gets its work-seed. Its Completed
    /// result is the new image object. polkit action
    /// org.banger.image.manage.
    #[zbus(out_args("job"))]
    async fn pull_image(
        &self,
        reference: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let started = if reference.contains('/') {
            let o = parsed(opts::PullOci::parse(&options))?;
            let credentials = match o.login {
                None => None,
                Some((u, p)) => {
                    Some(crate::artifacts::oci::registry::Credentials::new(u, p).map_err(to_wire)?)
                }
            };
            let request = crate::artifacts::oci::OciPull {
                reference,
                name: o.name,
                kernel: o.kernel,
                credentials,
            };
            self.core.artifacts().pull_oci(&caller, request).await
        } else {
            parsed(opts::NoOptions::parse("PullImage", &options))?;
            self.core.artifacts().pull_image(&caller, &reference).await
        };
        job::answer(conn, &self.core, started).await
    }

    /// Version of bangerd.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        VERSION.to_owned()
    }

    /// Version of this D-Bus API; grows when members are added.
    #[zbus(property(emits_changed_signal = "const"))]
    fn api_version(&self) -> u32 {
        API_VERSION
    }

    /// One-line summary, e.g. "idle", "1 job running" or
    /// "2 VMs running, 1 job".
    #[zbus(property)]
    fn status(&self) -> String {
        self.core.status_line()
    }
}
