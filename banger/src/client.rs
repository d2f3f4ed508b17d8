//! The connection to bangerd: the system bus, the proxies of `banger-dbus`,
//! and the one place that knows how a call is made with or without
//! permission to prompt for a password.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use banger_dbus::proxy::{
    JobProxy, JobQuietProxy, ManagerProxy, ManagerQuietProxy, VmProxy, VmQuietProxy,
};
use banger_dbus::{DoctorCheck, StageTiming};
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::exit::{Failure, Kind};

/// How long a call that cannot prompt may take before banger gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long connecting to the bus may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether polkit may prompt for a password during a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// Set the ALLOW_INTERACTIVE_AUTH flag (an agent is there to answer).
    Allowed,
    /// Do not set it: polkit answers at once, the daemon replies
    /// `InteractiveAuthorizationRequired` when it would have to ask.
    NotAllowed,
}

/// Call `method(args)` through the proxy `interaction` picks: the one
/// with ALLOW_INTERACTIVE_AUTH and no timeout (a prompt takes as long as
/// the user does), or the quiet one with [`CALL_TIMEOUT`]. `$loud` and
/// `$quiet` are futures that build the proxies.
macro_rules! authorized {
    ($interaction:expr, $loud:expr, $quiet:expr, $method:ident($($arg:expr),* $(,)?)) => {
        match $interaction {
            Interaction::Allowed => $loud
                .await?
                .$method($($arg),*)
                .await
                .map_err(Failure::from_dbus),
            Interaction::NotAllowed => timed($quiet.await?.$method($($arg),*)).await,
        }
    };
}

/// The `a{sv}` of an options map, as the proxies take it.
fn borrowed<'a>(options: &'a HashMap<&'a str, Variant<'a>>) -> HashMap<&'a str, &'a Variant<'a>> {
    options.iter().map(|(k, v)| (*k, v)).collect()
}

/// A VM method that starts a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmJob {
    /// `VM.Start`.
    Start,
    /// `VM.Stop`.
    Stop,
    /// `VM.Restart`.
    Restart,
    /// `VM.Suspend`.
    Suspend,
    /// `VM.Delete`.
    Delete,
}

/// A VM method that changes it at once.
#[derive(Debug, Clone, Copy)]
pub enum VmChange<'a> {
    /// `VM.Kill(signal)`.
    Kill(i32),
    /// `VM.Set(changes)`.
    Set(&'a banger_dbus::options::SetVm),
}

/// The address banger connects to, as the user would recognize it.
pub fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/var/run/dbus/system_bus_socket".to_owned())
}

/// A connection to the system bus, and the calls banger makes on it.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Connection,
}

/// What `banger daemon status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    pub version: String,
    pub api_version: u32,
    pub status: String,
    pub unique_name: String,
    pub pid: Option<u32>,
}

/// The properties of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub path: String,
    pub kind: String,
    pub state: String,
    pub stage: String,
    pub progress: f64,
    pub bytes: u64,
    pub started_at_usec: u64,
    pub owner_uid: u32,
    pub cancelable: bool,
    pub stages: Vec<StageTiming>,
}

impl Client {
    /// Connect to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` or the default).
    pub async fn connect() -> Result<Self, Failure> {
        let address = system_bus_address();
        let unreachable = |what: &str| {
            Failure::new(
                Kind::Unreachable,
                format!(
                    "cannot reach the system bus at {address}: {what} \
                     (set DBUS_SYSTEM_BUS_ADDRESS to use another bus)"
                ),
            )
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::system()).await {
            Ok(Ok(conn)) => Ok(Self { conn }),
            Ok(Err(err)) => Err(match &err {
                zbus::Error::Address(_) => Failure::new(
                    Kind::Unreachable,
                    format!(
                        "DBUS_SYSTEM_BUS_ADDRESS is not a valid D-Bus address ({address}): \
                         fix or unset it"
                    ),
                )
                .with_source(err),
                zbus::Error::Connection(io, _) => unreachable("is dbus running?")
                    .with_source(std::io::Error::new(io.kind(), io.to_string())),
                zbus::Error::Handshake(_) => {
                    unreachable("the bus refused the connection").with_source(err)
                }
                _ => unreachable("is dbus running?").with_source(err),
            }),
            Err(_) => Err(unreachable("the bus did not answer in time")),
        }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, Failure> {
        ManagerProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    async fn manager_quiet(&self) -> Result<ManagerQuietProxy<'static>, Failure> {
        ManagerQuietProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    async fn vm(&self, path: &str) -> Result<VmProxy<'static>, Failure> {
        VmProxy::builder(&self.conn)
            .path(path.to_owned())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    async fn vm_quiet(&self, path: &str) -> Result<VmQuietProxy<'static>, Failure> {
        VmQuietProxy::builder(&self.conn)
            .path(path.to_owned())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    async fn job_quiet(&self, path: &OwnedObjectPath) -> Result<JobQuietProxy<'static>, Failure> {
        JobQuietProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    /// A proxy for the job at `path`.
    pub async fn job(&self, path: &OwnedObjectPath) -> Result<JobProxy<'static>, Failure> {
        JobProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)
    }

    /// `Manager.Doctor()`.
    pub async fn doctor(&self) -> Result<Vec<DoctorCheck>, Failure> {
        let manager = self.manager().await?;
        timed(manager.doctor()).await
    }

    /// The catalog `kind` ("kernels" or "images") in use: (serial,
    /// fetched, entries).
    pub async fn available(
        &self,
        kind: &str,
    ) -> Result<(u64, bool, Vec<banger_dbus::CatalogEntry>), Failure> {
        let manager = self.manager().await?;
        timed(manager.list_available(kind)).await
    }

    /// The daemon's version (one property read; starts the daemon if it is activatable).
    pub async fn daemon_version(&self) -> Result<(String, u32), Failure> {
        let manager = self.manager().await?;
        let version = timed(manager.version()).await?;
        let api_version = timed(manager.api_version()).await?;
        Ok((version, api_version))
    }

    /// Everything `banger daemon status` shows.
    pub async fn daemon_info(&self) -> Result<DaemonInfo, Failure> {
        let manager = self.manager().await?;
        // Reading a property first lets the bus activate the daemon.
        let version = timed(manager.version()).await?;
        let api_version = timed(manager.api_version()).await?;
        let status = timed(manager.status()).await?;
        let bus = zbus::fdo::DBusProxy::new(&self.conn)
            .await
            .map_err(Failure::from_zbus)?;
        let name =
            zbus::names::BusName::try_from(banger_dbus::BUS_NAME).map_err(Failure::from_zbus)?;
        let unique = timed(fdo(bus.get_name_owner(name))).await?;
        let unique_name = zbus::names::BusName::Unique(unique.clone().into());
        let pid = timed(fdo(bus.get_connection_unix_process_id(unique_name)))
            .await
            .ok();
        Ok(DaemonInfo {
            version,
            api_version,
            status,
            unique_name: unique.to_string(),
            pid,
        })
    }

    /// `Manager.Maintain(options)`: starts the job, returns its path.
    pub async fn maintain(
        &self,
        vacuum: bool,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let dict = banger_dbus::options::Maintain { vacuum }.to_dict();
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            maintain(borrowed(&dict))
        )
    }

    /// `Manager.Update(options)`: starts the job, returns its path.
    pub async fn update(
        &self,
        check: bool,
        channel: Option<&str>,
        rollback: bool,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let options = banger_dbus::options::Update {
            check,
            channel: channel.map(str::to_owned),
            rollback,
        };
        let dict = options.to_dict();
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            update(borrowed(&dict))
        )
    }

    /// `Job.Cancel()`.
    pub async fn cancel(
        &self,
        path: &OwnedObjectPath,
        interaction: Interaction,
    ) -> Result<(), Failure> {
        let result = authorized!(interaction, self.job(path), self.job_quiet(path), cancel());
        result.map_err(|f| job_not_found(f, path))
    }

    /// The job's `State` property.
    pub async fn job_state(&self, path: &OwnedObjectPath) -> Result<String, Failure> {
        let job = self.job(path).await?;
        timed(job.state()).await.map_err(|f| job_not_found(f, path))
    }

    /// What became of the job at `path` (`Manager.JobOutcome`), also
    /// after its object has left the bus.
    pub async fn job_outcome(
        &self,
        path: &OwnedObjectPath,
    ) -> Result<banger_dbus::JobOutcome, Failure> {
        let n = banger_dbus::parse_job_path(path.as_str())
            .ok_or_else(|| Failure::new(Kind::Failed, format!("{path} is not a job")))?;
        let manager = self.manager().await?;
        timed(manager.job_outcome(n)).await
    }

    /// The job's `Stages` property.
    pub async fn job_stages(&self, path: &OwnedObjectPath) -> Result<Vec<StageTiming>, Failure> {
        let job = self.job(path).await?;
        timed(job.stages())
            .await
            .map_err(|f| job_not_found(f, path))
    }

    /// Every property of the job.
    pub async fn job_info(&self, path: &OwnedObjectPath) -> Result<JobInfo, Failure> {
        let job = self.job(path).await?;
        let read = async {
            tokio::try_join!(
                timed(job.kind()),
                timed(job.state()),
                timed(job.stage()),
                timed(job.progress()),
                timed(job.bytes()),
                timed(job.started_at()),
                timed(job.owner_uid()),
                timed(job.cancelable()),
                timed(job.stages()),
            )
        };
        let (kind, state, stage, progress, bytes, started_at_usec, owner_uid, cancelable, stages) =
            read.await.map_err(|f| job_not_found(f, path))?;
        Ok(JobInfo {
            path: path.to_string(),
            kind,
            state,
            stage,
            progress,
            bytes,
            started_at_usec,
            owner_uid,
            cancelable,
            stages,
        })
    }
}

/// A kernel as the daemon publishes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelInfo {
    pub path: String,
    pub id: String,
    pub name: String,
    pub version: String,
    pub vmlinux: String,
    pub bzimage: String,
    pub initrd: String,
    pub modules: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub created_at_usec: u64,
    pub owner_uid: u32,
}

/// An image as the daemon publishes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    pub path: String,
    pub id: String,
    pub name: String,
    pub managed: bool,
    pub rootfs: String,
    pub rootfs_bytes: u64,
    pub work_seed: String,
    pub work_seed_sha256: String,
    /// The kernel's object path.
    pub kernel: String,
    pub services: Vec<(String, u16)>,
    pub init: String,
    pub created_at_usec: u64,
    pub owner_uid: u32,
    /// Templates: vCPUs, memory MiB, work disk bytes, saved state bytes,
    /// when made (µs).
    pub templates: Vec<(u32, u32, u64, u64, i64)>,
}

/// A VM as the daemon publishes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmInfo {
    pub path: String,
    pub id: String,
    pub name: String,
    pub state: String,
    pub owner_uid: u32,
    pub ipv4: String,
    pub mac: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub nat: bool,
    pub peers: bool,
    pub autostart: bool,
    /// The image's object path.
    pub image: String,
    /// The kernel's object path.
    pub kernel: String,
    pub unit: String,
    pub disk_method: String,
    pub created_at_usec: u64,
    pub last_error: String,
    /// Disk snapshots: name, creation time (µs), bytes on disk.
    pub snapshots: Vec<(String, u64, u64)>,
    /// Background forwards: host address, host port, guest port.
    pub forwards: Vec<(String, u16, u16)>,
    /// Host folders: host folder, guest folder, read-only.
    pub mounts: Vec<(String, String, bool)>,
    /// Stopped with its memory saved; the next start resumes it.
    pub suspended: bool,
}

impl VmInfo {
    pub(crate) fn from_props(path: &str, p: &Props) -> Self {
        Self {
            path: path.to_owned(),
            id: prop(p, "Id"),
            name: prop(p, "Name"),
            state: prop(p, "State"),
            owner_uid: prop(p, "OwnerUID"),
            ipv4: prop(p, "IPv4"),
            mac: prop(p, "MAC"),
            vcpus: prop(p, "VCPUs"),
            memory_mib: prop(p, "MemoryMiB"),
            disk_bytes: prop(p, "DiskBytes"),
            nat: prop(p, "NAT"),
            peers: prop(p, "Peers"),
            autostart: prop(p, "Autostart"),
            image: path_prop(p, "Image"),
            kernel: path_prop(p, "Kernel"),
            unit: prop(p, "Unit"),
            disk_method: prop(p, "DiskMethod"),
            created_at_usec: prop(p, "CreatedAt"),
            last_error: prop(p, "LastError"),
            suspended: prop(p, "Suspended"),
            snapshots: p
                .get("Snapshots")
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| Vec::<(String, u64, u64)>::try_from(v).ok())
                .unwrap_or_default(),
            forwards: p
                .get("Forwards")
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| Vec::<(String, u16, u16)>::try_from(v).ok())
                .unwrap_or_default(),
            mounts: p
                .get("Mounts")
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| Vec::<(String, String, bool)>::try_from(v).ok())
                .unwrap_or_default(),
        }
    }
}

/// Every kernel, image and VM, from one `GetManagedObjects` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub kernels: Vec<KernelInfo>,
    pub images: Vec<ImageInfo>,
    pub vms: Vec<VmInfo>,
}

/// An object's properties on one interface, as the bus gives them.
pub type Props = HashMap<String, zbus::OwnedVariant>;

/// Property `key` of `props`, or the type's default when absent or of
/// another type.
pub fn prop<T>(props: &Props, key: &str) -> T
where
    T: TryFrom<zbus::OwnedVariant> + Default,
{
    props
        .get(key)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
        .unwrap_or_default()
}

fn path_prop(props: &Props, key: &str) -> String {
    props
        .get(key)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| OwnedObjectPath::try_from(v).ok())
        .map(|p| p.to_string())
        .unwrap_or_default()
}

impl KernelInfo {
    pub(crate) fn from_props(path: &str, p: &Props) -> Self {
        Self {
            path: path.to_owned(),
            id: prop(p, "Id"),
            name: prop(p, "Name"),
            version: prop(p, "Version"),
            vmlinux: prop(p, "Vmlinux"),
            bzimage: prop(p, "BzImage"),
            initrd: prop(p, "Initrd"),
            modules: prop(p, "Modules"),
            sha256: prop(p, "Sha256"),
            size_bytes: prop(p, "SizeBytes"),
            created_at_usec: prop(p, "CreatedAt"),
            owner_uid: prop(p, "OwnerUID"),
        }
    }
}

impl ImageInfo {
    pub(crate) fn from_props(path: &str, p: &Props) -> Self {
        let services: Vec<(String, u16)> = p
            .get("Services")
            .and_then(|v| v.try_clone().ok())
            .and_then(|v| Vec::<(String, u16)>::try_from(v).ok())
            .unwrap_or_default();
        Self {
            path: path.to_owned(),
            id: prop(p, "Id"),
            name: prop(p, "Name"),
            managed: prop(p, "Managed"),
            rootfs: prop(p, "Rootfs"),
            rootfs_bytes: prop(p, "RootfsBytes"),
            work_seed: prop(p, "WorkSeed"),
            work_seed_sha256: prop(p, "WorkSeedSha256"),
            kernel: path_prop(p, "Kernel"),
            services,
            init: prop(p, "Init"),
            created_at_usec: prop(p, "CreatedAt"),
            owner_uid: prop(p, "OwnerUID"),
            templates: p
                .get("Templates")
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| Vec::<(u32, u32, u64, u64, i64)>::try_from(v).ok())
                .unwrap_or_default(),
        }
    }
}

impl Client {
    /// Every kernel and image (sorted by name).
    pub async fn catalog(&self) -> Result<Catalog, Failure> {
        let om = zbus::fdo::ObjectManagerProxy::builder(&self.conn)
            .destination(banger_dbus::BUS_NAME)
            .path(banger_dbus::MANAGER_PATH)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(Failure::from_zbus)?;
        let objects = timed(fdo(om.get_managed_objects())).await?;
        let mut catalog = Catalog::default();
        for (path, interfaces) in objects {
            for (iface, props) in interfaces {
                match iface.as_str() {
                    banger_dbus::KERNEL_INTERFACE => catalog
                        .kernels
                        .push(KernelInfo::from_props(path.as_str(), &props)),
                    banger_dbus::IMAGE_INTERFACE => catalog
                        .images
                        .push(ImageInfo::from_props(path.as_str(), &props)),
                    banger_dbus::VM_INTERFACE => {
                        catalog.vms.push(VmInfo::from_props(path.as_str(), &props))
                    }
                    _ => {}
                }
            }
        }
        catalog.kernels.sort_by(|a, b| a.name.cmp(&b.name));
        catalog.images.sort_by(|a, b| a.name.cmp(&b.name));
        catalog.vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(catalog)
    }

    /// Start job `job` of the VM at `path`; returns the job.
    pub async fn vm_job(
        &self,
        path: &str,
        job: VmJob,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let (loud, quiet) = (self.vm(path), self.vm_quiet(path));
        match job {
            VmJob::Start => authorized!(interaction, loud, quiet, start()),
            VmJob::Stop => authorized!(interaction, loud, quiet, stop()),
            VmJob::Restart => authorized!(interaction, loud, quiet, restart()),
            VmJob::Suspend => authorized!(interaction, loud, quiet, suspend()),
            VmJob::Delete => authorized!(interaction, loud, quiet, delete()),
        }
    }

    /// Make `change` to the VM at `path`.
    pub async fn vm_change(
        &self,
        path: &str,
        change: VmChange<'_>,
        interaction: Interaction,
    ) -> Result<(), Failure> {
        let (loud, quiet) = (self.vm(path), self.vm_quiet(path));
        match change {
            VmChange::Kill(signal) => authorized!(interaction, loud, quiet, kill(signal)),
            VmChange::Set(changes) => {
                let dict = changes.to_dict();
                authorized!(interaction, loud, quiet, set(borrowed(&dict)))
            }
        }
    }

    /// `VM.ConsoleLog(offset)`: up to 1 MiB and the next offset.
    pub async fn vm_console_log(&self, path: &str, offset: u64) -> Result<(Vec<u8>, u64), Failure> {
        timed(self.vm_quiet(path).await?.console_log(offset)).await
    }

    /// `VM.Stats()`.
    pub async fn vm_stats(&self, path: &str) -> Result<HashMap<String, OwnedVariant>, Failure> {
        timed(self.vm_quiet(path).await?.stats()).await
    }

    /// `VM.Exec`: the socket that carries the command's stream.
    pub async fn vm_exec(
        &self,
        path: &str,
        command: &[String],
        options: &banger_dbus::options::Exec,
        interaction: Interaction,
    ) -> Result<std::os::fd::OwnedFd, Failure> {
        let dict = options.to_dict();
        let options = borrowed(&dict);
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let fd = authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            exec(&command, options)
        )?;
        Ok(fd.into())
    }

    /// `VM.ConnectPort`: the socket that carries the connection.
    pub async fn vm_connect_port(
        &self,
        path: &str,
        port: u16,
        exposed: bool,
        interaction: Interaction,
    ) -> Result<std::os::fd::OwnedFd, Failure> {
        let dict = banger_dbus::options::ConnectPort { exposed }.to_dict();
        let options = borrowed(&dict);
        let fd = authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            connect_port(port, options)
        )?;
        Ok(fd.into())
    }

    /// `VM.Clone`: returns the clone and the job.
    pub async fn vm_clone(
        &self,
        path: &str,
        name: &str,
        start: bool,
        interaction: Interaction,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), Failure> {
        let dict = banger_dbus::options::CloneVm { start }.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            clone_vm(name, options)
        )
    }

    /// `VM.Fork`: returns the forks and the job.
    pub async fn vm_fork(
        &self,
        path: &str,
        name: &str,
        count: u32,
        interaction: Interaction,
    ) -> Result<(Vec<OwnedObjectPath>, OwnedObjectPath), Failure> {
        let dict = banger_dbus::options::ForkVm { count }.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            fork(name, options)
        )
    }

    /// `VM.AddForward`: returns the host port bound.
    pub async fn vm_add_forward(
        &self,
        path: &str,
        address: &str,
        host_port: u16,
        guest_port: u16,
        interaction: Interaction,
    ) -> Result<u16, Failure> {
        authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            add_forward(address, host_port, guest_port)
        )
    }

    /// `VM.RemoveForward`.
    pub async fn vm_remove_forward(
        &self,
        path: &str,
        address: &str,
        host_port: u16,
        interaction: Interaction,
    ) -> Result<(), Failure> {
        authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            remove_forward(address, host_port)
        )
    }

    /// `VM.Snapshot` (`restore` false) or `VM.Restore` of snapshot
    /// `name`: returns the job.
    pub async fn vm_snapshot(
        &self,
        path: &str,
        name: &str,
        restore: bool,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        if restore {
            authorized!(
                interaction,
                self.vm(path),
                self.vm_quiet(path),
                restore(name)
            )
        } else {
            authorized!(
                interaction,
                self.vm(path),
                self.vm_quiet(path),
                snapshot(name)
            )
        }
    }

    /// `VM.DeleteSnapshot`.
    pub async fn vm_delete_snapshot(
        &self,
        path: &str,
        name: &str,
        interaction: Interaction,
    ) -> Result<(), Failure> {
        authorized!(
            interaction,
            self.vm(path),
            self.vm_quiet(path),
            delete_snapshot(name)
        )
    }

    /// `Manager.CreateVM`: returns the VM and the job.
    pub async fn create_vm(
        &self,
        name: &str,
        image: &str,
        options: &banger_dbus::options::CreateVm,
        interaction: Interaction,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), Failure> {
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            create_vm(name, image, options)
        )
    }

    /// `Manager.ImportKernelFd`: returns the job.
    pub async fn import_kernel_fd(
        &self,
        name: &str,
        kernel: &std::fs::File,
        initrd: Option<&std::fs::File>,
        modules: Option<&std::fs::File>,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        use std::os::fd::AsFd;
        let options = banger_dbus::options::ImportKernelFd {
            initrd: initrd.map(dup).transpose()?,
            modules: modules.map(dup).transpose()?,
        };
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            import_kernel_fd(name, zbus::Fd::from(kernel.as_fd()), options)
        )
    }

    /// `Manager.PullKernel` / `Manager.PullImage` (`image` picks which):
    /// returns the job.
    pub async fn pull(
        &self,
        image: bool,
        name: &str,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let (loud, quiet) = (self.manager(), self.manager_quiet());
        let dict = banger_dbus::options::NoOptions.to_dict();
        if image {
            authorized!(interaction, loud, quiet, pull_image(name, borrowed(&dict)))
        } else {
            authorized!(interaction, loud, quiet, pull_kernel(name, borrowed(&dict)))
        }
    }

    /// `Manager.BuildImage` of `recipe`: returns the job.
    pub async fn build_image(
        &self,
        recipe: &str,
        name: Option<&str>,
        kernel: Option<&str>,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let options = banger_dbus::options::BuildImage {
            name: name.map(str::to_owned),
            kernel: kernel.map(str::to_owned),
        };
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            build_image(recipe, options)
        )
    }

    /// `Manager.BuildKernel` from Debian: returns the job.
    pub async fn build_kernel(
        &self,
        name: &str,
        package: Option<&str>,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let options = banger_dbus::options::BuildKernel {
            from: Some("debian".to_owned()),
            package: package.map(str::to_owned),
        };
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            build_kernel(name, options)
        )
    }

    /// `Manager.PullImage` of an OCI reference: returns the job.
    pub async fn pull_oci(
        &self,
        reference: &str,
        name: Option<&str>,
        kernel: Option<&str>,
        login: Option<&crate::registry_auth::Login>,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        let options = banger_dbus::options::PullOci {
            name: name.map(str::to_owned),
            kernel: kernel.map(str::to_owned),
            login: login.map(|l| (l.username.clone(), l.password.clone())),
        };
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            pull_image(reference, options)
        )
    }

    /// `Manager.DeleteKernel`.
    pub async fn delete_kernel(
        &self,
        kernel: &str,
        interaction: Interaction,
    ) -> Result<(), Failure> {
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            delete_kernel(kernel)
        )
    }

    /// `Manager.ImportImageFd`: returns the job.
    #[allow(clippy::too_many_arguments)]
    pub async fn import_image_fd(
        &self,
        name: &str,
        rootfs: &std::fs::File,
        kernel: &str,
        work_seed: Option<&std::fs::File>,
        services: &[String],
        init: Option<&str>,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        use std::os::fd::AsFd;
        let options = banger_dbus::options::ImportImageFd {
            work_seed: work_seed.map(dup).transpose()?,
            services: services.to_vec(),
            init: init.map(str::to_owned),
        };
        let dict = options.to_dict();
        let options = borrowed(&dict);
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            import_image_fd(name, zbus::Fd::from(rootfs.as_fd()), kernel, options)
        )
    }

    /// `Manager.PromoteImage`: returns the job.
    pub async fn promote_image(
        &self,
        image: &str,
        interaction: Interaction,
    ) -> Result<OwnedObjectPath, Failure> {
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            promote_image(image)
        )
    }

    /// `Manager.DeleteImage`.
    pub async fn delete_image(&self, image: &str, interaction: Interaction) -> Result<(), Failure> {
        authorized!(
            interaction,
            self.manager(),
            self.manager_quiet(),
            delete_image(image)
        )
    }
}

/// A second descriptor of `file`, for an options struct to own.
fn dup(file: &std::fs::File) -> Result<std::fs::File, Failure> {
    file.try_clone().map_err(|e| {
        Failure::new(
            Kind::Failed,
            format!("cannot pass an open file to bangerd: {e}"),
        )
    })
}

/// Await a call that cannot prompt, with [`CALL_TIMEOUT`].
async fn timed<T, E>(call: impl Future<Output = Result<T, E>>) -> Result<T, Failure>
where
    E: Into<banger_dbus::Error>,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| Failure::from_dbus(e.into())),
        Err(_) => Err(Failure::new(
            Kind::Unreachable,
            format!(
                "bangerd did not answer within {} s: check `systemctl status bangerd` \
                 and `journalctl -u bangerd`",
                CALL_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// An `org.freedesktop.DBus` call, with its error as a zbus error.
async fn fdo<T>(call: impl Future<Output = zbus::fdo::Result<T>>) -> zbus::Result<T> {
    call.await.map_err(zbus::Error::from)
}

/// A clearer message when a job object is gone.
fn job_not_found(f: Failure, path: &OwnedObjectPath) -> Failure {
    if f.kind() != Kind::NotFound {
        return f;
    }
    let job = banger_dbus::parse_job_path(path.as_str())
        .map_or_else(|| path.to_string(), |n| n.to_string());
    f.with_message(format!(
        "job {job} does not exist: finished jobs disappear a few seconds after they complete"
    ))
}
