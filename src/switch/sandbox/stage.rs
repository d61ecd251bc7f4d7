//! The stage process (`mupilot-switch stage`): a fresh, single-threaded root process that
//! builds one payload's sandbox and execs it. Three processes, each with one job:
//!
//! 1. **stage** (host namespaces): reads the plan, two gates and the payload's stdout/stderr
//!    from fd 0 (a socketpair to the helper), unshares the pid namespace for its children,
//!    forks the init, relays the init's events to the helper and reports how the init ended.
//! 2. **init** (pid 1 of the new pid namespace): unshares mount, IPC, UTS (and network)
//!    namespaces, mounts /proc, private tmpfs and the scratch view, waits at the cgroup gate
//!    and joins the payload cgroup, forks the payload, then reaps, forwards signals and exits
//!    when the payload's main process exits (which kills the whole pid namespace).
//! 3. **payload**: setsid, fd hygiene, rlimits, identity switch, capability drop,
//!    no_new_privs, bundle unpack as the account, waits at the exec gate, exec.
//!
//! The gates let the helper work in parallel with the stage: it creates the cgroup while the
//! init builds the namespaces, and writes the start record while the payload drops its
//! privileges; the payload's own code never runs before both are done.
//!
//! Must never be entered from a multi-threaded process: `fork` here relies on being the only
//! thread. Nothing here talks to the network or reads credentials.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::{Account, NetworkMode};

/// Everything the stage needs; no credentials, no secrets (the bundle is the payload's input).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StagePlan {
    pub payload_id: String,
    pub account: Account,
    pub argv: Vec<String>,
    /// The payload's complete environment, computed by the helper.
    pub env: Vec<(String, String)>,
    /// Files the single-threaded init writes "0" to, to join the payload cgroup
    /// (`Cgroup::join_files`); their directories are the payload's cgroup directories.
    pub join_files: Vec<PathBuf>,
    pub scratch_root: PathBuf,
    pub scratch: PathBuf,
    pub tmp_size_bytes: u64,
    pub network: NetworkMode,
    pub nofile: u64,
    pub core_bytes: u64,
    pub allow_user_namespaces: bool,
    /// tar.gz, base64.
    pub bundle_b64: Option<String>,
}

/// One JSON line from the stage to the helper.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum StageEvent {
    /// The payload was exec'd. `pid` is its host pid, `init_pid` the host pid of the init.
    Started { pid: i32, init_pid: i32 },
    /// A setup step failed; the payload did not run.
    Failed { step: String, error: String },
    /// The payload's main process ended.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

type StepResult<T> = Result<T, (String, String)>;

fn step<T, E: std::fmt::Display>(name: &str, r: Result<T, E>) -> StepResult<T> {
    r.map_err(|e| (name.to_owned(), e.to_string()))
}

fn send(out: &mut File, ev: &StageEvent) {
    if let Ok(mut line) = serde_json::to_vec(ev) {
        line.push(b'\n');
        // The helper gone means nobody listens; the cgroup kill cleans up after us.
        let _ = out.write_all(&line);
    }
}

/// Entry point of `mupilot-switch stage`. Exit code 0 when the plan was carried out (the
/// payload's own status travels as an [`StageEvent::Exit`] line), 1 on a setup failure, 2 when
/// no plan could be read.
pub fn stage_main() -> i32 {
    // Whatever the helper leaked to us beyond stdin/stdout/stderr (a descriptor of another
    // payload received without CLOEXEC, say) is closed before anything else happens.
    if fds_from_3(false).is_err() {
        return 2;
    }
    // fd 0 is our socket to the helper. Move it off 0 (close-on-exec), and put /dev/null on 0,
    // so no descendant inherits the channel.
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on fd 0, which the helper gave us; no memory is involved.
    let sock = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if sock < 0 {
        return 2;
    }
    // SAFETY: `sock` was just returned by fcntl and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    match File::open("/dev/null") {
        Ok(null) => {
            // SAFETY: dup2 of two valid descriptors; fd 0 is replaced atomically.
            if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
                return 2;
            }
        }
        Err(_) => return 2,
    }
    // One frame: the plan, the two gates, and the payload's stdout and stderr (none: the
    // /dev/null the helper put on 1 and 2 when it spawned us stays).
    let mut channel = std::os::unix::net::UnixStream::from(sock);
    let received = crate::protocol::switch_wire::read_frame::<StagePlan>(&mut channel);
    let mut out = File::from(OwnedFd::from(channel));
    let (plan, gates) = match received {
        Ok((plan, fds)) => {
            if !(fds.len() == 2 || fds.len() == 4) {
                send(
                    &mut out,
                    &StageEvent::Failed {
                        step: "read plan".into(),
                        error: format!("{} descriptors came with the plan; expected 2 gates and 0 or 2 outputs", fds.len()),
                    },
                );
                return 2;
            }
            let mut fds = fds.into_iter();
            let (Some(cgroup), Some(exec)) = (fds.next(), fds.next()) else {
                return 2;
            };
            for (fd, target) in fds.zip([1, 2]) {
                // SAFETY: dup2 of a descriptor we own onto 1 or 2; no memory is involved. The
                // copy on 1/2 is not close-on-exec (the payload writes there); ours (received
                // close-on-exec) closes at the end of this loop iteration.
                if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                    return 2;
                }
            }
            (
                plan,
                Gates {
                    cgroup: File::from(cgroup),
                    exec: File::from(exec),
                },
            )
        }
        // The helper closed the channel without a plan (an idle stage no longer needed).
        Err(crate::protocol::switch_wire::WireError::Closed) => return 2,
        Err(e) => {
            send(
                &mut out,
                &StageEvent::Failed {
                    step: "read plan".into(),
                    error: e.to_string(),
                },
            );
            return 2;
        }
    };
    // An idle stage started under SCHED_IDLE (stages.rs); the payload must not inherit that.
    // (The helper normally reset it already; only a stage still idle needs the call.)
    let normal = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler/sched_setscheduler on this (single-threaded) process with a
    // sched_param on our stack; no memory is shared.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE
        && unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) } != 0
    {
        send(
            &mut out,
            &StageEvent::Failed {
                step: "reset scheduling policy".into(),
                error: std::io::Error::last_os_error().to_string(),
            },
        );
        return 1;
    }
    match run_stage(&plan, gates, &mut out) {
        Ok(()) => 0,
        Err((step, error)) => {
            send(&mut out, &StageEvent::Failed { step, error });
            1
        }
    }
}

/// The read ends of two pipes whose write ends the helper holds. It writes one byte to each
/// when the step behind it may go; closing without a byte withdraws the launch.
pub(crate) struct Gates {
    /// Opens once the payload cgroup exists with its limits: the init joins it after.
    cgroup: File,
    /// Opens once the start record is on disk: the payload execs after.
    exec: File,
}

/// The byte the helper writes to open a gate.
pub(crate) const GATE_OPEN: u8 = b'g';

/// Blocks until the helper opens `gate`; an error when it withdrew the launch instead.
fn pass(gate: &mut File, what: &str) -> StepResult<()> {
    let mut b = [0u8; 1];
    loop {
        match gate.read(&mut b) {
            Ok(1) if b[0] == GATE_OPEN => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((format!("wait for {what}"), e.to_string())),
            _ => {
                return Err((
                    format!("wait for {what}"),
                    "the helper withdrew the launch".into(),
                ))
            }
        }
    }
}

/// The stage's checklist: pid namespace, fork the init, relay its events, report its end.
fn run_stage(plan: &StagePlan, gates: Gates, out: &mut File) -> StepResult<()> {
    let (rd, wr) = step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))?;
    // The init waits for this ack after "started" so that the payload (even a zombie) is
    // still its child while we look up the payload's host pid.
    let (ack_rd, ack_wr) = step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))?;
    step("unshare pid namespace", unshare(CloneFlags::CLONE_NEWPID))?;
    // SAFETY: the stage is a fresh process that never started a second thread, so the child
    // may do anything after fork.
    let init = match step("fork init", unsafe { fork() })? {
        ForkResult::Child => {
            // The stage is single-threaded, so the "parent thread" is the stage itself: if it
            // is killed, the init (and with it the whole payload pid namespace) dies too.
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
            drop(rd);
            drop(ack_wr);
            // The init talks to the stage only; the helper's socket stays with the stage so the
            // helper sees EOF when the stage ends.
            // SAFETY: closes our copy of the socket; `out` is never used or dropped in this
            // process again (it leaves through _exit below).
            unsafe { libc::close(out.as_raw_fd()) };
            let mut w = File::from(wr);
            let code = match init_main(plan, gates, &mut w, File::from(ack_rd)) {
                Ok(code) => code,
                Err((step, error)) => {
                    send(&mut w, &StageEvent::Failed { step, error });
                    1
                }
            };
            // SAFETY: _exit skips atexit handlers and stdio flushing of the copied parent state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(wr);
    drop(ack_rd);
    // The gates are the init's and the payload's to wait on.
    drop(gates);
    let mut ack = File::from(ack_wr);
    let mut reported_end = false;
    let mut helper_gone = false;
    let mut pipe = BufReader::new(File::from(rd));
    loop {
        if pipe.buffer().is_empty() {
            // Wait for the init's next event, and notice the helper going away meanwhile.
            let init_ready;
            let mut helper_hup = false;
            {
                let mut fds = vec![PollFd::new(pipe.get_ref().as_fd(), PollFlags::POLLIN)];
                if !helper_gone {
                    fds.push(PollFd::new(out.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                    Ok(_) => {}
                }
                let any = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                init_ready = any(&fds[0]);
                if fds.len() > 1 {
                    helper_hup = any(&fds[1]);
                }
            }
            if helper_hup && matches!(out.read(&mut [0u8; 64]), Ok(0) | Err(_)) {
                // The helper died: nobody will supervise or clean up this payload, so it
                // ends now (P10), and we clean up ourselves below.
                helper_gone = true;
                let _ = kill(init, Signal::SIGKILL);
            }
            if !init_ready {
                continue;
            }
        }
        let mut line = String::new();
        match pipe.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(ev) = serde_json::from_str::<StageEvent>(&line) else {
            continue;
        };
        let ev = match ev {
            StageEvent::Started { .. } => {
                let ev = StageEvent::Started {
                    pid: host_pid_of_child(init.as_raw()),
                    init_pid: init.as_raw(),
                };
                let _ = ack.write_all(b"k");
                ev
            }
            other => {
                reported_end = true;
                other
            }
        };
        send(out, &ev);
    }
    let status = step("wait for init", waitpid(init, None))?;
    if helper_gone {
        orphan_cleanup(plan);
        return Ok(());
    }
    if !reported_end {
        // The init died without reporting (killed with the cgroup): report how it ended.
        let ev = match status {
            WaitStatus::Exited(_, c) => StageEvent::Exit {
                code: Some(c),
                signal: None,
            },
            WaitStatus::Signaled(_, s, _) => StageEvent::Exit {
                code: None,
                signal: Some(s as i32),
            },
            _ => StageEvent::Exit {
                code: None,
                signal: Some(libc::SIGKILL),
            },
        };
        send(out, &ev);
    }
    Ok(())
}

/// Without a helper: every payload process died with the init (they were all in its pid
/// namespace), so remove the scratch directory and the cgroup directories.
fn orphan_cleanup(plan: &StagePlan) {
    let _ = std::fs::remove_dir_all(&plan.scratch);
    for f in &plan.join_files {
        if let Some(dir) = f.parent() {
            for _ in 0..200 {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The init's only child when the payload started, read from the host's /proc (the stage
/// never changed its mount namespace). The init does not reap before our ack, so the child is
/// listed even if it already exited. Falls back to the init's own pid (signals to it are
/// forwarded to the payload), never to a pid from the payload's namespace.
fn host_pid_of_child(init: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(init)
}

/// pid 1 of the payload's pid namespace. Returns the exit code of the init.
fn init_main(plan: &StagePlan, gates: Gates, events: &mut File, mut ack: File) -> StepResult<i32> {
    let Gates {
        cgroup: mut cgroup_gate,
        exec: mut exec_gate,
    } = gates;
    // 1. Private namespaces. (The helper creates the payload cgroup meanwhile; the init joins
    //    it in step 8, before the payload exists. Until then only the namespaces and mounts
    //    made here are charged to the helper's cgroup.)
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if plan.network != NetworkMode::Host {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    step("unshare namespaces", unshare(flags))?;
    // 2. Nothing we mount may propagate back to the host: slave before the first mount.
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
    // 3. A /proc that shows only this pid namespace.
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    step(
        "mount /proc",
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            nosuid | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    // 4. Private, size-limited /tmp, /var/tmp, /dev/shm (P8: no shared temporary files), and
    //    /run/lock where it is world-writable (1777 on Debian-like nodes, /var/lock points to
    //    it): shared, it is a drop box between payloads that keeps their files after teardown.
    let opts = format!("size={},mode=1777", plan.tmp_size_bytes);
    for dir in ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"] {
        let shared = dir != "/run/lock"
            || std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
        if shared && Path::new(dir).is_dir() {
            step(
                &format!("mount tmpfs on {dir}"),
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
    // 5. Hide every other payload's scratch: a tmpfs over the root, our own dir bound back.
    hide_scratch_root(plan)?;
    // 6. Own hostname; loopback up for network = loopback.
    let mut host = format!("mupilot-{}", plan.payload_id);
    host.truncate(64);
    step("set hostname", nix::unistd::sethostname(&host))?;
    if plan.network == NetworkMode::Loopback {
        step("bring lo up", loopback_up())?;
    }
    // 7. Signals to forward are blocked here and collected with sigwaitinfo below; blocked
    //    (not ignored) so the kernel queues them even for a namespace init.
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
    step("block signals", set.thread_block())?;
    // 8. Into the payload cgroup once the helper made it, so the payload and everything it
    //    starts are accounted and limited from their first instruction (P7).
    pass(&mut cgroup_gate, "the payload cgroup")?;
    drop(cgroup_gate);
    for f in &plan.join_files {
        step(
            &format!("join cgroup {}", f.display()),
            std::fs::write(f, "0"),
        )?;
    }
    let (err_rd, err_wr) = step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))?;
    // SAFETY: the init is single-threaded (forked from the single-threaded stage).
    let payload = match step("fork payload", unsafe { fork() })? {
        ForkResult::Child => {
            drop(err_rd);
            let Err((s, e)) = payload_main(plan, &mut exec_gate);
            let mut w = File::from(err_wr);
            let _ = w.write_all(format!("{s}\n{e}").as_bytes());
            // SAFETY: see init's _exit above.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_wr);
    drop(exec_gate);
    // 9. The error pipe closes on exec (CLOEXEC): EOF without data means the payload runs.
    let mut msg = String::new();
    let _ = File::from(err_rd).read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = waitpid(payload, None);
        let (s, e) = msg.split_once('\n').unwrap_or(("exec", msg.as_str()));
        return Err((s.to_owned(), e.to_owned()));
    }
    send(
        events,
        &StageEvent::Started {
            pid: payload.as_raw(),
            init_pid: 1,
        },
    );
    // EOF (the stage died) is as good as the ack: carry on supervising.
    let _ = ack.read(&mut [0u8; 1]);
    drop(ack);
    // 10. Act as init: reap everything, forward signals, end with the main process.
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(payload, sig);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) if p == payload => {
                    end_namespace();
                    send(
                        events,
                        &StageEvent::Exit {
                            code: Some(c),
                            signal: None,
                        },
                    );
                    return Ok(0);
                }
                Ok(WaitStatus::Signaled(p, s, _)) if p == payload => {
                    end_namespace();
                    send(
                        events,
                        &StageEvent::Exit {
                            code: None,
                            signal: Some(s as i32),
                        },
                    );
                    return Ok(0);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// Longest time the init waits for the processes it killed before it reports the exit anyway
/// (a process stuck in uninterruptible sleep); the helper's cgroup kill handles what is left.
const END_NAMESPACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// After the main process exited: kills every other process of the pid namespace (pid 1's
/// kill(-1) reaches all of them) and reaps them, so that when the exit is reported nothing of
/// the payload runs any more and only this init, which then exits, is left in the cgroup. The
/// helper need not wait for the init's own exit (the namespaces' teardown) to report.
fn end_namespace() {
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

fn hide_scratch_root(plan: &StagePlan) -> StepResult<()> {
    let s = "hide scratch root";
    let own = step(
        s,
        nix::fcntl::open(
            &plan.scratch,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    )?;
    // SAFETY: `own` was just opened and is owned here only.
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    step(
        s,
        mount(
            Some("tmpfs"),
            &plan.scratch_root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=65536,mode=0711"),
        ),
    )?;
    step(s, std::fs::create_dir(&plan.scratch))?;
    let src = format!("/proc/self/fd/{}", own.as_raw_fd());
    step(
        "bind own scratch",
        mount(
            Some(src.as_str()),
            &plan.scratch,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    Ok(())
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
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Closes (or, with `cloexec`, marks close-on-exec) every descriptor from 3 up:
/// close_range(2) (Linux >= 5.9 for the flag, 5.11), else a walk over /proc/self/fd.
fn fds_from_3(cloexec: bool) -> std::io::Result<()> {
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

/// The payload process: ends in exec, or returns the step that failed.
fn payload_main(
    plan: &StagePlan,
    exec_gate: &mut File,
) -> Result<std::convert::Infallible, (String, String)> {
    step("unblock signals", SigSet::all().thread_unblock())?;
    step("setsid", nix::unistd::setsid())?;
    // Every inherited descriptor above stderr closes on exec (the error pipe included).
    step("close inherited fds", fds_from_3(true))?;
    use nix::sys::resource::{setrlimit, Resource};
    step(
        "set RLIMIT_CORE",
        setrlimit(Resource::RLIMIT_CORE, plan.core_bytes, plan.core_bytes),
    )?;
    step(
        "set RLIMIT_NOFILE",
        setrlimit(Resource::RLIMIT_NOFILE, plan.nofile, plan.nofile),
    )?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    super::privs::drop_to(&plan.account)?;
    if !plan.allow_user_namespaces {
        step(
            "seccomp: deny user namespaces",
            super::seccomp::deny_user_namespaces(),
        )?;
    }
    step("chdir to scratch", std::env::set_current_dir(&plan.scratch))?;
    if let Some(b) = &plan.bundle_b64 {
        unpack_bundle(b)?;
    }
    // Last: the start record must be on disk before the payload's own code runs (P4, P11).
    pass(exec_gate, "the start record")?;
    exec(plan)
}

fn unpack_bundle(b64: &str) -> StepResult<()> {
    let s = "unpack bundle";
    let bytes = step(s, base64::engine::general_purpose::STANDARD.decode(b64))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    // Archive::unpack uses unpack_in for every entry: `..` entries are skipped, absolute paths
    // are made relative, and nothing is written through a symlink that leaves the directory.
    // We run as the account here, so the kernel's permission checks apply as well.
    step(s, ar.unpack("."))
}

fn exec(plan: &StagePlan) -> Result<std::convert::Infallible, (String, String)> {
    let s = "exec";
    let cstr = |v: &str| step(s, CString::new(v));
    let argv: Vec<CString> = plan
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = plan
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let path_var = plan
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let prog = resolve_program(&plan.argv[0], path_var).ok_or_else(|| {
        (
            s.to_owned(),
            format!(
                "exec failed: ENOENT: {} not found in PATH={path_var}",
                plan.argv[0]
            ),
        )
    })?;
    let prog = cstr(&prog.to_string_lossy())?;
    match nix::unistd::execve(&prog, &argv, &envp) {
        Err(e) => Err((s.into(), format!("exec failed: {e}: {}", plan.argv[0]))),
        Ok(never) => match never {},
    }
}

/// PATH search with the payload's PATH (glibc's execvpe would use the stage's own).
fn resolve_program(name: &str, path: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
