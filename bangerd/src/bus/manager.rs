//! `org.banger.Manager` at `/org/banger/Manager`.

use std::sync::Arc;

use banger_dbus::{API_VERSION, DoctorCheck, options::maintain};
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, interface};

use super::options::{Options, bool_opt, only_known};
use super::{caller, job, to_wire};
use crate::core::{Core, MaintainOptions, VERSION};

/// The manager object.
#[derive(Debug)]
pub struct ManagerObject {
    core: Arc<Core>,
}

impl ManagerObject {
    /// Serve `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// The daemon. Long operations return a job object path at once; follow the
/// job's `Progress` and `Completed` signals (subscribe before calling).
#[interface(name = "org.banger.Manager")]
impl ManagerObject {
    /// Check the host and report what works: an array of (name, verdict,
    /// detail, hint) where verdict is pass, warn or fail. Open to everyone.
    #[zbus(out_args("checks"))]
    async fn doctor(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<DoctorCheck>, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        let checks = self.core.doctor(&caller).await;
        Ok(checks
            .into_iter()
            .map(|c| DoctorCheck {
                name: c.name.to_owned(),
                verdict: c.verdict.as_str().to_owned(),
                detail: c.detail,
                hint: c.hint,
            })
            .collect())
    }

    /// Start store maintenance (integrity check, history pruning,
    /// checkpoint, optimize; option "vacuum" (b) also vacuums). Returns the
    /// job. polkit action org.banger.maintain.
    #[zbus(out_args("job"))]
    async fn maintain(
        &self,
        options: Options,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        only_known("Maintain", &options, &[maintain::VACUUM]).map_err(to_wire)?;
        let options = MaintainOptions {
            vacuum: bool_opt(&options, maintain::VACUUM, false).map_err(to_wire)?,
        };
        let id = self
            .core
            .maintain(&caller, options)
            .await
            .map_err(to_wire)?;
        // Make sure the object exists before the caller can look at it.
        job::register(conn.object_server(), &self.core, id)
            .await
            .map_err(|e| {
                banger_dbus::Reply::Banger(banger_dbus::Error::Failed(format!(
                    "cannot publish the job: {e}"
                )))
            })?;
        Ok(banger_dbus::job_path(id))
    }

    /// Re-read bangerd.toml. A bad file is refused with InvalidArgument
    /// naming the key, and the configuration in force stays. polkit action
    /// org.banger.maintain.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), banger_dbus::Reply> {
        let caller = caller(conn, &header).await?;
        self.core.reload_config(&caller).await.map_err(to_wire)?;
        Ok(())
    }

    /// Version of bangerd.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        VERSION.to_owned()
    }

    /// Version of this D-Bus API; grows when members are added.
    #[zbus(property(emits_changed_signal = "const"))]
    fn api_version(&self) -> u32 {
        API_VERSION
    }

    /// One-line summary, e.g. "idle" or "1 job running".
    #[zbus(property)]
    fn status(&self) -> String {
        self.core.status_line()
    }
}
