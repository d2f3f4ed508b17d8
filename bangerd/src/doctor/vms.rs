//! What VMs get here: the VMM and accelerator (create's own decision),
//! the default image, system disks, and the caller's limits.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::config::{Config, VmmKind};

use super::{Check, Verdict};

/// First line of `bin --version`, with a timeout.
pub(super) fn program_version(bin: &Path) -> Option<String> {
    let mut child = Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let output = child.wait_with_output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

pub(super) fn check_vmm(config: &Config) -> Check {
    const NAME: &str = "vmm";
    // Whether a VM could start is the lifecycle's own decision, with its
    // own message: doctor and create cannot disagree.
    if let Err(e) = crate::vm::commands::check_vmm(config) {
        return Check::fail(
            NAME,
            e.message,
            "install qemu-system-x86 (or firecracker), or point vm.qemu_bin / vm.firecracker_bin at an executable",
        );
    }
    let firecracker = crate::program::find(&config.vm.firecracker_bin);
    let qemu = crate::program::find(&config.vm.qemu_bin);
    let describe = |bin: &Path| {
        let version = program_version(bin).unwrap_or_else(|| "version unknown".into());
        format!("{} ({version})", bin.display())
    };
    // Firecracker as the VM's own user in a chroot, or as a root without
    // capabilities behind its own seccomp filters.
    let jailed = |fc: &Path| match crate::vm::commands::jailer_of(config) {
        Some(jailer) => format!("{} under its jailer {}", describe(fc), jailer.display()),
        None => format!(
            "{} without a jailer (vm.jailer_bin {}: Firecracker runs as root without capabilities, behind its own seccomp filters)",
            describe(fc),
            if config.vm.jailer_bin.as_os_str().is_empty() {
                "is empty"
            } else {
                "was not found"
            }
        ),
    };
    match (config.vm.vmm, firecracker, qemu) {
        (VmmKind::Firecracker, Some(fc), _) => {
            Check::pass(NAME, format!("firecracker: {}", jailed(&fc)))
        }
        (VmmKind::Auto, Some(fc), qemu) => Check::pass(
            NAME,
            format!(
                "firecracker where KVM works (see accel): {}; else qemu microvm: {}",
                jailed(&fc),
                qemu.as_deref()
                    .map_or_else(|| "not installed".to_owned(), describe)
            ),
        ),
        (VmmKind::Firecracker, None, _) => Check::fail(
            NAME,
            format!(
                "vm.vmm is \"firecracker\" but {} was not found",
                config.vm.firecracker_bin.display()
            ),
            "install firecracker or set vm.firecracker_bin, or set vm.vmm = \"auto\"",
        ),
        (VmmKind::Auto, None, Some(q)) => Check::warn(
            NAME,
            format!(
                "firecracker not found; using qemu microvm: {}",
                describe(&q)
            ),
            "install firecracker for faster VMs where KVM works",
        ),
        (VmmKind::Qemu, _, Some(q)) => Check::pass(NAME, format!("qemu microvm: {}", describe(&q))),
        (_, _, None) => Check::fail(
            NAME,
            "neither firecracker nor qemu-system-x86_64 was found".to_owned(),
            "install firecracker, or qemu-system-x86 (apt install qemu-system-x86)",
        ),
    }
}

/// `host folders`: whether `--mount` works here: create's own check
/// (QEMU, virtiofsd), and whether a user may make a user namespace, in
/// which each virtiofsd runs as the VM's owner. Folders are optional, so
/// what is missing is a warning.
pub fn check_folders(config: &Config, userns: &Path, unprivileged: &Path) -> Check {
    const NAME: &str = "host folders";
    let virtiofsd = match crate::vm::commands::check_folders_possible(config) {
        Ok(virtiofsd) => virtiofsd,
        Err(e) => {
            return Check::warn(
                NAME,
                e.message,
                "only VMs with host folders (--mount) need this",
            );
        }
    };
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    // `user.max_user_namespaces` 0 forbids them; Debian's own switch
    // `kernel.unprivileged_userns_clone` (absent elsewhere) may too.
    if read(userns) == Some(0) || read(unprivileged) == Some(0) {
        return Check::warn(
            NAME,
            "user namespaces are turned off, and each folder's virtiofsd needs one to run as the VM's owner".to_owned(),
            "sysctl user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1",
        );
    }
    Check::pass(
        NAME,
        format!(
            "--mount works: {} runs as each VM's owner, in a user namespace",
            virtiofsd.display()
        ),
    )
}

/// `accel`: what VMs will run under, from the configuration and the KVM
/// probe's verdict on the default image's kernel (`None`: no such kernel).
pub fn check_accel(
    accel: crate::config::Accel,
    probe: Option<(&Path, &crate::vm::vmm::kvm::KvmVerdict)>,
    default_image: &str,
) -> Check {
    use crate::config::Accel;
    use crate::vm::vmm::kvm::KvmVerdict;
    const NAME: &str = "accel";
    let Some((kernel, verdict)) = probe else {
        return match accel {
            Accel::Tcg => Check::pass(NAME, "vm.accel = \"tcg\": VMs run under software emulation"),
            _ => Check::warn(
                NAME,
                format!(
                    "KVM not probed: the default image {default_image:?} or its kernel is not registered"
                ),
                "register or pull the default image (or set vm.default_image); the probe boots its kernel",
            ),
        };
    };
    match (accel, verdict) {
        (Accel::Tcg, _) => {
            Check::pass(NAME, "vm.accel = \"tcg\": VMs run under software emulation")
        }
        (_, KvmVerdict::Usable(t)) => Check::pass(
            NAME,
            format!(
                "{} booted under KVM in {} ms: VMs use KVM",
                kernel.display(),
                t.as_millis()
            ),
        ),
        (Accel::Auto, KvmVerdict::Unusable(why)) => Check::warn(
            NAME,
            format!("{why}: VMs run under software emulation (slow)"),
            "on a nested or PVM host KVM needs a guest kernel made for it; set vm.accel = \"tcg\" to skip the probe",
        ),
        (_, KvmVerdict::NotProbed(why)) => Check::warn(
            NAME,
            format!("KVM not probed: {why}"),
            "install qemu-system-x86: the probe boots the guest kernel under it",
        ),
        (Accel::Kvm, KvmVerdict::Unusable(why)) => Check::fail(
            NAME,
            format!("vm.accel = \"kvm\" but {why}"),
            "VMs would hang at boot: set vm.accel = \"auto\" or \"tcg\" in bangerd.toml",
        ),
    }
}

/// The `accel` check with create's own choice of VMM and accelerator
/// (`vm::commands::choose_vmm`) folded in: its refusal (e.g. Firecracker
/// with `vm.accel = "tcg"`) fails the check with create's message, its
/// pick is named. `None`: no choice to report (no probe to decide with).
pub fn with_choice(
    check: Check,
    choice: Option<crate::error::Result<(&str, crate::vm::vmm::Accel)>>,
) -> Check {
    match choice {
        None => check,
        Some(Err(e)) => Check::fail(
            check.name,
            e.message,
            "set vm.vmm and vm.accel in bangerd.toml to a pair this host can run",
        ),
        Some(Ok(_)) if check.verdict == Verdict::Fail => check,
        Some(Ok((vmm, accel))) => Check {
            detail: format!(
                "{}; new VMs boot with {vmm} under {}",
                check.detail,
                accel.as_str()
            ),
            ..check
        },
    }
}

/// `snapshots`: whether the VMM create picks can save and load running
/// guests (suspend, fork, templates), and whether templates are on.
/// `vmm`: what that VMM can do; `None` when there is none.
pub fn check_snapshots(vmm: Option<Snapshots<'_>>, templates: bool) -> Check {
    const NAME: &str = "snapshots";
    let Some(Snapshots {
        vmm,
        saves,
        portable,
    }) = vmm
    else {
        return Check::warn(
            NAME,
            "no VMM to save guests with".to_owned(),
            "see the vmm check",
        );
    };
    match (saves, portable) {
        (false, _) => Check::warn(
            NAME,
            format!(
                "{vmm} cannot save running guests in banger yet: vm suspend and vm fork refuse, and every create boots"
            ),
            "set vm.vmm = \"qemu\" in bangerd.toml for suspend, fork and templates",
        ),
        (true, false) => Check::warn(
            NAME,
            format!(
                "{vmm} saves and loads a VM's own guest (vm suspend), but without its jailer a saved guest names the disks of its VM: vm fork refuses, and every create boots"
            ),
            "install Firecracker's jailer (vm.jailer_bin in bangerd.toml) for fork and templates",
        ),
        (true, true) if templates => Check::pass(
            NAME,
            format!(
                "{vmm} saves and loads running guests: vm suspend, vm fork, and creates that restore a template of their image (vm.templates)"
            ),
        ),
        (true, true) => Check::pass(
            NAME,
            format!(
                "{vmm} saves and loads running guests: vm suspend and vm fork; templates are off (vm.templates = false), so every create boots"
            ),
        ),
    }
}

/// What the VMM create picks can do with running guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshots<'a> {
    /// Its name.
    pub vmm: &'a str,
    /// It saves and loads a VM's own guest ([`crate::vm::vmm::Vmm::snapshots`]).
    pub saves: bool,
    /// A saved guest loads into another VM
    /// ([`crate::vm::vmm::Vmm::portable_snapshots`]).
    pub portable: bool,
}

/// Where `vm create` gets the default image when it is not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageFallback {
    /// The image catalog has it: create pulls it.
    Catalog,
    /// A recipe for it is in this directory and builds can run here.
    Recipe(String),
    /// A recipe is there, but builds cannot run here: why.
    Unbuildable(String),
    /// Neither.
    Nothing,
}

/// `default-image`: whether `vm create` without `--image` has an image,
/// here or from where it would come.
pub fn check_default_image(
    name: &str,
    found: Option<(&str, &str)>,
    fallback: &ImageFallback,
) -> Check {
    const NAME: &str = "default-image";
    match (found, fallback) {
        (Some((id, kernel)), _) => Check::pass(
            NAME,
            format!("{name} (id {id}, kernel {kernel}) for `vm create` without --image"),
        ),
        (None, ImageFallback::Catalog) => Check::pass(
            NAME,
            format!(
                "{name} is not here yet: the first `vm create` pulls it from the image catalog"
            ),
        ),
        (None, ImageFallback::Recipe(dir)) => Check::pass(
            NAME,
            format!(
                "{name} is not here yet: the first `vm create` builds it from its recipe in {dir} (minutes the first time)"
            ),
        ),
        (None, ImageFallback::Unbuildable(why)) => Check::warn(
            NAME,
            format!("{name} is not here, no catalog has it, and its recipe cannot be built: {why}"),
            "install what it names, or set vm.default_image in bangerd.toml",
        ),
        (None, ImageFallback::Nothing) => Check::warn(
            NAME,
            format!(
                "vm.default_image is {name:?}, and there is no such image, catalog entry or recipe"
            ),
            "register one (scripts/build-tiny-image or build-debian-image), or set vm.default_image in bangerd.toml",
        ),
    }
}

/// How system disks are made here, as two checks ("device-mapper" and
/// "reflink") over the lifecycle's own decision: `dm_available` is the
/// `DeviceMapper::available` create asks, and the reflink probe is
/// `vm::disk`'s, so doctor says what create will do.
pub fn check_disks(dm_available: bool, control: &Path, state_dir: &Path) -> [Check; 2] {
    use crate::vm::disk::{self, DiskMethod};
    let dm = if dm_available {
        Check::pass(
            "device-mapper",
            format!(
                "{} works: system disks are dm snapshots over loop devices (instant, the image shared)",
                control.display()
            ),
        )
    } else {
        Check::pass(
            "device-mapper",
            format!(
                "{} does not work here; not needed: system disks are reflink clones or sparse copies (see reflink)",
                control.display()
            ),
        )
    };
    const NAME: &str = "reflink";
    let reflink = match disk::reflink_works(state_dir) {
        Err(e) => Check::fail(
            NAME,
            format!("cannot write a probe file in {}: {e}", state_dir.display()),
            "check the state directory",
        ),
        Ok(_) if disk::planned_method(dm_available, state_dir) == DiskMethod::DeviceMapper => {
            Check::pass(
                NAME,
                "not needed: system disks are dm snapshots (see device-mapper)",
            )
        }
        Ok(true) => Check::pass(
            NAME,
            format!(
                "{} supports reflink (FICLONE): system disks are instant clones",
                state_dir.display()
            ),
        ),
        Ok(false) => Check::warn(
            NAME,
            format!(
                "{} has no reflink: system disks are sparse copies (time grows with the image's data)",
                state_dir.display()
            ),
            "put the state directory on btrfs or xfs for instant copy-on-write clones",
        ),
    };
    [dm, reflink]
}

/// The caller's usage against the per-user `[limits]`: `None` when the
/// caller is exempt (root, or `vm.manage-others` with
/// `limits.exempt_admins`). Warns at a cap, since the next create or start
/// of that kind will be refused.
pub fn check_limits(
    limits: &crate::config::LimitsConfig,
    usage: Option<&crate::vm::quota::Usage>,
) -> Check {
    let Some(u) = usage else {
        return Check::pass("limits", "you are exempt from the per-user limits");
    };
    const GIB: f64 = (1u64 << 30) as f64;
    let detail = format!(
        "you have {} of {} VMs, {} of {} running, {} of {} vCPUs and {} of {} MiB running, {:.1} of {} GiB of disk",
        u.vms,
        limits.max_vms,
        u.running,
        limits.max_running_vms,
        u.vcpus,
        limits.max_vcpus,
        u.memory_mib,
        limits.max_memory_mib,
        u.disk_bytes as f64 / GIB,
        limits.max_disk_gib
    );
    // A cap of 0 is none.
    let at = |value: u64, cap: u64| cap != 0 && value >= cap;
    let full: Vec<&str> = [
        (at(u.vms.into(), limits.max_vms.into()), "limits.max_vms"),
        (
            at(u.running.into(), limits.max_running_vms.into()),
            "limits.max_running_vms",
        ),
        (
            at(u.vcpus.into(), limits.max_vcpus.into()),
            "limits.max_vcpus",
        ),
        (
            at(u.memory_mib, limits.max_memory_mib),
            "limits.max_memory_mib",
        ),
        (
            at(u.disk_bytes, limits.max_disk_gib.saturating_mul(1 << 30)),
            "limits.max_disk_gib",
        ),
    ]
    .into_iter()
    .filter_map(|(at, name)| at.then_some(name))
    .collect();
    if full.is_empty() {
        Check::pass("limits", detail)
    } else {
        Check::warn(
            "limits",
            format!("{detail}; at {}", full.join(", ")),
            "stop or delete VMs (or images) you no longer need, or ask an admin to raise [limits] in bangerd.toml",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;
    use crate::doctor::host::{check_char_device, check_kvm};

    #[test]
    fn missing_devices_fail_with_a_hint() {
        let check = check_char_device(
            "tun",
            Path::new("/nonexistent/tun"),
            "TAP devices",
            "modprobe tun",
        );
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.hint.contains("modprobe tun"));
        // Without device-mapper, disks are clones or copies; said so.
        let dir = tempfile::tempdir().expect("tempdir");
        let [dm, reflink] = check_disks(false, Path::new("/nonexistent/control"), dir.path());
        assert_eq!(dm.verdict, Verdict::Pass);
        assert!(dm.detail.contains("not needed"), "{dm:?}");
        let planned = crate::vm::disk::planned_method(false, dir.path());
        assert_eq!(
            reflink.verdict == Verdict::Pass,
            planned == crate::vm::disk::DiskMethod::Reflink,
            "{reflink:?} vs {planned:?}"
        );
        let [dm, reflink] = check_disks(true, Path::new("/dev/mapper/control"), dir.path());
        assert!(dm.detail.contains("dm snapshots"), "{dm:?}");
        assert!(reflink.detail.contains("not needed"), "{reflink:?}");
        let kvm = check_kvm(Path::new("/nonexistent/kvm"));
        assert_eq!(kvm.verdict, Verdict::Warn);
    }

    #[test]
    fn the_accelerator_follows_the_probe_and_the_configuration() {
        use crate::config::Accel;
        use crate::vm::vmm::kvm::KvmVerdict;
        let k = Path::new("/k/vmlinuz");
        let ok = KvmVerdict::Usable(std::time::Duration::from_millis(420));
        let stalled = KvmVerdict::Unusable("a guest kernel did not get through early boot".into());
        let c = check_accel(Accel::Auto, Some((k, &ok)), "tiny");
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(
            c.detail.contains("420 ms") && c.detail.contains("use KVM"),
            "{c:?}"
        );
        let c = check_accel(Accel::Auto, Some((k, &stalled)), "tiny");
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("early boot") && c.detail.contains("software emulation"));
        let c = check_accel(Accel::Kvm, Some((k, &stalled)), "tiny");
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.hint.contains("vm.accel"), "{c:?}");
        assert_eq!(check_accel(Accel::Tcg, None, "tiny").verdict, Verdict::Pass);
        let c = check_accel(Accel::Auto, None, "tiny");
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("\"tiny\""), "{c:?}");
    }

    #[test]
    fn the_default_image_is_named_or_missed() {
        let c = check_default_image(
            "tiny",
            Some(("abc123", "test-kernel")),
            &ImageFallback::Nothing,
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("test-kernel"));
        let c = check_default_image("debian-bookworm", None, &ImageFallback::Nothing);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.hint.contains("vm.default_image"));
        let c = check_default_image("debian-bookworm", None, &ImageFallback::Catalog);
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("pulls it"), "{c:?}");
        let c = check_default_image(
            "debian-bookworm",
            None,
            &ImageFallback::Recipe("/usr/share/banger/images".into()),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("builds it from its recipe"), "{c:?}");
        let c = check_default_image(
            "debian-bookworm",
            None,
            &ImageFallback::Unbuildable("apt install debootstrap".into()),
        );
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("apt install debootstrap"), "{c:?}");
    }

    #[test]
    fn host_folders_need_virtiofsd_and_user_namespaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (userns, unpriv) = (dir.path().join("max"), dir.path().join("unpriv"));
        let mut config = Config::default();
        config.vm.vmm = VmmKind::Qemu;
        // A stand-in virtiofsd: any executable.
        config.vm.virtiofsd_bin = "/bin/true".into();
        std::fs::write(&userns, "15000\n").expect("write");
        assert_eq!(
            check_folders(&config, &userns, &unpriv).verdict,
            Verdict::Pass
        );
        std::fs::write(&unpriv, "0\n").expect("write");
        let c = check_folders(&config, &userns, &unpriv);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("user namespaces"), "{}", c.detail);
        config.vm.virtiofsd_bin = "/nonexistent/virtiofsd".into();
        let c = check_folders(&config, &userns, &unpriv);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("virtiofsd"), "{}", c.detail);
    }

    #[test]
    fn missing_vmm_fails_and_named_one_is_found() {
        let mut config = Config::default();
        config.vm.firecracker_bin = "/nonexistent/firecracker".into();
        config.vm.qemu_bin = "/nonexistent/qemu".into();
        assert_eq!(check_vmm(&config).verdict, Verdict::Fail);
        config.vm.vmm = VmmKind::Firecracker;
        assert!(check_vmm(&config).detail.contains("was not found"));
        // `sh` exists everywhere; stand it in for qemu to exercise the found path.
        config.vm.vmm = VmmKind::Qemu;
        config.vm.qemu_bin = "sh".into();
        assert_eq!(check_vmm(&config).verdict, Verdict::Pass);
    }

    #[test]
    fn reflink_probe_runs_on_a_real_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [_, check] = check_disks(false, Path::new("/dev/mapper/control"), dir.path());
        assert_ne!(check.verdict, Verdict::Fail, "{check:?}");
        let [_, missing] = check_disks(
            false,
            Path::new("/dev/mapper/control"),
            Path::new("/nonexistent/dir"),
        );
        assert_eq!(missing.verdict, Verdict::Fail);
    }

    #[test]
    fn limits_pass_below_the_caps_and_warn_at_one() {
        use crate::vm::quota::Usage;
        let limits = crate::config::LimitsConfig::default();
        assert_eq!(check_limits(&limits, None).verdict, Verdict::Pass);
        let some = Usage {
            vms: 3,
            running: 1,
            vcpus: 2,
            memory_mib: 1024,
            disk_bytes: 24 << 30,
        };
        let c = check_limits(&limits, Some(&some));
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        assert!(c.detail.contains("3 of 50 VMs") && c.detail.contains("24.0 of 500 GiB"));
        let full = Usage {
            running: limits.max_running_vms,
            ..some
        };
        let c = check_limits(&limits, Some(&full));
        assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
        assert!(c.detail.ends_with("at limits.max_running_vms"), "{c:?}");
    }

    /// doctor and create share one decision: a `qemu_bin` that is no
    /// executable fails doctor's check with the very message create
    /// refuses with (create once took it and failed at spawn).
    #[test]
    fn doctor_and_create_agree_on_the_vmm() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = dir.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut config = Config::default();
        config.vm.firecracker_bin = dir.path().join("firecracker");
        config.vm.qemu_bin = qemu.clone();
        for vmm in [VmmKind::Auto, VmmKind::Qemu, VmmKind::Firecracker] {
            config.vm.vmm = vmm;
            let refused = crate::vm::commands::check_vmm(&config).expect_err("refused");
            let check = check_vmm(&config);
            assert_eq!(check.verdict, Verdict::Fail, "{vmm:?}");
            assert_eq!(check.detail, refused.message, "{vmm:?}");
        }
        config.vm.vmm = VmmKind::Qemu;
        assert!(
            check_vmm(&config)
                .detail
                .contains("is not an executable file"),
            "{:?}",
            check_vmm(&config)
        );
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        crate::vm::commands::check_vmm(&config).expect("executable now");
        assert_ne!(check_vmm(&config).verdict, Verdict::Fail);
    }

    /// doctor reports create's own VMM choice: a pair create refuses
    /// (Firecracker under `tcg`) fails the check with create's words, and
    /// what create picks is named.

    #[test]
    fn snapshots_follow_the_vmm_and_the_templates_switch() {
        assert_eq!(check_snapshots(None, true).verdict, Verdict::Warn);
        let of = |vmm, saves, portable| {
            Some(Snapshots {
                vmm,
                saves,
                portable,
            })
        };
        let none = check_snapshots(of("old", false, false), true);
        assert_eq!(none.verdict, Verdict::Warn);
        assert!(
            none.detail.contains("every create boots"),
            "{}",
            none.detail
        );
        let fc = check_snapshots(of("firecracker", true, false), true);
        assert_eq!(fc.verdict, Verdict::Warn);
        assert!(fc.detail.contains("vm suspend"), "{}", fc.detail);
        assert!(fc.hint.contains("jailer"), "{}", fc.hint);
        let jailed = check_snapshots(of("firecracker", true, true), true);
        assert_eq!(jailed.verdict, Verdict::Pass);
        assert!(jailed.detail.contains("template"), "{}", jailed.detail);
        let on = check_snapshots(of("qemu", true, true), true);
        assert_eq!(on.verdict, Verdict::Pass);
        assert!(on.detail.contains("template"), "{}", on.detail);
        let off = check_snapshots(of("qemu", true, true), false);
        assert!(off.detail.contains("templates are off"), "{}", off.detail);
    }

    #[test]
    fn the_accel_check_carries_creates_choice() {
        use crate::config::Accel;
        use crate::vm::commands::choose_vmm;
        use crate::vm::vmm::kvm::KvmVerdict;
        let mut config = Config::default();
        config.vm.vmm = VmmKind::Firecracker;
        config.vm.accel = Accel::Tcg;
        let refused = choose_vmm(&config, || KvmVerdict::NotProbed(String::new()))
            .map(|(v, a)| (v.name(), a))
            .expect_err("firecracker under tcg");
        let plain = check_accel(Accel::Tcg, None, "tiny");
        assert_eq!(plain.verdict, Verdict::Pass, "alone it saw no problem");
        let c = with_choice(plain.clone(), Some(Err(refused.clone())));
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(c.detail, refused.message);
        let c = with_choice(
            plain.clone(),
            Some(Ok(("qemu", crate::vm::vmm::Accel::Tcg))),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(
            c.detail.ends_with("new VMs boot with qemu under tcg"),
            "{c:?}"
        );
        assert_eq!(with_choice(plain.clone(), None), plain);
    }
}
