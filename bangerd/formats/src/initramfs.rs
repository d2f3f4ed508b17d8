//! Initramfs archives: a directory tree packed as the kernel unpacks it,
//! a gzip-compressed `newc` cpio with every entry owned by root.
//!
//! Entries come parents first and in name order, so the same tree always
//! gives the same bytes (mtimes are kept as they are in the tree).
//! Directories, regular files and symlinks are packed; anything else in
//! the tree (a device node, a socket) is refused, since a built initramfs
//! never needs one and the kernel makes `/dev` itself (devtmpfs).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_error::{Error, Result};
use cpio::newc::Builder;
use flate2::Compression;
use flate2::write::GzEncoder;

/// Pack `tree` into `out` as a gzip-compressed newc archive; returns the
/// number of entries.
pub fn pack(tree: &Path, out: &Path) -> Result<usize> {
    let file = File::create(out)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", out.display())))?;
    let gz = GzEncoder::new(BufWriter::new(file), Compression::best());
    let mut entries = Vec::new();
    walk(tree, Path::new(""), &mut entries)?;
    let write_err = |e: io::Error| Error::failed(format!("cannot write {}: {e}", out.display()));
    let mut w = gz;
    for (ino, rel) in entries.iter().enumerate() {
        w = entry(tree, rel, ino as u32 + 1, w)?;
    }
    let w = cpio::newc::trailer(w).map_err(write_err)?;
    let buf = w.finish().map_err(write_err)?;
    let file = buf.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    Ok(entries.len())
}

/// Every path under `dir` (relative to the tree), parents before their
/// contents, siblings in name order.
fn walk(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&dir)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", dir.display())))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", dir.display())))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let child = rel.join(&name);
        out.push(child.clone());
        let meta = std::fs::symlink_metadata(root.join(&child))
            .map_err(|e| Error::failed(format!("cannot read {}: {e}", child.display())))?;
        if meta.is_dir() {
            walk(root, &child, out)?;
        }
    }
    Ok(())
}

/// Append one entry for `rel` to `w`.
fn entry<W: Write>(tree: &Path, rel: &Path, ino: u32, w: W) -> Result<W> {
    let path = tree.join(rel);
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", path.display())))?;
    let name = rel
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{} is not a UTF-8 name", rel.display())))?;
    let kind = meta.file_type();
    let builder = Builder::new(name)
        .ino(ino)
        .mode(meta.mode())
        .uid(0)
        .gid(0)
        .nlink(if kind.is_dir() { 2 } else { 1 })
        .mtime(u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX));
    let werr = |e: io::Error| Error::failed(format!("cannot pack {name}: {e}"));
    if kind.is_dir() {
        return builder.write(w, 0).finish().map_err(werr);
    }
    let data: Box<dyn Read> = if kind.is_symlink() {
        let target = std::fs::read_link(&path).map_err(werr)?;
        Box::new(io::Cursor::new(target.as_os_str().as_bytes().to_vec()))
    } else if kind.is_file() {
        Box::new(File::open(&path).map_err(werr)?)
    } else {
        return Err(Error::invalid(format!(
            "{name} is neither a directory, a file nor a symlink"
        )));
    };
    let size = if kind.is_symlink() {
        std::fs::read_link(&path).map_err(werr)?.as_os_str().len() as u64
    } else {
        meta.len()
    };
    let size = u32::try_from(size)
        .map_err(|_| Error::invalid(format!("{name} is too large for an initramfs")))?;
    let mut writer = builder.write(w, size);
    let copied = io::copy(&mut data.take(u64::from(size)), &mut writer).map_err(werr)?;
    if copied != u64::from(size) {
        return Err(Error::failed(format!("{name} changed while it was packed")));
    }
    writer.finish().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Read back what [`pack`] wrote: (name, mode, uid, data) per entry.
    fn unpack(archive: &Path) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut r: Box<dyn Read> = Box::new(flate2::read::GzDecoder::new(
            File::open(archive).expect("open"),
        ));
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(r).expect("entry");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let (name, mode, uid) = (e.name().to_owned(), e.mode(), e.uid());
            let mut data = Vec::new();
            reader.read_to_end(&mut data).expect("data");
            out.push((name, mode, uid, data));
            r = Box::new(reader.finish().expect("finish"));
        }
        out
    }

    #[test]
    fn a_tree_round_trips_parents_first_owned_by_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("lib/modules/kernel")).expect("dirs");
        std::fs::create_dir_all(tree.join("bin")).expect("bin");
        std::fs::write(tree.join("init"), "#!/bin/busybox sh\n").expect("init");
        std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(tree.join("lib/modules/kernel/a.ko"), vec![7u8; 70_000]).expect("ko");
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("symlink");
        std::fs::write(tree.join("bin/busybox"), b"elf").expect("busybox");
        let out = dir.path().join("initrd.img");
        assert_eq!(pack(&tree, &out).expect("pack"), 8);
        let got = unpack(&out);
        let names: Vec<&str> = got.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/kernel",
                "lib/modules/kernel/a.ko",
            ]
        );
        assert_eq!(got[7].3.len(), 70_000);
        let find = |n: &str| got.iter().find(|(name, ..)| name == n).expect(n);
        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").3, b"#!/bin/busybox sh\n");
        assert_eq!(find("bin/sh").1 & 0o170000, 0o120000, "a symlink");
        assert_eq!(find("bin/sh").3, b"busybox");
        assert_eq!(find("bin").1 & 0o170000, 0o040000, "a directory");
        assert!(got.iter().all(|(_, _, uid, _)| *uid == 0));
        // Same tree, same bytes.
        let again = dir.path().join("again.img");
        pack(&tree, &again).expect("again");
        assert_eq!(
            std::fs::read(&out).expect("a"),
            std::fs::read(&again).expect("b")
        );
    }

    #[test]
    fn a_special_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).expect("dir");
        let _sock = std::os::unix::net::UnixListener::bind(tree.join("sock")).expect("sock");
        let e = pack(&tree, &dir.path().join("x.img")).expect_err("refused");
        assert!(e.message.contains("neither"), "{}", e.message);
    }
}
