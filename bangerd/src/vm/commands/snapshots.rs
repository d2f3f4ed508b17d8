//! Disk snapshots of stopped VMs (`VM.Snapshot`, `VM.Restore`,
//! `VM.DeleteSnapshot`): copies of a VM's system disk (or its dm change
//! store) and work disk kept in `snapshots/<name>/` of the VM's
//! directory, made by the method create uses (reflink, else sparse copy).
//! Not to be confused with `vm/snapshot.rs`, the dm snapshot a system
//! disk may be.
//!
//! A restore copies the snapshot's files beside the VM's disks, marks
//! the copies complete (`restore.ready`), then renames them over the
//! disks. A bangerd that dies on the way finishes the renames at its next
//! start when the mark is there and drops the copies when it is not, so
//! a VM never boots one disk restored and the other not. A snapshot is
//! made in a hidden directory and renamed to its name when whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::{Vms, blocking};
use crate::artifacts::validate;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobContext, JobId, Resource};
use crate::store::unix_us;
use crate::vm::disk::{self, DiskMethod};
use crate::vm::{Vm, VmPaths, VmState};

/// Where a VM's snapshots live, in its directory.
const DIR: &str = "snapshots";
/// The most snapshots one VM keeps.
pub const MAX_SNAPSHOTS: usize = 16;
/// In a snapshot: when it was made (microseconds since the epoch).
const CREATED: &str = "created";
/// Beside the disks: the restored copies are whole.
const READY: &str = "restore.ready";
/// The suffix of a disk's restored copy.
const PENDING: &str = "restore";
/// The prefix of a snapshot being made.
const PARTIAL: &str = ".partial-";

/// One disk snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// Its name (a DNS label).
    pub name: String,
    /// When it was made, microseconds since the epoch.
    pub created_at: i64,
    /// Bytes it takes on disk.
    pub bytes: u64,
}

/// The files a VM made by `method` keeps its disks in, in `paths.dir`
/// (system, work), by file name.
pub(super) fn disk_files(paths: &VmPaths, method: Option<DiskMethod>) -> [PathBuf; 2] {
    let system = if method == Some(DiskMethod::DeviceMapper) {
        paths.system_cow.clone()
    } else {
        paths.system_disk.clone()
    };
    [system, paths.work_disk.clone()]
}

fn file_name(path: &Path) -> &std::ffi::OsStr {
    path.file_name().unwrap_or_default()
}

fn pending(path: &Path) -> PathBuf {
    let mut name = file_name(path).to_owned();
    name.push(".");
    name.push(PENDING);
    path.with_file_name(name)
}

fn failed(doing: &str, path: &Path, e: std::io::Error) -> Error {
    Error::failed(format!("cannot {doing} {}: {e}", path.display()))
}

fn remove_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed("remove", path, e)),
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed("remove", path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| failed("sync", dir, e))
}

/// The snapshots in `dir` (a VM's `snapshots/`), oldest first.
pub fn list(dir: &Path) -> Vec<DiskSnapshot> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<DiskSnapshot> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') {
                return None;
            }
            let path = e.path();
            let created_at = std::fs::read_to_string(path.join(CREATED))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let bytes = std::fs::read_dir(&path)
                .map(|files| {
                    files
                        .flatten()
                        .map(|f| crate::artifacts::files::disk_usage(&f.path()))
                        .sum()
                })
                .unwrap_or(0);
            Some(DiskSnapshot {
                name,
                created_at,
                bytes,
            })
        })
        .collect();
    found.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    found
}

/// Copy `files` into the new directory `to`, then record when.
fn save(files: &[PathBuf], to: &Path, tick: &mut dyn FnMut(usize) -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| failed("create", to, e))?;
    for (i, file) in files.iter().enumerate() {
        tick(i)?;
        disk::copy_disk(file, &to.join(file_name(file)))?;
    }
    let created = to.join(CREATED);
    std::fs::write(&created, unix_us(SystemTime::now()).to_string())
        .map_err(|e| failed("write", &created, e))?;
    sync_dir(to)
}

/// Copy the snapshot `from`'s copies of `files` beside them, then mark
/// the copies whole.
fn stage_restore(
    files: &[PathBuf],
    from: &Path,
    dir: &Path,
    tick: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<()> {
    for (i, file) in files.iter().enumerate() {
        tick(i)?;
        let copy = pending(file);
        remove_file(&copy)?;
        disk::copy_disk(&from.join(file_name(file)), &copy)?;
        std::fs::File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(|e| failed("sync", &copy, e))?;
    }
    let ready = dir.join(READY);
    std::fs::File::create(&ready).map_err(|e| failed("create", &ready, e))?;
    sync_dir(dir)
}

/// Finish or drop a restore in `dir` of disks `files`: with the mark,
/// rename every copy still there over its disk; without, remove the
/// copies. Also removes snapshots that were never finished.
pub fn settle(dir: &Path, files: &[PathBuf]) -> Result<()> {
    let ready = dir.join(READY);
    if ready.exists() {
        for file in files {
            let copy = pending(file);
            if copy.exists() {
                std::fs::rename(&copy, file).map_err(|e| failed("restore", file, e))?;
            }
        }
        sync_dir(dir)?;
        remove_file(&ready)?;
    } else {
        for file in files {
            remove_file(&pending(file))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir.join(DIR)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(PARTIAL) {
                remove_all(&e.path())?;
            }
        }
    }
    Ok(())
}

impl Vms {
    /// VM `vm`'s disk files ([`disk_files`]), once the state directory
    /// has room for another copy of them.
    pub(super) fn disks_with_room_for_a_copy(&self, vm: &Vm) -> Result<[PathBuf; 2]> {
        let files = disk_files(&self.vm_paths(&vm.id), vm.disk_method);
        let needed = files
            .iter()
            .map(|f| crate::artifacts::files::disk_usage(f))
            .sum();
        crate::space::check_space(&self.dirs.state, needed)?;
        Ok(files)
    }

    fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.vm_paths(id).dir.join(DIR)
    }

    /// The disk snapshots of VM `id`, oldest first.
    pub async fn snapshots(&self, id: &str) -> Vec<DiskSnapshot> {
        let dir = self.snapshots_dir(id);
        blocking(move || Ok(list(&dir))).await.unwrap_or_default()
    }

    /// Finish or drop what an earlier run left of restores and snapshots
    /// of the stopped VMs `vms` (at start), in one pass on the blocking
    /// pool.
    pub(super) async fn settle_disks(&self, vms: &[Vm]) {
        let work: Vec<(String, PathBuf, [PathBuf; 2])> = vms
            .iter()
            .map(|vm| {
                let paths = self.vm_paths(&vm.id);
                let files = disk_files(&paths, vm.disk_method);
                (vm.id.clone(), paths.dir, files)
            })
            .collect();
        let _ = blocking(move || {
            for (id, dir, files) in work {
                if let Err(e) = settle(&dir, &files) {
                    tracing::error!(banger_vm_id = %id, "cannot settle an interrupted restore: {e}");
                }
            }
            Ok(())
        })
        .await;
    }

    /// The stopped VM `id`, checked and held for a snapshot operation.
    async fn stopped_for(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        doing: &str,
    ) -> Result<(Vm, super::Claim)> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        let claim = self.claim_vm(&vm)?;
        if vm.state != VmState::Stopped {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is {}: {doing} a stopped VM's disks only; stop it first (banger vm stop {})",
                    vm.name,
                    vm.state.as_str(),
                    vm.name
                ),
            ));
        }
        Ok((vm, claim))
    }

    /// Start a job that keeps a copy of the stopped VM `id`'s disks as
    /// snapshot `name`.
    pub async fn snapshot_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        name: String,
    ) -> Result<JobId> {
        validate::name("snapshot", &name)?;
        let (vm, claim) = self.stopped_for(caller, id, "a snapshot keeps").await?;
        let existing = self.snapshots(&vm.id).await;
        if existing.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "vm {} has a snapshot {name} already; pick another name or delete it (banger vm snapshot delete {} {name})",
                    vm.name, vm.name
                ),
            ));
        }
        if existing.len() >= MAX_SNAPSHOTS {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "vm {} has {MAX_SNAPSHOTS} snapshots, the most it keeps; delete one first",
                    vm.name
                ),
            ));
        }
        let files = self.disks_with_room_for_a_copy(&vm)?;
        let core = self.clone();
        self.jobs()
            .start_cooperative(
                "snapshot-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    let dir = core.snapshots_dir(&vm.id);
                    let partial = dir.join(format!("{PARTIAL}{name}"));
                    let made = core.copy_files(&ctx, files, &partial, save).await;
                    let made = match made {
                        Ok(()) => {
                            let (from, to) = (partial.clone(), dir.join(&name));
                            blocking(move || {
                                std::fs::rename(&from, &to).map_err(|e| failed("name", &to, e))?;
                                sync_dir(to.parent().unwrap_or(&to))
                            })
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = made {
                        let _ = blocking(move || remove_all(&partial)).await;
                        return Err(e);
                    }
                    tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, snapshot = %name, "snapshot made");
                    core.announce(&vm.id);
                    Ok(Some(Resource::Vm(vm.id.clone())))
                },
            )
            .await
    }

    /// Start a job that puts the stopped VM `id`'s disks back as they
    /// were in snapshot `name` (which stays).
    pub async fn restore_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        name: String,
    ) -> Result<JobId> {
        validate::name("snapshot", &name)?;
        let (vm, claim) = self.stopped_for(caller, id, "a restore replaces").await?;
        self.snapshot_named(&vm, &name).await?;
        let files = self.disks_with_room_for_a_copy(&vm)?;
        let paths = self.vm_paths(&vm.id);
        let core = self.clone();
        let tools = self.tools.clone();
        self.jobs()
            .start_cooperative(
                "restore-vm",
                caller.uid,
                Action::VmManage,
                move |ctx| async move {
                    let _claim = claim;
                    // Saved memory does not fit disks put back.
                    if vm.suspended {
                        core.drop_suspend(&vm.id).await?;
                    }
                    let from = core.snapshots_dir(&vm.id).join(&name);
                    let dir = paths.dir.clone();
                    let staged = core
                        .copy_files(&ctx, files.clone(), &from, move |files, from, tick| {
                            stage_restore(files, from, &dir, tick)
                        })
                        .await;
                    let (dir, work, bytes) = (paths.dir.clone(), paths.work_disk.clone(), vm.disk_bytes);
                    let done = match staged {
                        // Past the mark the restore finishes, whatever comes.
                        Ok(()) => blocking(move || {
                            settle(&dir, &files)?;
                            // A work disk grown since keeps its size.
                            disk::grow_ext4(&*tools, &work, bytes.max(disk_len(&work)?))
                        })
                        .await,
                        Err(e) => {
                            let _ = blocking(move || settle(&dir, &files)).await;
                            Err(e)
                        }
                    };
                    done?;
                    tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, snapshot = %name, "disks restored");
                    core.announce(&vm.id);
                    Ok(Some(Resource::Vm(vm.id.clone())))
                },
            )
            .await
    }

    /// Delete snapshot `name` of VM `id` (in any state).
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        name: &str,
    ) -> Result<()> {
        validate::name("snapshot", name)?;
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        // Not while a restore reads it.
        let _claim = self.claim_vm(&vm)?;
        self.snapshot_named(&vm, name).await?;
        let dir = self.snapshots_dir(&vm.id).join(name);
        blocking(move || remove_all(&dir)).await?;
        self.announce(&vm.id);
        Ok(())
    }

    async fn snapshot_named(&self, vm: &Vm, name: &str) -> Result<()> {
        if self.snapshots(&vm.id).await.iter().any(|s| s.name == name) {
            return Ok(());
        }
        Err(Error::not_found(format!(
            "vm {} has no snapshot {name}; see banger vm snapshot list {}",
            vm.name, vm.name
        )))
    }

    /// Run `copy(files, dir, tick)` on the blocking pool with a stage per
    /// file (system disk, work disk); a cancelled job stops between files.
    async fn copy_files(
        &self,
        ctx: &JobContext,
        files: [PathBuf; 2],
        dir: &Path,
        copy: impl FnOnce(&[PathBuf], &Path, &mut dyn FnMut(usize) -> Result<()>) -> Result<()>
        + Send
        + 'static,
    ) -> Result<()> {
        const STAGES: [&str; 2] = ["system disk", "work disk"];
        ctx.stage(STAGES[0], 0.0).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let dir = dir.to_owned();
        let token = ctx.token().clone();
        let work = blocking(move || {
            copy(&files, &dir, &mut |i| {
                if token.is_cancelled() {
                    return Err(Error::cancelled("cancelled"));
                }
                let _ = tx.send(i);
                Ok(())
            })
        });
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                Some(i) = rx.recv() => {
                    if i > 0 {
                        ctx.stage(STAGES[i.min(1)], 0.5).await?;
                    }
                }
            }
        }
    }
}

fn disk_len(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| failed("read", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(dir: &Path) -> [PathBuf; 2] {
        [dir.join("system.ext4"), dir.join("work.ext4")]
    }

    #[test]
    fn a_snapshot_is_listed_with_its_time_and_size() {
        let dir = tempfile::tempdir().expect("test step");
        let files = disks(dir.path());
        std::fs::write(&files[0], vec![1u8; 8192]).expect("test step");
        std::fs::write(&files[1], vec![2u8; 4096]).expect("test step");
        let snaps = dir.path().join(DIR);
        save(&files, &snaps.join("one"), &mut |_| Ok(())).expect("test step");
        save(
            &files,
            &snaps.join(format!("{PARTIAL}two")),
            &mut |_| Ok(()),
        )
        .expect("test step");
        let listed = list(&snaps);
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name, "one");
        assert!(listed[0].bytes >= 12288, "{listed:?}");
        assert!(listed[0].created_at > 0);
        // A snapshot never finished is gone after settling.
        settle(dir.path(), &files).expect("test step");
        assert!(!snaps.join(format!("{PARTIAL}two")).exists());
        assert!(snaps.join("one").exists());
    }

    #[test]
    fn a_restore_cut_short_finishes_only_when_its_copies_were_whole() {
        let dir = tempfile::tempdir().expect("test step");
        let files = disks(dir.path());
        std::fs::write(&files[0], b"system old").expect("test step");
        std::fs::write(&files[1], b"work old").expect("test step");
        let snap = dir.path().join(DIR).join("s");
        save(&files, &snap, &mut |_| Ok(())).expect("test step");
        std::fs::write(&files[0], b"system new").expect("test step");
        std::fs::write(&files[1], b"work new").expect("test step");

        // Cut short before the mark: the copies are dropped.
        let mut once = 0;
        let cut = stage_restore(&files, &snap, dir.path(), &mut |i| {
            once += 1;
            if i == 1 {
                return Err(Error::failed("killed"));
            }
            Ok(())
        });
        assert!(cut.is_err() && once == 2);
        assert!(pending(&files[0]).exists());
        settle(dir.path(), &files).expect("test step");
        assert!(!pending(&files[0]).exists());
        assert_eq!(std::fs::read(&files[0]).expect("test step"), b"system new");

        // Marked, then cut between the two renames: the next start
        // finishes the second one.
        stage_restore(&files, &snap, dir.path(), &mut |_| Ok(())).expect("test step");
        std::fs::rename(pending(&files[0]), &files[0]).expect("test step");
        settle(dir.path(), &files).expect("test step");
        assert_eq!(std::fs::read(&files[0]).expect("test step"), b"system old");
        assert_eq!(std::fs::read(&files[1]).expect("test step"), b"work old");
        assert!(!dir.path().join(READY).exists());
        assert!(!pending(&files[1]).exists());
    }
}
