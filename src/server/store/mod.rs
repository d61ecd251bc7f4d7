//! The server's state in a database — SQLite (`data_dir/mupilot.db`, the embedded default) or
//! PostgreSQL (`[database]` in server.toml, shared by several server instances) — plus the
//! files beside it (`bundles/<id>.tar.gz`, `outputs/<id>.tar.gz`). They hold members' argv,
//! environment, inputs and outputs: the directories are 0700 and the files 0600 whatever the
//! umask, and a data directory other users can enter is refused.
//!
//! Synchronous by design: SQLite is one connection behind a mutex, PostgreSQL a small r2d2
//! pool of sync `postgres` clients; the async API calls in through `spawn_blocking`. Every
//! multi-step change runs in one transaction ([`Store::tx`]): `BEGIN IMMEDIATE` on SQLite
//! (the whole file is held); on PostgreSQL the rows it changes are locked as it reads them
//! (`FOR UPDATE`, and `FOR UPDATE … SKIP LOCKED` where several instances claim from the
//! queue), so a payload goes to exactly one pilot whichever instance answers. No HTTP or TLS
//! knowledge here; authorization checks that need the row (owner, holding pilot) happen
//! inside the transaction and come back as [`StoreError::Forbidden`].
//!
//! ## Adding a table or a query (both engines)
//! 1. Schema: add `V<n+1>__<what>.sql` to BOTH `migrations/sqlite/` and
//!    `migrations/postgres/`, same number and name (one version sequence; a unit test checks
//!    the two lists match). Integers are `INTEGER` / `BIGINT`, reals `REAL` / `DOUBLE
//!    PRECISION`, timestamps `TEXT` / `TEXT COLLATE "C"` ([`ts`]), identity columns
//!    `INTEGER PRIMARY KEY AUTOINCREMENT` / `BIGINT GENERATED ALWAYS AS IDENTITY`. Never edit
//!    a released migration: databases in the field have run it.
//! 2. Queries: write the SQL once, with `?1, ?2, …` placeholders, in portable SQL (upserts as
//!    `ON CONFLICT … DO …`, `CAST(?1 AS TEXT) IS NULL` for an optional filter), and run it
//!    through [`db::Conn`] inside [`Store::tx`] (several statements) or [`Store::conn`] (one):
//!    `c.query(sql, vals![a, b])`, then `row.text(0)?`, `row.opt_int(1)?`, ….
//! 3. A read that decides a later write in the same transaction ends with
//!    `c.engine().lock_row()`; a claim from a queue several instances take from ends with
//!    `c.engine().claim("alias")`. The statement must also carry its guard (`AND state =
//!    'queued'`) so a repeat is harmless.
//! 4. Test it on both: tests/server_store_engines.rs runs each scenario on SQLite and on a
//!    private PostgreSQL cluster (tests/pg_support).

mod db;
mod delegations;
mod members;
mod payloads;
mod pg_tls;
mod registry;
mod retention;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::Connection;

pub use db::Engine;
use db::{Conn, PgManager};
pub use delegations::{Delegation, ProxyHolder, Signing};
pub use members::{Member, MemberStatus, Suspension};
pub use payloads::{Matched, NewPayload, SweepRules, Swept};
pub use pg_tls::{ClientCert, PgTls};
pub use registry::{Effect, FiledRequest, MembershipPurged, NewRegistration};
pub use retention::RecordsExpired;

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
    #[error("PostgreSQL error: {}", pg_detail(.0))]
    Pg(#[from] postgres::Error),
    #[error("cannot connect to PostgreSQL at {target}: {source}; check [database] in server.toml (host, port, dbname, user, password_file, sslmode, sslrootcert), that the server is running and that its max_connections leaves room for pool_size connections per instance")]
    PgConnect { target: String, source: r2d2::Error },
    #[error("{key} = {path}: {why}")]
    PgTls {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("cannot read the database password file {path}: {why}")]
    PasswordFile { path: PathBuf, why: String },
    #[error("schema migration failed on {engine:?}: {source}; the database is left at the last version that applied (see `refinery_schema_history`)")]
    Migrate {
        engine: Engine,
        source: refinery::Error,
    },
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
    backend: Backend,
    data_dir: PathBuf,
    /// How often a payload may be queued again after a hand-off that never started it;
    /// the next one fails it (see [`Store::set_requeue_limit`]).
    requeue_limit: u32,
}

enum Backend {
    Sqlite(Mutex<Connection>),
    /// The pool (None only while the store is dropped) and `user@host:port/dbname`.
    Postgres(Option<r2d2::Pool<PgManager>>, String),
}

impl Drop for Store {
    /// The sync `postgres` client closes its connection by blocking on its own runtime, which
    /// panics inside a tokio runtime (the server drops its state there at shutdown): the
    /// pool is dropped on a plain thread instead.
    fn drop(&mut self) {
        if let Backend::Postgres(pool, _) = &mut self.backend {
            if let Some(pool) = pool.take() {
                if tokio::runtime::Handle::try_current().is_ok() {
                    let _ = std::thread::spawn(move || drop(pool)).join();
                }
            }
        }
    }
}

/// Which database the store uses (`[database]` in server.toml).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Database {
    /// `data_dir/mupilot.db`.
    #[default]
    Sqlite,
    Postgres(PgSettings),
}

impl Database {
    /// The same database for a one-shot command (`member`, `membership purge`): one
    /// connection, where a serving instance opens its whole pool at start.
    pub fn for_command(&self) -> Database {
        match self {
            Database::Postgres(pg) => Database::Postgres(PgSettings {
                pool_size: 1,
                ..pg.clone()
            }),
            Database::Sqlite => Database::Sqlite,
        }
    }
}

/// Where the PostgreSQL database is and who the server is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// A host name or address, or the directory of a Unix socket (starts with `/`).
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// A file holding the password (first line); None for peer or trust authentication.
    pub password_file: Option<PathBuf>,
    /// Connections this instance opens at start and keeps open (PostgreSQL's max_connections
    /// must leave room for pool_size per instance).
    pub pool_size: u32,
    /// TLS to the database (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
    pub tls: PgTls,
}

/// Default `pool_size`: the blocking threads that use the store at once on a busy instance.
pub const DEFAULT_POOL_SIZE: u32 = 16;

impl PgSettings {
    /// `user@host:port/dbname`, for messages (no password), and whether over TLS.
    pub fn target(&self) -> String {
        let tls = match &self.tls {
            PgTls::Disable => "",
            PgTls::Verify {
                check_host: true, ..
            } => " (TLS, verify-full)",
            PgTls::Verify { .. } => " (TLS, verify-ca)",
        };
        format!(
            "{}@{}:{}/{}{tls}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

/// How many times a PostgreSQL transaction that lost a deadlock or a serialization conflict
/// to another instance is run again before its error is returned.
const PG_RETRIES: u32 = 5;

/// Key of the advisory lock instances take while migrating, so two instances started at
/// once do not both create the tables ("mupilot" in ASCII).
const MIGRATION_LOCK: i64 = 0x006d_7570_696c_6f74;

mod sqlite_schema {
    refinery::embed_migrations!("src/server/store/migrations/sqlite");
}
mod pg_schema {
    refinery::embed_migrations!("src/server/store/migrations/postgres");
}

/// A PostgreSQL error with its server-side message (the `Display` of `postgres::Error` alone
/// says only "db error").
pub(crate) fn pg_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} {}: {} (SQLSTATE {})",
            e,
            d.severity(),
            d.message(),
            d.code().code()
        ),
        // The driver's own text names only the step ("error performing TLS handshake", "error
        // connecting to server"); why it failed is in the source chain.
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// Default for `max_requeues` in server.toml.
pub const DEFAULT_REQUEUE_LIMIT: u32 = 5;

/// Columns added before schema migrations existed: (name, declaration). A SQLite database
/// made by those releases gets them with ALTER TABLE before the first migration runs (V1
/// then finds today's tables and only records itself), so an upgraded server keeps its
/// payloads. New columns go in a migration instead.
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

/// A timestamp as the store writes it (for records that quote one).
pub fn ts_text(t: DateTime<Utc>) -> String {
    ts(t)
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
        Self::open_with(data_dir, &Database::Sqlite)
    }

    /// Opens the configured database (migrated to the current schema) and the file
    /// directories under `data_dir`. With PostgreSQL, `data_dir` holds only the bundles and
    /// outputs, and must be the same (shared) directory for every instance.
    pub fn open_with(data_dir: &Path, db: &Database) -> Result<Self, StoreError> {
        private_dirs(data_dir)?;
        let backend = match db {
            Database::Sqlite => Backend::Sqlite(Mutex::new(open_sqlite(data_dir)?)),
            Database::Postgres(pg) => Backend::Postgres(Some(open_postgres(pg)?), pg.target()),
        };
        Ok(Store {
            backend,
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

    /// Which engine this store runs on.
    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Postgres(..) => Engine::Postgres,
        }
    }

    /// The SQLite connection (tests of SQLite settings); None on PostgreSQL.
    #[cfg(test)]
    fn sqlite(&self) -> Option<MutexGuard<'_, Connection>> {
        match &self.backend {
            Backend::Sqlite(c) => Some(lock(c)),
            Backend::Postgres(..) => None,
        }
    }

    /// Runs `f` in one transaction, committed when it returns Ok and rolled back when it
    /// returns an error. On PostgreSQL a transaction another instance's transaction
    /// deadlocked with is run again (so `f` may run more than once: no side effects outside
    /// the database in it).
    pub(crate) fn tx<T>(
        &self,
        mut f: impl FnMut(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut conn = lock(c);
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&mut db::Sqlite(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(pool, target) => {
                let mut attempt = 0;
                loop {
                    let mut conn = pg(pool.as_ref().expect("the pool lives until drop"), target)?;
                    let res = conn.run(|client, statements| {
                        let mut tx = client.transaction()?;
                        let out = f(&mut db::Pg {
                            client: &mut tx,
                            statements: &mut *statements,
                        })?;
                        tx.commit()?;
                        Ok(out)
                    });
                    match res {
                        Err(e) if attempt < PG_RETRIES && db::is_retryable(&e) => attempt += 1,
                        res => return res,
                    }
                }
            }
        }
    }

    /// Runs `f` on a connection outside a transaction: for reads and single statements.
    pub(crate) fn conn<T>(
        &self,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Sqlite(c) => f(&mut db::Sqlite(&lock(c))),
            Backend::Postgres(pool, target) => {
                let mut conn = pg(pool.as_ref().expect("the pool lives until drop"), target)?;
                conn.run(|client, statements| f(&mut db::Pg { client, statements }))
            }
        }
    }

    /// Where a payload's input bundle is kept.
    pub fn bundle_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("bundles").join(format!("{id}.tar.gz"))
    }

    /// Where a payload's output archive is kept.
    pub fn output_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("outputs").join(format!("{id}.tar.gz"))
    }

    /// Runs `delete` so that what it deletes is in no file of the database afterwards. On
    /// SQLite with `secure_delete` (freed cells overwritten with zeros, not left in free
    /// pages), then the WAL checkpointed and truncated. On PostgreSQL rows are gone for every
    /// reader at commit; autovacuum reclaims their dead tuples.
    pub(crate) fn erasing<T>(
        &self,
        delete: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let sqlite = match &self.backend {
            Backend::Sqlite(c) => Some(c),
            Backend::Postgres(..) => None,
        };
        if let Some(c) = sqlite {
            lock(c).pragma_update(None, "secure_delete", "ON")?;
        }
        let done = delete();
        if let Some(c) = sqlite {
            let conn = lock(c);
            let restored = conn.pragma_update(None, "secure_delete", "OFF");
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            restored?;
        }
        done
    }
}

fn lock(c: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave a half-done change: SQLite rolls back an
    // open transaction when it is dropped.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn pg(
    pool: &r2d2::Pool<PgManager>,
    target: &str,
) -> Result<r2d2::PooledConnection<PgManager>, StoreError> {
    pool.get().map_err(|source| StoreError::PgConnect {
        target: target.to_string(),
        source,
    })
}

/// `data_dir/mupilot.db`, private, WAL, synchronous=FULL, migrated.
fn open_sqlite(data_dir: &Path) -> Result<Connection, StoreError> {
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
    let mut conn = Connection::open(&path).map_err(open_err)?;
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
    // A database made before migrations: bring it to V1's shape first (V1 then only records
    // itself).
    let table = |name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if table("payloads").map_err(open_err)? && !table(MIGRATIONS_TABLE).map_err(open_err)? {
        add_missing_columns(&conn).map_err(open_err)?;
    }
    sqlite_schema::migrations::runner()
        .set_migration_table_name(MIGRATIONS_TABLE)
        .run(&mut conn)
        .map_err(|source| StoreError::Migrate {
            engine: Engine::Sqlite,
            source,
        })?;
    Ok(conn)
}

/// Where refinery records the versions applied (both engines).
pub const MIGRATIONS_TABLE: &str = "refinery_schema_history";

/// Reads the password file: its first line. Refused when other users may read it.
fn read_password(path: &Path) -> Result<String, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |why: String| StoreError::PasswordFile {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        err(format!(
            "{e}; create it (one line, the password) readable only by the server's account"
        ))
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(err(format!(
            "other users may read it (mode {mode:04o}); run `chmod 0600 {}`",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(err(
            "its first line is empty; write the password on it".into()
        ));
    }
    Ok(pw)
}

/// A pool of connections to the configured database, migrated to the current schema under an
/// advisory lock (instances started together migrate one after the other).
fn open_postgres(pg: &PgSettings) -> Result<r2d2::Pool<PgManager>, StoreError> {
    let mut config = postgres::Config::new();
    config
        .host(&pg.host)
        .port(pg.port)
        .dbname(&pg.dbname)
        .user(&pg.user)
        .application_name("mupilot-server")
        .connect_timeout(Duration::from_secs(10));
    if let Some(f) = &pg.password_file {
        config.password(read_password(f)?);
    }
    let tls = pg_tls::connector(&pg.tls)?;
    if tls.is_some() {
        // Asked for TLS: a server that does not offer it is an error, never plaintext.
        config.ssl_mode(postgres::config::SslMode::Require);
    }
    let size = pg.pool_size.max(1);
    let pool = r2d2::Pool::builder()
        // A fixed pool, opened here (build() waits for it): a connection costs a backend
        // process and a SCRAM exchange, 20 ms on a loaded host, which a pool that grows on
        // demand charges to the first requests of a burst, and one that shrinks when idle (or
        // renews every connection on a timer, all at once) charges again later. A connection
        // that breaks is dropped (PgManager::has_broken) and replaced in the background.
        .max_size(size)
        .min_idle(Some(size))
        .idle_timeout(None)
        .max_lifetime(None)
        // No test query before each use (a round trip per store call, as much as a match
        // itself): a connection PostgreSQL closed fails its next statement, which is
        // answered as an error once, and r2d2 then drops it (PgManager::has_broken).
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(PgManager { config, tls })
        .map_err(|source| StoreError::PgConnect {
            target: pg.target(),
            source,
        })?;
    let mut conn = pool.get().map_err(|source| StoreError::PgConnect {
        target: pg.target(),
        source,
    })?;
    let client = &mut conn.client;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let res = pg_schema::migrations::runner()
        .set_migration_table_name(MIGRATIONS_TABLE)
        .run(client)
        .map_err(|source| StoreError::Migrate {
            engine: Engine::Postgres,
            source,
        });
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
    res?;
    drop(conn);
    Ok(pool)
}

/// The data directory and its `bundles`, `outputs` and `delegations`: created 0700, an existing data
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
    for sub in ["bundles", "outputs", "delegations"] {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One version sequence: every migration exists for both engines, same number and name.
    #[test]
    fn both_engines_have_one_version_sequence() {
        let list = |r: refinery::Runner| -> Vec<(i64, String)> {
            r.get_migrations()
                .iter()
                .map(|m| (i64::from(m.version()), m.name().to_string()))
                .collect()
        };
        let sqlite = list(sqlite_schema::migrations::runner());
        assert!(!sqlite.is_empty());
        assert_eq!(sqlite, list(pg_schema::migrations::runner()));
    }
}
