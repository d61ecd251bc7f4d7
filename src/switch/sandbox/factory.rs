//! The stage factory (`mupilot-switch stage-factory`): one process, exec'd once by the helper,
//! that forks the helper's idle stages. A fork of it costs far less CPU than an exec of the
//! helper binary (loading, relocating and initialising it again for every payload;
//! docs/benchmarks.md), and it never competes with a launch: the
//! factory runs under SCHED_IDLE, and its stages inherit that until the helper takes one.
//!
//! The factory is what an exec'd stage is before its plan: a fresh, single-threaded root
//! process with an empty environment, `/` as working directory, /dev/null on fds 0-2 and no
//! other descriptor but its socketpair to the helper. It never starts a thread, reads no
//! configuration beyond its arguments and holds no credential, so each fork of it is as clean
//! as a new exec.
//!
//! Protocol on the socketpair (wire.rs): the helper sends [`ToFactory::ForkOne`]; the factory
//! forks a stage and answers with one [`FromFactory`] carrying the helper's end of the
//! stage's own socketpair and a pidfd of the stage. The stage is the factory's child (the
//! factory reaps it); the helper follows it through the pidfd. The factory exits when the
//! helper's end closes; idle stages exit when theirs closes.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use super::stage;
use super::wire::{self, FromFactory, Preparation, ToFactory};

/// Entry point of `mupilot-switch stage-factory --network MODE --tmp-size-bytes N`. Exit code
/// 0 when the helper closed the channel, 2 when the start failed.
pub fn factory_main() -> i32 {
    let Some(mut channel) = stage::channel_from_stdin() else {
        return 2;
    };
    let args: Vec<String> = std::env::args().skip(2).collect();
    // `--idle` is implied: everything the factory does is done before anyone needs it.
    let prep = match Preparation::parse(&args) {
        Ok((prep, _)) => prep,
        Err(e) => {
            let _ = wire::send(&channel, &FromFactory::Failed { error: e }, &[]);
            return 2;
        }
    };
    let own_pid_ns = match stage::open_own_pid_ns() {
        Ok(fd) => fd,
        Err(e) => {
            let _ = wire::send(
                &channel,
                &FromFactory::Failed {
                    error: e.to_string(),
                },
                &[],
            );
            return 2;
        }
    };
    let idle = super::SCHED_PRIORITY_0;
    // SAFETY: sched_setscheduler on this (single-threaded) process with a sched_param on our
    // stack; no memory is shared.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
    // The stages forked and not yet reaped, each with our copy of its pidfd: readable once
    // it exited, then reaped here.
    let mut children: Vec<(Pid, OwnedFd)> = Vec::new();
    loop {
        let (request, ended) = {
            let mut fds = vec![PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                children
                    .iter()
                    .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 2,
                Ok(_) => {}
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let ended: Vec<usize> = (1..fds.len()).filter(|i| ready(&fds[*i])).collect();
            (ready(&fds[0]), ended)
        };
        for i in ended.into_iter().rev() {
            let (pid, _) = children.swap_remove(i - 1);
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
        if !request {
            continue;
        }
        match wire::recv::<ToFactory>(&mut channel) {
            Ok((ToFactory::ForkOne, _)) => {}
            // Closed: the helper is gone or no longer wants stages. Stages already forked end
            // on their own when their channels close. Anything else: not our helper.
            Err(_) => return 0,
        }
        match fork_stage(&prep, &own_pid_ns) {
            Ok((pid, ours, pidfd)) => {
                let sent = wire::send(
                    &channel,
                    &FromFactory::Forked { pid: pid.as_raw() },
                    &[ours.as_raw_fd(), pidfd.as_raw_fd()],
                );
                children.push((pid, pidfd));
                // Our copy of the stage's channel closes here: the helper holds the only one.
                drop(ours);
                if sent.is_err() {
                    return 2;
                }
            }
            Err(error) => {
                let reply = FromFactory::Failed { error };
                if wire::send(&channel, &reply, &[]).is_err() {
                    return 2;
                }
            }
        }
    }
}

/// Forks one stage ([`stage::fork_stage`]: pid 1 of its own pid namespace) with a socketpair
/// of its own. Returns the stage's pid, the helper's end and a pidfd.
fn fork_stage(prep: &Preparation, own_pid_ns: &OwnedFd) -> Result<(Pid, OwnedFd, OwnedFd), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair for a stage: {e}"))?;
    let child = stage::fork_stage(&theirs, prep, own_pid_ns, false).map_err(|e| e.to_string())?;
    drop(theirs);
    let pidfd = pidfd_open(child).map_err(|e| {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        format!("pidfd_open of stage {child}: {e} (Linux >= 5.3 needed)")
    })?;
    Ok((child, OwnedFd::from(ours), pidfd))
}

/// pidfd_open(2) of our own child: it cannot be reaped (so its pid cannot be reused) before we
/// wait for it, so the pidfd refers to exactly this process. (pidfds are close-on-exec.)
fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw())
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}
