//! Stage processes kept ready. Starting a payload needs a fresh, single-threaded root process
//! (the stage); exec'ing the helper binary for it costs milliseconds, so the pool keeps a few
//! already exec'd stages that wait, idle, for their plan. A launch takes one, sends it the plan
//! and the payload's stdout/stderr over its socketpair, and a background thread starts the
//! next once no launch is being set up (an exec competes for the CPU the launch needs; with
//! no idle stage left it starts at once). Each stage serves exactly one payload, never two.
//!
//! An idle stage holds nothing but its socketpair: no plan, no payload descriptors, no
//! credentials. It has /dev/null on stdout and stderr, a clean environment and `/` as working
//! directory, and it exits when the helper closes its end (the pool dropped, the helper dead).
//!
//! Must not decide anything: which stage serves which payload is irrelevant, they are identical.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::SandboxError;

/// How long the refill thread waits after a failed spawn before it tries again; launches
/// meanwhile spawn their own stage (and report the error themselves).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A stage process that has exec'd and waits for its plan on `channel`.
pub(super) struct IdleStage {
    pub child: Child,
    pub channel: UnixStream,
}

impl IdleStage {
    /// Closes the channel (the stage reads EOF and exits) and reaps the process.
    fn discard(mut self) {
        drop(self.channel);
        // An idle stage exits on EOF at once; kill it anyway in case it is stopped or stuck.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one stage: `<exe> stage`, a socketpair on stdin, /dev/null on stdout and stderr, no
/// environment, `/` as working directory.
pub(super) fn spawn(exe: &Path) -> Result<IdleStage, SandboxError> {
    let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Channel)?;
    let mut cmd = Command::new(exe);
    cmd.arg("stage")
        .env_clear()
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
        child,
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
    /// A pool that keeps `warm` stages of `exe` (None: /proc/self/exe, the helper itself)
    /// ready. With `warm` = 0 every launch spawns its stage (no thread is started).
    pub fn new(exe: Option<PathBuf>, warm: usize) -> Self {
        let shared = Arc::new(Shared {
            exe: exe.unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
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
        StagePool { shared, refill }
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
                Some(mut s) => match s.child.try_wait() {
                    Ok(None) => return Ok((s, token)),
                    // Died while idle (killed by someone): reap it and try the next.
                    _ => s.discard(),
                },
                None => return spawn(&self.shared.exe).map(|s| (s, token)),
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

/// The refill thread: spawns outside the lock whenever fewer than `warm` stages are idle and
/// no launch is being set up, or at once when none is idle.
///
/// A stage it starts is put under SCHED_IDLE as soon as its exec succeeded: the rest of its
/// start-up then uses only CPU time nothing else wants, instead of competing with the payloads
/// and launches of the slot. Not before the exec: until then the child holds copies of the
/// helper's descriptors (the listening socket, pilot connections), and a child starved on a
/// busy node would keep them open after the helper died. The helper sets a stage it takes back
/// to SCHED_OTHER, and the stage checks that itself.
fn refill(shared: &Shared) {
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
        match spawn(&shared.exe) {
            Ok(s) => {
                let idle = libc::sched_param { sched_priority: 0 };
                // SAFETY: sched_setscheduler on our own child, whose pid cannot be reused
                // before we reap it, with a sched_param on our stack.
                if unsafe { libc::sched_setscheduler(s.child.id() as i32, libc::SCHED_IDLE, &idle) }
                    != 0
                {
                    tracing::debug!(error = %std::io::Error::last_os_error(), "idle stage stays at normal priority");
                }
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
