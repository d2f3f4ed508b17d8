//! Kernels made here from the distribution's archive, for hosts no
//! catalog serves: `BuildKernel` fetches Debian's cloud kernel package
//! through the host's apt sources ([`apt`]), unpacks it, makes the small
//! initramfs VMs boot with ([`initrd`]) and records a system kernel, as
//! a pull does. No package is installed on the host.

pub mod apt;
pub mod image;
pub mod initrd;
pub mod steps;

use std::sync::Arc;

use super::commands::{StagedKernel, TmpDir, already_exists, blocking, place_kernel};
use super::owner::SYSTEM_UID;
use super::validate;
use crate::artifacts::{Artifacts, kernels_dir};
use crate::auth::{Action, Caller};
use crate::error::{Error, Result};
use crate::jobs::{JobContext, JobId, Resource};

/// The metapackage that names the release's current cloud kernel.
pub const CLOUD_KERNEL: &str = "linux-image-cloud-amd64";

/// What `BuildKernel` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuild {
    /// The name to record the kernel under.
    pub name: String,
    /// The kernel image package; `None` for the release's cloud kernel.
    pub package: Option<String>,
}

/// The name a built kernel gets when none is given: `debian-<codename>`
/// from the host's os-release (`debian-bookworm`), else `debian-cloud`.
pub fn default_name(os_release: &str) -> String {
    let codename = os_release.lines().find_map(|l| {
        l.strip_prefix("VERSION_CODENAME=")
            .map(|v| v.trim().trim_matches('"').to_owned())
    });
    match codename {
        Some(c) if !c.is_empty() && validate::name("kernel", &format!("debian-{c}")).is_ok() => {
            format!("debian-{c}")
        }
        _ => "debian-cloud".to_owned(),
    }
}

/// The programs a kernel build runs, with what to install for each.
const PROGRAMS: &[(&str, &str)] = &[
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("depmod", "kmod"),
    ("modprobe", "kmod"),
];

/// Whether local builds are on (`images.build_from`); the refusal says
/// how to turn them on.
pub fn enabled(config: &crate::config::ImagesConfig) -> Result<()> {
    match config.build_from {
        crate::config::BuildFrom::Debian => Ok(()),
        crate::config::BuildFrom::None => Err(Error::unavailable(
            "local kernel and image builds are off here (images.build_from = \"none\" in bangerd.toml); set it to \"debian\" to build from the Debian archive",
        )),
    }
}

/// Whether a kernel build can run here: its programs and a static
/// busybox. The one answer both `BuildKernel` (before its job starts)
/// and `doctor` give.
pub fn readiness() -> Result<()> {
    readiness_with(
        |p| crate::program::find(std::path::Path::new(p)).is_some(),
        initrd::busybox_is_static(),
    )
}

/// [`readiness`] with `found` saying whether a program is there.
fn readiness_with(found: impl Fn(&str) -> bool, static_busybox: bool) -> Result<()> {
    let mut missing: Vec<&str> = PROGRAMS
        .iter()
        .filter(|(p, _)| !found(p))
        .map(|(_, package)| *package)
        .collect();
    if !static_busybox {
        missing.push("busybox-static");
    }
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::unavailable(format!(
        "kernel builds need {} here: apt install {}",
        missing.join(", "),
        missing.join(" ")
    )))
}

impl Artifacts {
    /// Build a kernel from the host's Debian archive as a job (action
    /// `org.banger.image.manage`); its result is the kernel, a system
    /// kernel like a catalog pull's. Name and package are checked before
    /// the job starts.
    pub async fn build_kernel(
        self: &Arc<Self>,
        caller: &Caller,
        req: KernelBuild,
    ) -> Result<JobId> {
        self.authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        enabled(&self.config().images)?;
        let name = if req.name.is_empty() {
            let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
            default_name(&os)
        } else {
            req.name
        };
        validate::name("kernel", &name)?;
        if let Some(p) = &req.package
            && !apt::valid_package(p)
        {
            return Err(Error::invalid(format!(
                "{p:?} is no package name (lowercase letters, digits, '+', '-' and '.')"
            )));
        }
        self.authorize_name(caller, banger_catalog::Kind::Kernels, &name)
            .await?;
        self.start_kernel_build(name, req.package, caller.uid).await
    }

    /// Start building kernel `name` from `package` (default the cloud
    /// kernel) for `uid`; no authorization here.
    pub(super) async fn start_kernel_build(
        self: &Arc<Self>,
        name: String,
        package: Option<String>,
        uid: u32,
    ) -> Result<JobId> {
        blocking(readiness).await?;
        let exists = {
            let name = name.clone();
            self.on_store("reading the store failed", move |s| {
                Ok(s.kernel_by_name(&name)?.is_some())
            })
            .await?
        };
        if exists {
            return Err(already_exists("kernel", &name));
        }
        let core = self.clone();
        self.jobs()
            .start_with_result(
                "kernel-build",
                uid,
                Action::ImageManage,
                move |ctx| async move { core.build_kernel_job(&ctx, name, package).await },
            )
            .await
    }

    async fn build_kernel_job(
        &self,
        ctx: &JobContext,
        name: String,
        package: Option<String>,
    ) -> Result<Option<Resource>> {
        let apt = apt::Apt::new(self.cache.join("apt"), self.steps.clone());
        ctx.stage("apt update", 0.0).await?;
        let apt_held = self.apt.lock().await;
        apt.update().await?;

        ctx.stage("resolve package", 0.08).await?;
        let package = match package {
            Some(p) => p,
            None => apt.resolve(CLOUD_KERNEL).await?,
        };
        let want = apt.locate(&package).await?;
        ctx.progress(&format!("{package}: {}", want.file), 0.09, None);

        ctx.stage(&format!("download {package}"), 0.1).await?;
        let max_mib = self.config().limits.kernel_max_mib.saturating_mul(4);
        if want.size > max_mib.saturating_mul(1 << 20) {
            return Err(Error::limit(format!(
                "{} is {} bytes, more than a kernel package may be here",
                want.file, want.size
            )));
        }
        crate::space::check_room(&self.cache, want.size.saturating_mul(4), "the kernel build")?;
        let tick = super::commands::ticker(ctx, "download", want.size, 0.1, 0.5);
        let deb = apt.download(&package, &want, tick).await?;
        drop(apt_held);

        let id = super::new_id().map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        // Everything is made inside the staging directory (the unpacked
        // package under `.build`, which goes before the kernel is
        // recorded): one file system, so the pieces kept are renamed into
        // place, and a crash leaves only a `.tmp-` directory, which startup
        // removes. Each blocking step holds the directory: a cancel ends
        // the job at once, and the directory goes when the step that was
        // running (and the programs it waits for) is done, so nothing
        // writes into it after it is removed.
        let tmp = Arc::new(TmpDir::create(
            kernels_dir(&self.state).join(format!(".tmp-{id}")),
        )?);
        let work = tmp.path().join(".build");
        let tree = work.join("pkg");

        ctx.stage("unpack", 0.5).await?;
        let version = {
            let (tree, held) = (tree.clone(), tmp.clone());
            blocking(move || {
                let _held = held;
                std::fs::create_dir_all(&tree)
                    .map_err(|e| Error::failed(format!("cannot make {}: {e}", tree.display())))?;
                initrd::unpack(&deb, &tree)?;
                initrd::version_in(&tree)
            })
            .await?
        };

        ctx.stage("modules", 0.6).await?;
        let order = {
            let (tree, version, held) = (tree.clone(), version.clone(), tmp.clone());
            blocking(move || {
                let _held = held;
                initrd::modules(&tree, &version)
            })
            .await?
        };
        ctx.progress(
            &format!("{} modules for the initramfs", order.len()),
            0.65,
            None,
        );

        ctx.stage("initramfs", 0.7).await?;
        {
            let (tree, version, held) = (tree.clone(), version.clone(), tmp.clone());
            let stage = work.join("initramfs");
            let out = held.path().join("initrd.img");
            blocking(move || {
                let _held = held;
                initrd::make(&tree, &version, &order, &stage, &out)
            })
            .await?;
        }

        ctx.stage("check vmlinux", 0.8).await?;
        let held = tmp.clone();
        let (is_bzimage, header_version) = blocking(move || {
            let dir = held.path();
            let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
            let placed = place_kernel(dir, &vmlinuz)?;
            let modules = tree.join("lib/modules").join(&version);
            std::fs::rename(&modules, dir.join("modules"))
                .map_err(|e| Error::failed(format!("cannot move the modules: {e}")))?;
            std::fs::remove_dir_all(&work)
                .map_err(|e| Error::failed(format!("cannot remove the unpacked package: {e}")))?;
            drop(held);
            Ok(placed)
        })
        .await?;
        // Every step is done: this is the last holder.
        let tmp = Arc::into_inner(tmp)
            .ok_or_else(|| Error::failed("the kernel's staging directory is still in use"))?;
        let staged = StagedKernel {
            id,
            name,
            version: if header_version.is_empty() {
                package
                    .strip_prefix("linux-image-")
                    .unwrap_or(&package)
                    .to_owned()
            } else {
                header_version
            },
            is_bzimage,
            initrd: true,
            modules: true,
            // Vouched for by the distribution's signed archive.
            uid: SYSTEM_UID,
        };
        self.record_kernel(ctx, tmp, staged).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_to_install() {
        assert!(readiness_with(|_| true, true).is_ok());
        let e =
            readiness_with(|p| !matches!(p, "depmod" | "modprobe"), false).expect_err("missing");
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        assert_eq!(
            e.message,
            "kernel builds need kmod, busybox-static here: apt install kmod busybox-static"
        );
        // This host has them (scripts/install-deps).
        readiness().expect("kernel builds can run on the test host");
    }

    #[test]
    fn the_default_name_follows_the_release() {
        assert_eq!(
            default_name(
                "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n"
            ),
            "debian-bookworm"
        );
        assert_eq!(default_name("ID=debian\n"), "debian-cloud");
        assert_eq!(
            default_name("VERSION_CODENAME=\"Bad Name!\"\n"),
            "debian-cloud"
        );
    }
}
