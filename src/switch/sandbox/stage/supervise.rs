//! The stage as pid 1 of the payload's namespace while it runs: reaps every process of the namespace,
//! forwards signals to the main process, and when that exits ends the namespace, reports
//! `exited` and lingers until the helper releases it. Without a helper (its end closed) it
//! ends the payload and cleans up itself (P10).
//!
//! Must not outlive the payload's namespace with any of its processes in it.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::super::step::StageError;
use super::super::wire::{FromStage, Plan};
use super::prepare::Host;
use super::{send, StepResult};

/// Reaps every child that has ended, without blocking; the main process's `exit` once it is
/// among them.
pub(super) fn reap(payload: Pid) -> Option<FromStage> {
    loop {
        let (code, signal) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, c)) if p == payload => (Some(c), None),
            Ok(WaitStatus::Signaled(p, s, _)) if p == payload => (None, Some(s as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(_) => continue,
        };
        return Some(FromStage::Exited { code, signal });
    }
}

/// pid 1's work while the payload runs: reap everything, forward signals to the main
/// process, and end with it: the namespace is ended ([`end_namespace`]), the exit reported,
/// and the stage lingers until released ([`linger_until_released`]). When the helper's end
/// closes before, the helper died: the payload ends now (P10) and the stage cleans up
/// ([`orphan_cleanup`]).
pub(super) fn supervise(
    plan: &Plan,
    host: &Host,
    channel: &UnixStream,
    payload: Pid,
) -> StepResult<i32> {
    let signals = &host.signals;
    loop {
        let (signal_ready, helper_hup) = {
            let mut fds = [
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(channel.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(StageError::new("wait for the payload", e)),
                Ok(_) => {}
            }
            let any = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (any(&fds[0]), any(&fds[1]))
        };
        // The helper sends nothing after the plan: readable means closed.
        if helper_hup && matches!((&*channel).read(&mut [0u8; 64]), Ok(0) | Err(_)) {
            end_namespace();
            orphan_cleanup(plan, host);
            return Ok(0);
        }
        if !signal_ready {
            continue;
        }
        let Ok(Some(info)) = signals.read_signal() else {
            continue;
        };
        let sig = info.ssi_signo as i32;
        if sig != libc::SIGCHLD {
            let _ = nix::sys::signal::kill(payload, Signal::try_from(sig).ok());
            continue;
        }
        if let Some(exit) = reap(payload) {
            end_namespace();
            send(channel, &[exit]);
            linger_until_released(channel);
            return Ok(0);
        }
    }
}

/// After the exit report: waits until the helper closes its end of the channel (it has
/// reported the exit and is about to reap us), then lowers the stage to SCHED_IDLE. Its exit
/// tears down the payload's namespaces and memory; done at idle priority, that work does not
/// compete with the helper's report or the next launch.
pub(super) fn linger_until_released(channel: &UnixStream) {
    loop {
        match (&*channel).read(&mut [0u8; 64]) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let idle = super::super::SCHED_PRIORITY_0;
    // SAFETY: sched_setscheduler on ourselves with a sched_param on our stack.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
}

/// Without a helper: every other process of the payload is dead ([`end_namespace`] ran), so
/// the stage removes what the helper would have: the cgroup directories (after moving itself
/// out, [`Located::leave`]), and the scratch directory, seen from the host's mount namespace
/// (in ours the scratch root is our tmpfs).
pub(super) fn orphan_cleanup(plan: &Plan, host: &Host) {
    plan.cgroup.leave();
    plan.cgroup.cgroup().remove();
    if nix::sched::setns(host.mount_ns.as_fd(), CloneFlags::CLONE_NEWNS).is_ok() {
        let _ = std::fs::remove_dir_all(&plan.scratch);
    }
}

/// Longest time the stage waits for the processes it killed before it reports the exit anyway
/// (a process stuck in uninterruptible sleep); the helper's cgroup kill handles what is left.
const END_NAMESPACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// After the main process exited (or the helper died): kills every other process of the pid
/// namespace (pid 1's kill(-1) reaches all of them) and reaps them, so that when the exit is
/// reported nothing of the payload runs any more and only this stage, which then exits, is
/// left in the cgroup. The helper need not wait for the stage's own exit (the namespaces'
/// teardown) to report.
pub(super) fn end_namespace() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = std::time::Instant::now() + END_NAMESPACE_WAIT;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if std::time::Instant::now() >= deadline {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // ECHILD: no child left; orphans of the namespace were reparented to us, so none
            // is left anywhere in it.
            Err(_) => return,
        }
    }
}
