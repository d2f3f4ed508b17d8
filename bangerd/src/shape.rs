//! The bounds of a VM's shape (vCPUs, memory, work disk): one fact that
//! the configuration's defaults and every create or set are checked
//! against.

use crate::error::{Error, Result};

/// Fewest / most vCPUs.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=64;
/// Least / most memory in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 128..=262_144;
/// Smallest / largest work disk in bytes.
pub const DISK_BYTES: std::ops::RangeInclusive<u64> = (64 << 20)..=(16 << 40);

/// Check sizes; the message names the bad value and the allowed range.
pub fn validate_sizes(vcpus: u32, memory_mib: u32, disk_bytes: u64) -> Result<()> {
    if !VCPUS.contains(&vcpus) {
        return Err(Error::invalid(format!(
            "vcpus {vcpus} is out of range: give {} to {}",
            VCPUS.start(),
            VCPUS.end()
        )));
    }
    if !MEMORY_MIB.contains(&memory_mib) {
        return Err(Error::invalid(format!(
            "memory {memory_mib} MiB is out of range: give {} MiB to {} MiB",
            MEMORY_MIB.start(),
            MEMORY_MIB.end()
        )));
    }
    if !DISK_BYTES.contains(&disk_bytes) {
        return Err(Error::invalid(format!(
            "disk size {disk_bytes} bytes is out of range: give 64 MiB to 16 TiB"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn sizes_are_checked() {
        assert!(validate_sizes(2, 512, 1 << 30).is_ok());
        for (v, m, d, word) in [
            (0, 512, 1 << 30, "vcpus"),
            (65, 512, 1 << 30, "vcpus"),
            (1, 64, 1 << 30, "memory"),
            (1, 512, 1 << 20, "disk size"),
        ] {
            let e = validate_sizes(v, m, d).expect_err("refused");
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains(word), "{}", e.message);
        }
    }
}
