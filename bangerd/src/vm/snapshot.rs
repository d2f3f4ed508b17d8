//! System disks as device-mapper snapshots, where device-mapper exists:
//! the image's rootfs on a read-only loop device is the origin, a sparse
//! per-VM file on another loop device holds the changes (a persistent
//! exception store, so they survive stop and start), and
//! `/dev/mapper/banger-<id>-system` is what the VMM opens. Creating a VM
//! costs one sparse file, whatever the image's size.
//!
//! The device is made when the VM starts and taken down when its VMM
//! exits; the loop devices used are recorded in the VM's runtime
//! directory so that exactly those are detached. Loop devices go through
//! `loopdev-3`; device-mapper through [`DeviceMapper`], whose real
//! implementation (`os::dm`) uses the `devicemapper` crate. The test
//! machines have no device-mapper: the tests use real loop devices and a
//! [`DeviceMapper`] that checks each table against the kernel's format
//! and the devices it names.

use std::path::{Path, PathBuf};

use super::disk::snapshot_tables;
use crate::error::{Error, Result};

/// One line of a device-mapper table: `<start> <length> <target> <args>`,
/// in 512-byte sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector.
    pub start: u64,
    /// Number of sectors.
    pub length: u64,
    /// Target type (`snapshot`, `linear`).
    pub kind: String,
    /// The target's arguments.
    pub params: String,
}

impl Target {
    /// Parse one table line.
    pub fn parse(line: &str) -> Result<Self> {
        let mut f = line.splitn(4, ' ');
        let bad = || Error::invalid(format!("not a device-mapper table line: {line:?}"));
        let start = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let length = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let kind = f.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let params = f.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        Ok(Self {
            start,
            length,
            kind: kind.to_owned(),
            params: params.to_owned(),
        })
    }
}

/// The device-mapper operations a snapshot disk needs.
pub trait DeviceMapper: Send + Sync + std::fmt::Debug {
    /// Whether device-mapper can be used here.
    fn available(&self) -> bool;
    /// Create device `name` with the one-line table `target` and activate
    /// it; its node under `/dev/mapper`.
    fn create(&self, name: &str, target: &Target) -> Result<PathBuf>;
    /// Remove device `name`; nothing when there is none.
    fn remove(&self, name: &str) -> Result<()>;
}

/// No device-mapper (the default where `/dev/mapper/control` is absent).
#[derive(Debug, Default, Clone, Copy)]
pub struct Absent;

impl DeviceMapper for Absent {
    fn available(&self) -> bool {
        false
    }
    fn create(&self, name: &str, _: &Target) -> Result<PathBuf> {
        Err(Error::unavailable(format!(
            "cannot create {name}: device-mapper is not available here"
        )))
    }
    fn remove(&self, _: &str) -> Result<()> {
        Ok(())
    }
}

/// The device-mapper name of VM `id`'s system disk.
pub fn dm_name(id: &str) -> String {
    format!("banger-{id}-system")
}

/// Make the sparse change store for a snapshot of a `base_bytes` image:
/// room for every chunk to change plus the exception store's metadata.
/// It costs disk space only as the guest writes.
pub fn make_cow(cow: &Path, base_bytes: u64) -> Result<()> {
    let size = base_bytes + base_bytes / 32 + (8 << 20);
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(cow)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", cow.display())))?;
    file.set_len(size)
        .map_err(|e| Error::failed(format!("cannot size {}: {e}", cow.display())))?;
    Ok(())
}

fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    let control = loopdev::LoopControl::open()
        .map_err(|e| Error::unavailable(format!("cannot open /dev/loop-control: {e}")))?;
    let device = control
        .next_free()
        .map_err(|e| Error::failed(format!("no free loop device: {e}")))?;
    device
        .with()
        .read_only(read_only)
        .autoclear(false)
        .attach(file)
        .map_err(|e| {
            Error::failed(format!(
                "cannot attach {} to a loop device: {e}",
                file.display()
            ))
        })?;
    device
        .path()
        .ok_or_else(|| Error::failed("the loop device has no path"))
}

fn detach(device: &Path) -> Result<()> {
    let loop_device = match loopdev::LoopDevice::open(device) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::failed(format!(
                "cannot open {}: {e}",
                device.display()
            )));
        }
    };
    match loop_device.detach() {
        Ok(()) => Ok(()),
        // Nothing attached any more.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => Ok(()),
        Err(e) => Err(Error::failed(format!(
            "cannot detach {}: {e}",
            device.display()
        ))),
    }
}

/// Bring up VM `id`'s system disk: `base` read-only and `cow` on loop
/// devices (recorded in `record`), the snapshot over them. Undoes what it
/// made when a step fails. Returns the device the VMM opens.
pub fn activate(
    dm: &dyn DeviceMapper,
    id: &str,
    base: &Path,
    cow: &Path,
    record: &Path,
) -> Result<PathBuf> {
    let base_bytes = std::fs::metadata(base)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", base.display())))?
        .len();
    let origin = attach(base, true)?;
    let changes = match attach(cow, false) {
        Ok(d) => d,
        Err(e) => {
            let _ = detach(&origin);
            return Err(e);
        }
    };
    let undo = |e: Error| {
        let _ = detach(&changes);
        let _ = detach(&origin);
        let _ = std::fs::remove_file(record);
        e
    };
    std::fs::write(
        record,
        format!("{}\n{}\n", origin.display(), changes.display()),
    )
    .map_err(|e| {
        undo(Error::failed(format!(
            "cannot write {}: {e}",
            record.display()
        )))
    })?;
    let (_, snapshot) = snapshot_tables(
        &origin.to_string_lossy(),
        &changes.to_string_lossy(),
        base_bytes,
    )
    .map_err(undo)?;
    let target = Target::parse(&snapshot).map_err(undo)?;
    dm.create(&dm_name(id), &target).map_err(undo)
}

/// Take down VM `id`'s system disk: the device, then the loop devices
/// `record` names. Safe to repeat, and a no-op when nothing is up.
pub fn deactivate(dm: &dyn DeviceMapper, id: &str, record: &Path) -> Result<()> {
    dm.remove(&dm_name(id))?;
    let Ok(text) = std::fs::read_to_string(record) else {
        return Ok(());
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        detach(Path::new(line))?;
    }
    let _ = std::fs::remove_file(record);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The file behind loop device `dev`, from sysfs.
    fn backing_file(dev: &Path) -> Option<PathBuf> {
        let name = dev.file_name()?.to_str()?;
        let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim()))
    }

    fn read_only(dev: &Path) -> bool {
        let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        std::fs::read_to_string(format!("/sys/block/{name}/ro")).is_ok_and(|t| t.trim() == "1")
    }

    /// Checks every table it is given the way the kernel would: the
    /// snapshot target's argument count and persistence flag, and that
    /// origin and change store are loop devices over the right files with
    /// the right modes and sizes. "Creates" nothing, since no
    /// device-mapper runs here.
    #[derive(Debug, Default)]
    struct CheckingDm {
        base: PathBuf,
        cow: PathBuf,
        fail: bool,
        created: Mutex<Vec<String>>,
        removed: Mutex<Vec<String>>,
    }

    impl DeviceMapper for CheckingDm {
        fn available(&self) -> bool {
            true
        }
        fn create(&self, name: &str, t: &Target) -> Result<PathBuf> {
            assert_eq!(t.start, 0);
            assert_eq!(t.kind, "snapshot");
            let args: Vec<&str> = t.params.split(' ').collect();
            assert_eq!(
                args.len(),
                4,
                "snapshot <origin> <cow> <P|N> <chunk>: {t:?}"
            );
            assert_eq!(&args[2..], ["P", "8"]);
            let (origin, cow) = (Path::new(args[0]), Path::new(args[1]));
            assert_eq!(backing_file(origin).as_deref(), Some(self.base.as_path()));
            assert_eq!(backing_file(cow).as_deref(), Some(self.cow.as_path()));
            assert!(read_only(origin), "the origin is attached read-only");
            assert!(!read_only(cow));
            let base_bytes = std::fs::metadata(&self.base).expect("base").len();
            assert_eq!(t.length * 512, base_bytes);
            if self.fail {
                return Err(Error::failed("refused"));
            }
            self.created.lock().expect("lock").push(name.to_owned());
            Ok(Path::new("/dev/mapper").join(name))
        }
        fn remove(&self, name: &str) -> Result<()> {
            self.removed.lock().expect("lock").push(name.to_owned());
            Ok(())
        }
    }

    /// The loop devices still bound to `file`. A detach while another
    /// process has the device open (here: a parallel test's `mount -o
    /// loop` scanning for overlaps) is deferred by the kernel to the last
    /// close and shows as the autoclear flag, which [`attach`] never
    /// sets: such a device is already on its way out and is not counted.
    fn loops_on(file: &Path) -> Vec<String> {
        std::fs::read_dir("/sys/block")
            .expect("sysfs")
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                let autoclear = std::fs::read_to_string(e.path().join("loop/autoclear")).ok()?;
                (Path::new(backing.trim()) == file && autoclear.trim() == "0").then_some(name)
            })
            .collect()
    }

    #[test]
    fn table_lines_parse_and_nonsense_does_not() {
        let (_, snap) = snapshot_tables("/dev/loop3", "/dev/loop4", 1 << 20).expect("tables");
        let t = Target::parse(&snap).expect("parse");
        assert_eq!(
            t,
            Target {
                start: 0,
                length: 2048,
                kind: "snapshot".into(),
                params: "/dev/loop3 /dev/loop4 P 8".into()
            }
        );
        for bad in ["", "0", "0 10", "0 10 linear", "x 10 linear /dev/a 0"] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            dm_name("0123456789abcdef"),
            "banger-0123456789abcdef-system"
        );
        assert!(!Absent.available());
        assert!(Absent.create("x", &t).is_err());
    }

    #[test]
    fn a_snapshot_disk_comes_up_on_real_loop_devices_and_goes_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("rootfs.ext4");
        std::fs::write(&base, vec![0x5a; 4 << 20]).expect("base");
        let cow = dir.path().join("system.cow");
        make_cow(&cow, 4 << 20).expect("cow");
        assert!(make_cow(&cow, 4 << 20).is_err(), "never overwrites");
        let meta = std::fs::metadata(&cow).expect("cow");
        assert!(meta.len() > 4 << 20);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.blocks(), 0, "the change store is sparse");
        let record = dir.path().join("loops");
        let dm = CheckingDm {
            base: base.clone(),
            cow: cow.clone(),
            ..CheckingDm::default()
        };
        let dev = activate(&dm, "0123456789abcdef", &base, &cow, &record).expect("activate");
        assert_eq!(dev, Path::new("/dev/mapper/banger-0123456789abcdef-system"));
        assert_eq!(loops_on(&base).len(), 1);
        assert_eq!(loops_on(&cow).len(), 1);
        deactivate(&dm, "0123456789abcdef", &record).expect("deactivate");
        assert!(loops_on(&base).is_empty() && loops_on(&cow).is_empty());
        assert_eq!(
            *dm.removed.lock().expect("lock"),
            ["banger-0123456789abcdef-system"]
        );
        // Again, with nothing up: fine.
        deactivate(&dm, "0123456789abcdef", &record).expect("repeat");

        // A refused table leaves no loop device or record behind.
        let refusing = CheckingDm {
            base: base.clone(),
            cow: cow.clone(),
            fail: true,
            ..CheckingDm::default()
        };
        assert!(activate(&refusing, "0123456789abcdef", &base, &cow, &record).is_err());
        assert!(loops_on(&base).is_empty() && loops_on(&cow).is_empty());
        assert!(!record.exists());
    }
}
