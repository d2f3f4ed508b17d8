//! The VM commands of the internal API: create, start, stop, restart,
//! kill, delete, set, list; the VMM watchers; and the reconciliation that
//! makes a restarted bangerd consistent with what really runs.
//!
//! Every state change goes through [`super::VmState::after`] under one
//! lock, and one operation at a time holds a VM (others get `Busy`). The
//! watcher of a VMM process is the only place that records its end: it
//! marks the VM stopped and takes its TAP, name and NAT back.

mod autostart;
mod boot;
mod clone;
mod exec;
mod folders;
mod fork;
mod forward;
mod idle;
mod lifecycle;
mod network;
mod reconcile;
mod setup;
mod snapshots;
mod stats;
mod suspend;
mod template;
mod vmm_choice;
mod watcher;

pub use boot::kernel_cmdline;
pub use exec::ExecRequest;
pub use folders::check_folders_possible;
pub use fork::MAX_FORKS;
pub use forward::MAX_FORWARDS;
pub use idle::{IdleWatch, look_every};
pub use snapshots::{DiskSnapshot, MAX_SNAPSHOTS};
pub use stats::VmStats;
pub use template::{TemplateInfo, templates_dir, templates_of};
pub use vmm_choice::{check_vmm, choose_vmm, jailer_of, vmm_named};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::agent::GuestAgent;
use super::quota::{Held, Quotas};
use super::snapshot::DeviceMapper;
use super::supervise::Supervisor;
use super::vmm::kvm::KvmVerdict;
use super::{Vm, VmEvent, VmPaths};
use crate::artifacts::Artifacts;
use crate::auth::{Action, Authorizer, Caller};
use crate::config::{Config, SharedConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobEvent, Jobs, Resource};
use crate::net::host::HostNetwork;
use crate::paths::{Dirs, HostPaths};
use crate::store::{Store, StoreError};
use banger_formats::tool::Tools;

use crate::blocking::blocking;

fn store_err(context: &'static str) -> impl Fn(StoreError) -> Error {
    move |e| Error::failed_with(context, &e)
}

/// The VMs: their rows, their VMM processes and the jobs that change
/// them. Defined here; its commands live in one file per concern
/// (lifecycle, boot, VMM choice, watcher, reconcile, network, stats).
#[derive(Debug)]
pub struct Vms {
    config: SharedConfig,
    dirs: Dirs,
    store: Arc<Store>,
    authorizer: Arc<dyn Authorizer>,
    jobs: Arc<Jobs>,
    artifacts: Arc<Artifacts>,
    quotas: Arc<Quotas>,
    net: Arc<HostNetwork>,
    supervisor: Arc<dyn Supervisor>,
    dm: Arc<dyn DeviceMapper>,
    tools: Arc<dyn Tools>,
    agent: Arc<dyn GuestAgent>,
    host: HostPaths,
    helper: PathBuf,
    runtime: VmRuntime,
}

/// What [`Vms`] is made of.
#[derive(Debug)]
pub struct VmsDeps {
    /// The configuration in force.
    pub config: SharedConfig,
    /// Where things live.
    pub dirs: Dirs,
    /// The open store.
    pub store: Arc<Store>,
    /// Decides who may do what.
    pub authorizer: Arc<dyn Authorizer>,
    /// Where lifecycle operations run.
    pub jobs: Arc<Jobs>,
    /// The kernels and images VMs boot.
    pub artifacts: Arc<Artifacts>,
    /// The per-user limits (and the lock VM rows change under).
    pub quotas: Arc<Quotas>,
    /// The host network the VMs share.
    pub net: Arc<HostNetwork>,
    /// Who runs VMM processes.
    pub supervisor: Arc<dyn Supervisor>,
    /// Device-mapper, for snapshot system disks where it exists.
    pub dm: Arc<dyn DeviceMapper>,
    /// Runs e2fsprogs on the guests' work disks (sandboxed).
    pub tools: Arc<dyn Tools>,
    /// Reaches the guests' agents.
    pub agent: Arc<dyn GuestAgent>,
    /// Host device paths (`/dev/kvm`).
    pub host: HostPaths,
    /// bangerd's own binary: `vmm-exec` puts VMMs in their jails.
    pub helper: PathBuf,
}

/// The VM bookkeeping that is not in the store.
#[derive(Debug, Default)]
struct VmRuntime {
    /// VMs an operation holds.
    busy: Mutex<HashSet<String>>,
    /// Watcher task per VM with a process.
    watchers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// The KVM probe's verdict per guest kernel, found once per daemon.
    kvm_verdicts: Mutex<HashMap<PathBuf, Arc<tokio::sync::OnceCell<KvmVerdict>>>>,
    /// The listening task of each port forward, per VM.
    forwards: Mutex<HashMap<String, Vec<ForwardTask>>>,
    /// Held while a VM's forwards change.
    forward_changes: tokio::sync::Mutex<()>,
    /// Streams open through each VM's agent.
    streams: Mutex<HashMap<String, u32>>,
    /// Streams opened or ended through each VM's agent, ever: activity
    /// the idle watch sees even between two of its looks.
    stream_events: Mutex<HashMap<String, u64>>,
    /// Templates being made.
    making: template::Making,
}

/// One open stream through a VM's agent ([`Vms::stream_slot`]); frees its
/// place when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    vms: Arc<Vms>,
    id: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.vms.stream_event(&self.id);
        let mut open = self
            .vms
            .runtime
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
}

/// A forward and the task that listens for it.
type ForwardTask = (super::PortForward, tokio::task::AbortHandle);

/// Holds a VM for one operation; releases it when dropped.
#[derive(Debug)]
pub struct Claim {
    vms: Arc<Vms>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.vms
            .runtime
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Changes `VM.Set` may make.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmChanges {
    /// New vCPU count (stopped VMs only).
    pub vcpus: Option<u32>,
    /// New memory in MiB (stopped VMs only).
    pub memory_mib: Option<u32>,
    /// New work disk size in bytes; grows only (stopped VMs only).
    pub disk_bytes: Option<u64>,
    /// NAT on or off (applies at once to a running VM).
    pub nat: Option<bool>,
    /// Peers on or off (applies at once to a running VM).
    pub peers: Option<bool>,
    /// Autostart on or off.
    pub autostart: Option<bool>,
    /// The host folders, all of them (stopped VMs only).
    pub mounts: Option<Vec<super::Mount>>,
}

impl Vms {
    /// The service made of `deps`.
    pub fn new(deps: VmsDeps) -> Self {
        Self {
            config: deps.config,
            dirs: deps.dirs,
            store: deps.store,
            authorizer: deps.authorizer,
            jobs: deps.jobs,
            artifacts: deps.artifacts,
            quotas: deps.quotas,
            net: deps.net,
            supervisor: deps.supervisor,
            dm: deps.dm,
            tools: deps.tools,
            agent: deps.agent,
            host: deps.host,
            helper: deps.helper,
            runtime: VmRuntime::default(),
        }
    }

    fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The systemd unit VM `id`'s VMM runs in, where systemd runs them.
    pub fn vm_unit(&self, id: &str) -> Option<String> {
        self.supervisor.unit(id)
    }

    fn announce(&self, id: &str) {
        self.jobs()
            .send(JobEvent::ResourceChanged(Resource::Vm(id.to_owned())));
    }

    /// Hold VM `vm` for one operation, or fail with Busy.
    pub fn claim_vm(self: &Arc<Self>, vm: &Vm) -> Result<Claim> {
        let mut busy = self.runtime.busy.lock().unwrap_or_else(|p| p.into_inner());
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
            vms: self.clone(),
            id: vm.id.clone(),
        })
    }

    /// A place for one more stream through VM `vm`'s agent, or
    /// `LimitExceeded` when `vm.max_streams` are open.
    pub fn stream_slot(self: &Arc<Self>, vm: &Vm) -> Result<StreamSlot> {
        let max = self.config().vm.max_streams;
        let mut open = self
            .runtime
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = open.entry(vm.id.clone()).or_insert(0);
        if *n >= max {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "vm {} has {max} streams open (exec, cp, forwarded connections), the most vm.max_streams allows; wait for some to end",
                    vm.name
                ),
            ));
        }
        *n += 1;
        drop(open);
        self.stream_event(&vm.id);
        Ok(StreamSlot {
            vms: self.clone(),
            id: vm.id.clone(),
        })
    }

    fn stream_event(&self, id: &str) {
        let mut events = self
            .runtime
            .stream_events
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *events.entry(id.to_owned()).or_insert(0) += 1;
    }

    /// Every VM.
    pub async fn list(&self) -> Result<Vec<Vm>> {
        let store = self.store.clone();
        blocking(move || store.vms().map_err(store_err("reading VMs failed"))).await
    }

    /// The VMs a VMM process runs for (starting, running, stopping).
    pub async fn list_with_process(&self) -> Result<Vec<Vm>> {
        let store = self.store.clone();
        blocking(move || {
            store
                .vms_with_process()
                .map_err(store_err("reading VMs failed"))
        })
        .await
    }

    /// VM `id`, by id only (the bus addresses VMs by id; names are the
    /// CLI's to resolve).
    pub async fn vm_by_id(&self, id: &str) -> Result<Vm> {
        let store = self.store.clone();
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
        self.authorizer.authorize(caller, Action::VmManage).await?;
        if caller.uid != vm.owner_uid && caller.uid != 0 {
            self.authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        Ok(())
    }

    /// Reading a VM's console or usage: its owner, root, or a caller with
    /// `vm.manage-others`.
    async fn authorize_read_vm(&self, caller: &Caller, vm: &Vm) -> Result<()> {
        if caller.uid != vm.owner_uid && caller.uid != 0 {
            self.authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        Ok(())
    }

    /// Apply `event` to VM `id` (and `change` to the row) under the row
    /// lock, on the blocking pool. Returns the new row.
    async fn transition(
        &self,
        id: &str,
        event: VmEvent,
        change: impl FnOnce(&mut Vm) + Send + 'static,
    ) -> Result<Vm> {
        self.transition_if(id, event, |_, _, _| Ok(()), change)
            .await
    }

    /// [`Vms::transition`] when `guard` accepts the row (checked under
    /// the same lock).
    async fn transition_if(
        &self,
        id: &str,
        event: VmEvent,
        guard: impl FnOnce(&Quotas, &Held<'_>, &Vm) -> Result<()> + Send + 'static,
        change: impl FnOnce(&mut Vm) + Send + 'static,
    ) -> Result<Vm> {
        let (store, quotas, key) = (self.store.clone(), self.quotas.clone(), id.to_owned());
        let vm = blocking(move || {
            let held = quotas.lock();
            let mut vm = store
                .vm(&key)
                .map_err(store_err("reading the vm failed"))?
                .ok_or_else(|| Error::not_found(format!("vm {key} is gone")))?;
            vm.state = vm.state.after(event, &vm.name)?;
            guard(&quotas, &held, &vm)?;
            change(&mut vm);
            store
                .update_vm(&vm)
                .map_err(store_err("recording the vm failed"))?;
            Ok(vm)
        })
        .await?;
        self.announce(id);
        Ok(vm)
    }

    /// Change the row of VM `id` without a state change, on the blocking
    /// pool.
    async fn modify(&self, id: &str, change: impl FnOnce(&mut Vm) + Send + 'static) -> Result<Vm> {
        let (store, quotas, key) = (self.store.clone(), self.quotas.clone(), id.to_owned());
        let vm = blocking(move || {
            let _rows = quotas.lock();
            let mut vm = store
                .vm(&key)
                .map_err(store_err("reading the vm failed"))?
                .ok_or_else(|| Error::not_found(format!("vm {key} is gone")))?;
            change(&mut vm);
            store
                .update_vm(&vm)
                .map_err(store_err("recording the vm failed"))?;
            Ok(vm)
        })
        .await?;
        self.announce(id);
        Ok(vm)
    }

    fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.dirs.state, &self.dirs.runtime, id)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use crate::artifacts::{Image, Kernel};
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
