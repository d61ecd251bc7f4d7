//! Starting a payload, from the helper's side: the plan checked ([`validate`]), the scratch
//! directory made, an idle stage taken from the pool and sent the plan ([`begin`]), the
//! payload cgroup created while the stage works ([`Starting::create_cgroup`]), the exec gate
//! opened and `started` awaited ([`Starting::release`]).
//!
//! Runs in the multi-threaded helper: it must not fork or do privileged setup itself (the
//! stage does, stage/), and it withdraws everything it made when a launch fails or is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::running::{remove_leftovers, HandleInner};
use super::wire::{self, Events, Fault, FromStage, Plan, ToStage};
use super::{
    cgroup, pool, Cgroup, Handle, LaunchPlan, Running, SandboxError, SandboxSettings, StagePool,
};

/// Longest time the stage may take to start the payload (bundle unpacking included).
const START_TIMEOUT: Duration = Duration::from_secs(300);

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
        stdin: plan.stdin.is_some(),
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
        plan.stdin.as_deref(),
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
    stage: Option<pool::StageProcess>,
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
    _launching: pool::Launching,
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
/// memfd (when the plan has one), the payload's stdin (when it has one) and its stdout/stderr
/// in one frame; the stage puts them on its fds 0, 1 and 2 (none: /dev/null stays there). Our
/// copies close when this returns.
fn send_plan(
    stages: &StagePool,
    plan: Plan,
    gates: [OwnedFd; 2],
    bundle: Option<&OwnedFd>,
    stdin: Option<&OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<(pool::StageProcess, UnixStream, pool::Launching), SandboxError> {
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
        pool::IdleStage {
            process: mut child,
            channel,
        },
        launching,
    ) = stages.take()?;
    let fds: Vec<_> = gates
        .iter()
        .chain(bundle)
        .chain(stdin)
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
    child: &mut pool::StageProcess,
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
