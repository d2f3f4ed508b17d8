//! Firecracker's snapshots. It writes and reads a snapshot's two files
//! (device state and memory) by path, where QEMU takes a descriptor: the
//! files bangerd opened are linked where Firecracker looks (its chroot
//! when jailed, the VM's own directory otherwise) for the one request
//! that needs them, and unlinked after it.
//!
//! The links go through `/proc/self/fd`, so no path a VM user controls
//! is opened: the chroot is opened once without following a link, and
//! the names are made in it with `linkat` and removed with `unlinkat`.
//! A jailed Firecracker runs as the VM's uid: a file it writes is handed
//! to that uid for the write and back to root after it; a file it reads
//! is root's and readable to [`crate::jail::VMM_GROUP`] (a template's
//! state is read by many VMs, each its own uid).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag};
use nix::sys::stat::{Mode, fchmod, fstat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, linkat, unlinkat};

use crate::jail::VMM_GROUP;
use crate::jailer::inside;

/// The directory the files are linked into, and the names Firecracker
/// is given for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Site {
    /// The chroot, or the VM's directory.
    pub dir: PathBuf,
    /// Whether `dir` is a chroot (the VM user's).
    pub jailed: bool,
}

/// The file names in the site's directory: state, memory.
const HOST_NAMES: [&str; 2] = ["firecracker.state", "firecracker.mem"];

impl Site {
    fn names(&self) -> [&'static str; 2] {
        if self.jailed {
            [
                inside::STATE.trim_start_matches('/'),
                inside::MEMORY.trim_start_matches('/'),
            ]
        } else {
            HOST_NAMES
        }
    }

    /// How Firecracker names the state and the memory file.
    pub fn seen(&self) -> [String; 2] {
        if self.jailed {
            [inside::STATE.into(), inside::MEMORY.into()]
        } else {
            HOST_NAMES.map(|n| super::path(&self.dir.join(n)))
        }
    }
}

/// What Firecracker does with the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// `/snapshot/create` writes them.
    Write,
    /// `/snapshot/load` reads them.
    Read,
}

/// The files linked in a site, until [`Placed::remove`].
#[derive(Debug)]
pub(super) struct Placed {
    dir: OwnedFd,
    names: [&'static str; 2],
    files: [OwnedFd; 2],
    use_: Use,
    jailed: bool,
}

/// Link `files` (state, memory) into `site` for `use_`, owned so that
/// Firecracker may do it. A few syscalls: call it off the async workers.
pub(super) fn place(site: &Site, files: [OwnedFd; 2], use_: Use) -> std::io::Result<Placed> {
    let dir = nix::fcntl::open(
        &site.dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_path(e, &site.dir))?;
    if site.jailed {
        // The chroot's owner is the VM's uid (the jailer made it so).
        let uid = fstat(&dir)?.st_uid;
        for file in &files {
            match use_ {
                Use::Write => fchown(
                    file,
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(VMM_GROUP)),
                )?,
                Use::Read => {
                    fchown(file, Some(Uid::from_raw(0)), Some(Gid::from_raw(VMM_GROUP)))?;
                    fchmod(file, Mode::from_bits_truncate(0o640))?;
                }
            }
        }
    }
    let placed = Placed {
        dir,
        names: site.names(),
        files,
        use_,
        jailed: site.jailed,
    };
    for (name, file) in placed.names.iter().zip(&placed.files) {
        unlink(&placed.dir, name)?;
        linkat(
            AT_FDCWD,
            format!("/proc/self/fd/{}", file.as_raw_fd()).as_str(),
            &placed.dir,
            *name,
            AtFlags::AT_SYMLINK_FOLLOW,
        )?;
    }
    Ok(placed)
}

impl Placed {
    /// Unlink the files from the site; a file Firecracker wrote is
    /// root's again. Off the async workers, as [`place`].
    pub fn remove(self) -> std::io::Result<()> {
        for name in self.names {
            unlink(&self.dir, name)?;
        }
        if self.jailed && self.use_ == Use::Write {
            for file in &self.files {
                fchown(file, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))?;
            }
        }
        Ok(())
    }
}

fn unlink(dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn with_path(e: Errno, path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::Error::from(e).kind(),
        format!("{}: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dup(state: &OwnedFd, memory: &OwnedFd) -> [OwnedFd; 2] {
        [state, memory].map(|f| f.try_clone().expect("dup"))
    }

    fn file(path: &Path, data: &[u8]) -> OwnedFd {
        let fd = super::super::tests::state_file(path);
        std::fs::write(path, data).expect("data");
        fd
    }

    /// In a chroot: the links are the files, owned by the chroot's uid
    /// while written and root's after; read, they are root's and
    /// readable to the VMM group. A link the VM user left in a name's
    /// place is replaced, not followed.
    #[test]
    fn files_are_linked_into_a_chroot_and_handed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        const UID: u32 = VMM_GROUP + 9;
        std::os::unix::fs::chown(&root, Some(UID), Some(VMM_GROUP)).expect("chown");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "host file").expect("outside");
        std::os::unix::fs::symlink(&outside, root.join("snapshot.state")).expect("symlink");
        let state = file(&dir.path().join("suspend.tmp"), b"");
        let memory = file(&dir.path().join("suspend.mem.tmp"), b"");
        let site = Site {
            dir: root.clone(),
            jailed: true,
        };
        assert_eq!(site.seen(), ["/snapshot.state", "/snapshot.mem"]);
        let placed = place(&site, dup(&state, &memory), Use::Write).expect("placed");
        for (name, fd) in [("snapshot.state", &state), ("snapshot.mem", &memory)] {
            let linked = std::fs::symlink_metadata(root.join(name)).expect(name);
            let own = fstat(fd).expect("fstat");
            assert_eq!(linked.ino(), own.st_ino, "{name} is the file");
            assert_eq!((linked.uid(), linked.gid()), (UID, VMM_GROUP));
        }
        std::fs::write(root.join("snapshot.mem"), "guest memory").expect("written");
        placed.remove().expect("removed");
        assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 0);
        assert_eq!(
            std::fs::read_to_string(&outside).expect("outside"),
            "host file"
        );
        let m = std::fs::metadata(dir.path().join("suspend.mem.tmp")).expect("meta");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 0, 0o600));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("suspend.mem.tmp")).expect("read"),
            "guest memory"
        );

        let placed = place(&site, dup(&state, &memory), Use::Read).expect("placed");
        let m = std::fs::metadata(root.join("snapshot.mem")).expect("meta");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, VMM_GROUP, 0o640));
        placed.remove().expect("removed");
        assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 0);

        // A chroot that is a link is not entered.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&root, &link).expect("symlink");
        let linked = Site {
            dir: link,
            jailed: true,
        };
        assert!(place(&linked, dup(&state, &memory), Use::Write).is_err());
    }

    /// Unjailed: the files are linked in the VM's directory under host
    /// names, and their owner stays root.
    #[test]
    fn files_are_linked_into_the_vm_directory_unjailed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = file(&dir.path().join("suspend.state"), b"state");
        let memory = file(&dir.path().join("suspend.mem"), b"memory");
        let site = Site {
            dir: dir.path().to_owned(),
            jailed: false,
        };
        let [s, m] = site.seen();
        let placed = place(&site, dup(&state, &memory), Use::Read).expect("placed");
        assert_eq!(std::fs::read_to_string(&s).expect("state"), "state");
        assert_eq!(std::fs::read_to_string(&m).expect("memory"), "memory");
        let meta = std::fs::metadata(&m).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        placed.remove().expect("removed");
        assert!(!Path::new(&s).exists() && !Path::new(&m).exists());
    }
}
