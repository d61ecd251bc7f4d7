//! cgroup v1: a payload cgroup is a directory in each of the memory, cpu, cpuacct, pids and
//! freezer hierarchies (one directory where controllers share a hierarchy), below the pilot's
//! cgroup there; in the cpuset and devices hierarchies the payload joins the pilot's own cgroup.
//!
//! Writes only cgroupfs files and never forks; every path comes from a [`Mount`] and a
//! [`Membership`], so unit tests run it against a tree of plain files.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::files::{keyed, mkdir_new, number, pids_in, read, write, write_if_present};
use super::limits::{self, CpuQuota};
use super::membership::Membership;
use super::mounts::Mount;
use super::{CgroupError, Limits, LiveUsage, Usage, CPU_PERIOD_US};

/// The v1 controllers every payload cgroup is created in.
pub const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];
/// v1 controllers whose hierarchies the payload joins *at* the pilot's cgroup when mounted,
/// so a batch system's CPU pinning (cpuset) and device restrictions (devices, e.g. GPUs) keep
/// holding (P7). They take no limit of ours and are not read, so no child is made there: a
/// child of either adds a mkdir, an rmdir (and for cpuset two copies) to every payload.
pub const OPTIONAL: [&str; 2] = ["cpuset", "devices"];

/// A payload's v1 cgroup: its directory in the hierarchy of each controller it is limited,
/// accounted or killed through. Controllers that share a hierarchy (`cpu,cpuacct`) have the
/// same directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Cgroup {
    pub memory: PathBuf,
    pub cpu: PathBuf,
    pub cpuacct: PathBuf,
    pub pids: PathBuf,
    pub freezer: PathBuf,
    /// The directory (one of the above) whose hierarchy also holds cpuset, when cpuset is
    /// mounted together with one of ours: a new cpuset cgroup needs the parent's CPUs and
    /// memory nodes before it can take a process.
    pub cpuset: Option<PathBuf>,
}

/// The pilot's own cgroup in a hierarchy of only [`OPTIONAL`] controllers, which the payload
/// joins as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PilotJoin {
    /// The pilot's line of `/proc/PID/cgroup` for that hierarchy.
    pub membership: Membership,
    /// Its directory.
    pub dir: PathBuf,
}

/// Where `name` goes below the pilot's cgroups (`lines`, of process `pid`, for messages).
pub fn locate(
    mounts: &[Mount],
    lines: &[Membership],
    pid: i32,
    name: &str,
) -> Result<(V1Cgroup, Vec<PilotJoin>), CgroupError> {
    let pilot_line = |ctrl: &str, m: &Mount| {
        lines
            .iter()
            .find(|l| l.has(ctrl))
            .ok_or_else(|| CgroupError::NoPilotCgroup {
                pid,
                controller: ctrl.into(),
                path: m.point.clone(),
            })
    };
    let mount = |ctrl: &str| mounts.iter().find(|m| !m.v2 && m.has(ctrl));
    let mut cpuset = None;
    let mut dir = |ctrl: &'static str| -> Result<PathBuf, CgroupError> {
        let m = mount(ctrl).ok_or_else(|| {
            CgroupError::NoHierarchy(format!("v1 controller {ctrl} is not mounted"))
        })?;
        let d = m.dir_of(&pilot_line(ctrl, m)?.path).join(name);
        if m.has("cpuset") {
            cpuset = Some(d.clone());
        }
        Ok(d)
    };
    let cgroup = V1Cgroup {
        memory: dir("memory")?,
        cpu: dir("cpu")?,
        cpuacct: dir("cpuacct")?,
        pids: dir("pids")?,
        freezer: dir("freezer")?,
        cpuset,
    };
    let mut joins: Vec<PilotJoin> = Vec::new();
    for ctrl in OPTIONAL {
        let Some(m) = mount(ctrl) else { continue };
        if CONTROLLERS.iter().any(|c| m.has(c)) || joins.iter().any(|j| j.membership.has(ctrl)) {
            continue; // a hierarchy of ours (the payload has a directory there), or listed
        }
        let line = pilot_line(ctrl, m)?;
        joins.push(PilotJoin {
            membership: line.clone(),
            dir: m.dir_of(&line.path),
        });
    }
    Ok((cgroup, joins))
}

impl V1Cgroup {
    /// Each hierarchy's directory once, memory first.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::with_capacity(5);
        for d in [
            &self.memory,
            &self.cpu,
            &self.cpuacct,
            &self.pids,
            &self.freezer,
        ] {
            if !out.contains(&d.as_path()) {
                out.push(d);
            }
        }
        out
    }

    /// Makes each directory (a cpuset one gets the parent's CPUs and memory nodes); removes the
    /// ones it made when one fails, never one that existed before.
    pub fn create_dirs(&self) -> Result<(), CgroupError> {
        let dirs = self.dirs();
        for (i, dir) in dirs.iter().enumerate() {
            let made = mkdir_new(dir).and_then(|()| {
                if self.cpuset.as_deref() != Some(*dir) {
                    return Ok(());
                }
                // A v1 cpuset cgroup starts empty and cannot take tasks: copy the pilot's.
                let parent = dir.parent().unwrap_or(Path::new("/"));
                ["cpuset.cpus", "cpuset.mems"]
                    .iter()
                    .try_for_each(|f| write(&dir.join(f), read(&parent.join(f))?.trim()))
            });
            if let Err(e) = made {
                let upto = if matches!(e, CgroupError::Create { .. }) {
                    i
                } else {
                    i + 1
                };
                super::files::remove_dirs(&dirs[..upto]);
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn set_limits(&self, l: Limits) -> Result<(), CgroupError> {
        let quota = CPU_PERIOD_US * u64::from(l.cores.max(1));
        let bytes = l.memory_bytes.to_string();
        write(&self.memory.join("memory.limit_in_bytes"), &bytes)?;
        // No swap: memory+swap limit equal to the memory limit (absent without swap accounting).
        write_if_present(&self.memory.join("memory.memsw.limit_in_bytes"), &bytes)?;
        // The period stays the kernel's default for a new cgroup (100 ms, CPU_PERIOD_US): one
        // write less per payload.
        let quota_file = self.cpu.join("cpu.cfs_quota_us");
        match write(&quota_file, &quota.to_string()) {
            // v1 refuses a child quota above an ancestor's (EINVAL); the batch limit is the
            // ceiling anyway (P7), so clamp to the tightest ancestor. Read only then: the
            // ancestors' files cost a read each on every launch.
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                let clamped =
                    ancestor_quota(&self.cpu, CPU_PERIOD_US).map_or(quota, |q| quota.min(q));
                write(&quota_file, &clamped.to_string())?;
            }
            r => r?,
        }
        write(&self.pids.join("pids.max"), &l.pids_max.to_string())
    }

    /// Each hierarchy's `tasks`: moving only the calling thread (pid 0 = current) lets the
    /// kernel skip the global threadgroup rwsem, whose write side waits for an RCU grace period
    /// (docs/security-model.md, "cgroups: v1 and v2"; the cost in docs/benchmarks.md). The
    /// stage is single-threaded, so its one thread is the whole process.
    pub fn join_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("tasks")).collect()
    }

    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The processes the kill loop waits for: those of the freezer hierarchy, the one it
    /// freezes and kills through. Every payload process is in all of the payload's hierarchies
    /// (the stage joined them all before the payload existed, children inherit them, and only
    /// root can move a process out), so one list is the whole set and saves a read per
    /// hierarchy on every payload's exit.
    pub fn watched_pids(&self) -> Vec<i32> {
        pids_in(&self.freezer.join("cgroup.procs"))
    }

    /// One round of killing: freeze (frozen processes cannot fork while we kill them), SIGKILL
    /// everything, thaw. Errors are ignored: the cgroup may have emptied meanwhile.
    pub fn kill_round(&self, signal_all: impl Fn()) {
        let f = self.freezer.join("freezer.state");
        let _ = fs::write(&f, "FROZEN");
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until
            && fs::read_to_string(&f)
                .map(|s| s.trim() == "FREEZING")
                .unwrap_or(false)
        {
            sleep(Duration::from_millis(2));
        }
        signal_all();
        let _ = fs::write(&f, "THAWED");
    }

    pub fn usage(&self) -> Usage {
        Usage {
            cpu_seconds: number(&self.cpuacct.join("cpuacct.usage")) as f64 / 1e9,
            peak_memory_bytes: Some(number(&self.memory.join("memory.max_usage_in_bytes"))),
            oom_killed: keyed(&self.memory.join("memory.oom_control"), "oom_kill") > 0,
        }
    }

    pub fn live_usage(&self) -> LiveUsage {
        LiveUsage {
            cpu_seconds: number(&self.cpuacct.join("cpuacct.usage")) as f64 / 1e9,
            memory_bytes: number(&self.memory.join("memory.usage_in_bytes")),
            peak_memory_bytes: Some(number(&self.memory.join("memory.max_usage_in_bytes"))),
        }
    }
}

/// The smallest CPU quota of any ancestor of `dir`, scaled to `period`; `None` if unlimited.
/// The walk ends where the files end (above the hierarchy's mount point); an unreadable or
/// malformed value limits nothing.
pub fn ancestor_quota(dir: &Path, period: u64) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut cur = dir.parent();
    while let Some(d) = cur {
        let (Ok(q), Ok(p)) = (
            fs::read_to_string(d.join("cpu.cfs_quota_us")),
            fs::read_to_string(d.join("cpu.cfs_period_us")),
        ) else {
            break;
        };
        if let (Ok(Some(quota_us)), Ok(period_us)) = (limits::v1_quota(&q), limits::v1_period(&p)) {
            if quota_us > 0 {
                let scaled = CpuQuota {
                    quota_us,
                    period_us,
                }
                .scaled_to(period);
                best = Some(best.map_or(scaled, |b| b.min(scaled)));
            }
        }
        cur = d.parent();
    }
    best
}
