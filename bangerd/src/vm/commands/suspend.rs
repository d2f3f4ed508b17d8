//! Suspend and resume: a running VM's memory and device state written to
//! its directory (`vm suspend`) and its VMM ended; its next start loads
//! that state into a new VMM instead of booting ([`Vms::boot`]).
//!
//! The saved state is in the VM's directory: the state itself
//! ([`VmPaths::suspend_state`]), for a VMM that keeps it apart the memory
//! ([`VmPaths::suspend_memory`], Firecracker), each written under a
//! partial name and renamed when complete, and the key it was saved under
//! ([`VmPaths::suspend_key`]). A state being loaded has a name of its own
//! ([`StateFiles::loading`]) until the VMM has it: it is loaded once.
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
use crate::vm::vmm::{Accel, LaunchSpec, Saved, StateFds, Vmm};
use crate::vm::{Vm, VmEvent, VmPaths, VmState};

/// Bumped when banger changes the devices it gives a VMM: a state saved
/// under another layout is not loaded.
const DEVICE_LAYOUT: u32 = 2;

/// The files of one saved state: the state, and the memory where the
/// VMM keeps it apart (absent otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StateFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl StateFiles {
    /// The VM's saved state.
    pub fn saved(paths: &VmPaths) -> Self {
        Self {
            state: paths.suspend_state.clone(),
            memory: paths.suspend_memory.clone(),
        }
    }

    /// The state while it is being written.
    pub fn partial(paths: &VmPaths) -> Self {
        Self {
            state: paths.dir.join("suspend.tmp"),
            memory: paths.dir.join("suspend.mem.tmp"),
        }
    }

    /// The state while a VMM loads it.
    fn loading(paths: &VmPaths) -> Self {
        Self {
            state: paths.dir.join("suspend.loading"),
            memory: paths.dir.join("suspend.mem.loading"),
        }
    }

    fn both(&self) -> [&PathBuf; 2] {
        [&self.state, &self.memory]
    }

    /// Remove the files that are there.
    pub fn remove(&self) -> std::io::Result<()> {
        self.both().into_iter().try_for_each(|f| remove_if_there(f))
    }

    /// Bytes in the files that are there.
    pub fn bytes(&self) -> std::io::Result<u64> {
        let mut n = std::fs::metadata(&self.state)?.len();
        if let Ok(m) = std::fs::metadata(&self.memory) {
            n += m.len();
        }
        Ok(n)
    }
}

/// Save the guest of `vmm` into [`StateFiles::partial`] (made here,
/// 0600), removed again when the save fails.
pub(super) async fn save_partial(vmm: &dyn Vmm, paths: &VmPaths) -> Result<Saved> {
    let tmp = StateFiles::partial(paths);
    let (t, apart) = (tmp.clone(), vmm.memory_apart());
    let fds = blocking(move || {
        let create = |path: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map(OwnedFd::from)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", path.display())))
        };
        let _ = t.remove();
        Ok(StateFds {
            state: create(&t.state)?,
            memory: if apart {
                Some(create(&t.memory)?)
            } else {
                None
            },
        })
    })
    .await;
    let saved = match fds {
        Ok(fds) => vmm.save(paths, fds).await,
        Err(e) => Err(e),
    };
    if saved.is_err() {
        let _ = blocking(move || Ok(tmp.remove())).await;
    }
    saved
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

/// Remove a VM's saved state, complete, partial or being loaded.
fn remove_state(paths: &VmPaths) -> std::io::Result<()> {
    remove_state_but_loading(paths)?;
    loaded(paths)
}

/// Make the state written to [`StateFiles::partial`] the VM's saved
/// state, under `key`: the key first, then the memory (if apart) and last
/// the state renamed into place, each synced.
pub(super) fn commit(paths: &VmPaths, key: &str) -> std::io::Result<()> {
    let (tmp, to) = (StateFiles::partial(paths), StateFiles::saved(paths));
    let apart = tmp.memory.exists();
    if apart {
        std::fs::File::open(&tmp.memory)?.sync_all()?;
    }
    std::fs::File::open(&tmp.state)?.sync_all()?;
    write_key(paths, key)?;
    if apart {
        std::fs::rename(&tmp.memory, &to.memory)?;
    } else {
        // Left by a VMM that kept it apart.
        let _ = std::fs::remove_file(&to.memory);
    }
    std::fs::rename(&tmp.state, &to.state)?;
    std::fs::File::open(&paths.dir)?.sync_all()
}

/// Give the VM at `paths` the state `from` (another VM's, `origin`,
/// saved under `key`) as its own saved state: hard links (copies where
/// links cannot be made), so that its next start loads that guest and
/// renews its identity.
pub(super) fn adopt_state(
    paths: &VmPaths,
    from: &StateFiles,
    key: &str,
    origin: &str,
) -> std::io::Result<()> {
    write_key(paths, &format!("{key}\n{origin}"))?;
    let (tmp, to) = (StateFiles::partial(paths), StateFiles::saved(paths));
    // The memory first (when apart): the state's arrival makes the whole.
    let apart = from.memory.exists();
    let memory = apart.then_some((&from.memory, &tmp.memory, &to.memory));
    let state = (&from.state, &tmp.state, &to.state);
    for (src, tmp, dst) in memory.into_iter().chain([state]) {
        if std::fs::hard_link(src, dst).is_err() {
            std::fs::copy(src, tmp)?;
            std::fs::File::open(tmp)?.sync_all()?;
            std::fs::rename(tmp, dst)?;
        }
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

/// Take the saved state out of the VM's directory if it was saved under
/// `key` (renamed to [`StateFiles::loading`], which
/// [`loaded`] removes), and open it: a state is loaded once. The error
/// says why it cannot be loaded.
pub(super) fn take_state(
    paths: &VmPaths,
    key: &str,
) -> std::result::Result<(StateFds, Option<String>), String> {
    let (kept, origin) = read_key(paths).map_err(|e| format!("its key cannot be read: {e}"))?;
    if kept != key {
        return Err(
            "it was saved under another VMM, accelerator, kernel or machine shape".to_owned(),
        );
    }
    let (saved, loading) = (StateFiles::saved(paths), StateFiles::loading(paths));
    let apart = saved.memory.exists();
    let taken = (|| {
        if apart {
            std::fs::rename(&saved.memory, &loading.memory)?;
        }
        std::fs::rename(&saved.state, &loading.state)
    })();
    let opened = taken.and_then(|()| {
        Ok(StateFds {
            state: std::fs::File::open(&loading.state)?.into(),
            memory: if apart {
                Some(std::fs::File::open(&loading.memory)?.into())
            } else {
                None
            },
        })
    });
    let removed = remove_state_but_loading(paths);
    let fds = opened.map_err(|e| format!("it cannot be opened: {e}"))?;
    removed.map_err(|e| format!("it cannot be taken: {e}"))?;
    Ok((fds, origin))
}

/// [`remove_state`], leaving the files being loaded.
fn remove_state_but_loading(paths: &VmPaths) -> std::io::Result<()> {
    StateFiles::saved(paths).remove()?;
    remove_if_there(&paths.suspend_key)?;
    StateFiles::partial(paths).remove()
}

/// Remove `file`; one that is not there is fine.
fn remove_if_there(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The VMM has the state [`take_state`] took (or failed to load it).
pub(super) fn loaded(paths: &VmPaths) -> std::io::Result<()> {
    StateFiles::loading(paths).remove()
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
            .and_then(|()| StateFiles::saved(&p).bytes());
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
        // A VMM that cannot be asked (Firecracker) is killed at once.
        let asked = match vmm.quit(&paths).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(banger_vm_id = %id, "cannot ask the vmm to quit: {e}");
                false
            }
        };
        if !asked
            || !self
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
    /// with `spec` ([`LaunchSpec::incoming`] set). The state leaves the
    /// VM's directory first: whatever happens next, it is not loaded
    /// twice. Returns the id of the VM the state came from when that is
    /// another (a fork's source): the guest then needs its own identity.
    pub(super) async fn restore_state(
        &self,
        vm: &Vm,
        vmm: &dyn Vmm,
        spec: &LaunchSpec,
        key: String,
    ) -> Result<Option<String>> {
        let p = spec.paths.clone();
        let taken = blocking(move || {
            take_state(&p, &key)
                .map_err(|why| Error::failed(format!("the saved memory cannot be loaded: {why}")))
        })
        .await;
        self.modify(&vm.id, |v| v.suspended = false).await?;
        let (fds, origin) = taken?;
        let restored = vmm.restore(spec, fds).await;
        let p = spec.paths.clone();
        let _ = blocking(move || Ok(loaded(&p))).await;
        restored?;
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
                    let tmp = StateFiles::partial(&p);
                    let cut_short = tmp.state.exists() || tmp.memory.exists();
                    if cut_short {
                        let _ = tmp.remove();
                        let _ = std::fs::remove_file(p.dir.join("suspend.key.tmp"));
                    }
                    // A load cut short: the state was taken.
                    let _ = loaded(&p);
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

    fn read(fd: OwnedFd) -> String {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).expect("read");
        text
    }

    /// A committed state is taken once, and only under its own key; the
    /// files being loaded go when the VMM has them.
    #[test]
    fn a_saved_state_is_taken_once_and_only_under_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let tmp = StateFiles::partial(&p);
        std::fs::write(&tmp.state, b"guest").expect("write");
        assert!(!saved(&p), "a partial state is not a saved one");
        commit(&p, "key-1").expect("commit");
        assert!(saved(&p));
        assert!(!tmp.state.exists());
        assert!(!p.suspend_memory.exists(), "no memory apart");
        let why = take_state(&p, "key-2").expect_err("another key");
        assert!(why.contains("another VMM"), "{why}");
        assert!(saved(&p), "a refused state stays");
        let (fds, origin) = take_state(&p, "key-1").expect("taken");
        assert_eq!(origin, None, "its own");
        assert!(!saved(&p), "taken out of the directory");
        assert!(fds.memory.is_none());
        assert_eq!(read(fds.state), "guest");
        assert!(take_state(&p, "key-1").is_err(), "loaded once");
        assert!(StateFiles::loading(&p).state.exists());
        loaded(&p).expect("loaded");
        assert_eq!(
            std::fs::read_dir(&p.dir).expect("ls").count(),
            0,
            "nothing left"
        );
    }

    /// A state whose memory is apart (Firecracker) is committed, taken
    /// and removed as one: the memory is in place before the state.
    #[test]
    fn a_state_with_its_memory_apart_moves_as_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let tmp = StateFiles::partial(&p);
        std::fs::write(&tmp.state, b"devices").expect("write");
        std::fs::write(&tmp.memory, b"memory").expect("write");
        commit(&p, "key-1").expect("commit");
        assert!(!tmp.state.exists() && !tmp.memory.exists());
        assert_eq!(StateFiles::saved(&p).bytes().expect("bytes"), 13);

        let other = paths(&dir.path().join("other"));
        adopt_state(&other, &StateFiles::saved(&p), "key-1", "abc").expect("adopted");
        let (fds, origin) = take_state(&other, "key-1").expect("taken");
        assert_eq!(origin.as_deref(), Some("abc"));
        assert_eq!(read(fds.state), "devices");
        assert_eq!(read(fds.memory.expect("memory")), "memory");
        loaded(&other).expect("loaded");
        assert_eq!(std::fs::read_dir(&other.dir).expect("ls").count(), 0);

        // Committed again without memory apart (another VMM): the old
        // memory goes.
        std::fs::write(&tmp.state, b"qemu").expect("write");
        commit(&p, "key-2").expect("commit");
        assert!(!p.suspend_memory.exists());
        std::fs::write(&p.suspend_memory, b"stale").expect("write");
        remove_state(&p).expect("removed");
        assert!(!p.suspend_memory.exists() && !saved(&p));
    }

    /// Another VM's state, adopted, names where it came from.
    #[test]
    fn an_adopted_state_names_its_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let state = dir.path().join("source.state");
        std::fs::write(&state, b"source guest").expect("write");
        let from = StateFiles {
            state: state.clone(),
            memory: dir.path().join("source.mem"),
        };
        adopt_state(&p, &from, "key-1", "0123456789abcdef").expect("adopted");
        assert!(saved(&p));
        let (fds, origin) = take_state(&p, "key-1").expect("taken");
        assert_eq!(origin.as_deref(), Some("0123456789abcdef"));
        assert_eq!(read(fds.state), "source guest");
        assert!(state.exists(), "the source's file stays its own");
    }

    #[test]
    fn removing_a_state_removes_every_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let tmp = StateFiles::partial(&p);
        std::fs::write(&tmp.state, b"guest").expect("write");
        commit(&p, "k").expect("commit");
        std::fs::write(&tmp.state, b"again").expect("write");
        std::fs::write(&tmp.memory, b"again").expect("write");
        std::fs::write(StateFiles::loading(&p).memory, b"loading").expect("write");
        remove_state(&p).expect("removed");
        assert!(!saved(&p) && !tmp.state.exists() && !tmp.memory.exists());
        assert_eq!(std::fs::read_dir(&p.dir).expect("ls").count(), 0);
        remove_state(&p).expect("nothing to remove is fine");
    }
}
