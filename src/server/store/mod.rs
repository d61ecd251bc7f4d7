//! The server's state in SQLite (`data_dir/mupilot.db`) plus the files beside it
//! (`bundles/<id>.tar.gz`, `outputs/<id>.tar.gz`). They hold members' argv, environment,
//! inputs and outputs: the directories are 0700 and the files 0600 whatever the umask, and
//! a data directory other users can enter is refused.
//!
//! Synchronous by design: one connection behind a mutex, called from the async API through
//! `spawn_blocking`. Every multi-step change runs in one `BEGIN IMMEDIATE` transaction so a
//! payload goes to exactly one pilot. No HTTP or TLS knowledge here; authorization checks that
//! need the row (owner, holding pilot) happen inside the transaction and come back as
//! [`StoreError::Forbidden`].

mod members;
mod payloads;
mod retention;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::Connection;

pub use members::{Member, MemberStatus};
pub use payloads::{Matched, NewPayload, SweepRules, Swept};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open database {path}: {source}; check that data_dir in the config is writable"
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("data directory {path} is accessible to other users (mode {mode:04o}); it holds the members' commands, environments, inputs and outputs: run `chmod 0700 {path}` (owned by the server's account), then start again")]
    DataDirOpen { path: PathBuf, mode: u32 },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("payload {0} does not exist")]
    NotFound(String),
    #[error("member {0} is not in the registry; add it with `mupilot-server member add`")]
    NoMember(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// The database and the payload files.
pub struct Store {
    conn: Mutex<Connection>,
    data_dir: PathBuf,
    /// How often a payload may be queued again after a hand-off that never started it;
    /// the next one fails it (see [`Store::set_requeue_limit`]).
    requeue_limit: u32,
}

/// Default for `max_requeues` in server.toml.
pub const DEFAULT_REQUEUE_LIMIT: u32 = 5;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS members (
    dn            TEXT PRIMARY KEY,
    vo            TEXT NOT NULL,
    fqans         TEXT NOT NULL,
    status        TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    renewal_due   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS payloads (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    owner_dn          TEXT NOT NULL,
    vo                TEXT NOT NULL,
    state             TEXT NOT NULL,
    argv              TEXT NOT NULL,
    env               TEXT NOT NULL,
    jobtag            TEXT,
    cores             INTEGER NOT NULL,
    memory_bytes      INTEGER NOT NULL,
    walltime_seconds  INTEGER NOT NULL,
    outputs           TEXT NOT NULL,
    bundle_sha256     TEXT,
    submitted_at      TEXT NOT NULL,
    updated_at        TEXT,
    pilot_dn          TEXT,
    pilot_id          TEXT,
    host              TEXT,
    batch_job_id      TEXT,
    account           TEXT,
    uid               INTEGER,
    exit_code         INTEGER,
    signal            INTEGER,
    cpu_seconds       REAL,
    peak_memory_bytes INTEGER,
    wall_seconds      REAL,
    reason            TEXT,
    denial_class      TEXT,
    has_output        INTEGER NOT NULL DEFAULT 0,
    outputs_skipped   TEXT,
    requeues          INTEGER NOT NULL DEFAULT 0,
    lost_by_server    INTEGER NOT NULL DEFAULT 0,
    files_deleted_at  TEXT
);
CREATE INDEX IF NOT EXISTS payloads_queue ON payloads(state, seq);
CREATE INDEX IF NOT EXISTS payloads_owner ON payloads(owner_dn, seq);
-- Covers the metrics scrape's GROUP BY vo, state: an index scan, not a table scan (1M rows:
-- 62 ms instead of 566 ms, with the store's lock held).
CREATE INDEX IF NOT EXISTS payloads_vo_state ON payloads(vo, state);
CREATE TABLE IF NOT EXISTS commands (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    payload_id TEXT NOT NULL,
    command    TEXT NOT NULL,
    delivered  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(payload_id, delivered);
"#;

/// Columns added after the first release: (name, declaration). Databases created before
/// get them with ALTER TABLE at open, so an upgraded server keeps its payloads.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    // Hand-offs that ended unstarted (requeued); see Store::set_requeue_limit.
    ("requeues", "INTEGER NOT NULL DEFAULT 0"),
    // 1 while `lost` is the sweeper's verdict on a silent pilot (a late final report from
    // that pilot replaces it); 0 for a pilot's own `lost`.
    ("lost_by_server", "INTEGER NOT NULL DEFAULT 0"),
    // The helper's "path: reason" list of outputs it did not collect (JSON array), or NULL.
    ("outputs_skipped", "TEXT"),
    // When retention deleted the payload's bundle and output archive (store/retention.rs).
    ("files_deleted_at", "TEXT"),
];

fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let have: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('payloads')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (name, decl) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE payloads ADD COLUMN {name} {decl}"))?;
        }
    }
    Ok(())
}

/// Timestamps are stored as fixed-width RFC 3339 UTC text so they compare as strings.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

impl Store {
    /// Opens (creating if needed) `data_dir/mupilot.db` and the file directories, all
    /// private to the server's account; refuses a data directory others can enter.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        private_dirs(data_dir)?;
        let path = data_dir.join("mupilot.db");
        // SQLite creates the -wal and -shm files with the database file's mode, so making
        // that file 0600 first keeps all three private whatever the umask.
        for f in ["mupilot.db", "mupilot.db-wal", "mupilot.db-shm"] {
            let p = data_dir.join(f);
            let created = f == "mupilot.db";
            private_file(&p, created).map_err(|source| StoreError::Io { path: p, source })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        // WAL: readers do not block the writer. FULL: every commit fsyncs the WAL before it
        // returns, so a match is on disk before its envelope leaves the server. NORMAL
        // survives a process crash but not a power loss: the last matches could roll back
        // and be handed out again, the payload run twice. FULL for the whole connection, not
        // the match transaction alone: a submission answered 201, a final state and a cancel
        // are decisions too, and one connection serialises them all anyway. Cost measured in
        // docs/benchmarks.md (Fetch).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        add_missing_columns(&conn).map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
            data_dir: data_dir.to_path_buf(),
            requeue_limit: DEFAULT_REQUEUE_LIMIT,
        })
    }

    /// Sets `max_requeues`: a payload handed back unstarted (by its pilot, or by the sweeper
    /// for a pilot that never started it) more than this many times fails instead of being
    /// queued again, so a payload that keeps breaking hand-offs cannot circulate forever.
    pub fn set_requeue_limit(&mut self, limit: u32) {
        self.requeue_limit = limit;
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done change: SQLite rolls back
        // an open transaction when it is dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a payload's input bundle is kept.
    pub fn bundle_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("bundles").join(format!("{id}.tar.gz"))
    }

    /// Where a payload's output archive is kept.
    pub fn output_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("outputs").join(format!("{id}.tar.gz"))
    }
}

/// The data directory and its `bundles` and `outputs`: created 0700, an existing data
/// directory refused when group or others may enter it, the subdirectories set to 0700.
fn private_dirs(data_dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    match std::fs::metadata(data_dir) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            return Err(StoreError::DataDirOpen {
                path: data_dir.to_path_buf(),
                mode: m.permissions().mode() & 0o7777,
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(io(data_dir))?;
            // The umask may have taken bits away from 0700.
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(data_dir))?;
        }
        Err(e) => return Err(io(data_dir)(e)),
    }
    for sub in ["bundles", "outputs"] {
        let p = data_dir.join(sub);
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&p)(e)),
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).map_err(io(&p))?;
    }
    Ok(())
}

/// Makes `path` exactly 0600: creates it when `create` (empty), else only when it exists.
fn private_file(path: &Path, create: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .open(path);
    match f {
        Ok(f) => f.set_permissions(std::fs::Permissions::from_mode(0o600)),
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a file completely under a temporary name (0600 whatever the umask), syncs it, then
/// renames it into place, so a reader never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is: a power loss must not take back a
        // file whose row the database already has.
        match path.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}
