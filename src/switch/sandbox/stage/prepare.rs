//! The stage's preparation, done before any plan (an idle stage does it under SCHED_IDLE):
//! nothing any exec could gain, new mount, IPC, UTS (and network) namespaces, `/` slave,
//! private tmpfs mounts, a /proc of the pid namespace, `lo` up for loopback networks, the
//! supervised signals on a signalfd, the Landlock ruleset. What it keeps of the host is
//! [`Host`].
//!
//! Must not depend on a payload: nothing here sees a plan, an account or a descriptor of the
//! pilot's, so an idle stage holds nothing worth taking.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};

use super::super::net::Launcher;
use super::super::step::{step, StageError};
use super::super::wire::Preparation;
use super::super::NetworkMode;
use super::StepResult;

/// What the stage keeps of the host after [`prepare`] moved it into the payload's
/// namespaces: the host's /proc (where `self` is the stage's host pid and its children have
/// host pids) and mount namespace (to clean up without the payload's mounts after the
/// helper died). Both close-on-exec.
pub(super) struct Host {
    pub(super) proc: OwnedFd,
    pub(super) mount_ns: OwnedFd,
    /// The stage's own cgroups (the helper's, inherited): joins into them are skipped.
    pub(super) cgroups: Vec<(Vec<String>, String)>,
    /// The supervised signals ([`supervised_signals`]), made ready before the plan.
    pub(super) signals: nix::sys::signalfd::SignalFd,
    /// The Landlock ruleset the payload's process restricts itself with (scope.rs), made
    /// before the plan so that process only makes the one system call; close-on-exec.
    pub(super) landlock: Option<OwnedFd>,
    /// `network = "pasta"`: the payload's network namespace (close-on-exec) and the launcher
    /// that connects it once the plan names the account (net.rs); taken by `run`.
    pub(super) pasta: std::cell::Cell<Option<(OwnedFd, Launcher)>>,
}

/// The signals the stage forwards to the payload, and SIGCHLD; blocked from the start (so the
/// kernel queues them even for a namespace's pid 1) and read from a signalfd.
fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Builds the [`Preparation`], as pid 1 of the stage's fresh pid namespace: nothing any later
/// exec could gain (securebits, bounding set); the host's /proc and mount namespace and the
/// stage's cgroups kept ([`Host`]); new mount, IPC, UTS (and, unless `network = "host"`, network) namespaces; `/`
/// recursively slave; private tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock; the IPC
/// namespace's own /dev/mqueue; a /proc of the pid namespace; `lo` up for `network =
/// "loopback"` and `"pasta"` (whose namespace it keeps for the helper); the supervised
/// signals blocked, into a signalfd. What depends on the payload (the scratch
/// view, the hostname, the cgroup) comes after the plan.
pub(super) fn prepare(prep: &Preparation) -> StepResult<Host> {
    let open = |path: &str, flags: nix::fcntl::OFlag| {
        let fd = step(
            format!("open {path}"),
            nix::fcntl::open(
                path,
                flags | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ),
        )?;
        // SAFETY: `fd` was just opened and is owned here only.
        Ok::<_, StageError>(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // `network = "pasta"`: pasta's launcher first, while this process is still in the host's
    // network and mount namespaces and its execs still get root's capabilities (net.rs).
    let launcher = match prep.network {
        NetworkMode::Pasta => Some(Launcher::fork()?),
        _ => None,
    };
    // What any later exec may gain (securebits, bounding set): nothing. Done here, off the
    // launch path; the stage keeps its own capabilities.
    super::super::privs::limit_future_execs()?;
    // Still the host's: the mounts below are this stage's own.
    let host = Host {
        proc: open(
            "/proc",
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        )?,
        mount_ns: open("/proc/self/ns/mnt", nix::fcntl::OFlag::O_RDONLY)?,
        cgroups: step(
            "read /proc/self/cgroup",
            super::super::cgroup::own_cgroups(),
        )?,
        signals: {
            let set = supervised_signals();
            step("block signals", set.thread_block())?;
            step(
                "signalfd",
                nix::sys::signalfd::SignalFd::with_flags(
                    &set,
                    nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
                ),
            )?
        },
        landlock: match prep.landlock {
            true => Some(step(
                "create the Landlock ruleset",
                super::super::scope::ruleset(),
            )?),
            false => None,
        },
        pasta: std::cell::Cell::new(None),
    };
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if prep.network != NetworkMode::Host {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    step("unshare namespaces", unshare(flags))?;
    // Nothing mounted from here on may propagate back to the host: slave before the first mount.
    step(
        "make / recursively slave",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        ),
    )?;
    // Private, size-limited /tmp, /var/tmp, /dev/shm (P8: no shared temporary files), and
    // /run/lock where it is world-writable (1777 on Debian-like nodes, /var/lock points to
    // it): shared, it is a drop box between payloads that keeps their files after teardown.
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let opts = format!("size={},mode=1777", prep.tmp_size_bytes);
    for dir in ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"] {
        let shared = dir != "/run/lock"
            || std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
        if shared && Path::new(dir).is_dir() {
            step(
                format!("mount tmpfs on {dir}"),
                mount(
                    Some("tmpfs"),
                    dir,
                    Some("tmpfs"),
                    nosuid,
                    Some(opts.as_str()),
                ),
            )?;
        }
    }
    // POSIX message queues belong to the IPC namespace; show only ours.
    if Path::new("/dev/mqueue").is_dir() {
        step(
            "mount mqueue on /dev/mqueue",
            mount(
                Some("mqueue"),
                "/dev/mqueue",
                Some("mqueue"),
                nosuid | MsFlags::MS_NOEXEC,
                None::<&str>,
            ),
        )?;
    }
    // A /proc that shows only this pid namespace.
    step(
        "mount /proc",
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    if matches!(prep.network, NetworkMode::Loopback | NetworkMode::Pasta) {
        step("bring lo up", loopback_up())?;
    }
    if let Some(launcher) = launcher {
        let netns = open("/proc/self/ns/net", nix::fcntl::OFlag::O_RDONLY)?;
        host.pasta.set(Some((netns, launcher)));
    }
    Ok(host)
}

/// `struct ifreq` with the `ifr_flags` member (40 bytes on Linux).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned only here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq; `req` has the kernel's layout
    // (name[16], short flags, padded to sizeof(struct ifreq)) and lives across both calls.
    // (`as _`: the request is a c_ulong for glibc, a c_int for musl, which the pilot uses.)
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
