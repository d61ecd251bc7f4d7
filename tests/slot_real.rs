//! Slot discovery against the live system (run as root): the host's values and the real cgroup
//! of this test process; a real cgroup v1 hierarchy created for the test (memory limit on a
//! parent, CPU quota) with a real process in it, and its cgroup v2 counterpart (run in the VM);
//! and `mupilot limits` run in-process. Every cgroup created is named mupilot-test-slt-<pid>
//! and removed, even on failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::{on_layout, Layout, TestCgroup};

use mupilot::pilot::slot::{discover, discover_with, limits_main, Env, Overrides, SystemRunner};

const UNLIMITED_FLOOR: u64 = 1 << 62;

fn affinity_cores() -> u32 {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap())
        .count() as u32
}

fn mem_total() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = m.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The tightest v1 memory limit on this process's memory cgroup and its ancestors, or v2's.
fn own_memory_limit() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let (mount, path, file) = if let Some(l) = cg.lines().find(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "memory"))
    }) {
        (
            "/sys/fs/cgroup/memory",
            l.splitn(3, ':').nth(2).unwrap().to_string(),
            "memory.limit_in_bytes",
        )
    } else {
        let l = cg.lines().find(|l| l.starts_with("0::"))?;
        ("/sys/fs/cgroup", l[3..].to_string(), "memory.max")
    };
    let mut best: Option<u64> = None;
    let mut dir = PathBuf::from(format!("{mount}{path}"));
    loop {
        if let Ok(v) = std::fs::read_to_string(dir.join(file)) {
            if let Ok(b) = v.trim().parse::<u64>() {
                if b < UNLIMITED_FLOOR {
                    best = Some(best.map_or(b, |x| x.min(b)));
                }
            }
        }
        if dir == Path::new(mount) || !dir.pop() {
            break;
        }
    }
    best
}

#[test]
fn real_discover_without_batch_gives_host_and_cgroup_values() {
    let batch_vars = [
        "SLURM_JOB_ID",
        "_CONDOR_JOB_AD",
        "_CONDOR_MACHINE_AD",
        "PBS_JOBID",
        "LSB_JOBID",
        "JOBFEATURES",
        "MACHINEFEATURES",
    ];
    let r = discover(&Overrides::default());
    if batch_vars.iter().all(|v| std::env::var_os(v).is_none()) {
        assert_eq!(r.slot.batch_system, None);
        assert_eq!(r.slot.batch_job_id, None);
        assert_eq!(r.slot.deadline_unix, None);
    }
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // Host: the affinity count and MemTotal, always shown.
    assert_eq!(r.sources["host"]["cores"], affinity_cores());
    assert_eq!(r.sources["host"]["memory_bytes"], mem_total());
    assert!(r.slot.cores >= 1 && r.slot.cores <= affinity_cores());
    // Cores: a CPU quota or cpuset below the hierarchy root may bind; otherwise the host's
    // (the root cpuset lists every CPU and limits nothing).
    match r.sources.get("cgroup").and_then(|c| c.get("cores")) {
        Some(c) => assert_eq!(
            r.slot.cores as u64,
            c.as_u64().unwrap().min(affinity_cores() as u64)
        ),
        None => {
            assert_eq!(r.slot.cores, affinity_cores());
            assert_eq!(r.chosen["cores"], "host");
        }
    }
    // Memory: the real cgroup's limit when one binds, otherwise the host's.
    let expect = own_memory_limit().map_or(mem_total(), |l| l.min(mem_total()));
    assert_eq!(r.slot.memory_bytes, expect, "{:?}", r.sources);
    if expect < mem_total() {
        assert_eq!(r.chosen["memory_bytes"], "cgroup");
    } else {
        assert_eq!(r.chosen["memory_bytes"], "host");
    }
}

#[test]
fn limits_main_prints_in_process() {
    // The JSON and text forms both print and succeed; their content is checked on reports.
    assert_eq!(limits_main(true, &Overrides::default()), 0);
    let low = Overrides {
        cores: Some(1),
        memory_bytes: Some(1 << 20),
        walltime_seconds: Some(60),
    };
    assert_eq!(limits_main(false, &low), 0);
    let r = discover(&low);
    assert_eq!(r.slot.cores, 1);
    assert_eq!(r.slot.memory_bytes, 1 << 20);
    assert_eq!(r.chosen["deadline_unix"], "override");
    let v = serde_json::to_value(&r).unwrap();
    for k in [
        "batch_system",
        "batch_job_id",
        "cores",
        "memory_bytes",
        "deadline_unix",
        "sources",
        "problems",
        "chosen",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
}

/// The test's process, killed (by pid) and reaped when dropped, whatever happened in the test:
/// declared after the cgroups it is in, so it is gone before they are removed.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An Env whose /proc/self is process `pid` and whose /sys is the real one: discovery then
/// reads the kernel's own files for a process really inside the test's cgroups.
fn env_of(pid: u32, root: &Path) -> Env {
    std::fs::create_dir(root.join("proc")).unwrap();
    std::os::unix::fs::symlink(format!("/proc/{pid}"), root.join("proc/self")).unwrap();
    std::os::unix::fs::symlink("/proc/meminfo", root.join("proc/meminfo")).unwrap();
    std::os::unix::fs::symlink("/sys", root.join("sys")).unwrap();
    Env {
        vars: Default::default(),
        unreadable: Default::default(),
        root: root.to_path_buf(),
        runner: Box::new(SystemRunner),
        now: chrono::Utc::now().timestamp(),
        hostname: "localhost".into(),
        host_cores: Some(affinity_cores()),
        local_offset: None,
    }
}

/// Discovery for process `pid` (through [`env_of`]) finds the test's 256 MiB and 1.5 CPUs
/// (one whole core) in `memory_file` and `cores_file`, on cgroup `version`.
fn assert_found(pid: u32, memory_file: &str, cores_file: &str, version: &str) {
    let root = tempfile::Builder::new()
        .prefix("mupilot-test-slt-")
        .tempdir()
        .unwrap();
    let r = discover_with(&env_of(pid, root.path()));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.slot.memory_bytes, 268_435_456, "{:?}", r.sources);
    assert_eq!(r.chosen["memory_bytes"], "cgroup");
    assert_eq!(r.sources["cgroup"]["memory_file"], memory_file);
    assert_eq!(r.slot.cores, 1);
    assert_eq!(r.chosen["cores"], "cgroup");
    assert_eq!(r.sources["cgroup"]["cores_file"], cores_file);
    assert_eq!(r.sources["cgroup"]["version"], version);
}

/// v1, per-controller hierarchies: a memory limit on the parent of the process's memory
/// cgroup and a CPU quota of 1.5 cores on its cpu cgroup. v2:
/// `real_cgroup_v2_parent_memory_max_and_cpu_max`.
#[test]
fn real_cgroup_v1_parent_memory_limit_and_cpu_quota() {
    on_layout(
        Layout::V1,
        "real_cgroup_v2_parent_memory_max_and_cpu_max",
        || {
            let mem = TestCgroup::new(Path::new("/sys/fs/cgroup/memory"), "mupilot-test-slt");
            let cpu = TestCgroup::new(Path::new("/sys/fs/cgroup/cpu"), "mupilot-test-slt");
            let name = mem.0.file_name().unwrap().to_string_lossy().into_owned();
            let mem_leaf = mem.0.join("payloadish");
            std::fs::create_dir(&mem_leaf).unwrap();
            mem.write("memory.limit_in_bytes", "268435456");
            cpu.write("cpu.cfs_period_us", "100000");
            cpu.write("cpu.cfs_quota_us", "150000");

            // A real process in the leaf (memory) and the quota cgroup (cpu).
            let child = Killed(Command::new("sleep").arg("60").spawn().unwrap());
            let pid = child.0.id();
            std::fs::write(mem_leaf.join("cgroup.procs"), pid.to_string()).unwrap();
            cpu.add(pid);

            assert_found(
                pid,
                &format!("/sys/fs/cgroup/memory/{name}/memory.limit_in_bytes"),
                &format!("/sys/fs/cgroup/cpu/{name}/cpu.cfs_quota_us"),
                "v1+v2",
            );
            drop(child);
            let dirs = [mem.0.clone(), cpu.0.clone()];
            drop((mem, cpu));
            assert!(dirs.iter().all(|d| !d.exists()));
        },
    );
}

/// v2, the unified hierarchy: `memory.max` and a `cpu.max` of 1.5 cores on the parent of the
/// process's cgroup. v1: `real_cgroup_v1_parent_memory_limit_and_cpu_quota`.
#[test]
fn real_cgroup_v2_parent_memory_max_and_cpu_max() {
    on_layout(
        Layout::V2,
        "real_cgroup_v1_parent_memory_limit_and_cpu_quota",
        || {
            let parent = TestCgroup::new(Path::new("/sys/fs/cgroup"), "mupilot-test-slt");
            let name = parent.0.file_name().unwrap().to_string_lossy().into_owned();
            parent.write("cgroup.subtree_control", "+memory +cpu");
            parent.write("memory.max", "268435456");
            parent.write("cpu.max", "150000 100000");
            let leaf = parent.0.join("payloadish");
            std::fs::create_dir(&leaf).unwrap();
            let child = Killed(Command::new("sleep").arg("60").spawn().unwrap());
            let pid = child.0.id();
            std::fs::write(leaf.join("cgroup.procs"), pid.to_string()).unwrap();

            assert_found(
                pid,
                &format!("/sys/fs/cgroup/{name}/memory.max"),
                &format!("/sys/fs/cgroup/{name}/cpu.max"),
                "v2",
            );
            drop(child);
            let dir = parent.0.clone();
            drop(parent);
            assert!(!dir.exists());
        },
    );
}
