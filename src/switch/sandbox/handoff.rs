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

/// Returns once `fd` is readable or closed (or in error), or after [`SPIN_BUDGET`]; the
/// caller's read then takes the bytes or blocks for them.
pub(crate) fn spin_until_readable(fd: BorrowedFd<'_>) {
    let until = Instant::now() + SPIN_BUDGET;
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) || Instant::now() >= until {
            return;
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

    #[test]
    fn returns_at_once_when_bytes_are_there_and_after_the_budget_when_not() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        spin_until_readable(b.as_fd());
        let waited = t.elapsed();
        assert!(waited >= SPIN_BUDGET, "gave up after {waited:?}");
        a.write_all(b"x").unwrap();
        let t = Instant::now();
        spin_until_readable(b.as_fd());
        assert!(t.elapsed() < SPIN_BUDGET);
        drop(a);
        drop(b);
    }

    #[test]
    fn a_closed_peer_ends_the_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let t = Instant::now();
        spin_until_readable(b.as_fd());
        assert!(t.elapsed() < SPIN_BUDGET);
    }
}
