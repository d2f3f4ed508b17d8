//! Autostart: VMs marked so are started when bangerd first starts after
//! the host booted, as `docker run --restart` or Multipass's autostart
//! bring dev boxes back. "First after a boot": the runtime directory
//! (emptied by every boot, kept across bangerd's own restarts) holds no
//! [`BOOTED`] file naming the kernel's current boot id.
//!
//! bangerd is D-Bus activated and does not start at boot by itself. The
//! flag file [`AUTOSTART_FLAG`] in the state directory exists while some
//! VM is marked autostart; the package's `banger-autostart.service`
//! (enabled for `multi-user.target`, `ConditionPathExists=` that file)
//! activates bangerd at boot, with one D-Bus call, only then.

use std::sync::Arc;

use super::{Vms, blocking, store_err};
use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::jobs::JobId;
use crate::vm::VmState;

/// The flag file, in the state directory, that says some VM is marked
/// autostart.
pub const AUTOSTART_FLAG: &str = "autostart";

/// The file, in the runtime directory, naming the boot under which
/// bangerd last autostarted VMs.
pub const BOOTED: &str = "autostarted-boot";

/// The kernel's id of the current boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

impl Vms {
    /// Make the flag file say whether any VM is marked autostart.
    pub async fn sync_autostart_flag(&self) {
        let store = self.store.clone();
        let flag = self.dirs.state.join(AUTOSTART_FLAG);
        let synced = blocking(move || {
            let any = !store
                .autostart_vms()
                .map_err(store_err("reading the vms failed"))?
                .is_empty();
            write_flag(&flag, any)
        })
        .await;
        if let Err(e) = synced {
            tracing::warn!("{e}");
        }
    }

    /// Start every stopped VM marked autostart, if this is bangerd's
    /// first start since the host booted. Returns the VMs' ids and their
    /// start jobs (empty on a later start of the same boot). The boot is
    /// recorded once the jobs are under way, so a daemon that dies
    /// before that tries again.
    pub async fn autostart(self: &Arc<Self>) -> Result<Vec<(String, JobId)>> {
        let store = self.store.clone();
        let flag = self.dirs.state.join(AUTOSTART_FLAG);
        let booted = self.dirs.runtime.join(BOOTED);
        let marker = booted.clone();
        let (boot, last, vms) = blocking(move || {
            let boot = std::fs::read_to_string(BOOT_ID)
                .map_err(|e| Error::failed(format!("cannot read {BOOT_ID}: {e}")))?
                .trim()
                .to_owned();
            let last = std::fs::read_to_string(&marker)
                .ok()
                .map(|s| s.trim().to_owned());
            let vms = store
                .autostart_vms()
                .map_err(store_err("reading the vms failed"))?;
            if let Err(e) = write_flag(&flag, !vms.is_empty()) {
                tracing::warn!("{e}");
            }
            Ok((boot, last, vms))
        })
        .await?;
        if last.as_deref() == Some(boot.as_str()) {
            return Ok(Vec::new());
        }
        let mut started = Vec::new();
        for vm in vms.into_iter().filter(|v| v.state == VmState::Stopped) {
            // The daemon's own doing: the owner asked for it when marking
            // the VM.
            match self.start_vm(&Caller::root(), &vm.id).await {
                Ok(job) => {
                    tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, job, "starting vm marked autostart");
                    started.push((vm.id, job));
                }
                Err(e) => {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "cannot autostart vm: {e}");
                }
            }
        }
        blocking(move || {
            std::fs::write(&booted, format!("{boot}\n"))
                .map_err(|e| Error::failed(format!("cannot write {}: {e}", booted.display())))
        })
        .await?;
        Ok(started)
    }
}

/// Make the flag file say whether `any` VM is marked autostart.
fn write_flag(flag: &std::path::Path, any: bool) -> Result<()> {
    let written = if any {
        std::fs::write(flag, "some VMs start at boot; see banger vm list\n")
    } else {
        match std::fs::remove_file(flag) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    written.map_err(|e| Error::failed(format!("cannot update {}: {e}", flag.display())))
}
