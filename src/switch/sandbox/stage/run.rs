//! The stage's checklist once its plan came ([`run`]): the payload's outputs onto fds 1 and
//! 2, its scratch view and hostname, the payload cgroup joined once the helper made it, the
//! bundle unpacked as the account, the payload started, `started` reported; then
//! supervision (supervise.rs). Each step is one call, in the order the kernel needs.
//!
//! Must not report anything but through the channel's messages (wire.rs), and must not run
//! any of the payload's code before both gates opened.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::mount::{mount, MsFlags};

use super::super::payload::PayloadExec;
use super::super::step::{step, StageError};
use super::super::wire::{self, FromStage, Plan};
use super::prepare::Host;
use super::supervise::{end_namespace, linger_until_released, reap, supervise};
use super::{fds_from_3, pass, send, StepResult};

/// The stage's checklist once the plan came, each step one call in the order the kernel needs
/// them: outputs onto fds 1 and 2; the scratch view and the hostname; the payload cgroup
/// created with its limits and joined; the bundle unpacked as the account; the payload
/// started (it passes the exec gate once the start record is on disk); `started` reported;
/// then supervision until the payload's main process exits ([`supervise`]). Returns the
/// stage's exit code.
pub(super) fn run(
    plan: &Plan,
    fds: Vec<OwnedFd>,
    host: &Host,
    channel: &UnixStream,
) -> StepResult<i32> {
    let mut fds = fds.into_iter();
    let (Some(exec_gate), Some(cgroup_gate)) = (fds.next(), fds.next()) else {
        return Err(StageError::new("read plan", "no exec and cgroup gates"));
    };
    let bundle = if plan.bundle { fds.next() } else { None };
    let stdin = if plan.stdin { fds.next() } else { None };
    for (fd, target) in stdin.into_iter().map(|fd| (fd, 0)).chain(fds.zip([1, 2])) {
        // SAFETY: dup2 of a descriptor we own onto 0, 1 or 2; no memory is involved. The copy on
        // 0-2 is not close-on-exec (the payload uses it); ours (received close-on-exec)
        // closes at the end of this loop iteration.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(StageError::new(
                "put the payload's stdin and outputs on fds 0, 1 and 2",
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
    // 4b. `network = "pasta"`: pasta connects the namespace, as the account, in the cgroup
    //     (net.rs); the payload starts only once it is connected.
    if let Some((netns, launcher)) = host.pasta.take() {
        launcher.connect(
            &netns,
            plan.account.uid,
            plan.account.gid,
            plan.cgroup.join_files(&host.cgroups),
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
    let (stage_pid, host_pid) = host_pids(&host.proc, pid)?;
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
    // 8. Supervise as the namespace's pid 1 until the main process exits.
    supervise(plan, host, channel, pid)
}

/// The host pids of the stage (the caller) and of the payload's process `payload` (its pid in
/// our namespace), read through the host's /proc (the path /proc is the payload's): `self`,
/// `thread-self/children` and each child's `NSpid` there resolve in the host's pid namespace.
/// Called before anything is reaped, so the payload is listed even if it already exited; the
/// stage's other child, if any, is pasta's daemon (net.rs).
fn host_pids(proc: &OwnedFd, payload: nix::unistd::Pid) -> StepResult<(i32, i32)> {
    let s = "read host pids";
    let own = nix::fcntl::readlinkat(Some(proc.as_raw_fd()), "self")
        .map_err(|e| StageError::new(s, format!("/proc/self: {e}")))?;
    let own: i32 = own
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| StageError::new(s, format!("/proc/self is {own:?}")))?;
    let read = |path: &str| -> StepResult<String> {
        let fd = nix::fcntl::openat(
            Some(proc.as_raw_fd()),
            path,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| StageError::new(s, format!("/proc/{path}: {e}")))?;
        // SAFETY: `fd` was just opened and is owned here only.
        let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut text = String::new();
        f.read_to_string(&mut text)
            .map_err(|e| StageError::new(s, format!("/proc/{path}: {e}")))?;
        Ok(text)
    };
    let children = read("thread-self/children")?;
    let children: Vec<i32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let child = match children[..] {
        [only] => Some(only),
        _ => children.iter().copied().find(|c| {
            read(&format!("{c}/status")).is_ok_and(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|ids| ids.split_whitespace().last())
                    .and_then(|p| p.parse::<i32>().ok())
                    == Some(payload.as_raw())
            })
        }),
    };
    let child = child.ok_or_else(|| {
        StageError::new(
            s,
            format!("no child of the stage is the payload ({children:?})"),
        )
    })?;
    Ok((own, child))
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
