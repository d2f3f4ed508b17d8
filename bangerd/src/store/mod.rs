//! The store: one SQLite database in the state directory.
//!
//! WAL mode, foreign keys on, versioned migrations applied in one
//! transaction each (`PRAGMA user_version` is the schema version). A store
//! written by a newer bangerd is refused rather than guessed at.

mod leases;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

/// The migrations, in order; migration `i` takes the schema from version `i`
/// to `i + 1`. Append only: never edit a migration that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: key/value metadata about the store itself.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) STRICT;",
    // 2: job history. AUTOINCREMENT so a job number (and its object path)
    // is never reused, even after old rows are pruned.
    "CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        owner_uid   INTEGER NOT NULL,
        state       TEXT NOT NULL CHECK (state IN
                      ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
        started_at  INTEGER NOT NULL,
        finished_at INTEGER,
        error_kind  TEXT,
        message     TEXT
    ) STRICT;
    CREATE INDEX jobs_by_finished_at ON jobs (finished_at);",
    // 3: kernels and images. Paths are absolute host paths; empty text
    // means "none". An image cannot outlive its kernel.
    "CREATE TABLE kernels (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        version     TEXT NOT NULL DEFAULT '',
        vmlinux     TEXT NOT NULL,
        bzimage     TEXT NOT NULL DEFAULT '',
        initrd      TEXT NOT NULL DEFAULT '',
        modules     TEXT NOT NULL DEFAULT '',
        sha256      TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        owner_uid   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE images (
        id               TEXT PRIMARY KEY NOT NULL,
        name             TEXT NOT NULL UNIQUE,
        managed          INTEGER NOT NULL CHECK (managed IN (0, 1)),
        rootfs           TEXT NOT NULL,
        rootfs_bytes     INTEGER NOT NULL,
        work_seed        TEXT NOT NULL DEFAULT '',
        work_seed_sha256 TEXT NOT NULL DEFAULT '',
        kernel_id        TEXT NOT NULL REFERENCES kernels (id) ON DELETE RESTRICT,
        services         TEXT NOT NULL DEFAULT '[]',
        init             TEXT NOT NULL DEFAULT '',
        created_at       INTEGER NOT NULL,
        owner_uid        INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX images_by_kernel ON images (kernel_id);",
    // 4: network leases, one per owner (a VM); addresses and MACs unique.
    "CREATE TABLE leases (
        owner TEXT PRIMARY KEY NOT NULL,
        ipv4  TEXT NOT NULL UNIQUE,
        mac   TEXT NOT NULL UNIQUE
    ) STRICT;",
    // 5: virtual machines. The image cannot go while a VM uses it.
    "CREATE TABLE vms (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        owner_uid   INTEGER NOT NULL,
        image_id    TEXT NOT NULL REFERENCES images (id),
        kernel_id   TEXT NOT NULL REFERENCES kernels (id),
        vcpus       INTEGER NOT NULL,
        memory_mib  INTEGER NOT NULL,
        disk_bytes  INTEGER NOT NULL,
        nat         INTEGER NOT NULL,
        state       TEXT NOT NULL,
        vmm         TEXT NOT NULL,
        pid         INTEGER,
        pid_start   INTEGER,
        tap         TEXT,
        ssh_keys    TEXT NOT NULL,
        disk_method TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        last_error  TEXT NOT NULL
    ) STRICT;
    CREATE INDEX vms_by_image ON vms (image_id);",
    // 6: whether a VM may talk with the other VMs that may (peers).
    "ALTER TABLE vms ADD COLUMN peers INTEGER NOT NULL DEFAULT 0;",
    // 7: what a finished job made (`vm:ID`, `image:ID`, `kernel:ID`) and
    // its stages (JSON), for callers that come after its object is gone;
    // VMs by owner, for quotas that read one user's VMs only.
    "ALTER TABLE jobs ADD COLUMN result TEXT;
    ALTER TABLE jobs ADD COLUMN stages TEXT;
    CREATE INDEX vms_by_owner ON vms (owner_uid);",
    // 8: whether a VM starts when bangerd first starts after a host boot.
    "ALTER TABLE vms ADD COLUMN autostart INTEGER NOT NULL DEFAULT 0;",
    // 9: the port forwards bangerd keeps for a VM (JSON list).
    "ALTER TABLE vms ADD COLUMN forwards TEXT NOT NULL DEFAULT '[]';",
    // 10: the host folders a VM shares (JSON list).
    "ALTER TABLE vms ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';",
    // 11: whether a stopped VM's memory waits in its directory
    // (`vm suspend`), to be resumed at its next start.
    "ALTER TABLE vms ADD COLUMN suspended INTEGER NOT NULL DEFAULT 0;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("store error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database is from a newer bangerd.
    #[error(
        "the store has schema version {found} but this bangerd knows only up to {known}; \
         upgrade bangerd or restore the store from before the downgrade"
    )]
    TooNew {
        /// Version in the file.
        found: u32,
        /// Highest version this build knows.
        known: u32,
    },
    /// The thread running a store call died.
    #[error("store task failed: {0}")]
    Task(String),
    /// A migration failed; the store was left at `from`.
    #[error("migrating the store from schema version {from} failed: {source}")]
    Migration {
        /// Version before the failed step.
        from: u32,
        /// Why.
        source: rusqlite::Error,
    },
}

/// A store timestamp: microseconds since the Unix epoch.
pub fn unix_us(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// State of a job row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRowState {
    /// Running (or was, when the daemon died).
    Running,
    /// Finished well.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by a caller.
    Cancelled,
    /// The daemon stopped while it ran.
    Interrupted,
}

impl JobRowState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }
}

/// How a job ended, for [`Store::finish_job`].
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub state: JobRowState,
    /// The error's kind (`ErrorKind`'s name), if it did not succeed.
    pub error_kind: Option<&'a str>,
    pub message: Option<&'a str>,
    /// What it made, e.g. `vm:ID`.
    pub result: Option<&'a str>,
    /// Its finished stages, as JSON.
    pub stages: &'a str,
    pub finished_at_us: i64,
}

/// A row of the job history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    /// Job number.
    pub id: u64,
    /// Kind, e.g. `maintain`.
    pub kind: String,
    /// Uid that started it.
    pub owner_uid: u32,
    /// State as stored.
    pub state: String,
    /// Error message, if it failed.
    pub message: Option<String>,
    /// The error's kind (`ErrorKind`'s name).
    pub error_kind: Option<String>,
    /// What it made, e.g. `vm:ID` (from schema 7 on).
    pub result: Option<String>,
    /// Its finished stages as JSON (from schema 7 on).
    pub stages: Option<String>,
}

/// The open store. Calls block; async callers go through `blocking::run`.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// How many VM rows say `running`: counted at open, then kept by the
    /// writes of VM rows (under the connection's lock), so the status
    /// line reads no rows.
    pub(crate) running_vms: std::sync::atomic::AtomicUsize,
    /// Where a lease search starts: every guest address of the subnet
    /// below it is leased (`store::leases`). Lowered when a lease goes.
    pub(crate) lease_floor: Mutex<Option<(crate::net::leases::Subnet, u32)>>,
}

impl Store {
    /// Open (creating if needed) the store at `path` and migrate it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::setup(conn)
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode answers with a row, so it is queried, not executed.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
        migrate(&mut conn, MIGRATIONS)?;
        let running: i64 = conn.query_row(
            "SELECT COUNT(*) FROM vms WHERE state = 'running'",
            [],
            |r| r.get(0),
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            running_vms: std::sync::atomic::AtomicUsize::new(usize::try_from(running).unwrap_or(0)),
            lease_floor: Mutex::new(None),
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (every write is a transaction), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version of the open store.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(user_version(&self.conn())?)
    }

    /// Record a new running job and return its number.
    pub fn insert_job(
        &self,
        kind: &str,
        owner_uid: u32,
        started_at_us: i64,
    ) -> Result<u64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO jobs (kind, owner_uid, state, started_at) VALUES (?1, ?2, 'running', ?3)",
            params![kind, owner_uid, started_at_us],
        )?;
        Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or_default())
    }

    /// Record how a job ended.
    pub fn finish_job(&self, id: u64, end: &JobEnd<'_>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET state = ?2, error_kind = ?3, message = ?4, finished_at = ?5,
                 result = ?6, stages = ?7
             WHERE id = ?1",
            params![
                id as i64,
                end.state.as_str(),
                end.error_kind,
                end.message,
                end.finished_at_us,
                end.result,
                end.stages
            ],
        )?;
        Ok(())
    }

    /// Mark jobs still `running` (the daemon died under them) as
    /// `interrupted`; returns how many.
    pub fn interrupt_running_jobs(&self, now_us: i64) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'interrupted', finished_at = ?1,
                 message = 'bangerd stopped while the job ran'
             WHERE state = 'running'",
            params![now_us],
        )?)
    }

    /// Delete finished jobs that ended before `before_us`; returns how many.
    pub fn prune_jobs(&self, before_us: i64) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM jobs WHERE state != 'running' AND finished_at < ?1",
            params![before_us],
        )?)
    }

    /// Delete finished jobs that ended more than `days` days ago; returns
    /// how many.
    pub fn prune_jobs_older_than(&self, days: u32) -> Result<usize, StoreError> {
        let cutoff =
            std::time::SystemTime::now() - std::time::Duration::from_secs(u64::from(days) * 86_400);
        self.prune_jobs(unix_us(cutoff))
    }

    /// One job row.
    pub fn job(&self, id: u64) -> Result<Option<JobRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, kind, owner_uid, state, message, error_kind, result, stages
                 FROM jobs WHERE id = ?1",
                params![id as i64],
                |r| {
                    Ok(JobRow {
                        id: r.get::<_, i64>(0)? as u64,
                        kind: r.get(1)?,
                        owner_uid: r.get(2)?,
                        state: r.get(3)?,
                        message: r.get(4)?,
                        error_kind: r.get(5)?,
                        result: r.get(6)?,
                        stages: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// `PRAGMA quick_check`: `Ok(None)` when the database is sound, else the first problem.
    pub fn quick_check(&self) -> Result<Option<String>, StoreError> {
        let verdict: String = self
            .conn()
            .query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        Ok((verdict != "ok").then_some(verdict))
    }

    /// Move the WAL into the main file and truncate it.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// `PRAGMA optimize`.
    pub fn optimize(&self) -> Result<(), StoreError> {
        self.conn().execute_batch("PRAGMA optimize")?;
        Ok(())
    }

    /// `VACUUM`: rewrite the file to reclaim free pages.
    pub fn vacuum(&self) -> Result<(), StoreError> {
        self.conn().execute_batch("VACUUM")?;
        Ok(())
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Bring `conn` up to `migrations.len()`, one transaction per step.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let known = migrations.len() as u32;
    let found = user_version(conn)?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (from, sql) in migrations.iter().enumerate().skip(found as usize) {
        let from = from as u32;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", from + 1)?;
            tx.commit()
        };
        step(conn).map_err(|source| StoreError::Migration { from, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_store_is_at_the_latest_version() {
        let store = Store::open_in_memory().expect("store");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    }

    #[test]
    fn opening_twice_is_idempotent_and_uses_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        drop(Store::open(&path).expect("first open"));
        let store = Store::open(&path).expect("second open");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let mode: String = store
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
        let fk: i64 = store
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("foreign keys");
        assert_eq!(fk, 1);
    }

    #[test]
    fn upgrade_from_previous_schema_keeps_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        {
            // A store as the previous release left it: schema version 1.
            let mut conn = Connection::open(&path).expect("open");
            migrate(&mut conn, &MIGRATIONS[..1]).expect("old schema");
            conn.execute("INSERT INTO meta (key, value) VALUES ('origin', 'v1')", [])
                .expect("old data");
            assert_eq!(user_version(&conn).expect("version"), 1);
        }
        let store = Store::open(&path).expect("upgrade");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let origin: String = store
            .conn()
            .query_row("SELECT value FROM meta WHERE key = 'origin'", [], |r| {
                r.get(0)
            })
            .expect("old row survived");
        assert_eq!(origin, "v1");
        let id = store.insert_job("maintain", 0, 1).expect("new table works");
        assert_eq!(id, 1);
    }

    #[test]
    fn upgrade_from_schema_2_keeps_jobs_and_adds_kernels_and_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        {
            let mut conn = Connection::open(&path).expect("open");
            migrate(&mut conn, &MIGRATIONS[..2]).expect("schema 2");
            conn.execute(
                "INSERT INTO jobs (kind, owner_uid, state, started_at) VALUES ('maintain', 0, 'succeeded', 1)",
                [],
            )
            .expect("old job");
        }
        let store = Store::open(&path).expect("upgrade");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        assert_eq!(store.job(1).expect("query").expect("kept").kind, "maintain");
        assert!(store.kernels().expect("kernels table").is_empty());
        assert!(store.images().expect("images table").is_empty());
    }

    #[test]
    fn newer_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .expect("bump");
        }
        let err = Store::open(&path).expect_err("too new");
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
        assert!(err.to_string().contains("upgrade bangerd"), "{err}");
    }

    #[test]
    fn failed_migration_rolls_back() {
        let mut conn = Connection::open_in_memory().expect("open");
        let bad = [
            MIGRATIONS[0],
            "CREATE TABLE x (a INTEGER); THIS IS NOT SQL;",
        ];
        let err = migrate(&mut conn, &bad).expect_err("bad migration");
        assert!(
            matches!(err, StoreError::Migration { from: 1, .. }),
            "{err}"
        );
        assert_eq!(user_version(&conn).expect("version"), 1);
        let x: Option<String> = conn
            .query_row("SELECT name FROM sqlite_master WHERE name = 'x'", [], |r| {
                r.get(0)
            })
            .optional()
            .expect("query");
        assert_eq!(x, None, "half-applied migration left a table behind");
    }

    #[test]
    fn job_history_round_trip_and_prune() {
        let store = Store::open_in_memory().expect("store");
        let a = store.insert_job("maintain", 1000, 10).expect("a");
        let b = store.insert_job("maintain", 0, 20).expect("b");
        assert!(b > a);
        store
            .finish_job(
                a,
                &JobEnd {
                    state: JobRowState::Failed,
                    error_kind: Some("Failed"),
                    message: Some("boom"),
                    result: Some("vm:abc"),
                    stages: r#"[["one",5]]"#,
                    finished_at_us: 15,
                },
            )
            .expect("finish");
        let row = store.job(a).expect("query").expect("row");
        assert_eq!(
            (
                row.error_kind.as_deref(),
                row.result.as_deref(),
                row.stages.as_deref()
            ),
            (Some("Failed"), Some("vm:abc"), Some(r#"[["one",5]]"#))
        );
        assert_eq!(store.interrupt_running_jobs(30).expect("interrupt"), 1);
        let row = store.job(b).expect("query").expect("row");
        assert_eq!(row.state, "interrupted");
        assert_eq!(store.prune_jobs(20).expect("prune"), 1);
        assert_eq!(store.job(a).expect("query"), None);
        // Numbers are never reused after pruning.
        store.prune_jobs(i64::MAX).expect("prune all");
        assert!(store.insert_job("maintain", 0, 40).expect("c") > b);
        assert_eq!(store.quick_check().expect("check"), None);
        store.checkpoint().expect("checkpoint");
        store.optimize().expect("optimize");
        store.vacuum().expect("vacuum");
    }
}
