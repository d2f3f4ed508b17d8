//! Kernels and images: what a VM boots.
//!
//! A kernel is always managed: `ImportKernel` copies it (and extracts an
//! ELF vmlinux from a bzImage) under `<state>/kernels/<id>/`. An image is
//! first registered from host paths (unmanaged) and may be promoted, which
//! copies it under `<state>/images/<id>/`. Files are built in a
//! `.tmp-<id>` directory and renamed into place; the store row is written
//! last, so a crash leaves at worst a directory without a row, which
//! [`cleanup_orphans`] removes at startup.

pub use banger_formats::{bundle, files, hex};
pub mod build;
pub mod commands;
pub mod oci;
pub mod owner;
pub mod pull;
pub mod store;
pub mod validate;

pub use commands::{Artifacts, ArtifactsDeps, DiskQuota};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A managed kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Stable id (16 lowercase hex digits).
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// Version string from the bzImage header; empty when unknown.
    pub version: String,
    /// The ELF vmlinux (Firecracker boots this).
    pub vmlinux: PathBuf,
    /// The bzImage as imported, when one was (QEMU boots this).
    pub bzimage: Option<PathBuf>,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// `lib/modules/<version>` tree.
    pub modules: Option<PathBuf>,
    /// sha256 of the vmlinux, hex.
    pub sha256: String,
    /// Bytes of everything managed for it.
    pub size_bytes: u64,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// Who imported it.
    pub owner_uid: u32,
}

impl Kernel {
    /// The file QEMU (and the KVM probe) boots: the bzImage when there is
    /// one, else the ELF vmlinux.
    pub fn boot_file(&self) -> &Path {
        self.bzimage.as_deref().unwrap_or(&self.vmlinux)
    }
}

/// A guest service readiness waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Short name, e.g. `ssh`.
    pub name: String,
    /// Guest TCP port.
    pub port: u16,
}

/// An image: a rootfs, its work-seed and the kernel it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Stable id.
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// Whether banger owns the files.
    pub managed: bool,
    /// The rootfs ext4 image.
    pub rootfs: PathBuf,
    /// Its apparent size.
    pub rootfs_bytes: u64,
    /// The work-seed ext4 image, once there is one.
    pub work_seed: Option<PathBuf>,
    /// sha256 of the work-seed, hex; empty without one.
    pub work_seed_sha256: String,
    /// The kernel's id.
    pub kernel_id: String,
    /// Services readiness waits for.
    pub services: Vec<Service>,
    /// The init to start; `None` for the kernel's default.
    pub init: Option<String>,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// Who registered it.
    pub owner_uid: u32,
}

/// What `ImportKernelFd` (or root's `ImportKernel`) was asked. The files
/// are open descriptors: bangerd reads what the caller opened, never a
/// path a caller named.
#[derive(Debug)]
pub struct KernelImport {
    /// Name for the kernel.
    pub name: String,
    /// ELF vmlinux or bzImage.
    pub kernel: std::fs::File,
    /// Optional initramfs.
    pub initrd: Option<std::fs::File>,
    /// Optional modules.
    pub modules: Option<Modules>,
}

/// A kernel's modules as they arrive.
#[derive(Debug)]
pub enum Modules {
    /// An uncompressed tar of the `lib/modules/<version>` directory's
    /// contents, written by the caller's own process.
    Tar(std::fs::File),
    /// A directory root named (root's path-taking `ImportKernel` only).
    Dir(PathBuf),
}

/// What `ImportImageFd` was asked: copied into managed storage.
#[derive(Debug)]
pub struct ImageImport {
    /// Name for the image.
    pub name: String,
    /// The rootfs ext4 image.
    pub rootfs: std::fs::File,
    /// Kernel name or id.
    pub kernel: String,
    /// Optional work-seed ext4 image.
    pub work_seed: Option<std::fs::File>,
    /// `name:port` strings.
    pub services: Vec<String>,
    /// The init to start.
    pub init: Option<String>,
}

/// What `RegisterImage` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRegistration {
    /// Name for the image.
    pub name: String,
    /// The rootfs ext4 image.
    pub rootfs: PathBuf,
    /// Kernel name or id.
    pub kernel: String,
    /// Optional work-seed ext4 image.
    pub work_seed: Option<PathBuf>,
    /// `name:port` strings.
    pub services: Vec<String>,
    /// The init to start.
    pub init: Option<String>,
}

/// Whether `text` has the shape of an id (16 lowercase hex digits). No
/// name can have it ([`validate::name`]), so a reference of this shape is
/// looked up by id only and any other by name only.
pub fn is_id(text: &str) -> bool {
    text.len() == 16
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new random id: 16 lowercase hex digits.
pub fn new_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex(&bytes))
}

/// Where managed kernels live.
pub fn kernels_dir(state: &Path) -> PathBuf {
    state.join("kernels")
}

/// Where managed images live.
pub fn images_dir(state: &Path) -> PathBuf {
    state.join("images")
}

/// Remove what a crash left behind: `.tmp-*` build directories and
/// managed directories no store row refers to. Returns what was removed.
pub fn cleanup_orphans(state: &Path, kernel_ids: &[String], image_ids: &[String]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (dir, known) in [
        (kernels_dir(state), kernel_ids),
        (images_dir(state), image_ids),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || !known.contains(&name) {
                let path = entry.path();
                let result = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match result {
                    Ok(()) => removed.push(path),
                    Err(e) => tracing::warn!(path = %path.display(), "cannot remove leftover: {e}"),
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id().expect("id");
        let b = new_id().expect("id");
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert!(is_id(&a));
        for not in [
            "",
            "0123456789abcde",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "debian-bookworm",
        ] {
            assert!(!is_id(not), "{not}");
        }
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn cleanup_removes_only_orphans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kernels_dir(dir.path());
        let i = images_dir(dir.path());
        for d in [
            k.join("keep"),
            k.join("orphan"),
            k.join(".tmp-x"),
            i.join("img"),
        ] {
            std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        }
        let removed = cleanup_orphans(dir.path(), &["keep".into()], &["img".into()]);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(k.join("keep").exists() && i.join("img").exists());
        assert!(!k.join("orphan").exists() && !k.join(".tmp-x").exists());
    }
}
