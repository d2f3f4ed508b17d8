//! Virtual machine monitors behind one trait: [`firecracker::Firecracker`]
//! (one process and API socket per VM) and [`qemu::Qemu`] (QEMU's
//! `microvm` machine, with KVM or TCG). [`kvm::probe`] decides whether KVM
//! really runs guests here. Who runs the VMM process is a
//! [`supervise::Supervisor`]; [`process`] finds it again by pid and start
//! time.
//!
//! It knows no VM record, store or daemon: a [`LaunchSpec`] says
//! everything a boot needs.

pub mod firecracker;
pub mod jail;
pub mod jailer;
pub mod kvm;
pub mod process;
pub mod qemu;
pub mod supervise;
pub mod virtiofs;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use banger_agent_host::AgentEndpoint;
use banger_error::Result;

use crate::process::{ProcessId, Watched};
use crate::supervise::Supervisor;

/// A boxed future, for the object-safe traits here.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Start `program args` for `spec` through `supervisor`, after removing
/// the sockets an earlier run may have left. `launcher` says what
/// `program` is when `jail` does not wrap it in `vmm-exec`.
pub(crate) async fn start_process(
    spec: &LaunchSpec,
    supervisor: &dyn Supervisor,
    program: &std::path::Path,
    args: &[String],
    jail: Option<&jail::Jail>,
    launcher: supervise::Launcher,
) -> Result<(Watched, ProcessId)> {
    let p = &spec.paths;
    let _ = std::fs::remove_file(&p.agent_socket);
    let _ = std::fs::remove_file(&p.control_socket);
    // A jailed VMM's descriptors are opened here, by bangerd, and handed
    // to its vmm-exec over a socket in the VM's runtime directory.
    let mut handoff = None;
    let wrapped = match (jail, &spec.confine) {
        (Some(jail), Some(confine)) => {
            let at = p.run.join("handoff.sock");
            let fds = jail.fds.len();
            let opened = jail::Handoff::open(&at, &jail.fds).map_err(|e| {
                banger_error::Error::failed(format!("cannot open what the VMM needs: {e}"))
            })?;
            handoff = Some((
                tokio::task::spawn_blocking(move || opened.serve(HANDOFF_TIMEOUT)),
                at.clone(),
                fds,
            ));
            let jail = jail::Jail {
                private_network: jail.private_network && supervisor.vmm_network_namespace(),
                handoff: Some(at),
                ..jail.clone()
            };
            Some(jail.command(&confine.helper, program, args))
        }
        _ => None,
    };
    let (program, args) = match &wrapped {
        Some((helper, argv)) => (helper.as_path(), argv.as_slice()),
        None => (program, args),
    };
    let started = supervisor
        .start(crate::supervise::StartRequest {
            vm_id: &spec.id,
            vm_name: &spec.name,
            program,
            args,
            launcher: if wrapped.is_some() {
                supervise::Launcher::VmmExec
            } else {
                launcher
            },
            log: &p.vmm_log,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            writable: &[p.dir.clone(), p.run.clone()],
            jit: spec.accel == Accel::Tcg,
        })
        .await;
    let Some((serving, at, fds)) = handoff else {
        return started;
    };
    if started.is_err() {
        // Nobody comes for them: take them back (and let go of the TAP).
        let _ = tokio::task::spawn_blocking(move || jail::receive(&at, fds)).await;
    }
    let served = serving
        .await
        .map_err(|e| banger_error::Error::failed(format!("internal task failed: {e}")))?;
    let (mut watched, id) = started?;
    if let Err(e) = served {
        let ended = watched.ended();
        kill_failed(supervisor, &spec.id, &mut watched, id).await;
        // vmm-exec says why on the VMM's log when it gave up.
        return Err(if ended {
            exited_at_start("vmm-exec", &p.vmm_log)
        } else {
            banger_error::Error::failed(format!("the VMM did not get its descriptors: {e}"))
        });
    }
    Ok((watched, id))
}

/// How long bangerd waits for a jailed VMM's vmm-exec to take its
/// descriptors after its start.
const HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The error for a VMM that exited before it was ready: its last log lines.
pub(crate) fn exited_at_start(vmm: &str, log: &std::path::Path) -> banger_error::Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    banger_error::Error::failed(format!(
        "{vmm} exited at start: {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Kill a VMM that failed at start and reap it if it is bangerd's child.
pub(crate) async fn kill_failed(
    supervisor: &dyn Supervisor,
    vm_id: &str,
    watched: &mut Watched,
    id: ProcessId,
) {
    let _ = supervisor
        .signal(vm_id, id, nix::sys::signal::Signal::SIGKILL)
        .await;
    if let Watched::Child(child) = watched {
        let _ = child.wait();
    }
}

/// The TSC frequency TCG guests are told (`tsc_early_khz`, kernel 5.7+),
/// so that they skip calibrating against the emulated PIT.
pub const TCG_TSC_KHZ: &str = "tsc_early_khz=2000000";

/// Which accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (QEMU TCG): slow, works everywhere.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Everything a VMM needs to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The VM's id.
    pub id: String,
    /// The VM's name.
    pub name: String,
    /// The kernel to boot (bzImage for QEMU, ELF vmlinux for Firecracker).
    pub kernel: PathBuf,
    /// Its initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The VM's files and sockets.
    pub paths: VmPaths,
    /// The system disk the VMM opens: a file, or a snapshot's device.
    pub system_disk: PathBuf,
    /// The TAP to attach, with the guest MAC; an empty TAP name gives a
    /// NIC connected to nothing (QEMU).
    pub net: Option<(String, String)>,
    /// KVM or software emulation.
    pub accel: Accel,
    /// Run the VMM as a user of its own ([`jail`], [`jailer`]); `None`
    /// runs it as bangerd's user (the drivers' own tests, Firecracker
    /// without its jailer).
    pub confine: Option<Confine>,
    /// Host folders, each served by a virtiofsd already listening
    /// ([`virtiofs::start`]); only QEMU takes them.
    pub shares: Vec<virtiofs::Share>,
    /// The guest comes from a memory snapshot ([`Vmm::restore`]) rather
    /// than a boot: the VMM starts with the same devices and waits for it.
    pub incoming: bool,
}

/// What [`Vmm::save`] wrote a guest under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The accelerator the guest ran under: a snapshot loads only under
    /// the same one.
    pub accel: Accel,
}

/// The open files a guest's state is saved to or loaded from (made and
/// opened by bangerd, each still linked in the VM's directory).
#[derive(Debug)]
pub struct StateFds {
    /// The device state (with QEMU, the memory too).
    pub state: OwnedFd,
    /// The memory, for a VMM that keeps it apart
    /// ([`Vmm::memory_apart`]).
    pub memory: Option<OwnedFd>,
}

/// Who a VMM runs as, when it is jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    /// bangerd's own binary, which runs as `vmm-exec` in the VMM's place.
    pub helper: PathBuf,
    /// The VM's uid and gid ([`jail::vm_uid`]).
    pub uid: u32,
}

/// A VMM driver.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Which driver this is (stored with the VM).
    fn driver(&self) -> crate::VmmDriver;

    /// Short name (`qemu`, `firecracker`).
    fn name(&self) -> &'static str {
        self.driver().as_str()
    }

    /// Start the VMM for `spec` through `supervisor` and have it boot the
    /// guest. Returns the process and how to watch it.
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        supervisor: &'a dyn Supervisor,
    ) -> BoxFuture<'a, Result<(Watched, ProcessId)>>;

    /// Where the guest agent answers.
    fn agent(&self, paths: &VmPaths) -> AgentEndpoint;

    /// Ask the VMM to make the guest shut down (ACPI powerdown,
    /// Ctrl-Alt-Del); used when the agent does not answer.
    fn request_shutdown<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>>;

    /// Whether it can write a running guest's memory and device state to
    /// a file ([`Vmm::save`]) and start a guest from one
    /// ([`Vmm::restore`]).
    fn snapshots(&self) -> bool {
        false
    }

    /// Whether a state it saved loads into another VM, with that VM's
    /// own disks, NIC and sockets (templates and forks); a state that
    /// names the files of the VM it came from loads only into that VM.
    fn portable_snapshots(&self) -> bool {
        self.snapshots()
    }

    /// Whether it writes a guest's memory to a file of its own
    /// ([`StateFds::memory`]) rather than into the state.
    fn memory_apart(&self) -> bool {
        false
    }

    /// Pause the guest and write its memory and device state to `to`
    /// (opened by bangerd, passed as descriptors); the VMM stays
    /// paused, its disks flushed. [`Vmm::resume`] lets it run again,
    /// [`Vmm::quit`] ends it.
    fn save<'a>(&'a self, paths: &'a VmPaths, to: StateFds) -> BoxFuture<'a, Result<Saved>> {
        let _ = (paths, to);
        Box::pin(async move { Err(no_snapshots(self.name())) })
    }

    /// Load the guest a VMM launched with `spec` (its
    /// [`LaunchSpec::incoming`] set) waits for from `from` (what
    /// [`Vmm::save`] wrote, with the same devices) and let it run.
    fn restore<'a>(&'a self, spec: &'a LaunchSpec, from: StateFds) -> BoxFuture<'a, Result<()>> {
        let _ = (spec, from);
        Box::pin(async move { Err(no_snapshots(self.name())) })
    }

    /// Let a paused guest run again.
    fn resume<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        let _ = paths;
        Box::pin(async move { Err(no_snapshots(self.name())) })
    }

    /// Whether the VMM still waits for the state [`Vmm::restore`] gives
    /// it (a restore cut short leaves one that never runs a guest).
    fn awaits_state<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, bool> {
        let _ = paths;
        Box::pin(async { false })
    }

    /// Ask the VMM to exit at once (after a [`Vmm::save`]).
    fn quit<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        let _ = paths;
        Box::pin(async move { Err(no_snapshots(self.name())) })
    }

    /// The VMM's program.
    fn program(&self) -> &Path;

    /// Whether it boots an uncompressed ELF `vmlinux` (Firecracker) rather
    /// than a bzImage.
    fn wants_elf_kernel(&self) -> bool {
        false
    }

    /// Whether it runs as a VM's own user when [`LaunchSpec::confine`]
    /// names one (QEMU through `vmm-exec`, Firecracker through its
    /// jailer).
    fn confined(&self) -> bool {
        false
    }
}

/// The error of a VMM without memory snapshots.
fn no_snapshots(vmm: &str) -> banger_error::Error {
    banger_error::Error::unavailable(format!(
        "{vmm} cannot save or load a running guest in banger yet; set vm.vmm = \"qemu\" in bangerd.toml to suspend VMs"
    ))
}

/// Where VM directories live.
pub fn vms_dir(state: &Path) -> PathBuf {
    state.join("vms")
}

/// Files of one VM (under the state directory) and its sockets (under the
/// runtime directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM's state directory.
    pub dir: PathBuf,
    /// Copy-on-write system disk (reflink clone or sparse copy).
    pub system_disk: PathBuf,
    /// The change store of a device-mapper snapshot system disk.
    pub system_cow: PathBuf,
    /// The loop devices under a snapshot system disk while it is up.
    pub loops: PathBuf,
    /// Persistent work disk (/root).
    pub work_disk: PathBuf,
    /// Serial console output of the guest (appended across boots).
    pub console_log: PathBuf,
    /// The VMM's own standard output and error.
    pub vmm_log: PathBuf,
    /// The VM's runtime directory.
    pub run: PathBuf,
    /// The agent's socket (virtio-serial chardev or Firecracker vsock).
    pub agent_socket: PathBuf,
    /// The VMM's control socket (QMP or the Firecracker API).
    pub control_socket: PathBuf,
    /// A suspended guest's memory and device state ([`Vmm::save`]).
    pub suspend_state: PathBuf,
    /// A suspended guest's memory, when its VMM keeps it apart
    /// ([`Vmm::memory_apart`]).
    pub suspend_memory: PathBuf,
    /// What [`VmPaths::suspend_state`] was saved under: it loads only
    /// into the same VMM, accelerator, machine and kernel.
    pub suspend_key: PathBuf,
}

impl VmPaths {
    /// Paths of VM `id`.
    pub fn new(state: &Path, runtime: &Path, id: &str) -> Self {
        Self::in_dirs(vms_dir(state).join(id), runtime.join("vms").join(id))
    }

    /// The files of a VM (or a template) kept in `dir`, its sockets in
    /// `run`.
    pub fn in_dirs(dir: PathBuf, run: PathBuf) -> Self {
        Self {
            system_disk: dir.join("system.ext4"),
            system_cow: dir.join("system.cow"),
            loops: run.join("loops"),
            work_disk: dir.join("work.ext4"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            agent_socket: run.join("agent.sock"),
            control_socket: run.join("control.sock"),
            suspend_state: dir.join("suspend.state"),
            suspend_memory: dir.join("suspend.mem"),
            suspend_key: dir.join("suspend.key"),
            dir,
            run,
        }
    }
}

/// The VMM a VM was started with (recorded, so stop and stats reach the
/// same driver whatever the configuration says later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmDriver {
    /// QEMU (`microvm`).
    Qemu,
    /// Firecracker.
    Firecracker,
}

impl VmmDriver {
    /// Stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }

    /// The driver named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "qemu" => Some(Self::Qemu),
            "firecracker" => Some(Self::Firecracker),
            _ => None,
        }
    }
}
