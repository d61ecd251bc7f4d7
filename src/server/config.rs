//! `server.toml` (the VO server's configuration) and the small client file the client
//! subcommands read. Parsing only: no file here is opened for anything but reading the config,
//! and no network or database work happens here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default validity window of a signed envelope (`not_after - not_before`, seconds): ten
/// minutes. A pilot launches within a second of its match; the window covers the clock skew
/// between the server and the nodes (its first minute lies before the signing time) and a
/// helper slow to answer, and nothing more: a pilot that holds an envelope back can run it
/// only that long after its match (after a cancel, say), and a helper keeps its nonce only
/// until then.
pub const DEFAULT_ENVELOPE_LIFETIME: u64 = 600;
/// How far before its signing time an envelope's window starts (clock skew allowance).
pub const ENVELOPE_SKEW_SECONDS: u64 = 60;
/// Longest accepted `envelope_lifetime_seconds`: the helpers' default site maximum.
pub const MAX_ENVELOPE_LIFETIME: u64 = 3600;

/// Reference 002 (VO membership management policy) 4.7: audit logs containing personal
/// registration data are kept no longer than one year. Every retention of personal data in
/// `server.toml` (DNs, names, addresses, commands of a member) is bounded by it.
pub const MAX_PERSONAL_DATA_DAYS: u32 = 365;
/// The minimum the traceability and logging policy sets for audit logs, to which reference 001
/// (VO portal policy, general conditions: "audit logs ... as defined in the Traceability and
/// Logging Policy") and reference 002 4.7 ("a minimum period consistent with" it) defer:
/// 180 days. Records incident response needs (who ran what, from where, which proxy was
/// issued) are kept at least this long.
pub const MIN_AUDIT_DAYS: u32 = 180;
/// Where [`MAX_PERSONAL_DATA_DAYS`] comes from, for messages.
pub const MAX_PERSONAL_DATA_REF: &str =
    "reference 002, VO membership management policy 4.7: personal data no longer than one year";
/// Where [`MIN_AUDIT_DAYS`] comes from, for messages.
pub const MIN_AUDIT_REF: &str = "the traceability and logging policy's 180 days, which reference 001 (VO portal policy, general conditions) and reference 002 4.7 require of audit logs";

/// Checks a retention setting in days against the policies: `min..=max`, saying which
/// reference sets each bound. `min_ref` is None when the policies set no minimum.
pub(crate) fn check_days(
    path: &Path,
    key: &'static str,
    days: u32,
    min: u32,
    min_ref: Option<&str>,
    default: u32,
) -> Result<(), ConfigError> {
    if (min..=MAX_PERSONAL_DATA_DAYS).contains(&days) {
        return Ok(());
    }
    let why = if days > MAX_PERSONAL_DATA_DAYS {
        format!("is above the limit of {MAX_PERSONAL_DATA_DAYS} days ({MAX_PERSONAL_DATA_REF})")
    } else {
        match min_ref {
            Some(r) => format!("is below the minimum of {min} days ({r})"),
            None => format!("is below the minimum of {min} day"),
        }
    };
    Err(ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value: days.to_string(),
        why: format!(
            "{why}; set it between {min} and {MAX_PERSONAL_DATA_DAYS} (the default is {default})"
        ),
    })
}

/// A config file could not be used. Every message names the file and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The toml error text carries the line, column and key.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}` = {value:?}: {why}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("config file {path}: key `{key}` names {file}, which does not exist; fix the path (relative paths are relative to the config file's directory) or run `mupilot-server init`")]
    MissingFile {
        path: PathBuf,
        key: &'static str,
        file: PathBuf,
    },
}

/// `[limits]`: the most one payload of this VO may ask for. A submission above any of them
/// can never run anywhere the VO sends pilots, so it is refused at submit (422, naming the
/// limit) instead of waiting in the queue forever.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubmitLimits {
    /// Cores (default 1024).
    #[serde(default = "default_max_cores")]
    pub max_cores: u32,
    /// Memory in bytes (default 4 TiB).
    #[serde(default = "default_max_memory")]
    pub max_memory_bytes: u64,
    /// Wall time in seconds (default 30 days).
    #[serde(default = "default_max_walltime")]
    pub max_walltime_seconds: u64,
}

fn default_max_cores() -> u32 {
    1024
}
fn default_max_memory() -> u64 {
    4 << 40
}
fn default_max_walltime() -> u64 {
    30 * 86400
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            max_cores: default_max_cores(),
            max_memory_bytes: default_max_memory(),
            max_walltime_seconds: default_max_walltime(),
        }
    }
}

/// One `[[member]]` entry: seeds the membership registry at serve start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberSeed {
    pub dn: String,
    #[serde(default)]
    pub fqans: Vec<String>,
}

/// `server.toml` as written on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerConfig {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    data_dir: PathBuf,
    vo: String,
    signing_key: PathBuf,
    #[serde(default)]
    pilot_dns: Vec<String>,
    #[serde(default)]
    operator_dns: Vec<String>,
    #[serde(default = "default_lifetime")]
    envelope_lifetime_seconds: u64,
    #[serde(default = "default_retention")]
    retention_seconds: u64,
    #[serde(default = "default_record_retention")]
    record_retention_days: u32,
    #[serde(default)]
    member: Vec<MemberSeed>,
    #[serde(default)]
    limits: SubmitLimits,
    #[serde(default = "default_heartbeat")]
    heartbeat_seconds: u64,
    #[serde(default = "default_worker_proxy")]
    worker_proxy_seconds: u64,
    #[serde(default = "default_missed")]
    missed_heartbeats: u32,
    #[serde(default = "default_max_requeues")]
    max_requeues: u32,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    portal: Vec<super::portal::config::PortalEntry>,
    #[serde(default)]
    robot: Vec<super::portal::config::RobotEntry>,
    #[serde(default)]
    rate_limits: super::portal::config::RateLimits,
    #[serde(default)]
    request_log: super::portal::config::RequestLogConfig,
    database: Option<RawDatabase>,
    #[serde(default)]
    membership: crate::server::membership::config::RawMembership,
}

/// `[database]`: absent, or `engine = "sqlite"`, for `data_dir/mupilot.db`;
/// `engine = "postgresql"` with where the database is (docs/vo-operator.md "PostgreSQL").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    engine: String,
    host: Option<String>,
    port: Option<u16>,
    dbname: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    /// Accepted only to refuse it with a message saying where the password goes.
    password: Option<toml::Value>,
    pool_size: Option<u32>,
    /// libpq's names: "disable", "verify-ca" or "verify-full" (docs/vo-operator.md).
    sslmode: Option<String>,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
}

/// Default `[database] host` for PostgreSQL: the Debian/EL socket directory.
pub const DEFAULT_PG_HOST: &str = "/var/run/postgresql";

/// Default heartbeat interval the server asks of pilots (seconds).
pub const DEFAULT_HEARTBEAT_SECONDS: u64 = 30;
/// Default number of missed heartbeats after which a running payload is lost.
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;

fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_SECONDS
}

fn default_missed() -> u32 {
    DEFAULT_MISSED_HEARTBEATS
}

fn default_max_requeues() -> u32 {
    super::store::DEFAULT_REQUEUE_LIMIT
}

fn default_lifetime() -> u64 {
    DEFAULT_ENVELOPE_LIFETIME
}
fn default_retention() -> u64 {
    DEFAULT_RETENTION
}
fn default_record_retention() -> u32 {
    DEFAULT_RECORD_RETENTION_DAYS
}
fn default_worker_proxy() -> u64 {
    DEFAULT_WORKER_PROXY
}

/// Default validity of a proxy the server signs for a worker node (`worker_proxy_seconds`):
/// 12 h, as grid sites' defaults; cut to the delegation's own notAfter.
pub const DEFAULT_WORKER_PROXY: u64 = 12 * 3600;

/// Default time a payload's bundle and output archive are kept after its final state: 30
/// days, for the owner to fetch the outputs and the VO to look at an incident's inputs.
pub const DEFAULT_RETENTION: u64 = 30 * 86400;

/// Default time the records of a finished payload (its row, operator commands and
/// `information` answers) and of an issued proxy are kept: the policies' minimum for audit
/// records ([`MIN_AUDIT_DAYS`]), so they answer "who ran what, where" during an incident for
/// that long and personal data is not kept longer than it must.
pub const DEFAULT_RECORD_RETENTION_DAYS: u32 = MIN_AUDIT_DAYS;

/// The VO server's configuration, paths resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The file this was read from (for messages).
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub data_dir: PathBuf,
    pub vo: String,
    pub signing_key: PathBuf,
    /// Certificate subjects allowed to call `/v1/match` (the VO's pilots).
    pub pilot_dns: Vec<String>,
    /// VO operators: may read and cancel any payload.
    pub operator_dns: Vec<String>,
    /// The signed validity window of an envelope (`not_after - not_before`).
    pub envelope_lifetime_seconds: u64,
    /// How long a payload's bundle and output archive are kept after its final state.
    pub retention_seconds: u64,
    /// How long a finished payload's row (with its commands and `information` answers) and
    /// an issued proxy's record are kept after the payload's last change or the proxy's
    /// notAfter.
    pub record_retention_days: u32,
    pub members: Vec<MemberSeed>,
    /// The most one payload may ask for (`[limits]`).
    pub limits: SubmitLimits,
    /// The status interval the server asks of pilots for running payloads; it travels in
    /// every match answer (`Work.heartbeat_seconds`).
    pub heartbeat_seconds: u64,
    /// Validity of a proxy signed for a worker node's request (`POST /v1/payloads/{id}/proxy`),
    /// cut to the delegation's notAfter.
    pub worker_proxy_seconds: u64,
    /// A running payload whose pilot missed this many heartbeats in a row becomes `lost`.
    pub missed_heartbeats: u32,
    /// Hand-offs that may end unstarted before a payload fails instead of being queued again.
    pub max_requeues: u32,
    /// Where `/metrics` is served over plain HTTP (None: no metrics listener). Meant for a
    /// loopback address a local Prometheus or node agent scrapes.
    pub metrics_listen: Option<SocketAddr>,
    /// Portals, robots, submission rate limits and the request log (`[[portal]]`,
    /// `[[robot]]`, `[rate_limits]`, `[request_log]`).
    pub portal: super::portal::config::PortalSettings,
    /// The store's database (`[database]`; SQLite in `data_dir` when absent).
    pub database: crate::server::store::Database,
    /// The membership registry's policy settings (`[membership]`).
    pub membership: crate::server::membership::config::MembershipSettings,
}

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks `[database]` and resolves its password file against the config's directory.
fn parse_database(
    d: RawDatabase,
    base: &Path,
    value: &dyn Fn(&'static str, &str, &str) -> ConfigError,
) -> Result<crate::server::store::Database, ConfigError> {
    use crate::server::store::{Database, PgSettings, DEFAULT_POOL_SIZE};
    if d.password.is_some() {
        return Err(value(
            "database.password",
            "(not shown)",
            "a password is not written in server.toml; put it on the first line of a file only the server's account can read (chmod 0600) and name that file with `password_file`",
        ));
    }
    match d.engine.as_str() {
        "sqlite" => {
            let pg_keys = [
                ("database.host", d.host.is_some()),
                ("database.port", d.port.is_some()),
                ("database.dbname", d.dbname.is_some()),
                ("database.user", d.user.is_some()),
                ("database.password_file", d.password_file.is_some()),
                ("database.pool_size", d.pool_size.is_some()),
                ("database.sslmode", d.sslmode.is_some()),
                ("database.sslrootcert", d.sslrootcert.is_some()),
                ("database.sslcert", d.sslcert.is_some()),
                ("database.sslkey", d.sslkey.is_some()),
            ];
            if let Some((key, _)) = pg_keys.iter().find(|(_, set)| *set) {
                return Err(value(
                    key,
                    "(set)",
                    "applies to engine = \"postgresql\" only; remove it or set engine = \"postgresql\"",
                ));
            }
            Ok(Database::Sqlite)
        }
        "postgresql" => {
            let required = |key: &'static str, v: Option<String>| {
                v.filter(|v| !v.is_empty()).ok_or_else(|| {
                    value(
                        key,
                        "",
                        "is required with engine = \"postgresql\" (the database and the role the server connects as)",
                    )
                })
            };
            let pool_size = d.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
            if !(1..=256).contains(&pool_size) {
                return Err(value(
                    "database.pool_size",
                    &pool_size.to_string(),
                    &format!(
                        "must be between 1 and 256 connections; the default is {DEFAULT_POOL_SIZE}"
                    ),
                ));
            }
            let host = d
                .host
                .clone()
                .unwrap_or_else(|| DEFAULT_PG_HOST.to_string());
            let tls = parse_pg_tls(&d, &host, base, value)?;
            Ok(Database::Postgres(PgSettings {
                host,
                port: d.port.unwrap_or(5432),
                dbname: required("database.dbname", d.dbname)?,
                user: required("database.user", d.user)?,
                password_file: d.password_file.map(|f| resolve(base, &f)),
                pool_size,
                tls,
            }))
        }
        other => Err(value(
            "database.engine",
            other,
            "must be \"sqlite\" (the default: data_dir/mupilot.db) or \"postgresql\"",
        )),
    }
}

/// `sslmode` and its files. Without `sslmode`, a Unix socket or loopback host gets no TLS and
/// any other host is refused until the operator chooses: the members' registration data and
/// the database password would otherwise cross the network in clear.
fn parse_pg_tls(
    d: &RawDatabase,
    host: &str,
    base: &Path,
    value: &dyn Fn(&'static str, &str, &str) -> ConfigError,
) -> Result<crate::server::store::PgTls, ConfigError> {
    use crate::server::store::{ClientCert, PgTls};
    let socket = host.starts_with('/');
    let local = socket
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    let files = [
        ("database.sslrootcert", d.sslrootcert.is_some()),
        ("database.sslcert", d.sslcert.is_some()),
        ("database.sslkey", d.sslkey.is_some()),
    ];
    let no_files = || {
        match files.iter().find(|(_, set)| *set) {
        Some((key, _)) => Err(value(
            key,
            "(set)",
            "is used with sslmode = \"verify-full\" or \"verify-ca\" only; set sslmode or remove it",
        )),
        None => Ok(PgTls::Disable),
    }
    };
    let mode = d.sslmode.as_deref();
    match mode {
        None if local => no_files(),
        None => Err(value(
            "database.sslmode",
            "(not set)",
            &format!("is required for a database on another machine (host = \"{host}\"): set \"verify-full\" with sslrootcert = the CA file of PostgreSQL's certificate, or \"disable\" only where nobody else can read or change the traffic"),
        )),
        Some("disable") => no_files(),
        Some(m @ ("verify-full" | "verify-ca")) => {
            if socket {
                return Err(value(
                    "database.sslmode",
                    m,
                    &format!("PostgreSQL does not use TLS on a Unix socket (host = \"{host}\"); set host to the database server's name, or sslmode = \"disable\""),
                ));
            }
            let Some(root) = &d.sslrootcert else {
                return Err(value(
                    "database.sslrootcert",
                    "(not set)",
                    &format!("is required with sslmode = \"{m}\": the PEM file of the CA that signed PostgreSQL's certificate"),
                ));
            };
            let client = match (&d.sslcert, &d.sslkey) {
                (Some(cert), Some(key)) => Some(ClientCert {
                    cert: resolve(base, cert),
                    key: resolve(base, key),
                }),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(value(
                        "database.sslkey",
                        "(not set)",
                        "is required with sslcert: the client certificate's private key (0600)",
                    ))
                }
                (None, Some(_)) => {
                    return Err(value(
                        "database.sslcert",
                        "(not set)",
                        "is required with sslkey: the client certificate (PEM)",
                    ))
                }
            };
            Ok(PgTls::Verify {
                root_cert: resolve(base, root),
                check_host: m == "verify-full",
                client,
            })
        }
        Some(m @ ("require" | "prefer" | "allow")) => Err(value(
            "database.sslmode",
            m,
            "would encrypt without checking who answers, so anyone on the path could pose as the database; use \"verify-full\" (or \"verify-ca\") with sslrootcert",
        )),
        Some(other) => Err(value(
            "database.sslmode",
            other,
            "must be \"disable\", \"verify-ca\" or \"verify-full\"",
        )),
    }
}

impl ServerConfig {
    /// Reads and checks `server.toml`. Does not open the files it names beyond checking
    /// that they exist.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawServerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let value = |key, value: &str, why: &str| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            value: value.to_string(),
            why: why.to_string(),
        };
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            value(
                "listen",
                &raw.listen,
                "must be an IP address and port, e.g. \"127.0.0.1:8443\" or \"[::]:8443\"",
            )
        })?;
        if !crate::util::is_safe_id(&raw.vo) {
            return Err(value(
                "vo",
                &raw.vo,
                "must be 1-64 characters of [A-Za-z0-9._-], e.g. \"demo\"",
            ));
        }
        if raw.envelope_lifetime_seconds < 2 * ENVELOPE_SKEW_SECONDS
            || raw.envelope_lifetime_seconds > MAX_ENVELOPE_LIFETIME
        {
            return Err(value(
                "envelope_lifetime_seconds",
                &raw.envelope_lifetime_seconds.to_string(),
                &format!(
                    "must be between {} and {MAX_ENVELOPE_LIFETIME} seconds (sites refuse envelopes valid longer than their max_envelope_validity_seconds, an hour by default); the default is {DEFAULT_ENVELOPE_LIFETIME}",
                    2 * ENVELOPE_SKEW_SECONDS
                ),
            ));
        }
        check_days(
            path,
            "record_retention_days",
            raw.record_retention_days,
            MIN_AUDIT_DAYS,
            Some(MIN_AUDIT_REF),
            DEFAULT_RECORD_RETENTION_DAYS,
        )?;
        // Bundles and outputs hold a member's commands, environment and data: personal data,
        // kept no longer than the payload's own record (which outlives them, bounded by a year).
        let files_max = u64::from(raw.record_retention_days) * 86400;
        if raw.retention_seconds == 0 || raw.retention_seconds > files_max {
            return Err(value(
                "retention_seconds",
                &raw.retention_seconds.to_string(),
                &format!("must be between 1 and {files_max} seconds: a payload's bundle and outputs are kept no longer than its record (record_retention_days = {}; at most {MAX_PERSONAL_DATA_DAYS} days, {MAX_PERSONAL_DATA_REF}); the default is {DEFAULT_RETENTION} (30 days)", raw.record_retention_days),
            ));
        }
        if !(60..=1_000_000).contains(&raw.worker_proxy_seconds) {
            return Err(value(
                "worker_proxy_seconds",
                &raw.worker_proxy_seconds.to_string(),
                &format!("must be between 60 and 1000000 seconds (the portal policy's bound on a stored credential); the default is {DEFAULT_WORKER_PROXY} (12 h)"),
            ));
        }
        if !(1..=3600).contains(&raw.heartbeat_seconds) {
            return Err(value(
                "heartbeat_seconds",
                &raw.heartbeat_seconds.to_string(),
                "must be between 1 and 3600 seconds",
            ));
        }
        if !(1..=100).contains(&raw.missed_heartbeats) {
            return Err(value(
                "missed_heartbeats",
                &raw.missed_heartbeats.to_string(),
                "must be between 1 and 100",
            ));
        }
        for dn in raw.pilot_dns.iter().chain(&raw.operator_dns) {
            if !dn.starts_with('/') {
                return Err(value(
                    "pilot_dns/operator_dns",
                    dn,
                    "a DN is written grid style, e.g. \"/DC=org/DC=example/CN=pilot\"",
                ));
            }
        }
        for m in &raw.member {
            if !m.dn.starts_with('/') {
                return Err(value(
                    "member.dn",
                    &m.dn,
                    "a DN is written grid style, e.g. \"/DC=org/DC=example/CN=alice\"",
                ));
            }
        }
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(m) => {
                let addr: SocketAddr = m.parse().map_err(|_| {
                    value(
                        "metrics_listen",
                        m,
                        "must be an IP address and port, e.g. \"127.0.0.1:9464\"; remove the key to serve no metrics",
                    )
                })?;
                if addr.port() != 0 && addr == listen {
                    return Err(value(
                        "metrics_listen",
                        m,
                        "is the same address as `listen`; give the metrics listener its own port, e.g. \"127.0.0.1:9464\"",
                    ));
                }
                Some(addr)
            }
        };
        let l = raw.limits;
        // Stored as SQLite integers (i64); the walltime also becomes a chrono duration.
        for (key, v, max) in [
            (
                "limits.max_cores",
                u64::from(l.max_cores),
                u64::from(u32::MAX),
            ),
            (
                "limits.max_memory_bytes",
                l.max_memory_bytes,
                i64::MAX as u64,
            ),
            (
                "limits.max_walltime_seconds",
                l.max_walltime_seconds,
                100 * 365 * 86400,
            ),
        ] {
            if v == 0 || v > max {
                return Err(value(
                    key,
                    &v.to_string(),
                    &format!("must be between 1 and {max}"),
                ));
            }
        }
        let base = base_dir(path);
        let data_dir = resolve(&base, &raw.data_dir);
        let portal = super::portal::config::PortalSettings::check(
            path,
            &base,
            &data_dir,
            super::portal::config::RawSections {
                portals: raw.portal,
                robots: raw.robot,
                rate_limits: raw.rate_limits,
                request_log: raw.request_log,
            },
        )?;
        let database = match raw.database {
            None => crate::server::store::Database::Sqlite,
            Some(d) => parse_database(d, &base, &value)?,
        };
        let membership = crate::server::membership::config::MembershipSettings::check(
            path,
            &base,
            &data_dir,
            &raw.vo,
            raw.membership,
        )?;
        let cfg = ServerConfig {
            path: path.to_path_buf(),
            listen,
            cert: resolve(&base, &raw.cert),
            key: resolve(&base, &raw.key),
            ca: resolve(&base, &raw.ca),
            data_dir,
            vo: raw.vo,
            signing_key: resolve(&base, &raw.signing_key),
            pilot_dns: raw.pilot_dns,
            operator_dns: raw.operator_dns,
            envelope_lifetime_seconds: raw.envelope_lifetime_seconds,
            retention_seconds: raw.retention_seconds,
            record_retention_days: raw.record_retention_days,
            members: raw.member,
            limits: l,
            heartbeat_seconds: raw.heartbeat_seconds,
            worker_proxy_seconds: raw.worker_proxy_seconds,
            missed_heartbeats: raw.missed_heartbeats,
            max_requeues: raw.max_requeues,
            metrics_listen,
            portal,
            database,
            membership,
        };
        Ok(cfg)
    }

    /// Checks that every file the config names exists (the database directory is created later).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (key, file) in [
            ("cert", &self.cert),
            ("key", &self.key),
            ("ca", &self.ca),
            ("signing_key", &self.signing_key),
        ] {
            if !file.exists() {
                return Err(ConfigError::MissingFile {
                    path: self.path.clone(),
                    key,
                    file: file.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The client file for `submit`/`status`/`output`/`cancel --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientConfig {
    server_url: String,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_ca")]
    ca: PathBuf,
}

fn default_ca() -> PathBuf {
    PathBuf::from(crate::tls::DEFAULT_CA_DIR)
}

/// Where a client connects and with which identity.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server_url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientConfig {
    /// Reads a client toml (`server_url`, `cert`, `key`, `ca`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let raw: RawClientConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = base_dir(path);
        Ok(ClientConfig {
            server_url: raw.server_url,
            cert: resolve(&base, &raw.cert),
            key: resolve(&base, &raw.key),
            ca: resolve(&base, &raw.ca),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8443"
cert = "server.crt"
key = "server.key"
ca = "/etc/grid-security/certificates"
data_dir = "data"
vo = "demo"
signing_key = "vo.key"
pilot_dns = ["/DC=org/CN=pilot"]
[[member]]
dn = "/DC=org/CN=alice"
fqans = ["/demo"]
"#;

    #[test]
    fn parses_and_resolves() {
        let c = ServerConfig::parse(Path::new("/etc/mupilot/server.toml"), GOOD).unwrap();
        assert_eq!(c.cert, Path::new("/etc/mupilot/server.crt"));
        assert_eq!(c.ca, Path::new("/etc/grid-security/certificates"));
        assert_eq!(c.envelope_lifetime_seconds, 600);
        assert_eq!(c.retention_seconds, 30 * 86400);
        assert_eq!(c.members.len(), 1);
        assert_eq!(
            c.metrics_listen, None,
            "no metrics listener unless asked for"
        );
    }

    #[test]
    fn database_section_selects_the_engine() {
        use crate::server::store::{Database, PgSettings};
        let p = Path::new("/etc/mupilot/server.toml");
        let c = ServerConfig::parse(p, GOOD).unwrap();
        assert_eq!(c.database, Database::Sqlite);
        let with = |body: &str| format!("{GOOD}\n[database]\n{body}\n");
        let c = ServerConfig::parse(
            p,
            &with("engine = \"postgresql\"\ndbname = \"mupilot\"\nuser = \"mupilot\"\npassword_file = \"db-password\""),
        )
        .unwrap();
        assert_eq!(
            c.database,
            Database::Postgres(PgSettings {
                host: "/var/run/postgresql".into(),
                port: 5432,
                dbname: "mupilot".into(),
                user: "mupilot".into(),
                password_file: Some("/etc/mupilot/db-password".into()),
                pool_size: 16,
                tls: crate::server::store::PgTls::Disable,
            })
        );
        for (body, key, hint) in [
            ("engine = \"mysql\"", "database.engine", "postgresql"),
            (
                "engine = \"postgresql\"\nuser = \"u\"",
                "database.dbname",
                "required",
            ),
            (
                "engine = \"postgresql\"\ndbname = \"d\"\nuser = \"u\"\npassword = \"s3cret\"",
                "database.password",
                "password_file",
            ),
            (
                "engine = \"sqlite\"\nhost = \"db\"",
                "database.host",
                "postgresql",
            ),
            (
                "engine = \"postgresql\"\ndbname = \"d\"\nuser = \"u\"\npool_size = 0",
                "database.pool_size",
                "between 1 and 256",
            ),
        ] {
            let e = ServerConfig::parse(p, &with(body)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(hint), "{body}: {e}");
            assert!(!e.contains("s3cret"), "the password is not echoed: {e}");
        }
    }

    #[test]
    fn database_tls_is_chosen_for_a_remote_host_and_never_unchecked() {
        use crate::server::store::{ClientCert, Database, PgTls};
        let p = Path::new("/etc/mupilot/server.toml");
        let pg = |body: &str| {
            format!("{GOOD}\n[database]\nengine = \"postgresql\"\ndbname = \"d\"\nuser = \"u\"\n{body}\n")
        };
        let tls = |body: &str| match ServerConfig::parse(p, &pg(body)).unwrap().database {
            Database::Postgres(s) => s.tls,
            Database::Sqlite => panic!("postgresql"),
        };
        // The socket (default host) and loopback need no choice.
        assert_eq!(tls(""), PgTls::Disable);
        assert_eq!(tls("host = \"127.0.0.1\""), PgTls::Disable);
        assert_eq!(tls("host = \"localhost\""), PgTls::Disable);
        assert_eq!(
            tls("host = \"db.example.org\"\nsslmode = \"disable\""),
            PgTls::Disable
        );
        assert_eq!(
            tls(
                "host = \"db.example.org\"\nsslmode = \"verify-full\"\nsslrootcert = \"db-ca.pem\""
            ),
            PgTls::Verify {
                root_cert: "/etc/mupilot/db-ca.pem".into(),
                check_host: true,
                client: None,
            }
        );
        assert_eq!(
            tls("host = \"10.0.0.5\"\nsslmode = \"verify-ca\"\nsslrootcert = \"/ca.pem\"\nsslcert = \"c.pem\"\nsslkey = \"c.key\""),
            PgTls::Verify {
                root_cert: "/ca.pem".into(),
                check_host: false,
                client: Some(ClientCert {
                    cert: "/etc/mupilot/c.pem".into(),
                    key: "/etc/mupilot/c.key".into(),
                }),
            }
        );
        for (body, key, hint) in [
            ("host = \"db.example.org\"", "database.sslmode", "another machine"),
            ("host = \"db.example.org\"\nsslmode = \"require\"", "database.sslmode", "verify-full"),
            ("host = \"db.example.org\"\nsslmode = \"on\"", "database.sslmode", "must be"),
            ("host = \"db.example.org\"\nsslmode = \"verify-full\"", "database.sslrootcert", "required"),
            ("sslmode = \"verify-full\"\nsslrootcert = \"/ca.pem\"", "database.sslmode", "Unix socket"),
            ("host = \"db\"\nsslmode = \"verify-ca\"\nsslrootcert = \"/ca.pem\"\nsslcert = \"c.pem\"", "database.sslkey", "required with sslcert"),
            ("sslrootcert = \"/ca.pem\"", "database.sslrootcert", "sslmode"),
        ] {
            let e = ServerConfig::parse(p, &pg(body)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(hint), "{body}: {e}");
        }
        let sqlite = format!("{GOOD}\n[database]\nengine = \"sqlite\"\nsslmode = \"disable\"\n");
        let e = ServerConfig::parse(p, &sqlite).unwrap_err().to_string();
        assert!(
            e.contains("database.sslmode") && e.contains("postgresql"),
            "{e}"
        );
    }

    #[test]
    fn metrics_listen_is_an_address_of_its_own() {
        let p = Path::new("/etc/mupilot/server.toml");
        let top = |line: &str| GOOD.replacen("listen =", &format!("{line}\nlisten ="), 1);
        let c = ServerConfig::parse(p, &top("metrics_listen = \"127.0.0.1:9464\"")).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let e = ServerConfig::parse(p, &top("metrics_listen = \"127.0.0.1:8443\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("same address"),
            "{e}"
        );
        let e = ServerConfig::parse(p, &top("metrics_listen = \"9464\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("\"9464\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let text = format!("{GOOD}\nbogus = 1\n");
        let text = text.replacen("vo = \"demo\"", "vo = \"demo\"\ncolour = \"red\"", 1);
        let e = ServerConfig::parse(Path::new("/x/server.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/server.toml"), "{e}");
        assert!(e.contains("colour"), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn envelope_lifetime_is_minutes_at_most_an_hour() {
        let text = format!("envelope_lifetime_seconds = 86400\n{GOOD}");
        let e = ServerConfig::parse(Path::new("s.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("envelope_lifetime_seconds") && e.contains("86400") && e.contains("3600"),
            "{e}"
        );
        let text = format!("envelope_lifetime_seconds = 3600\n{GOOD}");
        assert_eq!(
            ServerConfig::parse(Path::new("s.toml"), &text)
                .unwrap()
                .envelope_lifetime_seconds,
            3600
        );
    }

    #[test]
    fn retention_settings_outside_the_policies_are_refused_naming_the_limit_and_reference() {
        let p = Path::new("/etc/mupilot/server.toml");
        let top = |line: &str| format!("{line}\n{GOOD}");
        let c = ServerConfig::parse(p, GOOD).unwrap();
        assert_eq!(c.record_retention_days, 180);
        assert_eq!(c.membership.audit_log_retention_days, 365);
        for (text, key, value, limit, reference) in [
            (
                top("record_retention_days = 400"),
                "record_retention_days",
                "400",
                "365",
                "reference 002",
            ),
            (
                top("record_retention_days = 90"),
                "record_retention_days",
                "90",
                "180",
                "traceability and logging",
            ),
            (
                top("retention_seconds = 31622400"),
                "retention_seconds",
                "31622400",
                "15552000",
                "reference 002",
            ),
            (
                format!("{GOOD}\n[request_log]\nretention_days = 400\n"),
                "request_log.retention_days",
                "400",
                "365",
                "reference 002",
            ),
            (
                format!("{GOOD}\n[request_log]\nretention_days = 30\n"),
                "request_log.retention_days",
                "30",
                "180",
                "reference 001",
            ),
            (
                format!("{GOOD}\n[membership]\npersonal_data_retention_days = 730\n"),
                "membership.personal_data_retention_days",
                "730",
                "365",
                "one year",
            ),
            (
                format!("{GOOD}\n[membership]\naudit_log_retention_days = 7\n"),
                "membership.audit_log_retention_days",
                "7",
                "180",
                "traceability and logging",
            ),
        ] {
            let e = ServerConfig::parse(p, &text).unwrap_err().to_string();
            for part in ["/etc/mupilot/server.toml", key, value, limit, reference] {
                assert!(e.contains(part), "{key}: `{part}` missing in: {e}");
            }
        }
        // Within the limits: accepted.
        let c = ServerConfig::parse(
            p,
            &top("record_retention_days = 365\nretention_seconds = 31536000"),
        )
        .unwrap();
        assert_eq!(
            (c.record_retention_days, c.retention_seconds),
            (365, 31536000)
        );
    }

    #[test]
    fn bad_listen_is_named() {
        let text = GOOD.replace("127.0.0.1:8443", "localhost");
        let e = ServerConfig::parse(Path::new("s.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen") && e.contains("localhost"), "{e}");
    }
}
