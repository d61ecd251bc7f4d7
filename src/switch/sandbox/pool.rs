//! Stage processes kept ready. Starting a payload needs a fresh, single-threaded root process
//! (the stage, pid 1 of the payload's pid namespace, stage.rs); making one costs a fork of the
//! stage factory and its namespaces and mounts, so the pool keeps a few ready that wait, idle,
//! for their plan. A launch takes one, sends it the plan and the payload's stdout/stderr over
//! its socketpair, and a background thread starts the next once no launch is being set up
//! (that work competes for the CPU the launch needs; with no idle stage left it starts at
//! once). Each stage serves exactly one payload, never two.
//!
//! An idle stage builds the part of a sandbox that is the same for every payload (its
//! [`Preparation`]: empty namespaces, private tmpfs mounts) and then holds nothing but its
//! socketpair: no plan, no payload descriptors, no credentials. It has /dev/null on stdout and
//! stderr, a clean environment and `/` as working directory, and it exits when the helper
//! closes its end (the pool dropped, the helper dead).
//!
//! Must not decide anything: which stage serves which payload is irrelevant, they are identical.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::scope;
use super::wire::{self, FromFactory, Preparation, ToFactory, ToStage};
use super::{SandboxError, SandboxSettings};

/// How long the refill thread waits after a failed spawn before it tries again; launches
/// meanwhile spawn their own stage (and report the error themselves).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A stage process: exec'd by the helper (its child), or forked by the stage factory (the
/// factory's child, followed here through a pidfd, so a reused pid can never be hit).
pub(super) enum StageProcess {
    Spawned(Child),
    Forked { pid: u32, pidfd: OwnedFd },
}

impl StageProcess {
    pub fn id(&self) -> u32 {
        match self {
            StageProcess::Spawned(c) => c.id(),
            StageProcess::Forked { pid, .. } => *pid,
        }
    }

    /// Back to SCHED_OTHER: idle stages wait under SCHED_IDLE (the factory's, or an exec'd
    /// stage's own, stage.rs `become_idle`), and one that works for a payload must not wait
    /// for an idle CPU. The stage is not reaped yet (our child, or the factory's, which reaps
    /// it only once it exited), so its pid is its own.
    pub fn run_at_normal_priority(&self) {
        let normal = super::SCHED_PRIORITY_0;
        // SAFETY: sched_setscheduler with a pid and a sched_param on our stack.
        unsafe { libc::sched_setscheduler(self.id() as i32, libc::SCHED_OTHER, &normal) };
    }

    /// SIGKILL; a stage that already ended is not an error.
    pub fn kill(&mut self) -> std::io::Result<()> {
        match self {
            StageProcess::Spawned(c) => c.kill(),
            StageProcess::Forked { pidfd, .. } => {
                match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
                    Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Blocks until the stage ended; how it ended, as far as known (a forked stage's status
    /// goes to the factory, which reaps it).
    pub fn wait(&mut self) -> std::io::Result<String> {
        match self {
            StageProcess::Spawned(c) => c.wait().map(|s| s.to_string()),
            StageProcess::Forked { pidfd, .. } => {
                while !pidfd_readable(pidfd, PollTimeout::NONE)? {}
                Ok("ended (a forked stage; the stage factory has its status)".into())
            }
        }
    }

    /// Whether the stage has ended, without blocking.
    pub fn has_ended(&mut self) -> bool {
        match self {
            StageProcess::Spawned(c) => !matches!(c.try_wait(), Ok(None)),
            StageProcess::Forked { pidfd, .. } => {
                pidfd_readable(pidfd, PollTimeout::ZERO).unwrap_or(true)
            }
        }
    }
}

/// A pidfd polls readable once its process has exited.
fn pidfd_readable(pidfd: &OwnedFd, timeout: PollTimeout) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A stage process that waits for its plan on `channel`.
pub(super) struct IdleStage {
    pub process: StageProcess,
    pub channel: UnixStream,
}

impl IdleStage {
    /// Closes the channel (the stage reads EOF and exits) and waits for the process.
    fn discard(mut self) {
        drop(self.channel);
        // An idle stage exits on EOF at once; kill it anyway in case it is stopped or stuck.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The helper's end of the stage factory (factory.rs): forks idle stages on request.
struct Factory {
    child: Child,
    channel: UnixStream,
}

impl Factory {
    /// Starts `<exe> stage-factory <preparation>` like a stage: a socketpair on stdin,
    /// /dev/null on stdout and stderr, no environment, `/` as working directory.
    fn start(exe: &Path, prep: &Preparation) -> Result<Factory, SandboxError> {
        let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Channel)?;
        let child = Command::new(exe)
            .arg("stage-factory")
            .args(prep.args())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                exe: exe.to_path_buf(),
                source,
            })?;
        Ok(Factory {
            child,
            channel: ours,
        })
    }

    /// One freshly forked stage, or why there is none.
    fn fork(&mut self) -> Result<IdleStage, String> {
        wire::send(&self.channel, &ToFactory::ForkOne, &[])
            .map_err(|e| format!("cannot ask the stage factory: {e}"))?;
        let (reply, fds) = wire::recv::<FromFactory>(&mut self.channel)
            .map_err(|e| format!("no answer from the stage factory: {e}"))?;
        match reply {
            FromFactory::Forked { pid } => {
                let mut fds = fds.into_iter();
                let (Some(channel), Some(pidfd), Ok(pid)) =
                    (fds.next(), fds.next(), u32::try_from(pid))
                else {
                    return Err(format!(
                        "the stage factory's answer for stage {pid} lacks its descriptors"
                    ));
                };
                Ok(IdleStage {
                    process: StageProcess::Forked { pid, pidfd },
                    channel: UnixStream::from(channel),
                })
            }
            FromFactory::Failed { error } => Err(error),
        }
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        // EOF on its channel ends the factory; the kill is for one that is stuck.
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one stage: `<exe> stage <preparation> [--idle]`, a socketpair on stdin, /dev/null
/// on stdout and stderr, no environment, `/` as working directory. It builds its
/// [`Preparation`] at once (under SCHED_IDLE with `idle`), then waits for its plan.
pub(super) fn spawn(exe: &Path, prep: &Preparation, idle: bool) -> Result<IdleStage, SandboxError> {
    let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Channel)?;
    let mut cmd = Command::new(exe);
    cmd.arg("stage").args(prep.args());
    if idle {
        cmd.arg("--idle");
    }
    cmd.env_clear()
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    // `cmd` holds the stage's end of the socketpair until dropped; it goes out of scope here,
    // so the only copy left is the stage's and we see EOF when it ends.
    Ok(IdleStage {
        process: StageProcess::Spawned(child),
        channel: ours,
    })
}

struct State {
    idle: Vec<IdleStage>,
    /// Launches between `take` and the end of their setup ([`Launching`] alive).
    launching: usize,
    stop: bool,
}

struct Shared {
    exe: PathBuf,
    prep: Preparation,
    warm: usize,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Up to `warm` idle stages, refilled by a background thread after each launch.
pub struct StagePool {
    shared: Arc<Shared>,
    refill: Option<JoinHandle<()>>,
}

impl StagePool {
    /// A pool that keeps `warm` stages of `settings.stage_exe` (None: /proc/self/exe, the
    /// helper itself) ready, each prepared for `settings`' network, IPC scoping and tmpfs
    /// size. With `warm` = 0 every launch spawns its stage (no thread is started).
    ///
    /// Fails when the kernel cannot keep payloads' abstract sockets and signals apart and the
    /// site's `ipc_fallback` says to refuse ([`scope::resolve`]): the helper does not start.
    pub fn new(settings: &SandboxSettings, warm: usize) -> Result<Self, SandboxError> {
        let isolation = scope::resolve(settings.network, settings.ipc_fallback)
            .map_err(SandboxError::IpcIsolation)?;
        if isolation.network != settings.network {
            tracing::warn!(
                abi = isolation.abi,
                "the kernel cannot scope payloads' abstract sockets and signals (Landlock ABI < 6): \
                 payloads get a private network namespace with only lo (sandbox.ipc_fallback = \"loopback\")"
            );
        } else {
            tracing::debug!(
                abi = isolation.abi,
                landlock = isolation.landlock,
                "payload IPC isolation"
            );
        }
        let shared = Arc::new(Shared {
            exe: settings
                .stage_exe
                .clone()
                .unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
            prep: Preparation {
                network: isolation.network,
                landlock: isolation.landlock,
                tmp_size_bytes: settings.tmp_size_bytes,
            },
            warm,
            state: Mutex::new(State {
                idle: Vec::with_capacity(warm),
                launching: 0,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let refill = (warm > 0)
            .then(|| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name("stage-refill".into())
                    .spawn(move || refill(&s))
                    .map_err(|e| tracing::warn!(error = %e, "no stage refill thread; stages are spawned per launch"))
                    .ok()
            })
            .flatten();
        Ok(StagePool { shared, refill })
    }

    /// Wakes the idle stage the next [`StagePool::take`] will hand out, without giving it
    /// anything ([`ToStage::Wake`]: it reads it and spins for the plan). Called when a launch request arrives,
    /// before its checks: an idle CPU takes long to wake (a halted virtual CPU most of all),
    /// and this way the stage's CPU is awake by the time its plan is ready. The stage stays
    /// idle and clean; a request that is then denied only cost that wake-up.
    pub fn wake_next(&self) {
        let mut st = self.shared.lock();
        if let Some(s) = st.idle.last_mut() {
            // At normal priority: under SCHED_IDLE the wake-up waits for a CPU nothing else
            // wants, and the launch comes right after.
            s.process.run_at_normal_priority();
            let _ = wire::send(&s.channel, &ToStage::Wake, &[]);
        }
    }

    /// An idle stage that is still alive, or a freshly spawned one when none is ready; and a
    /// token that holds back refills until it is dropped (when the launch's setup is done).
    pub(super) fn take(&self) -> Result<(IdleStage, Launching), SandboxError> {
        self.shared.lock().launching += 1;
        let token = Launching {
            shared: self.shared.clone(),
        };
        loop {
            let next = self.shared.lock().idle.pop();
            self.shared.wake.notify_one();
            match next {
                Some(mut s) => {
                    if !s.process.has_ended() {
                        return Ok((s, token));
                    }
                    // Died while idle (killed by someone): reap it and try the next.
                    let _ = s.process.wait();
                }
                None => {
                    return spawn(&self.shared.exe, &self.shared.prep, false).map(|s| (s, token))
                }
            }
        }
    }
}

/// A launch being set up; refills wait for it unless no idle stage is left.
pub(super) struct Launching {
    shared: Arc<Shared>,
}

impl Drop for Launching {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.launching = st.launching.saturating_sub(1);
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl Drop for StagePool {
    fn drop(&mut self) {
        let idle = {
            let mut st = self.shared.lock();
            st.stop = true;
            std::mem::take(&mut st.idle)
        };
        self.shared.wake.notify_all();
        if let Some(t) = self.refill.take() {
            let _ = t.join();
        }
        for s in idle {
            s.discard();
        }
    }
}

/// The refill thread's stage factory: not started yet (it starts on first use), running, or
/// unusable (it failed once: a kernel without pidfd_open, say; from then on stages are
/// exec'd, warned once).
enum FactoryState {
    NotStarted,
    Running(Factory),
    Unusable,
}

/// A stage forked by the factory, or None when the factory cannot be used: then the caller
/// execs one, and so does every later refill.
fn factory_fork(factory: &mut FactoryState, shared: &Shared) -> Option<IdleStage> {
    if let FactoryState::NotStarted = factory {
        *factory = match Factory::start(&shared.exe, &shared.prep) {
            Ok(f) => FactoryState::Running(f),
            Err(e) => {
                tracing::warn!(error = %e, "no stage factory; idle stages are exec'd one by one");
                FactoryState::Unusable
            }
        };
    }
    let FactoryState::Running(f) = factory else {
        return None;
    };
    match f.fork() {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(%error, "the stage factory failed; idle stages are exec'd one by one from now on");
            *factory = FactoryState::Unusable;
            None
        }
    }
}

/// The refill thread: spawns outside the lock whenever fewer than `warm` stages are idle and
/// no launch is being set up, or at once when none is idle. A stage it starts puts itself
/// under SCHED_IDLE right after its exec and builds its preparation there (stage.rs,
/// `become_idle`); the helper sets a stage it takes back to SCHED_OTHER.
fn refill(shared: &Shared) {
    let mut factory = FactoryState::NotStarted;
    let wanted =
        |st: &State| st.idle.len() < shared.warm && (st.launching == 0 || st.idle.is_empty());
    loop {
        {
            let mut st = shared.lock();
            while !st.stop && !wanted(&st) {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
        }
        let next = match factory_fork(&mut factory, shared) {
            Some(s) => Ok(s),
            None => spawn(&shared.exe, &shared.prep, true),
        };
        match next {
            Ok(s) => {
                let mut st = shared.lock();
                if st.stop {
                    drop(st);
                    s.discard();
                    return;
                }
                st.idle.push(s);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start an idle stage; retrying in 1 s");
                let st = shared.lock();
                let _ = shared.wake.wait_timeout(st, RETRY_AFTER_FAILURE);
            }
        }
    }
}
