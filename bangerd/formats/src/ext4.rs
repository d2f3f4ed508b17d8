//! An ext4 image made from a directory tree with `mkfs.ext4 -d` (no loop
//! mount, no privileges beyond reading the tree): owners, modes, xattrs,
//! hard links and sparse files carry over.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_error::{Error, Result};

use crate::tool::{Tool, Tools};

/// Bytes of content and number of entries under `root` (not following
/// symlinks; hard links counted once).
fn measure(root: &Path) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            entries += 1;
            if meta.is_dir() {
                bytes += 4096;
                stack.push(entry.path());
            } else if meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())) {
                // Allocated size keeps holes out; small files take a block.
                bytes += (meta.blocks() * 512).max(meta.len().min(4096));
            }
        }
    }
    Ok((bytes, entries))
}

/// Free room in a registry image's root file system: its first boot may
/// install systemd and an SSH server, and the package lists of a full
/// distribution take a few hundred MiB. The file is sparse, so room
/// costs nothing until it is used.
pub const ROOM_FOR_PACKAGES: u64 = 1 << 30;

/// Build `image` (a new file) holding `root`, labelled `rootfs`: its size
/// is the tree's content plus a quarter and `room` bytes, in 4 MiB steps;
/// inodes for twice the entries and then some. `mkfs.ext4` runs through
/// `tools`, so `root` must be owned as they see it
/// ([`crate::tool::shift_owners`] by [`Tools::root_id`]). Returns the
/// image's size.
pub fn build(tools: &dyn Tools, root: &Path, image: &Path, room: u64) -> Result<u64> {
    build_labelled(tools, root, image, room, "rootfs")
}

/// [`build`] with the file system label `label`.
pub fn build_labelled(
    tools: &dyn Tools,
    root: &Path,
    image: &Path,
    room: u64,
    label: &str,
) -> Result<u64> {
    let (bytes, entries) = measure(root)
        .map_err(|e| Error::failed(format!("cannot measure {}: {e}", root.display())))?;
    const STEP: u64 = 4 << 20;
    let size = (bytes + bytes / 4 + room).div_ceil(STEP) * STEP;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", image.display())))?;
    file.set_len(size)
        .map_err(|e| Error::failed(format!("cannot size {}: {e}", image.display())))?;
    drop(file);
    let inodes = (entries * 2 + 32_768).to_string();
    let out = tools.run(
        &Tool::new("mkfs.ext4")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-N", &inodes, "-L", label, "-d",
            ])
            .reads(root)
            .writes(image)
            .max_file_bytes(size),
    )?;
    if !out.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        if why.contains("No space left") || why.contains("Could not allocate") {
            return Err(Error::failed(format!(
                "no space left for the image's root file system: {}",
                why.trim()
            )));
        }
        return Err(Error::failed(format!(
            "mkfs.ext4 -d failed: {}",
            why.trim()
        )));
    }
    Ok(size)
}

/// The ext4 superblock magic, at byte 0x38 of the superblock at 1024.
pub const EXT4_MAGIC_OFFSET: u64 = 1024 + 0x38;

/// Whether the file at `path` holds an ext2/3/4 superblock.
pub fn is_ext4(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    if f.metadata()?.len() < EXT4_MAGIC_OFFSET + 2 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(EXT4_MAGIC_OFFSET))?;
    let mut magic = [0u8; 2];
    f.read_exact(&mut magic)?;
    Ok(u16::from_le_bytes(magic) == 0xEF53)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::sync::Mutex;

    use super::*;
    use crate::tool::{File, Output, Unconfined};

    /// Runs tools as the caller and remembers each.
    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<Tool>>);

    impl Tools for Recorded {
        fn run(&self, tool: &Tool) -> Result<Output> {
            self.0.lock().expect("lock").push(tool.clone());
            Unconfined.run(tool)
        }
    }

    #[test]
    fn mkfs_runs_through_the_tools_with_the_tree_read_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).expect("root");
        std::fs::write(root.join("file"), b"x").expect("file");
        let image = tmp.path().join("rootfs.ext4");
        let tools = Recorded::default();
        let size = build(&tools, &root, &image, 64 << 20).expect("built");
        let ran = tools.0.into_inner().expect("lock");
        let [mkfs] = ran.as_slice() else {
            panic!("ran {ran:?}");
        };
        assert_eq!(mkfs.program, "mkfs.ext4");
        assert_eq!(
            mkfs.files,
            [
                File {
                    path: root.clone(),
                    writable: false
                },
                File {
                    path: image.clone(),
                    writable: true
                }
            ]
        );
        assert_eq!(mkfs.max_file_bytes, Some(size));
        assert!(is_ext4(&image).expect("read"));
    }

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_tree_lands_in_ext4_with_owners_modes_and_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("bin")).expect("bin");
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\n").expect("tool");
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .expect("chmod");
        std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool2")).expect("link");
        std::fs::write(root.join("owned"), b"x").expect("owned");
        std::os::unix::fs::chown(root.join("owned"), Some(1000), Some(1001)).expect("chown");
        std::os::unix::fs::symlink("bin/tool", root.join("sym")).expect("symlink");
        let image = tmp.path().join("rootfs.ext4");
        let size = build(&Unconfined, &root, &image, 128 << 20).expect("built");
        assert!(size >= 128 << 20 && size.is_multiple_of(4 << 20), "{size}");

        let tool = debugfs(&image, "stat /bin/tool");
        assert!(tool.contains("Mode:  04755"), "{tool}");
        assert!(tool.contains("Links: 2"), "{tool}");
        let inode = |p: &str| {
            let out = debugfs(&image, &format!("ls -l {p}"));
            out.split_whitespace().next().unwrap_or_default().to_owned()
        };
        assert_eq!(inode("/bin/tool"), inode("/bin/tool2"));
        let owned = debugfs(&image, "stat /owned");
        assert!(
            owned.contains("User:  1000") && owned.contains("Group:  1001"),
            "{owned}"
        );
        let sym = debugfs(&image, "stat /sym");
        assert!(sym.contains("Fast link dest: \"bin/tool\""), "{sym}");
    }
}
