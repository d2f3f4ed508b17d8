//! Checks of the host itself: devices, the store, disk space, the guest
//! agent binary, and the system services banger leans on.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::store::Store;

use super::{Check, NameState};

pub(super) fn check_store(store: &Store) -> Check {
    match (store.schema_version(), store.quick_check()) {
        (Ok(v), Ok(None)) => Check::pass("store", format!("schema version {v}, integrity ok")),
        (_, Ok(Some(problem))) => Check::fail(
            "store",
            format!("integrity check found: {problem}"),
            "stop bangerd and restore the store from a backup",
        ),
        (Err(e), _) | (_, Err(e)) => {
            Check::fail("store", e.to_string(), "check the state directory")
        }
    }
}

pub(super) fn check_disk_space(dir: &Path, min_free_gib: u64) -> Check {
    const GIB: u64 = 1 << 30;
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            let detail = format!(
                "{:.1} GiB free in {}",
                free as f64 / GIB as f64,
                dir.display()
            );
            if free < GIB {
                Check::fail(
                    "disk-space",
                    detail,
                    "free space on the state filesystem; VM disks need room",
                )
            } else if free < min_free_gib * GIB {
                Check::warn(
                    "disk-space",
                    detail,
                    format!("less than {min_free_gib} GiB free; creating VMs may run out of space"),
                )
            } else {
                Check::pass("disk-space", detail)
            }
        }
        Err(e) => Check::fail(
            "disk-space",
            format!("statvfs {}: {e}", dir.display()),
            "check the state directory",
        ),
    }
}

mod ioctls {
    // KVM_GET_API_VERSION and KVM_CREATE_VM from <linux/kvm.h>.
    nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));
}

pub(super) fn check_kvm(path: &Path) -> Check {
    const NAME: &str = "kvm";
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("cannot open {}: {e}", path.display()),
                "VMs will run under QEMU's software emulation (slow); enable virtualization or load kvm_intel/kvm_amd",
            );
        }
    };
    // SAFETY: the fd is an open /dev/kvm; KVM_GET_API_VERSION takes no argument.
    let version = unsafe { ioctls::kvm_get_api_version(file.as_raw_fd()) };
    match version {
        Ok(12) => {}
        other => {
            return Check::warn(
                NAME,
                format!(
                    "{} answers KVM_GET_API_VERSION with {other:?}, expected 12",
                    path.display()
                ),
                "VMs will run under software emulation",
            );
        }
    }
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default) and
    // returns a new fd that we own and close below.
    let vm = unsafe { ioctls::kvm_create_vm(file.as_raw_fd(), 0) };
    match vm {
        Ok(fd) => {
            // SAFETY: `fd` was just returned by KVM_CREATE_VM and nobody else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Check::pass(
                NAME,
                "/dev/kvm opens and creates VMs (whether a guest boots under it: see accel)",
            )
        }
        Err(e) => Check::warn(
            NAME,
            format!("KVM_CREATE_VM failed: {e}"),
            "KVM is not usable here; VMs will run under software emulation",
        ),
    }
}

pub(super) fn check_char_device(name: &'static str, path: &Path, what: &str, fix: &str) -> Check {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Check::pass(
            name,
            format!("{} opens read-write ({what})", path.display()),
        ),
        Err(e) => Check::fail(
            name,
            format!("cannot open {}: {e}", path.display()),
            format!("banger needs {what}; as root: {fix}"),
        ),
    }
}

/// The static agent registry images get (`image pull REGISTRY/REPO`).
/// `kernel-build`: whether `banger kernel build` can make a kernel from
/// the host's Debian archive (the build's own precondition).
pub(super) fn check_kernel_build(images: &crate::config::ImagesConfig) -> Check {
    const NAME: &str = "kernel-build";
    if crate::artifacts::build::enabled(images).is_err() {
        return Check::pass(
            NAME,
            "local kernel and image builds are off (images.build_from = \"none\")",
        );
    }
    match crate::artifacts::build::readiness() {
        Ok(()) => Check::pass(
            NAME,
            "banger kernel build can make a kernel from the host's Debian archive",
        ),
        Err(e) => Check::warn(
            NAME,
            e.message,
            "needed only where no catalog serves a kernel: install what it names",
        ),
    }
}

/// `image-build`: how `banger image build` makes a base system here:
/// unprivileged (mmdebstrap in a user namespace, as banger-build) or as
/// root (debootstrap), and what the first lacks.
pub(super) fn check_image_build(images: &crate::config::ImagesConfig) -> Check {
    use crate::artifacts::build::image::{BUILD_USER, Bootstrap, bootstrapper};
    const NAME: &str = "image-build";
    if crate::artifacts::build::enabled(images).is_err() {
        return Check::pass(
            NAME,
            "local kernel and image builds are off (images.build_from = \"none\")",
        );
    }
    match bootstrapper() {
        Ok(Bootstrap::Unshare { .. }) => Check::pass(
            NAME,
            format!(
                "image builds make their base system without privilege \
                 (mmdebstrap --mode=unshare as {BUILD_USER})"
            ),
        ),
        Ok(Bootstrap::Root { why, .. }) => Check::warn(
            NAME,
            format!("image builds run debootstrap as root (in a confined unit of its own): {why}"),
            "for unprivileged builds do what it says; builds work either way",
        ),
        Err(e) => Check::warn(
            NAME,
            e.message,
            "needed only where no catalog serves the default image: install what it names",
        ),
    }
}

/// Whether e2fsprogs run where bangerd runs them on users' and guests'
/// file systems (`os::sandbox`): one `e2fsck -V` through `tools`.
pub(super) fn check_tools_sandbox(tools: &dyn banger_formats::tool::Tools) -> Check {
    const NAME: &str = "tools-sandbox";
    match tools.check(&banger_formats::tool::Tool::new("e2fsck").arg("-V")) {
        Ok(_) => Check::pass(
            NAME,
            "e2fsprogs run without privilege on users' and guests' file systems",
        ),
        Err(e) => Check::fail(
            NAME,
            e.message,
            "VM work disks and images need it: install e2fsprogs, and allow user namespaces (sysctl user.max_user_namespaces above 0)",
        ),
    }
}

pub(super) fn check_guest_agent(path: &Path) -> Check {
    const NAME: &str = "guest-agent";
    match crate::artifacts::oci::boot::check_agent(path) {
        Ok(()) => Check::pass(
            NAME,
            format!(
                "{} is a static x86-64 executable; images pulled from registries get it",
                path.display()
            ),
        ),
        Err(e) => Check::warn(
            NAME,
            e.message,
            "pulls from OCI registries are refused until vm.agent_bin names a static banger-agent; catalog images and imported ones are unaffected",
        ),
    }
}

pub(super) fn check_polkit(state: NameState) -> Check {
    const NAME: &str = "polkit";
    match state {
        NameState::Owned => Check::pass(NAME, "polkit authority is running on the system bus"),
        NameState::Activatable => {
            Check::pass(NAME, "polkit authority is activatable on the system bus")
        }
        NameState::Absent => Check::fail(
            NAME,
            "polkit is not on the system bus: only root can create or change anything",
            "install and start polkitd (apt install polkitd)",
        ),
        NameState::Unknown => Check::warn(
            NAME,
            "could not ask the bus about polkit",
            "check the system bus",
        ),
    }
}

pub(super) fn check_journald(socket: &Path) -> Check {
    if socket.exists() {
        Check::pass(
            "journald",
            format!("logging to the journal ({})", socket.display()),
        )
    } else {
        Check::warn(
            "journald",
            "no journal socket: bangerd logs to stderr",
            "run bangerd under systemd to get structured logs in the journal",
        )
    }
}

pub(super) fn check_systemd(runtime: &Path) -> Check {
    if runtime.is_dir() {
        Check::pass("systemd", "systemd is PID 1")
    } else {
        Check::warn(
            "systemd",
            "PID 1 is not systemd: VMs will be supervised by bangerd directly",
            "on a systemd host VMs run in their own units and outlive daemon restarts",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{NameState, Verdict};

    #[test]
    fn kernel_builds_pass_where_they_can_run() {
        // scripts/install-deps installs kmod and busybox-static.
        let mut images = crate::config::ImagesConfig::default();
        let check = check_kernel_build(&images);
        assert_eq!(check.verdict, super::super::Verdict::Pass, "{check:?}");
        assert!(check.detail.contains("can make a kernel"), "{check:?}");
        images.build_from = crate::config::BuildFrom::None;
        let check = check_kernel_build(&images);
        assert!(check.detail.contains("are off"), "{check:?}");
    }

    #[test]
    fn image_builds_are_unprivileged_where_the_host_allows() {
        // scripts/install-deps installs mmdebstrap and uidmap and makes
        // the banger-build account, as the package does.
        let mut images = crate::config::ImagesConfig::default();
        let check = check_image_build(&images);
        assert_eq!(check.verdict, super::super::Verdict::Pass, "{check:?}");
        assert!(
            check
                .detail
                .contains("mmdebstrap --mode=unshare as banger-build"),
            "{check:?}"
        );
        images.build_from = crate::config::BuildFrom::None;
        let check = check_image_build(&images);
        assert!(check.detail.contains("are off"), "{check:?}");
    }

    #[test]
    fn a_regular_file_is_not_kvm() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let check = check_kvm(file.path());
        assert_eq!(check.verdict, Verdict::Warn);
        assert!(
            check.detail.contains("KVM_GET_API_VERSION"),
            "{}",
            check.detail
        );
    }

    #[test]
    fn a_missing_or_dynamic_guest_agent_is_a_warning() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = check_guest_agent(&dir.path().join("banger-agent"));
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("cannot be opened"), "{}", c.detail);
        assert!(c.hint.contains("vm.agent_bin"), "{}", c.hint);
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        assert_eq!(check_guest_agent(&script).verdict, Verdict::Warn);
    }

    #[test]
    fn absent_polkit_is_a_failure() {
        assert_eq!(check_polkit(NameState::Absent).verdict, Verdict::Fail);
        assert_eq!(check_polkit(NameState::Activatable).verdict, Verdict::Pass);
    }

    /// A sandbox that cannot be made, as where user namespaces are off.
    #[derive(Debug)]
    struct NoSandbox;

    impl banger_formats::tool::Tools for NoSandbox {
        fn run(
            &self,
            tool: &banger_formats::tool::Tool,
        ) -> crate::error::Result<banger_formats::tool::Output> {
            Err(crate::error::Error::failed(format!(
                "cannot run {} in its sandbox: cannot make the user and network namespaces",
                tool.program
            )))
        }
    }

    #[test]
    fn the_tools_sandbox_fails_where_it_cannot_be_made() {
        let c = check_tools_sandbox(&NoSandbox);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.contains("cannot make the user"), "{}", c.detail);
        assert!(c.hint.contains("max_user_namespaces"), "{}", c.hint);
        assert_eq!(
            check_tools_sandbox(&banger_formats::tool::Unconfined).verdict,
            Verdict::Pass
        );
    }
}
