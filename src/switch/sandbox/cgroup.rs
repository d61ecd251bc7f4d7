//! Payload cgroups, v1 and v2 behind one type: create below the pilot's cgroup, set limits,
//! signal and kill every member, read usage, remove.
//!
//! Runs in the (multi-threaded) helper; it only writes cgroupfs files and never forks. Our own
//! small module instead of cgroups-rs: we need five operations on two layouts, including the
//! v2 "move the pilot into a leaf" step and the v1 freezer kill loop, and we want each failure to
//! name the file and value that failed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
    pub peak_memory_bytes: u64,
    /// The kernel's OOM killer killed a process of this cgroup.
    pub oom_killed: bool,
}

/// The v1 controllers every payload cgroup is created in.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];
/// v1 controllers whose hierarchies the payload joins *at* the pilot's cgroup when mounted,
/// so a batch system's CPU pinning (cpuset) and device restrictions (devices, e.g. GPUs) keep
/// holding (P7). They take no limit of ours and are not read, so no child is made there: a
/// child of either adds a mkdir, an rmdir (and for cpuset two copies) to every payload.
const V1_OPTIONAL: [&str; 2] = ["cpuset", "devices"];

/// v2 controllers enabled for the payload cgroups.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// v2 leaf the job cgroup's own processes move into (no-internal-processes rule).
const PILOT_LEAF: &str = "pilot";

/// One payload cgroup. Serializable so the stage knows which `cgroup.procs` files to join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Cgroup {
    /// One directory per v1 hierarchy (cpu and cpuacct may share one).
    V1 {
        /// (controllers of the hierarchy, directory of the payload cgroup in it)
        dirs: Vec<(Vec<String>, PathBuf)>,
    },
    /// The directory of the payload cgroup in the unified hierarchy.
    V2 { dir: PathBuf },
}

/// A cgroup mount from /proc/self/mountinfo.
struct Mount {
    point: PathBuf,
    root: String,
    v2: bool,
    controllers: Vec<String>,
}

/// The cgroup mounts as last parsed, and a descriptor of /proc/self/mountinfo opened before
/// that parse: the kernel flags it to poll(2) with POLLPRI|POLLERR once the mount table
/// changed (proc(5)).
struct MountCache {
    watch: fs::File,
    mounts: Arc<Vec<Mount>>,
}

static MOUNTS: Mutex<Option<MountCache>> = Mutex::new(None);

/// The cgroup mounts of this process's mount namespace, parsed again only after the mount
/// table changed (reading and parsing mountinfo cost about 0.14 ms per launch).
fn mounts() -> Result<Arc<Vec<Mount>>, CgroupError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut cache = MOUNTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.as_ref() {
        let mut fds = [PollFd::new(c.watch.as_fd(), PollFlags::POLLPRI)];
        if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
            return Ok(c.mounts.clone());
        }
    }
    let path = PathBuf::from("/proc/self/mountinfo");
    // Opened first: a change during or after the parse below shows on the next poll.
    let watch = fs::File::open(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    let mounts = Arc::new(parse_mounts(&path)?);
    *cache = Some(MountCache {
        watch,
        mounts: mounts.clone(),
    });
    Ok(mounts)
}

fn parse_mounts(path: &Path) -> Result<Vec<Mount>, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        // "id parent maj:min root point opts [tags] - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let v2 = match r[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let point = PathBuf::from(unescape(l[4]));
        let controllers = if v2 {
            fs::read_to_string(point.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        } else {
            r[2].split(',').map(str::to_owned).collect()
        };
        out.push(Mount {
            point,
            root: unescape(l[3]),
            v2,
            controllers,
        });
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The calling process's cgroups, as (controllers, path) per line of /proc/self/cgroup: what
/// [`Located::join_files`] compares with.
pub fn own_cgroups() -> Result<Vec<(Vec<String>, String)>, CgroupError> {
    cgroup_lines(PathBuf::from("/proc/self/cgroup"))
}

/// (hierarchy id line controllers, path) from /proc/<pid>/cgroup.
/// A pilot's cgroups as `/proc/PID/cgroup` listed them when they were read: the helper reads
/// them once, at hello, through the pilot's pidfd (`switch::peer`), and places every payload of
/// that connection below them, whatever later happens to the pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PilotCgroups {
    /// The process they were read from (for messages).
    pub pid: i32,
    /// (controllers, path) per hierarchy; the v2 line has no controllers.
    lines: Vec<(Vec<String>, String)>,
}

impl PilotCgroups {
    /// Reads `/proc/PID/cgroup` now. (The caller confirms the process still exists after.)
    pub fn read(pid: i32) -> Result<PilotCgroups, CgroupError> {
        Ok(PilotCgroups {
            pid,
            lines: cgroup_lines(PathBuf::from(format!("/proc/{pid}/cgroup")))?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

fn cgroup_lines(path: PathBuf) -> Result<Vec<(Vec<String>, String)>, CgroupError> {
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrl = it.next()?;
            let p = it.next()?;
            Some((
                ctrl.split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                p.to_owned(),
            ))
        })
        .collect())
}

/// Joins a mount point and a cgroup path as seen in /proc/PID/cgroup.
fn join_mount(m: &Mount, cg_path: &str) -> PathBuf {
    let rel = if m.root != "/" {
        cg_path.strip_prefix(m.root.as_str()).unwrap_or(cg_path)
    } else {
        cg_path
    };
    m.point.join(rel.trim_start_matches('/'))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// [`write`] to a file the kernel may not offer (swap accounting off): absent is fine. Opened
/// without O_CREAT, so a missing file is ENOENT (cgroupfs answers a create with EACCES).
fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write;
    let written = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match written {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        }),
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates a payload cgroup directory; an existing one is an error (never reuse a cgroup that
/// may hold a previous payload's processes).
fn mkdir_new(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir(path).map_err(|source| CgroupError::Create {
        path: path.to_owned(),
        source,
    })
}

fn pids_in(procs: &Path) -> Vec<i32> {
    fs::read_to_string(procs)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The smallest CPU quota of any ancestor of `dir`, scaled to `period`; `None` if unlimited.
fn v1_ancestor_quota(dir: &Path, period: u64) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut cur = dir.parent();
    while let Some(d) = cur {
        let (Ok(q), Ok(p)) = (
            fs::read_to_string(d.join("cpu.cfs_quota_us")),
            fs::read_to_string(d.join("cpu.cfs_period_us")),
        ) else {
            break; // above the hierarchy's mount point
        };
        if let (Ok(q), Ok(p)) = (q.trim().parse::<i64>(), p.trim().parse::<u64>()) {
            if q > 0 && p > 0 {
                let scaled = (q as u64).saturating_mul(period) / p;
                best = Some(best.map_or(scaled, |b| b.min(scaled)));
            }
        }
        cur = d.parent();
    }
    best
}

/// A payload cgroup whose place is known but which is not created yet ([`Cgroup::locate`]).
/// The helper finds the place and sends it with the plan, then creates it ([`Located::create`])
/// while the stage builds the scratch view; the stage joins it ([`Located::join_files`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Located {
    cgroup: Cgroup,
    /// v2: the hierarchy's mount point (the root cgroup may hold processes and children).
    mount: PathBuf,
    /// v1: the pilot's own cgroups in the hierarchies of [`V1_OPTIONAL`] controllers (no
    /// payload child there), as (controllers, path as in /proc/PID/cgroup, directory).
    #[serde(default)]
    pilots: Vec<(Vec<String>, String, PathBuf)>,
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
            self.pilots
                .iter()
                .filter(|(ctrls, path, _)| !own.iter().any(|(c, p)| c == ctrls && p == path))
                .map(|(_, _, dir)| dir.join("tasks")),
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
            Cgroup::V1 { dirs } => dirs
                .iter()
                .filter_map(|(_, d)| Some(d.parent()?.join("tasks")))
                .collect(),
            Cgroup::V2 { .. } => vec![self.mount.join("cgroup.procs")],
        };
        for t in targets {
            let _ = fs::write(t, "0");
        }
    }

    /// Creates the directories and sets the limits. On failure nothing created here is left.
    pub fn create(self, limits: Limits) -> Result<Cgroup, CgroupError> {
        match &self.cgroup {
            Cgroup::V1 { dirs } => create_v1_dirs(dirs)?,
            Cgroup::V2 { dir } => mkdir_new(dir)?,
        }
        if let Err(e) = self.cgroup.set_limits(limits) {
            self.cgroup.remove();
            return Err(e);
        }
        Ok(self.cgroup)
    }
}

/// Makes each v1 directory (a cpuset one gets the parent's CPUs and memory nodes); removes the
/// ones it made when one fails, never one that existed before.
fn create_v1_dirs(dirs: &[(Vec<String>, PathBuf)]) -> Result<(), CgroupError> {
    for (i, (hier, dir)) in dirs.iter().enumerate() {
        let made = mkdir_new(dir).and_then(|()| {
            if !hier.iter().any(|c| c == "cpuset") {
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
            Cgroup::V1 {
                dirs: dirs[..upto].to_vec(),
            }
            .remove();
            return Err(e);
        }
    }
    Ok(())
}

/// The v2 cgroup payloads go into, given the pilot's: its parent when the pilot already sits
/// in the `pilot` leaf a previous launch made (payloads are siblings of the leaf, not nested).
fn v2_parent(pilot_cg: &Path, mount: &Path) -> PathBuf {
    match (pilot_cg.file_name(), pilot_cg.parent()) {
        (Some(n), Some(p)) if n == PILOT_LEAF && pilot_cg != mount => p.to_owned(),
        _ => pilot_cg.to_owned(),
    }
}

/// Checks the v2 controllers are available in `parent` and enabled for its children, after
/// moving its own processes into the `pilot` leaf (no-internal-processes rule; the root
/// cgroup is exempt).
fn prepare_v2_parent(parent: &Path, mount: &Path) -> Result<(), CgroupError> {
    let available = read(&parent.join("cgroup.controllers"))?;
    for c in V2_CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(CgroupError::ControllerMissing {
                controller: c,
                path: parent.to_owned(),
            });
        }
    }
    for attempt in 0..20 {
        if parent != mount {
            Cgroup::move_procs_to_leaf(parent)?;
        }
        let enabled = read(&parent.join("cgroup.subtree_control"))?;
        let mut result = Ok(());
        for c in V2_CONTROLLERS {
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

impl Cgroup {
    /// Creates `<pilot's cgroup>/<name>` with the given limits: [`Cgroup::locate`], then
    /// [`Located::create`].
    pub fn create(pilot: &PilotCgroups, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        Self::locate(pilot, name)?.create(limits)
    }

    /// Finds where `<pilot's cgroup>/<name>` goes, creating no payload cgroup: on v1 in each of
    /// memory, cpu, cpuacct, pids and freezer (and cpuset, devices where mounted); on v2 beside
    /// the pilot's `pilot` leaf. On v2 it also readies the parent: the pilot's processes move
    /// into the leaf and memory, cpu and pids get enabled for children (after the first
    /// launch of a pilot, two reads). That part reads and writes pids, so it runs here, in the
    /// host's pid namespace.
    pub fn locate(pilot: &PilotCgroups, name: &str) -> Result<Located, CgroupError> {
        let mounts = mounts()?;
        let (lines, pilot_pid) = (&pilot.lines, pilot.pid);
        let v1_memory = mounts
            .iter()
            .any(|m| !m.v2 && m.controllers.iter().any(|c| c == "memory"));
        if v1_memory {
            let (cgroup, pilots) = Self::locate_v1(&mounts, lines, pilot_pid, name)?;
            return Ok(Located {
                cgroup,
                mount: PathBuf::new(),
                pilots,
            });
        }
        let Some(m) = mounts
            .iter()
            .find(|m| m.v2 && m.controllers.iter().any(|c| c == "memory"))
        else {
            return Err(CgroupError::NoHierarchy(
                "no memory controller in /proc/self/mountinfo".into(),
            ));
        };
        let p = lines
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.clone())
            .ok_or_else(|| CgroupError::NoPilotCgroup {
                pid: pilot_pid,
                controller: "unified".into(),
                path: m.point.clone(),
            })?;
        let dir = v2_parent(&join_mount(m, &p), &m.point).join(name);
        prepare_v2_parent(dir.parent().unwrap_or(Path::new("/")), &m.point)?;
        Ok(Located {
            cgroup: Cgroup::V2 { dir },
            mount: m.point.clone(),
            pilots: Vec::new(),
        })
    }

    /// v1: the payload's directory in each hierarchy that holds one of [`V1_CONTROLLERS`], and
    /// the pilot's own cgroup in each that holds only [`V1_OPTIONAL`] ones (see there).
    #[allow(clippy::type_complexity)]
    fn locate_v1(
        mounts: &[Mount],
        lines: &[(Vec<String>, String)],
        pilot_pid: i32,
        name: &str,
    ) -> Result<(Cgroup, Vec<(Vec<String>, String, PathBuf)>), CgroupError> {
        let mut dirs: Vec<(Vec<String>, PathBuf)> = Vec::new();
        let mut pilots: Vec<(Vec<String>, String, PathBuf)> = Vec::new();
        let ours =
            |c: &String| V1_CONTROLLERS.contains(&c.as_str()) || V1_OPTIONAL.contains(&c.as_str());
        for ctrl in V1_CONTROLLERS.iter().chain(V1_OPTIONAL.iter()).copied() {
            let Some(m) = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))
            else {
                if V1_OPTIONAL.contains(&ctrl) {
                    continue;
                }
                return Err(CgroupError::NoHierarchy(format!(
                    "v1 controller {ctrl} is not mounted"
                )));
            };
            let listed = dirs.iter().any(|(c, _)| c.iter().any(|c| c == ctrl))
                || pilots.iter().any(|(c, _, _)| c.iter().any(|c| c == ctrl));
            if listed {
                continue; // cpu,cpuacct combined: already listed
            }
            let Some((line, p)) = lines.iter().find(|(c, _)| c.iter().any(|c| c == ctrl)) else {
                return Err(CgroupError::NoPilotCgroup {
                    pid: pilot_pid,
                    controller: ctrl.into(),
                    path: m.point.clone(),
                });
            };
            let hier: Vec<String> = m.controllers.iter().filter(|c| ours(c)).cloned().collect();
            if hier.iter().any(|c| V1_CONTROLLERS.contains(&c.as_str())) {
                dirs.push((hier, join_mount(m, p).join(name)));
            } else {
                pilots.push((line.clone(), p.clone(), join_mount(m, p)));
            }
        }
        Ok((Cgroup::V1 { dirs }, pilots))
    }

    fn move_procs_to_leaf(parent: &Path) -> Result<(), CgroupError> {
        let procs = parent.join("cgroup.procs");
        if pids_in(&procs).is_empty() {
            return Ok(());
        }
        let leaf = parent.join(PILOT_LEAF);
        mkdir(&leaf)?;
        for _ in 0..20 {
            let pids = pids_in(&procs);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // A process may exit between read and write: ESRCH is fine.
                match fs::write(leaf.join("cgroup.procs"), pid.to_string()) {
                    Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                        return Err(CgroupError::Write {
                            path: leaf.join("cgroup.procs"),
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

    fn set_limits(&self, l: Limits) -> Result<(), CgroupError> {
        let period: u64 = 100_000;
        let quota = period * u64::from(l.cores.max(1));
        match self {
            Cgroup::V1 { .. } => {
                let mem = self.v1_dir("memory");
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                // No swap: memory+swap limit equal to the memory limit (absent without swap accounting).
                write_if_present(
                    &mem.join("memory.memsw.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                // The period stays the kernel's default for a new cgroup (100 ms, the
                // `period` above): one write less per payload.
                let cpu = self.v1_dir("cpu");
                let quota_file = cpu.join("cpu.cfs_quota_us");
                match write(&quota_file, &quota.to_string()) {
                    // v1 refuses a child quota above an ancestor's (EINVAL); the batch limit
                    // is the ceiling anyway (P7), so clamp to the tightest ancestor. Read
                    // only then: the ancestors' files cost a read each on every launch.
                    Err(CgroupError::Write { source, .. })
                        if source.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        let clamped =
                            v1_ancestor_quota(&cpu, period).map_or(quota, |q| quota.min(q));
                        write(&quota_file, &clamped.to_string())?;
                    }
                    r => r?,
                }
                write(
                    &self.v1_dir("pids").join("pids.max"),
                    &l.pids_max.to_string(),
                )?;
            }
            Cgroup::V2 { dir } => {
                write(&dir.join("memory.max"), &l.memory_bytes.to_string())?;
                write_if_present(&dir.join("memory.swap.max"), "0")?;
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&dir.join("pids.max"), &l.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    fn v1_dir(&self, ctrl: &str) -> PathBuf {
        match self {
            Cgroup::V1 { dirs } => dirs
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == ctrl))
                .map(|(_, d)| d.clone())
                .unwrap_or_default(),
            Cgroup::V2 { dir } => dir.clone(),
        }
    }

    /// The files a single-threaded process writes "0" to in order to join this cgroup.
    ///
    /// v1: each hierarchy's `tasks`. Moving only the calling thread (pid 0 = current) lets the
    /// kernel skip the global threadgroup rwsem, whose write side waits for an RCU grace
    /// period: 10-15 ms per payload through `cgroup.procs` when no other migration happened
    /// just before (measured, docs/benchmarks.md), about 20 µs through `tasks`. The stage's
    /// stage is single-threaded, so its one thread is the whole process. v2 allows thread
    /// moves only inside a threaded subtree, so it keeps `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1 { dirs } => dirs.iter().map(|(_, d)| d.join("tasks")).collect(),
            Cgroup::V2 { dir } => vec![dir.join("cgroup.procs")],
        }
    }

    /// The `cgroup.procs` files listing this cgroup's processes.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1 { dirs } => dirs.iter().map(|(_, d)| d.join("cgroup.procs")).collect(),
            Cgroup::V2 { dir } => vec![dir.join("cgroup.procs")],
        }
    }

    /// A printable name: the v2 directory or the v1 memory directory.
    pub fn display(&self) -> String {
        self.v1_dir("memory").display().to_string()
    }

    /// Every process currently in the cgroup (v1: union over hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self.procs_files().iter().flat_map(|p| pids_in(p)).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The processes [`Cgroup::kill_all_but_exiting`] waits for: on v1 those of the freezer
    /// hierarchy, the one it freezes and kills through. Every payload process is in all of the
    /// payload's v1 hierarchies (the stage joined them all before the payload existed, children
    /// inherit them, and only root can move a process out), so one list is the whole set and
    /// saves a read per hierarchy on every payload's exit.
    fn watched_pids(&self) -> Vec<i32> {
        match self {
            Cgroup::V1 { .. } => pids_in(&self.v1_dir("freezer").join("cgroup.procs")),
            Cgroup::V2 { dir } => pids_in(&dir.join("cgroup.procs")),
        }
    }

    /// Sends `sig` to every process in the cgroup except those in `skip`.
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
    /// v2: cgroup.kill (or SIGKILL loop before 5.14); v1: freeze, SIGKILL, thaw, repeat.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_but_exiting(&[])
    }

    /// [`Cgroup::kill_all`], but done as soon as only processes in `exiting` are left: our own
    /// processes that are already on their way out (a namespace's stage, pid 1, after its last payload
    /// process was reaped), whose exit need not be waited for.
    pub fn kill_all_but_exiting(&self, exiting: &[i32]) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let kill_file = match self {
            Cgroup::V2 { dir } => Some(dir.join("cgroup.kill")).filter(|p| p.exists()),
            Cgroup::V1 { .. } => None,
        };
        let freezer = match self {
            Cgroup::V1 { .. } => Some(self.v1_dir("freezer").join("freezer.state")),
            Cgroup::V2 { .. } => None,
        };
        // v2 before 5.14: freeze (cgroup.freeze), SIGKILL, thaw; fatal signals reach frozen tasks.
        let freeze2 = match self {
            Cgroup::V2 { dir } if kill_file.is_none() => {
                Some(dir.join("cgroup.freeze")).filter(|p| p.exists())
            }
            _ => None,
        };
        loop {
            if self.watched_pids().iter().all(|p| exiting.contains(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::NotEmpty {
                    path: PathBuf::from(self.display()),
                    seconds: 10,
                });
            }
            if let Some(k) = &kill_file {
                // Ignore errors: the cgroup may have emptied meanwhile.
                let _ = fs::write(k, "1");
            } else if let Some(f) = &freezer {
                // Frozen processes cannot fork while we kill them.
                let _ = fs::write(f, "FROZEN");
                let until = Instant::now() + Duration::from_millis(200);
                while Instant::now() < until
                    && fs::read_to_string(f)
                        .map(|s| s.trim() == "FREEZING")
                        .unwrap_or(false)
                {
                    sleep(Duration::from_millis(2));
                }
                let _ = self.signal(libc::SIGKILL, &[]);
                let _ = fs::write(f, "THAWED");
            } else if let Some(f) = &freeze2 {
                let _ = fs::write(f, "1");
                let _ = self.signal(libc::SIGKILL, &[]);
                let _ = fs::write(f, "0");
            } else {
                let _ = self.signal(libc::SIGKILL, &[]);
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// Reads CPU time, peak memory and whether the OOM killer fired.
    pub fn usage(&self) -> Usage {
        let num = |p: PathBuf| -> u64 {
            fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let key = |p: PathBuf, k: &str| -> u64 {
            fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let (a, b) = l.split_once(' ')?;
                    (a == k).then(|| b.trim().parse().ok()).flatten()
                })
                .unwrap_or(0)
        };
        match self {
            Cgroup::V1 { .. } => {
                let mem = self.v1_dir("memory");
                Usage {
                    cpu_seconds: num(self.v1_dir("cpuacct").join("cpuacct.usage")) as f64 / 1e9,
                    peak_memory_bytes: num(mem.join("memory.max_usage_in_bytes")),
                    oom_killed: key(mem.join("memory.oom_control"), "oom_kill") > 0,
                }
            }
            Cgroup::V2 { dir } => Usage {
                cpu_seconds: key(dir.join("cpu.stat"), "usage_usec") as f64 / 1e6,
                peak_memory_bytes: num(dir.join("memory.peak")),
                oom_killed: key(dir.join("memory.events"), "oom_kill") > 0,
            },
        }
    }

    /// Removes the cgroup directories, retrying briefly on EBUSY. Errors are ignored beyond
    /// that: a cgroup that cannot be removed is empty and harmless, and is logged by the caller.
    pub fn remove(&self) -> bool {
        let dirs: Vec<PathBuf> = match self {
            Cgroup::V1 { dirs } => dirs.iter().map(|(_, d)| d.clone()).collect(),
            Cgroup::V2 { dir } => vec![dir.clone()],
        };
        let mut ok = true;
        for d in dirs {
            let mut removed = false;
            for _ in 0..200 {
                match fs::remove_dir(&d) {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        removed = true;
                        break;
                    }
                    Err(_) => sleep(Duration::from_millis(10)),
                }
            }
            ok &= removed;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 placement logic against a directory tree shaped like cgroupfs (plain files).
    #[test]
    fn v2_payload_goes_beside_the_pilot_leaf() {
        let t = tempfile::tempdir().unwrap();
        let mount = t.path();
        let job = mount.join("job");
        fs::create_dir(&job).unwrap();
        fs::write(
            job.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(job.join("cgroup.subtree_control"), "").unwrap();
        fs::write(job.join("cgroup.procs"), "").unwrap();
        // What `Cgroup::locate` does on v2 (minus reading mountinfo), then the creation.
        let v2 = |pilot: &Path, name: &str| {
            let dir = v2_parent(pilot, mount).join(name);
            prepare_v2_parent(dir.parent().unwrap(), mount)?;
            Located {
                cgroup: Cgroup::V2 { dir },
                mount: mount.to_owned(),
                pilots: Vec::new(),
            }
            .create(Limits {
                memory_bytes: 1 << 20,
                cores: 1,
                pids_max: 8,
            })
        };
        let cg = v2(&job, "mupilot-p1").unwrap();
        match &cg {
            Cgroup::V2 { dir } => assert_eq!(dir, &job.join("mupilot-p1")),
            _ => panic!(),
        }
        // The pilot already in the leaf: the next payload is a sibling, not nested.
        fs::create_dir(job.join("pilot")).unwrap();
        let cg = v2(&job.join("pilot"), "mupilot-p2").unwrap();
        assert_eq!(cg.procs_files(), vec![job.join("mupilot-p2/cgroup.procs")]);
        // A missing controller is a clear error naming it.
        fs::write(job.join("cgroup.controllers"), "cpu memory\n").unwrap();
        let e = v2(&job, "mupilot-p3").unwrap_err();
        assert!(e.to_string().contains("controller pids"), "{e}");
    }

    #[test]
    fn joins_the_pilots_cpuset_and_devices_only_where_not_there_yet() {
        let located = Located {
            cgroup: Cgroup::V1 {
                dirs: vec![(vec!["memory".into()], PathBuf::from("/m/job/p"))],
            },
            mount: PathBuf::new(),
            pilots: vec![
                (
                    vec!["cpuset".into()],
                    "/job".into(),
                    PathBuf::from("/c/job"),
                ),
                (vec!["devices".into()], "/".into(), PathBuf::from("/d")),
            ],
        };
        let own = vec![
            (vec!["cpuset".into()], "/".to_string()),
            (vec!["devices".into()], "/".to_string()),
        ];
        assert_eq!(
            located.join_files(&own),
            vec![
                PathBuf::from("/m/job/p/tasks"),
                PathBuf::from("/c/job/tasks")
            ]
        );
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
