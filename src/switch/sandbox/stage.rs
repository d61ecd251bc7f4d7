//! The stage process (`mupilot-switch stage`): a fresh, single-threaded root process that
//! builds one payload's sandbox and execs it. Three processes, each with one job:
//!
//! 1. **stage** (host pid namespace): before its plan arrives, builds what every payload of
//!    this helper gets ([`Preparation`]): nothing any exec could gain (securebits, bounding
//!    set), a pid namespace for its next child, new mount, IPC, UTS (and network) namespaces,
//!    private tmpfs mounts, and forks the init. An idle stage does this under SCHED_IDLE
//!    while nothing waits for it. Then it reads the plan, the exec gate and the payload's
//!    stdout/stderr from fd 0 (a socketpair to the helper), hands them to the init, creates
//!    the payload cgroup, relays the init's `started` and reports how the init ended.
//! 2. **init** (pid 1 of the new pid namespace): mounts /proc before the plan; then the
//!    scratch view and the hostname, joins the payload cgroup at the cgroup gate, has the
//!    bundle unpacked as the account, starts the payload process (payload.rs), then reaps,
//!    forwards signals and, when the payload's main process exits, ends the namespace.
//! 3. **payload** (payload.rs, sharing the init's memory until its exec): setsid, rlimits,
//!    identity switch, no_new_privs, the optional user-namespace filter, the exec gate, exec.
//!
//! The gates let the helper work in parallel with the stage: it creates the cgroup while the
//! init mounts, and writes the start record while the payload drops its privileges; the
//! payload's own code never runs before both are done.
//!
//! Must never be entered from a multi-threaded process: `fork` here relies on being the only
//! thread. Nothing here talks to the network or reads credentials.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::cgroup::{Limits, Located};
use super::payload::PayloadExec;
use super::{Account, NetworkMode};

/// Everything the stage needs; no credentials, no secrets (the bundle is the payload's input).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StagePlan {
    pub payload_id: String,
    pub account: Account,
    pub argv: Vec<String>,
    /// The payload's complete environment, computed by the helper.
    pub env: Vec<(String, String)>,
    /// Where the payload cgroup goes (below the pilot's); the stage creates it with `limits`
    /// while the init mounts, and the init joins it (`Cgroup::join_files`).
    pub cgroup: Located,
    pub limits: Limits,
    pub scratch_root: PathBuf,
    pub scratch: PathBuf,
    pub nofile: u64,
    pub core_bytes: u64,
    pub allow_user_namespaces: bool,
    /// tar.gz, base64.
    pub bundle_b64: Option<String>,
}

/// What a stage builds before its plan arrives: the namespaces and mounts that are the same
/// for every payload of this helper (site settings). Passed as arguments
/// (`stage --network MODE --tmp-size-bytes N [--idle]`), so an idle stage can do this work
/// while nothing waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preparation {
    pub network: NetworkMode,
    /// Size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run/lock).
    pub tmp_size_bytes: u64,
}

impl Preparation {
    /// The stage's arguments after `stage`.
    pub fn args(&self) -> [String; 4] {
        let network = match self.network {
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
            NetworkMode::Loopback => "loopback",
        };
        [
            "--network".into(),
            network.into(),
            "--tmp-size-bytes".into(),
            self.tmp_size_bytes.to_string(),
        ]
    }

    /// Parses the arguments after `stage`; also says whether `--idle` was given.
    pub(crate) fn parse(args: &[String]) -> Result<(Self, bool), String> {
        let mut network = None;
        let mut tmp_size_bytes = None;
        let mut idle = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("stage argument {a} needs a value"))
            };
            match a.as_str() {
                "--network" => {
                    network = Some(match value()?.as_str() {
                        "host" => NetworkMode::Host,
                        "none" => NetworkMode::None,
                        "loopback" => NetworkMode::Loopback,
                        other => {
                            return Err(format!(
                                "stage argument --network {other:?}: use host, none or loopback"
                            ))
                        }
                    })
                }
                "--tmp-size-bytes" => {
                    let v = value()?;
                    tmp_size_bytes = Some(v.parse().map_err(|e| {
                        format!("stage argument --tmp-size-bytes {v:?}: {e} (use a byte count)")
                    })?)
                }
                "--idle" => idle = true,
                other => {
                    return Err(format!(
                        "unknown stage argument {other:?} (the helper passes --network, --tmp-size-bytes and --idle)"
                    ))
                }
            }
        }
        match (network, tmp_size_bytes) {
            (Some(network), Some(tmp_size_bytes)) => Ok((
                Preparation {
                    network,
                    tmp_size_bytes,
                },
                idle,
            )),
            _ => Err("the stage needs --network MODE and --tmp-size-bytes N".into()),
        }
    }
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
///
/// Order: descriptor hygiene; with `--idle`, drop to SCHED_IDLE; build the [`Preparation`]
/// (namespaces and mounts every payload gets); then wait for the plan, back at normal
/// priority once it came. A preparation that failed is reported once the plan is there, as
/// that launch's setup error.
pub fn stage_main() -> i32 {
    let Some(channel) = channel_from_stdin() else {
        return 2;
    };
    let args: Vec<String> = std::env::args().skip(2).collect();
    match Preparation::parse(&args) {
        Ok((prep, idle)) => {
            if idle {
                become_idle(&channel);
            }
            serve(channel, &prep)
        }
        Err(e) => serve_failed(channel, ("read stage arguments".to_owned(), e)),
    }
}

/// The start of a process the helper exec'd with a socket on fd 0 (a stage, the stage
/// factory): closes every other inherited descriptor above stderr (one the helper leaked
/// without CLOEXEC, say), moves the socket off fd 0 (close-on-exec, so no descendant inherits
/// it) and puts /dev/null there. None when that fails.
pub(crate) fn channel_from_stdin() -> Option<std::os::unix::net::UnixStream> {
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
    Some(std::os::unix::net::UnixStream::from(sock))
}

/// A stage's life once it has its channel: build the [`Preparation`], wait for the plan, carry
/// it out. Returns the stage's exit code (see [`stage_main`]). Also the body of a stage forked
/// by the stage factory (factory.rs).
pub(crate) fn serve(channel: std::os::unix::net::UnixStream, prep: &Preparation) -> i32 {
    let prepared = prepare(prep).and_then(|host| {
        let init = fork_init(&host, &channel)?;
        Ok((host, init))
    });
    serve_prepared(channel, prepared)
}

/// A stage that cannot prepare: it still waits for its plan, and answers it with `failed`.
fn serve_failed(channel: std::os::unix::net::UnixStream, error: (String, String)) -> i32 {
    serve_prepared(channel, Err(error))
}

fn serve_prepared(
    mut channel: std::os::unix::net::UnixStream,
    prepared: StepResult<(Host, InitLink)>,
) -> i32 {
    // One frame: the plan, the exec gate, and the payload's stdout and stderr (none: the
    // init keeps the /dev/null it has on 1 and 2). All of it goes on to the init.
    let received = crate::protocol::switch_wire::read_frame::<StagePlan>(&mut channel);
    let mut out = File::from(OwnedFd::from(channel));
    let (plan, fds) = match received {
        Ok((plan, fds)) => {
            if !(fds.len() == 1 || fds.len() == 3) {
                send(
                    &mut out,
                    &StageEvent::Failed {
                        step: "read plan".into(),
                        error: format!("{} descriptors came with the plan; expected the exec gate and 0 or 2 outputs", fds.len()),
                    },
                );
                return 2;
            }
            (plan, fds)
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
    // An idle stage waited under SCHED_IDLE; the payload must not inherit that. (The helper
    // normally reset it already; only a stage still idle needs the call.)
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
    let result = prepared.and_then(|(host, init)| run_stage(&plan, fds, host, init, &mut out));
    match result {
        Ok(()) => 0,
        Err((step, error)) => {
            send(&mut out, &StageEvent::Failed { step, error });
            1
        }
    }
}

/// Puts this idle stage under SCHED_IDLE, so its start-up and [`prepare`] use only CPU time
/// nothing else wants. Done here, after the exec, not by the helper at spawn: before its exec
/// a child holds copies of the helper's descriptors (the listening socket), and a starved one
/// would keep them open after the helper died.
///
/// The helper resets a stage to SCHED_OTHER after it sent the plan. If that reset came before
/// the call below (a stage taken the moment it started), the plan is already readable, and the
/// check after the call undoes it: either order ends at normal priority.
fn become_idle(channel: &std::os::unix::net::UnixStream) {
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this (single-threaded) process with a sched_param on our
    // stack; no memory is shared.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
    if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
        let normal = libc::sched_param { sched_priority: 0 };
        // SAFETY: as above.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) };
    }
}

/// What the stage keeps of the host after [`prepare`] moved it into the payload's
/// namespaces: its /proc (to find the payload's host pid once the init mounted the payload's
/// /proc over it) and its mount namespace (to clean up without the payload's mounts).
/// Both close-on-exec; the init closes its copies first thing.
struct Host {
    proc: OwnedFd,
    mount_ns: OwnedFd,
}

/// Builds the [`Preparation`]: a pid namespace for the stage's next child (the init), and new
/// mount, IPC, UTS (and, unless `network = "host"`, network) namespaces for the stage itself,
/// which the init inherits; `/` recursively slave; private tmpfs on /tmp, /var/tmp, /dev/shm
/// and /run/lock; the IPC namespace's own /dev/mqueue; `lo` up for `network = "loopback"`.
/// What depends on the payload (/proc of its pid namespace, the scratch view, the hostname)
/// is the init's, after the plan.
fn prepare(prep: &Preparation) -> StepResult<Host> {
    let open = |path: &str, flags: nix::fcntl::OFlag| {
        let fd = step(
            &format!("open {path}"),
            nix::fcntl::open(
                path,
                flags | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ),
        )?;
        // SAFETY: `fd` was just opened and is owned here only.
        Ok::<_, (String, String)>(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // What any later exec may gain (securebits, bounding set): nothing. Done here, off the
    // launch path; the stage and its init keep their own capabilities.
    super::privs::limit_future_execs()?;
    let host = Host {
        proc: open(
            "/proc",
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        )?,
        mount_ns: open("/proc/self/ns/mnt", nix::fcntl::OFlag::O_RDONLY)?,
    };
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
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
    if prep.network == NetworkMode::Loopback {
        step("bring lo up", loopback_up())?;
    }
    Ok(host)
}

/// The byte that opens a gate: the read end of a pipe whose write end only the opener holds.
/// The *exec gate* is the helper's (it opens once the start record is on disk: the payload
/// execs after); the *cgroup gate* is the stage's (it opens once the payload cgroup exists
/// with its limits: the init joins it after). Closing a gate without the byte withdraws the
/// launch.
pub(crate) const GATE_OPEN: u8 = b'g';

/// Blocks until `gate` opens; an error when the launch was withdrawn instead.
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
                    "the launch was withdrawn".into(),
                ))
            }
        }
    }
}

/// The stage's end of its init, forked before the plan came ([`fork_init`]).
struct InitLink {
    pid: Pid,
    /// The plan, the exec gate and the payload's outputs go to the init on this socket.
    handoff: std::os::unix::net::UnixStream,
    /// The init's events: `started`, `failed`, and a copy of the `exit` it sent the helper.
    events: File,
    /// Written once `started` was relayed; closed to release the init after its exit report.
    ack: File,
    /// The cgroup gate's write end.
    cgroup_open: OwnedFd,
}

/// Forks the init into the pid namespace [`prepare`] made, before any plan: it mounts the
/// namespace's /proc and blocks its signals, then waits for the plan ([`idle_init`]). An
/// idle stage does this at SCHED_IDLE, so a launch no longer waits for the fork and for the
/// new process to get a CPU.
fn fork_init(host: &Host, helper: &std::os::unix::net::UnixStream) -> StepResult<InitLink> {
    let pipe = || step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC));
    let (rd, wr) = pipe()?;
    let (cgroup_wait, cgroup_open) = pipe()?;
    // The init waits for this ack after "started" so that the payload (even a zombie) is
    // still its child while we look up the payload's host pid; its EOF releases the init
    // after the exit report.
    let (ack_rd, ack_wr) = pipe()?;
    let (handoff, init_end) = step("socketpair", std::os::unix::net::UnixStream::pair())?;
    // SAFETY: the stage is a fresh process that never started a second thread, so the child
    // may do anything after fork.
    match step("fork init", unsafe { fork() })? {
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
            // The stage's ends, and the host's /proc and mount namespace, are never the
            // init's.
            // SAFETY: closes this process's copies; the objects owning them belong to the
            // stage's frames and are never used or dropped here (the init leaves via _exit).
            unsafe {
                for fd in [
                    rd.as_raw_fd(),
                    ack_wr.as_raw_fd(),
                    cgroup_open.as_raw_fd(),
                    handoff.as_raw_fd(),
                    host.proc.as_raw_fd(),
                    host.mount_ns.as_raw_fd(),
                ] {
                    libc::close(fd);
                }
            }
            // The init keeps its copy of the helper's socket (close-on-exec, so no payload
            // program inherits it) for one line: the payload's exit, sent straight to the
            // helper instead of through the stage. The helper sees EOF once the stage and the
            // init are both gone.
            // SAFETY: our own copy of the stage's socket descriptor (inherited by fork); this
            // process never closes it before its _exit.
            let mut helper =
                std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(helper.as_raw_fd()) });
            let mut w = File::from(wr);
            let code = match idle_init(
                init_end,
                cgroup_wait,
                &mut w,
                &mut helper,
                File::from(ack_rd),
            ) {
                Ok(code) => code,
                Err((step, error)) => {
                    send(&mut w, &StageEvent::Failed { step, error });
                    1
                }
            };
            // SAFETY: _exit skips atexit handlers and stdio flushing of the copied parent state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => Ok(InitLink {
            pid: child,
            handoff,
            events: File::from(rd),
            ack: File::from(ack_wr),
            cgroup_open,
        }),
    }
}

/// The init before its plan: /proc of its pid namespace, then the plan, the exec gate and the
/// outputs from the stage (outputs onto fds 1 and 2), then [`init_main`]. Exit code 2 without
/// a plan (the stage ended while idle).
fn idle_init(
    mut handoff: std::os::unix::net::UnixStream,
    cgroup_wait: OwnedFd,
    events: &mut File,
    helper: &mut File,
    ack: File,
) -> StepResult<i32> {
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
    let (plan, fds) = match crate::protocol::switch_wire::read_frame::<StagePlan>(&mut handoff) {
        Ok(received) => received,
        Err(crate::protocol::switch_wire::WireError::Closed) => return Ok(2),
        Err(e) => return Err(("receive plan from the stage".into(), e.to_string())),
    };
    drop(handoff);
    let mut fds = fds.into_iter();
    let Some(exec) = fds.next() else {
        return Err(("receive plan from the stage".into(), "no exec gate".into()));
    };
    for (fd, target) in fds.zip([1, 2]) {
        // SAFETY: dup2 of a descriptor we own onto 1 or 2; no memory is involved. The copy on
        // 1/2 is not close-on-exec (the payload writes there); ours (received close-on-exec)
        // closes at the end of this loop iteration.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err((
                "put the payload's outputs on fds 1 and 2".into(),
                std::io::Error::last_os_error().to_string(),
            ));
        }
    }
    let gates = Gates {
        cgroup: File::from(cgroup_wait),
        exec: File::from(exec),
    };
    init_main(&plan, gates, events, helper, ack)
}

/// The stage's checklist once the plan came: hand the plan on to the init (back at normal
/// priority), create the payload cgroup while the init mounts (then open the cgroup gate),
/// relay the init's `started`, report its end if the init could not.
fn run_stage(
    plan: &StagePlan,
    fds: Vec<OwnedFd>,
    host: Host,
    init_link: InitLink,
    out: &mut File,
) -> StepResult<()> {
    let InitLink {
        pid: init,
        mut handoff,
        events: rd,
        ack,
        cgroup_open,
    } = init_link;
    // An init forked by an idle stage inherited its SCHED_IDLE.
    let normal = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on our child (not reaped yet, so its pid is not reused) with
    // a sched_param on our stack.
    unsafe { libc::sched_setscheduler(init.as_raw(), libc::SCHED_OTHER, &normal) };
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    // An init that died meanwhile has reported why on its events pipe, read below.
    let _ = crate::protocol::switch_wire::write_frame(&mut handoff, plan, &raw);
    drop(handoff);
    // The exec gate is the payload's to wait on, the outputs the init's.
    drop(fds);
    // The payload cgroup, made while the init mounts. Failing, the init is killed before it
    // could join, so nothing but what this call made and removed again was in it.
    match plan.cgroup.clone().create(plan.limits) {
        Ok(_) => {
            let _ = File::from(cgroup_open).write_all(&[GATE_OPEN]);
        }
        Err(e) => {
            drop(cgroup_open);
            let _ = kill(init, Signal::SIGKILL);
            let _ = waitpid(init, None);
            return Err(("create payload cgroup".into(), e.to_string()));
        }
    }
    let mut ack = ack;
    let mut reported_end = false;
    let mut helper_gone = false;
    let mut pipe = BufReader::new(rd);
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
            // An event of the init goes first: after the exit report, the helper closing its
            // end is the release below, not its death.
            if helper_hup && !init_ready && matches!(out.read(&mut [0u8; 64]), Ok(0) | Err(_)) {
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
        match ev {
            StageEvent::Started { .. } => {
                let ev = StageEvent::Started {
                    pid: host_pid_of_child(&host.proc, init.as_raw()),
                    init_pid: init.as_raw(),
                };
                // To the helper before the ack: only after the ack can the init send the exit,
                // and `started` must reach the helper first.
                send(out, &ev);
                let _ = ack.write_all(b"k");
            }
            // The init sent the exit to the helper itself; this copy says it did.
            StageEvent::Exit { .. } => {
                reported_end = true;
                linger_until_released(out, init);
                break;
            }
            failed @ StageEvent::Failed { .. } => {
                reported_end = true;
                send(out, &failed);
            }
        }
    }
    // Lets a lingering init go (EOF on its ack pipe).
    drop(ack);
    let status = step("wait for init", waitpid(init, None))?;
    if helper_gone {
        orphan_cleanup(plan, &host);
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

/// After the init reported the exit: waits until the helper closes its end of the channel
/// (it has reported the exit and is about to reap us), then lowers the init and the stage to
/// SCHED_IDLE. Their exits tear down the payload's namespaces and memory; done now, at idle
/// priority, that work no longer competes with the helper's report or the next launch.
fn linger_until_released(out: &mut File, init: Pid) {
    loop {
        match out.read(&mut [0u8; 64]) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on our init (a child not yet reaped, so its pid is not
    // reused) and on ourselves, with a sched_param on our stack.
    unsafe {
        libc::sched_setscheduler(init.as_raw(), libc::SCHED_IDLE, &idle);
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle);
    }
}

/// Without a helper: every payload process died with the init (they were all in its pid
/// namespace), so remove the scratch directory and the cgroup directories, seen from the
/// host's mount namespace (in ours the scratch root is the init's tmpfs).
fn orphan_cleanup(plan: &StagePlan, host: &Host) {
    if nix::sched::setns(host.mount_ns.as_fd(), CloneFlags::CLONE_NEWNS).is_ok() {
        let _ = std::fs::remove_dir_all(&plan.scratch);
    }
    plan.cgroup.cgroup().remove();
}

/// The init's only child when the payload started, read from the host's /proc (by the
/// descriptor [`prepare`] kept: the path /proc is the payload's by now). The init does not
/// reap before our ack, so the child is listed even if it already exited. Falls back to the
/// init's own pid (signals to it are forwarded to the payload), never to a pid from the
/// payload's namespace.
fn host_pid_of_child(proc: &OwnedFd, init: i32) -> i32 {
    nix::fcntl::openat(
        Some(proc.as_raw_fd()),
        format!("{init}/task/{init}/children").as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
    .and_then(|fd| {
        // SAFETY: `fd` was just opened and is owned here only.
        let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        s.split_whitespace().next().and_then(|p| p.parse().ok())
    })
    .unwrap_or(init)
}

/// The init's two gates: the stage's cgroup gate, the helper's exec gate (passed on to the
/// payload).
struct Gates {
    cgroup: File,
    exec: File,
}

/// pid 1 of the payload's pid namespace. Reports to the stage on `events`, and the payload's
/// exit straight to the helper on `helper` too. Returns the exit code of the init.
fn init_main(
    plan: &StagePlan,
    gates: Gates,
    events: &mut File,
    helper: &mut File,
    mut ack: File,
) -> StepResult<i32> {
    let Gates {
        cgroup: mut cgroup_gate,
        exec: exec_gate,
    } = gates;
    // 1. The stage made the namespaces and the private tmpfs mounts, and this init mounted
    //    /proc, before the plan came ([`prepare`], [`idle_init`]). (The stage creates the
    //    payload cgroup meanwhile; the init joins it in step 5, before the payload exists.)
    //    Laid out now for the payload's process, which cannot allocate (payload.rs).
    let payload = PayloadExec::new(plan, OwnedFd::from(exec_gate))?;
    // 2. Hide every other payload's scratch: a tmpfs over the root, our own dir bound back.
    hide_scratch_root(plan)?;
    // 3. Own hostname.
    let mut host = format!("mupilot-{}", plan.payload_id);
    host.truncate(64);
    step("set hostname", nix::unistd::sethostname(&host))?;
    // 4. Signals to forward are blocked here and collected with sigwaitinfo below; blocked
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
    // 5. Into the payload cgroup once the stage made it, so the payload and everything it
    //    starts are accounted and limited from their first instruction (P7).
    pass(&mut cgroup_gate, "the payload cgroup")?;
    drop(cgroup_gate);
    for f in plan.cgroup.cgroup().join_files() {
        step(
            &format!("join cgroup {}", f.display()),
            std::fs::write(f, "0"),
        )?;
    }
    // 6. The bundle, unpacked as the account in a process of its own.
    if let Some(b) = &plan.bundle_b64 {
        payload.unpack_bundle(b)?;
    }
    // 7. Start the payload (it waits at the exec gate); back when it exec'd. Every descriptor
    //    above stderr closes on that exec: ours are the init's, never the payload's.
    step("close inherited fds", fds_from_3(true))?;
    let payload = payload.spawn()?;
    send(
        events,
        &StageEvent::Started {
            pid: payload.as_raw(),
            init_pid: 1,
        },
    );
    // EOF (the stage died) is as good as the ack: carry on supervising.
    let _ = ack.read(&mut [0u8; 1]);
    // 8. Act as init: reap everything, forward signals, end with the main process.
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(payload, sig);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) if p == payload => {
                    return Ok(end(events, helper, &mut ack, Some(c), None));
                }
                Ok(WaitStatus::Signaled(p, s, _)) if p == payload => {
                    return Ok(end(events, helper, &mut ack, None, Some(s as i32)));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// The main process ended: ends the namespace, then reports the exit to the stage (which then
/// knows it need not report) and straight to the helper (no relay). Then lingers until the
/// stage closes `ack` ([`linger_until_released`]), so that the init's own exit comes after
/// the helper's report. Returns the init's exit code.
fn end(
    events: &mut File,
    helper: &mut File,
    ack: &mut File,
    code: Option<i32>,
    signal: Option<i32>,
) -> i32 {
    end_namespace();
    let ev = StageEvent::Exit { code, signal };
    // The stage first: when the helper's release reaches it, the exit is already there.
    send(events, &ev);
    send(helper, &ev);
    while !matches!(ack.read(&mut [0u8; 1]), Ok(0) | Err(_)) {}
    0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preparation_travels_as_arguments() {
        for network in [NetworkMode::Host, NetworkMode::None, NetworkMode::Loopback] {
            let prep = Preparation {
                network,
                tmp_size_bytes: 1 << 20,
            };
            let mut args: Vec<String> = prep.args().to_vec();
            assert_eq!(Preparation::parse(&args), Ok((prep, false)));
            args.push("--idle".into());
            assert_eq!(Preparation::parse(&args), Ok((prep, true)));
        }
    }

    #[test]
    fn bad_stage_arguments_are_named() {
        let parse = |a: &[&str]| {
            Preparation::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
        };
        assert!(parse(&["--network", "wifi", "--tmp-size-bytes", "1"]).contains("\"wifi\""));
        assert!(parse(&["--network", "host", "--tmp-size-bytes", "lots"]).contains("\"lots\""));
        assert!(parse(&["--network"]).contains("--network needs a value"));
        assert!(parse(&["--frobnicate"]).contains("\"--frobnicate\""));
        assert!(parse(&[]).contains("needs --network"));
    }
}
