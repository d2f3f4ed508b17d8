//! Per-user quotas (`[limits]` in bangerd.toml): how many VMs a uid may
//! have, how many may run, the vCPUs and memory its running VMs take
//! together, and the disk it holds (its VMs' work disks plus the images
//! and kernels it owns). [`Usage`], [`Demand`] and [`check`] are pure
//! arithmetic over the store's rows; [`Quotas`] is the service both the
//! VM and the artifact commands ask: it decides who is exempt (root, and
//! `vm.manage-others` holders when `limits.exempt_admins`) and owns the
//! ledger lock, under which VM rows change and usage is checked, so that
//! two calls cannot both take the last slot.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::artifacts::{Image, Kernel};
use crate::auth::{Action, Authorizer, Caller};
use crate::config::{LimitsConfig, SharedConfig};
use crate::error::{Error, Result};
use crate::store::Store;

use super::Vm;

/// What one uid holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// VMs, running or not.
    pub vms: u32,
    /// VMs with a VMM process (starting, running or stopping).
    pub running: u32,
    /// vCPUs of the running ones.
    pub vcpus: u32,
    /// Memory of the running ones, MiB.
    pub memory_mib: u64,
    /// Work disks (their full size) plus owned images and kernels, bytes.
    pub disk_bytes: u64,
}

impl Usage {
    /// What `uid` holds among these rows. `skip` names a VM left out (the
    /// one a call is about to change, so that it is not counted twice).
    pub fn of(
        uid: u32,
        vms: &[Vm],
        images: &[Image],
        kernels: &[Kernel],
        skip: Option<&str>,
    ) -> Usage {
        let mut u = Usage::default();
        for vm in vms
            .iter()
            .filter(|v| v.owner_uid == uid && Some(v.id.as_str()) != skip)
        {
            u.vms += 1;
            u.disk_bytes += vm.disk_bytes;
            if vm.state.has_process() {
                u.running += 1;
                u.vcpus += vm.vcpus;
                u.memory_mib += u64::from(vm.memory_mib);
            }
        }
        for image in images.iter().filter(|i| i.owner_uid == uid && i.managed) {
            u.disk_bytes += image.rootfs_bytes;
        }
        for kernel in kernels.iter().filter(|k| k.owner_uid == uid) {
            u.disk_bytes += kernel.size_bytes;
        }
        u
    }
}

/// What a call adds to a uid's usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// A new VM.
    pub vm: bool,
    /// A VM that will run: its vCPUs and memory.
    pub run: Option<(u32, u32)>,
    /// vCPUs of the one VM concerned (checked against the per-VM cap).
    pub vcpus_per_vm: u32,
    /// Disk bytes added.
    pub disk_bytes: u64,
}

impl Demand {
    /// Starting a VM of `vcpus` and `memory_mib`.
    pub fn start(vcpus: u32, memory_mib: u32) -> Self {
        Self {
            run: Some((vcpus, memory_mib)),
            vcpus_per_vm: vcpus,
            ..Self::default()
        }
    }

    /// `bytes` more disk (an import, a grown work disk).
    pub fn disk(bytes: u64) -> Self {
        Self {
            disk_bytes: bytes,
            ..Self::default()
        }
    }
}

const GIB: u64 = 1 << 30;

/// Whether `value` passes `cap`; a cap of 0 means none.
fn over(value: u64, cap: u64) -> bool {
    cap != 0 && value > cap
}

/// `Ok` when `usage` plus `add` stays within `limits`; else a
/// `LimitExceeded` error naming the limit, the numbers and what to do.
/// `what` names the VM or object for the message.
pub fn check(limits: &LimitsConfig, usage: &Usage, add: &Demand, what: &str) -> Result<()> {
    if over(u64::from(add.vcpus_per_vm), limits.max_vcpus_per_vm.into()) {
        return Err(Error::limit(format!(
            "{what} would have {} vCPUs, more than one VM may have here ({}, limits.max_vcpus_per_vm); give fewer with --vcpus",
            add.vcpus_per_vm, limits.max_vcpus_per_vm
        )));
    }
    if add.vm && over(u64::from(usage.vms) + 1, limits.max_vms.into()) {
        return Err(Error::limit(format!(
            "you have {} VMs, the most one user may have here (limits.max_vms); delete one first (banger vm delete NAME)",
            usage.vms
        )));
    }
    if let Some((vcpus, memory_mib)) = add.run {
        if over(u64::from(usage.running) + 1, limits.max_running_vms.into()) {
            return Err(Error::limit(format!(
                "you have {} VMs running, the most one user may run at once here (limits.max_running_vms); stop one first (banger vm stop NAME)",
                usage.running
            )));
        }
        let total = usage.vcpus + vcpus;
        if over(total.into(), limits.max_vcpus.into()) {
            return Err(Error::limit(format!(
                "running {what} would give your running VMs {total} vCPUs, more than {} (limits.max_vcpus); stop a VM or give this one fewer",
                limits.max_vcpus
            )));
        }
        let total = usage.memory_mib + u64::from(memory_mib);
        if over(total, limits.max_memory_mib) {
            return Err(Error::limit(format!(
                "running {what} would give your running VMs {total} MiB of memory, more than {} MiB (limits.max_memory_mib); stop a VM or give this one less",
                limits.max_memory_mib
            )));
        }
    }
    if add.disk_bytes > 0 {
        let total = usage.disk_bytes.saturating_add(add.disk_bytes);
        let cap = limits.max_disk_gib.saturating_mul(GIB);
        if limits.max_disk_gib != 0 && total > cap {
            return Err(Error::limit(format!(
                "{what} would bring the disk you hold to {:.1} GiB, more than {} GiB (limits.max_disk_gib); delete VMs, images or kernels you no longer need",
                total as f64 / GIB as f64,
                limits.max_disk_gib
            )));
        }
    }
    Ok(())
}

/// Proof that the ledger lock is held ([`Quotas::lock`]).
pub type Held<'a> = MutexGuard<'a, ()>;

/// The per-user limits in force, checked against the store.
#[derive(Debug)]
pub struct Quotas {
    config: SharedConfig,
    store: Arc<Store>,
    authorizer: Arc<dyn Authorizer>,
    /// Held while VM rows change and while usage is checked.
    ledger: Mutex<()>,
}

impl Quotas {
    /// Limits from `config`'s `[limits]`, usage from `store`.
    pub fn new(config: SharedConfig, store: Arc<Store>, authorizer: Arc<dyn Authorizer>) -> Self {
        Self {
            config,
            store,
            authorizer,
            ledger: Mutex::new(()),
        }
    }

    /// Take the ledger lock: VM rows change under it, and a check made
    /// under it cannot race another for the last slot.
    pub fn lock(&self) -> Held<'_> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `caller` is held to the limits: root never,
    /// `vm.manage-others` holders not while `limits.exempt_admins` (asked
    /// without a prompt: an exemption is never worth one).
    pub async fn applies(&self, caller: &Caller) -> bool {
        if caller.uid == 0 {
            return false;
        }
        if !self.config.get().limits.exempt_admins {
            return true;
        }
        let quiet = Caller {
            allow_interactive: false,
            ..caller.clone()
        };
        self.authorizer
            .authorize(&quiet, Action::VmManageOthers)
            .await
            .is_err()
    }

    /// Check `add` against what `uid` holds (leaving VM `skip` out), with
    /// the ledger lock held.
    pub fn check(
        &self,
        _held: &Held<'_>,
        uid: u32,
        add: &Demand,
        skip: Option<&str>,
        what: &str,
    ) -> Result<()> {
        let usage = self.usage_of(uid, skip)?;
        check(&self.config.get().limits, &usage, add, what)
    }

    /// [`Quotas::check`] under the ledger lock, unless `caller` is exempt
    /// ([`Quotas::applies`]).
    pub async fn enforce(
        &self,
        caller: &Caller,
        uid: u32,
        add: &Demand,
        skip: Option<&str>,
        what: &str,
    ) -> Result<()> {
        if self.applies(caller).await {
            let held = self.lock();
            self.check(&held, uid, add, skip, what)?;
        }
        Ok(())
    }

    /// What `uid` holds now, leaving VM `skip` out.
    pub fn usage_of(&self, uid: u32, skip: Option<&str>) -> Result<Usage> {
        let failed = |context: &'static str| move |e| Error::failed_with(context, &e);
        let vms = self
            .store
            .vms_of(uid)
            .map_err(failed("reading the vms failed"))?;
        let images = self
            .store
            .images()
            .map_err(failed("reading the images failed"))?;
        let kernels = self
            .store
            .kernels()
            .map_err(failed("reading the kernels failed"))?;
        Ok(Usage::of(uid, &vms, &images, &kernels, skip))
    }
}

impl crate::artifacts::DiskQuota for Quotas {
    fn enforce_disk<'a>(
        &'a self,
        caller: &'a Caller,
        uid: u32,
        bytes: u64,
        what: &'a str,
    ) -> crate::auth::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.enforce(caller, uid, &Demand::disk(bytes), None, what)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::vm::VmState;

    fn vm(id: &str, uid: u32, state: VmState) -> Vm {
        Vm {
            id: id.into(),
            name: format!("vm-{id}"),
            owner_uid: uid,
            image_id: String::new(),
            kernel_id: String::new(),
            vcpus: 2,
            memory_mib: 1024,
            disk_bytes: 8 * GIB,
            nat: false,
            peers: false,
            autostart: false,
            state,
            vmm: None,
            pid: None,
            pid_start: None,
            tap: None,
            ssh_keys: Vec::new(),
            disk_method: None,
            created_at: 0,
            last_error: String::new(),
            forwards: Vec::new(),
            mounts: Vec::new(),
            suspended: false,
        }
    }

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_vms: 3,
            max_running_vms: 2,
            max_vcpus_per_vm: 4,
            max_vcpus: 6,
            max_memory_mib: 3072,
            max_disk_gib: 30,
            ..LimitsConfig::default()
        }
    }

    fn refused(r: Result<()>, needle: &str) {
        let e = r.expect_err("refused");
        assert_eq!(e.kind, ErrorKind::LimitExceeded, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn usage_counts_only_the_uids_rows_and_running_ones_for_cpu_and_memory() {
        let vms = [
            vm("a", 1000, VmState::Running),
            vm("b", 1000, VmState::Stopped),
            vm("c", 1000, VmState::Starting),
            vm("d", 1001, VmState::Running),
        ];
        let u = Usage::of(1000, &vms, &[], &[], None);
        assert_eq!(
            u,
            Usage {
                vms: 3,
                running: 2,
                vcpus: 4,
                memory_mib: 2048,
                disk_bytes: 24 * GIB
            }
        );
        let u = Usage::of(1000, &vms, &[], &[], Some("a"));
        assert_eq!((u.vms, u.running, u.vcpus), (2, 1, 2));
    }

    #[test]
    fn each_limit_refuses_with_its_name_and_the_edge_passes() {
        let l = limits();
        let none = Usage::default();
        let per_vm = |v| Demand {
            vcpus_per_vm: v,
            ..Demand::default()
        };
        check(&l, &none, &per_vm(4), "x").expect("at the cap");
        refused(check(&l, &none, &per_vm(5), "x"), "limits.max_vcpus_per_vm");

        let new_vm = Demand {
            vm: true,
            ..Demand::default()
        };
        let two = Usage {
            vms: 2,
            ..Usage::default()
        };
        check(&l, &two, &new_vm, "x").expect("third vm");
        let three = Usage { vms: 3, ..two };
        refused(check(&l, &three, &new_vm, "x"), "limits.max_vms");

        let run = |v, m| Demand {
            run: Some((v, m)),
            ..Demand::default()
        };
        let one = Usage {
            running: 1,
            vcpus: 2,
            memory_mib: 1024,
            ..Usage::default()
        };
        check(&l, &one, &run(4, 2048), "x").expect("exactly at both caps");
        refused(check(&l, &one, &run(5, 1024), "x"), "limits.max_vcpus");
        refused(check(&l, &one, &run(2, 2049), "x"), "limits.max_memory_mib");
        let both = Usage { running: 2, ..one };
        refused(
            check(&l, &both, &run(1, 128), "x"),
            "limits.max_running_vms",
        );

        let disk = |b| Demand {
            disk_bytes: b,
            ..Demand::default()
        };
        let some = Usage {
            disk_bytes: 20 * GIB,
            ..Usage::default()
        };
        check(&l, &some, &disk(10 * GIB), "x").expect("at the cap");
        refused(
            check(&l, &some, &disk(10 * GIB + 1), "x"),
            "limits.max_disk_gib",
        );
        // Nothing added, nothing checked: a user over a lowered cap can
        // still start and stop what they have.
        let over = Usage {
            disk_bytes: 100 * GIB,
            ..Usage::default()
        };
        check(&l, &over, &disk(0), "x").expect("no disk added");

        // 0 is no limit at all.
        let none_set = LimitsConfig {
            max_vms: 0,
            max_running_vms: 0,
            max_vcpus_per_vm: 0,
            max_vcpus: 0,
            max_memory_mib: 0,
            max_disk_gib: 0,
            ..l
        };
        let huge = Usage {
            vms: 10_000,
            running: 10_000,
            vcpus: 10_000,
            memory_mib: 1 << 30,
            disk_bytes: u64::MAX / 2,
        };
        let all = Demand {
            vm: true,
            run: Some((64, 1 << 18)),
            vcpus_per_vm: 64,
            disk_bytes: 1 << 44,
        };
        check(&none_set, &huge, &all, "x").expect("no limits");
    }
}
