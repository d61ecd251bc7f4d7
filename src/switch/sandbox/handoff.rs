//! Short waits between the helper and a stage. Each launch passes a few bytes between the two
//! processes that are due within a fraction of a millisecond: the plan after a wake-up frame,
//! and the cgroup gate. A process that sleeps in the read is woken on another CPU, which costs
//! 0.05-0.25 ms on a virtual machine (scripts/bench-analysis.md), more than the wait itself;
//! so the stage keeps its CPU for a bounded time first. (Not the helper while it waits for
//! `started`: its thread then holds the CPU the stage and the payload would have used, which
//! measured slower.)

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long a waiter polls before it sleeps. Bounded per launch, and the poll yields between
/// tries, so anything else that wants this CPU gets it.
pub(crate) const SPIN_BUDGET: Duration = Duration::from_millis(1);

/// Returns once `fd` is readable or closed (or in error): true; or after [`SPIN_BUDGET`]:
/// false. The caller's read then takes the bytes or blocks for them.
pub(crate) fn spin_until_readable(fd: BorrowedFd<'_>) -> bool {
    let until = Instant::now() + SPIN_BUDGET;
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    // Readiness, not elapsed time, is asserted: a slow (emulated) CPU may take longer than the
    // budget for one poll.
    #[test]
    fn ends_when_bytes_are_there_and_gives_up_after_the_budget_when_not() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert!(!spin_until_readable(b.as_fd()));
        assert!(t.elapsed() >= SPIN_BUDGET);
        a.write_all(b"x").unwrap();
        assert!(spin_until_readable(b.as_fd()));
    }

    #[test]
    fn a_closed_peer_ends_the_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(spin_until_readable(b.as_fd()));
    }
}
