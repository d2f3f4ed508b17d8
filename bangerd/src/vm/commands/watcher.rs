//! The watcher of a VMM process: the only place that records its end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::Vms;
use crate::error::Error;
use crate::vm::process::{ProcessId, Watched};
use crate::vm::{VmEvent, VmState};

use super::store_err;

impl Vms {
    /// Watch VMM process `pid` of VM `id` until it ends, then record it.
    pub(super) fn watch(self: &Arc<Self>, id: &str, pid: ProcessId, mut watched: Watched) {
        let core = self.clone();
        let vm_id = id.to_owned();
        let task = tokio::spawn(async move {
            while !watched.ended() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            core.vmm_exited(&vm_id, pid).await;
        });
        if let Some(old) = self
            .runtime
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), task)
        {
            old.abort();
        }
    }

    /// Record that VM `id`'s VMM `pid` ended: stopped, TAP/name/NAT back.
    async fn vmm_exited(&self, id: &str, pid: ProcessId) {
        // Take the network and the system disk back *before* the row says
        // stopped: a start can only begin once it does, and it must not
        // find (or lose to) the old instance's TAP, address, name or
        // devices on their way out.
        let current = self.store.vm(id).ok().flatten();
        if let Some(vm) = current.filter(|v| v.pid == Some(pid.pid)) {
            if let (Some(net), Some(ip)) = (self.network_if_up().await, self.vm_ipv4(id).await)
                && let Err(e) = net.detach(&vm.name, ip, vm.tap.as_deref()).await
            {
                tracing::warn!(banger_vm_id = %vm.id, "cannot take back the vm's network: {e}");
            }
            self.system_disk_down(&vm).await;
        }
        let result = (|| {
            let _rows = self.quotas.lock();
            let store = &self.store;
            let Some(mut vm) = store.vm(id).map_err(store_err("reading the vm failed"))? else {
                return Ok(None);
            };
            if vm.pid != Some(pid.pid) {
                return Ok(None);
            }
            vm.tap = None;
            vm.pid = None;
            vm.pid_start = None;
            vm.state = vm
                .state
                .after(VmEvent::Exited, &vm.name)
                .unwrap_or(VmState::Stopped);
            store
                .update_vm(&vm)
                .map_err(store_err("recording the vm failed"))?;
            Ok::<_, Error>(Some(vm))
        })();
        self.runtime
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        match result {
            Ok(Some(vm)) => {
                // Announce at once: a stop job that saw the row change
                // completes next, and its Completed must not overtake this.
                self.announce(id);
                tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "vmm exited; vm stopped");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(banger_vm_id = %id, "cannot record the vmm's exit: {e}"),
        }
    }

    /// Kill VM `id`'s VMM, if any, and wait until its end is recorded.
    pub(super) async fn halt(&self, id: &str) {
        let Ok(Some(vm)) = self.store.vm(id) else {
            return;
        };
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return;
        };
        let process = ProcessId { pid, start };
        let _ = self.supervisor.signal(id, process, Signal::SIGKILL).await;
        self.wait_recorded(id, process, Duration::from_secs(15))
            .await;
    }

    /// Wait until the watcher recorded the end of `process`; if there is
    /// no watcher (or it is late), record it here.
    pub(super) async fn wait_recorded(
        &self,
        id: &str,
        process: ProcessId,
        timeout: Duration,
    ) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            match self.store.vm(id) {
                Ok(Some(vm)) if vm.pid == Some(process.pid) => {}
                _ => return true,
            }
            if !process.alive()
                && !self
                    .runtime
                    .watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(id)
            {
                self.vmm_exited(id, process).await;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}
