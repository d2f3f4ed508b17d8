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

/// One line of the recipe's tools.list, with its package fetched into the
/// cache `scripts/build-debian-image` uses (and checked).
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub member: String,
    pub package: std::path::PathBuf,
}

/// The recipe's pinned tools, fetched once from their URLs.
pub fn tool_packages() -> Vec<Tool> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("BANGER_CACHE")
        .map_or_else(|| repo.join("build/cache"), Into::into)
        .join("tools");
    std::fs::create_dir_all(&cache).expect("the tools cache");
    let list = std::fs::read_to_string(repo.join("images/debian-bookworm/tools.list"))
        .expect("the recipe's tools.list");
    list.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (name, version, url, sha256, member) = (f[0], f[1], f[2], f[3], f[4]);
            let package = cache.join(format!("{name}-{version}.tgz"));
            if !package.exists() {
                let part = package.with_extension("part");
                let out = Command::new("curl")
                    .args(["-fsSL", "--retry", "2", "-o"])
                    .arg(&part)
                    .arg(url)
                    .output()
                    .expect("run curl");
                assert!(
                    out.status.success(),
                    "curl {url}: {}",
                    crate::output_text(&out)
                );
                std::fs::rename(&part, &package).expect("keep the package");
            }
            let sum = Command::new("sha256sum")
                .arg(&package)
                .output()
                .expect("run sha256sum");
            assert!(
                String::from_utf8_lossy(&sum.stdout).starts_with(sha256),
                "{} is not the pinned {name} {version}",
                package.display()
            );
            Tool {
                name: name.into(),
                version: version.into(),
                sha256: sha256.into(),
                member: member.into(),
                package,
            }
        })
        .collect()
}
