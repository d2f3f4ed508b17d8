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
    let jailer = jailer_of(config);
    if jailer.is_some() {
        crate::vm::vmm::jailer::check_exec_name(&binary).map_err(|e| {
            Error::unavailable(format!(
                "{e}: link it under such a name, or set vm.jailer_bin = \"\" to run it without the jailer"
            ))
        })?;
    }
    Ok(Arc::new(Firecracker { binary, jailer }))
}

/// The file `vmm` boots from `kernel`: Firecracker takes the ELF
/// `vmlinux`, QEMU the compressed image it was registered with.
pub fn kernel_file(vmm: &dyn Vmm, kernel: &Kernel) -> PathBuf {
    if vmm.wants_elf_kernel() {
        kernel.vmlinux.clone()
    } else {
        kernel.boot_file().to_owned()
    }
}

/// Firecracker's jailer, when `vm.jailer_bin` names one that is there
/// (empty: never).
pub fn jailer_of(config: &Config) -> Option<PathBuf> {
    if config.vm.jailer_bin.as_os_str().is_empty() {
        return None;
    }
    program::find(&config.vm.jailer_bin)
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
            jailer: jailer_of(config),
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
        let file = kernel_file(vmm.as_ref(), kernel);
        Ok((vmm, accel, file))
    }

    /// Whether `kernel` boots under KVM here ([`kvm::probe`]): remembered
    /// while the daemon runs, and across restarts in
    /// `$CACHE_DIRECTORY/kvm-probe.json` for as long as the host kernel,
    /// its KVM modules, QEMU and the guest kernel stay the same
    /// ([`probe_key`]); probed only when none of that knows.
    pub async fn kvm_verdict(&self, kernel: &Path) -> KvmVerdict {
        let cell = self
            .runtime
            .kvm_verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kernel.to_owned())
            .or_default()
            .clone();
        let verdict = cell
            .get_or_init(|| async {
                let config = self.config();
                let Some(qemu) = program::find(&config.vm.qemu_bin) else {
                    return KvmVerdict::NotProbed(format!(
                        "{} is not installed, so KVM was not probed",
                        config.vm.qemu_bin.display()
                    ));
                };
                // A device that cannot be opened is not remembered: that
                // changes with a module load or a permission.
                let memory = self.dirs.cache.join(PROBE_MEMORY);
                let key = {
                    let (qemu, kernel, kvm) =
                        (qemu.clone(), kernel.to_owned(), self.host.kvm.clone());
                    crate::blocking::value(move || {
                        std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&kvm)
                            .ok()
                            .and_then(|_| probe_key(&qemu, &kernel))
                    })
                    .await
                    .ok()
                    .flatten()
                };
                if let Some(key) = &key {
                    let (memory, key) = (memory.clone(), key.clone());
                    let kept = crate::blocking::value(move || recall(&memory, &key))
                        .await
                        .ok()
                        .flatten();
                    if let Some(verdict) = kept {
                        tracing::info!(
                            "KVM probe: {} was probed before on this host, kernel and QEMU: {}",
                            kernel.display(),
                            if verdict.usable() {
                                "VMs use KVM"
                            } else {
                                "VMs use software emulation"
                            }
                        );
                        return verdict;
                    }
                }
                // The probe's QEMU runs jailed like a VM's, as the VMMs'
                // first uid: it boots a kernel a user may have supplied.
                let shared = {
                    let (state, kernel) = (self.dirs.state.clone(), kernel.to_owned());
                    crate::blocking::value(move || super::boot::share_with_vmms(&state, &kernel))
                        .await
                };
                if let Ok(Err(e)) = shared {
                    tracing::warn!("cannot let the KVM probe read {}: {e}", kernel.display());
                }
                let verdict = kvm::probe(
                    &qemu,
                    kernel,
                    &self.host.kvm,
                    &self.dirs.runtime,
                    KVM_PROBE_TIMEOUT,
                    kvm::ProbeAs::Jailed(&self.helper),
                )
                .await;
                if let Some(key) = key
                    && !matches!(verdict, KvmVerdict::NotProbed(_))
                {
                    let kept = verdict.clone();
                    let done = crate::blocking::value(move || remember(&memory, &key, &kept)).await;
                    if let Ok(Err(e)) = done {
                        tracing::warn!("cannot remember the KVM probe's verdict: {e}");
                    }
                }
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
            .clone();
        // VMMs run as users of their own: a /dev/kvm only root may open
        // is of no use to them, whatever the probe found. Looked at every
        // time: a udev rule or chgrp changes it.
        match crate::vm::vmm::jail::kvm_access(&self.host.kvm) {
            Err(why) if verdict.usable() => KvmVerdict::Unusable(why),
            _ => verdict,
        }
    }
}

/// The file under `$CACHE_DIRECTORY` that keeps earlier probes' verdicts.
const PROBE_MEMORY: &str = "kvm-probe.json";

/// A remembered verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Kept {
    usable: bool,
    /// How long the kernel took to pass early boot (when usable).
    millis: u64,
    /// Why not (when not).
    why: String,
}

/// What a probe's verdict depends on, hashed: the host kernel (release
/// and build), its KVM modules (each `/sys/module/kvm*` with its
/// `srcversion`, or built in), and the QEMU binary and guest kernel file
/// (path, size and modification time). `None` when one cannot be read.
fn probe_key(qemu: &Path, kernel: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in ["/proc/sys/kernel/osrelease", "/proc/sys/kernel/version"] {
        h.update(std::fs::read(f).ok()?);
    }
    let mut modules: Vec<String> = std::fs::read_dir("/sys/module")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kvm"))
        .map(|n| {
            let version = std::fs::read_to_string(format!("/sys/module/{n}/srcversion"))
                .unwrap_or_else(|_| "built-in".to_owned());
            format!("{n}={}", version.trim())
        })
        .collect();
    modules.sort();
    h.update(modules.join(" "));
    for file in [qemu, kernel] {
        let m = std::fs::metadata(file).ok()?;
        let mtime = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        h.update(format!(
            "\n{} {} {}",
            file.display(),
            m.len(),
            mtime.as_nanos()
        ));
    }
    Some(crate::artifacts::hex(&h.finalize()))
}

/// The verdict kept under `key` in `memory`, if any.
fn recall(memory: &Path, key: &str) -> Option<KvmVerdict> {
    let text = std::fs::read_to_string(memory).ok()?;
    let kept: std::collections::BTreeMap<String, Kept> = serde_json::from_str(&text).ok()?;
    let k = kept.get(key)?;
    Some(if k.usable {
        KvmVerdict::Usable(Duration::from_millis(k.millis))
    } else {
        KvmVerdict::Unusable(k.why.clone())
    })
}

/// Keep `verdict` under `key` in `memory` (written beside it and renamed
/// into place; other keys kept, so a host with two kernels probes each
/// once).
fn remember(memory: &Path, key: &str, verdict: &KvmVerdict) -> std::io::Result<()> {
    let mut kept: std::collections::BTreeMap<String, Kept> = std::fs::read_to_string(memory)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let entry = match verdict {
        KvmVerdict::Usable(t) => Kept {
            usable: true,
            millis: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
            why: String::new(),
        },
        KvmVerdict::Unusable(why) => Kept {
            usable: false,
            millis: 0,
            why: why.clone(),
        },
        KvmVerdict::NotProbed(_) => return Ok(()),
    };
    kept.insert(key.to_owned(), entry);
    if let Some(dir) = memory.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let part = memory.with_extension("json.part");
    std::fs::write(
        &part,
        serde_json::to_vec_pretty(&kept).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&part, memory)
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

    #[test]
    fn probe_verdicts_are_remembered_by_what_decides_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qemu, kernel) = (dir.path().join("qemu"), dir.path().join("vmlinuz"));
        std::fs::write(&qemu, "qemu").expect("qemu");
        std::fs::write(&kernel, "kernel").expect("kernel");
        let key = probe_key(&qemu, &kernel).expect("a key on this host");
        assert_eq!(probe_key(&qemu, &kernel).as_deref(), Some(key.as_str()));
        let memory = dir.path().join("cache/kvm-probe.json");
        assert_eq!(recall(&memory, &key), None);
        remember(&memory, &key, &KvmVerdict::Unusable("it hung".into())).expect("kept");
        remember(
            &memory,
            "other",
            &KvmVerdict::Usable(Duration::from_millis(420)),
        )
        .expect("kept");
        remember(&memory, "none", &KvmVerdict::NotProbed("no qemu".into())).expect("kept");
        assert_eq!(
            recall(&memory, &key),
            Some(KvmVerdict::Unusable("it hung".into()))
        );
        assert_eq!(
            recall(&memory, "other"),
            Some(KvmVerdict::Usable(Duration::from_millis(420)))
        );
        assert_eq!(recall(&memory, "none"), None, "no probe, nothing kept");
        // Another guest kernel (or a new QEMU) is probed anew.
        std::fs::write(&kernel, "another kernel").expect("kernel");
        assert_ne!(probe_key(&qemu, &kernel).as_deref(), Some(key.as_str()));
        assert_eq!(probe_key(&qemu, &dir.path().join("gone")), None);
        // A damaged file is no memory, and is replaced.
        std::fs::write(&memory, "{not json").expect("damage");
        assert_eq!(recall(&memory, "other"), None);
        remember(
            &memory,
            "other",
            &KvmVerdict::Usable(Duration::from_millis(1)),
        )
        .expect("kept");
        assert!(recall(&memory, "other").is_some());
    }
}
