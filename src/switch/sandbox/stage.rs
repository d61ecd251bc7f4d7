//! The stage: a fresh, single-threaded root process, pid 1 of a pid namespace of its own, that
//! builds one payload's sandbox, starts the payload in it and supervises it as the
//! namespace's init. Forked by the stage factory (factory.rs), or by `mupilot-switch stage`
//! when no factory runs ([`stage_main`], [`fork_stage`]).
//!
//! 1. Before its plan arrives it builds what every payload of this helper gets
//!    ([`Preparation`], [`prepare`]): nothing any exec could gain (securebits, bounding set),
//!    new mount, IPC, UTS (and network) namespaces, private tmpfs mounts, a /proc of its pid
//!    namespace, the supervised signals on a signalfd, the Landlock ruleset (scope.rs). An idle stage does this under
//!    SCHED_IDLE while nothing waits for it.
//! 2. With the plan ([`run`]): outputs, the scratch view and the hostname; the payload cgroup
//!    joined once the helper made it (the cgroup gate); the bundle unpacked as the account;
//!    the payload's process started (payload.rs: setsid, rlimits, identity switch,
//!    no_new_privs, the Landlock domain, the optional user-namespace filter, the exec gate,
//!    exec); `started`
//!    reported to the helper.
//! 3. Then it reaps, forwards signals and, when the payload's main process exits, ends the
//!    namespace and reports the exit ([`supervise`]); when the helper's end closes first, it
//!    ends the payload and cleans up after it.
//!
//! The gates let the helper work in parallel with the stage: it creates the cgroup while the
//! stage mounts, and writes the start record while the stage joins and the payload drops its
//! privileges; the payload's own code never runs before both are done.
//!
//! Must never be entered from a multi-threaded process: `fork` here relies on being the only
//! thread. Nothing here talks to the network or reads credentials.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::payload::PayloadExec;
use super::step::{step, StageError};
use super::wire::{self, FromStage, Plan, Preparation, ToStage};
use super::NetworkMode;

type StepResult<T> = Result<T, StageError>;

/// Sends messages to the helper in one write. The helper gone means nobody listens; the
/// cgroup kill cleans up after us.
fn send(channel: &UnixStream, msgs: &[FromStage]) {
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
        Ok((plan, fds)) if [2, 4].contains(&(fds.len() - usize::from(plan.bundle).min(fds.len()))) => {
            (plan, fds)
        }
        Ok((_, fds)) => {
            return fail(
                &channel,
                StageError::new(
                    "read plan",
                    format!(
                    "{} descriptors came with the plan; expected the exec and cgroup gates, the bundle if any and 0 or 2 outputs",
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
        && unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) } != 0
    {
        let e = std::io::Error::last_os_error();
        return fail(&channel, StageError::new("reset scheduling policy", e), 1);
    }
    let host = match prepared {
        Ok(host) => host,
        Err(e) => return fail(&channel, e, 1),
    };
    match run(&plan, fds, &host, &channel) {
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
fn fail(channel: &UnixStream, error: StageError, code: i32) -> i32 {
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

/// What the stage keeps of the host after [`prepare`] moved it into the payload's
/// namespaces: the host's /proc (where `self` is the stage's host pid and its children have
/// host pids) and mount namespace (to clean up without the payload's mounts after the
/// helper died). Both close-on-exec.
struct Host {
    proc: OwnedFd,
    mount_ns: OwnedFd,
    /// The stage's own cgroups (the helper's, inherited): joins into them are skipped.
    cgroups: Vec<(Vec<String>, String)>,
    /// The supervised signals ([`supervised_signals`]), made ready before the plan.
    signals: nix::sys::signalfd::SignalFd,
    /// The Landlock ruleset the payload's process restricts itself with (scope.rs), made
    /// before the plan so that process only makes the one system call; close-on-exec.
    landlock: Option<OwnedFd>,
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
/// "loopback"`; the supervised signals blocked, into a signalfd. What depends on the payload (the scratch
/// view, the hostname, the cgroup) comes after the plan.
fn prepare(prep: &Preparation) -> StepResult<Host> {
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
    // What any later exec may gain (securebits, bounding set): nothing. Done here, off the
    // launch path; the stage keeps its own capabilities.
    super::privs::limit_future_execs()?;
    // Still the host's: the mounts below are this stage's own.
    let host = Host {
        proc: open(
            "/proc",
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        )?,
        mount_ns: open("/proc/self/ns/mnt", nix::fcntl::OFlag::O_RDONLY)?,
        cgroups: step("read /proc/self/cgroup", super::cgroup::own_cgroups())?,
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
                super::scope::ruleset(),
            )?),
            false => None,
        },
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
    if prep.network == NetworkMode::Loopback {
        step("bring lo up", loopback_up())?;
    }
    Ok(host)
}

/// Blocks until `gate` opens; an error when the launch was withdrawn instead.
fn pass(gate: &mut File, what: &str) -> StepResult<()> {
    step(format!("wait for {what}"), wire::pass_gate(gate))
}

/// Whether the helper's end of `channel` is closed (the helper died, or released the stage).
fn helper_gone(channel: &UnixStream) -> bool {
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// The stage's checklist once the plan came, each step one call in the order the kernel needs
/// them: outputs onto fds 1 and 2; the scratch view and the hostname; the payload cgroup
/// created with its limits and joined; the bundle unpacked as the account; the payload
/// started (it passes the exec gate once the start record is on disk); `started` reported;
/// then supervision until the payload's main process exits ([`supervise`]). Returns the
/// stage's exit code.
fn run(plan: &Plan, fds: Vec<OwnedFd>, host: &Host, channel: &UnixStream) -> StepResult<i32> {
    let mut fds = fds.into_iter();
    let (Some(exec_gate), Some(cgroup_gate)) = (fds.next(), fds.next()) else {
        return Err(StageError::new("read plan", "no exec and cgroup gates"));
    };
    let bundle = if plan.bundle { fds.next() } else { None };
    for (fd, target) in fds.zip([1, 2]) {
        // SAFETY: dup2 of a descriptor we own onto 1 or 2; no memory is involved. The copy on
        // 1/2 is not close-on-exec (the payload writes there); ours (received close-on-exec)
        // closes at the end of this loop iteration.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(StageError::new(
                "put the payload's outputs on fds 1 and 2",
                std::io::Error::last_os_error(),
            ));
        }
    }
    // 1. Laid out now for the payload's process, which cannot allocate (payload.rs).
    let payload = PayloadExec::new(
        plan,
        exec_gate,
        host.landlock.as_ref().map(|fd| fd.as_raw_fd()),
    )?;
    // 2. Hide every other payload's scratch: a tmpfs over the root, our own dir bound back.
    hide_scratch_root(plan)?;
    // 3. Own hostname.
    let mut hostname = format!("mupilot-{}", plan.payload_id);
    hostname.truncate(64);
    step("set hostname", nix::unistd::sethostname(&hostname))?;
    // 4. Into the payload cgroup once the helper made it with its limits (meanwhile), so the
    //    payload and everything it starts are accounted and limited from their first
    //    instruction (P7). (Joined by the stage itself: only the calling thread's own move,
    //    pid 0 into `tasks`, skips the kernel's thread-group lock and its RCU grace period.)
    wire::spin_until_readable(cgroup_gate.as_fd());
    pass(&mut File::from(cgroup_gate), "the payload cgroup")?;
    for f in plan.cgroup.join_files(&host.cgroups) {
        step(
            format!("join cgroup {}", f.display()),
            std::fs::write(f, "0"),
        )?;
    }
    // 5. The bundle, unpacked as the account in a process of its own.
    if let Some(b) = bundle {
        payload.unpack_bundle(b)?;
    }
    // 6. Start the payload (it waits at the exec gate); back when it exec'd. Every descriptor
    //    above stderr closes on that exec: ours are the stage's, never the payload's.
    step("close inherited fds", fds_from_3(true))?;
    let pid = payload.spawn()?;
    // 7. `started`, with the host's pids (nothing is reaped before this).
    let (stage_pid, host_pid) = host_pids(&host.proc)?;
    let started = FromStage::Started {
        pid: host_pid,
        stage_pid,
    };
    // A short payload has often ended by now (the stage gets the CPU back only after it): its
    // exit then goes out with `started`, in one write, one wake-up of the helper.
    if let Some(exit) = reap(pid) {
        end_namespace();
        send(channel, &[started, exit]);
        linger_until_released(channel);
        return Ok(0);
    }
    send(channel, &[started]);
    // 8. Act as init until the main process exits.
    supervise(plan, host, channel, pid)
}

/// Reaps every child that has ended, without blocking; the main process's `exit` once it is
/// among them.
fn reap(payload: Pid) -> Option<FromStage> {
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
fn supervise(plan: &Plan, host: &Host, channel: &UnixStream, payload: Pid) -> StepResult<i32> {
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
fn linger_until_released(channel: &UnixStream) {
    loop {
        match (&*channel).read(&mut [0u8; 64]) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let idle = super::SCHED_PRIORITY_0;
    // SAFETY: sched_setscheduler on ourselves with a sched_param on our stack.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
}

/// Without a helper: every other process of the payload is dead ([`end_namespace`] ran), so
/// the stage removes what the helper would have: the cgroup directories (after moving itself
/// out, [`Located::leave`]), and the scratch directory, seen from the host's mount namespace
/// (in ours the scratch root is our tmpfs).
fn orphan_cleanup(plan: &Plan, host: &Host) {
    plan.cgroup.leave();
    plan.cgroup.cgroup().remove();
    if nix::sched::setns(host.mount_ns.as_fd(), CloneFlags::CLONE_NEWNS).is_ok() {
        let _ = std::fs::remove_dir_all(&plan.scratch);
    }
}

/// The host pids of the stage (the caller) and of its only child, the payload, read through
/// the host's /proc (the path /proc is the payload's): `self` and `thread-self/children`
/// there resolve in the host's pid namespace. Called before anything is reaped, so the child
/// is listed even if it already exited.
fn host_pids(proc: &OwnedFd) -> StepResult<(i32, i32)> {
    let s = "read host pids";
    let own = nix::fcntl::readlinkat(Some(proc.as_raw_fd()), "self")
        .map_err(|e| StageError::new(s, format!("/proc/self: {e}")))?;
    let own: i32 = own
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| StageError::new(s, format!("/proc/self is {own:?}")))?;
    let fd = nix::fcntl::openat(
        Some(proc.as_raw_fd()),
        "thread-self/children",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| StageError::new(s, format!("/proc/thread-self/children: {e}")))?;
    // SAFETY: `fd` was just opened and is owned here only.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut children = String::new();
    f.read_to_string(&mut children)
        .map_err(|e| StageError::new(s, format!("/proc/thread-self/children: {e}")))?;
    let child = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| StageError::new(s, format!("the stage has no child ({children:?})")))?;
    Ok((own, child))
}

/// Longest time the stage waits for the processes it killed before it reports the exit anyway
/// (a process stuck in uninterruptible sleep); the helper's cgroup kill handles what is left.
const END_NAMESPACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// After the main process exited (or the helper died): kills every other process of the pid
/// namespace (pid 1's kill(-1) reaches all of them) and reaps them, so that when the exit is
/// reported nothing of the payload runs any more and only this stage, which then exits, is
/// left in the cgroup. The helper need not wait for the stage's own exit (the namespaces'
/// teardown) to report.
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

fn hide_scratch_root(plan: &Plan) -> StepResult<()> {
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
