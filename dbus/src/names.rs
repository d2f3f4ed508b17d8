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
pub const API_VERSION: u32 = 6;

/// Prefix of every error name banger sends.
pub const ERROR_PREFIX: &str = "org.banger.Error";

const JOB_PREFIX: &str = "/org/banger/Manager/job/";

const KERNEL_PREFIX: &str = "/org/banger/Manager/kernel/";
const IMAGE_PREFIX: &str = "/org/banger/Manager/image/";
const VM_PREFIX: &str = "/org/banger/Manager/vm/";

/// Object path of kernel `id` (ids are lowercase hex, valid in a path).
pub fn kernel_path(id: &str) -> OwnedObjectPath {
    entity_path(KERNEL_PREFIX, id)
}

/// Object path of VM `id`.
pub fn vm_path(id: &str) -> OwnedObjectPath {
    entity_path(VM_PREFIX, id)
}

/// The id in a VM object path.
pub fn parse_vm_path(path: &str) -> Option<&str> {
    path.strip_prefix(VM_PREFIX).filter(|s| valid_id(s))
}

/// Object path of image `id`.
pub fn image_path(id: &str) -> OwnedObjectPath {
    entity_path(IMAGE_PREFIX, id)
}

fn entity_path(prefix: &str, id: &str) -> OwnedObjectPath {
    let element: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let element = if element.is_empty() {
        "_".to_owned()
    } else {
        element
    };
    OwnedObjectPath::from(ObjectPath::from_string_unchecked(format!(
        "{prefix}{element}"
    )))
}

/// The id in a kernel object path.
pub fn parse_kernel_path(path: &str) -> Option<&str> {
    path.strip_prefix(KERNEL_PREFIX).filter(|s| valid_id(s))
}

/// The id in an image object path.
pub fn parse_image_path(path: &str) -> Option<&str> {
    path.strip_prefix(IMAGE_PREFIX).filter(|s| valid_id(s))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

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
    fn entity_paths_round_trip_and_stay_valid() {
        assert_eq!(
            kernel_path("0a1b").as_str(),
            "/org/banger/Manager/kernel/0a1b"
        );
        assert_eq!(
            parse_kernel_path(kernel_path("0a1b").as_str()),
            Some("0a1b")
        );
        assert_eq!(parse_image_path(image_path("ff00").as_str()), Some("ff00"));
        assert_eq!(parse_image_path(kernel_path("ff00").as_str()), None);
        // Anything odd still yields a valid path.
        assert!(ObjectPath::try_from(image_path("a-b/c").as_str()).is_ok());
        assert!(ObjectPath::try_from(image_path("").as_str()).is_ok());
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
