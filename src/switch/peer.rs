//! The process at the other end of a pilot connection, held as a pidfd, and the cgroups it
//! had at hello.
//!
//! A pid number is not an identity: a pilot that connects from a short-lived child and lets
//! the pid be reused would otherwise have its payloads placed under another process's cgroup
//! (P7). So the helper holds the connecting process itself: SO_PEERPIDFD (Linux >= 6.5) or,
//! on older kernels, pidfd_open(2) of the SO_PEERCRED pid at accept, checked to be the
//! caller's uid and to have started before the accept. Every read of `/proc/PID/...` is
//! followed by a check through the pidfd that the process still exists (it is not reaped, so
//! its pid was not reused during the read).
//!
//! Must not read anything about the peer through its pid without that check.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt};
use serde::Deserialize;

use super::sandbox::cgroup::PilotCgroups;

/// SO_PEERPIDFD from <asm-generic/socket.h> (not in the libc crate's Linux API yet).
const SO_PEERPIDFD: libc::c_int = 77;

/// How the helper obtains the peer's pidfd (`peer_pidfd` in switch.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PidfdSource {
    /// SO_PEERPIDFD, or pidfd_open when the kernel has no SO_PEERPIDFD (before 6.5).
    #[default]
    Auto,
    /// Always pidfd_open with the uid and start-time checks (the older kernels' path).
    PidfdOpen,
}

/// Why a caller could not be identified or is no longer the process that connected. The
/// caller's fault (it connected from a process that went away), never the helper's.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the caller's credentials: {0}")]
    Credentials(nix::Error),
    #[error("cannot hold the calling process (pid {pid}): {reason}")]
    Pidfd { pid: i32, reason: String },
    #[error("the process that connected (pid {pid}) has exited; a pilot must keep the connection in the process that opened it (payload cgroups go below that process's cgroup)")]
    Gone { pid: i32 },
    #[error("the process that connected (pid {pid}) now runs as uid {now}, not as the caller's uid {uid}; connect again from the pilot process")]
    UidChanged { pid: i32, uid: u32, now: u32 },
    #[error("pid {pid} started after this connection was accepted: it is not the process that connected (its pid was reused); connect from the pilot process itself")]
    StartedLater { pid: i32 },
    #[error("cannot read the cgroups of the calling process (pid {pid}): {reason}")]
    Cgroups { pid: i32, reason: String },
}

/// The connecting process: its uid and pid as the kernel recorded them at connect, and a
/// pidfd of it.
#[derive(Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
    pidfd: OwnedFd,
}

impl Peer {
    /// Identifies the process that connected `stream`, accepted at `accepted_ticks` (the
    /// boot-time clock in clock ticks, [`boot_ticks_now`]).
    pub fn of(
        stream: &UnixStream,
        source: PidfdSource,
        accepted_ticks: u64,
    ) -> Result<Peer, PeerError> {
        let creds = getsockopt(stream, sockopt::PeerCredentials).map_err(PeerError::Credentials)?;
        let (uid, pid) = (creds.uid(), creds.pid());
        let pidfd = match source {
            PidfdSource::Auto => match peer_pidfd(stream) {
                Ok(fd) => Some(fd),
                // ENOPROTOOPT: a kernel before 6.5.
                Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => None,
                // The peer was reaped before the accept.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(PeerError::Gone { pid })
                }
                Err(e) => {
                    return Err(PeerError::Pidfd {
                        pid,
                        reason: format!("SO_PEERPIDFD: {e}"),
                    })
                }
            },
            PidfdSource::PidfdOpen => None,
        };
        let peer = match pidfd {
            Some(pidfd) => Peer { uid, pid, pidfd },
            None => {
                let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
                    Some(libc::ESRCH) => PeerError::Gone { pid },
                    _ => PeerError::Pidfd {
                        pid,
                        reason: format!("pidfd_open: {e} (Linux >= 5.3 needed)"),
                    },
                })?;
                let peer = Peer { uid, pid, pidfd };
                // The pid may have been reused between connect and pidfd_open: the process
                // held now must be the caller's uid and older than the accept.
                let started = peer.read_proc(start_ticks)?;
                if started > accepted_ticks {
                    return Err(PeerError::StartedLater { pid });
                }
                peer.check_uid()?;
                peer
            }
        };
        Ok(peer)
    }

    /// True while the process exists (running or not yet reaped): its pid is still its own.
    pub fn alive(&self) -> bool {
        // SAFETY: pidfd_send_signal with signal 0 (a permission and existence check only) on
        // a pidfd we own, no siginfo; nothing is delivered. (Raw: rustix's Signal cannot be
        // 0.)
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }

    /// Reads something about the process through /proc/PID, then confirms the pidfd's process
    /// still exists, so what was read was that process's.
    fn read_proc<T>(&self, read: impl FnOnce(i32) -> std::io::Result<T>) -> Result<T, PeerError> {
        let got = read(self.pid);
        if !self.alive() {
            return Err(PeerError::Gone { pid: self.pid });
        }
        got.map_err(|e| PeerError::Pidfd {
            pid: self.pid,
            reason: e.to_string(),
        })
    }

    /// The process's cgroups now (at hello): payloads of this connection go below them.
    pub fn pin_cgroups(&self) -> Result<PilotCgroups, PeerError> {
        let got = PilotCgroups::read(self.pid);
        if !self.alive() {
            return Err(PeerError::Gone { pid: self.pid });
        }
        got.map_err(|e| PeerError::Cgroups {
            pid: self.pid,
            reason: e.to_string(),
        })
    }

    /// Before each launch: the process that connected still exists and still runs as the
    /// caller's uid.
    pub fn check_still_caller(&self) -> Result<(), PeerError> {
        if !self.alive() {
            return Err(PeerError::Gone { pid: self.pid });
        }
        self.check_uid()
    }

    fn check_uid(&self) -> Result<(), PeerError> {
        let now = self.read_proc(effective_uid)?;
        if now != self.uid {
            return Err(PeerError::UidChanged {
                pid: self.pid,
                uid: self.uid,
                now,
            });
        }
        Ok(())
    }
}

/// The boot-time clock in clock ticks, the unit of a process's start time in /proc/PID/stat.
pub fn boot_ticks_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec on our stack.
    let t = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        u64::MAX
    };
    // Rounded up: a process that started in the same tick as the accept still passes.
    t.div_ceil(1_000_000_000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf with a constant name.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

fn peer_pidfd(stream: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a c_int on our stack.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel installed a new pidfd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
fn start_ticks(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("malformed /proc/PID/stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("no start time in /proc/PID/stat"))
}

/// The effective uid on the `Uid:` line of /proc/PID/status.
fn effective_uid(pid: i32) -> std::io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| std::io::Error::other("no Uid line in /proc/PID/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_identified_by_both_sources_and_older_than_now() {
        let (a, _b) = UnixStream::pair().unwrap();
        let now = boot_ticks_now();
        for source in [PidfdSource::Auto, PidfdSource::PidfdOpen] {
            let p = Peer::of(&a, source, now).unwrap();
            assert_eq!(p.pid as u32, std::process::id());
            assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
            assert!(p.alive());
            p.check_still_caller().unwrap();
            assert!(!p.pin_cgroups().unwrap().is_empty());
        }
        // An accept "before" this process started: the fallback refuses it as a reused pid.
        let e = Peer::of(&a, PidfdSource::PidfdOpen, 0).unwrap_err();
        assert!(matches!(e, PeerError::StartedLater { .. }), "{e}");
        assert!(start_ticks(std::process::id() as i32).unwrap() <= now);
    }

    #[test]
    fn a_reaped_peer_is_gone() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let pidfd = pidfd_open(pid).unwrap();
        let p = Peer { uid: 0, pid, pidfd };
        let mut child = child;
        child.wait().unwrap();
        assert!(!p.alive());
        assert!(matches!(
            p.check_still_caller(),
            Err(PeerError::Gone { .. })
        ));
        assert!(matches!(p.pin_cgroups(), Err(PeerError::Gone { .. })));
    }
}
