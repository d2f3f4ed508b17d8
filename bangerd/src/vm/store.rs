//! VM rows of the store. Every write is one statement or one transaction.

use rusqlite::{OptionalExtension, Row, params};

use super::{Vm, VmState};
use crate::store::{Store, StoreError};

fn vm_row(r: &Row<'_>) -> rusqlite::Result<Vm> {
    let state: String = r.get("state")?;
    let keys: String = r.get("ssh_keys")?;
    Ok(Vm {
        id: r.get("id")?,
        name: r.get("name")?,
        owner_uid: r.get("owner_uid")?,
        image_id: r.get("image_id")?,
        kernel_id: r.get("kernel_id")?,
        vcpus: r.get("vcpus")?,
        memory_mib: r.get("memory_mib")?,
        disk_bytes: r.get::<_, i64>("disk_bytes")?.max(0) as u64,
        nat: r.get::<_, i64>("nat")? == 1,
        peers: r.get::<_, i64>("peers")? == 1,
        autostart: r.get::<_, i64>("autostart")? == 1,
        // An unknown state can only come from a newer bangerd; treat the
        // VM as stopped so it can at least be deleted.
        state: VmState::parse(&state).unwrap_or(VmState::Stopped),
        // Empty before the first start; an unknown name (a newer
        // bangerd's) reads as none, so the VM can still be deleted.
        vmm: super::VmmDriver::parse(&r.get::<_, String>("vmm")?),
        pid: r.get("pid")?,
        pid_start: r
            .get::<_, Option<i64>>("pid_start")?
            .map(|v| v.max(0) as u64),
        tap: r.get("tap")?,
        ssh_keys: serde_json::from_str(&keys).unwrap_or_default(),
        disk_method: super::disk::DiskMethod::parse(&r.get::<_, String>("disk_method")?),
        created_at: r.get("created_at")?,
        last_error: r.get("last_error")?,
        forwards: serde_json::from_str(&r.get::<_, String>("forwards")?).unwrap_or_default(),
        mounts: serde_json::from_str(&r.get::<_, String>("mounts")?).unwrap_or_default(),
        suspended: r.get::<_, i64>("suspended")? == 1,
    })
}

fn mounts_json(mounts: &[super::Mount]) -> String {
    serde_json::to_string(mounts).unwrap_or_else(|_| "[]".into())
}

fn forwards_json(forwards: &[super::PortForward]) -> String {
    serde_json::to_string(forwards).unwrap_or_else(|_| "[]".into())
}

impl Store {
    /// Record a new VM. A taken name is a UNIQUE violation.
    pub fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO vms (id, name, owner_uid, image_id, kernel_id, vcpus, memory_mib,
                disk_bytes, nat, state, vmm, pid, pid_start, tap, ssh_keys, disk_method,
                created_at, last_error, peers, autostart, forwards, mounts, suspended)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                ?19, ?20, ?21, ?22, ?23)",
            params![
                vm.id,
                vm.name,
                vm.owner_uid,
                vm.image_id,
                vm.kernel_id,
                vm.vcpus,
                vm.memory_mib,
                vm.disk_bytes as i64,
                i64::from(vm.nat),
                vm.state.as_str(),
                vm.vmm.map_or("", |d| d.as_str()),
                vm.pid,
                vm.pid_start.map(|v| v as i64),
                vm.tap,
                serde_json::to_string(&vm.ssh_keys).unwrap_or_else(|_| "[]".into()),
                vm.disk_method.map_or("", |m| m.as_str()),
                vm.created_at,
                vm.last_error,
                i64::from(vm.peers),
                i64::from(vm.autostart),
                forwards_json(&vm.forwards),
                mounts_json(&vm.mounts),
                i64::from(vm.suspended),
            ],
        )?;
        self.count_running(None, Some(vm.state));
        Ok(())
    }

    /// Keep [`Store::running_vms`] as a row goes from `was` to `now`
    /// (`None`: no row). Called with the connection locked.
    fn count_running(&self, was: Option<VmState>, now: Option<VmState>) {
        use std::sync::atomic::Ordering;
        let running = |s: Option<VmState>| s == Some(VmState::Running);
        match (running(was), running(now)) {
            (false, true) => {
                self.running_vms.fetch_add(1, Ordering::SeqCst);
            }
            (true, false) => {
                self.running_vms.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    /// How many VMs are recorded running; reads no rows.
    pub fn running_vms(&self) -> usize {
        self.running_vms.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The state of VM `id`'s row, if there is one, on `conn`.
    fn state_of(conn: &rusqlite::Connection, id: &str) -> Result<Option<VmState>, StoreError> {
        let state: Option<String> = conn
            .query_row("SELECT state FROM vms WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        Ok(state.map(|s| VmState::parse(&s).unwrap_or(VmState::Stopped)))
    }

    /// Write every mutable field of `vm` back. Returns whether it existed.
    pub fn update_vm(&self, vm: &Vm) -> Result<bool, StoreError> {
        let conn = self.conn();
        let was = Self::state_of(&conn, &vm.id)?;
        let updated = conn.execute(
            "UPDATE vms SET vcpus = ?2, memory_mib = ?3, disk_bytes = ?4, nat = ?5, state = ?6,
                vmm = ?7, pid = ?8, pid_start = ?9, tap = ?10, disk_method = ?11,
                last_error = ?12, name = ?13, peers = ?14, autostart = ?15, forwards = ?16,
                mounts = ?17, suspended = ?18
             WHERE id = ?1",
            params![
                vm.id,
                vm.vcpus,
                vm.memory_mib,
                vm.disk_bytes as i64,
                i64::from(vm.nat),
                vm.state.as_str(),
                vm.vmm.map_or("", |d| d.as_str()),
                vm.pid,
                vm.pid_start.map(|v| v as i64),
                vm.tap,
                vm.disk_method.map_or("", |m| m.as_str()),
                vm.last_error,
                vm.name,
                i64::from(vm.peers),
                i64::from(vm.autostart),
                forwards_json(&vm.forwards),
                mounts_json(&vm.mounts),
                i64::from(vm.suspended),
            ],
        )? == 1;
        if updated {
            self.count_running(was, Some(vm.state));
        }
        Ok(updated)
    }

    /// The VMs with a VMM process (starting, running or stopping), oldest
    /// first.
    pub fn vms_with_process(&self) -> Result<Vec<Vm>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT * FROM vms WHERE state IN ('starting', 'running', 'stopping')
             ORDER BY created_at, id",
        )?;
        let rows = st.query_map([], vm_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The VMs marked autostart, oldest first.
    pub fn autostart_vms(&self) -> Result<Vec<Vm>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT * FROM vms WHERE autostart = 1 ORDER BY created_at, id")?;
        let rows = st.query_map([], vm_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every VM, oldest first.
    pub fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM vms ORDER BY created_at, id")?;
        let rows = st.query_map([], vm_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The VMs of `uid`, oldest first (by index: as many rows as it has).
    pub fn vms_of(&self, uid: u32) -> Result<Vec<Vm>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT * FROM vms WHERE owner_uid = ?1 ORDER BY created_at, id")?;
        let rows = st.query_map([uid], vm_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One VM by id.
    pub fn vm(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM vms WHERE id = ?1", [id], vm_row)
            .optional()?)
    }

    /// Names of the VMs using image `id`.
    pub fn vms_using_image(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT name FROM vms WHERE image_id = ?1 ORDER BY name")?;
        let rows = st.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Remove VM `id` and its lease in one transaction. Returns whether it
    /// existed.
    pub fn delete_vm(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let was = Self::state_of(&tx, id)?;
        let ip = Self::leased_address(&tx, id)?;
        tx.execute("DELETE FROM leases WHERE owner = ?1", [id])?;
        let n = tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        tx.commit()?;
        self.count_running(was, None);
        self.lease_gone(ip);
        Ok(n == 1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::artifacts::{Image, Kernel};
    use std::path::PathBuf;

    fn store_with_image() -> Store {
        let store = Store::open_in_memory().expect("store");
        add_image(&store);
        store
    }

    /// Kernel `k1` and image `i1` in `store`.
    fn add_image(store: &Store) {
        store
            .insert_kernel(&Kernel {
                id: "k1".into(),
                name: "k".into(),
                version: String::new(),
                vmlinux: PathBuf::from("/k"),
                bzimage: None,
                initrd: None,
                modules: None,
                sha256: String::new(),
                size_bytes: 0,
                created_at: 0,
                owner_uid: 0,
            })
            .expect("kernel");
        store
            .insert_image(&Image {
                id: "i1".into(),
                name: "i".into(),
                managed: false,
                rootfs: PathBuf::from("/r"),
                rootfs_bytes: 0,
                work_seed: None,
                work_seed_sha256: String::new(),
                kernel_id: "k1".into(),
                services: vec![],
                init: None,
                created_at: 0,
                owner_uid: 0,
            })
            .expect("image");
    }

    pub(crate) fn vm(id: &str, name: &str) -> Vm {
        Vm {
            id: id.into(),
            name: name.into(),
            owner_uid: 1000,
            image_id: "i1".into(),
            kernel_id: "k1".into(),
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 1 << 30,
            nat: false,
            peers: false,
            autostart: false,
            state: VmState::Creating,
            vmm: None,
            pid: None,
            pid_start: None,
            tap: None,
            ssh_keys: vec!["ssh-ed25519 AAAA a@b".into()],
            disk_method: None,
            created_at: 5,
            last_error: String::new(),
            forwards: Vec::new(),
            mounts: Vec::new(),
            suspended: false,
        }
    }

    #[test]
    fn vms_round_trip_update_and_delete_with_their_lease() {
        let store = store_with_image();
        let mut a = vm("a1", "web");
        store.insert_vm(&a).expect("insert");
        let dup = store.insert_vm(&vm("a2", "web")).expect_err("name taken");
        assert!(crate::artifacts::store::is_unique_violation(&dup));
        assert_eq!(store.vm("a1").expect("get"), Some(a.clone()));

        a.state = VmState::Running;
        a.pid = Some(42);
        a.pid_start = Some(7);
        a.tap = Some("bgtap0".into());
        a.nat = true;
        a.peers = true;
        assert!(store.autostart_vms().expect("marked").is_empty());
        a.autostart = true;
        assert!(store.update_vm(&a).expect("update"));
        assert_eq!(store.vms().expect("list"), vec![a.clone()]);
        assert_eq!(store.autostart_vms().expect("marked"), vec![a.clone()]);
        assert_eq!(store.vms_with_process().expect("running"), vec![a.clone()]);
        a.state = VmState::Stopped;
        assert!(store.update_vm(&a).expect("update"));
        assert!(store.vms_with_process().expect("none").is_empty());
        assert_eq!(store.vms_of(1000).expect("mine"), vec![a.clone()]);
        assert!(store.vms_of(1001).expect("theirs").is_empty());
        assert_eq!(store.vms_using_image("i1").expect("users"), ["web"]);

        let subnet = crate::net::leases::Subnet::parse("10.9.0.0/24").expect("subnet");
        let leased = store.lease("a1", &subnet).expect("lease");
        store.lease("x", &subnet).expect("a lease above it");
        assert!(store.delete_vm("a1").expect("delete"));
        assert_eq!(store.leases().expect("leases").len(), 1);
        // Its address is the lowest free one again.
        assert_eq!(store.lease("y", &subnet).expect("lease").ipv4, leased.ipv4);
        assert!(!store.delete_vm("a1").expect("again"));
    }

    #[test]
    fn the_running_count_follows_every_write_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("banger.db");
        let store = Store::open(&path).expect("open");
        add_image(&store);
        let mut a = vm("a1", "web");
        a.state = VmState::Running;
        store.insert_vm(&a).expect("insert");
        let mut b = vm("b1", "db");
        store.insert_vm(&b).expect("insert");
        assert_eq!(store.running_vms(), 1);
        b.state = VmState::Running;
        assert!(store.update_vm(&b).expect("update"));
        assert!(store.update_vm(&b).expect("same again"));
        assert_eq!(store.running_vms(), 2);
        a.state = VmState::Stopped;
        assert!(store.update_vm(&a).expect("update"));
        assert_eq!(store.running_vms(), 1);
        // A VM that is not there changes nothing.
        assert!(!store.update_vm(&vm("x1", "ghost")).expect("no row"));
        assert_eq!(store.running_vms(), 1);
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.running_vms(), 1);
        assert!(store.delete_vm("b1").expect("delete"));
        assert_eq!(store.running_vms(), 0);
    }

    #[test]
    fn an_image_in_use_cannot_be_deleted() {
        let store = store_with_image();
        store.insert_vm(&vm("a1", "web")).expect("insert");
        let e = store.delete_image("i1").expect_err("in use");
        assert!(crate::artifacts::store::is_fk_violation(&e), "{e}");
    }
}
