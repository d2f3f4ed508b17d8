//! Small real files the daemon accepts: a minimal ELF vmlinux and ext4
//! images made with the real mkfs.ext4.

use std::path::Path;
use std::process::Command;

/// The smallest ELF64 x86-64 executable Firecracker's loader accepts: an
/// ELF header, one PT_LOAD program header covering the file, and `payload`
/// bytes of "code". Not bootable; only the format is real.
pub fn tiny_vmlinux(payload: usize) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let total = EHDR + PHDR + payload;
    let base: u64 = 0x100_0000;
    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELF64, little-endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(base + (EHDR + PHDR) as u64).to_le_bytes()); // entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&0u64.to_le_bytes()); // offset
    f.extend_from_slice(&base.to_le_bytes()); // vaddr
    f.extend_from_slice(&base.to_le_bytes()); // paddr
    f.extend_from_slice(&(total as u64).to_le_bytes()); // filesz
    f.extend_from_slice(&(total as u64).to_le_bytes()); // memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    f.resize(total, 0xf4); // hlt
    f
}

/// Build an ext4 image of `size` (e.g. "16M") at `image` from the tree
/// `dir`, as the image builders do (no loop mount).
pub fn mkfs_ext4(dir: &Path, image: &Path, size: &str) -> std::io::Result<()> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(image)
        .arg(size)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Where the guest builders (`scripts/build-test-kernel`,
/// `scripts/build-tiny-image`, ...) put their output:
/// `$BANGER_ARTIFACTS`, else `<repo>/build/guest`.
pub fn artifacts_dir() -> std::path::PathBuf {
    std::env::var_os("BANGER_ARTIFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/guest"))
}

/// A built guest artifact, e.g. `kernel/vmlinuz`. Panics with the command
/// to run when it is missing: tests that need a real kernel or image must
/// fail, not skip, on a machine that has not built them.
pub fn guest_artifact(relative: &str, builder: &str) -> std::path::PathBuf {
    let path = artifacts_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `sudo scripts/{builder}` (or set BANGER_ARTIFACTS to where it was built)",
        path.display()
    );
    path
}
