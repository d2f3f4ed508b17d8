//! The small initramfs a built kernel boots with: busybox, banger's
//! `/init` (the one `scripts/build-test-kernel` puts in the test kernel),
//! and the virtio, vsock, virtiofs and console modules in the order they
//! load (dependencies first, as `modprobe --show-depends` gives them).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::error::{Error, Result};

/// The initramfs `/init`.
pub const INIT: &str = include_str!("../../../../scripts/guest/initramfs-init");

/// The static busybox the initramfs runs (package `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Modules the initramfs loads when the kernel has them as modules.
pub const WANT: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtiofs",
];

/// Modules a kernel must have (built in or as modules) to boot a VM.
pub const REQUIRED: &[&str] = &["virtio_blk", "virtio_console", "virtio_mmio"];

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::unavailable(format!(
                "cannot run {program}: {e}; {}",
                install_hint(program)
            ))
        })?;
    if !out.status.success() {
        return Err(Error::failed(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What to install for `program`.
fn install_hint(program: &str) -> &'static str {
    match program {
        "depmod" | "modprobe" => "apt install kmod",
        "dpkg-deb" => "kernel builds need dpkg (Debian)",
        _ => "see docs/images.md",
    }
}

/// Unpack the package `deb` into `into` (`dpkg-deb -x`).
pub fn unpack(deb: &Path, into: &Path) -> Result<()> {
    run(
        "dpkg-deb",
        &["-x".as_ref(), deb.as_os_str(), into.as_os_str()],
    )?;
    Ok(())
}

/// The kernel version an unpacked kernel package holds: the one
/// `lib/modules/VERSION` that has a `boot/vmlinuz-VERSION`.
pub fn version_in(tree: &Path) -> Result<String> {
    let modules = tree.join("lib/modules");
    let entries = std::fs::read_dir(&modules)
        .map_err(|e| Error::invalid(format!("the package has no lib/modules: {e}")))?;
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|v| tree.join("boot").join(format!("vmlinuz-{v}")).is_file())
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::invalid(
            "the package holds no boot/vmlinuz-VERSION with its lib/modules/VERSION; is it a kernel image package?",
        )),
        many => Err(Error::invalid(format!(
            "the package holds several kernels ({}); name one package",
            many.join(", ")
        ))),
    }
}

/// Index the modules of `tree` (`depmod -b`), then list the module files
/// (relative to `lib/modules/VERSION`) the initramfs loads, in load order.
/// Fails when a [`REQUIRED`] module is neither a module nor built in.
pub fn modules(tree: &Path, version: &str) -> Result<Vec<String>> {
    run(
        "depmod",
        &["-b".as_ref(), tree.as_os_str(), version.as_ref()],
    )?;
    let base = tree.join("lib/modules").join(version);
    let builtin = std::fs::read_to_string(base.join("modules.builtin")).unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    let mut missing = Vec::new();
    for m in WANT {
        let shown = std::process::Command::new("modprobe")
            .args(["-d".as_ref(), tree.as_os_str()])
            .args(["-S", version, "--show-depends", m])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot run modprobe: {e}; {}",
                    install_hint("modprobe")
                ))
            })?;
        let text = String::from_utf8_lossy(&shown.stdout);
        let mut any = false;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("insmod"), Some(path)) => {
                    let rel = Path::new(path)
                        .strip_prefix(&base)
                        .map_err(|_| {
                            Error::failed(format!(
                                "modprobe named {path}, outside the kernel's modules"
                            ))
                        })?
                        .to_string_lossy()
                        .into_owned();
                    any = true;
                    if !order.contains(&rel) {
                        order.push(rel);
                    }
                }
                (Some("builtin"), _) => any = true,
                _ => {}
            }
        }
        let named = |list: &str| {
            list.lines()
                .any(|l| Path::new(l).file_stem().is_some_and(|s| s == *m))
        };
        if !any && !named(&builtin) && REQUIRED.contains(m) {
            missing.push(*m);
        }
    }
    if !missing.is_empty() {
        return Err(Error::invalid(format!(
            "kernel {version} lacks {}: VMs need them; build from a cloud or generic kernel package",
            missing.join(", ")
        )));
    }
    Ok(order)
}

/// Build the initramfs for the kernel in `tree` into `out`, staging its
/// tree in `stage` (left for the caller to remove). `order` is what
/// [`modules`] gave.
pub fn make(tree: &Path, version: &str, order: &[String], stage: &Path, out: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::failed(format!("cannot {what} {}: {e}", p.display()))
    };
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "newroot",
        "lib/modules",
    ] {
        let p = stage.join(d);
        std::fs::create_dir_all(&p).map_err(|e| io("make", &p, e))?;
    }
    let busybox = Path::new(BUSYBOX);
    let bytes = std::fs::read(busybox).map_err(|e| {
        Error::unavailable(format!(
            "cannot read {BUSYBOX} ({e}): apt install busybox-static"
        ))
    })?;
    if !is_static_elf(&bytes) {
        return Err(Error::unavailable(format!(
            "{BUSYBOX} is not a static program, so it cannot run in an initramfs: apt install busybox-static"
        )));
    }
    let to = stage.join("bin/busybox");
    std::fs::copy(busybox, &to).map_err(|e| io("copy", busybox, e))?;
    let init = stage.join("init");
    std::fs::write(&init, INIT).map_err(|e| io("write", &init, e))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io("chmod", &init, e))?;
    let base = tree.join("lib/modules").join(version);
    let mut listed = String::new();
    for rel in order {
        let from = base.join(rel);
        let plain = decompressed_name(rel);
        let to: PathBuf = stage.join("lib/modules").join(&plain);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("make", dir, e))?;
        }
        decompress(&from, &to)?;
        listed.push_str(&plain);
        listed.push('\n');
    }
    let list = stage.join("etc/modules.order");
    std::fs::write(&list, listed).map_err(|e| io("write", &list, e))?;
    banger_formats::initramfs::pack(stage, out)?;
    Ok(())
}

/// Whether [`BUSYBOX`] is there and static.
pub fn busybox_is_static() -> bool {
    std::fs::read(BUSYBOX).is_ok_and(|b| is_static_elf(&b))
}

/// Whether `bytes` is a 64-bit ELF program with no program interpreter
/// (`PT_INTERP`): one that runs without a dynamic loader.
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // ELF magic, 64-bit, little-endian.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = usize::try_from(phoff)
            .unwrap_or(usize::MAX)
            .saturating_add(i.saturating_mul(usize::from(phentsize)));
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// `a.ko` for `a.ko.xz` and `a.ko.zst`.
fn decompressed_name(rel: &str) -> String {
    rel.strip_suffix(".xz")
        .or_else(|| rel.strip_suffix(".zst"))
        .unwrap_or(rel)
        .to_owned()
}

/// Copy a module, decompressing it (busybox `insmod` loads plain ones).
fn decompress(from: &Path, to: &Path) -> Result<()> {
    let name = from.to_string_lossy();
    if name.ends_with(".zst") {
        let input = std::fs::File::open(from)
            .map_err(|e| Error::failed(format!("cannot open {name}: {e}")))?;
        let mut output = std::fs::File::create(to)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", to.display())))?;
        zstd::stream::copy_decode(input, &mut output)
            .map_err(|e| Error::failed(format!("cannot decompress {name}: {e}")))?;
    } else if name.ends_with(".xz") {
        let output = std::fs::File::create(to)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", to.display())))?;
        let status = std::process::Command::new("xz")
            .args(["-dc"])
            .arg(from)
            .stdout(output)
            .status()
            .map_err(|e| Error::unavailable(format!("cannot run xz: {e}; apt install xz-utils")))?;
        if !status.success() {
            return Err(Error::failed(format!("xz could not decompress {name}")));
        }
    } else {
        std::fs::copy(from, to).map_err(|e| Error::failed(format!("cannot copy {name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_modules_get_plain_names() {
        assert_eq!(
            decompressed_name("kernel/a/virtio_blk.ko.xz"),
            "kernel/a/virtio_blk.ko"
        );
        assert_eq!(
            decompressed_name("kernel/a/virtio_blk.ko.zst"),
            "kernel/a/virtio_blk.ko"
        );
        assert_eq!(
            decompressed_name("kernel/a/virtio_blk.ko"),
            "kernel/a/virtio_blk.ko"
        );
        assert!(INIT.starts_with("#!/bin/busybox sh"));
        for m in REQUIRED {
            assert!(WANT.contains(m), "{m}");
        }
    }

    #[test]
    fn only_a_static_busybox_will_do() {
        // The host's static busybox (scripts/install-deps installs it), a
        // dynamic program, and things that are no program.
        let busybox = std::fs::read(BUSYBOX).expect("busybox-static is installed");
        assert!(is_static_elf(&busybox));
        let sh = std::fs::read("/bin/bash").expect("bash");
        assert!(!is_static_elf(&sh), "bash has a program interpreter");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&busybox[..0x30]));
    }

    #[test]
    fn a_package_without_a_kernel_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("lib/modules/6.1.0-1-cloud-amd64")).expect("mods");
        let e = version_in(dir.path()).expect_err("no vmlinuz");
        assert!(e.message.contains("boot/vmlinuz"), "{}", e.message);
        std::fs::create_dir_all(dir.path().join("boot")).expect("boot");
        std::fs::write(dir.path().join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"x").expect("k");
        assert_eq!(version_in(dir.path()).expect("one"), "6.1.0-1-cloud-amd64");
    }
}
