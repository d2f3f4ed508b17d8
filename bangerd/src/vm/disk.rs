//! A VM's disks: the copy-on-write system disk over its image's read-only
//! rootfs, and the persistent work disk (/root) grown from the image's
//! work-seed.
//!
//! System disk methods, best first: a device-mapper snapshot over loop
//! devices (where `/dev/mapper/control` exists; the tables are built by
//! [`snapshot_tables`]), a reflink clone (FICLONE, on btrfs/xfs), and a
//! sparse copy. [`probe`] says which the state directory allows.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::artifacts::files::{WORK_LABEL, sparse_copy};
use crate::error::{Error, Result};
use banger_formats::tool::{Tool, Tools};

/// How a system disk is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMethod {
    /// dm-snapshot over loop devices: instant, shares the base.
    DeviceMapper,
    /// FICLONE: instant, shares extents until written.
    Reflink,
    /// A sparse copy: costs time and space proportional to the data.
    Copy,
}

impl DiskMethod {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceMapper => "dm",
            Self::Reflink => "reflink",
            Self::Copy => "copy",
        }
    }

    /// The method named `name` (its wire name), if any.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::DeviceMapper, Self::Reflink, Self::Copy]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Make `dst` a reflink clone of `src`. Fails (and removes `dst`) where
/// the filesystem cannot share extents.
pub fn reflink(src: &Path, dst: &Path) -> std::io::Result<()> {
    let from = File::open(src)?;
    let to = File::options().write(true).create_new(true).open(dst)?;
    // SAFETY: both descriptors are open for the duration of the call, and
    // FICLONE takes the source descriptor by value.
    let r = unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as nix::libc::c_ulong) };
    if let Err(e) = r {
        drop(to);
        let _ = std::fs::remove_file(dst);
        return Err(std::io::Error::from(e));
    }
    Ok(())
}

/// Which method the state directory `dir` allows: reflink is tried for
/// real on a scratch file. Device-mapper snapshots are not used yet even
/// where dm exists (see `docs/vms.md`), so the answer is reflink or copy.
pub fn probe(dir: &Path) -> DiskMethod {
    if reflink_works(dir).unwrap_or(false) {
        DiskMethod::Reflink
    } else {
        DiskMethod::Copy
    }
}

/// Whether files in `dir` can be reflinked (FICLONE of a probe file);
/// an error when no probe file can be written there.
pub fn reflink_works(dir: &Path) -> std::io::Result<bool> {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let written = std::fs::write(&a, b"banger");
    let ok = written.is_ok() && reflink(&a, &b).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    written.map(|()| ok)
}

/// The method a new VM's system disk gets in `dir`: a dm snapshot where
/// device-mapper works, else what [`probe`] finds. `doctor` reports this
/// and create makes it, so the two cannot disagree.
pub fn planned_method(dm_available: bool, dir: &Path) -> DiskMethod {
    if dm_available {
        DiskMethod::DeviceMapper
    } else {
        probe(dir)
    }
}

/// Make the new file `dst` a copy of the disk image `src` (a system
/// disk from an image's rootfs, or a clone's or snapshot's disks): a
/// reflink where possible, else a sparse copy. Returns the method used.
pub fn copy_disk(src: &Path, dst: &Path) -> Result<DiskMethod> {
    match reflink(src, dst) {
        Ok(()) => return Ok(DiskMethod::Reflink),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::failed(format!("{} exists already", dst.display())));
        }
        Err(_) => {}
    }
    sparse_copy(src, dst, &mut |_| Ok(()))?;
    Ok(DiskMethod::Copy)
}

/// Grow the ext4 image `disk` to `bytes` (never shrinks): extend the file
/// sparsely, check the filesystem, resize it. The guest writes this file
/// system: `tools` runs e2fsck and resize2fs (bangerd's sandbox them).
pub fn grow_ext4(tools: &dyn Tools, disk: &Path, bytes: u64) -> Result<()> {
    let len = std::fs::metadata(disk)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", disk.display())))?
        .len();
    if bytes < len {
        return Err(Error::invalid(format!(
            "the work disk is {len} bytes; it can grow but not shrink to {bytes}"
        )));
    }
    if bytes == len {
        return Ok(());
    }
    File::options()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| Error::failed(format!("cannot grow {}: {e}", disk.display())))?;
    // e2fsck exits 1 when it fixed something, which is fine here.
    tools
        .run(
            &Tool::new("e2fsck")
                .args(["-f", "-p"])
                .writes(disk)
                .max_file_bytes(bytes),
        )?
        .expect_codes(&format!("e2fsck of {}", disk.display()), &[0, 1])?;
    tools.check(&Tool::new("resize2fs").writes(disk).max_file_bytes(bytes))?;
    Ok(())
}

/// Make the work disk `dst` (a new file): a copy of `seed` (or an empty
/// ext4 labelled banger-work when the image has none), grown to `bytes`,
/// with `keys` as root's authorized_keys.
pub fn make_work_disk(
    tools: &dyn Tools,
    seed: Option<&Path>,
    dst: &Path,
    bytes: u64,
    keys: &[String],
) -> Result<()> {
    match seed {
        Some(seed) => {
            sparse_copy(seed, dst, &mut |_| Ok(()))?;
        }
        None => {
            File::options()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dst.display())))?;
            tools.check(
                &Tool::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", WORK_LABEL])
                    .writes(dst)
                    .arg("64M")
                    .max_file_bytes(64 << 20),
            )?;
        }
    }
    grow_ext4(tools, dst, bytes)?;
    if !keys.is_empty() {
        write_authorized_keys(tools, dst, keys)?;
    }
    Ok(())
}

/// Put `keys` into `/.ssh/authorized_keys` of the ext4 image `disk`
/// (root's home when mounted at /root), owned by root, mode 0600, without
/// mounting: debugfs, through `tools`, writes the file. Keys already
/// there stay. Its inputs are files beside `disk` (a sandbox sees them;
/// a temporary directory may be private to bangerd), removed afterwards.
pub fn write_authorized_keys(tools: &dyn Tools, disk: &Path, keys: &[String]) -> Result<()> {
    let disk_bytes = std::fs::metadata(disk)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", disk.display())))?
        .len();
    let existing = {
        let out = tools.check(
            &Tool::new("debugfs")
                .arg("-R")
                .arg("cat /.ssh/authorized_keys")
                .reads(disk)
                .max_file_bytes(disk_bytes),
        )?;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut text = existing.clone();
    for key in keys {
        if !existing.lines().any(|l| l.trim() == key.trim()) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(key.trim());
            text.push('\n');
        }
    }
    let beside = disk.parent().unwrap_or(Path::new("/"));
    let temp = |contents: &[u8]| -> Result<tempfile::NamedTempFile> {
        let mut file = tempfile::Builder::new()
            .prefix(".keys-")
            .tempfile_in(beside)
            .map_err(|e| Error::failed(format!("cannot make a temporary file: {e}")))?;
        file.write_all(contents)
            .map_err(|e| Error::failed(format!("cannot write a temporary file: {e}")))?;
        Ok(file)
    };
    let file = temp(text.as_bytes())?;
    let script = format!(
        "mkdir /.ssh\nsif /.ssh mode 040700\nsif /.ssh uid 0\nsif /.ssh gid 0\n\
         rm /.ssh/authorized_keys\nwrite {} /.ssh/authorized_keys\n\
         sif /.ssh/authorized_keys mode 0100600\nsif /.ssh/authorized_keys uid 0\n\
         sif /.ssh/authorized_keys gid 0\n",
        file.path().display()
    );
    let commands = temp(script.as_bytes())?;
    tools.check(
        &Tool::new("debugfs")
            .arg("-w")
            .arg("-f")
            .reads(commands.path())
            .writes(disk)
            .read_only(file.path())
            .max_file_bytes(disk_bytes),
    )?;
    Ok(())
}

/// The device-mapper tables of a snapshot system disk, in the kernel's
/// table format (`start length target args`, lengths in 512-byte sectors):
/// the origin is a `linear` map of the read-only base loop device, the
/// disk a persistent (`P`) `snapshot` of it with its exceptions in the
/// per-VM COW loop device, chunk size 8 sectors (4 KiB).
pub fn snapshot_tables(base_dev: &str, cow_dev: &str, base_bytes: u64) -> Result<(String, String)> {
    if base_bytes == 0 || !base_bytes.is_multiple_of(512) {
        return Err(Error::invalid(format!(
            "a base image of {base_bytes} bytes is not a whole number of 512-byte sectors"
        )));
    }
    for dev in [base_dev, cow_dev] {
        if dev.is_empty() || dev.contains(char::is_whitespace) {
            return Err(Error::invalid(format!(
                "{dev:?} is not a block device name"
            )));
        }
    }
    let sectors = base_bytes / 512;
    Ok((
        format!("0 {sectors} linear {base_dev} 0"),
        format!("0 {sectors} snapshot {base_dev} {cow_dev} P 8"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_formats::tool::Unconfined;
    use std::process::Command;

    #[test]
    fn dm_tables_follow_the_kernel_format() {
        let (origin, snap) = snapshot_tables("/dev/loop3", "/dev/loop4", 1 << 30).expect("tables");
        assert_eq!(origin, "0 2097152 linear /dev/loop3 0");
        assert_eq!(snap, "0 2097152 snapshot /dev/loop3 /dev/loop4 P 8");
        // Each line parses as start, length, target, args.
        for t in [&origin, &snap] {
            let f: Vec<&str> = t.split(' ').collect();
            assert_eq!(f[0], "0");
            assert_eq!(f[1].parse::<u64>().expect("length") * 512, 1 << 30);
        }
        assert!(snapshot_tables("/dev/loop3", "/dev/loop4", 1000).is_err());
        assert!(snapshot_tables("/dev/loop3", "/dev/lo op4", 4096).is_err());
        assert!(snapshot_tables("", "/dev/loop4", 4096).is_err());
    }

    fn mkfs(path: &Path, size: &str) {
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", WORK_LABEL])
            .arg(path)
            .arg(size)
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
    }

    fn debugfs(disk: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(disk)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_work_disk_is_seeded_grown_and_keyed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = dir.path().join("seed.ext4");
        mkfs(&seed, "16M");
        let disk = dir.path().join("work.ext4");
        let keys = vec!["ssh-ed25519 AAAA one@host".to_owned()];
        make_work_disk(&Unconfined, Some(&seed), &disk, 96 << 20, &keys).expect("work disk");
        assert_eq!(std::fs::metadata(&disk).expect("meta").len(), 96 << 20);
        let stat = debugfs(&disk, "stats");
        let blocks: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("Block count:"))
            .expect("block count")
            .trim()
            .parse()
            .expect("number");
        let size: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .expect("block size")
            .trim()
            .parse()
            .expect("number");
        assert_eq!(blocks * size, 96 << 20, "the filesystem fills the disk");
        assert_eq!(
            debugfs(&disk, "cat /.ssh/authorized_keys"),
            "ssh-ed25519 AAAA one@host\n"
        );
        let st = debugfs(&disk, "stat /.ssh/authorized_keys");
        assert!(st.contains("Mode:  0600"), "{st}");
        assert!(st.contains("User:     0"), "{st}");

        // Adding a second key keeps the first, once.
        write_authorized_keys(
            &Unconfined,
            &disk,
            &[
                "ssh-ed25519 AAAA one@host".into(),
                "ssh-rsa BBBB two".into(),
            ],
        )
        .expect("more keys");
        assert_eq!(
            debugfs(&disk, "cat /.ssh/authorized_keys"),
            "ssh-ed25519 AAAA one@host\nssh-rsa BBBB two\n"
        );
        // Shrinking is refused with a clear error; the disk is untouched.
        let e = grow_ext4(&Unconfined, &disk, 32 << 20).expect_err("shrink");
        assert!(e.message.contains("not shrink"), "{}", e.message);
        assert_eq!(std::fs::metadata(&disk).expect("meta").len(), 96 << 20);
    }

    #[test]
    fn system_disks_copy_where_reflink_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.ext4");
        mkfs(&base, "8M");
        let disk = dir.path().join("sys.ext4");
        let method = copy_disk(&base, &disk).expect("disk");
        assert_eq!(method, probe(dir.path()));
        assert_eq!(
            std::fs::read(&base).expect("base"),
            std::fs::read(&disk).expect("disk")
        );
        assert!(copy_disk(&base, &disk).is_err(), "never overwrites");
    }

    /// A btrfs filesystem loop-mounted on a temp directory, unmounted and
    /// removed on drop (the loop device goes with the mount).
    struct LoopBtrfs {
        mount: tempfile::TempDir,
        _image: tempfile::NamedTempFile,
    }

    impl LoopBtrfs {
        fn new() -> Self {
            let image = tempfile::NamedTempFile::new().expect("image file");
            image.as_file().set_len(256 << 20).expect("size");
            let out = Command::new("mkfs.btrfs")
                .arg("-q")
                .arg(image.path())
                .output()
                .expect("mkfs.btrfs runs (btrfs-progs, scripts/install-deps)");
            assert!(out.status.success(), "mkfs.btrfs: {out:?}");
            let mount = tempfile::tempdir().expect("mount point");
            let out = Command::new("mount")
                .args(["-o", "loop"])
                .arg(image.path())
                .arg(mount.path())
                .output()
                .expect("mount");
            assert!(out.status.success(), "mount -o loop: {out:?}");
            Self {
                mount,
                _image: image,
            }
        }
    }

    impl Drop for LoopBtrfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.mount.path()).output();
        }
    }

    #[test]
    fn system_disks_are_reflink_clones_on_btrfs() {
        let fs = LoopBtrfs::new();
        let dir = fs.mount.path();
        assert_eq!(probe(dir), DiskMethod::Reflink);
        let base = dir.join("base.ext4");
        mkfs(&base, "64M");
        let disk = dir.join("sys.ext4");
        let method = copy_disk(&base, &disk).expect("disk");
        assert_eq!(method, DiskMethod::Reflink);
        let original = std::fs::read(&base).expect("base");
        assert_eq!(original, std::fs::read(&disk).expect("disk"));
        // Copy-on-write: writing the clone leaves the image as it was.
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = File::options().write(true).open(&disk).expect("open");
            f.seek(SeekFrom::Start(1 << 20)).expect("seek");
            f.write_all(&[0xab; 4096]).expect("write");
            f.sync_all().expect("sync");
        }
        assert_eq!(std::fs::read(&base).expect("base"), original);
        assert_ne!(std::fs::read(&disk).expect("disk"), original);
    }
}
