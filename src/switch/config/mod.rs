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
    /// `[grid]`: the CA directory, vomsdir and proxy policy for owner credentials.
    #[cfg(feature = "grid")]
    #[serde(default)]
    grid: Option<crate::grid::GridConfig>,
    /// `[glexec]`: the gLExec-compatible entry (off unless enabled).
    #[serde(default)]
    glexec: Option<super::glexec::RawGlexec>,
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
    /// `[grid]`: how owners' X.509 proxies are verified (paths resolved against the file).
    /// Absent: the site verifies no grid credentials, and a payload that needs one is refused.
    #[cfg(feature = "grid")]
    pub grid: Option<crate::grid::GridConfig>,
    /// `[glexec]`: who may run commands as a proxy's owner through `mupilot-glexec`.
    /// Absent: the entry is off.
    pub glexec: Option<super::glexec::GlexecConfig>,
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

mod validate;
use validate::validate;

#[cfg(test)]
mod tests;
