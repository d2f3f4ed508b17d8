//! [`Supervisor`] backed by systemd (`org.freedesktop.systemd1`): each VMM
//! runs in a transient service `banger-vm-<id>.service` in `banger.slice`,
//! and the VM is registered with systemd-machined when that runs (so
//! `machinectl list` shows it). Used where systemd is PID 1.

use std::time::Duration;

use futures_util::StreamExt;
use zbus::Connection;
use zbus::{OwnedObjectPath, Variant as Value};

use crate::artifacts::build::steps;
use crate::auth::BoxFuture;
use crate::error::{Error, Result};
use crate::vm::process::{ProcessId, Watched};
use crate::vm::supervise::{
    Launcher, StartRequest, Supervisor, UnitProperty, unit_name, unit_properties,
};

/// A unit as `ListUnits*` lists it: name, description, load, active and
/// sub state, followed unit, object path, job id, type and path.
type ListedUnit = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Systemd {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, Vec<(&str, Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<ListedUnit>>;

    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;

    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    fn subscribe(&self) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdService {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdUnit {
    fn restart(&self, mode: &str) -> zbus::Result<OwnedObjectPath>;
}

/// A transient unit systemd was asked to start: its manager, and the
/// start job with the stream that reports its end.
struct Starting {
    manager: SystemdProxy<'static>,
    job: OwnedObjectPath,
    removed: JobRemovedStream,
}

impl Starting {
    /// Ask systemd to start transient unit `name` with `props` (a failed
    /// unit of that name from an earlier run is reset first). On error,
    /// what could not be done, for the message.
    async fn unit(
        conn: &Connection,
        name: &str,
        props: &[(&str, Value<'_>)],
    ) -> std::result::Result<Self, (String, zbus::Error)> {
        let manager = SystemdProxy::new(conn)
            .await
            .map_err(|e| ("be reached".to_owned(), e))?;
        let _ = manager.reset_failed_unit(name).await;
        let _ = manager.subscribe().await;
        // Subscribed before the start, so its end cannot be missed.
        let removed = manager
            .receive_job_removed()
            .await
            .map_err(|e| ("report jobs".to_owned(), e))?;
        let job = manager
            .start_transient_unit(name, "fail", props, &[])
            .await
            .map_err(|e| (format!("start {name}"), e))?;
        Ok(Self {
            manager,
            job,
            removed,
        })
    }

    /// How the start job ended (`done`, `failed`, ...); `None` when
    /// systemd stopped reporting.
    async fn result(&mut self) -> Option<String> {
        while let Some(signal) = self.removed.next().await {
            if let Ok(args) = signal.args()
                && args.job == self.job
            {
                return Some(args.result);
            }
        }
        None
    }
}

/// Restarts bangerd's own unit (found by pid) after an update.
#[derive(Debug, Clone)]
pub struct SelfRestart {
    conn: Connection,
}

impl SelfRestart {
    /// Over `conn`, the system bus.
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    async fn restart_own_unit(&self) -> zbus::Result<()> {
        let manager = SystemdProxy::new(&self.conn).await?;
        let path = manager.get_unit_by_pid(std::process::id()).await?;
        let unit = SystemdUnitProxy::builder(&self.conn)
            .path(path)
            .build()
            .await?;
        unit.restart("replace").await?;
        Ok(())
    }
}

impl crate::update::Restart for SelfRestart {
    fn restart(&self) -> BoxFuture<'_, std::result::Result<bool, String>> {
        Box::pin(async move {
            if !crate::idle::started_by_systemd() {
                return Ok(false);
            }
            self.restart_own_unit()
                .await
                .map(|()| true)
                .map_err(|e| e.to_string())
        })
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.machine1.Manager",
    default_service = "org.freedesktop.machine1",
    default_path = "/org/freedesktop/machine1"
)]
trait Machined {
    fn register_machine(
        &self,
        name: &str,
        id: &[u8],
        service: &str,
        class: &str,
        leader: u32,
        root_directory: &str,
    ) -> zbus::Result<OwnedObjectPath>;
}

/// One unit property as the `(sv)` pair `StartTransientUnit` takes.
fn property(p: UnitProperty) -> (&'static str, Value<'static>) {
    match p {
        UnitProperty::Str(k, v) => (k, Value::from(v)),
        UnitProperty::U64(k, v) => (k, Value::from(v)),
        UnitProperty::Bool(k, v) => (k, Value::from(v)),
        UnitProperty::Strs(k, v) => (k, Value::from(v)),
        UnitProperty::U32(k, v) => (k, Value::from(v)),
        UnitProperty::I32(k, v) => (k, Value::from(v)),
        UnitProperty::Pairs(k, v) => (k, Value::from(v)),
        UnitProperty::Filter(k, allow, list) => (k, Value::from((allow, list))),
        UnitProperty::ExecStart(program, argv) => {
            ("ExecStart", Value::from(vec![(program, argv, false)]))
        }
    }
}

/// How long systemd gets to start a unit.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// VMMs as transient systemd services.
#[derive(Debug, Clone)]
pub struct SystemdSupervisor {
    conn: Connection,
}

impl SystemdSupervisor {
    /// On `conn`, the system bus systemd is on.
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    async fn start_unit(&self, req: StartRequest<'_>) -> Result<ProcessId> {
        let fail = |what: &str, e: zbus::Error| {
            Error::failed(format!(
                "systemd could not {what} for vm {}: {e}",
                req.vm_name
            ))
        };
        let name = req.launcher.unit(req.vm_id);
        let props: Vec<(&str, Value<'_>)> =
            unit_properties(&req).into_iter().map(property).collect();
        let mut starting = Starting::unit(&self.conn, &name, &props)
            .await
            .map_err(|(what, e)| fail(&what, e))?;
        let result = tokio::time::timeout(START_TIMEOUT, starting.result())
            .await
            .ok()
            .flatten();
        let manager = starting.manager;
        match result.as_deref() {
            Some("done") => {}
            Some(other) => {
                return Err(Error::failed(format!(
                    "systemd could not start {name} ({other}): see journalctl -u {name} and {}",
                    req.log.display()
                )));
            }
            None => {
                return Err(Error::failed(format!(
                    "systemd did not start {name} within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
        }
        let unit = manager
            .get_unit(&name)
            .await
            .map_err(|e| fail(&format!("find {name}"), e))?;
        let service = SystemdServiceProxy::builder(&self.conn)
            .path(unit)
            .build()
            .await
            .map_err(|e| fail("address the unit", e))?;
        let pid = service
            .main_pid()
            .await
            .map_err(|e| fail(&format!("read the MainPID of {name}"), e))?;
        ProcessId::of(pid).ok_or_else(|| {
            Error::failed(format!(
                "{name} exited at once; see journalctl -u {name} and {}",
                req.log.display()
            ))
        })
    }

    /// Tell machined about the VM, when it runs; a failure is only logged.
    async fn register(&self, req: StartRequest<'_>, leader: u32) {
        let machined = match MachinedProxy::new(&self.conn).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("systemd-machined not reachable: {e}");
                return;
            }
        };
        match machined
            .register_machine(req.vm_name, &[], "banger", "vm", leader, "")
            .await
        {
            Ok(_) => {
                tracing::info!(banger_vm_id = %req.vm_id, "registered {} with systemd-machined", req.vm_name)
            }
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown" =>
            {
                tracing::debug!("systemd-machined is not installed");
            }
            Err(e) => tracing::warn!(
                banger_vm_id = %req.vm_id,
                "cannot register {} with systemd-machined: {e}",
                req.vm_name
            ),
        }
    }
}

impl Supervisor for SystemdSupervisor {
    fn name(&self) -> &'static str {
        "systemd"
    }

    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<(Watched, ProcessId)>> {
        Box::pin(async move {
            let id = self.start_unit(req).await?;
            if req.launcher != Launcher::Virtiofsd {
                self.register(req, id.pid).await;
            }
            Ok((Watched::Adopted(id), id))
        })
    }

    fn unit(&self, vm_id: &str) -> Option<String> {
        Some(unit_name(vm_id))
    }

    fn vmm_network_namespace(&self) -> bool {
        false
    }

    fn stop_folders<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let name = crate::vm::vmm::virtiofs::unit_name(vm_id);
            let Ok(manager) = SystemdProxy::new(&self.conn).await else {
                return;
            };
            match manager.stop_unit(&name, "replace").await {
                Ok(_) => tracing::debug!(banger_vm_id = %vm_id, "stopping {name}"),
                Err(zbus::Error::MethodError(e, _, _))
                    if e.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
                {
                    return;
                }
                Err(e) => tracing::warn!(banger_vm_id = %vm_id, "cannot stop {name}: {e}"),
            }
            // Gone (collected) before its name is used again.
            for _ in 0..100 {
                if manager.get_unit(&name).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn signal<'a>(
        &'a self,
        vm_id: &'a str,
        process: ProcessId,
        signal: nix::sys::signal::Signal,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !process.alive() {
                return Ok(());
            }
            let name = unit_name(vm_id);
            let fail =
                |e: zbus::Error| Error::failed(format!("systemd could not signal {name}: {e}"));
            let manager = SystemdProxy::new(&self.conn).await.map_err(fail)?;
            manager
                .kill_unit(&name, "main", signal as i32)
                .await
                .map_err(fail)
        })
    }

    fn running<'a>(
        &'a self,
        _runs: &'a [std::path::PathBuf],
    ) -> BoxFuture<'a, Result<Vec<(String, ProcessId)>>> {
        Box::pin(async move {
            let fail = |e: zbus::Error| {
                Error::failed(format!("systemd could not list banger's VM units: {e}"))
            };
            let manager = SystemdProxy::new(&self.conn).await.map_err(fail)?;
            let units = manager
                .list_units_by_patterns(
                    &["active", "activating", "deactivating", "reloading"],
                    &["banger-vm-*.service"],
                )
                .await
                .map_err(fail)?;
            let mut running = Vec::new();
            for (name, _, _, _, _, _, path, _, _, _) in units {
                let Some(id) = name
                    .strip_prefix("banger-vm-")
                    .and_then(|n| n.strip_suffix(".service"))
                else {
                    continue;
                };
                let service = SystemdServiceProxy::builder(&self.conn)
                    .path(path)
                    .build()
                    .await
                    .map_err(fail)?;
                let pid = service.main_pid().await.map_err(fail)?;
                if let Some(process) = ProcessId::of(pid).filter(ProcessId::alive) {
                    running.push((id.to_owned(), process));
                }
            }
            Ok(running)
        })
    }
}

/// Image builds' privileged steps as transient oneshot services
/// `banger-build-<id>-<step>.service`, with the rights
/// [`steps::unit_properties`] gives them and their output on the pipe
/// bangerd reads.
#[derive(Debug, Clone)]
pub struct SystemdSteps {
    conn: Connection,
}

impl SystemdSteps {
    /// On `conn`, the system bus systemd is on.
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }
}

impl steps::StepRunner for SystemdSteps {
    fn name(&self) -> &'static str {
        "systemd"
    }

    fn start<'a>(
        &'a self,
        step: &'a steps::Step,
        output: std::os::fd::OwnedFd,
        stdout: Option<std::os::fd::OwnedFd>,
    ) -> BoxFuture<'a, Result<steps::Running>> {
        Box::pin(async move {
            let name = steps::unit_name(step);
            let fail = |what: &str, e: zbus::Error| {
                Error::failed(format!("systemd could not {what} for {}: {e}", step.what))
            };
            let mut props: Vec<(&str, Value<'_>)> = steps::unit_properties(step)
                .into_iter()
                .map(property)
                .collect();
            props.push((
                "StandardOutputFileDescriptor",
                Value::Fd(zbus::Fd::from(stdout.as_ref().unwrap_or(&output))),
            ));
            props.push((
                "StandardErrorFileDescriptor",
                Value::Fd(zbus::Fd::from(&output)),
            ));
            // A oneshot's start job ends when its process does.
            let mut starting = Starting::unit(&self.conn, &name, &props)
                .await
                .map_err(|(what, e)| fail(&what, e))?;
            drop(props);
            drop(output);
            drop(stdout);
            let manager = starting.manager.clone();
            let unit = name.clone();
            let done: BoxFuture<'static, std::result::Result<(), String>> = Box::pin(async move {
                match starting.result().await.as_deref() {
                    Some("done") => Ok(()),
                    Some(other) => Err(format!("{other}; see journalctl -u {unit}")),
                    None => Err(format!("systemd stopped reporting on {unit}")),
                }
            });
            let stop = Box::new(move || -> BoxFuture<'static, ()> {
                Box::pin(async move {
                    if let Err(e) = manager.stop_unit(&name, "replace").await {
                        tracing::warn!("cannot stop {name}: {e}");
                    }
                })
            });
            Ok(steps::Running { done, stop })
        })
    }
}
