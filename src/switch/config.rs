//! `switch.toml`: the site's configuration of the helper, parsed and validated at load.
//!
//! Holds the schema, path resolution (relative paths are relative to the file's directory) and
//! the load-time checks (VO keys parse, the grid-mapfile parses, allowed pilots resolve to
//! uids, the audit and state directories exist or can be created 0700). It must not start
//! anything: loading a config has no effect beyond creating those two directories.
//!
//! Every error reads `FILE: key 'x': what is wrong; how to fix`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::gridmap::Gridmap;
use super::sandbox::{IpcFallback, NetworkMode, SandboxSettings};

use crate::protocol::VoVerifyingKey;

/// Upper bound of `sandbox.warm_stages`: each idle stage is a resident root process.
const MAX_WARM_STAGES: usize = 16;

/// Default longest envelope validity window (`not_after - not_before`) the site accepts: an
/// hour, six times the VO server's default of ten minutes.
pub const DEFAULT_MAX_ENVELOPE_VALIDITY: u64 = 3600;
/// The largest value `max_envelope_validity_seconds` may take (a day).
const MAX_ENVELOPE_VALIDITY_LIMIT: u64 = 86400;

/// Where the helper looks for its config when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/mupilot/switch.toml";

/// The default scratch root: not below the root-only state directory (payload accounts must
/// traverse every parent), nor below the per-payload private /tmp, /var/tmp, /dev/shm
/// (docs/security-model.md, "Scratch").
pub const DEFAULT_SCRATCH_ROOT: &str = "/var/spool/mupilot";

/// An allowed pilot as written in the file: an account name or a numeric uid.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PilotRef {
    Uid(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    allowed_pilots: Vec<PilotRef>,
    #[serde(default = "default_gridmap")]
    gridmap: PathBuf,
    #[serde(default = "default_audit_log")]
    audit_log: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_min_uid")]
    min_uid: u32,
    /// The node name envelopes must be bound to; the kernel's hostname when absent.
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default = "default_max_envelope_validity")]
    max_envelope_validity_seconds: u64,
    #[serde(default)]
    vo: Vec<RawVo>,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    authz: RawAuthz,
    /// Group owning the socket in `serve` mode (0660); absent: 0666 and a warning.
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    /// node_exporter textfile (`*.prom`) the helper's counters are written to; absent: none.
    #[serde(default)]
    metrics_textfile: Option<PathBuf>,
    #[serde(default = "default_metrics_interval")]
    metrics_interval_seconds: u64,
}

fn default_metrics_interval() -> u64 {
    15
}

/// `[limits]`: what one pilot account can make the helper spend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_bundle_max")]
    bundle_max_bytes: u64,
    #[serde(default = "default_hello_timeout")]
    hello_timeout_seconds: u64,
    #[serde(default = "default_frame_timeout")]
    frame_timeout_seconds: u64,
    #[serde(default = "default_conns_per_uid")]
    max_connections_per_uid: usize,
    #[serde(default = "default_conns")]
    max_connections: usize,
    #[serde(default = "default_refusal_interval")]
    refusal_audit_interval_seconds: u64,
    #[serde(default)]
    peer_pidfd: super::peer::PidfdSource,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            bundle_max_bytes: default_bundle_max(),
            hello_timeout_seconds: default_hello_timeout(),
            frame_timeout_seconds: default_frame_timeout(),
            max_connections_per_uid: default_conns_per_uid(),
            max_connections: default_conns(),
            refusal_audit_interval_seconds: default_refusal_interval(),
            peer_pidfd: Default::default(),
        }
    }
}

fn default_bundle_max() -> u64 {
    256 << 20
}
fn default_hello_timeout() -> u64 {
    10
}
fn default_frame_timeout() -> u64 {
    10
}
fn default_conns_per_uid() -> usize {
    64
}
fn default_conns() -> usize {
    256
}
fn default_refusal_interval() -> u64 {
    60
}

/// The validated `[limits]` table.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest input bundle (a sealed memfd) a launch may carry.
    pub bundle_max_bytes: u64,
    /// A connection must complete its hello within this after it was accepted.
    pub hello_timeout: std::time::Duration,
    /// A request frame, once begun, must be complete within this.
    pub frame_timeout: std::time::Duration,
    /// Open connections per uid; more are refused at accept.
    pub max_connections_per_uid: usize,
    /// Open connections in all; more are refused at accept.
    pub max_connections: usize,
    /// Refused connections are audited in full once per uid per interval, then summarised.
    pub refusal_audit_interval: std::time::Duration,
    /// How the caller's process is held (SO_PEERPIDFD or pidfd_open).
    pub peer_pidfd: super::peer::PidfdSource,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVo {
    name: String,
    public_key: PathBuf,
    /// The VO's own policy (the policy language); with the site's, both must permit.
    #[serde(default)]
    policy: Option<PathBuf>,
}

/// `[authz]`: ban lists, the site policy, the group map and pool accounts (all optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthz {
    #[serde(default)]
    ban_users: Vec<PathBuf>,
    #[serde(default)]
    ban_fqans: Vec<PathBuf>,
    #[serde(default)]
    ban_vos: Vec<PathBuf>,
    site_policy: Option<PathBuf>,
    groupmap: Option<PathBuf>,
    gridmapdir: Option<PathBuf>,
    #[serde(default = "default_lease_ttl")]
    lease_ttl_seconds: u64,
    lcmaps_groupmapfile: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    scratch_root: Option<PathBuf>,
    #[serde(default = "default_tmp_size")]
    tmp_size_bytes: u64,
    #[serde(default = "default_pids_max")]
    pids_max: u64,
    #[serde(default)]
    network: NetworkMode,
    #[serde(default)]
    ipc_fallback: IpcFallback,
    #[serde(default = "default_env_allowlist")]
    env_allowlist: Vec<String>,
    #[serde(default = "default_nofile")]
    nofile: u64,
    #[serde(default)]
    core_bytes: u64,
    #[serde(default = "default_output_limit")]
    output_limit_bytes: u64,
    #[serde(default = "default_true")]
    allow_user_namespaces: bool,
    #[serde(default = "default_warm_stages")]
    warm_stages: usize,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/mupilot/switch.sock")
}
fn default_gridmap() -> PathBuf {
    PathBuf::from("/etc/grid-security/grid-mapfile")
}
fn default_audit_log() -> PathBuf {
    PathBuf::from("/var/log/mupilot/audit.jsonl")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mupilot")
}
fn default_min_uid() -> u32 {
    1000
}
fn default_max_envelope_validity() -> u64 {
    DEFAULT_MAX_ENVELOPE_VALIDITY
}
fn default_tmp_size() -> u64 {
    256 << 20
}
fn default_pids_max() -> u64 {
    4096
}
fn default_env_allowlist() -> Vec<String> {
    vec!["LANG".into(), "LC_ALL".into(), "TZ".into()]
}
fn default_nofile() -> u64 {
    4096
}
fn default_warm_stages() -> usize {
    2
}
fn default_output_limit() -> u64 {
    64 << 20
}
fn default_true() -> bool {
    true
}
fn default_lease_ttl() -> u64 {
    7 * 24 * 3600
}

/// A file without a `[sandbox]` table gets the same defaults as an empty one (a derived
/// `Default` would give zeros, e.g. a 0-byte /tmp).
impl Default for RawSandbox {
    fn default() -> Self {
        toml::from_str("").expect("every sandbox key has a default")
    }
}

impl Default for RawAuthz {
    fn default() -> Self {
        RawAuthz {
            ban_users: Vec::new(),
            ban_fqans: Vec::new(),
            ban_vos: Vec::new(),
            site_policy: None,
            groupmap: None,
            gridmapdir: None,
            lease_ttl_seconds: default_lease_ttl(),
            lcmaps_groupmapfile: None,
        }
    }
}

/// One VO whose envelopes the site accepts.
#[derive(Debug, Clone)]
pub struct VoConfig {
    pub name: String,
    pub public_key_path: PathBuf,
    pub key: VoVerifyingKey,
    /// The VO's policy file, if the site uses one.
    pub policy: Option<PathBuf>,
}

/// The validated `[authz]` table: files followed live by the helper.
#[derive(Debug, Clone, Default)]
pub struct AuthzConfig {
    pub ban_users: Vec<PathBuf>,
    pub ban_fqans: Vec<PathBuf>,
    pub ban_vos: Vec<PathBuf>,
    pub site_policy: Option<PathBuf>,
    pub groupmap: Option<PathBuf>,
    pub gridmapdir: Option<PathBuf>,
    pub lease_ttl_seconds: u64,
    /// The site's LCMAPS groupmapfile: pool leases carry its groups as LCMAPS's default
    /// (secondary gids on) names them.
    pub lcmaps_groupmapfile: Option<PathBuf>,
}

/// A pilot account allowed to call the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPilot {
    /// As written in the file (a name, or the uid in decimal).
    pub written: String,
    pub uid: u32,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// The file this was read from.
    pub path: PathBuf,
    pub socket: PathBuf,
    pub allowed_pilots: Vec<AllowedPilot>,
    pub gridmap: PathBuf,
    pub audit_log: PathBuf,
    pub state_dir: PathBuf,
    pub min_uid: u32,
    /// This node's name: envelopes bound to another node are refused. Also the `host` of
    /// the audit records and of the pilot's `welcome`.
    pub node_name: String,
    /// Longest envelope validity window (`not_after - not_before`) accepted.
    pub max_envelope_validity_seconds: u64,
    pub vos: Vec<VoConfig>,
    pub authz: AuthzConfig,
    pub sandbox: SandboxSettings,
    /// The group (name, gid) owning the socket in `serve` mode.
    pub socket_group: Option<(String, u32)>,
    pub limits: LimitsConfig,
    /// Where the counters go for node_exporter's textfile collector (None: nowhere).
    pub metrics_textfile: Option<PathBuf>,
    /// How often the textfile is rewritten.
    pub metrics_interval: std::time::Duration,
}

/// A config file that cannot be used. The message names the file, the key, what is wrong and
/// how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {what}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub what: String,
}

impl SwitchConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |what: String| ConfigError {
            file: path.to_path_buf(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "cannot read the config file: {e}; pass the path of switch.toml with --config"
            ))
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(toml_error(&text, &e)))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let cfg = validate(raw, base).map_err(|(key, what)| err(format!("key '{key}': {what}")))?;
        Ok(SwitchConfig {
            path: path.to_path_buf(),
            ..cfg
        })
    }

    /// The uids of every allowed pilot account.
    pub fn allowed_uids(&self) -> BTreeSet<u32> {
        self.allowed_pilots.iter().map(|p| p.uid).collect()
    }

    /// The configured VO called `name`.
    pub fn vo(&self, name: &str) -> Option<&VoConfig> {
        self.vos.iter().find(|v| v.name == name)
    }

    /// Where the replay cache lives.
    pub fn replay_cache_path(&self) -> PathBuf {
        self.state_dir.join("replay-cache")
    }
}

/// Formats a TOML error with line and column.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            let key = text[span.clone()].trim();
            format!(
                "line {line}, column {col} (near '{}'): {msg}; fix that line (the keys are listed in docs/site-admin.md)",
                key.chars().take(40).collect::<String>()
            )
        }
        None => format!("{msg}; fix the file (the keys are listed in docs/site-admin.md)"),
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

type KeyErr = (String, String);

fn validate(raw: RawConfig, base: &Path) -> Result<SwitchConfig, KeyErr> {
    let bad = |key: &str, what: String| (key.to_string(), what);

    if raw.min_uid == 0 {
        return Err(bad(
            "min_uid",
            "0 would allow mapping payloads to root; set it to the lowest uid of the payload accounts (e.g. 1000)".into(),
        ));
    }

    let node_name = match raw.node_name {
        Some(n) => n,
        None => detect_node_name().map_err(|what| bad("node_name", what))?,
    };
    if !crate::protocol::envelope::is_valid_node_name(&node_name) {
        return Err(bad(
            "node_name",
            format!("'{node_name}' is not a node name; use 1-253 characters without spaces, e.g. \"wn042.example.org\""),
        ));
    }
    if raw.max_envelope_validity_seconds < 60
        || raw.max_envelope_validity_seconds > MAX_ENVELOPE_VALIDITY_LIMIT
    {
        return Err(bad(
            "max_envelope_validity_seconds",
            format!(
                "{} is outside 60..{MAX_ENVELOPE_VALIDITY_LIMIT}; the default is {DEFAULT_MAX_ENVELOPE_VALIDITY} (an hour)",
                raw.max_envelope_validity_seconds
            ),
        ));
    }

    if raw.allowed_pilots.is_empty() {
        return Err(bad(
            "allowed_pilots",
            "is empty, so no pilot could use the helper; list the pilot account names or uids, e.g. [\"mupilot\"]".into(),
        ));
    }
    let mut allowed_pilots = Vec::new();
    for (i, p) in raw.allowed_pilots.iter().enumerate() {
        let key = format!("allowed_pilots[{i}]");
        let ap = match p {
            PilotRef::Uid(uid) => AllowedPilot {
                written: uid.to_string(),
                uid: *uid,
            },
            PilotRef::Name(name) => match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => AllowedPilot {
                    written: name.clone(),
                    uid: u.uid.as_raw(),
                },
                Ok(None) => {
                    return Err(bad(
                        &key,
                        format!("no account named '{name}' exists; create it (useradd) or write its numeric uid"),
                    ))
                }
                Err(e) => {
                    return Err(bad(
                        &key,
                        format!("cannot look up account '{name}': {e}; check the passwd database (nsswitch)"),
                    ))
                }
            },
        };
        allowed_pilots.push(ap);
    }

    if raw.vo.is_empty() {
        return Err(bad(
            "vo",
            "no [[vo]] table, so every envelope would be refused; add [[vo]] name = \"...\" public_key = \"...\"".into(),
        ));
    }
    let mut vos: Vec<VoConfig> = Vec::new();
    for (i, v) in raw.vo.into_iter().enumerate() {
        if !crate::util::is_safe_id(&v.name) {
            return Err(bad(
                &format!("vo[{i}].name"),
                format!(
                    "'{}' is not a valid VO name; use 1-64 characters of [A-Za-z0-9._-]",
                    v.name
                ),
            ));
        }
        if vos.iter().any(|o| o.name == v.name) {
            return Err(bad(
                &format!("vo[{i}].name"),
                format!(
                    "VO '{}' is configured twice; keep one [[vo]] table per VO",
                    v.name
                ),
            ));
        }
        let path = resolve(base, v.public_key);
        let key = VoVerifyingKey::from_pem_file(&path)
            .map_err(|e| bad(&format!("vo[{i}].public_key"), e.to_string()))?;
        let policy = v.policy.map(|p| resolve(base, p));
        if let Some(p) = &policy {
            crate::policy::Policy::load(p)
                .map_err(|e| bad(&format!("vo[{i}].policy"), e.to_string()))?;
        }
        vos.push(VoConfig {
            name: v.name,
            public_key_path: path,
            key,
            policy,
        });
    }

    let gridmap = resolve(base, raw.gridmap);
    Gridmap::load(&gridmap).map_err(|e| bad("gridmap", e.to_string()))?;
    let authz = validate_authz(raw.authz, base)?;

    let audit_log = resolve(base, raw.audit_log);
    let audit_dir = audit_log
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            bad(
                "audit_log",
                "must be a file path, e.g. /var/log/mupilot/audit.jsonl".into(),
            )
        })?;
    ensure_private_dir(audit_dir).map_err(|what| bad("audit_log", what))?;
    if audit_log.is_dir() {
        return Err(bad(
            "audit_log",
            format!(
                "{} is a directory; name a file inside it, e.g. audit.jsonl",
                audit_log.display()
            ),
        ));
    }

    let state_dir = resolve(base, raw.state_dir);
    ensure_private_dir(&state_dir).map_err(|what| bad("state_dir", what))?;

    let metrics_textfile = match raw.metrics_textfile {
        None => None,
        Some(p) => {
            let p = resolve(base, p);
            let shown = p.display().to_string();
            if p.extension().and_then(|e| e.to_str()) != Some("prom") {
                return Err(bad(
                    "metrics_textfile",
                    format!("{shown} must end in .prom (node_exporter's textfile collector reads only *.prom), e.g. /var/lib/prometheus/node-exporter/mupilot-switch.prom"),
                ));
            }
            match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) if d.is_dir() => {}
                _ => {
                    return Err(bad(
                        "metrics_textfile",
                        format!("the directory of {shown} does not exist; name a file in node_exporter's --collector.textfile.directory, or remove the key"),
                    ))
                }
            }
            Some(p)
        }
    };
    if !(1..=3600).contains(&raw.metrics_interval_seconds) {
        return Err(bad(
            "metrics_interval_seconds",
            format!(
                "{} must be between 1 and 3600 seconds; the default is 15",
                raw.metrics_interval_seconds
            ),
        ));
    }

    let s = raw.sandbox;
    let scratch_root = resolve(
        base,
        s.scratch_root
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_ROOT)),
    );
    if ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .any(|t| scratch_root.starts_with(t))
    {
        return Err(bad(
            "sandbox.scratch_root",
            format!(
                "{} is below /tmp, /var/tmp or /dev/shm, which are private per payload; use a directory such as {DEFAULT_SCRATCH_ROOT}",
                scratch_root.display()
            ),
        ));
    }
    if s.tmp_size_bytes < 1 << 20 {
        return Err(bad(
            "sandbox.tmp_size_bytes",
            "must be at least 1048576 (1 MiB)".into(),
        ));
    }
    if s.pids_max == 0 {
        return Err(bad("sandbox.pids_max", "must be at least 1".into()));
    }
    if s.nofile < 16 {
        return Err(bad("sandbox.nofile", "must be at least 16".into()));
    }
    if s.warm_stages > MAX_WARM_STAGES {
        return Err(bad(
            "sandbox.warm_stages",
            format!("{} is more than {MAX_WARM_STAGES}; idle stages only save the exec of the helper binary, a few are enough (0 turns them off)", s.warm_stages),
        ));
    }
    for (i, name) in s.env_allowlist.iter().enumerate() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(bad(
                &format!("sandbox.env_allowlist[{i}]"),
                format!("'{name}' is not an environment variable name; remove it"),
            ));
        }
    }

    let socket_group = match raw.socket_group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(&name) {
            Ok(Some(g)) => Some((name, g.gid.as_raw())),
            Ok(None) => {
                return Err(bad(
                    "socket_group",
                    format!("no group named '{name}' exists; create it (groupadd) and add the pilot accounts to it"),
                ))
            }
            Err(e) => {
                return Err(bad(
                    "socket_group",
                    format!("cannot look up group '{name}': {e}; check the group database (nsswitch)"),
                ))
            }
        },
    };
    let l = raw.limits;
    for (key, v) in [
        ("limits.hello_timeout_seconds", l.hello_timeout_seconds),
        ("limits.frame_timeout_seconds", l.frame_timeout_seconds),
        (
            "limits.refusal_audit_interval_seconds",
            l.refusal_audit_interval_seconds,
        ),
    ] {
        if !(1..=3600).contains(&v) {
            return Err(bad(key, format!("{v} is outside 1..=3600 seconds")));
        }
    }
    if l.max_connections_per_uid == 0 || l.max_connections < l.max_connections_per_uid {
        return Err(bad(
            "limits.max_connections",
            format!(
                "must be at least max_connections_per_uid ({}), which must be at least 1",
                l.max_connections_per_uid
            ),
        ));
    }
    if l.bundle_max_bytes == 0 {
        return Err(bad(
            "limits.bundle_max_bytes",
            "must be at least 1 (payloads without a bundle need no limit)".into(),
        ));
    }
    let limits = LimitsConfig {
        bundle_max_bytes: l.bundle_max_bytes,
        hello_timeout: std::time::Duration::from_secs(l.hello_timeout_seconds),
        frame_timeout: std::time::Duration::from_secs(l.frame_timeout_seconds),
        max_connections_per_uid: l.max_connections_per_uid,
        max_connections: l.max_connections,
        refusal_audit_interval: std::time::Duration::from_secs(l.refusal_audit_interval_seconds),
        peer_pidfd: l.peer_pidfd,
    };

    Ok(SwitchConfig {
        path: PathBuf::new(),
        metrics_textfile,
        metrics_interval: std::time::Duration::from_secs(raw.metrics_interval_seconds),
        socket: resolve(base, raw.socket),
        socket_group,
        limits,
        allowed_pilots,
        gridmap,
        audit_log,
        state_dir,
        min_uid: raw.min_uid,
        node_name,
        max_envelope_validity_seconds: raw.max_envelope_validity_seconds,
        vos,
        authz,
        sandbox: SandboxSettings {
            scratch_root,
            tmp_size_bytes: s.tmp_size_bytes,
            pids_max: s.pids_max,
            network: s.network,
            ipc_fallback: s.ipc_fallback,
            env_allowlist: s.env_allowlist,
            nofile: s.nofile,
            core_bytes: s.core_bytes,
            output_limit_bytes: s.output_limit_bytes,
            allow_user_namespaces: s.allow_user_namespaces,
            warm_stages: s.warm_stages,
            stage_exe: None,
        },
    })
}

/// The kernel's host name (uname's nodename), the default node name.
fn detect_node_name() -> Result<String, String> {
    nix::unistd::gethostname()
        .map_err(|e| e.to_string())
        .and_then(|h| {
            h.into_string()
                .map_err(|h| format!("'{}' is not UTF-8", h.to_string_lossy()))
        })
        .map_err(|e| {
            format!("not set and the kernel's host name cannot be used ({e}); set node_name in switch.toml")
        })
}

/// Checks every `[authz]` file loads now (the helper follows them live afterwards).
fn validate_authz(a: RawAuthz, base: &Path) -> Result<AuthzConfig, KeyErr> {
    use crate::policy::{DnBans, FqanBans, Load, VoBans};
    let bad = |key: &str, what: String| (key.to_string(), what);
    fn check<T: Load>(key: &str, p: &Path) -> Result<(), KeyErr> {
        let bytes = std::fs::read(p).map_err(|e| {
            (
                key.to_string(),
                format!("cannot read {}: {e}; create the file (an empty list is fine) or remove the key", p.display()),
            )
        })?;
        T::load(&p.display().to_string(), &bytes)
            .map(|_| ())
            .map_err(|e| (key.to_string(), e.to_string()))
    }
    let list = |key: &str, v: Vec<PathBuf>| -> Vec<(String, PathBuf)> {
        v.into_iter()
            .enumerate()
            .map(|(i, p)| (format!("authz.{key}[{i}]"), resolve(base, p)))
            .collect()
    };
    let mut cfg = AuthzConfig {
        lease_ttl_seconds: a.lease_ttl_seconds,
        ..Default::default()
    };
    for (key, p) in list("ban_users", a.ban_users) {
        check::<DnBans>(&key, &p)?;
        cfg.ban_users.push(p);
    }
    for (key, p) in list("ban_fqans", a.ban_fqans) {
        check::<FqanBans>(&key, &p)?;
        cfg.ban_fqans.push(p);
    }
    for (key, p) in list("ban_vos", a.ban_vos) {
        check::<VoBans>(&key, &p)?;
        cfg.ban_vos.push(p);
    }
    if let Some(p) = a.site_policy.map(|p| resolve(base, p)) {
        crate::policy::Policy::load(&p).map_err(|e| bad("authz.site_policy", e.to_string()))?;
        cfg.site_policy = Some(p);
    }
    if let Some(p) = a.groupmap.map(|p| resolve(base, p)) {
        Gridmap::load(&p).map_err(|e| bad("authz.groupmap", e.to_string()))?;
        cfg.groupmap = Some(p);
    }
    if let Some(p) = a.gridmapdir.map(|p| resolve(base, p)) {
        if !p.is_dir() {
            return Err(bad(
                "authz.gridmapdir",
                format!(
                    "{} is not a directory; create it with one empty file per pool account (e.g. pool001)",
                    p.display()
                ),
            ));
        }
        cfg.gridmapdir = Some(p);
    }
    if let Some(p) = a.lcmaps_groupmapfile.map(|p| resolve(base, p)) {
        if cfg.gridmapdir.is_none() {
            return Err(bad(
                "authz.lcmaps_groupmapfile",
                "names pool leases, but authz.gridmapdir is not set; set it or remove this".into(),
            ));
        }
        crate::switch::leases::Groupmapfile::load(&p)
            .map_err(|e| bad("authz.lcmaps_groupmapfile", e.to_string()))?;
        cfg.lcmaps_groupmapfile = Some(p);
    }
    if cfg.lease_ttl_seconds == 0 {
        return Err(bad(
            "authz.lease_ttl_seconds",
            "0 would expire every lease at once; use e.g. 604800 (7 days)".into(),
        ));
    }
    Ok(cfg)
}

/// Creates `dir` (and missing parents) 0700 if it does not exist; checks it is a directory.
fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        return Err(format!(
            "{} exists but is not a directory; remove it or choose another path",
            dir.display()
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create directory {}: {e}; create it (mode 0700, owned by root) or fix the path", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_setup(dir: &Path, body: &str) -> PathBuf {
        let key = crate::protocol::VoSigningKey::generate();
        std::fs::write(dir.join("vo.pub"), key.verifying_key().to_pem()).unwrap();
        std::fs::write(dir.join("grid-mapfile"), "\"/DC=org/CN=a\" nobody\n").unwrap();
        let p = dir.join("switch.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    const GOOD: &str = r#"
allowed_pilots = ["root", 4242]
gridmap = "grid-mapfile"
audit_log = "log/audit.jsonl"
state_dir = "state"
[[vo]]
name = "demo"
public_key = "vo.pub"
[sandbox]
network = "none"
scratch_root = "/var/lib/mupilot-test-swd-unit/scratch"
"#;

    #[test]
    fn good_config_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_setup(dir.path(), GOOD);
        let c = SwitchConfig::load(&p).unwrap();
        assert_eq!(c.sandbox.warm_stages, 2);
        assert_eq!(c.gridmap, dir.path().join("grid-mapfile"));
        assert_eq!(c.allowed_uids(), [0, 4242].into_iter().collect());
        assert!(dir.path().join("log").is_dir());
        assert_eq!(
            c.sandbox.scratch_root,
            Path::new("/var/lib/mupilot-test-swd-unit/scratch")
        );
        let p = write_setup(
            dir.path(),
            &GOOD.replace("/var/lib/mupilot-test-swd-unit/scratch", "scratch"),
        );
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("key 'sandbox.scratch_root'"), "{e}");
        assert_eq!(c.sandbox.network, NetworkMode::None);
        assert_eq!(c.sandbox.ipc_fallback, IpcFallback::Refuse, "the default");
        let p = write_setup(dir.path(), &format!("{GOOD}ipc_fallback = \"loopback\"\n"));
        let l = SwitchConfig::load(&p).unwrap();
        assert_eq!(l.sandbox.ipc_fallback, IpcFallback::Loopback);
        assert_eq!(c.min_uid, 1000);
        assert!(c.vo("demo").is_some());
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert_eq!(c.node_name, host);
        assert_eq!(c.max_envelope_validity_seconds, 3600);
    }

    #[test]
    fn no_sandbox_table_means_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let body = GOOD.split("[sandbox]").next().unwrap();
        let c = SwitchConfig::load(&write_setup(dir.path(), body)).unwrap();
        assert_eq!(c.sandbox.scratch_root, Path::new(DEFAULT_SCRATCH_ROOT));
        assert_eq!(c.sandbox.tmp_size_bytes, 256 << 20);
        assert_eq!((c.sandbox.pids_max, c.sandbox.nofile), (4096, 4096));
        assert_eq!(c.sandbox.warm_stages, 2);
        assert!(c.sandbox.allow_user_namespaces);
    }

    #[test]
    fn unknown_key_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_setup(dir.path(), &GOOD.replace("state_dir", "stat_dir"));
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("switch.toml: line 5"), "{e}");
        assert!(e.contains("stat_dir"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_setup(
            dir.path(),
            &GOOD.replace("\"root\"", "\"no-such-user-swd\""),
        );
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("key 'allowed_pilots[0]'") && e.contains("no-such-user-swd"),
            "{e}"
        );

        let p = write_setup(dir.path(), &GOOD.replace("vo.pub", "missing.pub"));
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("key 'vo[0].public_key'") && e.contains("missing.pub"),
            "{e}"
        );

        let p = write_setup(dir.path(), &format!("min_uid = 0\n{GOOD}"));
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("key 'min_uid'"), "{e}");

        let p = write_setup(dir.path(), &format!("{GOOD}warm_stages = 64\n"));
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("key 'sandbox.warm_stages'") && e.contains("64 is more than 16"),
            "{e}"
        );
        let p = write_setup(dir.path(), &format!("node_name = \"wn 1\"\n{GOOD}"));
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("key 'node_name'") && e.contains("'wn 1'"), "{e}");
        let p = write_setup(
            dir.path(),
            &format!("node_name = \"wn042.example.org\"\n{GOOD}"),
        );
        assert_eq!(
            SwitchConfig::load(&p).unwrap().node_name,
            "wn042.example.org"
        );
        let p = write_setup(
            dir.path(),
            &format!("max_envelope_validity_seconds = 100000\n{GOOD}"),
        );
        let e = SwitchConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("key 'max_envelope_validity_seconds'") && e.contains("100000"),
            "{e}"
        );

        let p = write_setup(dir.path(), &format!("{GOOD}warm_stages = 0\n"));
        assert_eq!(SwitchConfig::load(&p).unwrap().sandbox.warm_stages, 0);
    }
}
