//! Reconciliation: a restarted bangerd made consistent with what runs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::Vms;
use crate::error::Result;
use crate::vm::VmState;
use crate::vm::process::{ProcessId, Watched};

impl Vms {
    /// Make the store agree with reality after a (re)start: finish
    /// interrupted creates, deletes and restores, listen again for the
    /// recorded port forwards, adopt VMMs that still run, mark
    /// the others stopped, and bring the network up for the running ones.
    /// What runs is asked of the supervisor too, not only of the recorded
    /// pids: a VMM whose start was never recorded (a crash between
    /// starting it and writing its pid), one of a VM recorded stopped, and
    /// one of no VM at all are stopped, so no VMM runs that the store
    /// does not account for.
    pub async fn reconcile_vms(self: &Arc<Self>) -> Result<()> {
        let vms = self.list().await?;
        let starting: HashSet<String> = vms
            .iter()
            .filter(|v| v.state == VmState::Starting)
            .map(|v| v.id.clone())
            .collect();
        // Before any is removed: a VM half deleted stops its own.
        self.resume_forwards(&vms);
        // Settled once no VMM the store does not account for runs.
        let stopped: Vec<crate::vm::Vm> = vms
            .iter()
            .filter(|v| v.state == VmState::Stopped)
            .cloned()
            .collect();
        // A VMM names its runtime directory, or (jailed QEMU) its files;
        // a template's VMM its runtime directory under `templates` (it is
        // of no VM, so it is stopped: its job died with the last run).
        let runs = [
            self.dirs.runtime.join("vms"),
            crate::vm::vmm::vms_dir(&self.dirs.state),
            self.dirs.runtime.join("templates"),
        ];
        let mut seen: HashMap<String, ProcessId> = match self.supervisor.running(&runs).await {
            Ok(running) => running.into_iter().collect(),
            Err(e) => {
                tracing::warn!("cannot list the VMMs that run: {e}");
                HashMap::new()
            }
        };
        let mut adopted = Vec::new();
        // Whether the last run may have left TAPs or NAT elements behind
        // (it died with a VM on its way somewhere, or a VMM ran that it
        // had not recorded): then the network is brought up now, which
        // keeps only what the VMs that run hold.
        let mut sweep = !seen.is_empty();
        for vm in vms {
            sweep |= vm.state != VmState::Stopped;
            let unrecorded = seen.remove(&vm.id);
            match vm.state {
                VmState::Creating | VmState::Deleting => {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, state = vm.state.as_str(), "removing a vm an earlier run left half made");
                    if let Some(p) = unrecorded {
                        self.stop_unaccounted(&vm.id, p).await;
                    }
                    if let Err(e) = self.destroy(&vm.id).await {
                        tracing::error!(banger_vm_id = %vm.id, "cannot remove it: {e}");
                    }
                }
                VmState::Stopped => {
                    if let Some(p) = unrecorded {
                        tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = p.pid, "a vmm runs for a vm recorded stopped; stopping it");
                        self.stop_unaccounted(&vm.id, p).await;
                    }
                }
                VmState::Starting | VmState::Running | VmState::Stopping => {
                    let recorded = match (vm.pid, vm.pid_start) {
                        (Some(pid), Some(start)) => Some(ProcessId { pid, start }),
                        _ => None,
                    }
                    .filter(ProcessId::alive);
                    // A VMM found but not recorded is adopted only when
                    // its start finished (the VM was running); a start cut
                    // short is stopped: its job failed.
                    let process = match (recorded, unrecorded) {
                        (Some(p), other) => {
                            if let Some(o) = other.filter(|o| *o != p) {
                                tracing::warn!(banger_vm_id = %vm.id, pid = o.pid, "a second vmm runs for this vm; stopping it");
                                self.stop_unaccounted(&vm.id, o).await;
                            }
                            Some(p)
                        }
                        (None, Some(p)) if vm.state != VmState::Starting => Some(p),
                        (None, Some(p)) => {
                            tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = p.pid, "its start was cut short; stopping the vmm it left");
                            self.stop_unaccounted(&vm.id, p).await;
                            None
                        }
                        (None, None) => None,
                    };
                    match process {
                        Some(p) => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, pid = p.pid, "adopting a running vm");
                            let _ = self
                                .modify(&vm.id, move |v| {
                                    v.state = VmState::Running;
                                    v.pid = Some(p.pid);
                                    v.pid_start = Some(p.start);
                                })
                                .await;
                            self.watch(&vm.id, p, Watched::Adopted(p));
                            // Its start may have been cut short before
                            // its folders were mounted in the guest.
                            if vm.state == VmState::Starting && !vm.mounts.is_empty() {
                                self.mount_folders_later(vm.clone());
                            }
                            adopted.push(vm);
                        }
                        None => {
                            tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "its vmm is gone; marking it stopped");
                            self.system_disk_down(&vm).await;
                            let _ = self
                                .modify(&vm.id, |v| {
                                    v.state = VmState::Stopped;
                                    v.pid = None;
                                    v.pid_start = None;
                                    v.tap = None;
                                })
                                .await;
                        }
                    }
                }
            }
        }
        // A restore or snapshot the last run did not finish.
        self.settle_disks(&stopped).await;
        // Templates it did not finish, or of images that are gone.
        self.settle_templates().await;

        // VMMs of no VM at all (its row is gone).
        for (id, p) in seen {
            tracing::warn!(banger_vm_id = %id, pid = p.pid, "a vmm runs for a vm banger has no record of; stopping it");
            self.stop_unaccounted(&id, p).await;
        }
        if !adopted.is_empty() || sweep {
            let net = self.network().await?;
            for vm in adopted {
                let switches = crate::net::network::Switches {
                    nat: vm.nat,
                    peers: vm.peers,
                };
                if let Err(e) = net
                    .adopt(&vm.id, &vm.name, switches, vm.tap.as_deref())
                    .await
                {
                    tracing::warn!(banger_vm_id = %vm.id, "cannot restore its name and NAT: {e}");
                }
            }
        }
        // A suspend or resume it did not finish: last, once the VMs it
        // adopted have their network, so that one stopped here gives it
        // back as any VM does.
        if let Err(e) = self.settle_suspends(&starting).await {
            tracing::error!("cannot settle the suspended vms: {e}");
        }
        Ok(())
    }

    /// Stop a VMM the store does not account for, and wait (15 s at most)
    /// until it is gone.
    async fn stop_unaccounted(&self, id: &str, process: ProcessId) {
        if let Err(e) = self.supervisor.signal(id, process, Signal::SIGKILL).await {
            tracing::warn!(banger_vm_id = %id, pid = process.pid, "cannot stop it: {e}");
            return;
        }
        let until = Instant::now() + Duration::from_secs(15);
        while process.alive() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many VMs run (for the status line).
    pub fn running_vms(&self) -> usize {
        self.store.running_vms()
    }
}
