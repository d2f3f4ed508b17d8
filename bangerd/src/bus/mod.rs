//! The D-Bus front end: a thin layer over [`Core`]. It turns messages into
//! [`Caller`]s and plain arguments, core results into replies, and job events
//! into objects, signals and `PropertiesChanged`.
//!
//! Invariant: this is the only module (with the `os` adapters that talk to
//! other services: `os::polkit`, `os::resolved`, `os::bus_names`) that sees
//! zbus types.

mod artifacts;
mod job;
mod manager;
mod options;
mod vm;

use std::sync::Arc;

use banger_dbus::{BUS_NAME, MANAGER_PATH, Reply, job_path};
use tokio::sync::mpsc::UnboundedReceiver;
use zbus::Connection;
use zbus::message::{Flags, Header};
use zbus::names::BusName;

use crate::auth::Caller;
use crate::core::Core;
use crate::error::{Error, ErrorKind};
use crate::jobs::JobEvent;

/// How long a method waits for what it changed to be published
/// ([`crate::jobs::Jobs::published`]).
const PUBLISHED_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

pub use job::JobObject;
pub use manager::ManagerObject;

/// A host folder as it arrived on the wire, for the VM service (which
/// checks it).
pub fn mount_in(m: banger_dbus::options::Mount) -> crate::vm::Mount {
    crate::vm::Mount {
        source: m.source,
        target: m.target,
        read_only: m.read_only,
    }
}

/// Map a core error to its wire error.
pub fn to_wire(e: Error) -> Reply {
    use banger_dbus::Error as W;
    let wire = match e.kind {
        ErrorKind::NotFound => W::NotFound(e.message),
        ErrorKind::InvalidArgument => W::InvalidArgument(e.message),
        ErrorKind::AlreadyExists => W::AlreadyExists(e.message),
        ErrorKind::Busy => W::Busy(e.message),
        ErrorKind::PermissionDenied => W::PermissionDenied(e.message),
        ErrorKind::InteractiveAuthorizationRequired => {
            return Reply::interactive_authorization_required(e.message);
        }
        ErrorKind::Unavailable => W::Unavailable(e.message),
        ErrorKind::Failed => W::Failed(e.message),
        ErrorKind::Cancelled => W::Cancelled(e.message),
        ErrorKind::LimitExceeded => W::LimitExceeded(e.message),
    };
    Reply::Banger(wire)
}

/// The full D-Bus error name of a core error (for `Completed`).
pub fn error_name(e: &Error) -> String {
    zbus::DBusError::name(&to_wire(e.clone())).to_string()
}

/// Who sent `header`, according to the bus.
pub async fn caller(conn: &Connection, header: &Header<'_>) -> Result<Caller, Reply> {
    let sender = header.sender().ok_or_else(|| {
        Reply::Banger(banger_dbus::Error::InvalidArgument(
            "message has no sender".into(),
        ))
    })?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(|e| {
        Reply::Banger(banger_dbus::Error::Failed(format!(
            "cannot ask the bus who is calling: {e}"
        )))
    })?;
    let uid = dbus
        .get_connection_unix_user(BusName::from(sender.clone()))
        .await
        .map_err(|e| {
            Reply::Banger(banger_dbus::Error::Failed(format!(
                "cannot ask the bus who is calling: {e}"
            )))
        })?;
    Ok(Caller {
        uid,
        bus_name: Some(sender.to_string()),
        allow_interactive: header
            .primary()
            .flags()
            .contains(Flags::ALLOW_INTERACTIVE_AUTH),
    })
}

/// Register the manager and ObjectManager, then take the well-known name.
pub async fn serve(conn: &Connection, core: Arc<Core>) -> zbus::Result<()> {
    let server = conn.object_server();
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    server
        .at(MANAGER_PATH, ManagerObject::new(core.clone()))
        .await?;
    artifacts::publish_all(server, &core).await?;
    vm::publish_all(server, &core).await?;
    conn.request_name(BUS_NAME).await?;
    Ok(())
}

/// Mirror job events onto the bus, in order. Also keeps `Status` and
/// sd_notify's STATUS= current. Returns when the core drops its sender.
pub async fn mirror_jobs(
    conn: Connection,
    core: Arc<Core>,
    mut events: UnboundedReceiver<JobEvent>,
) {
    let server = conn.object_server();
    let mut last_status = core.status_line();
    while let Some(event) = events.recv().await {
        // The core changed before it sent the event, so Status is announced
        // first: a client that sees Completed and then reads Status gets
        // the new value.
        let status = core.status_line();
        if status != last_status {
            last_status = status;
            crate::os::notify::status(&last_status);
            if let Ok(manager) = server.interface::<_, ManagerObject>(MANAGER_PATH).await {
                let _ = manager
                    .get()
                    .await
                    .status_changed(manager.signal_emitter())
                    .await;
            }
        }
        if let Err(e) = mirror_one(&conn, server, &core, &event).await {
            tracing::warn!("cannot publish job event {event:?}: {e}");
        }
    }
}

async fn mirror_one(
    conn: &Connection,
    server: &zbus::ObjectServer,
    core: &Arc<Core>,
    event: &JobEvent,
) -> zbus::Result<()> {
    let _ = conn;
    match event {
        JobEvent::Added(id) => {
            job::register(server, core, *id).await?;
        }
        JobEvent::Removed(id) => {
            server.remove::<JobObject, _>(job_path(*id)).await?;
        }
        JobEvent::Progress {
            id,
            stage,
            detail,
            fraction,
        } => {
            let iface = server.interface::<_, JobObject>(job_path(*id)).await?;
            let emitter = iface.signal_emitter();
            JobObject::progress_signal(emitter, stage, detail, *fraction).await?;
            let object = iface.get().await;
            object.stage_changed(emitter).await?;
            object.progress_changed(emitter).await?;
            object.bytes_changed(emitter).await?;
        }
        JobEvent::StageFinished {
            id,
            stage,
            duration,
        } => {
            let iface = server.interface::<_, JobObject>(job_path(*id)).await?;
            let emitter = iface.signal_emitter();
            let usec = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
            JobObject::stage_finished(emitter, stage, usec).await?;
            iface.get().await.stages_changed(emitter).await?;
        }
        JobEvent::ResourceChanged(r) => {
            artifacts::refresh(server, core, r).await?;
        }
        JobEvent::ResourceRemoved(r) => {
            artifacts::remove(server, r).await?;
        }
        // Dropped with the event, which wakes its sender.
        JobEvent::Flush(_) => {}
        JobEvent::Completed {
            id, error, result, ..
        } => {
            let iface = server.interface::<_, JobObject>(job_path(*id)).await?;
            let emitter = iface.signal_emitter();
            {
                let object = iface.get().await;
                object.state_changed(emitter).await?;
                object.cancelable_changed(emitter).await?;
                object.progress_changed(emitter).await?;
            }
            let (name, message) = match error {
                None => (String::new(), String::new()),
                Some(e) => (error_name(e), e.message.clone()),
            };
            JobObject::completed(
                emitter,
                error.is_none(),
                &name,
                &message,
                result
                    .as_ref()
                    .map(artifacts::path_of)
                    .unwrap_or_else(banger_dbus::no_object),
            )
            .await?;
        }
    }
    Ok(())
}
