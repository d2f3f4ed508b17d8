//! `VM.Clone`: a new VM made of copies of a stopped VM's disks, by the
//! method create uses (a reflink where the file system shares extents,
//! else a sparse copy; a device-mapper system disk copies its change
//! store and keeps the image as its origin). The clone has its own id,
//! name, lease (address and MAC) and, through `banger.id=` on the kernel
//! command line, its own SSH host keys and machine id.

use std::sync::Arc;
use std::time::SystemTime;

use super::Vms;
use super::blocking;
use super::snapshots::disk_files;
use crate::artifacts::validate;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobId};
use crate::store::unix_us;
use crate::vm::disk::{self, DiskMethod};
use crate::vm::quota::Demand;
use crate::vm::{Vm, VmEvent, VmState};

impl Vms {
    /// Start a job that clones the stopped VM `source` as `name` (and
    /// boots the clone when `start`). Returns the clone's id and the job.
    pub async fn clone_vm(
        self: &Arc<Self>,
        caller: &Caller,
        source: &str,
        name: String,
        start: bool,
    ) -> Result<(String, JobId)> {
        let src = self.vm_by_id(source).await?;
        self.authorize_vm(caller, &src).await?;
        self.authorizer.authorize(caller, Action::VmCreate).await?;
        if src.nat {
            self.authorizer.authorize(caller, Action::VmNat).await?;
        }
        validate::name("vm", &name)?;
        let config = self.config();
        super::check_vmm(&config)?;
        let image = self.artifacts.image_by_id(&src.image_id).await?;
        self.artifacts.authorize_use(caller, &image).await?;
        // Held until the disks are copied: nothing starts it meanwhile.
        let source_claim = self.claim_vm(&src)?;
        if src.state != VmState::Stopped {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is {}: a clone copies a stopped VM's disks; stop it first (banger vm stop {})",
                    src.name,
                    src.state.as_str(),
                    src.name
                ),
            ));
        }
        self.disks_with_room_for_a_copy(&src)?;

        let quota = self.quotas.applies(caller).await;
        let id = crate::artifacts::new_id()
            .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        let vm = src.copy_of(id.clone(), name, caller.uid, unix_us(SystemTime::now()));
        let demand = Demand {
            vm: true,
            run: start.then_some((vm.vcpus, vm.memory_mib)),
            vcpus_per_vm: vm.vcpus,
            disk_bytes: vm.disk_bytes,
        };
        self.record_new(&vm, demand, quota).await?;
        self.announce(&id);
        tracing::info!(
            banger_vm_id = %id,
            banger_vm_name = %vm.name,
            "cloning vm {} ({})",
            src.name,
            src.id
        );
        let core = self.clone();
        let claim = self.claim_vm(&vm)?;
        let job = self.jobs().start_cooperative(
            "clone-vm",
            caller.uid,
            Action::VmCreate,
            move |ctx| async move {
                let _claim = claim;
                let made = core.copy_disks(&ctx, &src, &vm).await;
                drop(source_claim);
                let made = match made {
                    Ok(()) if start => core.boot(&ctx, &vm.id, 0.5, quota).await,
                    other => other,
                };
                core.finish_new(&ctx, &vm, made, start, "clone").await
            },
        );
        self.new_vm_job(id, job.await).await
    }

    /// Copy `src`'s disks (and a setup script that has not run yet) to
    /// the new VM `vm`, then mark it created.
    pub(super) async fn copy_disks(&self, ctx: &JobContext, src: &Vm, vm: &Vm) -> Result<()> {
        // The clone's disks are made as its source's were.
        let [sys_from, work_from] = disk_files(&self.vm_paths(&src.id), src.disk_method);
        let to = self.vm_paths(&vm.id);
        let [sys_to, work_to] = disk_files(&to, src.disk_method);
        ctx.stage("system disk", 0.0).await?;
        let dir = to.dir.clone();
        let copied = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
            disk::copy_disk(&sys_from, &sys_to)
        })
        .await?;
        let method = if src.disk_method == Some(DiskMethod::DeviceMapper) {
            DiskMethod::DeviceMapper
        } else {
            copied
        };
        ctx.progress(copied.as_str(), 0.25, None);
        ctx.check_cancelled()?;

        ctx.stage("work disk", 0.25).await?;
        let (setup_from, setup_to) = (self.setup_path(&src.id), self.setup_path(&vm.id));
        let copied = blocking(move || {
            let method = disk::copy_disk(&work_from, &work_to)?;
            match std::fs::copy(&setup_from, &setup_to) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::failed(format!(
                        "cannot copy {}: {e}",
                        setup_from.display()
                    )));
                }
            }
            Ok(method)
        })
        .await?;
        ctx.progress(copied.as_str(), 0.5, None);
        ctx.check_cancelled()?;
        self.transition(&vm.id, VmEvent::Created, move |v| {
            v.disk_method = Some(method);
        })
        .await?;
        Ok(())
    }
}
