//! The payload sandbox: cgroup below the pilot's, namespaces, private mounts and scratch,
//! identity switch, exec, supervision and teardown. Runs as root inside the helper.
//!
//! The multi-threaded helper never does privileged work after a fork: [`launch`] spawns a
//! fresh, single-threaded *stage* process (a re-exec of the helper binary, `mupilot-switch
//! stage`) that performs every step in kernel order and execs the payload.
//!
//! INTERFACE SKELETON (phase 0): the sandbox work fills the bodies; the signatures are the
//! contract the daemon codes against.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The local account a payload runs as, resolved by the mapping step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database), the primary gid excluded.
    pub groups: Vec<u32>,
}

/// How the payload reaches the network (site setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Share the host's network namespace (abstract unix sockets are shared too).
    #[default]
    Host,
    /// A new network namespace with nothing in it.
    None,
    /// A new network namespace with only `lo` up.
    Loopback,
}

/// Site settings for every sandbox (from switch.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// Root of the per-payload scratch directories (created 0711 root if missing).
    pub scratch_root: PathBuf,
    /// Size of each private tmpfs (/tmp, /var/tmp, /dev/shm), bytes.
    pub tmp_size_bytes: u64,
    /// pids limit of each payload cgroup.
    pub pids_max: u64,
    pub network: NetworkMode,
    /// Names of the helper's environment variables passed through to payloads.
    pub env_allowlist: Vec<String>,
    /// RLIMIT_NOFILE for payloads.
    pub nofile: u64,
    /// RLIMIT_CORE for payloads (0: no core dumps).
    pub core_bytes: u64,
    /// Most bytes of declared outputs copied back per payload.
    pub output_limit_bytes: u64,
    /// Let payloads create user namespaces (unprivileged Apptainer needs them).
    pub allow_user_namespaces: bool,
}

/// One payload to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub payload_id: String,
    pub account: Account,
    pub argv: Vec<String>,
    /// The envelope's environment; the sandbox adds the allowlisted, HOME, TMPDIR and thread counts.
    pub env: BTreeMap<String, String>,
    pub cores: u32,
    pub memory_bytes: u64,
    pub walltime_seconds: u64,
    /// The pilot process whose cgroup becomes the parent of the payload's cgroup.
    pub pilot_pid: i32,
    /// tar.gz unpacked into scratch as the account, never as root.
    #[serde(default)]
    pub bundle: Option<Vec<u8>>,
    /// Paths relative to scratch copied out after the end.
    #[serde(default)]
    pub outputs: Vec<String>,
}

/// Errors of the sandbox layer; each names the path or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox not built yet")]
    NotReady,
}

/// How a payload ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub cpu_seconds: f64,
    pub peak_memory_bytes: u64,
    pub wall_seconds: f64,
    pub kill_reason: Option<String>,
    /// tar.gz of the declared outputs that could be copied.
    pub outputs: Option<Vec<u8>>,
    pub outputs_skipped: Vec<String>,
}

/// A started payload. Clone-able handle for signalling from other threads.
#[derive(Debug, Clone)]
pub struct Handle {
    _private: (),
}

impl Handle {
    /// Host pid of the payload's main process.
    pub fn pid(&self) -> i32 {
        0
    }
    pub fn cgroup(&self) -> String {
        String::new()
    }
    pub fn scratch(&self) -> PathBuf {
        PathBuf::new()
    }
    /// Sends `sig` to every process of the payload.
    pub fn signal(&self, _sig: i32) -> Result<(), SandboxError> {
        Err(SandboxError::NotReady)
    }
    /// Kills every process of the payload; `reason` ends up in the outcome's kill_reason.
    pub fn kill(&self, _reason: &str) {}
}

/// The owner of a started payload: waits for it and tears it down.
pub struct Running {
    pub handle: Handle,
}

impl Running {
    /// Blocks until the main process exits, kills what is left in the cgroup, collects usage
    /// and outputs, removes the scratch directory and the cgroup.
    pub fn wait(self) -> Result<Outcome, SandboxError> {
        Err(SandboxError::NotReady)
    }
}

/// Starts a payload through a fresh stage process.
pub fn launch(
    _settings: &SandboxSettings,
    _plan: LaunchPlan,
    _stdout: Option<OwnedFd>,
    _stderr: Option<OwnedFd>,
) -> Result<Running, SandboxError> {
    Err(SandboxError::NotReady)
}

/// Entry point of `mupilot-switch stage` (the re-exec'd, single-threaded stage process).
pub fn stage_main() -> i32 {
    1
}
