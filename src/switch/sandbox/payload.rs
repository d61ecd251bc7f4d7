//! The payload's process: started by the stage (pid 1 of the payload's pid namespace) with
//! clone(CLONE_VM | CLONE_VFORK), as posix_spawn does, instead of fork. The child borrows the
//! stage's memory until its exec, so
//! there is no page-table copy on the way in and no address space to tear down in the exec
//! (a fork of the stage copies the helper binary's mappings, and the exec then unmaps them;
//! docs/benchmarks.md has the cost). The stage is suspended by the kernel meanwhile and
//! resumes once the exec succeeded or the child gave up.
//!
//! The price is discipline in the child: it shares the stage's heap, so it must not allocate,
//! lock or unwind. Everything it needs (argv, environment, the program's candidate paths,
//! the account's groups) is laid out by [`PayloadExec::new`] in the stage beforehand; the
//! child makes raw system calls on it and reports a failure as a [`Failed`] (static parts)
//! written into the stage's memory, which the stage turns into a message once it resumes.
//!
//! Steps of the child, in order: setsid, rlimits, umask, the identity switch
//! ([`privs::switch_to`], ending with no_new_privs), the payload's own Landlock domain
//! scoping abstract unix sockets and signals (scope.rs: the stage made the ruleset before its
//! plan, so this is one `landlock_restrict_self` on a descriptor, no allocation), the
//! user-namespace filter if the site wants it, chdir to scratch, the exec gate (the start
//! record is on disk), an empty signal mask, exec.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::Pid;

use super::privs::{self, Failed, Identity};
use super::step::{step, Cause, StageError, BUNDLE_ARCHIVE_STEP};
use super::wire::{Plan, GATE_OPEN};

type StepResult<T> = Result<T, StageError>;

/// Stack of the child until its exec: it runs a handful of small frames (no recursion, no
/// allocation); 64 KiB leaves ample room, with a guard page below.
const STACK_BYTES: usize = 64 * 1024;

/// Everything the payload's process needs, prepared in the stage so that the child only makes
/// system calls. Holds raw pointers into its own `CString`s (argv, envp), so it stays in the
/// stage's frame while the child runs.
pub(super) struct PayloadExec {
    identity: Identity,
    /// argv[0] and the program's candidate paths: argv[0] itself when it names a path, else
    /// each PATH directory joined with it (searched as execvpe does, as the account).
    program: String,
    path_var: String,
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    scratch: CString,
    nofile: libc::rlimit,
    core: libc::rlimit,
    deny_user_namespaces: bool,
    exec_gate: OwnedFd,
    /// The stage's Landlock ruleset (it outlives this value), when payloads are scoped.
    landlock: Option<RawFd>,
}

impl PayloadExec {
    /// Lays out the plan for the child. Fails on what the helper's validation should have
    /// caught (a NUL byte, root as the account), naming the step.
    pub fn new(
        plan: &Plan,
        exec_gate: OwnedFd,
        landlock: Option<RawFd>,
    ) -> StepResult<PayloadExec> {
        let identity = Identity::of(&plan.account)?;
        let c = |v: &str| step("exec", CString::new(v).map_err(|e| e.to_string()));
        let argv: Vec<CString> = plan.argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?;
        let envp: Vec<CString> = plan
            .env
            .iter()
            .map(|(k, v)| c(&format!("{k}={v}")))
            .collect::<Result<_, _>>()?;
        let program = plan.argv.first().cloned().unwrap_or_default();
        let path_var = plan
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let candidates = candidates(&program, &path_var)
            .iter()
            .map(|p| c(p))
            .collect::<Result<_, _>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let limit = |n: u64| libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        Ok(PayloadExec {
            identity,
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            _argv: argv,
            _envp: envp,
            program,
            path_var,
            candidates,
            scratch: CString::new(plan.scratch.as_os_str().as_encoded_bytes())
                .map_err(|e| StageError::new("chdir to scratch", e.to_string()))?,
            nofile: limit(plan.nofile),
            core: limit(plan.core_bytes),
            deny_user_namespaces: !plan.allow_user_namespaces,
            exec_gate,
            landlock,
        })
    }

    /// Starts the payload's process and returns once it exec'd (its pid), or the step that
    /// failed (the child is reaped then). Call from the single-threaded stage only.
    pub fn spawn(&self) -> StepResult<Pid> {
        let mut stack = step("spawn payload", Stack::new(STACK_BYTES))?;
        let mut failed: Option<Failed> = None;
        let slot: *mut Option<Failed> = &mut failed;
        // Every signal blocked while the child shares our memory: no handler of ours may run
        // on its stack. The child clears the mask right before its exec; ours is restored
        // when it has gone.
        let mut old = SigSet::empty();
        nix::sys::signal::sigprocmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        )
        .map_err(|e| StageError::new("block signals", e))?;
        let child = Box::new(|| {
            let Err(f) = self.child();
            // SAFETY: `slot` points at `failed` in the suspended stage's frame, which outlives
            // the child (CLONE_VFORK: the stage resumes only after this process exec'd or exited).
            unsafe { std::ptr::write_volatile(slot, Some(f)) };
            // SAFETY: _exit ends this process at once (exit_group of its own thread group,
            // which is itself); nothing of the shared memory is unwound or freed.
            unsafe { libc::_exit(127) }
        });
        // SAFETY: CLONE_VM | CLONE_VFORK: the child runs on `stack` (ours, unused by anyone
        // else) in our address space while this thread is suspended; the stage is
        // single-threaded, so no other thread can touch memory the child uses. The child
        // makes only system calls on data borrowed from `self` and ends in exec or _exit.
        let spawned = unsafe {
            nix::sched::clone(
                child,
                stack.as_mut_slice(),
                CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
                Some(libc::SIGCHLD),
            )
        };
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        let pid = step("spawn payload", spawned)?;
        // SAFETY: the child has exec'd or exited (CLONE_VFORK); nothing writes `failed` now.
        match unsafe { std::ptr::read_volatile(slot) } {
            None => Ok(pid),
            Some(f) => {
                let _ = nix::sys::wait::waitpid(pid, None);
                Err(self.describe(f))
            }
        }
    }

    /// The failed step as a message; a program that was not found names the PATH searched.
    fn describe(&self, f: Failed) -> StageError {
        let (step, msg) = f.describe();
        if step != "exec" {
            return StageError::new(step, Cause::Detail(msg));
        }
        let msg = if f.errno == libc::ENOENT && !self.program.contains('/') {
            format!(
                "exec failed: ENOENT: {} not found in PATH={}",
                self.program, self.path_var
            )
        } else {
            format!("exec failed: {msg}: {}", self.program)
        };
        StageError::new(step, Cause::Detail(msg))
    }

    /// The child, on the borrowed stack. Returns only on failure.
    ///
    /// Must not allocate, lock, panic or unwind (see the module comment).
    fn child(&self) -> Result<std::convert::Infallible, Failed> {
        // SAFETY: (all calls below) system calls with integer arguments, or pointers into
        // `self`, which the suspended stage keeps alive until this process exec'd or exited.
        unsafe {
            if libc::setsid() < 0 {
                return Err(Failed::os("setsid"));
            }
            if libc::setrlimit(libc::RLIMIT_CORE, &self.core) != 0 {
                return Err(Failed::os("set RLIMIT_CORE"));
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &self.nofile) != 0 {
                return Err(Failed::os("set RLIMIT_NOFILE"));
            }
            libc::umask(0o077);
        }
        privs::switch_to(&self.identity)?;
        // After no_new_privs (which landlock_restrict_self requires of a process without
        // CAP_SYS_ADMIN), before any code of the payload: a domain of its own (P8).
        if let Some(ruleset) = self.landlock {
            super::scope::restrict_self(ruleset)?;
        }
        if self.deny_user_namespaces {
            super::seccomp::deny_user_namespaces().map_err(|e| Failed {
                step: "seccomp: deny user namespaces",
                errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                detail: "",
            })?;
        }
        // SAFETY: as above.
        unsafe {
            if libc::chdir(self.scratch.as_ptr()) != 0 {
                return Err(Failed::os("chdir to scratch"));
            }
        }
        // Last: the start record must be on disk before the payload's own code runs (P4, P11).
        pass_exec_gate(self.exec_gate.as_raw_fd())?;
        // SAFETY: as above; `empty` lives on this stack.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(Failed::os("unblock signals"));
            }
        }
        // The PATH search of execvpe: a candidate that is missing or not a directory is
        // skipped, one the account may not execute is remembered (EACCES if nothing else
        // runs), any other error is final.
        let mut denied = false;
        for prog in &self.candidates {
            // SAFETY: NUL-terminated strings and NULL-terminated pointer arrays owned by
            // `self`.
            unsafe {
                libc::execve(
                    prog.as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                )
            };
            match nix::errno::Errno::last_raw() {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                errno => return Err(exec_failed(errno)),
            }
        }
        Err(exec_failed(if denied {
            libc::EACCES
        } else {
            libc::ENOENT
        }))
    }

    /// Unpacks the envelope's bundle (tar.gz, a sealed memfd) into scratch as the account, in
    /// a forked process of its own: [`privs::switch_to`], then the archive, never as root.
    /// Runs after the stage joined the payload cgroup, so the unpacking is the payload's (P7).
    /// The memfd is read by position: its file offset is shared with the pilot's descriptor.
    pub fn unpack_bundle(&self, bundle: OwnedFd) -> StepResult<()> {
        let s = "unpack bundle";
        let bundle = std::fs::File::from(bundle);
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| StageError::new("pipe", e))?;
        // SAFETY: the stage is single-threaded, so the child may allocate after fork.
        match step(s, unsafe { nix::unistd::fork() })? {
            nix::unistd::ForkResult::Child => {
                drop(rd);
                let result = privs::switch_to(&self.identity)
                    .map_err(|f| f.describe())
                    .and_then(|()| {
                        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
                        std::env::set_current_dir(std::ffi::OsStr::from_bytes(
                            self.scratch.as_bytes(),
                        ))
                        .map_err(|e| ("chdir to scratch".to_owned(), e.to_string()))
                    })
                    .and_then(|()| {
                        unpack(crate::protocol::switch_wire::ReadAt::new(&bundle))
                            .map_err(|e| (unpack_step(&e).to_owned(), e.to_string()))
                    });
                let code = match result {
                    Ok(()) => 0,
                    Err((step, e)) => {
                        let _ =
                            std::fs::File::from(wr).write_all(format!("{step}\n{e}").as_bytes());
                        1
                    }
                };
                // SAFETY: _exit skips the atexit handlers and buffers copied from the stage.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(wr);
                let mut msg = String::new();
                let _ = std::fs::File::from(rd).read_to_string(&mut msg);
                let status = nix::sys::wait::waitpid(child, None);
                match (status, msg.split_once('\n')) {
                    (Ok(nix::sys::wait::WaitStatus::Exited(_, 0)), _) => Ok(()),
                    // The unpacker's report crossed a pipe: text, classified by its step.
                    (_, Some((step, e))) if step == BUNDLE_ARCHIVE_STEP => Err(StageError::new(
                        BUNDLE_ARCHIVE_STEP,
                        Cause::Bundle(e.to_owned()),
                    )),
                    (_, Some((step, e))) => Err(StageError::new(
                        step.to_owned(),
                        Cause::Detail(e.to_owned()),
                    )),
                    (status, None) => Err(StageError::new(
                        s,
                        format!("the unpacker ended: {status:?}"),
                    )),
                }
            }
        }
    }
}

fn exec_failed(errno: i32) -> Failed {
    Failed {
        step: "exec",
        errno,
        detail: "",
    }
}

/// The step a failed unpacking is reported as: the archive's own fault (not gzip, not tar, an
/// entry that cannot be written as the account) is [`BUNDLE_ARCHIVE_STEP`], a caller error;
/// a full disk or quota, or no memory, is the node's ("unpack bundle"), a system error.
fn unpack_step(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        StorageFull | QuotaExceeded | OutOfMemory => "unpack bundle",
        _ => BUNDLE_ARCHIVE_STEP,
    }
}

/// Archive::unpack uses unpack_in for every entry: `..` entries are skipped, absolute paths
/// are made relative, and nothing is written through a symlink that leaves the directory.
/// The caller runs as the account, so the kernel's permission checks apply as well.
fn unpack(targz: impl std::io::Read) -> std::io::Result<()> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(targz));
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    ar.unpack(".")
}

/// Paths to try for `program`: itself when it contains a slash, else PATH's directories.
fn candidates(program: &str, path_var: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .collect()
}

/// Blocks until the helper opens the exec gate; a failure when it withdrew the launch.
fn pass_exec_gate(fd: libc::c_int) -> Result<(), Failed> {
    let s = "wait for the start record";
    let mut b = 0u8;
    loop {
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        match n {
            1 if b == GATE_OPEN => return Ok(()),
            -1 if nix::errno::Errno::last_raw() == libc::EINTR => continue,
            -1 => return Err(Failed::os(s)),
            _ => return Err(Failed::check(s, "the launch was withdrawn")),
        }
    }
}

/// An anonymous mapping for the child's stack, with an inaccessible guard page below it.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    fn new(bytes: usize) -> Result<Stack, String> {
        let guard = page_size();
        let len = bytes + guard;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("stack: {}", std::io::Error::last_os_error()));
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of the mapping we just made.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            return Err(format!("stack guard: {}", std::io::Error::last_os_error()));
        }
        Ok(stack)
    }

    /// The usable part, above the guard page.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        let guard = page_size();
        // SAFETY: [base + guard, base + len) is mapped read-write and owned by this Stack.
        unsafe {
            std::slice::from_raw_parts_mut(self.base.cast::<u8>().add(guard), self.len - guard)
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, no longer used (the child is gone).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf with a constant name.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_candidates_follow_path_or_the_given_path() {
        assert_eq!(candidates("/bin/true", "/usr/bin"), vec!["/bin/true"]);
        assert_eq!(candidates("./run.sh", "/usr/bin"), vec!["./run.sh"]);
        assert_eq!(
            candidates("true", "/usr/local/bin::/usr/bin/"),
            vec!["/usr/local/bin/true", "/usr/bin/true"]
        );
        assert!(candidates("true", "").is_empty());
    }
}
