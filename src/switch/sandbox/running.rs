//! A started payload, from the helper's side: [`Handle`] (signal, kill, from any thread),
//! [`Running`] (wait for the stage's `exited`, enforce the wall time, empty the cgroup, read
//! usage, copy outputs) and [`Residue`] (the directories left to remove after the report).
//!
//! Runs in the multi-threaded helper: it must not fork or do privileged setup; everything
//! inside the payload's namespaces is the stage's (stage/).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::wire::{Events, FromStage};
use super::{outputs, pool, Cgroup, Outcome, SandboxError};

#[derive(Debug)]
pub(super) struct HandleInner {
    pub(super) pid: i32,
    pub(super) stage_pid: i32,
    pub(super) cgroup: Cgroup,
    pub(super) scratch: PathBuf,
    pub(super) kill_reason: Mutex<Option<String>>,
}

/// A started payload. Clone-able handle for signalling from other threads.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(super) inner: Arc<HandleInner>,
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
    /// What the payload uses now, from its cgroup (three file reads; see
    /// [`crate::cgroups::LiveUsage`]).
    pub fn live_usage(&self) -> crate::cgroups::LiveUsage {
        self.inner.cgroup.live_usage()
    }
    /// How many processes the payload's cgroup holds now (its stage, pid 1 of its
    /// namespace, not counted).
    pub fn processes(&self) -> usize {
        let pids = self.inner.cgroup.pids();
        pids.iter().filter(|p| **p != self.inner.stage_pid).count()
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
    pub(super) fn set_reason(&self, reason: &str) {
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

/// The owner of a started payload: waits for it and tears it down.
pub struct Running {
    pub handle: Handle,
    /// Reaped by the [`Residue`] once the exit was reported: the stage (which reaped every
    /// payload process before the report) lingers until the residue closes the channel, then
    /// ends on its own.
    pub(super) stage: Option<pool::StageProcess>,
    pub(super) events: Events,
    pub(super) started: Instant,
    pub(super) walltime: Option<Duration>,
    pub(super) outputs: Vec<String>,
    pub(super) output_limit: u64,
    /// The account's uid: only its files are copied out.
    pub(super) owner_uid: u32,
    /// Set once [`Running::wait`] tore everything down; otherwise `Drop` does it.
    pub(super) finished: bool,
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
pub(super) fn remove_leftovers(
    stage: Option<pool::StageProcess>,
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
    stage: Option<pool::StageProcess>,
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
