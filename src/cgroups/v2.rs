//! cgroup v2: a payload cgroup is one directory in the unified hierarchy, beside the `pilot`
//! leaf the job cgroup's own processes move into (the no-internal-processes rule), so payloads
//! are siblings of the pilot and never nest.
//!
//! Writes only cgroupfs files and never forks; every path comes from a [`Mount`] and a
//! [`Membership`], so unit tests run it against a tree of plain files.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::files::{
    keyed, mkdir, number, number_if_present, pids_in, read, write, write_if_present,
};
use super::membership::Membership;
use super::mounts::Mount;
use super::{CgroupError, Limits, LiveUsage, Usage, CPU_PERIOD_US};

/// v2 controllers enabled for the payload cgroups.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The leaf the job cgroup's own processes move into.
pub const PILOT_LEAF: &str = "pilot";

/// A payload's v2 cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V2Cgroup {
    /// Its directory.
    pub dir: PathBuf,
    /// The hierarchy's mount point: the root cgroup, which may hold processes whatever its
    /// children, is where a process goes to leave.
    pub mount: PathBuf,
}

/// Where `name` goes below the pilot's cgroup (`lines`, of process `pid`, for messages), and
/// readies its parent: the pilot's processes move into the leaf and memory, cpu and pids get
/// enabled for children (after the first launch of a pilot, two reads). That part reads and
/// writes pids, so it runs in the host's pid namespace.
pub fn locate(
    mounts: &[Mount],
    lines: &[Membership],
    pid: i32,
    name: &str,
) -> Result<V2Cgroup, CgroupError> {
    let Some(m) = mounts.iter().find(|m| m.v2 && m.has("memory")) else {
        return Err(CgroupError::NoHierarchy(
            "no memory controller in the mount table".into(),
        ));
    };
    let line = lines
        .iter()
        .find(|l| l.is_unified())
        .ok_or_else(|| CgroupError::NoPilotCgroup {
            pid,
            controller: "unified".into(),
            path: m.point.clone(),
        })?;
    let parent = payload_parent(&m.dir_of(&line.path), &m.point);
    prepare_parent(&parent, &m.point)?;
    Ok(V2Cgroup {
        dir: parent.join(name),
        mount: m.point.clone(),
    })
}

/// The cgroup payloads go into, given the pilot's: its parent when the pilot already sits in
/// the `pilot` leaf a previous launch made (payloads are siblings of the leaf, not nested).
fn payload_parent(pilot_cg: &Path, mount: &Path) -> PathBuf {
    match (pilot_cg.file_name(), pilot_cg.parent()) {
        (Some(n), Some(p)) if n == PILOT_LEAF && pilot_cg != mount => p.to_owned(),
        _ => pilot_cg.to_owned(),
    }
}

/// Checks the controllers are available in `parent` and enabled for its children, after
/// moving its own processes into the `pilot` leaf (the root cgroup is exempt from the rule).
fn prepare_parent(parent: &Path, mount: &Path) -> Result<(), CgroupError> {
    let available = read(&parent.join("cgroup.controllers"))?;
    for c in CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(CgroupError::ControllerMissing {
                controller: c,
                path: parent.to_owned(),
            });
        }
    }
    for attempt in 0..20 {
        if parent != mount {
            move_procs_to_leaf(parent)?;
        }
        let enabled = read(&parent.join("cgroup.subtree_control"))?;
        let mut result = Ok(());
        for c in CONTROLLERS {
            if !enabled.split_whitespace().any(|e| e == c) {
                result = write(&parent.join("cgroup.subtree_control"), &format!("+{c}"));
                if result.is_err() {
                    break;
                }
            }
        }
        match result {
            // EBUSY: a process appeared (forked) between the move and the write.
            Err(CgroupError::Write { ref source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && attempt < 19 =>
            {
                sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
    Ok(())
}

fn move_procs_to_leaf(parent: &Path) -> Result<(), CgroupError> {
    let procs = parent.join("cgroup.procs");
    if pids_in(&procs).is_empty() {
        return Ok(());
    }
    let leaf = parent.join(PILOT_LEAF);
    mkdir(&leaf)?;
    let to = leaf.join("cgroup.procs");
    for _ in 0..20 {
        let pids = pids_in(&procs);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // A process may exit between read and write: ESRCH is fine.
            match fs::write(&to, pid.to_string()) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                    return Err(CgroupError::Write {
                        path: to,
                        value: pid.to_string(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

impl V2Cgroup {
    pub fn set_limits(&self, l: Limits) -> Result<(), CgroupError> {
        let quota = CPU_PERIOD_US * u64::from(l.cores.max(1));
        write(&self.dir.join("memory.max"), &l.memory_bytes.to_string())?;
        write_if_present(&self.dir.join("memory.swap.max"), "0")?;
        write(
            &self.dir.join("cpu.max"),
            &format!("{quota} {CPU_PERIOD_US}"),
        )?;
        write(&self.dir.join("pids.max"), &l.pids_max.to_string())
    }

    /// `cgroup.procs`: v2 allows thread moves only inside a threaded subtree.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn usage(&self) -> Usage {
        Usage {
            cpu_seconds: keyed(&self.dir.join("cpu.stat"), "usage_usec") as f64 / 1e6,
            peak_memory_bytes: number_if_present(&self.dir.join("memory.peak")),
            oom_killed: keyed(&self.dir.join("memory.events"), "oom_kill") > 0,
        }
    }

    /// `memory.peak` exists from Linux 5.19 on; before, the peak is None (see [`LiveUsage`]).
    pub fn live_usage(&self) -> LiveUsage {
        LiveUsage {
            cpu_seconds: keyed(&self.dir.join("cpu.stat"), "usage_usec") as f64 / 1e6,
            memory_bytes: number(&self.dir.join("memory.current")),
            peak_memory_bytes: number_if_present(&self.dir.join("memory.peak")),
        }
    }

    /// How [`super::Cgroup::kill_all`] kills: `cgroup.kill` (5.14+), else freeze with
    /// `cgroup.freeze` and SIGKILL (fatal signals reach frozen tasks), else SIGKILL alone.
    pub fn killer(&self) -> Killer {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            return Killer::Kill(kill);
        }
        let freeze = self.dir.join("cgroup.freeze");
        if freeze.exists() {
            return Killer::Freeze(freeze);
        }
        Killer::Signal
    }
}

/// See [`V2Cgroup::killer`].
pub enum Killer {
    Kill(PathBuf),
    Freeze(PathBuf),
    Signal,
}

impl Killer {
    /// One round; errors are ignored (the cgroup may have emptied meanwhile).
    pub fn round(&self, signal_all: impl Fn()) {
        match self {
            Killer::Kill(k) => {
                let _ = fs::write(k, "1");
            }
            Killer::Freeze(f) => {
                let _ = fs::write(f, "1");
                signal_all();
                let _ = fs::write(f, "0");
            }
            Killer::Signal => signal_all(),
        }
    }
}
