//! Which VMM and accelerator boot a VM: one decision, used by create
//! and by `doctor`, with the KVM probe's verdict cached per kernel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Vms;
use crate::artifacts::Kernel;
use crate::config::{self, Config, VmmKind};
use crate::error::{Error, Result};
use crate::program;
use crate::vm::vmm::Accel;
use crate::vm::vmm::Vmm;
use crate::vm::vmm::firecracker::Firecracker;
use crate::vm::vmm::kvm::{self, KvmVerdict};
use crate::vm::vmm::qemu::Qemu;

/// How long a guest kernel gets to pass early boot under KVM in the probe
/// (it takes well under a second where KVM works).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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
pub fn vmm_named(config: &Config, driver: Option<crate::vm::VmmDriver>) -> Result<Arc<dyn Vmm>> {
    match driver {
        Some(crate::vm::VmmDriver::Firecracker) => Ok(Arc::new(Firecracker {
            binary: program::find(&config.vm.firecracker_bin)
                .unwrap_or_else(|| config.vm.firecracker_bin.clone()),
        })),
        Some(crate::vm::VmmDriver::Qemu) | None => Ok(Arc::new(Qemu {
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

impl Vms {
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
            .runtime
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
                &self.host.kvm,
                &self.dirs.runtime,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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
}
