//! Booting a VM: its kernel command line, its system disk, and the boot
//! steps with the retry after a stalled early boot.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Vms;
use crate::artifacts::{Image, Kernel};
use crate::error::{Error, Result};
use crate::jobs::JobContext;
use crate::net::network::Switches;
use crate::vm::agent::Ready;
use crate::vm::disk::DiskMethod;
use crate::vm::quota::Demand;
use crate::vm::snapshot;
use crate::vm::vmm::LaunchSpec;
use crate::vm::vmm::jail::{self, VMM_GROUP};
use crate::vm::vmm::jailer;
use crate::vm::vmm::{Accel, Confine, TCG_TSC_KHZ};
use crate::vm::{Vm, VmEvent, VmState};

use super::blocking;

/// Let every VMM read `file`, a kernel or initramfs under the state
/// directory `state`: the file and the directories below `state` on its
/// way become group [`VMM_GROUP`] (read for files, search for
/// directories; nothing for others), and `state` itself searchable, so
/// that a VMM running as its own user opens it by path. Files outside
/// `state` are left as they are (root's own kernels: readable or not is
/// root's choice, and QEMU says so).
pub fn share_with_vmms(state: &Path, file: &Path) -> std::io::Result<()> {
    let Ok(below) = file.strip_prefix(state) else {
        return Ok(());
    };
    let set = |path: &Path, bits: u32| -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Err(std::io::Error::other(format!(
                "{} is a symbolic link",
                path.display()
            )));
        }
        if meta.gid() != VMM_GROUP {
            std::os::unix::fs::lchown(path, None, Some(VMM_GROUP))?;
        }
        let mode = (meta.mode() & 0o700) | bits;
        if meta.mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    let mut at = state.to_owned();
    let parts: Vec<_> = below.components().collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        set(&at, if i + 1 == parts.len() { 0o040 } else { 0o010 })?;
    }
    // The state directory: searchable by anyone (its entries are 0700
    // but for what is shared here); systemd's StateDirectoryMode says
    // the same.
    let meta = std::fs::metadata(state)?;
    if meta.mode() & 0o001 == 0 {
        std::fs::set_permissions(
            state,
            std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o011),
        )?;
    }
    Ok(())
}

/// The kernel command line of VM `id` (named `name`). `banger.id=`
/// tells the guest which VM its disks boot as: a system disk that last
/// booted as another VM (a clone's) gets new SSH host keys from the
/// guest's init. `systemd.machine_id=` gives each VM its own stable
/// machine id.
pub fn kernel_cmdline(
    kernel: &Kernel,
    image: &Image,
    (id, name): (&str, &str),
    ip_arg: Option<&str>,
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
        format!("banger.id={id}"),
        format!("systemd.machine_id={}", crate::vm::machine_id(id)),
    ];
    if let Some(ip_arg) = ip_arg {
        args.push(format!("banger.ip={ip_arg}"));
        // With an initramfs the NIC driver is a module: the kernel's own
        // ip= would wait minutes for it, so only banger.ip= (read by the
        // guest's init) is given then.
        if kernel.initrd.is_none() {
            args.push(format!("ip={ip_arg}"));
        }
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

impl Vms {
    /// The system disk VM `vm`'s VMM opens: its file, or for a dm
    /// snapshot the device brought up over the image and its change store.
    async fn system_disk_up(&self, vm: &Vm, image: &Image) -> Result<PathBuf> {
        let paths = self.vm_paths(&vm.id);
        if vm.disk_method != Some(DiskMethod::DeviceMapper) {
            return Ok(paths.system_disk);
        }
        let dm = self.dm.clone();
        let (id, base) = (vm.id.clone(), image.rootfs.clone());
        blocking(move || {
            snapshot::activate(dm.as_ref(), &id, &base, &paths.system_cow, &paths.loops)
        })
        .await
    }

    /// Who the VMM of the VM with address `ip` runs as ([`jail`]), with
    /// its kernel and initramfs made readable to it.
    async fn confinement(
        &self,
        net: &crate::net::network::Network,
        ip: &std::net::Ipv4Addr,
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<Confine> {
        let uid = net
            .subnet()
            .host_index(*ip)
            .and_then(jail::vm_uid)
            .ok_or_else(|| Error::failed(format!("{ip} gives no VMM uid")))?;
        let state = self.dirs.state.clone();
        let files: Vec<PathBuf> = std::iter::once(kernel)
            .chain(initrd)
            .map(Path::to_owned)
            .collect();
        blocking(move || {
            for file in &files {
                share_with_vmms(&state, file).map_err(|e| {
                    Error::failed(format!("cannot let VMMs read {}: {e}", file.display()))
                })?;
            }
            Ok(())
        })
        .await?;
        Ok(Confine {
            helper: self.helper.clone(),
            uid,
        })
    }

    /// Take VM `vm`'s disks back from its (gone) VMM: remove the jail a
    /// jailed Firecracker had (its links and device node; the files back
    /// to root), then take its snapshot device and loop devices down, if
    /// it has any.
    pub(super) async fn system_disk_down(&self, vm: &Vm) {
        // Its folders' virtiofsds end with the VMM's connection; not when
        // the VMM never came, or this is a restart finding it gone. A VM
        // without folders has none: its folders change only while it is
        // stopped, after this ran for the ones it had (and a start stops
        // a leftover helper first).
        if !vm.mounts.is_empty() {
            self.supervisor.stop_folders(&vm.id).await;
        }
        let paths = self.vm_paths(&vm.id);
        if let Err(e) = blocking(move || {
            jailer::release(&paths)
                .map_err(|e| Error::failed(format!("cannot remove its jail: {e}")))
        })
        .await
        {
            tracing::warn!(banger_vm_id = %vm.id, "{e}");
        }
        if vm.disk_method != Some(DiskMethod::DeviceMapper) {
            return;
        }
        let dm = self.dm.clone();
        let (id, loops) = (vm.id.clone(), self.vm_paths(&vm.id).loops);
        if let Err(e) = blocking(move || snapshot::deactivate(dm.as_ref(), &id, &loops)).await {
            tracing::warn!(banger_vm_id = %vm.id, "cannot take its system disk down: {e}");
        }
    }

    /// Boot VM `id` (Stopped): network, VMM, agent, services. On failure
    /// the VM is stopped again and the error recorded.
    /// With `quota`, the owner's `[limits]` are checked at the moment
    /// the VM turns Starting.
    pub(super) async fn boot(
        self: &Arc<Self>,
        ctx: &JobContext,
        id: &str,
        base: f64,
        quota: bool,
    ) -> Result<()> {
        let origin = self.saved_origin(id).await;
        let mut result = self.boot_once(ctx, id, base, quota).await;
        // A saved state that does not load is dropped; the VM boots from
        // its disks as after a power cut.
        if let Err(BootError::Restore(e) | BootError::Renew(e)) = &result {
            tracing::warn!(banger_vm_id = %id, "cannot resume the vm: {}; booting it instead", e.message);
            let why = if matches!(&result, Err(BootError::Renew(_))) {
                "cold boot: the restored guest could not take its own identity"
            } else {
                "cold boot: the saved memory did not load"
            };
            ctx.stage(why, base).await?;
            ctx.progress(&e.message, base, None);
            self.drop_suspend(id).await?;
            // A template's work disk has no keys: the guest was to get
            // them through the agent. A template that does not load is
            // made again after this boot.
            if let Some(template) = origin.as_deref().and_then(|o| o.strip_prefix("template-")) {
                self.remove_template(template).await;
                let vm = self.vm_by_id(id).await?;
                let (tools, work) = (self.tools.clone(), self.vm_paths(id).work_disk);
                blocking(move || {
                    crate::vm::disk::write_authorized_keys(&*tools, &work, &vm.ssh_keys)
                })
                .await?;
            }
            result = self.boot_once(ctx, id, base, quota).await;
        }
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
        let vm = self
            .transition_if(
                id,
                VmEvent::Start,
                move |quotas, held, vm| {
                    if !quota {
                        return Ok(());
                    }
                    quotas.check(
                        held,
                        vm.owner_uid,
                        &Demand::start(vm.vcpus, vm.memory_mib),
                        Some(&vm.id),
                        &format!("vm {}", vm.name),
                    )
                },
                |v| v.last_error.clear(),
            )
            .await?;
        let result = self.boot_steps(ctx, &vm, base).await;
        if let Err(e) = &result {
            self.halt(id).await;
            let message = e.error().message.clone();
            let _ = self
                .modify(id, move |v| {
                    if v.state == VmState::Starting && v.pid.is_none() {
                        v.state = VmState::Stopped;
                    }
                    v.last_error = message;
                })
                .await;
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
        let image = self.artifacts.image_by_id(&vm.image_id).await?;
        let kernel = self.artifacts.kernel_by_id(&vm.kernel_id).await?;
        let paths = self.vm_paths(&vm.id);

        ctx.stage("network", base).await?;
        let net = self.network().await?;
        let switches = Switches {
            nat: vm.nat,
            peers: vm.peers,
        };
        let vmnet = net.attach(&vm.id, &vm.name, 0, switches).await?;
        let tap = vmnet.tap.clone();
        if let Err(e) = self.modify(&vm.id, move |v| v.tap = Some(tap)).await {
            let _ = net
                .detach(&vm.name, vmnet.lease.ipv4, Some(&vmnet.tap))
                .await;
            return Err(e.into());
        }

        ctx.stage("vmm start", base + step).await?;
        let run = paths.run.clone();
        blocking(move || {
            std::fs::create_dir_all(&run)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", run.display())))
        })
        .await?;
        let launched = async {
            let (vmm, accel, kernel_path) = self.pick_vmm(&kernel).await?;
            let incoming = if vm.suspended {
                self.loadable(ctx, vm, vmm.as_ref(), accel, &kernel_path, kernel.initrd.as_deref()).await?
            } else {
                None
            };
            if !vm.mounts.is_empty() && vmm.driver() != crate::vm::VmmDriver::Qemu {
                return Err(Error::unavailable(format!(
                    "vm {} has host folders, which need QEMU: {} has no virtio-fs device; set vm.vmm = \"qemu\" in bangerd.toml, or remove them (banger vm set {} --no-mounts)",
                    vm.name,
                    vmm.name(),
                    vm.name
                )));
            }
            // QEMU runs as the VM's own user, and so does Firecracker
            // under its jailer; without one, as a root without
            // capabilities.
            let confine = if vmm.confined() {
                Some(self.confinement(&net, &vmnet.lease.ipv4, &kernel_path, kernel.initrd.as_deref()).await?)
            } else {
                None
            };
            let system_disk = self.system_disk_up(vm, &image).await?;
            let shares = self.start_folders(vm, &paths).await?;
            let spec = LaunchSpec {
                id: vm.id.clone(),
                name: vm.name.clone(),
                kernel: kernel_path,
                initrd: kernel.initrd.clone(),
                cmdline: kernel_cmdline(
                    &kernel,
                    &image,
                    (&vm.id, &vm.name),
                    Some(&vmnet.ip_arg),
                    accel,
                ),
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                paths: paths.clone(),
                system_disk,
                net: Some((vmnet.tap.clone(), vmnet.lease.mac.clone())),
                accel,
                confine,
                shares,
                incoming: incoming.is_some(),
            };
            tracing::info!(banger_vm_id = %vm.id, "starting {} with {} under {}", vm.name, vmm.name(), accel.as_str());
            let supervisor = self.supervisor.as_ref();
            let (watched, pid) = vmm.launch(&spec, supervisor).await?;
            Ok::<_, Error>((vmm, watched, pid, incoming, spec))
        }
        .await;
        let (vmm, watched, pid, incoming, spec) = match launched {
            Ok(l) => l,
            Err(e) => {
                let _ = net
                    .detach(&vm.name, vmnet.lease.ipv4, Some(&vmnet.tap))
                    .await;
                let _ = self.modify(&vm.id, |v| v.tap = None).await;
                self.system_disk_down(vm).await;
                return Err(e.into());
            }
        };
        let driver = vmm.driver();
        let recorded = self
            .modify(&vm.id, move |v| {
                v.pid = Some(pid.pid);
                v.pid_start = Some(pid.start);
                v.vmm = Some(driver);
            })
            .await;
        self.watch(&vm.id, pid, watched);
        recorded?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = pid.pid, vmm = vmm.name(), "vmm started");

        let resumed = incoming.is_some();
        let mut origin = None;
        if let Some(key) = incoming {
            ctx.stage("restore", base + step).await?;
            origin = self
                .restore_state(vm, vmm.as_ref(), &spec, key)
                .await
                .map_err(BootError::Restore)?;
        }

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
            r = self.agent.wait_ready(
                &endpoint,
                Duration::from_secs(config.vm.boot_timeout_secs),
                Duration::from_millis(200),
            ) => r,
        };
        let Ready {
            session: mut conn,
            health,
            took,
        } = waited.map_err(|e| {
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
        if let Some(origin) = origin {
            // Another VM's guest: it becomes this one before anyone
            // reaches it. One that cannot is booted instead.
            ctx.stage("identity", base + 3.0 * step).await?;
            let identity = guest_identity(vm, &vmnet, net.subnet()).await?;
            let steps = conn
                .renew(identity, Duration::from_secs(60))
                .await
                .map_err(|e| {
                    BootError::Renew(Error::failed(format!(
                        "the guest from vm {origin} could not take its own identity: {e}"
                    )))
                })?;
            let summary: Vec<String> = steps
                .iter()
                .map(|(step, ms)| format!("{step} {ms} ms"))
                .collect();
            let summary = summary.join(", ");
            tracing::info!(banger_vm_id = %vm.id, "guest of vm {origin} renewed: {summary}");
            ctx.progress(&summary, base + 3.0 * step, None);
        } else if resumed && let Err(e) = conn.sync_time(Duration::from_secs(5)).await {
            // A resumed guest's clock stood still while it was saved.
            tracing::warn!(banger_vm_id = %vm.id, "cannot set the resumed guest's clock: {e}");
        }

        if !vm.mounts.is_empty() {
            ctx.stage("host folders", base + 3.0 * step).await?;
            self.mount_folders(conn.as_mut(), vm).await?;
        }
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
        self.transition(&vm.id, VmEvent::Ready, |_| {}).await?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "vm running");
        Ok(())
    }
}

/// What a guest restored from another VM's memory becomes: VM `vm` with
/// its lease, names, keys and fresh randomness from the host.
async fn guest_identity(
    vm: &Vm,
    vmnet: &crate::net::network::VmNet,
    subnet: &crate::net::leases::Subnet,
) -> Result<banger_agent_proto::Identity> {
    let seed = blocking(|| {
        use std::io::Read;
        let mut seed = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| Error::failed(format!("cannot read /dev/urandom: {e}")))?;
        Ok(seed)
    })
    .await?;
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(banger_agent_proto::Identity {
        seed,
        unix_ns,
        hostname: vm.name.clone(),
        vm_id: vm.id.clone(),
        machine_id: crate::vm::machine_id(&vm.id),
        device: "eth0".to_owned(),
        mac: vmnet.lease.mac.clone(),
        address: format!("{}/{}", vmnet.lease.ipv4, subnet.net().prefix_len()),
        gateway: Some(subnet.gateway().to_string()),
        dns: Some(subnet.gateway().to_string()),
        authorized_keys: vm.ssh_keys.clone(),
    })
}

/// Why one boot attempt failed: a stall (console silent before the
/// agent answered, worth one more boot), a saved state that did not load
/// or a restored guest that could not be renewed (each worth a boot from
/// the disks), or anything else.
#[derive(Debug)]
enum BootError {
    Stalled(Error),
    Restore(Error),
    Renew(Error),
    Failed(Error),
}

impl BootError {
    fn error(&self) -> &Error {
        match self {
            Self::Stalled(e) | Self::Restore(e) | Self::Renew(e) | Self::Failed(e) => e,
        }
    }

    fn into_error(self) -> Error {
        match self {
            Self::Stalled(e) | Self::Restore(e) | Self::Renew(e) | Self::Failed(e) => e,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::commands::tests::{image, kernel};

    #[test]
    fn the_kernel_gets_ip_only_when_its_nic_driver_is_built_in() {
        let ip = "10.0.0.2::10.0.0.1:255.255.255.0:web:eth0:off:10.0.0.1";
        let with_initrd = kernel_cmdline(
            &kernel(true),
            &image(Some("/sbin/banger-init")),
            ("0123456789abcdef", "web"),
            Some(ip),
            Accel::Kvm,
        );
        assert!(with_initrd.contains(&format!("banger.ip={ip}")));
        assert!(!with_initrd.contains(" ip="));
        assert!(with_initrd.ends_with("init=/sbin/banger-init"));
        assert!(with_initrd.contains("banger.hostname=web"));
        assert!(with_initrd.contains(" banger.id=0123456789abcdef "));
        let template = kernel_cmdline(
            &kernel(false),
            &image(None),
            ("0123456789abcdef", "template"),
            None,
            Accel::Tcg,
        );
        assert!(!template.contains("ip="), "{template}");
        let machine_id = crate::vm::machine_id("0123456789abcdef");
        assert!(with_initrd.contains(&format!(" systemd.machine_id={machine_id} ")));
        assert!(with_initrd.starts_with("console=ttyS0 "));
        assert!(
            !with_initrd.contains("tsc_early_khz"),
            "KVM calibrates itself"
        );
        let built_in = kernel_cmdline(
            &kernel(false),
            &image(None),
            ("0123456789abcdef", "web"),
            Some(ip),
            Accel::Tcg,
        );
        assert!(built_in.contains(&format!(" ip={ip}")));
        assert!(!built_in.contains("init="));
        assert!(
            built_in.contains(" tsc_early_khz="),
            "TCG gets its TSC frequency"
        );
    }

    /// A kernel under the state directory becomes readable to the VMMs'
    /// group and nobody else; its way there searchable by that group;
    /// the state directory by anyone; files elsewhere are left alone.
    #[test]
    fn kernels_are_shared_with_the_vmms_group_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let kdir = state.join("kernels").join("abc");
        std::fs::create_dir_all(&kdir).expect("dirs");
        for d in [&state, &state.join("kernels"), &kdir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let kernel = kdir.join("vmlinuz");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let root_owned = nix::unistd::Uid::effective().is_root();
        let shared = share_with_vmms(&state, &kernel);
        if !root_owned {
            // chown to another group takes root.
            assert!(shared.is_err());
            return;
        }
        shared.expect("shared");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").mode() & 0o7777;
        let gid = |p: &Path| std::fs::metadata(p).expect("meta").gid();
        assert_eq!(mode(&kernel), 0o640, "readable by the group, not by others");
        assert_eq!(gid(&kernel), VMM_GROUP);
        for d in [state.join("kernels"), kdir.clone()] {
            assert_eq!(mode(&d), 0o710, "{}", d.display());
            assert_eq!(gid(&d), VMM_GROUP);
        }
        assert_eq!(mode(&state), 0o711, "searchable, not readable");
        assert_eq!(gid(&state), 0, "the state directory keeps its group");
        // Again: nothing changes.
        share_with_vmms(&state, &kernel).expect("again");
        assert_eq!(mode(&kernel), 0o640);
        // Elsewhere: untouched.
        let outside = dir.path().join("vmlinuz");
        std::fs::write(&outside, b"k").expect("write");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        share_with_vmms(&state, &outside).expect("outside");
        assert_eq!(mode(&outside), 0o600);
        assert_eq!(gid(&outside), 0);
        // A link on the way is refused, not followed.
        let link = state.join("kernels").join("link");
        std::os::unix::fs::symlink(&kdir, &link).expect("symlink");
        assert!(share_with_vmms(&state, &link.join("vmlinuz")).is_err());
    }
}
