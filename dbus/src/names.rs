//! Bus names, interface names and object paths.

use zbus::{ObjectPath, OwnedObjectPath};

/// Well-known bus name owned by `bangerd` on the system bus.
pub const BUS_NAME: &str = "org.banger.Manager";
/// Path of the manager object (also the ObjectManager root).
pub const MANAGER_PATH: &str = "/org/banger/Manager";
/// Interface of the manager object.
pub const MANAGER_INTERFACE: &str = "org.banger.Manager";
/// Interface of job objects.
pub const JOB_INTERFACE: &str = "org.banger.Job";
/// Interface of VM objects (served once VMs exist).
pub const VM_INTERFACE: &str = "org.banger.VM";
/// Interface of image objects (served once images exist).
pub const IMAGE_INTERFACE: &str = "org.banger.Image";
/// Interface of kernel objects (served once kernels exist).
pub const KERNEL_INTERFACE: &str = "org.banger.Kernel";

/// Version of the D-Bus API; bumped when members are added.
pub const API_VERSION: u32 = 1;

/// Prefix of every error name banger sends.
pub const ERROR_PREFIX: &str = "org.banger.Error";

const JOB_PREFIX: &str = "/org/banger/Manager/job/";

/// Object path of job `n`.
pub fn job_path(n: u64) -> OwnedObjectPath {
    // A path made of a fixed valid prefix and decimal digits is always valid.
    OwnedObjectPath::from(ObjectPath::from_string_unchecked(format!(
        "{JOB_PREFIX}{n}"
    )))
}

/// The job number of a job object path, or `None` when `path` is not one.
pub fn parse_job_path(path: &str) -> Option<u64> {
    let digits = path.strip_prefix(JOB_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// The root path, used as the "no result" object path in `Completed`.
pub fn no_object() -> OwnedObjectPath {
    OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_paths_round_trip() {
        for n in [0, 1, 42, u64::MAX] {
            assert_eq!(parse_job_path(job_path(n).as_str()), Some(n));
        }
    }

    #[test]
    fn bad_job_paths_are_rejected() {
        for p in [
            "/org/banger/Manager/job/",
            "/org/banger/Manager/job/x",
            "/org/banger/Manager/job/01",
            "/org/banger/Manager/job/1/2",
            "/org/banger/Manager/vm/1",
            "/org/banger/Manager/job/99999999999999999999999",
        ] {
            assert_eq!(parse_job_path(p), None, "{p}");
        }
    }
}
