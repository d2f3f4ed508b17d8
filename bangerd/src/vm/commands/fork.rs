//! `VM.Fork`: running copies of a running VM. The source is paused, its
//! memory and device state written once, its disks copied (as a clone's
//! are) while it stands still, and it runs on; each fork then starts from
//! that state and its own disks, and takes its own identity through the
//! agent (`Renew`: randomness, clock, names, ids, address, keys).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::Vms;
use super::blocking;
use super::suspend::{StateFiles, adopt_state, save_partial, state_key, suspendable};
use super::vmm_choice::kernel_file;
use crate::artifacts::validate;
use crate::auth::{Action, Caller};
use crate::error::{Error, Result};
use crate::jobs::{JobContext, JobId, Resource};
use crate::store::unix_us;
use crate::vm::Vm;
use crate::vm::quota::Demand;
use crate::vm::vmm::Vmm;

/// The most forks one call makes.
pub const MAX_FORKS: u32 = 16;

/// The names of `count` forks called `name`: `name` itself for one,
/// `name-1` … `name-N` for more.
pub fn fork_names(name: &str, count: u32) -> Vec<String> {
    if count == 1 {
        return vec![name.to_owned()];
    }
    (1..=count).map(|i| format!("{name}-{i}")).collect()
}

impl Vms {
    /// Start a job that forks the running VM `source` into `count` new
    /// running VMs named after `name` ([`fork_names`]). Returns their ids
    /// and the job.
    pub async fn fork_vm(
        self: &Arc<Self>,
        caller: &Caller,
        source: &str,
        name: String,
        count: u32,
    ) -> Result<(Vec<String>, JobId)> {
        let src = self.vm_by_id(source).await?;
        self.authorize_vm(caller, &src).await?;
        self.authorizer.authorize(caller, Action::VmCreate).await?;
        if src.nat {
            self.authorizer.authorize(caller, Action::VmNat).await?;
        }
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(Error::invalid(format!(
                "count {count}: a fork makes 1 to {MAX_FORKS} VMs"
            )));
        }
        let names = fork_names(&name, count);
        for n in &names {
            validate::name("vm", n)?;
        }
        let config = self.config();
        super::check_vmm(&config)?;
        let image = self.artifacts.image_by_id(&src.image_id).await?;
        self.artifacts.authorize_use(caller, &image).await?;
        let vmm = suspendable(&config, &src).map_err(|e| {
            Error::new(
                e.kind,
                e.message.replace("can be suspended", "can be forked"),
            )
        })?;
        if !vmm.portable_snapshots() {
            return Err(Error::unavailable(format!(
                "vm {} runs under {} without its jailer, whose saved state names the disks of the vm it came from, so a fork would write to the source's: install Firecracker's jailer (vm.jailer_bin in bangerd.toml)",
                src.name,
                vmm.name()
            )));
        }
        // Held until its disks are copied and it runs again.
        let source_claim = self.claim_vm(&src)?;
        self.disks_with_room_for_a_copy(&src)?;
        let quota = self.quotas.applies(caller).await;
        let mut forks: Vec<Vm> = Vec::new();
        for n in names {
            let id = crate::artifacts::new_id()
                .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
            let vm = src.copy_of(id, n, caller.uid, unix_us(SystemTime::now()));
            let demand = Demand {
                vm: true,
                run: Some((vm.vcpus, vm.memory_mib)),
                vcpus_per_vm: vm.vcpus,
                disk_bytes: vm.disk_bytes,
            };
            if let Err(e) = self.record_new(&vm, demand, quota).await {
                for made in &forks {
                    let _ = self.destroy(&made.id).await;
                }
                return Err(e);
            }
            self.announce(&vm.id);
            forks.push(vm);
        }
        tracing::info!(
            banger_vm_id = %src.id,
            banger_vm_name = %src.name,
            count,
            "forking vm"
        );
        let mut claims = Vec::new();
        for vm in &forks {
            claims.push(self.claim_vm(vm)?);
        }
        let ids: Vec<String> = forks.iter().map(|v| v.id.clone()).collect();
        let core = self.clone();
        let job = self
            .jobs()
            .start_cooperative(
                "fork-vm",
                caller.uid,
                Action::VmCreate,
                move |ctx| async move {
                    let _claims = claims;
                    let made = core.fork(&ctx, &src, &forks, vmm.as_ref()).await;
                    drop(source_claim);
                    let mut made = made;
                    for vm in &forks {
                        if made.is_err() {
                            break;
                        }
                        made = core.boot(&ctx, &vm.id, 0.5, quota).await;
                    }
                    if let Err(e) = made {
                        tracing::warn!(banger_vm_id = %src.id, "fork failed, removing what it made: {e}");
                        for vm in &forks {
                            if let Err(c) = core.destroy(&vm.id).await {
                                tracing::error!(banger_vm_id = %vm.id, "cleanup after a failed fork failed: {c}");
                            }
                        }
                        return Err(e);
                    }
                    Ok(forks.first().map(|v| Resource::Vm(v.id.clone())))
                },
            )
            .await;
        match job {
            Ok(job) => Ok((ids, job)),
            Err(e) => {
                for id in &ids {
                    let _ = self.destroy(id).await;
                }
                Err(e)
            }
        }
    }

    /// Pause `src`, write its state, copy its disks to each of `forks`
    /// and let it run again; each fork is then created and suspended with
    /// the source's state as its own.
    async fn fork(&self, ctx: &JobContext, src: &Vm, forks: &[Vm], vmm: &dyn Vmm) -> Result<()> {
        let paths = self.vm_paths(&src.id);
        let kernel = self.artifacts.kernel_by_id(&src.kernel_id).await?;
        let kernel_file = kernel_file(vmm, &kernel);
        ctx.stage("save", 0.0).await?;
        let paused = Instant::now();
        let saved = save_partial(vmm, &paths).await?;
        let tmp = StateFiles::partial(&paths);
        // The disks are copied while the source stands still: they are
        // what its memory knows.
        let mut copied = Ok(());
        for vm in forks {
            copied = self.copy_disks(ctx, src, vm).await;
            if copied.is_err() {
                break;
            }
        }
        let resumed = vmm.resume(&paths).await;
        let downtime = paused.elapsed();
        tracing::info!(banger_vm_id = %src.id, banger_vm_name = %src.name, downtime_ms = downtime.as_millis() as u64, "vm paused for its forks");
        // Said as a stage, which every front end shows (a cancel is seen
        // at the next).
        let _ = ctx
            .stage(
                &format!("{} paused for {:.2}s", src.name, downtime.as_secs_f64()),
                0.4,
            )
            .await;
        let adopted = match (resumed, copied) {
            (Err(e), _) => Err(Error::failed(format!(
                "vm {} did not run again after its state was saved: {}",
                src.name, e.message
            ))),
            (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => {
                let (src_c, initrd) = (src.clone(), kernel.initrd.clone());
                let (vmm_id, program) = (vmm.name(), vmm.program().to_owned());
                let targets: Vec<_> = forks.iter().map(|v| self.vm_paths(&v.id)).collect();
                let t = tmp.clone();
                blocking(move || {
                    let key = state_key(
                        (vmm_id, &program),
                        saved.accel,
                        &src_c,
                        &kernel_file,
                        initrd.as_deref(),
                    )
                    .map_err(|e| Error::failed(format!("cannot key the saved state: {e}")))?;
                    for to in &targets {
                        adopt_state(to, &t, &key, &src_c.id).map_err(|e| {
                            Error::failed(format!("cannot give a fork its state: {e}"))
                        })?;
                    }
                    Ok(())
                })
                .await
            }
        };
        let t = tmp.clone();
        let _ = blocking(move || Ok(t.remove())).await;
        adopted?;
        for vm in forks {
            self.modify(&vm.id, |v| v.suspended = true).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fork_takes_the_name_and_more_are_numbered() {
        assert_eq!(fork_names("web", 1), vec!["web"]);
        assert_eq!(fork_names("web", 3), vec!["web-1", "web-2", "web-3"]);
    }
}
