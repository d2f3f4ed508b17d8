//! Free space checks before something large is written: a VM's disks, an
//! import, a download. Shared by the VM and artifact commands.

use std::path::Path;

use crate::error::{Error, Result};

/// Free bytes on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Error::failed(format!("cannot stat {}: {e}", dir.display())))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Refuse a create that would not fit: `needed` bytes on the filesystem of
/// `dir` (plus 256 MiB to spare).
pub fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let free = free_bytes(dir)?;
    let spare = 256 << 20;
    if free < needed + spare {
        return Err(Error::unavailable(format!(
            "not enough disk space in {}: {} MiB free, {} MiB needed; free some space or delete VMs",
            dir.display(),
            free >> 20,
            (needed + spare) >> 20
        )));
    }
    Ok(())
}

/// Fail with Unavailable unless `dir`'s filesystem has room for `needed`
/// bytes of `what` (a download about to start: no spare is asked for,
/// since what follows it is checked or fails cleanly on its own).
pub fn check_room(dir: &Path, needed: u64, what: &str) -> Result<()> {
    let free = free_bytes(dir)?;
    if free < needed {
        return Err(Error::unavailable(format!(
            "not enough disk space in {} for {what}: {} MiB free, {} MiB needed; free some space or delete VMs and images",
            dir.display(),
            free >> 20,
            needed.div_ceil(1 << 20)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_checked_against_the_real_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        check_room(dir.path(), 1, "a byte").expect("a byte fits");
        let e = check_room(dir.path(), u64::MAX / 2, "the layers").expect_err("too much");
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable, "{e}");
        assert!(e.message.contains("for the layers"), "{e}");
    }

    #[test]
    fn space_checks_refuse_the_impossible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check_space(dir.path(), u64::MAX / 4).expect_err("too big");
        assert!(e.message.contains("not enough disk space"), "{}", e.message);
        check_space(dir.path(), 1).expect("fits");
    }
}
