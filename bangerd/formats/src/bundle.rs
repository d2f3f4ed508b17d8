//! Catalog bundles: a `tar` archive compressed with `zstd`, holding one
//! kernel or one image under fixed names at its top level.
//!
//! - kernel: `vmlinux` (ELF) or `vmlinuz` (bzImage), optional
//!   `initrd.img`, optional `modules/` (a `lib/modules/<version>` tree);
//! - image: `rootfs.ext4`, optional `work-seed.ext4` (made when missing),
//!   optional `image.json` (`{"services": ["ssh:22"], "init": "/sbin/init"}`).
//!
//! Unpacking takes regular files and directories only, at relative paths
//! without `..`, under the names above; anything else refuses the bundle.
//! Files are written sparse: whole zero blocks become holes.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use banger_error::{Error, Result};

/// What a bundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A kernel bundle.
    Kernel,
    /// An image bundle.
    Image,
}

impl Layout {
    /// The top-level names allowed, and whether each is a directory.
    fn allowed(self) -> &'static [(&'static str, bool)] {
        match self {
            Self::Kernel => &[
                ("vmlinux", false),
                ("vmlinuz", false),
                ("initrd.img", false),
                ("modules", true),
            ],
            Self::Image => &[
                ("rootfs.ext4", false),
                ("work-seed.ext4", false),
                ("image.json", false),
            ],
        }
    }
}

/// `image.json` in an image bundle: the file the image builders write
/// (`name` and `kernel` are informational; the catalog entry decides).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMeta {
    /// The image's name where it was built.
    #[serde(default)]
    pub name: Option<String>,
    /// The kernel it was built for.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Guest services readiness waits for.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// The init the kernel starts.
    #[serde(default)]
    pub init: Option<String>,
}

/// A service in `image.json`: `"ssh:22"` or `{"name": "ssh", "port": 22}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ServiceSpec {
    /// `name:port`.
    Text(String),
    /// The builders' form.
    Object {
        /// Short name.
        name: String,
        /// Guest TCP port.
        port: u16,
    },
}

impl ImageMeta {
    /// The services as `name:port` (what `validate::services` reads).
    pub fn service_specs(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|s| match s {
                ServiceSpec::Text(t) => t.clone(),
                ServiceSpec::Object { name, port } => format!("{name}:{port}"),
            })
            .collect()
    }
}

/// Unpack the bundle `archive` into the empty directory `dest`, checking
/// every entry against `layout`; `tick` sees the uncompressed bytes so far
/// and can stop the work. Returns what was unpacked at the top level.
pub fn unpack(
    archive: &Path,
    dest: &Path,
    layout: Layout,
    tick: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Vec<String>> {
    let bad = |why: String| {
        Error::invalid(
            format!("the bundle is not a banger {layout:?} bundle: {why}").to_lowercase(),
        )
    };
    let file = std::fs::File::open(archive)
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", archive.display())))?;
    let decoder =
        zstd::stream::read::Decoder::new(file).map_err(|e| bad(format!("not zstd ({e})")))?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    let mut top = Vec::new();
    let mut done = 0u64;
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar archive ({e})")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(&e, &bad))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("an entry has an unreadable path ({e})")))?
            .into_owned();
        let relative = checked_path(&path)
            .ok_or_else(|| bad(format!("{} is not a plain relative path", path.display())))?;
        let Some(first) = relative.components().next() else {
            continue; // "./"
        };
        let first = first.as_os_str().to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let is_dir = kind.is_dir();
        if !(kind.is_file() || is_dir || kind == tar::EntryType::GNUSparse) {
            return Err(bad(format!(
                "{} is a {kind:?}; only files and directories are allowed",
                path.display()
            )));
        }
        let Some((_, dir_allowed)) = layout.allowed().iter().find(|(n, _)| *n == first) else {
            return Err(bad(format!(
                "unexpected {first:?} (allowed: {})",
                layout
                    .allowed()
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let nested = relative.components().count() > 1;
        if (nested || is_dir) && !dir_allowed {
            return Err(bad(format!("{first} must be a single file")));
        }
        if *dir_allowed && !nested && !is_dir {
            return Err(bad(format!("{first} must be a directory")));
        }
        if !top.contains(&first) {
            top.push(first);
        }
        let target = dest.join(&relative);
        if is_dir {
            std::fs::create_dir_all(&target)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", target.display())))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", parent.display())))?;
        }
        let size = entry.size();
        write_sparse(&mut entry, &target, &mut |n| tick(done + n)).map_err(|e| match e {
            Unpack::Io(e) => write_error(&e, &target, &bad),
            Unpack::Stopped(e) => e,
        })?;
        done += size;
        tick(done)?;
    }
    if top.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let required: &[&[&str]] = match layout {
        Layout::Kernel => &[&["vmlinux", "vmlinuz"]],
        Layout::Image => &[&["rootfs.ext4"]],
    };
    for one_of in required {
        if !one_of.iter().any(|n| top.iter().any(|t| t == n)) {
            return Err(bad(format!("it has no {}", one_of.join(" or "))));
        }
    }
    if layout == Layout::Kernel
        && top.iter().any(|t| t == "vmlinux")
        && top.iter().any(|t| t == "vmlinuz")
    {
        return Err(bad("it has both vmlinux and vmlinuz; ship one".into()));
    }
    Ok(top)
}

/// Why writing one entry stopped.
enum Unpack {
    Io(std::io::Error),
    Stopped(Error),
}

/// Copy `from` into a new file `to`, leaving holes where whole 64 KiB
/// blocks are zero (disk images are mostly holes); `tick` sees the bytes
/// so far.
fn write_sparse(
    from: &mut dyn Read,
    to: &Path,
    tick: &mut dyn FnMut(u64) -> Result<()>,
) -> std::result::Result<(), Unpack> {
    use std::io::{Seek, SeekFrom, Write};
    const BLOCK: usize = 64 << 10;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(Unpack::Io)?;
    let mut buf = vec![0u8; BLOCK];
    let mut len = 0u64;
    let mut since_tick = 0usize;
    loop {
        // Fill a whole block (reads may come short) before judging it.
        let mut filled = 0;
        while filled < BLOCK {
            let n = from.read(&mut buf[filled..]).map_err(Unpack::Io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let block = &buf[..filled];
        if block.iter().all(|b| *b == 0) {
            file.seek(SeekFrom::Current(filled as i64))
                .map_err(Unpack::Io)?;
        } else {
            file.write_all(block).map_err(Unpack::Io)?;
        }
        len += filled as u64;
        since_tick += filled;
        if since_tick >= 16 * BLOCK {
            since_tick = 0;
            tick(len).map_err(Unpack::Stopped)?;
        }
    }
    // A trailing hole still counts toward the length.
    file.set_len(len).map_err(Unpack::Io)?;
    file.sync_all().map_err(Unpack::Io)
}

/// Read an image bundle's `image.json` from `dir` (defaults when absent).
pub fn image_meta(dir: &Path) -> Result<ImageMeta> {
    let path = dir.join("image.json");
    let mut text = String::new();
    match std::fs::File::open(&path) {
        Ok(mut f) => f
            .by_ref()
            .take(64 << 10)
            .read_to_string(&mut text)
            .map_err(|e| Error::invalid(format!("the bundle's image.json cannot be read: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ImageMeta::default()),
        Err(e) => return Err(Error::failed(format!("{}: {e}", path.display()))),
    };
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("the bundle's image.json is invalid: {e}")))
}

/// `path` as plain relative components (no root, no `..`), else `None`.
pub(super) fn checked_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

fn read_error(e: &std::io::Error, bad: &dyn Fn(String) -> Error) -> Error {
    bad(format!("it cannot be read ({e})"))
}

/// A write failure; a full disk says so plainly.
fn write_error(e: &std::io::Error, target: &Path, bad: &dyn Fn(String) -> Error) -> Error {
    if e.raw_os_error() == Some(nix::libc::ENOSPC)
        || e.to_string().contains("No space left on device")
    {
        return Error::failed(format!(
            "no space left for {} while unpacking; free space in the state directory and pull again",
            target.display()
        ));
    }
    if e.kind() == std::io::ErrorKind::InvalidData || e.kind() == std::io::ErrorKind::UnexpectedEof
    {
        return bad(format!("it cannot be read ({e})"));
    }
    Error::failed(format!("cannot unpack {}: {e}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, body or None for a directory).
    type Entries<'a> = &'a [(&'a str, Option<&'a [u8]>)];

    /// A tar.zst in `dir` of `entries`.
    fn bundle(dir: &Path, entries: Entries<'_>) -> PathBuf {
        let path = dir.join("b.tar.zst");
        let file = std::fs::File::create(&path).expect("create");
        let encoder = zstd::stream::write::Encoder::new(file, 3)
            .expect("zstd")
            .auto_finish();
        let mut tar = tar::Builder::new(encoder);
        for (name, body) in entries {
            let mut header = tar::Header::new_gnu();
            match body {
                Some(body) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(body.len() as u64);
                    header.set_mode(0o644);
                    set_path(&mut header, name);
                    header.set_cksum();
                    tar.append(&header, *body).expect("append");
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    set_path(&mut header, name);
                    header.set_cksum();
                    tar.append(&header, std::io::empty()).expect("append dir");
                }
            }
        }
        tar.into_inner().expect("finish");
        path
    }

    /// Writes the name bytes as they are (the tar crate refuses `..`).
    fn set_path(header: &mut tar::Header, name: &str) {
        let raw = &mut header.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
    }

    fn run(entries: Entries<'_>, layout: Layout) -> (Result<Vec<String>>, tempfile::TempDir) {
        let tmp = tempfile::tempdir().expect("tmp");
        let archive = bundle(tmp.path(), entries);
        let dest = tmp.path().join("out");
        std::fs::create_dir(&dest).expect("dest");
        let result = unpack(&archive, &dest, layout, &mut |_| Ok(()));
        (result, tmp)
    }

    #[test]
    fn a_kernel_bundle_unpacks_under_its_names() {
        let (result, tmp) = run(
            &[
                ("./vmlinuz", Some(b"kernel")),
                ("initrd.img", Some(b"initrd")),
                ("modules/", None),
                ("modules/6.1.0/kernel/x.ko", Some(b"ko")),
            ],
            Layout::Kernel,
        );
        assert_eq!(
            result.expect("unpacked"),
            ["vmlinuz", "initrd.img", "modules"]
        );
        let out = tmp.path().join("out");
        assert_eq!(std::fs::read(out.join("vmlinuz")).expect("read"), b"kernel");
        assert_eq!(
            std::fs::read(out.join("modules/6.1.0/kernel/x.ko")).expect("read"),
            b"ko"
        );
    }

    #[test]
    fn an_image_bundle_unpacks_with_its_meta() {
        let meta = br#"{"services": ["ssh:22"], "init": "/sbin/banger-init"}"#;
        let (result, tmp) = run(
            &[("rootfs.ext4", Some(b"ext4")), ("image.json", Some(meta))],
            Layout::Image,
        );
        result.expect("unpacked");
        let meta = image_meta(&tmp.path().join("out")).expect("meta");
        assert_eq!(meta.service_specs(), ["ssh:22"]);
        assert_eq!(meta.init.as_deref(), Some("/sbin/banger-init"));
        // The builders' image.json reads too.
        let built = r#"{"name": "tiny", "kernel": "test-kernel", "init": "/sbin/banger-init",
                        "services": [{"name": "ssh", "port": 22}]}"#;
        let meta: ImageMeta = serde_json::from_str(built).expect("builders' form");
        assert_eq!(meta.service_specs(), ["ssh:22"]);
    }

    #[test]
    fn zero_blocks_become_holes() {
        let mut body = vec![0u8; 8 << 20];
        body[100] = 1;
        body[(6 << 20) + 7] = 2;
        let (result, tmp) = run(&[("rootfs.ext4", Some(&body))], Layout::Image);
        result.expect("unpacked");
        let out = tmp.path().join("out/rootfs.ext4");
        assert_eq!(std::fs::read(&out).expect("read"), body);
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).expect("stat")) * 512;
        assert!(
            allocated <= 256 << 10,
            "{allocated} bytes allocated for two blocks"
        );
    }

    #[test]
    fn bad_bundles_are_refused() {
        let cases: [(Entries<'_>, Layout, &str); 8] = [
            (
                &[("../vmlinuz", Some(b"k"))],
                Layout::Kernel,
                "plain relative path",
            ),
            (
                &[("/vmlinuz", Some(b"k"))],
                Layout::Kernel,
                "plain relative path",
            ),
            (
                &[("vmlinuz", Some(b"k")), ("etc/passwd", Some(b"x"))],
                Layout::Kernel,
                "unexpected \"etc\"",
            ),
            (
                &[("initrd.img", Some(b"i"))],
                Layout::Kernel,
                "no vmlinux or vmlinuz",
            ),
            (
                &[("vmlinux", Some(b"k")), ("vmlinuz", Some(b"k"))],
                Layout::Kernel,
                "both",
            ),
            (&[("vmlinuz/", None)], Layout::Kernel, "single file"),
            (
                &[("vmlinuz", Some(b"k")), ("modules", Some(b"m"))],
                Layout::Kernel,
                "must be a directory",
            ),
            (
                &[("image.json", Some(b"{}"))],
                Layout::Image,
                "no rootfs.ext4",
            ),
        ];
        for (entries, layout, want) in cases {
            let (result, _tmp) = run(entries, layout);
            let e = result.expect_err(want);
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
    }

    #[test]
    fn links_and_garbage_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("b.tar.zst");
        let file = std::fs::File::create(&path).expect("create");
        let encoder = zstd::stream::write::Encoder::new(file, 3)
            .expect("zstd")
            .auto_finish();
        let mut tar = tar::Builder::new(encoder);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, "vmlinuz", "/etc/shadow")
            .expect("link");
        tar.into_inner().expect("finish");
        let dest = tmp.path().join("out");
        std::fs::create_dir(&dest).expect("dest");
        let e = unpack(&path, &dest, Layout::Kernel, &mut |_| Ok(())).expect_err("symlink");
        assert!(
            e.message.contains("only files and directories"),
            "{}",
            e.message
        );

        std::fs::write(&path, b"not zstd at all").expect("write");
        let e = unpack(&path, &dest, Layout::Kernel, &mut |_| Ok(())).expect_err("garbage");
        assert!(
            e.message.contains("not a banger kernel bundle"),
            "{}",
            e.message
        );
    }
}
