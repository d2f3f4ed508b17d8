//! Applying OCI image layers onto a root directory, in order, as the
//! image spec says: whiteouts (`.wh.NAME` deletes `NAME` from the layers
//! below, `.wh..wh..opq` empties its directory of what the layers below
//! put there), later entries replacing earlier ones of another type, and
//! ownership, modes (setuid included), extended attributes, mtimes and
//! hard links kept. bangerd runs as root, so ownership is real.
//!
//! A layer is read twice: first for its whiteouts (applied to the layers
//! below, never to this layer's own entries, wherever they sit in the
//! archive), then for its entries. Paths are plain relative ones; an entry
//! that would land outside the root, through `..` or through a symlink an
//! earlier layer made, is refused, and so are device nodes.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use banger_error::{Error, Result};

/// The prefix of a whiteout file.
const WHITEOUT: &str = ".wh.";
/// The name of an opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `tar`.
    None,
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
}

impl Compression {
    /// Recognise the blob at `path` by its magic bytes.
    pub fn sniff(path: &Path) -> Result<Self> {
        let mut head = [0u8; 4];
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::failed(format!("cannot open {}: {e}", path.display())))?;
        let n = file
            .read(&mut head)
            .map_err(|e| Error::failed(format!("cannot read {}: {e}", path.display())))?;
        Ok(match &head[..n] {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Self::Zstd,
            _ => Self::None,
        })
    }
}

/// A layer's tar stream.
fn open(path: &Path, compression: Compression) -> Result<tar::Archive<Box<dyn Read>>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", path.display())))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(std::io::BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| Error::invalid(format!("a layer is not zstd: {e}")))?,
        ),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    Ok(archive)
}

/// `path` as plain relative components, else `None`.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn bad_layer(n: usize, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("layer {n} is not a valid image layer: {why}"))
}

/// Whether `path` (relative to `root`) goes through a symlink on the way,
/// i.e. one of its parents is a symlink.
fn through_symlink(root: &Path, path: &Path) -> bool {
    let mut at = root.to_path_buf();
    let parents: Vec<_> = path.components().collect();
    for c in &parents[..parents.len().saturating_sub(1)] {
        at.push(c);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

/// Remove `path` whatever it is; absent is fine.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apply layer number `n` (from 1, for messages), the blob at `blob`,
/// onto `root`. `tick` sees the bytes unpacked so far and can stop it.
pub fn apply(
    root: &Path,
    blob: &Path,
    n: usize,
    tick: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<()> {
    let compression = Compression::sniff(blob)?;
    let io = |what: &str, p: &Path, e: std::io::Error| {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        Error::failed(format!("layer {n}: cannot {what} {}: {why}", p.display()))
    };

    // Pass 1: whiteouts, applied to the layers below.
    let mut archive = open(blob, compression)?;
    let mut whiteouts = Vec::new();
    for entry in archive.entries().map_err(|e| bad_layer(n, e))? {
        let entry = entry.map_err(|e| bad_layer(n, e))?;
        let path = entry.path().map_err(|e| bad_layer(n, e))?;
        let Some(path) = relative(&path) else {
            return Err(bad_layer(
                n,
                format!("{} is not a plain relative path", path.display()),
            ));
        };
        let Some(name) = path.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            continue;
        };
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            whiteouts.push((parent, None));
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(bad_layer(n, format!("bad whiteout {}", path.display())));
            }
            whiteouts.push((parent, Some(hidden.to_owned())));
        }
    }
    for (dir, hidden) in &whiteouts {
        if through_symlink(root, &dir.join("x")) {
            return Err(bad_layer(
                n,
                format!("a whiteout in {} goes through a symlink", dir.display()),
            ));
        }
        let target = root.join(dir);
        match hidden {
            Some(name) => {
                remove(&target.join(name)).map_err(|e| io("remove", &target.join(name), e))?
            }
            None => {
                if let Ok(children) = std::fs::read_dir(&target) {
                    for child in children.flatten() {
                        remove(&child.path()).map_err(|e| io("remove", &child.path(), e))?;
                    }
                }
            }
        }
    }

    // Pass 2: the entries.
    let mut archive = open(blob, compression)?;
    let mut done = 0u64;
    for entry in archive.entries().map_err(|e| bad_layer(n, e))? {
        let mut entry = entry.map_err(|e| bad_layer(n, e))?;
        let raw = entry.path().map_err(|e| bad_layer(n, e))?.into_owned();
        let Some(path) = relative(&raw) else {
            return Err(bad_layer(
                n,
                format!("{} is not a plain relative path", raw.display()),
            ));
        };
        if path.as_os_str().is_empty() {
            continue; // "./"
        }
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(WHITEOUT) {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            // Device nodes belong to devtmpfs in the guest.
            tracing::debug!("layer {n}: skipping the device node {}", path.display());
            continue;
        }
        if through_symlink(root, &path) {
            return Err(bad_layer(
                n,
                format!("{} would be written through a symlink", path.display()),
            ));
        }
        let target = root.join(&path);
        // Another type replaces what the layers below had; directories merge.
        if let Ok(existing) = std::fs::symlink_metadata(&target) {
            let both_dirs = existing.is_dir() && kind.is_dir();
            if !both_dirs {
                remove(&target).map_err(|e| io("replace", &target, e))?;
            }
        }
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| bad_layer(n, e))?
                .and_then(|l| relative(&l))
                .ok_or_else(|| bad_layer(n, format!("{}: bad hard link", path.display())))?;
            if through_symlink(root, &link) {
                return Err(bad_layer(
                    n,
                    format!("{}: hard link through a symlink", path.display()),
                ));
            }
            let from = root.join(&link);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
            }
            std::fs::hard_link(&from, &target).map_err(|e| io("link", &target, e))?;
            continue;
        }
        let unpacked = entry
            .unpack_in(root)
            .map_err(|e| io("unpack", &target, e))?;
        if !unpacked {
            return Err(bad_layer(n, format!("{} leaves the root", path.display())));
        }
        done += entry.size();
        tick(done)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
