//! The payload sandbox: cgroup below the pilot's, namespaces, private mounts and scratch,
//! identity switch, exec, supervision and teardown. Runs as root inside the helper.
//!
//! The multi-threaded helper never does privileged work after a fork: a launch hands the plan
//! to a fresh, single-threaded *stage* process (pid 1 of the payload's pid namespace, forked
//! by the stage factory or by an exec of `mupilot-switch stage`) that performs every step in
//! kernel order and starts the payload; the helper itself only creates the payload cgroup and
//! the scratch directory.
//!
//! The sequence that runs for every payload, read top to bottom in this order:
//!
//! 1. helper, `switch/launch.rs` `launch`: verify, authorize, map; then [`begin`]
//!    (`start.rs`: validate, place the cgroup, make the scratch directory, take an idle stage
//!    from the pool (`pool.rs`), send it the plan);
//! 2. stage, `stage/run.rs` `run` (after `stage/prepare.rs` ran while it was idle): scratch
//!    view, hostname, cgroup gate, join, bundle, start the payload (`payload.rs`, `privs.rs`)
//!    behind the exec gate, report `started`;
//! 3. helper, meanwhile: [`Starting::create_cgroup`] opens the cgroup gate, the start record
//!    is written, [`Starting::release`] opens the exec gate and waits for `started`;
//! 4. stage, `stage/supervise.rs`: pid 1 until the payload's main process exits, `exited`;
//! 5. helper, `switch/connection.rs`: [`Running::wait_then_clean_later`] (`running.rs`):
//!    cgroup emptied, usage, outputs (`outputs.rs`), end record, then the [`Residue`] removed.
//!
//! Every message between the helper, a stage and the stage factory (`factory.rs`) is in
//! `wire.rs`; a failed stage step is a `StageError` (`step.rs`) until it crosses to the
//! helper. Cgroups live in `cgroup.rs`, IPC scoping in `scope.rs`, the optional
//! user-namespace filter in `seccomp.rs`. ([`launch`] runs 1-3 in one call, for tests and
//! tools without a start record.)
//!
//! This file holds the types the rest of the helper uses (settings, plan, errors, outcome);
//! it must not do any work itself.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod cgroup;
mod factory;
mod net;
mod outputs;
mod payload;
mod pool;
mod privs;
mod running;
pub mod scope;
mod seccomp;
mod stage;
mod start;
mod step;
mod wire;

/// The `sched_param` SCHED_OTHER and SCHED_IDLE take (priority 0). All zeroes rather than a
/// struct literal: musl's `sched_param` has more fields than glibc's, and the static pilot
/// (docs/vo-framework.md) links this library for musl.
// SAFETY: sched_param is plain integers (and, on musl, timespecs): all-zero bytes are a valid
// value, and the one field that matters, sched_priority, is 0.
const SCHED_PRIORITY_0: libc::sched_param = unsafe { std::mem::zeroed() };

pub use cgroup::{Cgroup, CgroupError};
pub use pool::StagePool;
pub use running::{Handle, Residue, Running};
pub use scope::{IpcFallback, IpcIsolation};
pub use start::{begin, launch, Starting};

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
    /// Share the host's network namespace; abstract unix sockets and signals are kept apart by
    /// Landlock scoping (`scope.rs`), or by `ipc_fallback` where the kernel cannot.
    #[default]
    Host,
    /// A new network namespace with nothing in it.
    None,
    /// A new network namespace with only `lo` up.
    Loopback,
    /// A new network namespace with `lo` and a tap device that `pasta` (passt) connects to
    /// the host's network as ordinary sockets of the payload's account (`net.rs`).
    Pasta,
}

impl NetworkMode {
    /// As written in switch.toml and on the stage's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
            NetworkMode::Loopback => "loopback",
            NetworkMode::Pasta => "pasta",
        }
    }
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
    /// What `network = "host"` means on a kernel that cannot scope abstract sockets and
    /// signals with Landlock (ABI < 6): a namespace per payload connected by pasta (the
    /// default), a loopback-only namespace, or refuse to start.
    pub ipc_fallback: IpcFallback,
    /// Names of the helper's environment variables passed through to payloads.
    pub env_allowlist: Vec<String>,
    /// RLIMIT_NOFILE for payloads.
    pub nofile: u64,
    /// RLIMIT_CORE for payloads (0: no core dumps).
    pub core_bytes: u64,
    /// Most bytes of declared outputs copied back per payload.
    pub output_limit_bytes: u64,
    /// Let payloads create user namespaces (unprivileged Apptainer needs them). When false,
    /// a seccomp filter refuses CLONE_NEWUSER and setns in the payload.
    pub allow_user_namespaces: bool,
    /// Stage processes the helper keeps exec'd and idle, so a launch does not wait for an exec
    /// of the helper binary ([`StagePool`]); 0 spawns one per launch.
    pub warm_stages: usize,
    /// The binary re-exec'd as `<stage_exe> stage`; `None` means /proc/self/exe (the helper
    /// itself). Tests point it at the built `mupilot-switch`.
    #[serde(skip)]
    pub stage_exe: Option<PathBuf>,
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
    /// The pilot's cgroups (pinned at hello): the payload's cgroup goes below them.
    pub pilot: cgroup::PilotCgroups,
    /// tar.gz unpacked into scratch as the account, never as root: a sealed memfd whose
    /// digest the caller checked ([`crate::protocol::switch_wire::sealed_memfd`]).
    #[serde(skip)]
    pub bundle: Option<Arc<OwnedFd>>,
    /// Paths relative to scratch copied out after the end.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// The payload's stdin (a pipe or regular file the caller opened for reading); None:
    /// /dev/null. Only the gLExec entry passes one.
    #[serde(skip)]
    pub stdin: Option<Arc<OwnedFd>>,
}

/// Errors of the sandbox layer; each names the path or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid launch plan: {field} = {value:?}: {reason}")]
    InvalidPlan {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("payload cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("scratch directory {path}: {reason}")]
    Scratch { path: PathBuf, reason: String },
    #[error("cannot start the stage process {exe}: {source}; check the helper binary is intact")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("channel to the stage process: {0}")]
    Channel(std::io::Error),
    #[error("payload setup failed at step '{step}': {error}")]
    Setup { step: String, error: String },
    /// The input bundle (whose digest the VO signed) is not a usable tar.gz: the caller's
    /// fault, not the site's.
    #[error("the input bundle is not a usable tar.gz archive: {error}")]
    Bundle { error: String },
    #[error("stage process ended before starting the payload ({status})")]
    StageDied { status: String },
    #[error("cannot send signal {sig} to the payload: {source}")]
    Signal { sig: i32, source: std::io::Error },
    #[error("sandbox.ipc_fallback: {0}")]
    IpcIsolation(String),
}

/// How a payload ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub cpu_seconds: f64,
    /// None where the kernel keeps no peak (cgroup v2 before Linux 5.19).
    pub peak_memory_bytes: Option<u64>,
    pub wall_seconds: f64,
    /// "oom", "walltime", or the reason given to [`Handle::kill`].
    pub kill_reason: Option<String>,
    /// tar.gz of the declared outputs that could be copied.
    pub outputs: Option<Vec<u8>>,
    /// "path: reason" for each declared output that was not copied.
    pub outputs_skipped: Vec<String>,
}

// The daemon moves `Running` into a waiter thread and shares `Handle` between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send::<Running>();
    send_sync::<Handle>();
};

/// Entry point of `mupilot-switch stage` (the re-exec'd, single-threaded stage process).
pub fn stage_main() -> i32 {
    stage::stage_main()
}

/// Entry point of `mupilot-switch stage-factory` (the single-threaded process that forks idle
/// stages for the helper).
pub fn stage_factory_main() -> i32 {
    factory::factory_main()
}
