//! The payload's network namespace connected to the node's network (`network = "pasta"`, and
//! the default `ipc_fallback` where Landlock cannot scope abstract sockets, scope.rs), by
//! `pasta` (package passt): it creates a tap device in the namespace, copies the node's
//! addresses and routes into it, and carries the payload's traffic out as ordinary TCP, UDP and
//! ICMP sockets of its own process, which runs as the payload's account (so per-uid firewall
//! rules keep holding), in the payload's cgroup (its CPU and memory are the payload's, P7) and
//! pid namespace (the stage's `kill(-1)` at the end takes it along, P10).
//!
//! Two moments, like scope.rs:
//!
//! 1. The stage, before its plan (prepare.rs, [`Launcher::fork`]): forks a *launcher* while it
//!    is still in the host's network and mount namespaces and before it gives up what later
//!    execs could gain (securebits, bounding set), because pasta needs root's capabilities to
//!    enter the namespace and make the tap device. The launcher closes every descriptor but its
//!    socket and waits.
//! 2. The stage, with the plan, after joining the payload cgroup ([`Launcher::connect`]):
//!    sends the account and the namespace; the launcher joins the cgroup and execs pasta, which
//!    drops to the account (`--runas`); its setup process exits 0 once the namespace is
//!    connected (its daemon carries on), and only then does the stage start the payload.
//!
//! The helper checks once, at start, that pasta and a usable /dev/net/tun exist ([`check`]).
//! Must not configure any namespace itself (pasta does) and adds nothing to the other network
//! modes.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::step::StageError;
use super::wire;

/// Where pasta is looked for (Debian 12 and EL9 install it in /usr/bin).
pub const PASTA_PATHS: [&str; 2] = ["/usr/bin/pasta", "/usr/local/bin/pasta"];

/// The tun clone device pasta opens, as the payload's account, to create the tap device.
pub const TUN: &str = "/dev/net/tun";

/// `SECBIT_NO_SETUID_FIXUP` (linux/securebits.h): a setuid away from 0 keeps capabilities.
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// Longest time pasta may take to connect a namespace (it takes tens of milliseconds).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why payloads of this node cannot get a pasta network; each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "pasta not found (looked for {paths}): install the passt package (apt-get install \
         passt, dnf install passt)"
    )]
    NoPasta { paths: String },
    #[error("{path}: {source}; load the tun module (modprobe tun)")]
    Tun {
        path: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}: pasta runs as the payload's account and must open it; \
         udev makes it 0666 (its 50-udev-default.rules; without udev: chmod 0666 {path})"
    )]
    TunMode { path: &'static str, mode: u32 },
}

/// The pasta program of this node.
pub fn pasta() -> Result<PathBuf, NetError> {
    PASTA_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| NetError::NoPasta {
            paths: PASTA_PATHS.join(", "),
        })
}

/// Checked once when the helper starts (and by check-config): the pasta program and a tun
/// device every account can open.
pub fn check() -> Result<PathBuf, NetError> {
    let exe = pasta()?;
    let mode = std::fs::metadata(TUN)
        .map_err(|source| NetError::Tun { path: TUN, source })?
        .permissions()
        .mode();
    if mode & 0o006 != 0o006 {
        return Err(NetError::TunMode {
            path: TUN,
            mode: mode & 0o7777,
        });
    }
    Ok(exe)
}

/// What the stage sends its launcher, with the payload's network namespace attached.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    uid: u32,
    gid: u32,
    /// The files the launcher writes "0" to, to join the payload cgroup (`Located::join_files`).
    join: Vec<PathBuf>,
}

/// The stage's end of its launcher: a child of the stage (pid namespace of the payload), still
/// in the host's network and mount namespaces, with root's capabilities.
pub(super) struct Launcher {
    pid: Pid,
    channel: UnixStream,
}

impl Launcher {
    /// Forks the launcher. Call from the single-threaded stage before it unshares the network
    /// and mount namespaces and before `limit_future_execs`.
    pub(super) fn fork() -> Result<Launcher, StageError> {
        let s = "fork the network launcher";
        let exe = pasta().map_err(|e| StageError::new(s, e.to_string()))?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| StageError::new(s, e))?;
        // SAFETY: the stage is single-threaded (stage/mod.rs), so the child may do anything.
        match unsafe { fork() }.map_err(|e| StageError::new(s, e))? {
            ForkResult::Child => {
                drop(ours);
                let code = launcher_main(theirs, &exe);
                // SAFETY: _exit skips the stage's atexit handlers and buffers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => Ok(Launcher {
                pid: child,
                channel: ours,
            }),
        }
    }

    /// Has the launcher exec pasta on `netns` as `uid`:`gid` in the payload cgroup (`join`),
    /// and waits until pasta connected the namespace: its setup process (the launcher,
    /// exec'd) exits 0 once the tap device, addresses and routes are in place and its daemon
    /// runs. Its error messages come back on the channel.
    pub(super) fn connect(
        self,
        netns: &OwnedFd,
        uid: u32,
        gid: u32,
        join: Vec<PathBuf>,
    ) -> Result<(), StageError> {
        let s = "connect the network (pasta)";
        let mut channel = self.channel;
        wire::send(&channel, &Request { uid, gid, join }, &[netns.as_raw_fd()])
            .map_err(|e| StageError::new(s, e.to_string()))?;
        // pasta's stderr is this channel: EOF once its setup process is gone (its daemon puts
        // /dev/null there).
        let _ = channel.set_read_timeout(Some(READY_TIMEOUT));
        let mut said = Vec::new();
        let read = (&mut channel).take(4096).read_to_end(&mut said);
        if read.is_err() {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        }
        let status = waitpid(self.pid, None);
        let said = String::from_utf8_lossy(&said).trim().replace('\n', "; ");
        match (read, status) {
            (Ok(_), Ok(WaitStatus::Exited(_, 0))) => Ok(()),
            (Err(e), _) => Err(StageError::new(
                s,
                format!(
                    "no answer within {} s ({e}); killed. {said}",
                    READY_TIMEOUT.as_secs()
                ),
            )),
            (_, status) => Err(StageError::new(s, format!("pasta: {status:?}: {said}"))),
        }
    }
}

/// The launcher: waits for the stage's [`Request`], joins the payload cgroup, blocks the
/// signals the helper sends all of a payload's processes (an operator's SIGUSR1 to the payload
/// must not end its network; SIGKILL at the end still does) and execs pasta. Returns only on
/// failure (its exit code); a stage that closes the channel without a request (an idle stage
/// no longer needed) ends it quietly.
fn launcher_main(mut channel: UnixStream, exe: &Path) -> i32 {
    let keep = channel.as_raw_fd();
    // SAFETY: close_range(2) only closes descriptors; no Rust object of ours owns any of them
    // but `channel` (the stage's objects are never used in this process).
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
    }
    let (req, fds) = match wire::recv::<Request>(&mut channel) {
        Ok(r) => r,
        Err(_) => return 0,
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        let _ = std::io::Write::write_all(&mut &channel, format!("{what}: {e}").as_bytes());
        1
    };
    let Some(netns) = fds.into_iter().next() else {
        return fail("launcher", &"no network namespace came with the request");
    };
    for f in &req.join {
        if let Err(e) = std::fs::write(f, "0") {
            return fail(&format!("join {}", f.display()), &e);
        }
    }
    // An idle stage forked us under SCHED_IDLE: pasta carries the payload's traffic at normal
    // priority (root may leave SCHED_IDLE; pasta keeps no capability for it later).
    let normal = super::SCHED_PRIORITY_0;
    // SAFETY: sched_setscheduler on ourselves with a sched_param on our stack.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) } != 0 {
        return fail("reset scheduling policy", &std::io::Error::last_os_error());
    }
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(sig);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        return fail("block signals", &e);
    }
    // Rust ignores SIGPIPE and an ignored signal stays ignored across exec; pasta refuses to
    // start unless SIGPIPE was at its default ("Couldn't install signal handlers").
    let default = nix::sys::signal::SigHandler::SigDfl;
    // SAFETY: restoring a default disposition installs no handler of ours.
    if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, default) } {
        return fail("reset SIGPIPE", &e);
    }
    // pasta (as packaged in Debian 12) drops to the account before it enters the namespace
    // and creates the tap device there, and expects to keep the capabilities it needs for
    // that (it then drops all but CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_NET_BIND_SERVICE
    // itself): without SECBIT_NO_SETUID_FIXUP the kernel clears them at its setuid and the
    // setns fails with EPERM. Not locked: pasta's own later changes stay possible.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) } != 0 {
        return fail("securebits", &std::io::Error::last_os_error());
    }
    // pasta's stderr is the channel (the stage reads its errors); the namespace is inherited.
    // SAFETY: dup2 and fcntl on descriptors this process owns; no memory is involved.
    unsafe {
        if libc::dup2(keep, 2) < 0 || libc::fcntl(netns.as_raw_fd(), libc::F_SETFD, 0) != 0 {
            return fail("launcher", &std::io::Error::last_os_error());
        }
    }
    let args = args(exe, req.uid, req.gid, netns.as_raw_fd());
    let Ok(args) = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return fail("launcher", &"NUL in pasta's arguments");
    };
    let env: [&std::ffi::CStr; 0] = [];
    let e = nix::unistd::execve(&args[0], &args, &env).unwrap_err();
    fail(&format!("exec {}", exe.display()), &e)
}

/// pasta's command line: connect `netns` (inherited descriptor) and bring up its interfaces
/// (`--config-net`), drop to the account (`--runas`); outbound TCP, UDP and ICMP to wherever
/// the node reaches; the node's loopback services at the namespace's own loopback (`-T auto -U
/// auto`: TCP ports rescanned every second, UDP ports as they are when pasta starts); nothing
/// inbound (`-t none -u none`); the gateway address is the real gateway (`--no-map-gw`), not
/// the node's loopback.
fn args(exe: &Path, uid: u32, gid: u32, netns: RawFd) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![exe.as_os_str().to_owned()];
    for s in [
        "--config-net",
        "--quiet",
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "auto",
        "-U",
        "auto",
        "--runas",
    ] {
        a.push(OsStr::new(s).to_owned());
    }
    a.push(format!("{uid}:{gid}").into());
    a.push("--netns".into());
    a.push(format!("/proc/self/fd/{netns}").into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_file_and_the_fix() {
        let e = NetError::TunMode {
            path: TUN,
            mode: 0o600,
        }
        .to_string();
        assert!(e.contains("/dev/net/tun has mode 0600"), "{e}");
        assert!(e.contains("chmod 0666 /dev/net/tun"), "{e}");
        let e = NetError::NoPasta {
            paths: PASTA_PATHS.join(", "),
        }
        .to_string();
        assert!(
            e.contains("/usr/bin/pasta") && e.contains("install the passt package"),
            "{e}"
        );
    }

    #[test]
    fn pasta_runs_as_the_account_on_the_given_namespace_with_nothing_inbound() {
        let a: Vec<String> = args(Path::new("/usr/bin/pasta"), 5001, 5002, 7)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(
            joined.starts_with("/usr/bin/pasta --config-net"),
            "{joined}"
        );
        for want in [
            "--runas 5001:5002",
            "--netns /proc/self/fd/7",
            "-t none -u none",
            "-T auto -U auto",
            "--no-map-gw",
        ] {
            assert!(joined.contains(want), "{want} in {joined}");
        }
    }
}
