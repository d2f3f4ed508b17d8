//! `bangerd`, the banger system service.
//!
//! [`run`] takes a bus connection, directories, configuration and a control
//! channel, so tests and the binary start it the same way. See
//! `ARCHITECTURE.md` for the map.

pub mod artifacts;
pub mod auth;
pub mod blocking;
pub mod bus;
pub mod catalog;
pub mod channel;
pub mod config;
pub mod core;
pub mod doctor;
pub mod error;
pub mod housekeeping;
pub mod idle;
pub mod jobs;
#[cfg(test)]
mod layers;
pub mod logging;
pub mod memory;
pub use banger_net as net;
pub mod os;
pub mod paths;
pub mod program;
pub mod shape;
pub mod space;
pub mod store;
pub mod update;
pub mod vm;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use zbus::Connection;

use crate::config::Config;
use crate::core::{Core, CoreDeps};
use crate::doctor::HostPaths;
use crate::paths::Dirs;
use crate::store::{Store, StoreError};

/// What the outside (signals, tests) can ask of a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop serving and exit (SIGTERM, SIGINT).
    Shutdown,
    /// Re-read the configuration (SIGHUP).
    Reload,
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dirs {
        /// Which.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store {path}: {source}")]
    Store {
        /// Which file.
        path: std::path::PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The bus refused something.
    #[error("d-bus: {0}")]
    Bus(#[from] zbus::Error),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Everything [`run`] needs.
#[derive(Debug)]
pub struct RunOptions {
    /// Directories.
    pub dirs: Dirs,
    /// The configuration file that was loaded.
    pub config_file: std::path::PathBuf,
    /// The loaded configuration.
    pub config: Config,
    /// Lets reloads change the log filter.
    pub log: Option<logging::LogControl>,
    /// `.vm` DNS sockets passed by systemd (`bangerd.socket`); when empty,
    /// bangerd binds `network.dns_listen` itself.
    pub dns_fds: Vec<std::os::fd::OwnedFd>,
    /// Something (systemd's D-Bus and socket activation) starts the daemon
    /// again on demand, so it may exit after `daemon.idle_exit_secs` idle.
    pub exit_when_idle: bool,
}

/// Serve DNS on the sockets systemd passed, or bind `listen`.
async fn start_dns(
    fds: Vec<std::os::fd::OwnedFd>,
    listen: std::net::SocketAddr,
    subnet: &net::leases::Subnet,
) -> Result<(net::dns::DnsServer, net::dns::VmZone, std::net::SocketAddr), error::Error> {
    if fds.is_empty() {
        return net::dns::start(listen, subnet).await;
    }
    let (udp, tcp) = os::activation::dns_sockets(fds)?;
    let addr = udp
        .first()
        .and_then(|s| s.local_addr().ok())
        .or_else(|| tcp.first().and_then(|l| l.local_addr().ok()))
        .unwrap_or(listen);
    tracing::info!(address = %addr, udp = udp.len(), tcp = tcp.len(), "using the DNS sockets systemd passed");
    net::dns::serve_on(udp, tcp, subnet).map(|(server, zone)| (server, zone, addr))
}

fn config_subnet_and_listen(core: &Core) -> Option<(net::leases::Subnet, std::net::SocketAddr)> {
    let config = core.config();
    match config.network.subnet() {
        Ok(s) => Some((s, config.network.dns_listen)),
        Err(e) => {
            tracing::warn!("not serving .vm DNS: {e}");
            None
        }
    }
}

/// Serve on `conn` until [`Control::Shutdown`] arrives (or the channel closes).
pub async fn run(
    conn: Connection,
    options: RunOptions,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), DaemonError> {
    let RunOptions {
        dirs,
        config_file,
        config,
        log,
        dns_fds,
        exit_when_idle,
    } = options;
    dirs.create().map_err(|source| DaemonError::Dirs {
        path: dirs.state.clone(),
        source,
    })?;

    let store_path = dirs.store_file();
    let store = {
        let path = store_path.clone();
        blocking::run(move || -> Result<Store, StoreError> {
            let store = Store::open(&path)?;
            let interrupted = store.interrupt_running_jobs(store::unix_us(SystemTime::now()))?;
            if interrupted > 0 {
                tracing::warn!(interrupted, "marked jobs of a previous run as interrupted");
            }
            Ok(store)
        })
        .await
        .map_err(|source| DaemonError::Store {
            path: store_path.clone(),
            source,
        })?
    };
    tracing::info!(
        store = %store_path.display(),
        schema_version = store::SCHEMA_VERSION,
        "store open"
    );

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let supervisor = supervisor(&config, &conn);
    // Image builds' steps go where VMMs go.
    let steps: Arc<dyn artifacts::build::steps::StepRunner> = if supervisor.name() == "systemd" {
        Arc::new(os::systemd::SystemdSteps::new(conn.clone()))
    } else {
        Arc::new(artifacts::build::steps::Direct)
    };
    // bangerd's own binary runs the tools' sandbox and applies OCI layers.
    let helper = std::env::current_exe()
        .unwrap_or_else(|_| std::path::PathBuf::from("/usr/libexec/banger/bangerd"));
    let tools = Arc::new(os::sandbox::Sandboxed::new(steps.clone(), helper.clone()));
    let state = dirs.state.clone();
    let core = Core::new(
        config,
        CoreDeps {
            dirs,
            config_file,
            store: Arc::new(store),
            authorizer: Arc::new(os::polkit::Polkit::new(conn.clone())),
            bus: Arc::new(os::bus_names::BusNames(conn.clone())),
            host: HostPaths::default(),
            supervisor,
            steps,
            tools,
            helper,
            dm: Arc::new(os::dm::Dm),
            agent: Arc::new(vm::agent::HostAgent::default()),
            link_dns: Arc::new(os::resolved::Resolved::new(conn.clone())),
            releases: banger_release::Releases::system(),
            restart: Arc::new(os::systemd::SelfRestart::new(conn.clone())),
        },
        events_tx,
    );
    // The .vm DNS server on the host. Not being able to serve it is not
    // fatal: doctor reports it, and everything else still works.
    let dns = match config_subnet_and_listen(&core) {
        Some((subnet, listen)) => match start_dns(dns_fds, listen, &subnet).await {
            Ok((server, zone, bound)) => {
                tracing::info!(address = %bound, "serving the .vm DNS zone");
                core.set_dns(zone, bound);
                Some(server)
            }
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        },
        None => None,
    };
    // Files a sandboxed tool held when bangerd died are root's again
    // (state/{vms,images,kernels}/<id>/<file>).
    match crate::blocking::value(move || banger_formats::tool::reclaim(&state, 3)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::warn!("{n} files a sandboxed tool held are root's again"),
        Ok(Err(e)) => tracing::error!("cannot take back files from the tools' sandbox: {e}"),
        Err(e) => tracing::error!("cannot take back files from the tools' sandbox: {}", e.0),
    }
    if let Err(e) = core.artifacts().clean_up_artifacts().await {
        tracing::error!("cannot clean up after interrupted kernel or image operations: {e}");
    }
    if let Err(e) = core.vms().reconcile_vms().await {
        tracing::error!("cannot reconcile VMs with what runs: {e}");
    }
    // With vm.accel = "auto", probe KVM now so the first create does not wait.
    if core.config().vm.accel == config::Accel::Auto {
        let core = core.clone();
        tokio::spawn(async move {
            if let Some((_, kernel)) = core.artifacts().default_image().await {
                core.vms().kvm_verdict(kernel.boot_file()).await;
            }
        });
    }
    let mirror = tokio::spawn(bus::mirror_jobs(conn.clone(), core.clone(), events_rx));

    bus::serve(&conn, core.clone()).await?;
    // The first start after a host boot brings back the VMs marked
    // autostart (their jobs are on the bus like any other).
    match core.vms().autostart().await {
        Ok(started) if !started.is_empty() => {
            tracing::info!("starting {} vms marked autostart", started.len());
        }
        Ok(_) => {}
        Err(e) => tracing::error!("cannot autostart vms: {e}"),
    }
    if !os::polkit::available(&conn).await {
        tracing::warn!(
            "polkit is not on the system bus: only root will be allowed to change anything"
        );
    }
    let status = core.status_line();
    os::notify::ready(&status);
    tracing::info!(
        bus_name = banger_dbus::BUS_NAME,
        unique_name = conn
            .unique_name()
            .map(|n| n.to_string())
            .unwrap_or_default(),
        version = core::VERSION,
        "serving"
    );

    // With WatchdogSec=, ping at half the interval, each time after the
    // core answered (its store and job locks are free), so a wedged daemon
    // gets restarted.
    let watchdog = os::notify::watchdog_interval().map(|interval| {
        let core = core.clone();
        tokio::spawn(async move {
            loop {
                let _ = core.status_line();
                os::notify::watchdog();
                tokio::time::sleep(interval / 2).await;
            }
        })
    });
    let housekeeping = tokio::spawn(housekeeping::run(core.clone()));
    let idle_vms = tokio::spawn(housekeeping::suspend_idle(core.clone()));
    let activity = Arc::new(idle::Activity::default());
    let calls = tokio::spawn(watch_calls(conn.clone(), activity.clone()));
    let trimmer = tokio::spawn(memory::trim_after_calls(activity.clone()));
    let mut last_status = status;
    loop {
        let rule = idle::IdleRule::new(core.config().daemon.idle_exit_secs, exit_when_idle);
        let request = tokio::select! {
            request = control.recv() => request,
            () = tokio::time::sleep(rule.tick()) => {
                // VMs that end on their own change the summary without a job.
                let status = core.status_line();
                if status != last_status {
                    os::notify::status(&status);
                    last_status = status;
                }
                let load = idle::Load {
                    jobs: core.jobs().running(),
                    vms: core.vms().running_vms(),
                    quiet: activity.idle_for(),
                };
                if rule.should_exit(load) {
                    tracing::info!(
                        idle_secs = load.quiet.as_secs(),
                        "idle: no job, no call and no running VM; exiting until the next call"
                    );
                    break;
                }
                continue;
            }
        };
        let Some(request) = request else { break };
        match request {
            Control::Shutdown => break,
            Control::Reload => {
                os::notify::reloading();
                match core.reload_config_unchecked() {
                    Ok(config) => {
                        if let Some(log) = &log {
                            log.set_filter(&config.daemon.log_level);
                        }
                    }
                    Err(e) => tracing::error!("reload refused, keeping the old configuration: {e}"),
                }
                os::notify::ready(&core.status_line());
            }
        }
    }

    tracing::info!("shutting down");
    os::notify::stopping();
    let _ = conn.release_name(banger_dbus::BUS_NAME).await;
    core.shutdown();
    // Give cancelled jobs a moment to record how they ended.
    for _ in 0..50 {
        if core.jobs().running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(dns) = dns {
        dns.shutdown().await;
    }
    drop(core);
    mirror.abort();
    calls.abort();
    trimmer.abort();
    housekeeping.abort();
    idle_vms.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

/// Every method call addressed to bangerd counts as activity.
async fn watch_calls(conn: Connection, activity: Arc<idle::Activity>) {
    use futures_util::StreamExt;
    let mut messages = zbus::MessageStream::from(&conn);
    while let Some(message) = messages.next().await {
        if let Ok(message) = message
            && message.message_type() == zbus::message::Type::MethodCall
        {
            activity.touch();
        }
    }
}

/// Who runs VMMs: systemd where it is PID 1 (unless `vm.supervisor` says
/// `process`), else bangerd's own children.
fn supervisor(config: &Config, conn: &zbus::Connection) -> Arc<dyn vm::supervise::Supervisor> {
    use config::SupervisorKind;
    let booted = HostPaths::default().systemd_runtime.exists();
    match config.vm.supervisor {
        SupervisorKind::Systemd => {
            if !booted {
                tracing::warn!(
                    "vm.supervisor = \"systemd\" but systemd is not PID 1 here; VMM starts will fail"
                );
            }
            Arc::new(os::systemd::SystemdSupervisor::new(conn.clone()))
        }
        SupervisorKind::Auto if booted => {
            Arc::new(os::systemd::SystemdSupervisor::new(conn.clone()))
        }
        SupervisorKind::Auto | SupervisorKind::Process => Arc::new(vm::supervise::Direct),
    }
}
