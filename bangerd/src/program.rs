//! Finding an executable: the one lookup `doctor` and the VM lifecycle
//! both use, so that they cannot disagree about whether a VMM is there.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where `bin` runs from: itself when it has a slash, else the first
/// match on `PATH` (or the usual system directories). Only regular files
/// with an execute bit count.
pub fn find(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return executable(bin).then(|| bin.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| executable(p))
}

/// Why [`find`] found nothing, for messages: "was not found" or "is not
/// an executable file".
pub fn why_missing(bin: &Path) -> &'static str {
    if bin.components().count() > 1 && bin.exists() {
        "is not an executable file"
    } else {
        "was not found"
    }
}

fn executable(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_files_are_found() {
        assert!(find(Path::new("sh")).is_some());
        assert!(find(Path::new("/nonexistent/sh")).is_none());
        assert!(find(Path::new("definitely-not-a-banger-program")).is_none());
        assert_eq!(why_missing(Path::new("/nonexistent/sh")), "was not found");
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("qemu");
        std::fs::write(&plain, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(find(&plain).is_none());
        assert_eq!(why_missing(&plain), "is not an executable file");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find(&plain), Some(plain.clone()));
        assert!(find(dir.path()).is_none(), "a directory is no program");
    }
}
