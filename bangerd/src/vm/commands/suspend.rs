//! Suspend and resume: a running VM's memory and device state written to
//! its directory (`vm suspend`) and its VMM ended; its next start loads
//! that state into a new VMM instead of booting ([`Vms::boot`]).
//!
//! The saved state is two files in the VM's directory: the state itself
//! ([`VmPaths::suspend_state`], written as `suspend.tmp` and renamed when
//! complete) and the key it was saved under ([`VmPaths::suspend_key`]).
//! The row's `suspended` follows the files; a restarted bangerd settles
//! what a suspend or resume cut short ([`Vms::settle_suspends`]).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::vmm_choice::kernel_file;
use super::{Vms, blocking, vmm_named};
use crate::auth::{Action, Caller};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobId, Resource};
use crate::vm::process::ProcessId;
use crate::vm::vmm::{Accel, Saved, Vmm};
use crate::vm::{Vm, VmEvent, VmPaths, VmState};

/// Bumped when banger changes the devices it gives a VMM: a state saved
/// under another layout is not loaded.
const DEVICE_LAYOUT: u32 = 2;

/// The state file while it is being written.
pub(super) fn partial(paths: &VmPaths) -> PathBuf {
    paths.dir.join("suspend.tmp")
}

/// Save the guest of `vmm` into [`partial`] (made here, 0600), removed
/// again when the save fails.
pub(super) async fn save_partial(vmm: &dyn Vmm, paths: &VmPaths) -> Result<Saved> {
    let tmp = partial(paths);
    let t = tmp.clone();
    let file = blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&t)
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", t.display())))
    })
    .await?;
    match vmm.save(paths, OwnedFd::from(file)).await {
        Ok(saved) => Ok(saved),
        Err(e) => {
            let _ = blocking(move || Ok(std::fs::remove_file(&tmp))).await;
            Err(e)
        }
    }
}

/// What a saved state depends on, hashed: banger's device layout, the
/// VMM (driver, and its program's path, size and modification time), the
/// accelerator, the machine's shape and the kernel files the guest booted.
pub(super) fn state_key(
    (vmm, program): (&str, &Path),
    accel: Accel,
    vm: &Vm,
    kernel: &Path,
    initrd: Option<&Path>,
) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "layout {DEVICE_LAYOUT}\nvmm {vmm}\naccel {}\nvcpus {}\nmemory {}\nfolders {}\n",
        accel.as_str(),
        vm.vcpus,
        vm.memory_mib,
        vm.mounts.len()
    ));
    for file in [program, kernel].into_iter().chain(initrd) {
        let m = std::fs::metadata(file)?;
        let mtime = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(format!("{} {} {mtime}\n", file.display(), m.len()));
    }
    Ok(crate::artifacts::hex(&h.finalize()))
}

/// Whether VM `vm` can be suspended now, and if not, why.
pub(super) fn suspendable(config: &Config, vm: &Vm) -> Result<Arc<dyn Vmm>> {
    if vm.state != VmState::Running {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "vm {} is {}: only a running vm can be suspended",
                vm.name,
                vm.state.as_str()
            ),
        ));
    }
    if !vm.mounts.is_empty() {
        return Err(Error::unavailable(format!(
            "vm {} shares host folders, whose state QEMU cannot save: stop it instead (banger vm stop {})",
            vm.name, vm.name
        )));
    }
    let vmm = vmm_named(config, vm.vmm)?;
    if !vmm.snapshots() {
        return Err(Error::unavailable(format!(
            "vm {} runs under {}, which banger cannot suspend yet: stop it instead (banger vm stop {})",
            vm.name,
            vmm.name(),
            vm.name
        )));
    }
    Ok(vmm)
}

/// Remove a VM's saved state, complete or not.
fn remove_state(paths: &VmPaths) -> std::io::Result<()> {
    for file in [&paths.suspend_state, &paths.suspend_key, &partial(paths)] {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Make the state written to [`partial`] the VM's saved state, under
/// `key`: the key first, then the state renamed into place, each synced.
pub(super) fn commit(paths: &VmPaths, key: &str) -> std::io::Result<()> {
    let tmp = partial(paths);
    std::fs::File::open(&tmp)?.sync_all()?;
    write_key(paths, key)?;
    std::fs::rename(&tmp, &paths.suspend_state)?;
    std::fs::File::open(&paths.dir)?.sync_all()
}

/// Give the VM at `paths` the state `state` (another VM's, `origin`,
/// saved under `key`) as its own saved state: a hard link (a copy where
/// links cannot be made), so that its next start loads that guest and
/// renews its identity.
pub(super) fn adopt_state(
    paths: &VmPaths,
    state: &Path,
    key: &str,
    origin: &str,
) -> std::io::Result<()> {
    write_key(paths, &format!("{key}\n{origin}"))?;
    if std::fs::hard_link(state, &paths.suspend_state).is_err() {
        let tmp = partial(paths);
        std::fs::copy(state, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &paths.suspend_state)?;
    }
    std::fs::File::open(&paths.dir)?.sync_all()
}

/// The key file's content: the key, then (for a state that came from
/// another VM) that VM's id.
fn write_key(paths: &VmPaths, key: &str) -> std::io::Result<()> {
    let key_tmp = paths.dir.join("suspend.key.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_tmp)?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&key_tmp, &paths.suspend_key)
}

/// The key a saved state was saved under, and the VM it came from when
/// that is another.
fn read_key(paths: &VmPaths) -> std::io::Result<(String, Option<String>)> {
    let text = std::fs::read_to_string(&paths.suspend_key)?;
    let mut lines = text.lines();
    let key = lines.next().unwrap_or_default().trim().to_owned();
    let origin = lines.next().map(|l| l.trim().to_owned());
    Ok((key, origin))
}

/// Whether a complete saved state is in the VM's directory.
fn saved(paths: &VmPaths) -> bool {
    paths.suspend_state.is_file() && paths.suspend_key.is_file()
}

/// Open the saved state if it was saved under `key`, and take it out of
/// the VM's directory (the descriptor keeps it readable): a state is
/// loaded once. The error says why it cannot be loaded.
pub(super) fn take_state(
    paths: &VmPaths,
    key: &str,
) -> std::result::Result<(OwnedFd, Option<String>), String> {
    let (kept, origin) = read_key(paths).map_err(|e| format!("its key cannot be read: {e}"))?;
    if kept != key {
        return Err(
            "it was saved under another VMM, accelerator, kernel or machine shape".to_owned(),
        );
    }
    let file = std::fs::File::open(&paths.suspend_state)
        .map_err(|e| format!("it cannot be opened: {e}"))?;
    remove_state(paths).map_err(|e| format!("it cannot be taken: {e}"))?;
    Ok((file.into(), origin))
}

impl Vms {
    /// Suspend a running VM as a job: its memory and device state go to
    /// its directory and its VMM ends; its next start resumes it.
    pub async fn suspend_vm(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<JobId> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        suspendable(&self.config(), &vm)?;
        let claim = self.claim_vm(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "suspend-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    core.suspend(&ctx, &vm.id).await?;
                    Ok(Some(Resource::Vm(vm.id)))
                },
            )
            .await
    }

    async fn suspend(&self, ctx: &JobContext, id: &str) -> Result<()> {
        let vm = self.vm_by_id(id).await?;
        let config = self.config();
        let vmm = suspendable(&config, &vm)?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("vm {} has no vmm", vm.name),
            ));
        };
        let process = ProcessId { pid, start };
        let kernel = self.artifacts.kernel_by_id(&vm.kernel_id).await?;
        let kernel_file = kernel_file(vmm.as_ref(), &kernel);
        let paths = self.vm_paths(id);
        ctx.stage("save", 0.0).await?;
        let saved = save_partial(vmm.as_ref(), &paths).await?;
        let p = paths.clone();
        let (vmm_id, program) = (vmm.name(), vmm.program().to_owned());
        let (vm_c, initrd) = (vm.clone(), kernel.initrd.clone());
        let committed = blocking(move || {
            let kept = state_key(
                (vmm_id, &program),
                saved.accel,
                &vm_c,
                &kernel_file,
                initrd.as_deref(),
            )
            .and_then(|key| commit(&p, &key))
            .and_then(|()| Ok(std::fs::metadata(&p.suspend_state)?.len()));
            kept.map_err(|e| {
                let _ = remove_state(&p);
                Error::failed(format!("cannot keep the guest's state: {e}"))
            })
        })
        .await;
        let size = match committed {
            Ok(size) => size,
            Err(e) => {
                let _ = vmm.resume(&paths).await;
                return Err(e);
            }
        };
        ctx.progress(&format!("saved {} MiB", size.div_ceil(1 << 20)), 0.8, None);
        // Past this point the suspend finishes, cancelled or not: the
        // state is saved and the guest paused.
        let _ = ctx.stage("stop", 0.8).await;
        self.transition(id, VmEvent::Stop, |v| v.suspended = true)
            .await?;
        if let Err(e) = vmm.quit(&paths).await {
            tracing::warn!(banger_vm_id = %id, "cannot ask the vmm to quit: {e}");
        }
        if !self
            .wait_recorded(id, process, Duration::from_secs(10))
            .await
        {
            let _ = self.supervisor.signal(id, process, Signal::SIGKILL).await;
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
        tracing::info!(banger_vm_id = %id, banger_vm_name = %vm.name, bytes = size, "vm suspended");
        Ok(())
    }

    /// The key VM `vm`'s saved state loads under with `vmm` and `accel`,
    /// or `None` (the state dropped, a progress line saying why) when it
    /// cannot load: the VM boots.
    pub(super) async fn loadable(
        &self,
        ctx: &JobContext,
        vm: &Vm,
        vmm: &dyn Vmm,
        accel: Accel,
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<Option<String>> {
        let paths = self.vm_paths(&vm.id);
        let (vmm_id, program) = (vmm.name(), vmm.program().to_owned());
        let (vm_c, kernel, initrd) = (vm.clone(), kernel.to_owned(), initrd.map(Path::to_owned));
        let why = blocking(move || {
            let key = state_key((vmm_id, &program), accel, &vm_c, &kernel, initrd.as_deref());
            let kept = read_key(&paths);
            Ok(match (key, kept) {
                (Ok(key), Ok((kept, _))) if kept == key && saved(&paths) => Ok(key),
                (Ok(_), Ok(_)) => Err(
                    "the memory was saved under another VMM, accelerator, kernel or size"
                        .to_owned(),
                ),
                (Err(e), _) => Err(format!("the saved memory's key cannot be made: {e}")),
                (_, Err(e)) => Err(format!("the saved memory's key cannot be read: {e}")),
            })
        })
        .await?;
        let why = match why {
            Ok(key) => return Ok(Some(key)),
            Err(why) => why,
        };
        tracing::warn!(banger_vm_id = %vm.id, "cannot resume the vm: {why}; booting it instead");
        ctx.stage(&format!("cold boot: {why}"), 0.0).await?;
        self.drop_suspend(&vm.id).await?;
        Ok(None)
    }

    /// Load VM `vm`'s saved state (under `key`) into its VMM, started
    /// with [`crate::vm::vmm::LaunchSpec::incoming`]. The state leaves
    /// the VM's directory first: whatever happens next, it is not loaded
    /// twice. Returns the id of the VM the state came from when that is
    /// another (a fork's source): the guest then needs its own identity.
    pub(super) async fn restore_state(
        &self,
        vm: &Vm,
        vmm: &dyn Vmm,
        paths: &VmPaths,
        key: String,
    ) -> Result<Option<String>> {
        let p = paths.clone();
        let taken = blocking(move || {
            take_state(&p, &key)
                .map_err(|why| Error::failed(format!("the saved memory cannot be loaded: {why}")))
        })
        .await;
        self.modify(&vm.id, |v| v.suspended = false).await?;
        let (fd, origin) = taken?;
        vmm.restore(paths, fd).await?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "vm resumed");
        Ok(origin.filter(|o| *o != vm.id))
    }

    /// The VM (or `template-<id>`) VM `id`'s saved state came from, when
    /// it has one from elsewhere.
    pub(super) async fn saved_origin(&self, id: &str) -> Option<String> {
        let paths = self.vm_paths(id);
        blocking(move || Ok(read_key(&paths).ok().and_then(|(_, origin)| origin)))
            .await
            .ok()
            .flatten()
    }

    /// Drop VM `id`'s saved state (its disks are about to change under
    /// it): its next start boots.
    pub(super) async fn drop_suspend(&self, id: &str) -> Result<()> {
        let paths = self.vm_paths(id);
        blocking(move || {
            remove_state(&paths)
                .map_err(|e| Error::failed(format!("cannot remove the saved memory: {e}")))
        })
        .await?;
        self.modify(id, |v| v.suspended = false).await?;
        Ok(())
    }

    /// Settle what an earlier run left of suspends and resumes (at
    /// start, after the VMMs that run were adopted): a state half written
    /// is removed, and a guest paused for it runs again; a guest whose
    /// state was saved in full has its VMM stopped; every VM's
    /// `suspended` says whether its directory holds a complete state.
    /// `starting`: the VMs the last run left starting, the only ones a
    /// resume can have been cut short in.
    pub(super) async fn settle_suspends(
        &self,
        starting: &std::collections::HashSet<String>,
    ) -> Result<()> {
        let vms = self.list().await?;
        let config = self.config();
        // Every VM's files in one pass off the async workers.
        let all: Vec<VmPaths> = vms.iter().map(|vm| self.vm_paths(&vm.id)).collect();
        let found = blocking(move || {
            Ok(all
                .into_iter()
                .map(|p| {
                    let tmp = partial(&p);
                    let cut_short = tmp.exists();
                    if cut_short {
                        let _ = std::fs::remove_file(&tmp);
                        let _ = std::fs::remove_file(p.dir.join("suspend.key.tmp"));
                    }
                    let complete = saved(&p);
                    (p, cut_short, complete)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        for (vm, (paths, cut_short, complete)) in vms.into_iter().zip(found) {
            if vm.state.has_process() {
                // A resume cut short after the state left the directory:
                // its VMM waits for a guest that never comes.
                if starting.contains(&vm.id)
                    && let Ok(vmm) = vmm_named(&config, vm.vmm)
                    && vmm.awaits_state(&paths).await
                {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "a resume was cut short; stopping its vmm");
                    self.halt(&vm.id).await;
                    if vm.suspended != complete {
                        self.modify(&vm.id, move |v| v.suspended = complete).await?;
                    }
                    continue;
                }
                if complete {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "finishing a suspend an earlier run left: stopping its paused vmm");
                    self.modify(&vm.id, |v| v.suspended = true).await?;
                    self.halt(&vm.id).await;
                    continue;
                }
                if cut_short && let Ok(vmm) = vmm_named(&config, vm.vmm) {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "a suspend was cut short; letting the guest run again");
                    let _ = vmm.resume(&paths).await;
                }
            }
            if vm.suspended != complete {
                self.modify(&vm.id, move |v| v.suspended = complete).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> VmPaths {
        let p = VmPaths::new(dir, dir, "abc");
        std::fs::create_dir_all(&p.dir).expect("dir");
        p
    }

    /// A committed state is taken once, and only under its own key.
    #[test]
    fn a_saved_state_is_taken_once_and_only_under_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        std::fs::write(partial(&p), b"guest").expect("write");
        assert!(!saved(&p), "a partial state is not a saved one");
        commit(&p, "key-1").expect("commit");
        assert!(saved(&p));
        assert!(!partial(&p).exists());
        let why = take_state(&p, "key-2").expect_err("another key");
        assert!(why.contains("another VMM"), "{why}");
        assert!(saved(&p), "a refused state stays");
        let (fd, origin) = take_state(&p, "key-1").expect("taken");
        assert_eq!(origin, None, "its own");
        assert!(!saved(&p), "taken out of the directory");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).expect("read");
        assert_eq!(text, "guest");
        assert!(take_state(&p, "key-1").is_err(), "loaded once");
    }

    /// Another VM's state, adopted, names where it came from.
    #[test]
    fn an_adopted_state_names_its_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let state = dir.path().join("source.state");
        std::fs::write(&state, b"source guest").expect("write");
        adopt_state(&p, &state, "key-1", "0123456789abcdef").expect("adopted");
        assert!(saved(&p));
        let (fd, origin) = take_state(&p, "key-1").expect("taken");
        assert_eq!(origin.as_deref(), Some("0123456789abcdef"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).expect("read");
        assert_eq!(text, "source guest");
        assert!(state.exists(), "the source's file stays its own");
    }

    #[test]
    fn removing_a_state_removes_every_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        std::fs::write(partial(&p), b"guest").expect("write");
        commit(&p, "k").expect("commit");
        std::fs::write(partial(&p), b"again").expect("write");
        remove_state(&p).expect("removed");
        assert!(!saved(&p) && !partial(&p).exists());
        remove_state(&p).expect("nothing to remove is fine");
    }
}
