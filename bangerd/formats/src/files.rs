//! File work for kernels and images: sparse copies with progress, tree
//! copies, digests and work-seeds. Everything here blocks; callers run it
//! with `spawn_blocking`. Long loops call `tick` so a cancelled job stops
//! promptly.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use banger_error::{Error, Result};

use crate::tool::{Tool, Tools};

const CHUNK: usize = 1 << 20;

/// Called with the bytes done so far; an error stops the work.
pub type Tick<'a> = &'a mut dyn FnMut(u64) -> Result<()>;

fn io(context: &str, path: &Path, e: std::io::Error) -> Error {
    Error::failed(format!("{context} {}: {e}", path.display()))
}

/// Copy `src` to the new file `dst`, keeping holes: only the data regions
/// (found with SEEK_DATA/SEEK_HOLE) are read and written. Returns the
/// bytes of data copied.
pub fn sparse_copy(src: &Path, dst: &Path, tick: Tick<'_>) -> Result<u64> {
    let from = File::open(src).map_err(|e| io("cannot open", src, e))?;
    let len = from
        .metadata()
        .map_err(|e| io("cannot stat", src, e))?
        .len();
    sparse_copy_file(&from, &src.display().to_string(), len, dst, tick)
}

/// Copy the first `len` bytes of the open file `from` (called `what` in
/// errors) to the new file `dst`, keeping holes. Never reads past `len`,
/// however the file grows meanwhile; a file that shrinks leaves zeros.
/// Returns the bytes of data copied.
pub fn sparse_copy_file(
    from: &File,
    what: &str,
    len: u64,
    dst: &Path,
    tick: Tick<'_>,
) -> Result<u64> {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::FileExt;
    let failed = |doing: &str, e: &dyn std::fmt::Display| {
        Error::failed(format!("cannot {doing} {what}: {e}"))
    };
    let mut to = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| io("cannot create", dst, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut pos: i64 = 0;
    let end = i64::try_from(len).unwrap_or(i64::MAX);
    'regions: while pos < end {
        let data = match lseek(from.as_fd(), pos, Whence::SeekData) {
            Ok(p) => p.min(end),
            // ENXIO: no data after pos, the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(failed("seek", &e)),
        };
        let hole = lseek(from.as_fd(), data, Whence::SeekHole)
            .unwrap_or(end)
            .min(end);
        to.seek(SeekFrom::Start(data as u64))
            .map_err(|e| io("cannot seek", dst, e))?;
        let mut at = data as u64;
        while at < hole as u64 {
            let want = CHUNK.min((hole as u64 - at) as usize);
            let n = from
                .read_at(&mut buf[..want], at)
                .map_err(|e| failed("read", &e))?;
            if n == 0 {
                break 'regions;
            }
            to.write_all(&buf[..n])
                .map_err(|e| io("cannot write", dst, e))?;
            at += n as u64;
            done += n as u64;
            tick(done)?;
        }
        pos = hole;
    }
    to.set_len(len).map_err(|e| io("cannot size", dst, e))?;
    to.sync_all().map_err(|e| io("cannot flush", dst, e))?;
    Ok(done)
}

/// What a caller's descriptor holds, checked before any work: a regular
/// file (`fstat`) of at most `max` bytes, the cap set by config key
/// `key`. Returns its length.
pub fn checked_input(what: &str, file: &File, max: u64, key: &str) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::invalid(format!("{what}: cannot stat the descriptor: {e}")))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "{what} is not a regular file: pass a descriptor of a file opened for reading"
        )));
    }
    if meta.len() > max {
        return Err(Error::limit(format!(
            "{what} is {} bytes, more than {key} allows ({} bytes); an administrator can raise it in bangerd.toml",
            meta.len(),
            max
        )));
    }
    Ok(meta.len())
}

/// Up to `n` bytes from the start of `file` (fewer when it is shorter).
pub fn head(file: &File, n: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let read = file
            .read_at(&mut buf[got..], got as u64)
            .map_err(|e| Error::invalid(format!("cannot read the descriptor: {e}")))?;
        if read == 0 {
            break;
        }
        got += read;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Unpack the modules archive `from` (an uncompressed tar of a
/// `lib/modules/<version>` directory's contents, `len` bytes) into the new
/// directory `dst`. Only directories and regular files at plain relative
/// paths are written (mode 0755/0644); links, devices and the like are
/// skipped. Their sizes together may not pass `max` (config key `key`).
/// Returns the bytes of file data written.
pub fn unpack_modules(
    from: &File,
    len: u64,
    dst: &Path,
    max: u64,
    key: &str,
    tick: Tick<'_>,
) -> Result<u64> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let bad = |why: String| Error::invalid(format!("the modules archive {why}"));
    std::fs::create_dir(dst).map_err(|e| io("cannot create", dst, e))?;
    let reader = std::io::BufReader::new(PositionedReader {
        file: from,
        at: 0,
        end: len,
    });
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("is not a tar archive ({e})")))?;
    let mut done = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("cannot be read ({e})")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("has an unreadable path ({e})")))?
            .into_owned();
        let Some(relative) = crate::bundle::checked_path(&path) else {
            return Err(bad(format!(
                "has {}, which is not a plain relative path",
                path.display()
            )));
        };
        if relative.as_os_str().is_empty() {
            continue; // "./"
        }
        let target = dst.join(&relative);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&target)
                .map_err(|e| io("cannot create", &target, e))?;
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        done = done.saturating_add(size);
        if done > max {
            return Err(Error::limit(format!(
                "the modules archive holds more than {key} allows ({max} bytes of files); an administrator can raise it in bangerd.toml"
            )));
        }
        if let Some(parent) = target.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| io("cannot create", parent, e))?;
        }
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&target)
            .map_err(|e| io("cannot create", &target, e))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad(format!("is cut short at {} ({e})", path.display())))?;
        tick(done)?;
    }
    Ok(done)
}

/// Reads `file` from `at` to `end` with `pread`, leaving the descriptor's
/// offset (shared with the caller) alone.
struct PositionedReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = self.end.saturating_sub(self.at);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Copy the directory tree `src` to the new directory `dst`: directories,
/// regular files and symlinks (as links); anything else is skipped.
/// Returns the bytes of file data copied.
pub fn copy_tree(src: &Path, dst: &Path, tick: Tick<'_>) -> Result<u64> {
    let mut done = 0;
    copy_tree_inner(src, dst, &mut done, tick)?;
    Ok(done)
}

fn copy_tree_inner(src: &Path, dst: &Path, done: &mut u64, tick: Tick<'_>) -> Result<()> {
    // create_dir, not create_dir_all: if a cancelled job's directory was
    // removed under us, this fails instead of recreating it.
    std::fs::create_dir(dst).map_err(|e| io("cannot create", dst, e))?;
    let entries = std::fs::read_dir(src).map_err(|e| io("cannot list", src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot list", src, e))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ty = entry.file_type().map_err(|e| io("cannot stat", &from, e))?;
        if ty.is_dir() {
            copy_tree_inner(&from, &to, done, tick)?;
        } else if ty.is_symlink() {
            let target = std::fs::read_link(&from).map_err(|e| io("cannot read link", &from, e))?;
            std::os::unix::fs::symlink(&target, &to).map_err(|e| io("cannot link", &to, e))?;
        } else if ty.is_file() {
            let n = std::fs::copy(&from, &to).map_err(|e| io("cannot copy", &from, e))?;
            *done += n;
            tick(*done)?;
        }
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path, tick: Tick<'_>) -> Result<String> {
    let mut f = File::open(path).map_err(|e| io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    loop {
        let n = f.read(&mut buf).map_err(|e| io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        tick(done)?;
    }
    Ok(crate::hex(&hasher.finalize()))
}

/// Bytes of every regular file under `path` (or of `path` itself).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else if meta.is_file() {
        meta.len()
    } else {
        0
    }
}

/// The label of every work disk; guests mount it at /root.
pub const WORK_LABEL: &str = "banger-work";

/// Make a work-seed at `dst` (a new file) from the `/root` of the ext4
/// image `rootfs`, without mounting anything: `debugfs rdump` copies the
/// tree out (owners and modes kept), `mkfs.ext4 -d` builds the image, both
/// through `tools` (the image is a user's: bangerd sandboxes them). The
/// copy goes to a scratch directory beside `dst`, removed afterwards
/// whether or not the seed was made; so is `dst` when it was not.
pub fn make_work_seed(tools: &dyn Tools, rootfs: &Path, dst: &Path) -> Result<()> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let scratch = dst.with_file_name(format!(".{name}.scratch"));
    std::fs::create_dir(&scratch).map_err(|e| io("cannot create", &scratch, e))?;
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| io("cannot create", dst, e))
        .and_then(|_| {
            seed_from(tools, rootfs, &scratch, dst).inspect_err(|_| {
                let _ = std::fs::remove_file(dst);
            })
        });
    let removed = std::fs::remove_dir_all(&scratch).map_err(|e| io("cannot remove", &scratch, e));
    made.and(removed)
}

fn seed_from(tools: &dyn Tools, rootfs: &Path, scratch: &Path, dst: &Path) -> Result<()> {
    let tree = scratch.join("root");
    // debugfs exits 0 even when /root is missing; an empty seed is right then.
    // No file in the image is larger than the image (sparse ones would
    // be written out in full).
    let image_bytes = std::fs::metadata(rootfs)
        .map_err(|e| io("cannot stat", rootfs, e))?
        .len();
    tools.check(
        &Tool::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /root {}", scratch.display()))
            .reads(rootfs)
            .read_write(scratch)
            .max_file_bytes(image_bytes),
    )?;
    let mkfs = Tool::new("mkfs.ext4").args(["-q", "-F", "-L", WORK_LABEL]);
    let (mkfs, used) = match std::fs::symlink_metadata(&tree) {
        Ok(meta) if meta.is_dir() => (mkfs.arg("-d").reads(&tree), disk_usage(&tree)),
        // Nothing to copy: an empty file system, its root the tool's own.
        _ => (mkfs, 0),
    };
    // Room for the files plus growth headroom; the VM grows it further.
    let size_mib = (used / (1 << 20)) * 2 + 64;
    tools.check(
        &mkfs
            .writes(dst)
            .arg(format!("{size_mib}M"))
            .max_file_bytes(size_mib << 20),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    fn no_tick(_: u64) -> Result<()> {
        Ok(())
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let mut f = File::create(&src).expect("create");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(b"middle").expect("write");
        f.set_len(64 << 20).expect("len");
        drop(f);
        let dst = dir.path().join("dst");
        let mut ticks = 0;
        let copied = sparse_copy(&src, &dst, &mut |_| {
            ticks += 1;
            Ok(())
        })
        .expect("copy");
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a mostly empty file"
        );
        assert!(ticks >= 1);
        let (a, b) = (
            std::fs::read(&src).expect("read"),
            std::fs::read(&dst).expect("read"),
        );
        assert_eq!(a, b);
        let blocks = std::fs::metadata(&dst).expect("meta").blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "destination is not sparse: {blocks} blocks"
        );
        // The destination must be new.
        assert!(sparse_copy(&src, &dst, &mut no_tick).is_err());
    }

    #[test]
    fn sparse_copy_stops_when_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, vec![1u8; 3 * CHUNK]).expect("write");
        let err = sparse_copy(&src, &dir.path().join("dst"), &mut |_| {
            Err(Error::cancelled("cancelled"))
        })
        .expect_err("stopped");
        assert_eq!(err.kind, banger_error::ErrorKind::Cancelled);
    }

    #[test]
    fn copy_tree_copies_files_dirs_and_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("kernel/drivers")).expect("mkdir");
        std::fs::write(src.join("modules.dep"), b"dep").expect("write");
        std::fs::write(src.join("kernel/drivers/a.ko"), b"ko").expect("write");
        std::os::unix::fs::symlink("/usr/src/linux", src.join("build")).expect("link");
        let dst = dir.path().join("dst");
        assert_eq!(copy_tree(&src, &dst, &mut no_tick).expect("copy"), 5);
        assert_eq!(
            std::fs::read(dst.join("kernel/drivers/a.ko")).expect("read"),
            b"ko"
        );
        assert_eq!(
            std::fs::read_link(dst.join("build")).expect("link"),
            Path::new("/usr/src/linux")
        );
        assert_eq!(disk_usage(&dst), 5);
    }

    #[test]
    fn sha256_matches_the_known_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").expect("write");
        assert_eq!(
            sha256_file(&f, &mut no_tick).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn work_seed_holds_the_rootfs_root_with_owners() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("root/.ssh")).expect("mkdir");
        std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
        std::fs::write(tree.join("root/.bashrc"), b"export A=1\n").expect("write");
        std::fs::write(tree.join("etc/hostname"), b"x\n").expect("write");
        std::os::unix::fs::chown(tree.join("root/.bashrc"), Some(1234), Some(1234)).expect("chown");
        let rootfs = dir.path().join("rootfs.ext4");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&rootfs)
            .arg("16M")
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
        let seed = dir.path().join("work-seed.ext4");
        make_work_seed(&crate::tool::Unconfined, &rootfs, &seed).expect("seed");
        assert!(crate::ext4::is_ext4(&seed).expect("read"));
        // Its scratch copy is gone, even after a failure.
        let names = |d: &Path| -> Vec<_> {
            std::fs::read_dir(d)
                .expect("ls")
                .flatten()
                .map(|e| e.file_name())
                .collect()
        };
        assert_eq!(names(dir.path()).len(), 3, "{:?}", names(dir.path()));
        // mkfs.ext4 cannot make an image over a directory.
        let taken = dir.path().join("taken");
        std::fs::create_dir(&taken).expect("mkdir");
        make_work_seed(&crate::tool::Unconfined, &rootfs, &taken).expect_err("a directory");
        assert_eq!(names(dir.path()).len(), 4, "{:?}", names(dir.path()));

        // Read it back with debugfs: the file, its owner, the label.
        let out = Command::new("debugfs")
            .args(["-R", "stat /.bashrc"])
            .arg(&seed)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("User:  1234"), "{text}");
        let out = Command::new("debugfs")
            .args(["-R", "ls /"])
            .arg(&seed)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(".ssh") && !text.contains("hostname"),
            "{text}"
        );
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&seed)
            .output()
            .expect("dumpe2fs");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("volume name:   {WORK_LABEL}"))
        );
    }
}
