//! Cgroups, v1 and v2, for both programs that need them: the helper places each payload in a
//! cgroup below its pilot's, limits it, kills every member and reads its usage; the pilot's slot
//! discovery reads the limits its own cgroup and every ancestor set.
//!
//! What reads the system goes through a [`Host`], whose `/proc` root (and with it the
//! mountinfo that names the hierarchies) is a parameter, so placement and the ancestor-quota
//! logic are unit-tested against a tree of plain files (as firecracker's jailer tests its
//! cgroups against a mock `/proc/mounts`); the live kernel is tested by the integration tests
//! (v1 on the build host, v2 in the VM: docs/testing.md). This module writes only cgroupfs
//! files: it never forks and never signals a process it did not read from a payload cgroup.
//! Why not cgroups-rs: docs/security-model.md, "cgroups: v1 and v2".
//!
//! - [`membership`]: `/proc/PID/cgroup` lines; [`mounts`]: the hierarchies from mountinfo;
//!   [`limits`]: limit files and the ancestors they bind (shared with `pilot::slot::cgroup`);
//! - [`v1`], [`v2`]: each layout as a type of its own; [`Cgroup`] is either.

pub mod limits;
pub mod membership;
pub(crate) mod mounts;
pub(crate) mod v1;
pub(crate) mod v2;

mod files;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use membership::Membership;
pub use mounts::{Mount, MountCache};
pub use v1::{PilotJoin, V1Cgroup};
pub use v2::V2Cgroup;

/// Errors of the cgroup layer, each naming the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot create cgroup {path}: {source} (if it exists, a payload with this id is running or was not cleaned up)")]
    Create { path: PathBuf, source: io::Error },
    #[error("no usable cgroup hierarchy: {0}; mount cgroup v2 on /sys/fs/cgroup or the v1 memory, cpu, cpuacct, pids and freezer controllers")]
    NoHierarchy(String),
    #[error("pilot process {pid} has no cgroup in the {controller} hierarchy ({path}); is the pilot still running?")]
    NoPilotCgroup {
        pid: i32,
        controller: String,
        path: PathBuf,
    },
    #[error("cgroup v2 controller {controller} is not available in {path}; enable it in the ancestors' cgroup.subtree_control (systemd: Delegate=yes for the pilot's unit or the batch system's cgroup plugin)")]
    ControllerMissing {
        controller: &'static str,
        path: PathBuf,
    },
    #[error("cgroup {path} still has processes after {seconds}s of killing")]
    NotEmpty { path: PathBuf, seconds: u64 },
}

/// Limits applied to a payload cgroup.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cores: u32,
    pub pids_max: u64,
}

/// Resource use read from the cgroup at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// The most memory ever charged to the cgroup; None where the kernel keeps no peak (cgroup
    /// v2 before Linux 5.19, see [`LiveUsage`]).
    pub peak_memory_bytes: Option<u64>,
    /// The kernel's OOM killer killed a process of this cgroup.
    pub oom_killed: bool,
}

/// What a running payload uses now, read from its cgroup for the pilot's heartbeats and the
/// VO's `information` requests (docs/protocol.md): the CPU time of all its processes so far,
/// the memory charged to it now, and the most ever charged to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveUsage {
    /// v1 `cpuacct.usage` (ns), v2 `cpu.stat` `usage_usec`.
    pub cpu_seconds: f64,
    /// v1 `memory.usage_in_bytes`, v2 `memory.current` (page cache included, as the limit
    /// counts it).
    pub memory_bytes: u64,
    /// v1 `memory.max_usage_in_bytes`, v2 `memory.peak`; None on v2 kernels before 5.19,
    /// which have no `memory.peak`: the kernel keeps no peak there, and a maximum of the
    /// samples the helper happened to take would understate it, so none is claimed.
    pub peak_memory_bytes: Option<u64>,
}

/// The CPU period of payload cgroups: the kernel's default for a new cgroup (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The system as this module sees it: a `/proc` (whose `self/mountinfo` names the cgroup
/// hierarchies, parsed again only when the mount table changed, and whose `PID/cgroup` names a
/// process's cgroups). [`Host::system`] is the live one; tests make their own with [`Host::new`].
#[derive(Debug)]
pub struct Host {
    proc: PathBuf,
    mounts: MountCache,
}

impl Host {
    /// The system below `proc` (the live one: `/proc`).
    pub fn new(proc: impl Into<PathBuf>) -> Host {
        let proc = proc.into();
        Host {
            mounts: MountCache::new(proc.join("self/mountinfo")),
            proc,
        }
    }

    /// The live system, shared by the helper's connections (one mountinfo cache).
    pub fn system() -> &'static Host {
        static SYSTEM: OnceLock<Host> = OnceLock::new();
        SYSTEM.get_or_init(|| Host::new("/proc"))
    }

    /// The cgroup mounts (see [`MountCache`]).
    pub fn mounts(&self) -> Result<Arc<Vec<Mount>>, CgroupError> {
        self.mounts.get()
    }

    /// A process's cgroups as `PROC/PID/cgroup` lists them now.
    pub fn pilot_cgroups(&self, pid: i32) -> Result<PilotCgroups, CgroupError> {
        Ok(PilotCgroups {
            pid,
            lines: self.cgroup_lines(&format!("{pid}/cgroup"))?,
        })
    }

    fn cgroup_lines(&self, rel: &str) -> Result<Vec<Membership>, CgroupError> {
        let text = files::read(&self.proc.join(rel))?;
        Ok(membership::parse_all(&text).0)
    }

    /// Finds where `<pilot's cgroup>/<name>` goes, creating no payload cgroup: on v1 in each
    /// of memory, cpu, cpuacct, pids and freezer (and the pilot's own cpuset and devices
    /// cgroups to join, where mounted); on v2 beside the pilot's `pilot` leaf, readying the
    /// parent ([`v2::locate`]). A host with a v1 memory hierarchy mounted is v1 (hybrid
    /// systems too), otherwise v2.
    pub fn locate(&self, pilot: &PilotCgroups, name: &str) -> Result<Located, CgroupError> {
        let mounts = self.mounts()?;
        if mounts.iter().any(|m| !m.v2 && m.has("memory")) {
            let (cgroup, joins) = v1::locate(&mounts, &pilot.lines, pilot.pid, name)?;
            return Ok(Located {
                cgroup: Cgroup::V1(cgroup),
                joins,
            });
        }
        if !mounts.iter().any(|m| m.v2 && m.has("memory")) {
            return Err(CgroupError::NoHierarchy(format!(
                "no memory controller in {}",
                self.mounts.path().display()
            )));
        }
        Ok(Located {
            cgroup: Cgroup::V2(v2::locate(&mounts, &pilot.lines, pilot.pid, name)?),
            joins: Vec::new(),
        })
    }
}

/// The calling process's cgroups, as (controllers, path) per line of /proc/self/cgroup: what
/// [`Located::join_files`] compares with.
pub fn own_cgroups() -> Result<Vec<(Vec<String>, String)>, CgroupError> {
    Ok(Host::system()
        .cgroup_lines("self/cgroup")?
        .into_iter()
        .map(|m| (m.controllers, m.path))
        .collect())
}

/// A pilot's cgroups as `/proc/PID/cgroup` listed them when they were read: the helper reads
/// them once, at hello, through the pilot's pidfd (`switch::peer`), and places every payload of
/// that connection below them, whatever later happens to the pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PilotCgroups {
    /// The process they were read from (for messages).
    pub pid: i32,
    lines: Vec<Membership>,
}

impl PilotCgroups {
    /// Reads `/proc/PID/cgroup` now. (The caller confirms the process still exists after.)
    pub fn read(pid: i32) -> Result<PilotCgroups, CgroupError> {
        Host::system().pilot_cgroups(pid)
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// One payload cgroup, of either layout. Serializable so the stage knows which files to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cgroup {
    V1(V1Cgroup),
    V2(V2Cgroup),
}

/// A payload cgroup whose place is known but which is not created yet ([`Host::locate`]).
/// The helper finds the place and sends it with the plan, then creates it ([`Located::create`])
/// while the stage builds the scratch view; the stage joins it ([`Located::join_files`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Located {
    cgroup: Cgroup,
    /// v1: the pilot's own cgroups the payload joins as they are (see [`v1::OPTIONAL`]).
    joins: Vec<PilotJoin>,
}

impl Located {
    /// The cgroup as it will be once created (paths only).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The files a single-threaded process writes "0" to in order to join the payload
    /// cgroup: [`Cgroup::join_files`] of the payload's own, and on v1 the `tasks` of the
    /// pilot's cpuset and devices cgroups, unless `own` (the caller's /proc/self/cgroup,
    /// [`own_cgroups`]) shows it there already: the stage inherits the helper's, which often
    /// are the pilot's too (both in the root cgroup), and every join costs a write.
    pub fn join_files(&self, own: &[(Vec<String>, String)]) -> Vec<PathBuf> {
        let mut files = self.cgroup.join_files();
        files.extend(
            self.joins
                .iter()
                .filter(|j| {
                    !own.iter()
                        .any(|(c, p)| *c == j.membership.controllers && *p == j.membership.path)
                })
                .map(|j| j.dir.join("tasks")),
        );
        files
    }

    /// Moves the calling process out of the payload cgroup, so that it can be removed: on v1
    /// into the parent of each hierarchy's directory (the pilot's cgroup), on v2 into the root
    /// cgroup (the pilot's parent enables controllers for its children and may hold no
    /// process). For the stage's cleanup after the helper died; errors are ignored (the
    /// removal that follows then fails and leaves an empty cgroup).
    pub fn leave(&self) {
        let targets: Vec<PathBuf> = match &self.cgroup {
            Cgroup::V1(c) => c
                .dirs()
                .iter()
                .filter_map(|d| Some(d.parent()?.join("tasks")))
                .collect(),
            Cgroup::V2(c) => vec![c.mount.join("cgroup.procs")],
        };
        for t in targets {
            let _ = std::fs::write(t, "0");
        }
    }

    /// Creates the directories and sets the limits. On failure nothing created here is left.
    pub fn create(self, limits: Limits) -> Result<Cgroup, CgroupError> {
        match &self.cgroup {
            Cgroup::V1(c) => c.create_dirs()?,
            Cgroup::V2(c) => files::mkdir_new(&c.dir)?,
        }
        let limited = match &self.cgroup {
            Cgroup::V1(c) => c.set_limits(limits),
            Cgroup::V2(c) => c.set_limits(limits),
        };
        if let Err(e) = limited {
            self.cgroup.remove();
            return Err(e);
        }
        Ok(self.cgroup)
    }
}

impl Cgroup {
    /// Creates `<pilot's cgroup>/<name>` with the given limits on the live system:
    /// [`Cgroup::locate`], then [`Located::create`].
    pub fn create(pilot: &PilotCgroups, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        Self::locate(pilot, name)?.create(limits)
    }

    /// [`Host::locate`] on the live system.
    pub fn locate(pilot: &PilotCgroups, name: &str) -> Result<Located, CgroupError> {
        Host::system().locate(pilot, name)
    }

    /// The files a single-threaded process writes "0" to in order to join this cgroup: v1
    /// each hierarchy's `tasks` ([`V1Cgroup::join_files`]), v2 `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1(c) => c.join_files(),
            Cgroup::V2(c) => vec![c.procs_file()],
        }
    }

    /// The `cgroup.procs` files listing this cgroup's processes.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1(c) => c.procs_files(),
            Cgroup::V2(c) => vec![c.procs_file()],
        }
    }

    /// A printable name: the v2 directory or the v1 memory directory.
    pub fn display(&self) -> String {
        self.dir().display().to_string()
    }

    fn dir(&self) -> &Path {
        match self {
            Cgroup::V1(c) => &c.memory,
            Cgroup::V2(c) => &c.dir,
        }
    }

    /// Every process currently in the cgroup (v1: union over hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self
            .procs_files()
            .iter()
            .flat_map(|p| files::pids_in(p))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Sends `sig` to every process in the cgroup except those in `skip`.
    #[allow(unsafe_code)] // kill(2) with a raw signal number
    pub fn signal(&self, sig: i32, skip: &[i32]) -> io::Result<()> {
        for pid in self.pids() {
            if skip.contains(&pid) {
                continue;
            }
            // SAFETY: kill(2) has no memory effects; the pid was just read from the cgroup
            // (a recycled pid would have to be in this cgroup too, which only payload
            // processes can be).
            let r = unsafe { libc::kill(pid, sig) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Kills every process in the cgroup and waits until it is empty (at most 10 s).
    /// v2: cgroup.kill (or a freeze and SIGKILL loop before 5.14); v1: freeze, SIGKILL, thaw,
    /// repeat.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_but_exiting(&[])
    }

    /// [`Cgroup::kill_all`], but done as soon as only processes in `exiting` are left: our own
    /// processes that are already on their way out (a namespace's stage, pid 1, after its last
    /// payload process was reaped), whose exit need not be waited for.
    pub fn kill_all_but_exiting(&self, exiting: &[i32]) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let v2_killer = match self {
            Cgroup::V2(c) => Some(c.killer()),
            Cgroup::V1(_) => None,
        };
        let signal_all = || {
            let _ = self.signal(libc::SIGKILL, &[]);
        };
        loop {
            let watched = match self {
                Cgroup::V1(c) => c.watched_pids(),
                Cgroup::V2(c) => files::pids_in(&c.procs_file()),
            };
            if watched.iter().all(|p| exiting.contains(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::NotEmpty {
                    path: self.dir().to_owned(),
                    seconds: 10,
                });
            }
            match (self, &v2_killer) {
                (Cgroup::V1(c), _) => c.kill_round(signal_all),
                (Cgroup::V2(_), Some(k)) => k.round(signal_all),
                (Cgroup::V2(_), None) => unreachable!("v2 has its killer"),
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// Reads CPU time, peak memory and whether the OOM killer fired.
    pub fn usage(&self) -> Usage {
        match self {
            Cgroup::V1(c) => c.usage(),
            Cgroup::V2(c) => c.usage(),
        }
    }

    /// What the payload uses now: three reads of cgroupfs files (v1 and v2 alike), no
    /// process is touched. A file that cannot be read counts as 0 (the payload may be
    /// ending and its cgroup going).
    pub fn live_usage(&self) -> LiveUsage {
        match self {
            Cgroup::V1(c) => c.live_usage(),
            Cgroup::V2(c) => c.live_usage(),
        }
    }

    /// Removes the cgroup directories, retrying briefly on EBUSY. Errors are ignored beyond
    /// that: a cgroup that cannot be removed is empty and harmless, and is logged by the caller.
    pub fn remove(&self) -> bool {
        match self {
            Cgroup::V1(c) => files::remove_dirs(&c.dirs()),
            Cgroup::V2(c) => files::remove_dirs(&[&c.dir]),
        }
    }
}

#[cfg(test)]
mod tests;
