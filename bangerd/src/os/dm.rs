//! [`DeviceMapper`] backed by the kernel through the `devicemapper` crate
//! (ioctls on `/dev/mapper/control`). Not exercised on the test machines,
//! which have no device-mapper; what it loads comes from
//! `vm::disk::snapshot_tables`, tested against the kernel's table format.

use std::path::{Path, PathBuf};

use devicemapper::{DM, DevId, DmName, DmOptions};

use crate::error::{Error, Result};
use crate::vm::snapshot::{DeviceMapper, Target};

/// The control node.
const CONTROL: &str = "/dev/mapper/control";

/// The kernel's device-mapper.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dm;

fn dm() -> Result<DM> {
    DM::new().map_err(|e| Error::unavailable(format!("device-mapper is not usable: {e}")))
}

fn name(name: &str) -> Result<&DmName> {
    DmName::new(name).map_err(|e| Error::invalid(format!("bad device-mapper name {name:?}: {e}")))
}

impl DeviceMapper for Dm {
    fn available(&self) -> bool {
        Path::new(CONTROL).exists() && DM::new().is_ok()
    }

    fn create(&self, device: &str, target: &Target) -> Result<PathBuf> {
        let dm = dm()?;
        let dm_name = name(device)?;
        let id = DevId::Name(dm_name);
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            Error::failed(format!("device-mapper could not {what} {device}: {e}"))
        };
        dm.device_create(dm_name, None, DmOptions::default())
            .map_err(|e| failed("create", &e))?;
        let table = vec![(
            target.start,
            target.length,
            target.kind.clone(),
            target.params.clone(),
        )];
        let loaded = dm
            .table_load(&id, &table, DmOptions::default())
            // Without the suspend flag this resumes: the table goes live.
            .and_then(|_| dm.device_suspend(&id, DmOptions::default()));
        match loaded {
            // devtmpfs names the node after the minor number.
            Ok(info) => Ok(PathBuf::from(format!("/dev/dm-{}", info.device().minor))),
            Err(e) => {
                let _ = dm.device_remove(&id, DmOptions::default());
                Err(failed("load the table of", &e))
            }
        }
    }

    fn remove(&self, device: &str) -> Result<()> {
        if !Path::new(CONTROL).exists() {
            return Ok(());
        }
        let dm = dm()?;
        let dm_name = name(device)?;
        let id = DevId::Name(dm_name);
        if dm.device_info(&id).is_err() {
            return Ok(());
        }
        dm.device_remove(&id, DmOptions::default())
            .map(|_| ())
            .map_err(|e| Error::failed(format!("device-mapper could not remove {device}: {e}")))
    }
}
