//! Virtual machine monitors behind one trait: [`firecracker::Firecracker`]
//! (one process and API socket per VM) and [`qemu::Qemu`] (QEMU's
//! `microvm` machine, with KVM or TCG). [`kvm::probe`] decides whether KVM
//! really runs guests here.

pub mod firecracker;
pub mod kvm;
pub mod qemu;

use std::path::PathBuf;

use super::VmPaths;
use super::process::{ProcessId, Watched};
use super::supervise::Supervisor;
use crate::auth::BoxFuture;
use crate::error::Result;
use crate::vm::agent::AgentEndpoint;

/// Start `program args` for `spec` through `supervisor`, after removing
/// the sockets an earlier run may have left.
pub(crate) async fn start_process(
    spec: &LaunchSpec,
    supervisor: &dyn Supervisor,
    program: &std::path::Path,
    args: &[String],
) -> Result<(Watched, ProcessId)> {
    let p = &spec.paths;
    let _ = std::fs::remove_file(&p.agent_socket);
    let _ = std::fs::remove_file(&p.control_socket);
    supervisor
        .start(super::supervise::StartRequest {
            vm_id: &spec.id,
            vm_name: &spec.name,
            program,
            args,
            log: &p.vmm_log,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
        })
        .await
}

/// The error for a VMM that exited before it was ready: its last log lines.
pub(crate) fn exited_at_start(vmm: &str, log: &std::path::Path) -> crate::error::Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    crate::error::Error::failed(format!(
        "{vmm} exited at start: {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Kill a VMM that failed at start and reap it if it is bangerd's child.
pub(crate) fn kill_failed(watched: &mut Watched, id: ProcessId) {
    let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
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
    /// The TAP to attach, with the guest MAC.
    pub net: Option<(String, String)>,
    /// KVM or software emulation.
    pub accel: Accel,
}

/// A VMM driver.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Which driver this is (stored with the VM).
    fn driver(&self) -> super::VmmDriver;

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

    /// Whether it boots an uncompressed ELF `vmlinux` (Firecracker) rather
    /// than a bzImage.
    fn wants_elf_kernel(&self) -> bool {
        false
    }
}
