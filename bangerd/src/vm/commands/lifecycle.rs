//! The VM lifecycle jobs: create, start, stop, restart, kill, delete, set.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;

use super::Vms;
use crate::artifacts::validate;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::Resource;
use crate::jobs::{JobContext, JobEvent, JobId};
use crate::store::unix_us;
use crate::vm::disk::{self, DiskMethod};
use crate::vm::process::ProcessId;
use crate::vm::quota::Demand;
use crate::vm::snapshot;
use crate::vm::{Vm, VmEvent, VmRequest, VmState, validate_sizes, validate_ssh_key};

use super::{VmChanges, blocking, check_vmm, store_err, vmm_named};

impl Vms {
    /// Start a create job. Returns the new VM's id and the job.
    pub async fn create_vm(
        self: &Arc<Self>,
        caller: &Caller,
        req: VmRequest,
    ) -> Result<(String, JobId)> {
        self.authorizer.authorize(caller, Action::VmCreate).await?;
        if req.nat == Some(true) {
            self.authorizer.authorize(caller, Action::VmNat).await?;
        }
        validate::name("vm", &req.name)?;
        let config = self.config();
        let vcpus = req.vcpus.unwrap_or(config.vm.vcpus);
        let memory_mib = req.memory_mib.unwrap_or(config.vm.memory_mib);
        let disk_bytes = req.disk_bytes.unwrap_or(config.vm.disk_mib << 20);
        validate_sizes(vcpus, memory_mib, disk_bytes)?;
        let quota = self.quotas.applies(caller).await;
        for key in &req.ssh_keys {
            validate_ssh_key(key)?;
        }
        if let Some(script) = &req.setup {
            super::setup::validate_setup(script)?;
        }
        crate::vm::validate_mounts(&req.mounts)?;
        check_vmm(&config)?;
        if !req.mounts.is_empty() {
            super::folders::check_folders_possible(&config)?;
        }
        let image_ref = if req.image.is_empty() {
            config.vm.default_image.clone()
        } else {
            req.image.clone()
        };
        let image = self
            .artifacts
            .image(&image_ref)
            .await
            .map_err(|e| match e.kind {
                ErrorKind::NotFound => Error::not_found(format!(
                    "there is no image {image_ref:?}; see banger image list, or register one"
                )),
                _ => e,
            })?;
        self.artifacts.authorize_use(caller, &image).await?;
        crate::artifacts::commands::paths_of_root(&image)?;
        let kernel = self.artifacts.kernel_by_id(&image.kernel_id).await?;
        // The system disk costs up to the rootfs's data, the work disk its seed.
        let needed = crate::artifacts::files::disk_usage(&image.rootfs)
            + image
                .work_seed
                .as_deref()
                .map(crate::artifacts::files::disk_usage)
                .unwrap_or(64 << 20);
        std::fs::create_dir_all(crate::vm::vms_dir(&self.dirs.state))
            .map_err(|e| Error::failed(format!("cannot create the VM directory: {e}")))?;
        crate::space::check_space(&self.dirs.state, needed)?;

        let id = crate::artifacts::new_id()
            .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        let vm = Vm {
            id: id.clone(),
            name: req.name.clone(),
            owner_uid: caller.uid,
            image_id: image.id.clone(),
            kernel_id: kernel.id.clone(),
            vcpus,
            memory_mib,
            disk_bytes,
            nat: req.nat.unwrap_or(false),
            peers: req.peers.unwrap_or(false),
            autostart: req.autostart.unwrap_or(false),
            state: VmState::Creating,
            vmm: None,
            pid: None,
            pid_start: None,
            tap: None,
            ssh_keys: req.ssh_keys.clone(),
            disk_method: None,
            created_at: unix_us(SystemTime::now()),
            last_error: String::new(),
            forwards: Vec::new(),
            mounts: req.mounts.clone(),
            suspended: false,
        };
        let demand = Demand {
            vm: true,
            run: req.start.then_some((vcpus, memory_mib)),
            vcpus_per_vm: vcpus,
            disk_bytes,
        };
        self.record_new(&vm, demand, quota).await?;
        self.announce(&id);
        tracing::info!(banger_vm_id = %id, banger_vm_name = %vm.name, "creating vm");
        let core = self.clone();
        let claim = self.claim_vm(&vm)?;
        let start = req.start;
        let setup = req.setup;
        let cold_boot = req.cold_boot;
        let job = self.jobs().start_cooperative(
            "create-vm",
            caller.uid,
            Action::VmCreate,
            move |ctx| async move {
                let _claim = claim;
                let made = core
                    .build_vm(&ctx, &vm, (start, cold_boot), setup, quota)
                    .await;
                core.finish_new(&ctx, &vm, made, start, "create").await
            },
        );
        self.new_vm_job(id, job.await).await
    }

    /// The end of a job that made `vm` (`what` names the job in logs):
    /// once `made`, a started VM runs its setup script (a failing one
    /// leaves the VM as it is); a failure removes everything it made.
    pub(super) async fn finish_new(
        &self,
        ctx: &JobContext,
        vm: &Vm,
        made: Result<()>,
        start: bool,
        what: &str,
    ) -> Result<Option<Resource>> {
        match made {
            Ok(()) if start => self
                .run_setup(ctx, &vm.id, 0.95)
                .await
                .map(|()| Some(Resource::Vm(vm.id.clone()))),
            Ok(()) => Ok(Some(Resource::Vm(vm.id.clone()))),
            Err(e) => {
                tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "{what} failed, removing what it made: {e}");
                if let Err(c) = self.destroy(&vm.id).await {
                    tracing::error!(banger_vm_id = %vm.id, "cleanup after a failed {what} failed: {c}");
                }
                Err(e)
            }
        }
    }

    /// The new VM `id` and the job making it; when the job could not
    /// start, the VM's row and files go.
    pub(super) async fn new_vm_job(
        &self,
        id: String,
        job: Result<JobId>,
    ) -> Result<(String, JobId)> {
        match job {
            Ok(job) => Ok((id, job)),
            Err(e) => {
                let _ = self.destroy(&id).await;
                Err(e)
            }
        }
    }

    /// Record the new VM `row` (state creating) once the owner's quota
    /// (when `quota`) allows `demand`; a taken name is `AlreadyExists`.
    pub(super) async fn record_new(
        self: &Arc<Self>,
        row: &Vm,
        demand: Demand,
        quota: bool,
    ) -> Result<()> {
        let core = self.clone();
        let row = row.clone();
        blocking(move || {
            let held = core.quotas.lock();
            let name = &row.name;
            if quota {
                core.quotas
                    .check(&held, row.owner_uid, &demand, None, &format!("vm {name}"))?;
            }
            core.store.insert_vm(&row).map_err(|e| {
                if crate::artifacts::store::is_unique_violation(&e) {
                    Error::new(
                        ErrorKind::AlreadyExists,
                        format!("a vm named {name} exists already; pick another name or delete it"),
                    )
                } else {
                    Error::failed_with("recording the vm failed", &e)
                }
            })
        })
        .await
    }

    async fn build_vm(
        self: &Arc<Self>,
        ctx: &JobContext,
        vm: &Vm,
        (start, cold_boot): (bool, bool),
        setup: Option<Vec<u8>>,
        quota: bool,
    ) -> Result<()> {
        ctx.stage("resolve image", 0.0).await?;
        let image = self.artifacts.ensure_work_seed(&vm.image_id).await?;
        let paths = self.vm_paths(&vm.id);
        // A template of this image and shape: its disks, and its guest
        // restored and renewed instead of a boot.
        if start && !cold_boot {
            let kernel = self.artifacts.kernel_by_id(&vm.kernel_id).await?;
            if let Ok((vmm, accel, _)) = self.pick_vmm(&kernel).await
                && let Some(template) = self.usable_template(vm, vmm.as_ref(), accel, &kernel).await
            {
                self.disks_from_template(ctx, vm, &template).await?;
                if let Some(script) = setup {
                    self.keep_setup(&vm.id, script).await?;
                }
                self.boot(ctx, &vm.id, 0.3, quota).await?;
                // One that did not load is gone: made again.
                self.make_template_later(vm).await;
                return Ok(());
            }
        }

        ctx.stage("system disk", 0.1).await?;
        let (rootfs, sys, cow) = (
            image.rootfs.clone(),
            paths.system_disk.clone(),
            paths.system_cow.clone(),
        );
        let dir = paths.dir.clone();
        // A dm snapshot where device-mapper works (constant time), else a
        // reflink clone, else a sparse copy.
        let dm = self.dm.available();
        let method = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
            if dm {
                let bytes = std::fs::metadata(&rootfs)
                    .map_err(|e| Error::failed(format!("cannot read {}: {e}", rootfs.display())))?
                    .len();
                snapshot::make_cow(&cow, bytes)?;
                return Ok(DiskMethod::DeviceMapper);
            }
            disk::copy_disk(&rootfs, &sys)
        })
        .await?;
        ctx.progress(method.as_str(), 0.2, None);

        ctx.stage("work disk", 0.2).await?;
        let (seed, work, bytes, keys) = (
            image.work_seed.clone(),
            paths.work_disk.clone(),
            vm.disk_bytes,
            vm.ssh_keys.clone(),
        );
        let tools = self.tools.clone();
        blocking(move || disk::make_work_disk(&*tools, seed.as_deref(), &work, bytes, &keys))
            .await?;
        if let Some(script) = setup {
            self.keep_setup(&vm.id, script).await?;
        }
        ctx.check_cancelled()?;
        self.transition(&vm.id, VmEvent::Created, move |v| {
            v.disk_method = Some(method);
        })
        .await?;
        if vm.autostart {
            self.sync_autostart_flag().await;
        }
        if start {
            self.boot(ctx, &vm.id, 0.3, quota).await?;
            // Later creates of this image and shape restore instead.
            if !cold_boot {
                self.make_template_later(vm).await;
            }
        }
        Ok(())
    }

    /// Start a stopped VM as a job.
    pub async fn start_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        vm.state.after(VmEvent::Start, &vm.name)?;
        check_vmm(&self.config())?;
        // Checked here so the call itself says no, and again when the VM
        // turns Starting (another start may have come between).
        let quota = self.quotas.applies(caller).await;
        if quota {
            let held = self.quotas.lock();
            self.quotas.check(
                &held,
                vm.owner_uid,
                &Demand::start(vm.vcpus, vm.memory_mib),
                Some(&vm.id),
                &format!("vm {}", vm.name),
            )?;
        }
        let claim = self.claim_vm(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "start-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    core.boot(&ctx, &vm.id, 0.0, quota).await?;
                    core.run_setup(&ctx, &vm.id, 0.95).await?;
                    Ok(Some(Resource::Vm(vm.id)))
                },
            )
            .await
    }

    /// Stop: ask the agent for a clean shutdown, then the VMM, then kill.
    async fn shut_down(&self, ctx: &JobContext, id: &str, base: f64) -> Result<()> {
        let vm = self.transition(id, VmEvent::Stop, |_| {}).await?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            self.transition(id, VmEvent::Exited, |_| {}).await?;
            return Ok(());
        };
        let process = ProcessId { pid, start };
        let config = self.config();
        let grace = Duration::from_secs(config.vm.stop_timeout_secs);
        ctx.stage("shutdown", base).await?;
        let paths = self.vm_paths(id);
        let vmm = vmm_named(&config, vm.vmm)?;
        let asked = match self
            .agent
            .connect(&vmm.agent(&paths), Duration::from_secs(3))
            .await
        {
            Ok(mut conn) => conn.shutdown(false, Duration::from_secs(5)).await.is_ok(),
            Err(_) => false,
        };
        if !asked {
            let _ = vmm.request_shutdown(&paths).await;
        }
        if !self.wait_recorded(id, process, grace).await {
            ctx.stage("force", base + 0.5).await?;
            tracing::warn!(banger_vm_id = %id, "the guest did not shut down within {grace:?}; killing its vmm");
            let _ = self.supervisor.signal(id, process, Signal::SIGKILL).await;
            if !self
                .wait_recorded(id, process, Duration::from_secs(15))
                .await
            {
                return Err(Error::failed(format!(
                    "the vmm (pid {pid}) of vm {} did not exit even after SIGKILL",
                    vm.name
                )));
            }
        }
        Ok(())
    }

    /// [`Vms::shut_down`] when VM `id` has a VMM process; nothing otherwise.
    async fn shut_down_if_running(&self, ctx: &JobContext, id: &str) -> Result<()> {
        if self.vm_by_id(id).await?.state.has_process() {
            self.shut_down(ctx, id, 0.0).await?;
        }
        Ok(())
    }

    /// Stop a VM as a job.
    pub async fn stop_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        // Stopping a suspended VM drops its saved memory: its next start
        // boots, as after a power cut.
        if vm.state == VmState::Stopped && vm.suspended {
            let claim = self.claim_vm(&vm)?;
            let core = self.clone();
            return self
                .jobs()
                .start_cooperative(
                    "stop-vm",
                    caller.uid,
                    Action::VmManage,
                    move |ctx| async move {
                        let _claim = claim;
                        ctx.stage("discard saved memory", 0.0).await?;
                        core.drop_suspend(&vm.id).await?;
                        Ok(Some(Resource::Vm(vm.id)))
                    },
                )
                .await;
        }
        vm.state.after(VmEvent::Stop, &vm.name)?;
        let claim = self.claim_vm(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "stop-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    core.shut_down(&ctx, &vm.id, 0.0).await?;
                    Ok(Some(Resource::Vm(vm.id)))
                },
            )
            .await
    }

    /// Stop (if running) and start again, as one job.
    pub async fn restart_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        if vm.state != VmState::Running && vm.state != VmState::Stopped {
            vm.state.after(VmEvent::Stop, &vm.name)?;
        }
        check_vmm(&self.config())?;
        let quota = self.quotas.applies(caller).await;
        let claim = self.claim_vm(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "restart-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    core.shut_down_if_running(&ctx, &vm.id).await?;
                    // A restart boots: a suspended VM's memory goes first.
                    if core.vm_by_id(&vm.id).await?.suspended {
                        ctx.stage("discard saved memory", 0.1).await?;
                        core.drop_suspend(&vm.id).await?;
                    }
                    core.boot(&ctx, &vm.id, 0.4, quota).await?;
                    core.run_setup(&ctx, &vm.id, 0.95).await?;
                    Ok(Some(Resource::Vm(vm.id)))
                },
            )
            .await
    }

    /// Send `signal` (a number) to a running VM's VMM.
    pub async fn kill_vm(&self, caller: &Caller, id: &str, signal: i32) -> Result<()> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        let signal = Signal::try_from(signal)
            .map_err(|_| Error::invalid(format!("{signal} is not a signal number")))?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("vm {} is not running", vm.name),
            ));
        };
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, ?signal, "signalling the vmm");
        self.supervisor
            .signal(&vm.id, ProcessId { pid, start }, signal)
            .await
    }

    /// Delete a VM as a job: stop it if it runs, then remove its network,
    /// disks, sockets and record.
    pub async fn delete_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        let claim = self.claim_vm(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "delete-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    core.shut_down_if_running(&ctx, &vm.id).await?;
                    ctx.stage("remove", 0.7).await?;
                    core.transition(&vm.id, VmEvent::Delete, |_| {}).await?;
                    core.destroy(&vm.id).await?;
                    Ok(None)
                },
            )
            .await
    }

    /// Remove everything of VM `id`: process, network, files, row, lease.
    pub(super) async fn destroy(&self, id: &str) -> Result<()> {
        self.stop_forwards(id);
        self.halt(id).await;
        let Some(vm) = self
            .store
            .vm(id)
            .map_err(store_err("reading the vm failed"))?
        else {
            return Ok(());
        };
        if let Some(ip) = self.vm_ipv4(id).await
            && let Some(net) = self.network_if_up().await
        {
            net.forget(id, &vm.name, ip, vm.tap.as_deref()).await?;
        }
        self.system_disk_down(&vm).await;
        let paths = self.vm_paths(id);
        for dir in [&paths.dir, &paths.run] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::failed(format!(
                        "cannot remove {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        let store = self.store.clone();
        let owned = id.to_owned();
        blocking(move || {
            store
                .delete_vm(&owned)
                .map_err(store_err("removing the vm failed"))
        })
        .await?;
        tracing::info!(banger_vm_id = %id, banger_vm_name = %vm.name, "vm deleted");
        if vm.autostart {
            self.sync_autostart_flag().await;
        }
        self.jobs()
            .send(JobEvent::ResourceRemoved(Resource::Vm(id.to_owned())));
        Ok(())
    }

    /// Change a VM's sizes (stopped only), NAT, peers or autostart (any
    /// time).
    pub async fn set_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        changes: VmChanges,
    ) -> Result<Vm> {
        let vm = self.vm_by_id(id).await?;
        // Everything the call may change is authorized before anything
        // changes.
        self.authorize_vm(caller, &vm).await?;
        let nat_change = changes.nat.filter(|nat| *nat != vm.nat);
        if nat_change.is_some() {
            self.authorizer.authorize(caller, Action::VmNat).await?;
        }
        let sizes =
            changes.vcpus.is_some() || changes.memory_mib.is_some() || changes.disk_bytes.is_some();
        if changes == VmChanges::default() {
            return Err(Error::invalid(
                "nothing to change: give vcpus, memory_mib, disk_bytes, nat, peers, autostart or mounts",
            ));
        }
        if let Some(mounts) = &changes.mounts {
            // Folders are served as the owner: someone else (even with
            // manage-others) would reach the owner's files through a
            // guest they may enter.
            if caller.uid != vm.owner_uid && caller.uid != 0 {
                return Err(Error::denied(format!(
                    "only its owner (uid {}) may change the host folders of vm {}: they are served as the owner",
                    vm.owner_uid, vm.name
                )));
            }
            crate::vm::validate_mounts(mounts)?;
            if !mounts.is_empty() {
                super::folders::check_folders_possible(&self.config())?;
            }
        }
        let vcpus = changes.vcpus.unwrap_or(vm.vcpus);
        let memory = changes.memory_mib.unwrap_or(vm.memory_mib);
        let disk_bytes = changes.disk_bytes.unwrap_or(vm.disk_bytes);
        validate_sizes(vcpus, memory, disk_bytes)?;
        if disk_bytes < vm.disk_bytes {
            return Err(Error::invalid(format!(
                "the work disk of {} is {} bytes; it can grow but not shrink",
                vm.name, vm.disk_bytes
            )));
        }
        let demand = Demand {
            vcpus_per_vm: changes.vcpus.unwrap_or(0),
            ..Demand::disk(disk_bytes - vm.disk_bytes)
        };
        self.quotas
            .enforce(
                caller,
                vm.owner_uid,
                &demand,
                None,
                &format!("vm {}", vm.name),
            )
            .await?;
        let _claim = self.claim_vm(&vm)?;
        if (sizes || changes.mounts.is_some()) && vm.state != VmState::Stopped {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is {}: stop it to change vcpus, memory, disk size or host folders (banger vm stop {})",
                    vm.name,
                    vm.state.as_str(),
                    vm.name
                ),
            ));
        }
        // Saved memory fits only the machine and disks it was saved with.
        if vm.suspended && (sizes || changes.mounts.is_some()) {
            self.drop_suspend(&vm.id).await?;
        }
        if disk_bytes > vm.disk_bytes {
            let work = self.vm_paths(&vm.id).work_disk;
            let tools = self.tools.clone();
            blocking(move || disk::grow_ext4(&*tools, &work, disk_bytes)).await?;
        }
        if let Some(nat) = nat_change
            && vm.state.has_process()
            && let Some(ip) = self.vm_ipv4(&vm.id).await
        {
            self.network().await?.set_nat(ip, nat).await?;
        }
        if let Some(peers) = changes.peers.filter(|p| *p != vm.peers)
            && vm.state.has_process()
            && let Some(ip) = self.vm_ipv4(&vm.id).await
        {
            self.network().await?.set_peers(ip, peers).await?;
        }
        let autostart_changed = changes.autostart.is_some();
        let set = self
            .modify(&vm.id, move |v| {
                if let Some(mounts) = changes.mounts {
                    v.mounts = mounts;
                }
                v.vcpus = vcpus;
                v.memory_mib = memory;
                v.disk_bytes = disk_bytes;
                if let Some(nat) = changes.nat {
                    v.nat = nat;
                }
                if let Some(peers) = changes.peers {
                    v.peers = peers;
                }
                if let Some(autostart) = changes.autostart {
                    v.autostart = autostart;
                }
            })
            .await;
        if autostart_changed {
            self.sync_autostart_flag().await;
        }
        set
    }
}
