//! `org.banger.VM` objects at `/org/banger/Manager/vm/<id>`: a view of one
//! VM, refreshed when the core says it changed, and its methods.

use std::collections::HashMap;
use std::sync::Arc;

use banger_dbus::vm_path;
use zbus::OwnedVariant as OwnedValue;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectServer, OwnedObjectPath, interface};

use super::options::{Options, parsed};
use super::{caller, job, to_wire};
use crate::core::Core;
use crate::vm::Vm;
use crate::vm::commands::{ExecRequest, VmChanges};

/// One VM on the bus. What it shows is behind a lock of its own, so the
/// front end refreshes it with the object server's read lock only: a
/// method of the object may wait for that refresh ([`VmObject::set`]).
#[derive(Debug)]
pub struct VmObject {
    core: Arc<Core>,
    id: String,
    view: std::sync::Mutex<View>,
}

/// What a VM object shows.
#[derive(Debug)]
struct View {
    vm: Vm,
    ipv4: String,
    mac: String,
    snapshots: Vec<(String, u64, u64)>,
}

impl VmObject {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `result` of a call that changed the VM, answered once the change
    /// is on the bus: a caller that reads the VM back right after sees it.
    async fn changed<T>(&self, result: crate::error::Result<T>) -> Result<T, banger_dbus::Reply> {
        let value = result.map_err(to_wire)?;
        self.core.jobs().published(super::PUBLISHED_LIMIT).await;
        Ok(value)
    }

    /// Show `fresh` and announce every property that may have changed.
    async fn show(&self, fresh: View, emitter: &SignalEmitter<'_>) -> zbus::Result<()> {
        *self.view() = fresh;
        self.name_changed(emitter).await?;
        self.state_changed(emitter).await?;
        self.i_pv4_changed(emitter).await?;
        self.m_a_c_changed(emitter).await?;
        self.v_c_p_us_changed(emitter).await?;
        self.memory_mi_b_changed(emitter).await?;
        self.disk_bytes_changed(emitter).await?;
        self.n_a_t_changed(emitter).await?;
        self.peers_changed(emitter).await?;
        self.autostart_changed(emitter).await?;
        self.unit_changed(emitter).await?;
        self.last_error_changed(emitter).await?;
        self.disk_method_changed(emitter).await?;
        self.snapshots_changed(emitter).await?;
        self.forwards_changed(emitter).await?;
        self.mounts_changed(emitter).await?;
        self.suspended_changed(emitter).await?;
        Ok(())
    }
}

/// A virtual machine. Long operations (Start, Stop, Restart, Delete)
/// return a job at once. polkit: org.banger.vm.manage for one's own VMs,
/// plus org.banger.vm.manage-others for someone else's.
#[interface(name = "org.banger.VM")]
impl VmObject {
    /// Stable id (16 lowercase hex digits); the last element of the path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Unique name, a DNS label; also `<name>.vm` in DNS.
    #[zbus(property)]
    fn name(&self) -> String {
        self.view().vm.name.clone()
    }

    /// creating, stopped, starting, running, stopping or deleting.
    #[zbus(property)]
    fn state(&self) -> String {
        self.view().vm.state.as_str().to_owned()
    }

    /// Uid that created it.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> u32 {
        self.view().vm.owner_uid
    }

    /// Its IPv4 address on the bridge; empty before its first start.
    #[zbus(property, name = "IPv4")]
    fn ipv4(&self) -> String {
        self.view().ipv4.clone()
    }

    /// Its MAC address; empty before its first start.
    #[zbus(property, name = "MAC")]
    fn mac(&self) -> String {
        self.view().mac.clone()
    }

    /// Virtual CPUs.
    #[zbus(property, name = "VCPUs")]
    fn vcpus(&self) -> u32 {
        self.view().vm.vcpus
    }

    /// Memory in MiB.
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> u32 {
        self.view().vm.memory_mib
    }

    /// Size of the work disk (/root) in bytes.
    #[zbus(property)]
    fn disk_bytes(&self) -> u64 {
        self.view().vm.disk_bytes
    }

    /// Whether its traffic is NAT'd to the outside.
    #[zbus(property, name = "NAT")]
    fn nat(&self) -> bool {
        self.view().vm.nat
    }

    /// Whether it talks with the other VMs that have this on (and they
    /// with it); other guests are out of its reach.
    #[zbus(property)]
    fn peers(&self) -> bool {
        self.view().vm.peers
    }

    /// Whether bangerd starts it when it first starts after the host
    /// booted.
    #[zbus(property)]
    fn autostart(&self) -> bool {
        self.view().vm.autostart
    }

    /// Its image's object path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn image(&self) -> OwnedObjectPath {
        banger_dbus::image_path(&self.view().vm.image_id)
    }

    /// Its kernel's object path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kernel(&self) -> OwnedObjectPath {
        banger_dbus::kernel_path(&self.view().vm.kernel_id)
    }

    /// What supervises its VMM: the systemd unit
    /// (`banger-vm-<id>.service`) where systemd runs VMMs, `pid:N (qemu)`
    /// for a child of bangerd; empty when stopped.
    #[zbus(property)]
    fn unit(&self) -> String {
        let (pid, vmm) = {
            let view = self.view();
            (view.vm.pid, view.vm.vmm)
        };
        match pid {
            Some(pid) => self.core.vms().vm_unit(&self.id).unwrap_or_else(|| {
                let vmm = vmm.map_or("vmm", |d| d.as_str());
                format!("pid:{pid} ({vmm})")
            }),
            None => String::new(),
        }
    }

    /// Creation time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> u64 {
        self.view().vm.created_at.max(0) as u64
    }

    /// The last failure (a start that did not come up); empty when none.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.view().vm.last_error.clone()
    }

    /// How its system disk was made: reflink, copy or dm.
    #[zbus(property)]
    fn disk_method(&self) -> String {
        self.view()
            .vm
            .disk_method
            .map_or(String::new(), |m| m.as_str().to_owned())
    }

    /// Its disk snapshots, oldest first: name, creation time
    /// (microseconds since the Unix epoch) and bytes on disk.
    #[zbus(property)]
    fn snapshots(&self) -> Vec<(String, u64, u64)> {
        self.view().snapshots.clone()
    }

    /// The host ports bangerd forwards to its loopback: host address,
    /// host port, guest port.
    #[zbus(property)]
    fn forwards(&self) -> Vec<(String, u16, u16)> {
        self.view()
            .vm
            .forwards
            .iter()
            .map(|f| (f.address.to_string(), f.host_port, f.guest_port))
            .collect()
    }

    /// The host folders it shares, served as its owner: host folder,
    /// guest folder, read-only.
    #[zbus(property)]
    fn mounts(&self) -> Vec<(String, String, bool)> {
        self.view()
            .vm
            .mounts
            .iter()
            .map(|m| (m.source.clone(), m.target.clone(), m.read_only))
            .collect()
    }

    /// Whether it is stopped with its memory saved (Suspend): its next
    /// Start resumes the guest where it was instead of booting it.
    #[zbus(property)]
    fn suspended(&self) -> bool {
        self.view().vm.suspended
    }

    /// Boot a stopped VM: network, VMM, agent, services. Returns the job.
    #[zbus(out_args("job"))]
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.vms().start_vm(&caller, &self.id).await,
        )
        .await
    }

    /// Shut down cleanly (agent, then VMM powerdown), forced after
    /// vm.stop_timeout_secs. Disks are kept. Returns the job.
    #[zbus(out_args("job"))]
    async fn stop(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.vms().stop_vm(&caller, &self.id).await,
        )
        .await
    }

    /// Save a running VM's memory and device state to its directory and
    /// end its VMM; the next Start resumes it where it was (a Stop
    /// instead drops the saved memory). Returns the job.
    #[zbus(out_args("job"))]
    async fn suspend(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.vms().suspend_vm(&caller, &self.id).await,
        )
        .await
    }

    /// Stop (if running) and start. Returns the job.
    #[zbus(out_args("job"))]
    async fn restart(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.vms().restart_vm(&caller, &self.id).await,
        )
        .await
    }

    /// Send signal number `signal` to the VMM process (9 kills it at once).
    async fn kill(
        &self,
        signal: i32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        self.core
            .vms()
            .kill_vm(&caller, &self.id, signal)
            .await
            .map_err(to_wire)
    }

    /// Stop it if it runs, then remove its disks, network, name and record.
    /// Returns the job.
    #[zbus(out_args("job"))]
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        job::answer(
            conn,
            &self.core,
            self.core.vms().delete_vm(&caller, &self.id).await,
        )
        .await
    }

    /// Change it. Keys: "vcpus" (u), "memory_mib" (u), "disk_bytes" (t,
    /// grows only) and "mounts" (a(ssb), the whole list) on a stopped VM;
    /// "nat" (b) any time (also needs org.banger.vm.nat); "peers" (b) and
    /// "autostart" (b) any time.
    async fn set(
        &self,
        changes: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(banger_dbus::options::SetVm::parse(&changes))?;
        let changes = VmChanges {
            vcpus: o.vcpus,
            memory_mib: o.memory_mib,
            disk_bytes: o.disk_bytes,
            nat: o.nat,
            peers: o.peers,
            autostart: o.autostart,
            mounts: o
                .mounts
                .map(|m| m.into_iter().map(crate::bus::mount_in).collect()),
        };
        let changed = self.core.vms().set_vm(&caller, &self.id, changes).await;
        self.changed(changed).await.map(|_| ())
    }

    /// The guest's serial console output from byte `offset` (at most
    /// 1 MiB) and the offset to ask for next; poll to follow. Only the
    /// owner (or org.banger.vm.manage-others) may read it.
    #[zbus(out_args("data", "next"))]
    async fn console_log(
        &self,
        offset: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(Vec<u8>, u64), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        self.core
            .vms()
            .vm_console(&caller, &self.id, offset)
            .await
            .map_err(to_wire)
    }

    /// Run `command` in the running guest through its agent and return a
    /// socket that carries the command's stdin, output and exit status
    /// (framing in docs/dbus-api.md). Options: "env" (as, NAME=value),
    /// "workdir" (s), "user" (s, default root), "tty" (b) with "rows"
    /// (u), "cols" (u) and "term" (s). polkit as for Start.
    #[zbus(out_args("stream"))]
    async fn exec(
        &self,
        command: Vec<String>,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(banger_dbus::options::Exec::parse(&options))?;
        let size = |v: Option<u32>, default: u16, what: &str| {
            let v = v.unwrap_or(u32::from(default));
            u16::try_from(v).map_err(|_| {
                to_wire(crate::error::Error::invalid(format!(
                    "{what} {v} is out of range (1 to 65535)"
                )))
            })
        };
        let tty = if o.tty {
            Some((size(o.rows, 24, "rows")?, size(o.cols, 80, "cols")?, o.term))
        } else if o.rows.is_some() || o.cols.is_some() || o.term.is_some() {
            return Err(to_wire(crate::error::Error::invalid(
                "rows, cols and term go with tty",
            )));
        } else {
            None
        };
        let request = ExecRequest {
            argv: command,
            env: o.env,
            workdir: o.workdir,
            user: o.user,
            tty,
        };
        let fd = self
            .core
            .vms()
            .exec_vm(&caller, &self.id, request)
            .await
            .map_err(to_wire)?;
        Ok(zbus::OwnedFd::from(fd))
    }

    /// Connect to TCP `port` on the running guest's loopback through its
    /// agent and return a socket that carries the connection (stdin to
    /// the guest, stdout from it, then the end; framing as for Exec).
    /// Option "exposed" (b): the caller serves the port beyond this
    /// host's loopback, which also needs org.banger.network.configure.
    #[zbus(out_args("stream"))]
    async fn connect_port(
        &self,
        port: u16,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(banger_dbus::options::ConnectPort::parse(&options))?;
        let fd = self
            .core
            .vms()
            .connect_port_vm(&caller, &self.id, port, o.exposed)
            .await
            .map_err(to_wire)?;
        Ok(zbus::OwnedFd::from(fd))
    }

    /// Listen on `address` ("" for 127.0.0.1) port `host_port` (0 picks a
    /// free one) and carry each connection to `guest_port` on the guest's
    /// loopback through its agent, for the VM's lifetime (a restarted
    /// bangerd listens again) until RemoveForward. Returns the port bound.
    /// polkit as for Start, plus org.banger.network.configure for an
    /// address other than loopback or a port below 1024.
    #[zbus(out_args("port"))]
    async fn add_forward(
        &self,
        address: String,
        host_port: u16,
        guest_port: u16,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u16, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let address = forward_address(&address)?;
        let added = self
            .core
            .vms()
            .add_forward(&caller, &self.id, address, host_port, guest_port)
            .await;
        self.changed(added).await.map(|f| f.host_port)
    }

    /// Stop forwarding `address` ("" for 127.0.0.1) port `host_port`.
    /// polkit as for Start.
    async fn remove_forward(
        &self,
        address: String,
        host_port: u16,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let address = forward_address(&address)?;
        let removed = self
            .core
            .vms()
            .remove_forward(&caller, &self.id, address, host_port)
            .await;
        self.changed(removed).await
    }

    /// Make a new VM `name` from copies of this stopped VM's disks, with
    /// its settings (autostart off) and its own id, address, MAC, host
    /// keys and machine id. Option "start" (b, default false) boots the
    /// clone. Returns the clone (state creating) and the job; its stages
    /// are system disk and work disk, and when starting those of a start.
    /// polkit: as for Start on this VM, plus org.banger.vm.create (and
    /// org.banger.vm.nat when it has NAT); the caller owns the clone.
    #[zbus(out_args("vm", "job"))]
    async fn clone(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(banger_dbus::options::CloneVm::parse(&options))?;
        let made = self
            .core
            .vms()
            .clone_vm(&caller, &self.id, name, o.start)
            .await;
        answer_new(conn, &self.core, made).await
    }

    /// Running copies of this running VM: it is paused while its memory
    /// is saved and its disks copied, then runs on; each fork starts from
    /// that memory with disks of its own and takes its own identity
    /// (address, MAC, hostname, host keys, machine id, randomness).
    /// Options: "count" (u, 1 to 16; more than one are named NAME-1 …
    /// NAME-N). Returns the forks and the job. polkit: as for Clone.
    #[zbus(out_args("vms", "job"))]
    async fn fork(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(Vec<OwnedObjectPath>, OwnedObjectPath), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let o = parsed(banger_dbus::options::ForkVm::parse(&options))?;
        let made = self
            .core
            .vms()
            .fork_vm(&caller, &self.id, name, o.count)
            .await;
        answer_made(conn, &self.core, made).await
    }

    /// Keep a copy of this stopped VM's disks as snapshot `name` (a DNS
    /// label; at most 16 per VM). Returns the job; its stages are system
    /// disk and work disk. polkit as for Start.
    #[zbus(out_args("job"))]
    async fn snapshot(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let made = self.core.vms().snapshot_vm(&caller, &self.id, name).await;
        job::answer(conn, &self.core, made).await
    }

    /// Put this stopped VM's disks back as they were in snapshot `name`,
    /// which stays; a work disk grown since keeps its size. Returns the
    /// job. polkit as for Start.
    #[zbus(out_args("job"))]
    async fn restore(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let made = self.core.vms().restore_vm(&caller, &self.id, name).await;
        job::answer(conn, &self.core, made).await
    }

    /// Delete snapshot `name`. polkit as for Start.
    async fn delete_snapshot(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let deleted = self
            .core
            .vms()
            .delete_snapshot(&caller, &self.id, &name)
            .await;
        self.changed(deleted).await
    }

    /// Usage of a running VM: "cpu_usec" (t), "rss_bytes" (t),
    /// "uptime_secs" (d), and from the guest agent "guest_kernel" (s),
    /// "guest_hostname" (s), "guest_memory_total_bytes" (t),
    /// "guest_memory_available_bytes" (t) and "guest_disks" (a(stt):
    /// mount point, size, bytes used, for / and /root); empty or 0 when
    /// the agent does not answer.
    #[zbus(out_args("stats"))]
    async fn stats(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, OwnedValue>, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let s = self
            .core
            .vms()
            .vm_stats(&caller, &self.id)
            .await
            .map_err(to_wire)?;
        let mut out = HashMap::new();
        out.insert("cpu_usec".to_owned(), OwnedValue::from(s.cpu_usec));
        out.insert("rss_bytes".to_owned(), OwnedValue::from(s.rss_bytes));
        out.insert("uptime_secs".to_owned(), OwnedValue::from(s.uptime_secs));
        let text = |t: String| {
            OwnedValue::try_from(zbus::Variant::from(t)).unwrap_or_else(|_| OwnedValue::from(0u8))
        };
        out.insert("guest_kernel".to_owned(), text(s.guest_kernel));
        out.insert("guest_hostname".to_owned(), text(s.guest_hostname));
        out.insert(
            "guest_memory_total_bytes".to_owned(),
            OwnedValue::from(s.guest_memory_total_bytes),
        );
        out.insert(
            "guest_memory_available_bytes".to_owned(),
            OwnedValue::from(s.guest_memory_available_bytes),
        );
        let disks = zbus::Variant::from(s.guest_disks);
        if let Ok(disks) = OwnedValue::try_from(disks) {
            out.insert("guest_disks".to_owned(), disks);
        }
        Ok(out)
    }
}

/// A forward's host address: an IP address, "" for 127.0.0.1.
fn forward_address(text: &str) -> Result<std::net::IpAddr, banger_dbus::Reply> {
    if text.is_empty() {
        return Ok(std::net::Ipv4Addr::LOCALHOST.into());
    }
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            to_wire(crate::error::Error::invalid(format!(
                "{text:?} is not an IP address"
            )))
        })
}

/// The answer to a method that makes a VM: its object (published before
/// the reply, so the caller can read it at once) and its job.
pub(super) async fn answer_new(
    conn: &Connection,
    core: &Arc<Core>,
    made: crate::error::Result<(String, crate::jobs::JobId)>,
) -> Result<(OwnedObjectPath, OwnedObjectPath), banger_dbus::Reply> {
    let (mut vms, job) = answer_made(conn, core, made.map(|(vm, job)| (vec![vm], job))).await?;
    let vm = vms.pop().ok_or_else(|| {
        banger_dbus::Reply::Banger(banger_dbus::Error::Failed("no vm was made".to_owned()))
    })?;
    Ok((vm, job))
}

/// The answer to a call that made VMs `ids` and their job: each VM
/// published on the bus before the job (and its path) is answered.
async fn answer_made(
    conn: &Connection,
    core: &Arc<Core>,
    made: crate::error::Result<(Vec<String>, crate::jobs::JobId)>,
) -> Result<(Vec<OwnedObjectPath>, OwnedObjectPath), banger_dbus::Reply> {
    let (ids, job) = made.map_err(to_wire)?;
    for id in &ids {
        super::artifacts::refresh(
            conn.object_server(),
            core,
            &crate::jobs::Resource::Vm(id.clone()),
        )
        .await
        .map_err(|e| {
            banger_dbus::Reply::Banger(banger_dbus::Error::Failed(format!(
                "cannot publish the vm: {e}"
            )))
        })?;
    }
    let job = job::answer(conn, core, Ok(job)).await?;
    Ok((ids.iter().map(|id| banger_dbus::vm_path(id)).collect(), job))
}

async fn view_of(core: &Arc<Core>, vm: Vm) -> View {
    let (ipv4, mac) = core
        .vms()
        .vm_lease(&vm.id)
        .await
        .map(|l| (l.ipv4.to_string(), l.mac))
        .unwrap_or_default();
    let snapshots = core
        .vms()
        .snapshots(&vm.id)
        .await
        .into_iter()
        .map(|s| (s.name, s.created_at.max(0) as u64, s.bytes))
        .collect();
    View {
        vm,
        ipv4,
        mac,
        snapshots,
    }
}

async fn object(core: &Arc<Core>, vm: Vm) -> VmObject {
    VmObject {
        core: core.clone(),
        id: vm.id.clone(),
        view: std::sync::Mutex::new(view_of(core, vm).await),
    }
}

/// Publish every VM (at startup).
pub async fn publish_all(server: &ObjectServer, core: &Arc<Core>) -> zbus::Result<()> {
    let vms = core
        .vms()
        .list()
        .await
        .map_err(|e| zbus::Error::Failure(e.message))?;
    for vm in vms {
        let path = vm_path(&vm.id);
        server.at(path, object(core, vm).await).await?;
    }
    Ok(())
}

/// Bring VM `id`'s object in line with the core.
pub async fn refresh(server: &ObjectServer, core: &Arc<Core>, id: &str) -> zbus::Result<()> {
    let path = vm_path(id);
    let Ok(vm) = core.vms().vm_by_id(id).await else {
        server.remove::<VmObject, _>(&path).await?;
        return Ok(());
    };
    match server.interface::<_, VmObject>(&path).await {
        Ok(iface) => {
            let fresh = view_of(core, vm).await;
            // The object server's read lock: see [`VmObject`].
            iface
                .get()
                .await
                .show(fresh, iface.signal_emitter())
                .await?;
        }
        Err(_) => {
            server.at(&path, object(core, vm).await).await?;
        }
    }
    Ok(())
}

/// Remove VM `id`'s object.
pub async fn remove(server: &ObjectServer, id: &str) -> zbus::Result<()> {
    server.remove::<VmObject, _>(vm_path(id)).await?;
    Ok(())
}
