//! The VM commands of the internal API: create, start, stop, restart,
//! kill, delete, set, list; the VMM watchers; and the reconciliation that
//! makes a restarted bangerd consistent with what really runs.
//!
//! Every state change goes through [`super::VmState::after`] under one
//! lock, and one operation at a time holds a VM (others get `Busy`). The
//! watcher of a VMM process is the only place that records its end: it
//! marks the VM stopped and takes its TAP, name and NAT back.

mod boot;
mod lifecycle;
mod network;
mod reconcile;
mod stats;
mod vmm_choice;
mod watcher;

pub use boot::kernel_cmdline;
pub use stats::VmStats;
pub use vmm_choice::{check_vmm, choose_vmm, vmm_named};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::quota::{self, Demand, Usage};
use super::vmm::kvm::KvmVerdict;
use super::{Vm, VmEvent, VmPaths};
use crate::artifacts::{Image, Kernel};
use crate::auth::{Action, Caller};
use crate::core::Core;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::JobEvent;
use crate::jobs::Resource;
use crate::store::StoreError;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::failed(format!("internal task failed: {e}"))))
}

fn store_err(context: &'static str) -> impl Fn(StoreError) -> Error {
    move |e| Error::failed_with(context, &e)
}

/// The daemon's VM bookkeeping that is not in the store.
#[derive(Debug, Default)]
pub struct VmRuntime {
    /// VMs an operation holds.
    busy: Mutex<HashSet<String>>,
    /// Serializes read-modify-write of VM rows.
    rows: Mutex<()>,
    /// Watcher task per VM with a process.
    watchers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// The KVM probe's verdict per guest kernel, found once per daemon.
    kvm_verdicts: Mutex<HashMap<PathBuf, Arc<tokio::sync::OnceCell<KvmVerdict>>>>,
}

/// Holds a VM for one operation; releases it when dropped.
#[derive(Debug)]
pub struct Claim {
    core: Arc<Core>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.core
            .vm_runtime()
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Changes `VM.Set` may make.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmChanges {
    /// New vCPU count (stopped VMs only).
    pub vcpus: Option<u32>,
    /// New memory in MiB (stopped VMs only).
    pub memory_mib: Option<u32>,
    /// New work disk size in bytes; grows only (stopped VMs only).
    pub disk_bytes: Option<u64>,
    /// NAT on or off (applies at once to a running VM).
    pub nat: Option<bool>,
}

impl Core {
    /// The systemd unit VM `id`'s VMM runs in, where systemd runs them.
    pub fn vm_unit(&self, id: &str) -> Option<String> {
        self.deps.supervisor.unit(id)
    }

    /// The default image (`vm.default_image`) and its kernel, when both
    /// are registered.
    pub async fn default_image(&self) -> Option<(Image, Kernel)> {
        let image = self.image(&self.config().vm.default_image).await.ok()?;
        let kernel = self.kernel_by_id(&image.kernel_id).await.ok()?;
        Some((image, kernel))
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, ()> {
        self.vm_runtime()
            .rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn announce(&self, id: &str) {
        self.jobs()
            .send(JobEvent::ResourceChanged(Resource::Vm(id.to_owned())));
    }

    /// Hold VM `vm` for one operation, or fail with Busy.
    pub fn claim_vm(self: &Arc<Self>, vm: &Vm) -> Result<Claim> {
        let mut busy = self
            .vm_runtime()
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !busy.insert(vm.id.clone()) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is busy with another operation; wait for it to finish (banger job list)",
                    vm.name
                ),
            ));
        }
        Ok(Claim {
            core: self.clone(),
            id: vm.id.clone(),
        })
    }

    /// Every VM.
    pub async fn vms(&self) -> Result<Vec<Vm>> {
        let store = self.deps.store.clone();
        blocking(move || store.vms().map_err(store_err("reading VMs failed"))).await
    }

    /// VM `id`, by id only (the bus addresses VMs by id; names are the
    /// CLI's to resolve).
    pub async fn vm_by_id(&self, id: &str) -> Result<Vm> {
        let store = self.deps.store.clone();
        let key = id.to_owned();
        blocking(move || store.vm(&key).map_err(store_err("reading VMs failed")))
            .await?
            .ok_or_else(|| {
                Error::not_found(format!("there is no vm with id {id}; see banger vm list"))
            })
    }

    /// Callers may act on their own VMs with `vm.manage`; on others' also
    /// with `vm.manage-others`.
    async fn authorize_vm(&self, caller: &Caller, vm: &Vm) -> Result<()> {
        self.deps
            .authorizer
            .authorize(caller, Action::VmManage)
            .await?;
        if caller.uid != vm.owner_uid && caller.uid != 0 {
            self.deps
                .authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        Ok(())
    }

    /// Reading a VM's console or usage: its owner, root, or a caller with
    /// `vm.manage-others`.
    async fn authorize_read_vm(&self, caller: &Caller, vm: &Vm) -> Result<()> {
        if caller.uid != vm.owner_uid && caller.uid != 0 {
            self.deps
                .authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        Ok(())
    }

    /// Whether `caller` is held to the per-user `[limits]`: root never,
    /// `vm.manage-others` holders not while `limits.exempt_admins` (asked
    /// without a prompt: an exemption is never worth one).
    pub(crate) async fn quota_applies(&self, caller: &Caller) -> bool {
        if caller.uid == 0 {
            return false;
        }
        if !self.config().limits.exempt_admins {
            return true;
        }
        let quiet = Caller {
            allow_interactive: false,
            ..caller.clone()
        };
        self.deps
            .authorizer
            .authorize(&quiet, Action::VmManageOthers)
            .await
            .is_err()
    }

    /// Check `add` against what `uid` holds (leaving VM `skip` out). Call
    /// with the row lock held so that two calls cannot both take the
    /// last slot.
    fn check_quota(&self, uid: u32, add: &Demand, skip: Option<&str>, what: &str) -> Result<()> {
        let usage = self.usage_of(uid, skip)?;
        quota::check(&self.config().limits, &usage, add, what)
    }

    /// [`Core::check_quota`] under the row lock, unless `caller` is
    /// exempt ([`Core::quota_applies`]).
    pub(crate) async fn enforce_quota(
        &self,
        caller: &Caller,
        uid: u32,
        add: &Demand,
        skip: Option<&str>,
        what: &str,
    ) -> Result<()> {
        if self.quota_applies(caller).await {
            let _rows = self.rows();
            self.check_quota(uid, add, skip, what)?;
        }
        Ok(())
    }

    /// What `uid` holds now, leaving VM `skip` out.
    pub fn usage_of(&self, uid: u32, skip: Option<&str>) -> Result<Usage> {
        let store = &self.deps.store;
        let vms = store.vms().map_err(store_err("reading the vms failed"))?;
        let images = store
            .images()
            .map_err(store_err("reading the images failed"))?;
        let kernels = store
            .kernels()
            .map_err(store_err("reading the kernels failed"))?;
        Ok(Usage::of(uid, &vms, &images, &kernels, skip))
    }

    /// Apply `event` to VM `id` (and `change` to the row) under the row
    /// lock. Returns the new row.
    fn transition(&self, id: &str, event: VmEvent, change: impl FnOnce(&mut Vm)) -> Result<Vm> {
        self.transition_if(id, event, |_| Ok(()), change)
    }

    /// [`Core::transition`] when `guard` accepts the row (checked under
    /// the same lock).
    fn transition_if(
        &self,
        id: &str,
        event: VmEvent,
        guard: impl FnOnce(&Vm) -> Result<()>,
        change: impl FnOnce(&mut Vm),
    ) -> Result<Vm> {
        let _rows = self.rows();
        let store = &self.deps.store;
        let mut vm = store
            .vm(id)
            .map_err(store_err("reading the vm failed"))?
            .ok_or_else(|| Error::not_found(format!("vm {id} is gone")))?;
        vm.state = vm.state.after(event, &vm.name)?;
        guard(&vm)?;
        change(&mut vm);
        store
            .update_vm(&vm)
            .map_err(store_err("recording the vm failed"))?;
        drop(_rows);
        self.announce(id);
        Ok(vm)
    }

    /// Change the row of VM `id` without a state change.
    fn modify(&self, id: &str, change: impl FnOnce(&mut Vm)) -> Result<Vm> {
        let _rows = self.rows();
        let store = &self.deps.store;
        let mut vm = store
            .vm(id)
            .map_err(store_err("reading the vm failed"))?
            .ok_or_else(|| Error::not_found(format!("vm {id} is gone")))?;
        change(&mut vm);
        store
            .update_vm(&vm)
            .map_err(store_err("recording the vm failed"))?;
        drop(_rows);
        self.announce(id);
        Ok(vm)
    }

    /// Drop job history older than `days`; returns how many went.
    pub async fn prune_job_history(&self, days: u32) -> Result<usize> {
        let store = self.deps.store.clone();
        blocking(move || {
            store
                .prune_jobs_older_than(days)
                .map_err(store_err("pruning the job history failed"))
        })
        .await
    }

    fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.deps.dirs.state, &self.deps.dirs.runtime, id)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::vm::disk::DiskMethod;

    pub(super) fn kernel(initrd: bool) -> Kernel {
        Kernel {
            id: "k".into(),
            name: "k".into(),
            version: String::new(),
            vmlinux: "/k/vmlinux".into(),
            bzimage: None,
            initrd: initrd.then(|| "/k/initrd".into()),
            modules: None,
            sha256: String::new(),
            size_bytes: 0,
            created_at: 0,
            owner_uid: 0,
        }
    }

    pub(super) fn image(init: Option<&str>) -> Image {
        Image {
            id: "i".into(),
            name: "i".into(),
            managed: true,
            rootfs: "/r".into(),
            rootfs_bytes: 0,
            work_seed: None,
            work_seed_sha256: String::new(),
            kernel_id: "k".into(),
            services: vec![],
            init: init.map(Into::into),
            created_at: 0,
            owner_uid: 0,
        }
    }

    #[test]
    fn disk_methods_have_wire_names() {
        assert_eq!(DiskMethod::Reflink.as_str(), "reflink");
        assert_eq!(DiskMethod::Copy.as_str(), "copy");
        assert_eq!(DiskMethod::DeviceMapper.as_str(), "dm");
        for m in [
            DiskMethod::Reflink,
            DiskMethod::Copy,
            DiskMethod::DeviceMapper,
        ] {
            assert_eq!(DiskMethod::parse(m.as_str()), Some(m));
        }
        assert_eq!(DiskMethod::parse(""), None);
        use crate::vm::VmmDriver;
        for d in [VmmDriver::Qemu, VmmDriver::Firecracker] {
            assert_eq!(VmmDriver::parse(d.as_str()), Some(d));
        }
        assert_eq!(VmmDriver::parse("cloud-hypervisor"), None);
    }
}
