//! The payload sandbox: cgroup below the pilot's, namespaces, private mounts and scratch,
//! identity switch, exec, supervision and teardown. Runs as root inside the helper.
//!
//! The multi-threaded helper never does privileged work after a fork: a launch hands the plan
//! to a fresh, single-threaded *stage* process (pid 1 of the payload's pid namespace, forked
//! by the stage factory or by an exec of `mupilot-switch stage`) that performs every step in
//! kernel order and starts the payload; the helper itself only creates the payload cgroup and
//! the scratch directory.
//!
//! Read [`launch`] and [`Running::wait`] top to bottom: each step is one call, in the order
//! the kernel needs. The privileged steps inside the payload's namespaces live in `stage`
//! (processes) and `privs` (identity switch); cgroups in `cgroup`; output copying in
//! `outputs`; the optional user-namespace filter in `seccomp`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod cgroup;
mod factory;
mod outputs;
mod payload;
mod privs;
pub mod scope;
mod seccomp;
mod stage;
mod stages;
mod step;
mod wire;

/// The `sched_param` SCHED_OTHER and SCHED_IDLE take (priority 0). All zeroes rather than a
/// struct literal: musl's `sched_param` has more fields than glibc's, and the static pilot
/// (docs/vo-framework.md) links this library for musl.
// SAFETY: sched_param is plain integers (and, on musl, timespecs): all-zero bytes are a valid
// value, and the one field that matters, sched_priority, is 0.
const SCHED_PRIORITY_0: libc::sched_param = unsafe { std::mem::zeroed() };

pub use cgroup::{Cgroup, CgroupError};
pub use scope::{IpcFallback, IpcIsolation};
pub use stages::StagePool;
use wire::{Events, Fault, FromStage, Plan, ToStage};

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
}

impl NetworkMode {
    /// As written in switch.toml and on the stage's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
            NetworkMode::Loopback => "loopback",
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
    /// signals with Landlock (ABI < 6): refuse to start, or a loopback-only namespace.
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
    pub peak_memory_bytes: u64,
    pub wall_seconds: f64,
    /// "oom", "walltime", or the reason given to [`Handle::kill`].
    pub kill_reason: Option<String>,
    /// tar.gz of the declared outputs that could be copied.
    pub outputs: Option<Vec<u8>>,
    /// "path: reason" for each declared output that was not copied.
    pub outputs_skipped: Vec<String>,
}

#[derive(Debug)]
struct HandleInner {
    pid: i32,
    stage_pid: i32,
    cgroup: Cgroup,
    scratch: PathBuf,
    kill_reason: Mutex<Option<String>>,
}

/// A started payload. Clone-able handle for signalling from other threads.
#[derive(Debug, Clone)]
pub struct Handle {
    inner: Arc<HandleInner>,
}

impl Handle {
    /// Host pid of the payload's main process.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }
    /// The payload cgroup's directory (v2) or its memory-controller directory (v1).
    pub fn cgroup(&self) -> String {
        self.inner.cgroup.display()
    }
    /// The payload's scratch directory on the host.
    pub fn scratch(&self) -> PathBuf {
        self.inner.scratch.clone()
    }
    /// Sends `sig` to every process of the payload. The stage (the namespace's pid 1) is skipped: it would
    /// forward the signal to the main process a second time.
    pub fn signal(&self, sig: i32) -> Result<(), SandboxError> {
        self.inner
            .cgroup
            .signal(sig, &[self.inner.stage_pid])
            .map_err(|source| SandboxError::Signal { sig, source })
    }
    /// Kills every process of the payload; `reason` ends up in the outcome's kill_reason
    /// (the first reason given wins).
    pub fn kill(&self, reason: &str) {
        self.set_reason(reason);
        if let Err(e) = self.inner.cgroup.kill_all() {
            tracing::warn!(cgroup = %self.cgroup(), error = %e, "killing payload cgroup");
        }
    }
    fn set_reason(&self, reason: &str) {
        let mut r = self
            .inner
            .kill_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.to_owned());
        }
    }
    fn reason(&self) -> Option<String> {
        self.inner
            .kill_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Time between SIGTERM and SIGKILL when the wall time runs out.
const WALLTIME_GRACE: Duration = Duration::from_secs(5);
/// Longest time the stage may take to start the payload (bundle unpacking included).
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// The owner of a started payload: waits for it and tears it down.
pub struct Running {
    pub handle: Handle,
    /// Reaped by the [`Residue`] once the exit was reported: the stage (which reaped every
    /// payload process before the report) lingers until the residue closes the channel, then
    /// ends on its own.
    stage: Option<stages::StageProcess>,
    events: Events,
    started: Instant,
    walltime: Option<Duration>,
    outputs: Vec<String>,
    output_limit: u64,
    /// The account's uid: only its files are copied out.
    owner_uid: u32,
    /// Set once [`Running::wait`] tore everything down; otherwise `Drop` does it.
    finished: bool,
}

impl Drop for Running {
    /// A payload whose owner never waited (a panic, an early return) is still killed and
    /// cleaned up: no process, scratch or cgroup outlives its `Running`.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let h = &self.handle.inner;
        remove_leftovers(self.stage.take(), true, &h.scratch, &h.cgroup);
    }
}

/// Removes what a payload leaves: reaps its stage, then removes its scratch directory and
/// cgroup. With `kill`, the stage (and with it its namespace) is killed first and
/// the cgroup emptied before removal; without, the stage was released and is ending on its
/// own (the cgroup's last process).
fn remove_leftovers(
    stage: Option<stages::StageProcess>,
    kill: bool,
    scratch: &Path,
    cgroup: &Cgroup,
) {
    if let Some(mut stage) = stage {
        if kill {
            let _ = stage.kill();
        }
        let _ = stage.wait();
    }
    if kill {
        if let Err(e) = cgroup.kill_all() {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "payload cgroup not empty");
        }
    }
    match std::fs::remove_dir_all(scratch) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(scratch = %scratch.display(), error = %e, "removing scratch")
        }
        _ => {}
    }
    if !cgroup.remove() {
        tracing::warn!(cgroup = %cgroup.display(), "payload cgroup could not be removed");
    }
}

impl Running {
    /// Blocks until the main process exits, kills what is left in the cgroup, collects usage
    /// and outputs, removes the scratch directory and the cgroup. Enforces the wall time:
    /// SIGTERM to every payload process when it runs out, SIGKILL after a grace period.
    pub fn wait(self) -> Result<Outcome, SandboxError> {
        let (outcome, residue) = self.wait_then_clean_later()?;
        residue.remove();
        Ok(outcome)
    }

    /// Whether the stage's report of the payload's end is already here (it came with
    /// `started`, in one write, when the payload ended first): [`Running::wait`] then does not
    /// wait for it.
    pub fn has_ended(&self) -> bool {
        self.events.has_message()
    }

    /// Whether the end copies files out of the scratch directory (the plan named outputs).
    pub fn copies_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// [`Running::wait`], but the emptied scratch directory and cgroup are handed back as a
    /// [`Residue`] to remove after the exit has been reported: no payload process is left when
    /// this returns (the cgroup was killed empty and the outputs copied), so only directories
    /// remain, and removing them (a synchronous discard on some filesystems) need not delay
    /// the report. The residue removes itself when dropped.
    pub fn wait_then_clean_later(mut self) -> Result<(Outcome, Residue), SandboxError> {
        let mut end: Option<(Option<i32>, Option<i32>)> = None;
        // checked: Instant + a walltime near 2^64 s panics; one that large is no deadline.
        let deadline = self.walltime.and_then(|w| self.started.checked_add(w));
        let mut kill_at: Option<Instant> = None;
        loop {
            let next = kill_at.or(deadline);
            let timeout = next.map(|t| {
                t.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            });
            self.events
                .channel()
                .set_read_timeout(timeout)
                .map_err(SandboxError::Channel)?;
            match self.events.next() {
                Ok(FromStage::Exited { code, signal }) => {
                    end = Some((code, signal));
                    break;
                }
                Ok(_) => {}
                Err(e) if e.timed_out() => {
                    if kill_at.is_none() {
                        self.handle.set_reason("walltime");
                        let _ = self.handle.signal(libc::SIGTERM);
                        kill_at = Some(Instant::now() + WALLTIME_GRACE);
                    } else {
                        self.handle.kill("walltime");
                        kill_at = Some(Instant::now() + WALLTIME_GRACE);
                    }
                }
                Err(_) => break,
            }
        }
        let wall_seconds = self.started.elapsed().as_secs_f64();
        // With an exit report the stage has killed and reaped everything else of the payload
        // and is exiting itself: it is the one process the cgroup may still show. Without one
        // the stage died or was killed: make sure it (and with it its namespace) is gone.
        let stage_pid = self.handle.inner.stage_pid;
        let exiting: &[i32] = if end.is_some() {
            std::slice::from_ref(&stage_pid)
        } else {
            if let Some(mut stage) = self.stage.take() {
                let _ = stage.wait();
            }
            &[]
        };
        let h = &self.handle;
        // Everything left (daemonized children included) dies with the cgroup (P10).
        if let Err(e) = h.inner.cgroup.kill_all_but_exiting(exiting) {
            tracing::warn!(cgroup = %h.cgroup(), error = %e, "payload cgroup not empty");
        }
        let usage = h.inner.cgroup.usage();
        if usage.oom_killed {
            h.set_reason("oom");
        }
        let collected = outputs::collect(
            &h.inner.scratch,
            &self.outputs,
            self.output_limit,
            self.owner_uid,
        );
        self.finished = true;
        let residue = Residue {
            handle: Some(h.clone()),
            // Our end of the channel stays open until the residue is removed: the stage
            // lingers until it closes, so its teardown comes after the report.
            channel: self.events.channel().try_clone().ok(),
            stage: self.stage.take(),
        };
        let (exit_code, signal) = end.unwrap_or((None, Some(libc::SIGKILL)));
        let outcome = Outcome {
            exit_code,
            signal,
            cpu_seconds: usage.cpu_seconds,
            peak_memory_bytes: usage.peak_memory_bytes,
            wall_seconds,
            kill_reason: h.reason(),
            outputs: collected.archive,
            outputs_skipped: collected.skipped,
        };
        Ok((outcome, residue))
    }
}

/// What is left of a payload after it ended and its processes were killed: its scratch
/// directory, its (empty) cgroup and the exiting stage process. Removed (and reaped) by
/// [`Residue::remove`] or when dropped.
pub struct Residue {
    handle: Option<Handle>,
    stage: Option<stages::StageProcess>,
    channel: Option<UnixStream>,
}

impl Residue {
    /// Removes the scratch directory and the cgroup.
    pub fn remove(mut self) {
        self.clean();
    }

    fn clean(&mut self) {
        // Closing our end releases the stage, which lingers after the exit report until
        // then (stage.rs, `linger_until_released`); it ends on its own.
        drop(self.channel.take());
        if let Some(h) = self.handle.take() {
            remove_leftovers(self.stage.take(), false, &h.inner.scratch, &h.inner.cgroup);
        }
    }
}

impl Drop for Residue {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Directories the sandbox mounts a private tmpfs on; the scratch root must not be below them.
const PRIVATE_TMP: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

fn invalid(field: &'static str, value: impl std::fmt::Display, reason: &str) -> SandboxError {
    SandboxError::InvalidPlan {
        field,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

fn validate(settings: &SandboxSettings, plan: &LaunchPlan) -> Result<(), SandboxError> {
    if !crate::util::is_safe_id(&plan.payload_id) {
        return Err(invalid(
            "payload_id",
            &plan.payload_id,
            "use 1-64 of [A-Za-z0-9._-], not starting with '.'",
        ));
    }
    if plan.account.uid == 0 || plan.account.gid == 0 {
        return Err(invalid(
            "account",
            &plan.account.name,
            "payloads never run as root (uid or gid 0)",
        ));
    }
    if plan.argv.is_empty() || plan.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid(
            "argv",
            format!("{:?}", plan.argv),
            "needs a program and no NUL bytes",
        ));
    }
    for (k, v) in &plan.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(
                "env",
                k,
                "names must be non-empty without '=' or NUL",
            ));
        }
    }
    if plan.cores == 0 || plan.memory_bytes == 0 {
        return Err(invalid(
            "resources",
            format!("cores={} memory_bytes={}", plan.cores, plan.memory_bytes),
            "cores and memory must be positive",
        ));
    }
    let root = &settings.scratch_root;
    if !root.is_absolute() || PRIVATE_TMP.iter().any(|t| root.starts_with(t)) {
        return Err(invalid(
            "sandbox.scratch_root",
            root.display(),
            "must be an absolute path outside /tmp, /var/tmp and /dev/shm (they are private per payload)",
        ));
    }
    for o in &plan.outputs {
        if !crate::util::is_relative_clean_path(o) {
            return Err(invalid(
                "outputs",
                o,
                "must be clean paths relative to scratch",
            ));
        }
    }
    Ok(())
}

/// The payload's whole environment: allowlisted helper variables, the envelope's, then the
/// sandbox's own (which win).
fn payload_env(
    settings: &SandboxSettings,
    plan: &LaunchPlan,
    scratch: &Path,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for name in &settings.env_allowlist {
        if let Ok(v) = std::env::var(name) {
            env.insert(name.clone(), v);
        }
    }
    env.extend(plan.env.clone());
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    let s = scratch.display().to_string();
    let cores = plan.cores.to_string();
    for (k, v) in [
        ("HOME", s.as_str()),
        ("TMPDIR", "/tmp"),
        ("USER", plan.account.name.as_str()),
        ("LOGNAME", plan.account.name.as_str()),
        ("MUPILOT_PAYLOAD_ID", plan.payload_id.as_str()),
        ("OMP_NUM_THREADS", cores.as_str()),
        ("MKL_NUM_THREADS", cores.as_str()),
        ("OPENBLAS_NUM_THREADS", cores.as_str()),
        ("NUMEXPR_NUM_THREADS", cores.as_str()),
        ("GOMAXPROCS", cores.as_str()),
    ] {
        env.insert(k.into(), v.into());
    }
    env.into_iter().collect()
}

/// Creates the scratch root (0711 root) if needed and the payload's directory (0700, owned by
/// the account). Refuses a pre-existing payload directory.
fn make_scratch(settings: &SandboxSettings, plan: &LaunchPlan) -> Result<PathBuf, SandboxError> {
    let root = &settings.scratch_root;
    let err = |path: &Path, reason: String| SandboxError::Scratch {
        path: path.to_owned(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .map_err(|e| err(root, format!("cannot create: {e}")))?;
    let meta = std::fs::symlink_metadata(root).map_err(|e| err(root, e.to_string()))?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(err(
            root,
            "must be a directory owned by root (not a symlink)".into(),
        ));
    }
    if meta.mode() & 0o7777 != 0o711 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| err(root, format!("cannot chmod 0711: {e}")))?;
    }
    let dir = root.join(&plan.payload_id);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            err(
                &dir,
                format!(
                    "cannot create ({e}); a payload with this id is running or was not cleaned up"
                ),
            )
        })?;
    let cleanup = |reason: String| {
        let _ = std::fs::remove_dir(&dir);
        err(&dir, reason)
    };
    std::os::unix::fs::chown(&dir, Some(plan.account.uid), Some(plan.account.gid))
        .map_err(|e| cleanup(format!("cannot chown to {}: {e}", plan.account.name)))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| cleanup(format!("cannot chmod 0700: {e}")))?;
    Ok(dir)
}

/// Starts a payload through a stage process spawned for it: [`begin`] without idle stages,
/// [`Starting::create_cgroup`], then [`Starting::release`] at once (no start record to wait
/// for).
pub fn launch(
    settings: &SandboxSettings,
    plan: LaunchPlan,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<Running, SandboxError> {
    let stages = StagePool::new(settings, 0)?;
    let mut starting = begin(settings, &stages, plan, stdout, stderr)?;
    starting.create_cgroup()?;
    starting.release()
}

/// Builds a payload's sandbox up to the exec: the payload then waits until
/// [`Starting::release`], so the caller can write the start record meanwhile.
///
/// Steps, in order: validate the plan; find where the payload cgroup goes below the pilot's;
/// create the scratch directory; take an idle `<helper> stage` (clean environment, a
/// socketpair on its stdin) or spawn one; send it the plan, the exec and cgroup gates and
/// the payload's stdout/stderr. The stage builds the scratch view meanwhile and waits at the
/// cgroup gate, which [`Starting::create_cgroup`] opens. On any failure everything created so
/// far is removed again; a failure of the stage is reported by [`Starting::release`].
pub fn begin(
    settings: &SandboxSettings,
    stages: &StagePool,
    plan: LaunchPlan,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<Starting, SandboxError> {
    let started = Instant::now();
    validate(settings, &plan)?;
    let located = Cgroup::locate(&plan.pilot, &format!("mupilot-{}", plan.payload_id))?;
    let scratch = make_scratch(settings, &plan)?;
    let stage_plan = Plan {
        payload_id: plan.payload_id.clone(),
        account: plan.account.clone(),
        argv: plan.argv.clone(),
        env: payload_env(settings, &plan, &scratch),
        cgroup: located.clone(),
        scratch_root: settings.scratch_root.clone(),
        scratch: scratch.clone(),
        nofile: settings.nofile,
        core_bytes: settings.core_bytes,
        allow_user_namespaces: settings.allow_user_namespaces,
        bundle: plan.bundle.is_some(),
    };
    let remove_scratch = |e: SandboxError| {
        let _ = std::fs::remove_dir_all(&scratch);
        e
    };
    let gate = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::Channel(e.into()))
    };
    let (exec_wait, exec_open) = gate().map_err(remove_scratch)?;
    let (cgroup_wait, cgroup_open) = gate().map_err(remove_scratch)?;
    let (stage, channel, launching) = send_plan(
        stages,
        stage_plan,
        [exec_wait, cgroup_wait],
        plan.bundle.as_deref(),
        stdout,
        stderr,
    )
    .map_err(remove_scratch)?;
    Ok(Starting {
        stage: Some(stage),
        channel: Some(channel),
        exec_gate: Some(File::from(exec_open)),
        cgroup_gate: Some(File::from(cgroup_open)),
        located: Some(located),
        limits: cgroup::Limits {
            memory_bytes: plan.memory_bytes,
            cores: plan.cores,
            pids_max: settings.pids_max,
        },
        scratch,
        started,
        payload_id: plan.payload_id,
        walltime: (plan.walltime_seconds > 0).then(|| Duration::from_secs(plan.walltime_seconds)),
        outputs: plan.outputs,
        output_limit: settings.output_limit_bytes,
        owner_uid: plan.account.uid,
        _launching: launching,
    })
}

/// A payload whose sandbox is being built; its process waits at the exec gate. Dropped
/// without [`Starting::release`], the launch is withdrawn: the stage and everything in the
/// cgroup are killed, the scratch directory and the cgroup removed.
pub struct Starting {
    stage: Option<stages::StageProcess>,
    channel: Option<UnixStream>,
    exec_gate: Option<File>,
    cgroup_gate: Option<File>,
    /// The payload cgroup's place (created by [`Starting::create_cgroup`] with `limits`);
    /// None once released.
    located: Option<cgroup::Located>,
    limits: cgroup::Limits,
    scratch: PathBuf,
    started: Instant,
    payload_id: String,
    walltime: Option<Duration>,
    outputs: Vec<String>,
    output_limit: u64,
    owner_uid: u32,
    /// Holds back the stage pool's refill until the payload started or the launch failed.
    _launching: stages::Launching,
}

impl Starting {
    /// The payload cgroup's directory (v2) or its memory-controller directory (v1).
    pub fn cgroup(&self) -> String {
        self.located
            .as_ref()
            .map(|l| l.cgroup().display())
            .unwrap_or_default()
    }

    /// The payload's scratch directory on the host.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Creates the payload cgroup with its limits, then opens the cgroup gate: the stage,
    /// which built the scratch view meanwhile, joins it before the payload exists. Done here,
    /// in the helper, while the stage works (one process waiting for the other only when the
    /// creation is slower than the stage's own steps), and in the host's pid namespace, which
    /// cgroup v2's parent needs. Failing, the caller drops `self`: the stage is withdrawn and
    /// what the creation made is removed again.
    pub fn create_cgroup(&mut self) -> Result<(), SandboxError> {
        if let Some(located) = &self.located {
            located.clone().create(self.limits)?;
        }
        if let Some(gate) = self.cgroup_gate.take() {
            // A stage that died meanwhile has closed its end; `release` reports it.
            wire::open_gate(gate);
        }
        Ok(())
    }

    /// Opens the exec gate and waits until the stage reports the payload exec'd.
    pub fn release(mut self) -> Result<Running, SandboxError> {
        if let Some(gate) = self.exec_gate.take() {
            // A stage that died meanwhile has closed its end; the wait below reports it.
            wire::open_gate(gate);
        }
        let (Some(mut stage), Some(channel)) = (self.stage.take(), self.channel.take()) else {
            return Err(SandboxError::StageDied {
                status: "released twice".into(),
            });
        };
        let (events, pid, stage_pid) = match wait_started(&mut stage, channel) {
            Ok(s) => s,
            Err(e) => {
                self.stage = Some(stage);
                return Err(e);
            }
        };
        let Some(cgroup) = self.located.take().map(|l| l.cgroup().clone()) else {
            unreachable!("a Starting always holds its cgroup until released or dropped")
        };
        tracing::debug!(
            payload = %self.payload_id,
            pid,
            cgroup = %cgroup.display(),
            ms = self.started.elapsed().as_millis() as u64,
            "payload started"
        );
        Ok(Running {
            handle: Handle {
                inner: Arc::new(HandleInner {
                    pid,
                    stage_pid,
                    cgroup,
                    scratch: std::mem::take(&mut self.scratch),
                    kill_reason: Mutex::new(None),
                }),
            },
            stage: Some(stage),
            events,
            started: self.started,
            walltime: self.walltime,
            outputs: std::mem::take(&mut self.outputs),
            output_limit: self.output_limit,
            owner_uid: self.owner_uid,
            finished: false,
        })
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let Some(located) = self.located.take() else {
            return;
        };
        drop(self.exec_gate.take());
        drop(self.cgroup_gate.take());
        remove_leftovers(self.stage.take(), true, &self.scratch, located.cgroup());
    }
}

/// Takes a stage and sends it the plan, the gates' read ends (exec, cgroup), the bundle's
/// memfd (when the plan has one) and the payload's stdout/stderr in one frame; the stage puts
/// the outputs on its fds 1 and 2 (none: /dev/null stays there). Our copies close when this
/// returns.
fn send_plan(
    stages: &StagePool,
    plan: Plan,
    gates: [OwnedFd; 2],
    bundle: Option<&OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<(stages::StageProcess, UnixStream, stages::Launching), SandboxError> {
    // Outputs travel by position: a missing one (but not both) becomes /dev/null.
    let null = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(SandboxError::Channel)
    };
    let (stdout, stderr) = match (stdout, stderr) {
        (None, None) => (None, None),
        (out, err) => (
            Some(out.map_or_else(null, Ok)?),
            Some(err.map_or_else(null, Ok)?),
        ),
    };
    let (
        stages::IdleStage {
            process: mut child,
            channel,
        },
        launching,
    ) = stages.take()?;
    let fds: Vec<_> = gates
        .iter()
        .chain(bundle)
        .chain([&stdout, &stderr].into_iter().flatten())
        .map(|fd| fd.as_raw_fd())
        .collect();
    // Set before the plan is sent, so the stage wakes up at normal priority. (An exec'd stage
    // that reaches its own switch to SCHED_IDLE only after this finds the plan there and
    // undoes it; a stage still idle when its plan came resets itself.)
    child.run_at_normal_priority();
    if let Err(e) = wire::send(&channel, &ToStage::Plan(Box::new(plan)), &fds) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(SandboxError::Channel(e.into_io()));
    }
    Ok((child, channel, launching))
}

/// Waits for the stage's `started` (the payload exec'd) or `failed`.
fn wait_started(
    child: &mut stages::StageProcess,
    channel: UnixStream,
) -> Result<(Events, i32, i32), SandboxError> {
    channel
        .set_read_timeout(Some(START_TIMEOUT))
        .map_err(SandboxError::Channel)?;
    let mut events = Events::new(channel);
    loop {
        match events.next() {
            Ok(FromStage::Started { pid, stage_pid }) => return Ok((events, pid, stage_pid)),
            Ok(FromStage::Failed {
                error,
                fault: Fault::Bundle,
                ..
            }) => return Err(SandboxError::Bundle { error }),
            Ok(FromStage::Failed {
                step,
                error,
                fault: Fault::Node,
            }) => return Err(SandboxError::Setup { step, error }),
            // An exit before `started` cannot happen (the stage reports started first).
            Ok(FromStage::Exited { .. }) => {}
            Err(wire::WireError::Closed | wire::WireError::Truncated { .. }) => {
                let status = child.wait().unwrap_or_else(|e| e.to_string());
                return Err(SandboxError::StageDied { status });
            }
            Err(e) => return Err(SandboxError::Channel(e.into_io())),
        }
    }
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
