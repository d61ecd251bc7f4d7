//! The payload's stdin, stdout and stderr: the caller's own descriptors when they are pipes or
//! regular files (passed as they are, as gLExec's exec'd command inherited them), otherwise a
//! pipe this process relays to and from the caller's descriptor. A terminal or a socket never
//! reaches the payload: a terminal lets its holder inject input (TIOCSTI) and read what others
//! type, a socket is a channel to whoever is on the other end; the helper refuses both.

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

/// What goes to the helper for one of fds 0-2, and the relay that feeds or drains it.
pub struct Stream {
    /// The descriptor passed to the helper.
    pub pass: OwnedFd,
    /// Copies between our descriptor and the pipe; joined for stdout/stderr before exiting.
    pub relay: Option<JoinHandle<()>>,
}

/// Whether `fd` can be passed as it is: a pipe or regular file open for reading (stdin) or
/// writing (stdout, stderr).
fn passable(fd: RawFd, writing: bool) -> bool {
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return false;
    };
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFIFO {
        return false;
    }
    let Ok(flags) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) else {
        return false;
    };
    let mode = nix::fcntl::OFlag::from_bits_truncate(flags) & nix::fcntl::OFlag::O_ACCMODE;
    if writing {
        mode != nix::fcntl::OFlag::O_RDONLY
    } else {
        mode != nix::fcntl::OFlag::O_WRONLY
    }
}

/// The stream for our fd `fd` (0, 1 or 2); `None` when this process has no such descriptor.
pub fn stream(fd: RawFd) -> std::io::Result<Option<Stream>> {
    let writing = fd != 0;
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Ok(None);
    }
    if passable(fd, writing) {
        // SAFETY: fd 0-2 is open (checked above) and stays open for this process's life; the
        // borrow only lasts for the duplication.
        let own = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        return Ok(Some(Stream {
            pass: own,
            relay: None,
        }));
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: as above; the duplicate is ours and closes with the relay.
    let ours = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let (pass, relay) = if writing {
        (w, spawn_copy(r, ours)?)
    } else {
        (r, spawn_copy(ours, w)?)
    };
    Ok(Some(Stream {
        pass,
        relay: Some(relay),
    }))
}

/// Copies `from` to `to` until end of file or a failed write, in a thread.
fn spawn_copy(from: OwnedFd, to: OwnedFd) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("glexec-relay".into())
        .spawn(move || {
            let mut from = std::fs::File::from(from);
            let mut to = std::fs::File::from(to);
            let mut buf = [0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        })
}
