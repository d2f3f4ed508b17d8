//! The VM commands of the internal API: create, start, stop, restart,
//! kill, delete, set, list; the VMM watchers; and the reconciliation that
//! makes a restarted bangerd consistent with what really runs.
//!
//! Every state change goes through [`super::VmState::after`] under one
//! lock, and one operation at a time holds a VM (others get `Busy`). The
//! watcher of a VMM process is the only place that records its end: it
//! marks the VM stopped and takes its TAP, name and NAT back.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::disk::{self, DiskMethod};
use super::process::{ProcessId, Watched};
use super::quota::{self, Demand, Usage};
use super::snapshot;
use super::vmm::firecracker::Firecracker;
use super::vmm::kvm::{self, KvmVerdict};
use super::vmm::qemu::Qemu;
use super::vmm::{Accel, TCG_TSC_KHZ};
use super::vmm::{LaunchSpec, Vmm};
use super::{Vm, VmEvent, VmPaths, VmRequest, VmState, validate_sizes, validate_ssh_key};
use crate::artifacts::{Image, Kernel, Resource, validate};
use crate::auth::{Action, Caller};
use crate::config::{self, Config, VmmKind};
use crate::core::Core;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobEvent, JobId};
use crate::net::dns::DnsServer;
use crate::net::network::Network;
use crate::os::program;
use crate::store::{StoreError, unix_us};

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
    /// Host networking, once the first VM needed it.
    network: tokio::sync::Mutex<Option<Network>>,
    /// The `.vm` DNS server on the bridge, for guests.
    guest_dns: Mutex<Option<DnsServer>>,
    /// Watcher task per VM with a process.
    watchers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Whether systemd-resolved routes `.vm` to the bridge.
    resolved: Mutex<crate::net::resolved::Registration>,
    /// The KVM probe's verdict per guest kernel, found once per daemon.
    kvm_verdicts: Mutex<HashMap<PathBuf, Arc<tokio::sync::OnceCell<KvmVerdict>>>>,
}

impl VmRuntime {
    /// What became of the `.vm` registration with systemd-resolved.
    pub fn resolved(&self) -> crate::net::resolved::Registration {
        self.resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How long a guest kernel gets to pass early boot under KVM in the probe
/// (it takes well under a second where KVM works).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Resource usage of a running VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmStats {
    /// CPU time of the VMM process, microseconds.
    pub cpu_usec: u64,
    /// Resident memory of the VMM process, bytes.
    pub rss_bytes: u64,
    /// Seconds since the VMM started.
    pub uptime_secs: f64,
    /// The guest's kernel release, from the agent; empty when it does not answer.
    pub guest_kernel: String,
    /// The guest's hostname, from the agent.
    pub guest_hostname: String,
}

/// The kernel command line of a VM.
pub fn kernel_cmdline(
    kernel: &Kernel,
    image: &Image,
    name: &str,
    ip_arg: &str,
    accel: Accel,
) -> String {
    let mut args = vec![
        "console=ttyS0".to_owned(),
        "reboot=k".to_owned(),
        "panic=1".to_owned(),
        "root=/dev/vda".to_owned(),
        "rw".to_owned(),
        "rootfstype=ext4".to_owned(),
        "tsc=unstable".to_owned(),
        format!("banger.hostname={name}"),
        format!("banger.ip={ip_arg}"),
    ];
    // With an initramfs the NIC driver is a module: the kernel's own ip=
    // would wait minutes for it, so only banger.ip= (read by the guest's
    // init) is given then.
    if kernel.initrd.is_none() {
        args.push(format!("ip={ip_arg}"));
    }
    // Under software emulation on a busy host the kernel's TSC calibration
    // against the PIT can spin for minutes (TESTBED.md): give it a
    // frequency instead. Timekeeping does not rest on it (tsc=unstable).
    if accel == Accel::Tcg {
        args.push(TCG_TSC_KHZ.to_owned());
    }
    if let Some(init) = &image.init {
        args.push(format!("init={init}"));
    }
    args.join(" ")
}

fn qemu_driver(config: &Config) -> Result<Arc<dyn Vmm>> {
    let binary = program::find(&config.vm.qemu_bin).ok_or_else(|| {
        Error::unavailable(format!(
            "{} {}: apt-get install qemu-system-x86, or set vm.qemu_bin",
            config.vm.qemu_bin.display(),
            program::why_missing(&config.vm.qemu_bin)
        ))
    })?;
    Ok(Arc::new(Qemu { binary }))
}

fn firecracker_driver(config: &Config) -> Result<Arc<dyn Vmm>> {
    let binary = program::find(&config.vm.firecracker_bin).ok_or_else(|| {
        Error::unavailable(format!(
            "vm.vmm asks for firecracker, and {} {}: install it, set vm.firecracker_bin, or set vm.vmm = \"auto\"",
            config.vm.firecracker_bin.display(),
            program::why_missing(&config.vm.firecracker_bin)
        ))
    })?;
    Ok(Arc::new(Firecracker { binary }))
}

/// Whether some VMM can run at all with this configuration (a quick check
/// before a job starts; the choice per boot is [`choose_vmm`]).
pub fn check_vmm(config: &Config) -> Result<()> {
    match config.vm.vmm {
        VmmKind::Firecracker => firecracker_driver(config).map(|_| ()),
        VmmKind::Qemu => qemu_driver(config).map(|_| ()),
        VmmKind::Auto => firecracker_driver(config)
            .or_else(|_| qemu_driver(config))
            .map(|_| ()),
    }
}

/// The driver that runs a VM recorded with VMM `name` (stop, stats, kill).
pub fn vmm_named(config: &Config, driver: Option<super::VmmDriver>) -> Result<Arc<dyn Vmm>> {
    match driver {
        Some(super::VmmDriver::Firecracker) => Ok(Arc::new(Firecracker {
            binary: program::find(&config.vm.firecracker_bin)
                .unwrap_or_else(|| config.vm.firecracker_bin.clone()),
        })),
        Some(super::VmmDriver::Qemu) | None => Ok(Arc::new(Qemu {
            binary: program::find(&config.vm.qemu_bin)
                .unwrap_or_else(|| config.vm.qemu_bin.clone()),
        })),
    }
}

/// Which VMM boots a VM: the configuration's `vm.vmm` and `vm.accel`,
/// whether firecracker is installed, and the KVM probe's verdict.
/// `auto` picks Firecracker only where it can run (installed, KVM works);
/// otherwise QEMU, with KVM where it works and TCG elsewhere.
pub fn choose_vmm(
    config: &Config,
    verdict: impl FnOnce() -> KvmVerdict,
) -> Result<(Arc<dyn Vmm>, Accel)> {
    let firecracker_installed = program::find(&config.vm.firecracker_bin).is_some();
    let (firecracker, kvm) = match (config.vm.vmm, config.vm.accel) {
        (VmmKind::Firecracker, config::Accel::Tcg) => {
            return Err(Error::invalid(
                "firecracker needs KVM, and vm.accel is \"tcg\": set vm.vmm = \"qemu\" or vm.accel = \"auto\"",
            ));
        }
        (VmmKind::Firecracker, config::Accel::Kvm) => (true, true),
        (VmmKind::Firecracker, config::Accel::Auto) => match verdict() {
            KvmVerdict::Unusable(why) => {
                return Err(Error::unavailable(format!(
                    "firecracker needs KVM, and {why}: set vm.vmm = \"qemu\" to run VMs under software emulation"
                )));
            }
            // Usable, or not probed (no QEMU to probe with): go ahead.
            _ => (true, true),
        },
        (VmmKind::Qemu, config::Accel::Kvm) => (false, true),
        (_, config::Accel::Tcg) => (false, false),
        (VmmKind::Qemu, config::Accel::Auto) => (false, verdict().usable()),
        (VmmKind::Auto, config::Accel::Kvm) => (firecracker_installed, true),
        (VmmKind::Auto, config::Accel::Auto) => {
            let usable = verdict().usable();
            (firecracker_installed && usable, usable)
        }
    };
    let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
    if firecracker {
        Ok((firecracker_driver(config)?, accel))
    } else {
        Ok((qemu_driver(config)?, accel))
    }
}

impl Core {
    /// The VMM and accelerator for a VM booting `kernel` ([`choose_vmm`],
    /// probing KVM with `kernel` when the choice depends on it), and the
    /// kernel file that VMM boots.
    pub async fn pick_vmm(&self, kernel: &Kernel) -> Result<(Arc<dyn Vmm>, Accel, PathBuf)> {
        let config = self.config();
        let verdict = if config.vm.accel == config::Accel::Auto {
            Some(self.kvm_verdict(kernel.boot_file()).await)
        } else {
            None
        };
        let (vmm, accel) = choose_vmm(&config, || {
            verdict.unwrap_or_else(|| KvmVerdict::NotProbed("not needed".into()))
        })?;
        let file = if vmm.wants_elf_kernel() {
            kernel.vmlinux.clone()
        } else {
            kernel.boot_file().to_owned()
        };
        Ok((vmm, accel, file))
    }

    /// Whether `kernel` boots under KVM here ([`kvm::probe`]), probed on
    /// first use and remembered while the daemon runs.
    pub async fn kvm_verdict(&self, kernel: &Path) -> KvmVerdict {
        let cell = self
            .vm_runtime()
            .kvm_verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kernel.to_owned())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let config = self.config();
            let Some(qemu) = program::find(&config.vm.qemu_bin) else {
                return KvmVerdict::NotProbed(format!(
                    "{} is not installed, so KVM was not probed",
                    config.vm.qemu_bin.display()
                ));
            };
            let verdict = kvm::probe(
                &qemu,
                kernel,
                &self.deps.host.kvm,
                &self.deps.dirs.runtime,
                KVM_PROBE_TIMEOUT,
            )
            .await;
            match &verdict {
                KvmVerdict::Usable(t) => tracing::info!(
                    "KVM probe: {} booted under KVM in {} ms; VMs use KVM",
                    kernel.display(),
                    t.as_millis()
                ),
                KvmVerdict::Unusable(why) => {
                    tracing::warn!("KVM probe: {why}; VMs use software emulation (slow)")
                }
                KvmVerdict::NotProbed(why) => tracing::warn!("KVM probe: {why}"),
            }
            verdict
        })
        .await
        .clone()
    }

    /// The system disk VM `vm`'s VMM opens: its file, or for a dm
    /// snapshot the device brought up over the image and its change store.
    async fn system_disk_up(&self, vm: &Vm, image: &Image) -> Result<PathBuf> {
        let paths = self.vm_paths(&vm.id);
        if vm.disk_method != Some(DiskMethod::DeviceMapper) {
            return Ok(paths.system_disk);
        }
        let dm = self.deps.dm.clone();
        let (id, base) = (vm.id.clone(), image.rootfs.clone());
        blocking(move || {
            snapshot::activate(dm.as_ref(), &id, &base, &paths.system_cow, &paths.loops)
        })
        .await
    }

    /// Take VM `vm`'s snapshot device and loop devices down, if it has any.
    async fn system_disk_down(&self, vm: &Vm) {
        if vm.disk_method != Some(DiskMethod::DeviceMapper) {
            return;
        }
        let dm = self.deps.dm.clone();
        let (id, loops) = (vm.id.clone(), self.vm_paths(&vm.id).loops);
        if let Err(e) = blocking(move || snapshot::deactivate(dm.as_ref(), &id, &loops)).await {
            tracing::warn!(banger_vm_id = %vm.id, "cannot take its system disk down: {e}");
        }
    }

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

    /// The lease of VM `id` (address and MAC), if it has one.
    pub async fn vm_lease(&self, id: &str) -> Option<crate::net::leases::Lease> {
        let store = self.deps.store.clone();
        let id = id.to_owned();
        blocking(move || {
            Ok(store
                .leases()
                .map_err(store_err("reading leases failed"))?
                .into_iter()
                .find(|l| l.owner == id))
        })
        .await
        .ok()
        .flatten()
    }

    /// The lease address of VM `id`, if it has one.
    pub async fn vm_ipv4(&self, id: &str) -> Option<Ipv4Addr> {
        self.vm_lease(id).await.map(|l| l.ipv4)
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

    /// Where VM `id`'s console log is.
    pub fn console_log_path(&self, id: &str) -> PathBuf {
        self.vm_paths(id).console_log
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

    /// Host networking, brought up on first use: the bridge, the TAP pool
    /// (adopting the TAPs of VMs that run), NAT for those that have it,
    /// and the `.vm` DNS server on the bridge's gateway for guests.
    pub async fn network(&self) -> Result<Network> {
        let mut slot = self.vm_runtime().network.lock().await;
        if let Some(net) = &*slot {
            return Ok(net.clone());
        }
        let config = self.config();
        let subnet = config.network.subnet()?;
        let vms = self.vms().await?;
        let running: Vec<&Vm> = vms.iter().filter(|v| v.state.has_process()).collect();
        let taps: Vec<String> = running.iter().filter_map(|v| v.tap.clone()).collect();
        let mut nat_ips = Vec::new();
        for vm in running.iter().filter(|v| v.nat) {
            if let Some(ip) = self.vm_ipv4(&vm.id).await {
                nat_ips.push(ip);
            }
        }
        let net = Network::up(
            &config.network.bridge,
            subnet,
            config.network.tap_pool_size as usize,
            self.deps.store.clone(),
            self.dns_zone(),
            &taps,
            &nat_ips,
        )
        .await?;
        if let Some(zone) = self.dns_zone() {
            let addr = std::net::SocketAddr::from((subnet.gateway(), 53));
            match bind_dns(addr).await {
                Ok((udp, tcp)) => match crate::net::dns::serve_zone(&zone, vec![udp], vec![tcp]) {
                    Ok(server) => {
                        tracing::info!(address = %addr, "serving .vm DNS to guests");
                        *self
                            .vm_runtime()
                            .guest_dns
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(server);
                    }
                    Err(e) => tracing::warn!("no DNS for guests: {e}"),
                },
                Err(e) => tracing::warn!("no DNS for guests on {addr}: {e}"),
            }
        }
        self.register_vm_domain(&net, &config.network.bridge, subnet.gateway())
            .await;
        let pool = net.pool().clone();
        tokio::spawn(async move {
            if let Err(e) = pool.fill().await {
                tracing::warn!("cannot fill the TAP pool: {e}");
            }
        });
        *slot = Some(net.clone());
        Ok(net)
    }

    /// Tell systemd-resolved, when it runs, to send `.vm` lookups to the
    /// guests' DNS server on the bridge. Failing is not fatal: doctor says.
    async fn register_vm_domain(&self, net: &Network, bridge: &str, gateway: Ipv4Addr) {
        use crate::net::resolved::Registration;
        let link_dns = &self.deps.link_dns;
        let registration = if !link_dns.present().await {
            Registration::Absent
        } else {
            match link_dns.register(net.bridge_index(), gateway, "vm").await {
                Ok(()) => {
                    tracing::info!("systemd-resolved routes ~vm to {gateway} on {bridge}");
                    Registration::Active {
                        bridge: bridge.to_owned(),
                        server: gateway,
                    }
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    Registration::Failed(e.message)
                }
            }
        };
        *self
            .vm_runtime()
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = registration;
    }

    async fn network_if_up(&self) -> Option<Network> {
        self.vm_runtime().network.lock().await.clone()
    }

    /// Start a create job. Returns the new VM's id and the job.
    pub async fn create_vm(
        self: &Arc<Self>,
        caller: &Caller,
        req: VmRequest,
    ) -> Result<(String, JobId)> {
        self.deps
            .authorizer
            .authorize(caller, Action::VmCreate)
            .await?;
        if req.nat == Some(true) {
            self.deps
                .authorizer
                .authorize(caller, Action::VmNat)
                .await?;
        }
        validate::name("vm", &req.name)?;
        let config = self.config();
        let vcpus = req.vcpus.unwrap_or(config.vm.vcpus);
        let memory_mib = req.memory_mib.unwrap_or(config.vm.memory_mib);
        let disk_bytes = req.disk_bytes.unwrap_or(config.vm.disk_mib << 20);
        validate_sizes(vcpus, memory_mib, disk_bytes)?;
        let quota = self.quota_applies(caller).await;
        for key in &req.ssh_keys {
            validate_ssh_key(key)?;
        }
        check_vmm(&config)?;
        let image_ref = if req.image.is_empty() {
            config.vm.default_image.clone()
        } else {
            req.image.clone()
        };
        let image = self.image(&image_ref).await.map_err(|e| match e.kind {
            ErrorKind::NotFound => Error::not_found(format!(
                "there is no image {image_ref:?}; see banger image list, or register one"
            )),
            _ => e,
        })?;
        self.authorize_use(caller, &image).await?;
        crate::artifacts::commands::paths_of_root(&image)?;
        let kernel = self.kernel_by_id(&image.kernel_id).await?;
        // The system disk costs up to the rootfs's data, the work disk its seed.
        let needed = crate::artifacts::files::disk_usage(&image.rootfs)
            + image
                .work_seed
                .as_deref()
                .map(crate::artifacts::files::disk_usage)
                .unwrap_or(64 << 20);
        std::fs::create_dir_all(super::vms_dir(&self.deps.dirs.state))
            .map_err(|e| Error::failed(format!("cannot create the VM directory: {e}")))?;
        disk::check_space(&self.deps.dirs.state, needed)?;

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
            state: VmState::Creating,
            vmm: None,
            pid: None,
            pid_start: None,
            tap: None,
            ssh_keys: req.ssh_keys.clone(),
            disk_method: None,
            created_at: unix_us(SystemTime::now()),
            last_error: String::new(),
        };
        {
            let core = self.clone();
            let row = vm.clone();
            let name = req.name.clone();
            let demand = Demand {
                vm: true,
                run: req.start.then_some((vcpus, memory_mib)),
                vcpus_per_vm: vcpus,
                disk_bytes,
            };
            blocking(move || {
                let _rows = core.rows();
                if quota {
                    core.check_quota(row.owner_uid, &demand, None, &format!("vm {name}"))?;
                }
                core.deps.store.insert_vm(&row).map_err(|e| {
                    if crate::artifacts::store::is_unique_violation(&e) {
                        Error::new(
                            ErrorKind::AlreadyExists,
                            format!(
                                "a vm named {name} exists already; pick another name or delete it"
                            ),
                        )
                    } else {
                        Error::failed_with("recording the vm failed", &e)
                    }
                })
            })
            .await?;
        }
        self.announce(&id);
        tracing::info!(banger_vm_id = %id, banger_vm_name = %vm.name, "creating vm");
        let core = self.clone();
        let claim = self.claim_vm(&vm)?;
        let start = req.start;
        let job = self
            .jobs()
            .start_cooperative("create-vm", caller.uid, Action::VmCreate, move |ctx| async move {
                let _claim = claim;
                let made = core.build_vm(&ctx, &vm, start, quota).await;
                match made {
                    Ok(()) => Ok(Some(Resource::Vm(vm.id.clone()))),
                    Err(e) => {
                        tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "create failed, removing what it made: {e}");
                        if let Err(c) = core.destroy(&vm.id).await {
                            tracing::error!(banger_vm_id = %vm.id, "cleanup after a failed create failed: {c}");
                        }
                        Err(e)
                    }
                }
            });
        match job.await {
            Ok(job) => Ok((id, job)),
            Err(e) => {
                let _ = self.destroy(&id).await;
                Err(e)
            }
        }
    }

    async fn build_vm(
        self: &Arc<Self>,
        ctx: &JobContext,
        vm: &Vm,
        start: bool,
        quota: bool,
    ) -> Result<()> {
        ctx.stage("resolve image", 0.0).await?;
        let image = self.ensure_work_seed(&vm.image_id).await?;
        let paths = self.vm_paths(&vm.id);

        ctx.stage("system disk", 0.1).await?;
        let (rootfs, sys, cow) = (
            image.rootfs.clone(),
            paths.system_disk.clone(),
            paths.system_cow.clone(),
        );
        let dir = paths.dir.clone();
        // A dm snapshot where device-mapper works (constant time), else a
        // reflink clone, else a sparse copy.
        let dm = self.deps.dm.available();
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
            disk::make_system_disk(&rootfs, &sys)
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
        blocking(move || disk::make_work_disk(seed.as_deref(), &work, bytes, &keys)).await?;
        ctx.check_cancelled()?;
        self.transition(&vm.id, VmEvent::Created, |v| {
            v.disk_method = Some(method);
        })?;
        if start {
            self.boot(ctx, &vm.id, 0.3, quota).await?;
        }
        Ok(())
    }

    /// Boot VM `id` (Stopped): network, VMM, agent, services. On failure
    /// the VM is stopped again and the error recorded.
    /// With `quota`, the owner's `[limits]` are checked at the moment
    /// the VM turns Starting.
    async fn boot(
        self: &Arc<Self>,
        ctx: &JobContext,
        id: &str,
        base: f64,
        quota: bool,
    ) -> Result<()> {
        let mut result = self.boot_once(ctx, id, base, quota).await;
        // A guest whose console went silent before its agent answered is
        // stuck (seen under TCG: "tsc: Unable to calibrate against PIT");
        // one fresh boot gets it going.
        if matches!(&result, Err(BootError::Stalled(_))) {
            tracing::warn!(banger_vm_id = %id, "the guest stalled while booting; booting it again");
            ctx.progress("the guest stalled; booting it again", base, None);
            result = self.boot_once(ctx, id, base, quota).await;
        }
        result.map_err(BootError::into_error)
    }

    async fn boot_once(
        self: &Arc<Self>,
        ctx: &JobContext,
        id: &str,
        base: f64,
        quota: bool,
    ) -> std::result::Result<(), BootError> {
        let vm = self.transition_if(
            id,
            VmEvent::Start,
            |vm| {
                if !quota {
                    return Ok(());
                }
                self.check_quota(
                    vm.owner_uid,
                    &Demand::start(vm.vcpus, vm.memory_mib),
                    Some(&vm.id),
                    &format!("vm {}", vm.name),
                )
            },
            |v| v.last_error.clear(),
        )?;
        let result = self.boot_steps(ctx, &vm, base).await;
        if let Err(e) = &result {
            self.halt(id).await;
            let message = e.error().message.clone();
            let _ = self.modify(id, |v| {
                if v.state == VmState::Starting && v.pid.is_none() {
                    v.state = VmState::Stopped;
                }
                v.last_error = message;
            });
        }
        result
    }

    async fn boot_steps(
        self: &Arc<Self>,
        ctx: &JobContext,
        vm: &Vm,
        base: f64,
    ) -> std::result::Result<(), BootError> {
        let step = (1.0 - base) / 4.0;
        let config = self.config();
        let image = self.image_by_id(&vm.image_id).await?;
        let kernel = self.kernel_by_id(&vm.kernel_id).await?;
        let paths = self.vm_paths(&vm.id);

        ctx.stage("network", base).await?;
        let net = self.network().await?;
        let vmnet = net.attach(&vm.id, &vm.name, 0, vm.nat).await?;
        let tap = vmnet.tap.clone();
        if let Err(e) = self.modify(&vm.id, |v| v.tap = Some(tap.clone())) {
            let _ = net
                .detach(&vm.name, vmnet.lease.ipv4, Some(&vmnet.tap))
                .await;
            return Err(e.into());
        }

        ctx.stage("vmm start", base + step).await?;
        std::fs::create_dir_all(&paths.run)
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", paths.run.display())))?;
        let launched = async {
            let (vmm, accel, kernel_path) = self.pick_vmm(&kernel).await?;
            let system_disk = self.system_disk_up(vm, &image).await?;
            let spec = LaunchSpec {
                id: vm.id.clone(),
                name: vm.name.clone(),
                kernel: kernel_path,
                initrd: kernel.initrd.clone(),
                cmdline: kernel_cmdline(&kernel, &image, &vm.name, &vmnet.ip_arg, accel),
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                paths: paths.clone(),
                system_disk,
                net: Some((vmnet.tap.clone(), vmnet.lease.mac.clone())),
                accel,
            };
            tracing::info!(banger_vm_id = %vm.id, "starting {} with {} under {}", vm.name, vmm.name(), accel.as_str());
            let supervisor = self.deps.supervisor.as_ref();
            let (watched, pid) = vmm.launch(&spec, supervisor).await?;
            Ok::<_, Error>((vmm, watched, pid))
        }
        .await;
        let (vmm, watched, pid) = match launched {
            Ok(l) => l,
            Err(e) => {
                let _ = net
                    .detach(&vm.name, vmnet.lease.ipv4, Some(&vmnet.tap))
                    .await;
                let _ = self.modify(&vm.id, |v| v.tap = None);
                self.system_disk_down(vm).await;
                return Err(e.into());
            }
        };
        let recorded = self.modify(&vm.id, |v| {
            v.pid = Some(pid.pid);
            v.pid_start = Some(pid.start);
            v.vmm = Some(vmm.driver());
        });
        self.watch(&vm.id, pid, watched);
        recorded?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = pid.pid, vmm = vmm.name(), "vmm started");

        ctx.stage("agent ready", base + 2.0 * step).await?;
        let deadline = Instant::now() + Duration::from_secs(config.vm.boot_timeout_secs);
        let endpoint = vmm.agent(&paths);
        let waited = tokio::select! {
            () = ctx.token().cancelled() => return Err(Error::cancelled("cancelled").into()),
            () = console_silence(&paths.console_log, STALL_AFTER) => {
                return Err(BootError::Stalled(Error::failed(format!(
                    "the guest stalled while booting: no console output for {}s before the agent answered; see banger vm logs {}",
                    STALL_AFTER.as_secs(),
                    vm.name
                ))));
            }
            r = crate::os::agent::wait_until_ready(
                &endpoint,
                Duration::from_secs(config.vm.boot_timeout_secs),
                Duration::from_millis(200),
            ) => r,
        };
        let (mut conn, health, took) = waited.map_err(|e| {
            Error::failed(format!(
                "the guest agent did not answer: {e}; see banger vm logs {}",
                vm.name
            ))
        })?;
        ctx.progress(
            &format!(
                "agent {} after {:.1}s",
                health.agent_version,
                took.as_secs_f64()
            ),
            base + 3.0 * step,
            None,
        );

        for service in &image.services {
            ctx.stage(&format!("{} ready", service.name), base + 3.0 * step)
                .await?;
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = tokio::select! {
                () = ctx.token().cancelled() => return Err(Error::cancelled("cancelled").into()),
                r = conn.wait_port(service.port, left.max(Duration::from_secs(1))) => r,
            };
            waited.map_err(|e| {
                Error::failed(format!(
                    "{} (port {}) did not come up in the guest: {e}; see banger vm logs {}",
                    service.name, service.port, vm.name
                ))
            })?;
        }
        drop(conn);
        self.transition(&vm.id, VmEvent::Ready, |_| {})?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "vm running");
        Ok(())
    }

    /// Watch VMM process `pid` of VM `id` until it ends, then record it.
    fn watch(self: &Arc<Self>, id: &str, pid: ProcessId, mut watched: Watched) {
        let core = self.clone();
        let vm_id = id.to_owned();
        let task = tokio::spawn(async move {
            while !watched.ended() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            core.vmm_exited(&vm_id, pid).await;
        });
        if let Some(old) = self
            .vm_runtime()
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), task)
        {
            old.abort();
        }
    }

    /// Record that VM `id`'s VMM `pid` ended: stopped, TAP/name/NAT back.
    async fn vmm_exited(&self, id: &str, pid: ProcessId) {
        // Take the network and the system disk back *before* the row says
        // stopped: a start can only begin once it does, and it must not
        // find (or lose to) the old instance's TAP, address, name or
        // devices on their way out.
        let current = self.deps.store.vm(id).ok().flatten();
        if let Some(vm) = current.filter(|v| v.pid == Some(pid.pid)) {
            if let (Some(net), Some(ip)) = (self.network_if_up().await, self.vm_ipv4(id).await)
                && let Err(e) = net.detach(&vm.name, ip, vm.tap.as_deref()).await
            {
                tracing::warn!(banger_vm_id = %vm.id, "cannot take back the vm's network: {e}");
            }
            self.system_disk_down(&vm).await;
        }
        let result = (|| {
            let _rows = self.rows();
            let store = &self.deps.store;
            let Some(mut vm) = store.vm(id).map_err(store_err("reading the vm failed"))? else {
                return Ok(None);
            };
            if vm.pid != Some(pid.pid) {
                return Ok(None);
            }
            vm.tap = None;
            vm.pid = None;
            vm.pid_start = None;
            vm.state = vm
                .state
                .after(VmEvent::Exited, &vm.name)
                .unwrap_or(VmState::Stopped);
            store
                .update_vm(&vm)
                .map_err(store_err("recording the vm failed"))?;
            Ok::<_, Error>(Some(vm))
        })();
        self.vm_runtime()
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        match result {
            Ok(Some(vm)) => {
                // Announce at once: a stop job that saw the row change
                // completes next, and its Completed must not overtake this.
                self.announce(id);
                tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "vmm exited; vm stopped");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(banger_vm_id = %id, "cannot record the vmm's exit: {e}"),
        }
    }

    /// Kill VM `id`'s VMM, if any, and wait until its end is recorded.
    async fn halt(&self, id: &str) {
        let Ok(Some(vm)) = self.deps.store.vm(id) else {
            return;
        };
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return;
        };
        let process = ProcessId { pid, start };
        let _ = process.signal(Signal::SIGKILL);
        self.wait_recorded(id, process, Duration::from_secs(15))
            .await;
    }

    /// Wait until the watcher recorded the end of `process`; if there is
    /// no watcher (or it is late), record it here.
    async fn wait_recorded(&self, id: &str, process: ProcessId, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            match self.deps.store.vm(id) {
                Ok(Some(vm)) if vm.pid == Some(process.pid) => {}
                _ => return true,
            }
            if !process.alive()
                && !self
                    .vm_runtime()
                    .watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(id)
            {
                self.vmm_exited(id, process).await;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Start a stopped VM as a job.
    pub async fn start_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        vm.state.after(VmEvent::Start, &vm.name)?;
        check_vmm(&self.config())?;
        // Checked here so the call itself says no, and again when the VM
        // turns Starting (another start may have come between).
        let quota = self.quota_applies(caller).await;
        if quota {
            let _rows = self.rows();
            self.check_quota(
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
                    Ok(Some(Resource::Vm(vm.id)))
                },
            )
            .await
    }

    /// Stop: ask the agent for a clean shutdown, then the VMM, then kill.
    async fn shut_down(&self, ctx: &JobContext, id: &str, base: f64) -> Result<()> {
        let vm = self.transition(id, VmEvent::Stop, |_| {})?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            self.transition(id, VmEvent::Exited, |_| {})?;
            return Ok(());
        };
        let process = ProcessId { pid, start };
        let config = self.config();
        let grace = Duration::from_secs(config.vm.stop_timeout_secs);
        ctx.stage("shutdown", base).await?;
        let paths = self.vm_paths(id);
        let vmm = vmm_named(&config, vm.vmm)?;
        let asked =
            match crate::os::agent::connect(&vmm.agent(&paths), Duration::from_secs(3)).await {
                Ok(mut conn) => conn.shutdown(false, Duration::from_secs(5)).await.is_ok(),
                Err(_) => false,
            };
        if !asked {
            let _ = vmm.request_shutdown(&paths).await;
        }
        if !self.wait_recorded(id, process, grace).await {
            ctx.stage("force", base + 0.5).await?;
            tracing::warn!(banger_vm_id = %id, "the guest did not shut down within {grace:?}; killing its vmm");
            let _ = process.signal(Signal::SIGKILL);
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

    /// [`Core::shut_down`] when VM `id` has a VMM process; nothing otherwise.
    async fn shut_down_if_running(&self, ctx: &JobContext, id: &str) -> Result<()> {
        let running = self
            .deps
            .store
            .vm(id)
            .ok()
            .flatten()
            .is_some_and(|v| v.state.has_process());
        if running {
            self.shut_down(ctx, id, 0.0).await?;
        }
        Ok(())
    }

    /// Stop a VM as a job.
    pub async fn stop_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
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
        let quota = self.quota_applies(caller).await;
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
                    core.boot(&ctx, &vm.id, 0.4, quota).await?;
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
        ProcessId { pid, start }.signal(signal)
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
                    core.transition(&vm.id, VmEvent::Delete, |_| {})?;
                    core.destroy(&vm.id).await?;
                    Ok(None)
                },
            )
            .await
    }

    /// Remove everything of VM `id`: process, network, files, row, lease.
    async fn destroy(&self, id: &str) -> Result<()> {
        self.halt(id).await;
        let Some(vm) = self
            .deps
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
        let store = self.deps.store.clone();
        let owned = id.to_owned();
        blocking(move || {
            store
                .delete_vm(&owned)
                .map_err(store_err("removing the vm failed"))
        })
        .await?;
        tracing::info!(banger_vm_id = %id, banger_vm_name = %vm.name, "vm deleted");
        self.jobs()
            .send(JobEvent::ResourceRemoved(Resource::Vm(id.to_owned())));
        Ok(())
    }

    /// Change a VM's sizes (stopped only) or NAT (any time).
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
            self.deps
                .authorizer
                .authorize(caller, Action::VmNat)
                .await?;
        }
        let sizes =
            changes.vcpus.is_some() || changes.memory_mib.is_some() || changes.disk_bytes.is_some();
        if changes == VmChanges::default() {
            return Err(Error::invalid(
                "nothing to change: give vcpus, memory_mib, disk_bytes or nat",
            ));
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
        self.enforce_quota(
            caller,
            vm.owner_uid,
            &demand,
            None,
            &format!("vm {}", vm.name),
        )
        .await?;
        let _claim = self.claim_vm(&vm)?;
        if sizes && vm.state != VmState::Stopped {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is {}: stop it to change vcpus, memory or disk size (banger vm stop {})",
                    vm.name,
                    vm.state.as_str(),
                    vm.name
                ),
            ));
        }
        if disk_bytes > vm.disk_bytes {
            let work = self.vm_paths(&vm.id).work_disk;
            blocking(move || disk::grow_ext4(&work, disk_bytes)).await?;
        }
        if let Some(nat) = nat_change
            && vm.state.has_process()
            && let Some(ip) = self.vm_ipv4(&vm.id).await
        {
            self.network().await?.set_nat(ip, nat).await?;
        }
        self.modify(&vm.id, |v| {
            v.vcpus = vcpus;
            v.memory_mib = memory;
            v.disk_bytes = disk_bytes;
            if let Some(nat) = changes.nat {
                v.nat = nat;
            }
        })
    }

    /// Up to 1 MiB of VM `id`'s console log from byte `offset`, and
    /// the offset after it. Only its owner (or `manage-others`) may read it.
    pub async fn vm_console(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_read_vm(caller, &vm).await?;
        let log = self.vm_paths(&vm.id).console_log;
        blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = match std::fs::File::open(&log) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
                Err(e) => return Err(Error::failed(format!("cannot read the console log: {e}"))),
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A log shorter than the offset was started anew: from the top.
            let from = if offset > len { 0 } else { offset };
            file.seek(SeekFrom::Start(from))
                .map_err(|e| Error::failed(format!("cannot read the console log: {e}")))?;
            let mut data = Vec::new();
            file.take(1 << 20)
                .read_to_end(&mut data)
                .map_err(|e| Error::failed(format!("cannot read the console log: {e}")))?;
            let next = from + data.len() as u64;
            Ok((data, next))
        })
        .await
    }

    /// CPU and memory of the VMM process and what the agent says.
    pub async fn vm_stats(&self, caller: &Caller, id: &str) -> Result<VmStats> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_read_vm(caller, &vm).await?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("vm {} is not running", vm.name),
            ));
        };
        let process = ProcessId { pid, start };
        let mut stats = process_stats(process)
            .ok_or_else(|| Error::new(ErrorKind::Busy, format!("vm {} is not running", vm.name)))?;
        if vm.state == VmState::Running {
            let vmm = vmm_named(&self.config(), vm.vmm)?;
            if let Ok(mut conn) = crate::os::agent::connect(
                &vmm.agent(&self.vm_paths(&vm.id)),
                Duration::from_secs(2),
            )
            .await
                && let Ok(info) = conn.info(Duration::from_secs(2)).await
            {
                stats.guest_kernel = info.kernel_release;
                stats.guest_hostname = info.hostname;
            }
        }
        Ok(stats)
    }

    /// Make the store agree with reality after a (re)start: finish
    /// interrupted creates and deletes, adopt VMMs that still run, mark
    /// the others stopped, and bring the network up for the running ones.
    pub async fn reconcile_vms(self: &Arc<Self>) -> Result<()> {
        let vms = self.vms().await?;
        let mut adopted = Vec::new();
        for vm in vms {
            match vm.state {
                VmState::Creating | VmState::Deleting => {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, state = vm.state.as_str(), "removing a vm an earlier run left half made");
                    if let Err(e) = self.destroy(&vm.id).await {
                        tracing::error!(banger_vm_id = %vm.id, "cannot remove it: {e}");
                    }
                }
                VmState::Stopped => {}
                VmState::Starting | VmState::Running | VmState::Stopping => {
                    let process = match (vm.pid, vm.pid_start) {
                        (Some(pid), Some(start)) => Some(ProcessId { pid, start }),
                        _ => None,
                    };
                    match process.filter(ProcessId::alive) {
                        Some(p) => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = p.pid, "adopting a running vm");
                            let _ = self.modify(&vm.id, |v| v.state = VmState::Running);
                            self.watch(&vm.id, p, Watched::Adopted(p));
                            adopted.push(vm);
                        }
                        None => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "its vmm is gone; marking it stopped");
                            self.system_disk_down(&vm).await;
                            let _ = self.modify(&vm.id, |v| {
                                v.state = VmState::Stopped;
                                v.pid = None;
                                v.pid_start = None;
                                v.tap = None;
                            });
                        }
                    }
                }
            }
        }
        if !adopted.is_empty() {
            let net = self.network().await?;
            for vm in adopted {
                if let Err(e) = net.adopt(&vm.id, &vm.name, vm.nat).await {
                    tracing::warn!(banger_vm_id = %vm.id, "cannot restore its name and NAT: {e}");
                }
            }
        }
        Ok(())
    }

    /// How many VMs run (for the status line).
    pub fn running_vms(&self) -> usize {
        self.deps
            .store
            .vms()
            .map(|v| v.iter().filter(|v| v.state == VmState::Running).count())
            .unwrap_or(0)
    }
}

/// Why one boot attempt failed: a stall (console silent before the
/// agent answered, worth one more boot) or anything else.
#[derive(Debug)]
enum BootError {
    Stalled(Error),
    Failed(Error),
}

impl BootError {
    fn error(&self) -> &Error {
        match self {
            Self::Stalled(e) | Self::Failed(e) => e,
        }
    }

    fn into_error(self) -> Error {
        match self {
            Self::Stalled(e) | Self::Failed(e) => e,
        }
    }
}

impl From<Error> for BootError {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}
/// Console silence before the agent answers that counts as a stall.
const STALL_AFTER: Duration = Duration::from_secs(30);

/// Returns once `log` has not grown for `quiet`.
async fn console_silence(log: &std::path::Path, quiet: Duration) {
    let mut last = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
    }
}

async fn bind_dns(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}

/// CPU time, resident memory and uptime of a process, from /proc.
fn process_stats(p: ProcessId) -> Option<VmStats> {
    if !p.alive() {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(VmStats {
        cpu_usec: (utime + stime) * 1_000_000 / ticks,
        rss_bytes: rss_kib * 1024,
        uptime_secs: (uptime - p.start as f64 / ticks as f64).max(0.0),
        ..VmStats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::disk::DiskMethod;
    use super::*;

    fn kernel(initrd: bool) -> Kernel {
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

    fn image(init: Option<&str>) -> Image {
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
    fn the_kernel_gets_ip_only_when_its_nic_driver_is_built_in() {
        let ip = "10.0.0.2::10.0.0.1:255.255.255.0:web:eth0:off:10.0.0.1";
        let with_initrd = kernel_cmdline(
            &kernel(true),
            &image(Some("/sbin/banger-init")),
            "web",
            ip,
            Accel::Kvm,
        );
        assert!(with_initrd.contains(&format!("banger.ip={ip}")));
        assert!(!with_initrd.contains(" ip="));
        assert!(with_initrd.ends_with("init=/sbin/banger-init"));
        assert!(with_initrd.contains("banger.hostname=web"));
        assert!(with_initrd.starts_with("console=ttyS0 "));
        assert!(
            !with_initrd.contains("tsc_early_khz"),
            "KVM calibrates itself"
        );
        let built_in = kernel_cmdline(&kernel(false), &image(None), "web", ip, Accel::Tcg);
        assert!(built_in.contains(&format!(" ip={ip}")));
        assert!(!built_in.contains("init="));
        assert!(
            built_in.contains(" tsc_early_khz="),
            "TCG gets its TSC frequency"
        );
    }

    #[test]
    fn the_vmm_choice_follows_the_configuration_and_the_probe() {
        use crate::vm::vmm::kvm::KvmVerdict;
        let dir = tempfile::tempdir().expect("tempdir");
        let fc = dir.path().join("firecracker");
        std::fs::write(&fc, "").expect("fake binary");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let usable = || KvmVerdict::Usable(Duration::from_millis(300));
        let stalled = || KvmVerdict::Unusable("a guest kernel stalled under kvm".into());
        let unasked = || -> KvmVerdict { panic!("the probe is not needed here") };
        let pick = |vmm, accel, installed: bool, verdict: &dyn Fn() -> KvmVerdict| {
            let mut config = Config::default();
            config.vm.vmm = vmm;
            config.vm.accel = accel;
            config.vm.firecracker_bin = if installed {
                fc.clone()
            } else {
                "/nonexistent/firecracker".into()
            };
            choose_vmm(&config, verdict).map(|(v, a)| (v.name(), a))
        };
        use VmmKind as V;
        use config::Accel as A;
        // auto: firecracker only where it is installed and KVM works.
        assert_eq!(
            pick(V::Auto, A::Auto, true, &usable).expect("fc"),
            ("firecracker", Accel::Kvm)
        );
        assert_eq!(
            pick(V::Auto, A::Auto, true, &stalled).expect("tcg"),
            ("qemu", Accel::Tcg)
        );
        assert_eq!(
            pick(V::Auto, A::Auto, false, &usable).expect("kvm"),
            ("qemu", Accel::Kvm)
        );
        assert_eq!(
            pick(V::Auto, A::Tcg, true, &unasked).expect("tcg"),
            ("qemu", Accel::Tcg)
        );
        assert_eq!(
            pick(V::Qemu, A::Tcg, true, &unasked).expect("tcg"),
            ("qemu", Accel::Tcg)
        );
        assert_eq!(
            pick(V::Qemu, A::Kvm, true, &unasked).expect("kvm"),
            ("qemu", Accel::Kvm)
        );
        assert_eq!(
            pick(V::Qemu, A::Auto, true, &stalled).expect("tcg"),
            ("qemu", Accel::Tcg)
        );
        // Asked for firecracker: it runs, or the refusal says why.
        assert_eq!(
            pick(V::Firecracker, A::Auto, true, &usable).expect("fc"),
            ("firecracker", Accel::Kvm)
        );
        let e = pick(V::Firecracker, A::Auto, true, &stalled).expect_err("no kvm");
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(
            e.message.contains("stalled") && e.message.contains("vm.vmm"),
            "{}",
            e.message
        );
        let e = pick(V::Firecracker, A::Tcg, true, &unasked).expect_err("tcg");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = pick(V::Firecracker, A::Kvm, false, &unasked).expect_err("missing");
        assert!(e.message.contains("firecracker_bin"), "{}", e.message);
        let mut config = Config::default();
        config.vm.vmm = VmmKind::Qemu;
        config.vm.qemu_bin = "/nonexistent/qemu".into();
        let e = check_vmm(&config).expect_err("no qemu");
        assert!(e.message.contains("qemu-system-x86"), "{}", e.message);
        // A recorded VM finds its own driver whatever the configuration says.
        assert_eq!(
            vmm_named(&config, Some(crate::vm::VmmDriver::Firecracker))
                .expect("fc")
                .name(),
            "firecracker"
        );
        assert_eq!(
            vmm_named(&config, Some(crate::vm::VmmDriver::Qemu))
                .expect("qemu")
                .name(),
            "qemu"
        );
    }

    #[test]
    fn process_stats_of_a_live_process() {
        let me = ProcessId::of(std::process::id()).expect("me");
        let s = process_stats(me).expect("stats");
        assert!(s.rss_bytes > 0);
        assert!(s.uptime_secs >= 0.0);
        let gone = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(process_stats(gone).is_none());
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
