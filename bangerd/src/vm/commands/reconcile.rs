//! Reconciliation: a restarted bangerd made consistent with what runs.

use std::sync::Arc;

use super::Vms;
use crate::error::Result;
use crate::vm::VmState;
use crate::vm::process::{ProcessId, Watched};

impl Vms {
    /// Make the store agree with reality after a (re)start: finish
    /// interrupted creates and deletes, adopt VMMs that still run, mark
    /// the others stopped, and bring the network up for the running ones.
    pub async fn reconcile_vms(self: &Arc<Self>) -> Result<()> {
        let vms = self.list().await?;
        let mut adopted = Vec::new();
        for vm in vms {
            match vm.state {
                VmState::Creating | VmState::Deleting => {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, state = vm.state.as_str(), "removing a vm an earlier run left half made");
                    if let Err(e) = self.destroy(&vm.id).await {
                        tracing::error!(banger_vm_id = %vm.id, "cannot remove it: {e}");
                    }
                }
                VmState::Stopped => {}
                VmState::Starting | VmState::Running | VmState::Stopping => {
                    let process = match (vm.pid, vm.pid_start) {
                        (Some(pid), Some(start)) => Some(ProcessId { pid, start }),
                        _ => None,
                    };
                    match process.filter(ProcessId::alive) {
                        Some(p) => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = p.pid, "adopting a running vm");
                            let _ = self.modify(&vm.id, |v| v.state = VmState::Running);
                            self.watch(&vm.id, p, Watched::Adopted(p));
                            adopted.push(vm);
                        }
                        None => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "its vmm is gone; marking it stopped");
                            self.system_disk_down(&vm).await;
                            let _ = self.modify(&vm.id, |v| {
                                v.state = VmState::Stopped;
                                v.pid = None;
                                v.pid_start = None;
                                v.tap = None;
                            });
                        }
                    }
                }
            }
        }
        if !adopted.is_empty() {
            let net = self.network().await?;
            for vm in adopted {
                if let Err(e) = net.adopt(&vm.id, &vm.name, vm.nat).await {
                    tracing::warn!(banger_vm_id = %vm.id, "cannot restore its name and NAT: {e}");
                }
            }
        }
        Ok(())
    }

    /// How many VMs run (for the status line).
    pub fn running_vms(&self) -> usize {
        self.store
            .vms()
            .map(|v| v.iter().filter(|v| v.state == VmState::Running).count())
            .unwrap_or(0)
    }
}
