//! Checks on what callers pass: names, host paths, file formats.
//!
//! bangerd runs as root and callers are not, so a path is accepted only
//! when the caller could read it themselves (mode bits of the file and
//! search bits of every directory above it, for the caller's uid and
//! groups). Otherwise a user could import `/etc/shadow` as an initrd and
//! read it from a guest.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::artifacts::Service;
use crate::error::{Error, Result};

use banger_formats::ext4::EXT4_MAGIC_OFFSET;

/// A name of a VM, image or kernel: a DNS label (1-63 of `a-z0-9-`, not
/// starting or ending with `-`) with at least one character that is not a
/// hex digit. Ids are hex and the CLI accepts id prefixes, so an all-hex
/// name could be mistaken for another object's id; such names are refused.
pub fn name(what: &str, name: &str) -> Result<()> {
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Err(Error::invalid(format!(
            "{what} name {name:?} is not a DNS label: use 1-63 lowercase letters, digits and inner hyphens"
        )));
    }
    if name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!(
            "{what} name {name:?} is made of hex digits only, so it could be taken for an id: \
             add a letter from g to z or a hyphen"
        )));
    }
    Ok(())
}

/// Who is asking, for file access checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// Uid.
    pub uid: u32,
    /// Primary and supplementary gids.
    pub gids: Vec<u32>,
}

impl Reader {
    /// The caller with uid `uid` and the groups the user database gives it.
    pub fn for_uid(uid: u32) -> Self {
        let gids = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .and_then(|user| {
                let name = std::ffi::CString::new(user.name).ok()?;
                nix::unistd::getgrouplist(&name, user.gid).ok()
            })
            .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Self { uid, gids }
    }

    fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether mode bits `mode` of a file owned by `owner:group` grant
    /// `want` (4 read, 1 search/execute) to this reader.
    fn granted(&self, mode: u32, owner: u32, group: u32, want: u32) -> bool {
        if self.is_root() {
            return true;
        }
        let bits = if owner == self.uid {
            mode >> 6
        } else if self.gids.contains(&group) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }
}

/// What kind of thing a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// Check that `path` (the `what` argument) is absolute, exists, is a
/// `kind`, and that `reader` may read it. Returns it canonicalized.
pub fn host_path(what: &str, path: &Path, kind: Kind, reader: &Reader) -> Result<PathBuf> {
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "{what} path {} is relative: pass an absolute path",
            path.display()
        )));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::invalid(format!("{what} {} does not exist", path.display()))
        } else {
            Error::invalid(format!("{what} {} cannot be read: {e}", path.display()))
        }
    })?;
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| Error::invalid(format!("{what} {} cannot be read: {e}", path.display())))?;
    match kind {
        Kind::File if !meta.is_file() => {
            return Err(Error::invalid(format!(
                "{what} {} is not a regular file",
                path.display()
            )));
        }
        Kind::Dir if !meta.is_dir() => {
            return Err(Error::invalid(format!(
                "{what} {} is not a directory",
                path.display()
            )));
        }
        _ => {}
    }
    let want = match kind {
        Kind::File => 4,
        Kind::Dir => 4 | 1,
    };
    let mut denied = !reader.granted(meta.permissions().mode(), meta.uid(), meta.gid(), want);
    for dir in canonical.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir)
            && !reader.granted(m.permissions().mode(), m.uid(), m.gid(), 1)
        {
            denied = true;
        }
    }
    if denied {
        return Err(Error::denied(format!(
            "{what} {} is not readable by uid {}: make it readable by you, or ask root to import it",
            path.display(),
            reader.uid
        )));
    }
    Ok(canonical)
}

/// Whether `head` (a file's first bytes) holds an ext2/3/4 superblock.
pub fn has_ext4_magic(head: &[u8]) -> bool {
    let at = EXT4_MAGIC_OFFSET as usize;
    head.get(at..at + 2)
        .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == 0xEF53)
}

pub use banger_formats::ext4::is_ext4;

/// Check `path` (already validated as a file) is an ext4 image.
pub fn ext4_image(what: &str, path: &Path) -> Result<()> {
    match is_ext4(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::invalid(format!(
            "{what} {} is not an ext4 filesystem image: build it with mkfs.ext4",
            path.display()
        ))),
        Err(e) => Err(Error::invalid(format!(
            "{what} {} cannot be read: {e}",
            path.display()
        ))),
    }
}

/// Parse `name:port` service declarations.
pub fn services(specs: &[String]) -> Result<Vec<Service>> {
    let mut out: Vec<Service> = Vec::new();
    for spec in specs {
        let bad = || {
            Error::invalid(format!(
                "service {spec:?} is not name:port (e.g. ssh:22, port 1-65535)"
            ))
        };
        let (name, port) = spec.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 || name.is_empty() || name.len() > 63 {
            return Err(bad());
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad());
        }
        if out.iter().any(|s| s.name == name || s.port == port) {
            return Err(Error::invalid(format!(
                "service {spec:?} repeats a name or port"
            )));
        }
        out.push(Service {
            name: name.to_owned(),
            port,
        });
    }
    Ok(out)
}

/// Check an init path for the guest: absolute, no odd characters (it ends
/// up on the kernel command line).
pub fn init_path(init: &str) -> Result<()> {
    let ok = init.starts_with('/')
        && init.len() < 256
        && init
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "init {init:?} must be an absolute guest path of letters, digits and /._-+"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn names_are_dns_labels_that_cannot_pass_for_ids() {
        for ok in [
            "x",
            "dev-1",
            "x0",
            "debian-bookworm",
            "0-1",
            &"z".repeat(63),
        ] {
            name("image", ok).expect(ok);
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"z".repeat(64), "ü"] {
            let e = name("image", bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
        }
        // An id, an id prefix, any all-hex word: refused.
        for hex in ["0123456789abcdef", "ab", "cafe", "7", "deadbeef00"] {
            let e = name("image", hex).expect_err(hex);
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains("hex digits"), "{}", e.message);
        }
    }

    #[test]
    fn mode_bits_decide_for_non_root() {
        let r = Reader {
            uid: 1000,
            gids: vec![1000, 50],
        };
        assert!(r.granted(0o400, 1000, 0, 4));
        assert!(!r.granted(0o040, 1000, 1000, 4), "owner bits win");
        assert!(r.granted(0o040, 0, 50, 4));
        assert!(!r.granted(0o600, 0, 0, 4));
        assert!(r.granted(0o604, 0, 0, 4));
        assert!(!r.granted(0o644, 0, 0, 1));
        assert!(
            Reader {
                uid: 0,
                gids: vec![]
            }
            .granted(0, 5, 5, 4)
        );
    }

    #[test]
    fn host_paths_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        let root = Reader {
            uid: 0,
            gids: vec![],
        };
        assert_eq!(
            host_path("kernel", &file, Kind::File, &root).expect("ok"),
            std::fs::canonicalize(&file).expect("canon")
        );
        let e = host_path("kernel", Path::new("rel/f"), Kind::File, &root).expect_err("rel");
        assert!(e.message.contains("relative"), "{}", e.message);
        let e =
            host_path("kernel", &dir.path().join("nope"), Kind::File, &root).expect_err("missing");
        assert!(e.message.contains("does not exist"), "{}", e.message);
        let e = host_path("kernel", dir.path(), Kind::File, &root).expect_err("dir");
        assert!(e.message.contains("not a regular file"), "{}", e.message);
        let e = host_path("modules", &file, Kind::Dir, &root).expect_err("file");
        assert!(e.message.contains("not a directory"), "{}", e.message);

        // A 0700 root directory: a user cannot reach the file inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let user = Reader {
            uid: 4242,
            gids: vec![4242],
        };
        let e = host_path("kernel", &file, Kind::File, &user).expect_err("denied");
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        host_path("kernel", &file, Kind::File, &user).expect("readable now");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            host_path("kernel", &file, Kind::File, &user)
                .expect_err("0600")
                .kind,
            ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn ext4_detection_uses_the_superblock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.ext4");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .arg("4M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs) runs");
        assert!(st.success());
        assert!(is_ext4(&img).expect("read"));
        let not = dir.path().join("zeros");
        std::fs::write(&not, vec![0u8; 4096]).expect("write");
        assert!(!is_ext4(&not).expect("read"));
        assert!(
            ext4_image("rootfs", &not)
                .expect_err("zeros")
                .message
                .contains("not an ext4")
        );
        std::fs::write(&not, b"tiny").expect("write");
        assert!(!is_ext4(&not).expect("short file"));
    }

    #[test]
    fn services_parse() {
        let s = services(&["ssh:22".into(), "opencode:4096".into()]).expect("ok");
        assert_eq!(
            s[1],
            Service {
                name: "opencode".into(),
                port: 4096
            }
        );
        for bad in ["ssh", "ssh:0", "ssh:65536", ":22", "a b:1", "ssh:x"] {
            services(&[bad.into()]).expect_err(bad);
        }
        services(&["a:1".into(), "a:2".into()]).expect_err("dup name");
        services(&["a:1".into(), "b:1".into()]).expect_err("dup port");
    }

    #[test]
    fn init_paths() {
        init_path("/sbin/banger-init").expect("ok");
        for bad in ["sbin/init", "/sbin/init quiet", "/x;rm", ""] {
            init_path(bad).expect_err(bad);
        }
    }
}
