//! The stage: the per-payload supervisor. A fresh, single-threaded root process, pid 1 of a
//! pid namespace of its own, that builds one payload's sandbox, starts the payload in it and
//! supervises it. Forked by the stage factory (factory.rs), or by `mupilot-switch stage` when
//! no factory runs ([`stage_main`], [`fork_stage`]). Its life, one file per part:
//!
//! 1. `prepare.rs`, before its plan arrives: what every payload of this helper gets
//!    ([`Preparation`]): nothing any exec could gain (securebits, bounding set), new mount,
//!    IPC, UTS (and network) namespaces, private tmpfs mounts, a /proc of its pid namespace,
//!    the supervised signals on a signalfd, the Landlock ruleset (scope.rs). An idle stage
//!    does this under SCHED_IDLE while nothing waits for it.
//! 2. `run.rs`, with the plan (read top to bottom: `run::run`): outputs, the scratch view and
//!    the hostname; the payload cgroup joined once the helper made it (the cgroup gate); the
//!    bundle unpacked as the account; the payload's process started (payload.rs: setsid,
//!    rlimits, identity switch, no_new_privs, the Landlock domain, the optional
//!    user-namespace filter, the exec gate, exec); `started` reported to the helper.
//! 3. `supervise.rs`: it reaps, forwards signals and, when the payload's main process exits,
//!    ends the namespace and reports `exited`; when the helper's end closes first, it ends
//!    the payload and cleans up after it.
//!
//! This file: the entry points, the fork into a new pid namespace, the wait for the plan
//! ([`serve`]) and the failure report. Every message is wire.rs's.
//!
//! The gates let the helper work in parallel with the stage: it creates the cgroup while the
//! stage mounts, and writes the start record while the stage joins and the payload drops its
//! privileges; the payload's own code never runs before both are done.
//!
//! Must never be entered from a multi-threaded process: `fork` here relies on being the only
//! thread. Nothing here talks to the network or reads credentials.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::step::{step, StageError};
use super::wire::{self, FromStage, Preparation, ToStage};

mod prepare;
mod run;
mod supervise;

use prepare::{prepare, Host};
use supervise::orphan_cleanup;

type StepResult<T> = Result<T, StageError>;

/// Sends messages to the helper in one write. The helper gone means nobody listens; the
/// cgroup kill cleans up after us.
pub(super) fn send(channel: &UnixStream, msgs: &[FromStage]) {
    let _ = wire::send_all(channel, msgs);
}

/// Entry point of `mupilot-switch stage`, the exec'd stage (when no stage factory runs): forks
/// one stage ([`fork_stage`]) and waits for it; the stage dies with this process. Exit code 0
/// when the stage carried out its plan (the payload's own status travels as a
/// [`FromStage::Exited`] line), 1 on a setup failure, 2 when no plan could be read.
///
/// With `--idle` it drops to SCHED_IDLE first (the stage inherits it and builds its
/// [`Preparation`] there); the stage returns to normal priority once its plan came.
pub fn stage_main() -> i32 {
    let Some(channel) = channel_from_stdin() else {
        return 2;
    };
    let args: Vec<String> = std::env::args().skip(2).collect();
    let (prep, idle) = match Preparation::parse(&args) {
        Ok(p) => p,
        Err(e) => return serve_failed(channel, StageError::new("read stage arguments", e)),
    };
    if idle {
        become_idle(&channel);
    }
    let own_pid_ns = match open_own_pid_ns() {
        Ok(fd) => fd,
        Err(e) => return serve_failed(channel, e),
    };
    let stage = match fork_stage(&channel, &prep, &own_pid_ns, true) {
        Ok(pid) => pid,
        Err(e) => return serve_failed(channel, e),
    };
    drop(channel);
    match waitpid(stage, None) {
        Ok(WaitStatus::Exited(_, code)) => code,
        _ => 1,
    }
}

/// The start of a process the helper exec'd with a socket on fd 0 (a stage, the stage
/// factory): closes every other inherited descriptor above stderr (one the helper leaked
/// without CLOEXEC, say), moves the socket off fd 0 (close-on-exec, so no descendant inherits
/// it) and puts /dev/null there. None when that fails.
pub(crate) fn channel_from_stdin() -> Option<UnixStream> {
    fds_from_3(false).ok()?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on fd 0, which the helper gave us; no memory is involved.
    let sock = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if sock < 0 {
        return None;
    }
    // SAFETY: `sock` was just returned by fcntl and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let null = File::open("/dev/null").ok()?;
    // SAFETY: dup2 of two valid descriptors; fd 0 is replaced atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
        return None;
    }
    Some(UnixStream::from(sock))
}

/// This process's pid namespace, to return to after each [`fork_stage`].
pub(crate) fn open_own_pid_ns() -> StepResult<OwnedFd> {
    let fd = step(
        "open /proc/self/ns/pid",
        nix::fcntl::open(
            "/proc/self/ns/pid",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    )?;
    // SAFETY: `fd` was just opened and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Forks one stage: the child is pid 1 of a pid namespace of its own (unshare(CLONE_NEWPID)
/// affects only the next child; `own_pid_ns` puts the caller back for the one after), holds
/// nothing but `channel` and fds 0-2, and serves the channel ([`serve`]). With
/// `die_with_parent` it is killed when the caller dies (the exec'd stage: the helper follows
/// and kills only that process); a stage of the factory outlives the factory, which ends with
/// the helper, so that it can clean up after its payload.
///
/// Call from a single-threaded process only (the factory, the exec'd stage).
pub(crate) fn fork_stage(
    channel: &UnixStream,
    prep: &Preparation,
    own_pid_ns: &OwnedFd,
    die_with_parent: bool,
) -> StepResult<Pid> {
    step("unshare pid namespace", unshare(CloneFlags::CLONE_NEWPID))?;
    // SAFETY: the caller is single-threaded (see above), so the child may do anything.
    let forked = unsafe { fork() };
    let back = nix::sched::setns(own_pid_ns.as_fd(), CloneFlags::CLONE_NEWPID);
    match step("fork stage", forked)? {
        ForkResult::Child => {
            if die_with_parent {
                // SAFETY: prctl with integer arguments only.
                unsafe {
                    libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGKILL as libc::c_ulong,
                        0,
                        0,
                        0,
                    )
                };
            }
            let keep = channel.as_raw_fd();
            // Everything else the parent holds (its channel, the other stages' pidfds) closes
            // now: the stage's descriptors are those of a fresh exec.
            // SAFETY: close_range(2) only closes descriptors; the Rust objects that owned them
            // are never used or dropped in this process (it leaves through _exit below).
            unsafe {
                libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32);
                libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
            }
            // SAFETY: prctl with a pointer to a NUL-terminated string that outlives the call.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"mupilot-stage".as_ptr()) };
            // SAFETY: our own copy (inherited by fork) of the parent's descriptor; the
            // parent's object for it is never used or dropped in this process.
            let channel = UnixStream::from(unsafe { OwnedFd::from_raw_fd(keep) });
            let code = serve(channel, prep);
            // SAFETY: _exit skips atexit handlers and stdio flushing of the parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            if let Err(e) = back {
                // A caller that cannot return to its own pid namespace must not fork again.
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(StageError::new("return to the own pid namespace", e));
            }
            Ok(child)
        }
    }
}

/// A stage's life, as pid 1 of its pid namespace: build the [`Preparation`], wait for the
/// plan, carry it out ([`run`]), report. Returns the stage's exit code (see [`stage_main`]).
fn serve(channel: UnixStream, prep: &Preparation) -> i32 {
    serve_prepared(channel, prepare(prep))
}

/// A stage that cannot prepare: it still waits for its plan, and answers it with `failed`.
fn serve_failed(channel: UnixStream, error: StageError) -> i32 {
    serve_prepared(channel, Err(error))
}

fn serve_prepared(mut channel: UnixStream, prepared: StepResult<Host>) -> i32 {
    // One frame: the plan, the exec gate, and the payload's stdout and stderr (none: the
    // stage keeps the /dev/null it has on 1 and 2).
    // "null" frames before it are wake-ups (`StagePool::wake_next`): the plan is coming.
    let received = loop {
        match wire::recv::<ToStage>(&mut channel) {
            Ok((ToStage::Wake, _)) => {
                wire::spin_until_readable(channel.as_fd());
                continue;
            }
            Ok((ToStage::Plan(plan), fds)) => break Ok((plan, fds)),
            Err(e) => break Err(e),
        }
    };
    let (plan, fds) = match received {
        Ok((plan, fds))
            if [2, 4].contains(
                &(fds.len().saturating_sub(usize::from(plan.bundle) + usize::from(plan.stdin))),
            ) =>
        {
            (plan, fds)
        }
        Ok((_, fds)) => {
            return fail(
                &channel,
                StageError::new(
                    "read plan",
                    format!(
                    "{} descriptors came with the plan; expected the exec and cgroup gates, the bundle and stdin if any and 0 or 2 outputs",
                    fds.len()
                ),
                ),
                2,
            )
        }
        // The helper closed the channel without a plan (an idle stage no longer needed).
        Err(wire::WireError::Closed) => return 2,
        Err(e) => return fail(&channel, StageError::new("read plan", e.to_string()), 2),
    };
    // An idle stage waited under SCHED_IDLE; the payload must not inherit that. (The helper
    // normally reset it already; only a stage still idle needs the call.)
    let normal = super::SCHED_PRIORITY_0;
    // SAFETY: sched_getscheduler/sched_setscheduler on this (single-threaded) process with a
    // sched_param on our stack; no memory is shared.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE
        // SAFETY: as for sched_getscheduler just above.
        && unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) } != 0
    {
        let e = std::io::Error::last_os_error();
        return fail(&channel, StageError::new("reset scheduling policy", e), 1);
    }
    let host = match prepared {
        Ok(host) => host,
        Err(e) => return fail(&channel, e, 1),
    };
    match run::run(&plan, fds, &host, &channel) {
        Ok(code) => code,
        Err(e) => {
            // Without a helper nobody else removes what this launch made.
            if helper_gone(&channel) {
                orphan_cleanup(&plan, &host);
            }
            fail(&channel, e, 1)
        }
    }
}

/// Reports a failed step to the helper (as text from here on); returns `code`.
pub(super) fn fail(channel: &UnixStream, error: StageError, code: i32) -> i32 {
    send(channel, &[error.to_message()]);
    code
}

/// Puts this exec'd stage under SCHED_IDLE, so its start-up and [`prepare`] use only CPU time
/// nothing else wants. Done here, after the exec, not by the helper at spawn: before its exec
/// a child holds copies of the helper's descriptors (the listening socket), and a starved one
/// would keep them open after the helper died.
///
/// The forked stage resets itself to SCHED_OTHER once its plan came, so a plan that is
/// already there only costs the wait for an idle CPU once.
fn become_idle(channel: &UnixStream) {
    let idle = super::SCHED_PRIORITY_0;
    // SAFETY: sched_setscheduler on this (single-threaded) process with a sched_param on our
    // stack; no memory is shared.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
    if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
        let normal = super::SCHED_PRIORITY_0;
        // SAFETY: as above.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) };
    }
}

/// Blocks until `gate` opens; an error when the launch was withdrawn instead.
pub(super) fn pass(gate: &mut File, what: &str) -> StepResult<()> {
    step(format!("wait for {what}"), wire::pass_gate(gate))
}

/// Whether the helper's end of `channel` is closed (the helper died, or released the stage).
pub(super) fn helper_gone(channel: &UnixStream) -> bool {
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Closes (or, with `cloexec`, marks close-on-exec) every descriptor from 3 up:
/// close_range(2) (Linux >= 5.9 for the flag, 5.11), else a walk over /proc/self/fd.
pub(super) fn fds_from_3(cloexec: bool) -> std::io::Result<()> {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range(2) only closes or flags descriptors; callers own no Rust object on
    // fds >= 3 that would be invalidated (the stage calls it first thing; the payload child
    // only sets flags).
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
        return Err(err);
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above; the read_dir descriptor in the list is already closed (EBADF is
        // ignored).
        unsafe {
            if cloexec {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            } else {
                libc::close(fd);
            }
        }
    }
    Ok(())
}
