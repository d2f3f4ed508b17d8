//! Templates: a guest of an image booted once for a machine shape (vCPUs,
//! memory, work disk size) and saved, so that later creates of that shape
//! restore it instead of booting. A template is a directory under
//! `$STATE_DIRECTORY/templates/<id>/`: the system and work disks the
//! template booted from (the base of every VM made from it), its saved
//! state with its key (as a suspended VM's), and `template.json`.
//!
//! A template is made in the background after the first cold create of a
//! shape (job `make-template`, root's), in a `.tmp-<id>` directory renamed
//! when whole. It is used only while its key still holds (same VMM
//! program, accelerator, kernel files); one that no longer does is
//! removed, and so is one whose image is gone (at bangerd's start).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Vms;
use super::blocking;
use super::boot::kernel_cmdline;
use super::suspend::{StateFiles, adopt_state, commit, save_partial, state_key};
use super::vmm_choice::kernel_file;
use crate::artifacts::{Image, Kernel};
use crate::auth::Action;
use crate::error::{Error, Result};
use crate::jobs::JobContext;
use crate::vm::disk::{self, DiskMethod};
use crate::vm::vmm::jail;
use crate::vm::vmm::{Accel, Confine, LaunchSpec, Vmm};
use crate::vm::{Vm, VmEvent, VmPaths};

/// Bumped when what a template holds changes.
const TEMPLATE_FORMAT: u32 = 1;

/// The MAC of a template's NIC (the guests made from it get their own).
const TEMPLATE_MAC: &str = "0a:b6:00:00:00:01";

/// Where templates live.
pub fn templates_dir(state: &Path) -> PathBuf {
    state.join("templates")
}

/// The templates of image `image_id` under `dir` (the templates
/// directory), smallest shape first. Reads files: call it off the async
/// workers.
pub fn templates_of(dir: &Path, image_id: &str) -> Vec<TemplateInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<TemplateInfo> = entries
        .filter_map(std::result::Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read_to_string(e.path().join("template.json")).ok())
        .filter_map(|t| serde_json::from_str::<TemplateInfo>(&t).ok())
        .filter(|t| t.image_id == image_id)
        .collect();
    found.sort_by_key(|t| (t.vcpus, t.memory_mib, t.disk_bytes));
    found
}

/// What `template.json` says of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// [`TEMPLATE_FORMAT`].
    pub format: u32,
    /// Its image and kernel.
    pub image_id: String,
    /// Its kernel.
    pub kernel_id: String,
    /// Its shape.
    pub vcpus: u32,
    /// Its memory, MiB.
    pub memory_mib: u32,
    /// Its work disk, bytes.
    pub disk_bytes: u64,
    /// The VMM and accelerator it was saved under.
    pub vmm: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Its saved state's size.
    pub state_bytes: u64,
    /// How long its boot to a ready guest took, ms.
    pub boot_ms: u64,
    /// When it was made, µs since the epoch.
    pub made_at: i64,
}

/// The directory name of the template of `vm`'s image and shape under
/// `vmm` and `accel`.
fn template_id(vm: &Vm, vmm: &dyn Vmm, accel: Accel) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "format {TEMPLATE_FORMAT}\nimage {}\nkernel {}\nvcpus {}\nmemory {}\ndisk {}\nvmm {}\naccel {}\n",
        vm.image_id,
        vm.kernel_id,
        vm.vcpus,
        vm.memory_mib,
        vm.disk_bytes,
        vmm.name(),
        accel.as_str()
    ));
    crate::artifacts::hex(&h.finalize())[..16].to_owned()
}

/// Whether templates can be made with `vmm`: a saved guest must load
/// into other VMs (Firecracker's, only jailed).
fn makes_templates(vmm: &dyn Vmm) -> bool {
    vmm.portable_snapshots()
}

/// The paths of template `id` being made in `dir`: its disks and state
/// where a VM's would be, its sockets under the runtime directory.
fn template_paths(dir: &Path, runtime: &Path, id: &str) -> VmPaths {
    VmPaths::in_dirs(dir.to_owned(), runtime.join("templates").join(id))
}

/// Templates being made now, so that a second create does not make the
/// same one again.
#[derive(Debug, Default)]
pub(super) struct Making(std::sync::Mutex<HashSet<String>>);

impl Vms {
    /// Where templates live.
    pub fn templates(&self) -> PathBuf {
        templates_dir(&self.dirs.state)
    }

    /// The template VM `vm` can be made from under `vmm` and `accel`, if
    /// one is ready and still fits (its key holds); one that does not is
    /// removed.
    pub(super) async fn usable_template(
        &self,
        vm: &Vm,
        vmm: &dyn Vmm,
        accel: Accel,
        kernel: &Kernel,
    ) -> Option<VmPaths> {
        if !self.config().vm.templates || !vm.mounts.is_empty() || !makes_templates(vmm) {
            return None;
        }
        let id = template_id(vm, vmm, accel);
        let dir = self.templates().join(&id);
        let paths = template_paths(&dir, &self.dirs.runtime, &id);
        let (vmm_id, program) = (vmm.name(), vmm.program().to_owned());
        let kernel_file = kernel_file(vmm, kernel);
        let (p, vm, initrd) = (paths.clone(), vm.clone(), kernel.initrd.clone());
        let usable = blocking(move || {
            if !p.suspend_state.is_file() || !p.dir.join("template.json").is_file() {
                return Ok(false);
            }
            let key = state_key((vmm_id, &program), accel, &vm, &kernel_file, initrd.as_deref());
            let kept = std::fs::read_to_string(&p.suspend_key).unwrap_or_default();
            let fits = key.is_ok_and(|k| kept.lines().next() == Some(k.as_str()));
            if !fits {
                tracing::info!(template = %p.dir.display(), "removing a template that no longer fits its VMM or kernel");
                let _ = std::fs::remove_dir_all(&p.dir);
            }
            Ok(fits)
        })
        .await
        .unwrap_or(false);
        usable.then_some(paths)
    }

    /// Make VM `vm`'s disks from `template` and give it the template's
    /// state as its own saved state: its start restores the template and
    /// renews the guest. Stages as a create's.
    pub(super) async fn disks_from_template(
        &self,
        ctx: &JobContext,
        vm: &Vm,
        template: &VmPaths,
    ) -> Result<()> {
        let to = self.vm_paths(&vm.id);
        ctx.stage("system disk", 0.1).await?;
        let (from, sys, dir) = (
            template.system_disk.clone(),
            to.system_disk.clone(),
            to.dir.clone(),
        );
        let method = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
            disk::copy_disk(&from, &sys)
        })
        .await?;
        ctx.progress(&format!("{} of a template", method.as_str()), 0.2, None);
        ctx.stage("work disk", 0.2).await?;
        let (from, work) = (template.work_disk.clone(), to.work_disk.clone());
        blocking(move || disk::copy_disk(&from, &work).map(|_| ())).await?;
        let (t, paths, id) = (template.clone(), to.clone(), template_dir_id(template));
        blocking(move || {
            let kept = std::fs::read_to_string(&t.suspend_key)
                .map_err(|e| Error::failed(format!("cannot read the template's key: {e}")))?;
            let key = kept.lines().next().unwrap_or_default().to_owned();
            let from = StateFiles::saved(&t);
            adopt_state(&paths, &from, &key, &format!("template-{id}"))
                .map_err(|e| Error::failed(format!("cannot give the vm the template: {e}")))
        })
        .await?;
        ctx.check_cancelled()?;
        self.transition(&vm.id, VmEvent::Created, move |v| {
            v.disk_method = Some(if method == DiskMethod::DeviceMapper {
                DiskMethod::Copy
            } else {
                method
            });
            v.suspended = true;
        })
        .await?;
        Ok(())
    }

    /// After VM `vm`'s cold create: make the template of its image and
    /// shape in the background, unless there is one (or one on its way),
    /// or templates are off.
    pub(super) async fn make_template_later(self: &Arc<Self>, vm: &Vm) {
        let config = self.config();
        if !config.vm.templates || !vm.mounts.is_empty() {
            return;
        }
        let Ok(kernel) = self.artifacts.kernel_by_id(&vm.kernel_id).await else {
            return;
        };
        let Ok((vmm, accel, _)) = self.pick_vmm(&kernel).await else {
            return;
        };
        if !makes_templates(vmm.as_ref()) {
            return;
        }
        let id = template_id(vm, vmm.as_ref(), accel);
        let dir = self.templates().join(&id);
        if blocking(move || Ok(dir.is_dir())).await.unwrap_or(false) {
            return;
        }
        if !self
            .runtime
            .making
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone())
        {
            return;
        }
        let core = self.clone();
        let shape = vm.clone();
        let started = self
            .jobs()
            .start_cooperative(
                "make-template",
                0,
                Action::VmCreate,
                move |ctx| async move {
                    let made = core.make_template(&ctx, &shape, &id).await;
                    let image = crate::jobs::Resource::Image(shape.image_id.clone());
                    core.runtime
                        .making
                        .0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Err(e) = &made {
                        tracing::warn!(template = %id, "cannot make a template: {e}");
                    }
                    made.map(|()| Some(image))
                },
            )
            .await;
        if let Err(e) = started {
            tracing::warn!("cannot start making a template: {e}");
        }
    }

    /// Boot a template of `shape`'s image and shape as `id`, save it and
    /// keep it; nothing is left of a failed one.
    async fn make_template(&self, ctx: &JobContext, shape: &Vm, id: &str) -> Result<()> {
        let final_dir = self.templates().join(id);
        let dir = self.templates().join(format!(".tmp-{id}"));
        let paths = template_paths(&dir, &self.dirs.runtime, id);
        let made = self.boot_and_save(ctx, shape, id, &paths).await;
        let (p, final_c) = (paths.clone(), final_dir.clone());
        match made {
            Ok(info) => {
                let (boot_ms, state_bytes) = (info.boot_ms, info.state_bytes);
                blocking(move || {
                    let text = serde_json::to_string_pretty(&info)
                        .map_err(|e| Error::failed(format!("cannot describe the template: {e}")))?;
                    std::fs::write(p.dir.join("template.json"), text)
                        .and_then(|()| std::fs::rename(&p.dir, &final_c))
                        .map_err(|e| Error::failed(format!("cannot keep the template: {e}")))?;
                    let _ = std::fs::remove_dir_all(&p.run);
                    Ok(())
                })
                .await?;
                tracing::info!(template = %id, image = %shape.image_id, boot_ms, state_bytes, "template made");
                Ok(())
            }
            Err(e) => {
                let _ = blocking(move || {
                    let _ = std::fs::remove_dir_all(&p.dir);
                    let _ = std::fs::remove_dir_all(&p.run);
                    Ok(())
                })
                .await;
                Err(e)
            }
        }
    }

    async fn boot_and_save(
        &self,
        ctx: &JobContext,
        shape: &Vm,
        id: &str,
        paths: &VmPaths,
    ) -> Result<TemplateInfo> {
        let image: Image = self.artifacts.ensure_work_seed(&shape.image_id).await?;
        let kernel = self.artifacts.kernel_by_id(&shape.kernel_id).await?;
        ctx.stage("disks", 0.0).await?;
        let (rootfs, seed, p, bytes) = (
            image.rootfs.clone(),
            image.work_seed.clone(),
            paths.clone(),
            shape.disk_bytes,
        );
        let tools = self.tools.clone();
        blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::remove_dir_all(&p.dir);
            for d in [&p.dir, &p.run] {
                std::fs::create_dir_all(d)
                    .map_err(|e| Error::failed(format!("cannot create {}: {e}", d.display())))?;
            }
            // Root's alone: a template's memory and disks.
            if let Some(templates) = p.dir.parent() {
                std::fs::set_permissions(templates, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| {
                        Error::failed(format!("cannot protect {}: {e}", templates.display()))
                    })?;
            }
            disk::copy_disk(&rootfs, &p.system_disk)?;
            disk::make_work_disk(&*tools, seed.as_deref(), &p.work_disk, bytes, &[])
        })
        .await?;

        ctx.stage("boot", 0.2).await?;
        let (vmm, accel, kernel_path) = self.pick_vmm(&kernel).await?;
        let state = self.dirs.state.clone();
        let shared: Vec<PathBuf> = std::iter::once(kernel_path.clone())
            .chain(kernel.initrd.clone())
            .collect();
        blocking(move || {
            for file in &shared {
                super::boot::share_with_vmms(&state, file).map_err(|e| {
                    Error::failed(format!("cannot let VMMs read {}: {e}", file.display()))
                })?;
            }
            Ok(())
        })
        .await?;
        // Its VMM runs as a uid no VM has (that of the bridge's address).
        let confine = jail::vm_uid(1).map(|uid| Confine {
            helper: self.helper.clone(),
            uid,
        });
        // Its NIC leads nowhere: a TAP of its own, on no bridge and down
        // (the guests restored from it each get theirs).
        let net = self.network().await?;
        let tap = net
            .lone_tap(
                &id[..id.len().min(9)],
                confine.as_ref().map_or(0, |c| c.uid),
            )
            .await?;
        let spec = LaunchSpec {
            id: id.to_owned(),
            name: "template".to_owned(),
            kernel: kernel_path.clone(),
            initrd: kernel.initrd.clone(),
            cmdline: kernel_cmdline(&kernel, &image, (id, "template"), None, accel),
            vcpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            paths: paths.clone(),
            system_disk: paths.system_disk.clone(),
            net: Some((tap.clone(), TEMPLATE_MAC.to_owned())),
            accel,
            confine,
            shares: Vec::new(),
            incoming: false,
        };
        let made = self
            .run_and_save(ctx, shape, &image, &kernel, &spec, vmm.as_ref())
            .await;
        if let Err(e) = net.drop_lone_tap(&tap).await {
            tracing::warn!(%tap, "cannot delete the template's TAP (deleted when the network next comes up): {e}");
        }
        made
    }

    /// Launch the template's VMM with `spec`, wait until the guest and
    /// its services are ready, save it, and end the VMM, saved or not.
    async fn run_and_save(
        &self,
        ctx: &JobContext,
        shape: &Vm,
        image: &Image,
        kernel: &Kernel,
        spec: &LaunchSpec,
        vmm: &dyn Vmm,
    ) -> Result<TemplateInfo> {
        let config = self.config();
        let (id, paths, kernel_path) = (spec.id.as_str(), &spec.paths, spec.kernel.clone());
        let booted = Instant::now();
        let (mut watched, pid) = vmm.launch(spec, self.supervisor.as_ref()).await?;
        let saved = async {
            let endpoint = vmm.agent(paths);
            let timeout = Duration::from_secs(config.vm.boot_timeout_secs);
            let ready = tokio::select! {
                () = ctx.token().cancelled() => return Err(Error::cancelled("cancelled")),
                r = self.agent.wait_ready(&endpoint, timeout, Duration::from_millis(100)) => r,
            }
            .map_err(|e| Error::failed(format!("the template's agent did not answer: {e}")))?;
            let mut conn = ready.session;
            for service in &image.services {
                conn_wait(&mut conn, service.port, timeout).await?;
            }
            drop(conn);
            let boot_ms = u64::try_from(booted.elapsed().as_millis()).unwrap_or(u64::MAX);
            ctx.stage("save", 0.8).await?;
            let saved = save_partial(vmm, paths).await?;
            let (vmm_id, program) = (vmm.name(), vmm.program().to_owned());
            let (p, shape_c, initrd) = (paths.clone(), shape.clone(), kernel.initrd.clone());
            let state_bytes = blocking(move || {
                let key = state_key(
                    (vmm_id, &program),
                    saved.accel,
                    &shape_c,
                    &kernel_path,
                    initrd.as_deref(),
                )
                .map_err(|e| Error::failed(format!("cannot key the template: {e}")))?;
                commit(&p, &key)
                    .and_then(|()| StateFiles::saved(&p).bytes())
                    .map_err(|e| Error::failed(format!("cannot keep the template's state: {e}")))
            })
            .await?;
            Ok(TemplateInfo {
                format: TEMPLATE_FORMAT,
                image_id: shape.image_id.clone(),
                kernel_id: shape.kernel_id.clone(),
                vcpus: shape.vcpus,
                memory_mib: shape.memory_mib,
                disk_bytes: shape.disk_bytes,
                vmm: vmm.name().to_owned(),
                accel: saved.accel.as_str().to_owned(),
                state_bytes,
                boot_ms,
                made_at: crate::store::unix_us(std::time::SystemTime::now()),
            })
        }
        .await;
        // The template's VMM ends here, saved or not (killed at once
        // when it cannot be asked, as Firecracker cannot).
        if vmm.quit(paths).await.is_ok() {
            let until = Instant::now() + Duration::from_secs(10);
            while !watched.ended() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if !watched.ended() {
            let _ = self
                .supervisor
                .signal(id, pid, nix::sys::signal::Signal::SIGKILL)
                .await;
            let until = Instant::now() + Duration::from_secs(10);
            while !watched.ended() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        saved
    }

    /// Remove the templates of image `image_id` (deleted).
    pub async fn drop_templates_of(&self, image_id: &str) {
        let (dir, image) = (self.templates(), image_id.to_owned());
        let _ = blocking(move || {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return Ok(());
            };
            for e in entries.filter_map(std::result::Result::ok) {
                let of_image = std::fs::read_to_string(e.path().join("template.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<TemplateInfo>(&t).ok())
                    .is_some_and(|t| t.image_id == image);
                if of_image {
                    tracing::info!(template = %e.path().display(), "removing a template of a deleted image");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            Ok(())
        })
        .await;
    }

    /// Remove template `id` (one that did not load).
    pub(super) async fn remove_template(&self, id: &str) {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return;
        }
        let dir = self.templates().join(id);
        tracing::warn!(template = %id, "removing a template that did not load");
        let _ = blocking(move || Ok(std::fs::remove_dir_all(&dir))).await;
    }

    /// At start: remove templates half made, and those whose image is
    /// gone.
    pub(super) async fn settle_templates(&self) {
        let images: HashSet<String> = match self.artifacts.images().await {
            Ok(images) => images.into_iter().map(|i| i.id).collect(),
            Err(_) => return,
        };
        let dir = self.templates();
        let _ = blocking(move || {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return Ok(());
            };
            for e in entries.filter_map(std::result::Result::ok) {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let info: Option<TemplateInfo> = std::fs::read_to_string(path.join("template.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                let keep = !name.starts_with('.')
                    && info.is_some_and(|i| i.format == TEMPLATE_FORMAT && images.contains(&i.image_id));
                if !keep {
                    tracing::info!(template = %path.display(), "removing a template half made or of an image that is gone");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
            Ok(())
        })
        .await;
    }
}

/// The id of the template at `paths` (its directory's name).
fn template_dir_id(paths: &VmPaths) -> String {
    paths
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn conn_wait(
    conn: &mut Box<dyn crate::vm::agent::AgentSession>,
    port: u16,
    timeout: Duration,
) -> Result<()> {
    conn.wait_port(port, timeout)
        .await
        .map(|_| ())
        .map_err(|e| Error::failed(format!("port {port} did not come up in the template: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vmm::qemu::Qemu;

    fn vm() -> Vm {
        crate::vm::store::tests::vm("0123456789abcdef", "web")
    }

    /// QEMU makes templates; Firecracker only jailed, as unjailed its
    /// saved guest names the template's own disks.
    #[test]
    fn templates_are_made_where_a_saved_guest_loads_into_other_vms() {
        use crate::vm::vmm::firecracker::Firecracker;
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        assert!(makes_templates(&q));
        for (jailer, makes) in [(None, false), (Some("jailer".into()), true)] {
            let fc = Firecracker {
                binary: "firecracker".into(),
                jailer,
            };
            assert_eq!(makes_templates(&fc), makes);
        }
    }

    /// A template is one per image, kernel, shape, VMM and accelerator.
    #[test]
    fn a_template_is_named_by_everything_its_guest_depends_on() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        let base = template_id(&vm(), &q, Accel::Tcg);
        assert_eq!(base.len(), 16);
        assert_eq!(base, template_id(&vm(), &q, Accel::Tcg), "stable");
        // Its name and owner do not matter: any VM of the shape uses it.
        let other = Vm {
            name: "other".into(),
            owner_uid: 1000,
            ..vm()
        };
        assert_eq!(base, template_id(&other, &q, Accel::Tcg));
        let changes: Vec<Vm> = vec![
            Vm {
                image_id: "ffffffffffffffff".into(),
                ..vm()
            },
            Vm {
                kernel_id: "ffffffffffffffff".into(),
                ..vm()
            },
            Vm { vcpus: 3, ..vm() },
            Vm {
                memory_mib: 999,
                ..vm()
            },
            Vm {
                disk_bytes: 1 << 40,
                ..vm()
            },
        ];
        for changed in changes {
            assert_ne!(base, template_id(&changed, &q, Accel::Tcg), "{changed:?}");
        }
        assert_ne!(base, template_id(&vm(), &q, Accel::Kvm));
    }

    #[test]
    fn a_templates_files_are_in_its_directory_and_its_sockets_in_the_runtime() {
        let p = template_paths(Path::new("/s/templates/.tmp-ab"), Path::new("/run/b"), "ab");
        assert_eq!(p.system_disk, Path::new("/s/templates/.tmp-ab/system.ext4"));
        assert_eq!(p.work_disk, Path::new("/s/templates/.tmp-ab/work.ext4"));
        assert_eq!(
            p.suspend_state,
            Path::new("/s/templates/.tmp-ab/suspend.state")
        );
        assert_eq!(p.agent_socket, Path::new("/run/b/templates/ab/agent.sock"));
        assert_eq!(template_dir_id(&p), ".tmp-ab");
    }
}
