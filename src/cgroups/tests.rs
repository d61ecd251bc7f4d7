//! Placement, creation, joining and the ancestor-quota clamp against fake trees: a `/proc`
//! with `self/mountinfo` and `PID/cgroup`, and hierarchies of plain directories and files where
//! mountinfo says they are mounted. What only the kernel does (EINVAL for a quota above an
//! ancestor's, cgroup.kill, moving processes) is tested against the real kernel by the
//! integration tests (tests/sandbox_isolation.rs, tests/pilot_attacks.rs; v2 in the VM).

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

const PID: i32 = 4242;

/// A fake system: `root/proc` and hierarchies below `root/cg`.
struct Fake {
    dir: tempfile::TempDir,
    mountinfo: String,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(format!("proc/{PID}"))).unwrap();
        fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        Fake {
            dir,
            mountinfo: "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n".into(),
        }
    }

    fn cg(&self, rel: &str) -> PathBuf {
        self.dir.path().join("cg").join(rel.trim_start_matches('/'))
    }

    /// A v1 hierarchy of `controllers` mounted at cg/<name>.
    fn v1(&mut self, name: &str, controllers: &str) -> PathBuf {
        let point = self.cg(name);
        fs::create_dir_all(&point).unwrap();
        self.mountinfo += &format!(
            "30 1 0:30 / {} rw,relatime - cgroup cgroup rw,{controllers}\n",
            point.display()
        );
        point
    }

    /// The unified hierarchy at cg/unified, offering `controllers`.
    fn v2(&mut self, controllers: &str) -> PathBuf {
        let point = self.cg("unified");
        fs::create_dir_all(&point).unwrap();
        fs::write(point.join("cgroup.controllers"), controllers).unwrap();
        self.mountinfo += &format!(
            "40 1 0:40 / {} rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
            point.display()
        );
        point
    }

    /// The pilot's /proc/PID/cgroup, and a Host reading this tree.
    fn host(&self, pilot_cgroup: &str) -> (Host, PilotCgroups) {
        let proc = self.dir.path().join("proc");
        fs::write(proc.join("self/mountinfo"), &self.mountinfo).unwrap();
        fs::write(proc.join(format!("{PID}/cgroup")), pilot_cgroup).unwrap();
        let host = Host::new(proc);
        let pilot = host.pilot_cgroups(PID).unwrap();
        (host, pilot)
    }
}

fn limits() -> Limits {
    Limits {
        memory_bytes: 1 << 20,
        cores: 2,
        pids_max: 8,
    }
}

fn mkdirs(dirs: &[&Path]) {
    for d in dirs {
        fs::create_dir_all(d).unwrap();
    }
}

/// The v1 layout of this project's build host: one hierarchy per controller, cpuset and
/// devices included, and a hybrid unified mount that is ignored.
fn v1_host(f: &mut Fake) {
    for c in [
        "memory", "cpu", "cpuacct", "pids", "freezer", "cpuset", "devices", "blkio",
    ] {
        f.v1(c, c);
    }
    f.v2("");
}

const V1_PILOT: &str = "9:blkio:/\n8:pids:/job\n7:freezer:/job\n6:devices:/job\n5:memory:/job/step\n4:cpuset:/job\n3:cpuacct:/job\n2:cpu:/job\n1:name=systemd:/\n0::/\n";

#[test]
fn v1_payload_goes_below_the_pilot_in_each_hierarchy_and_joins_its_cpuset_and_devices() {
    let mut f = Fake::new();
    v1_host(&mut f);
    let (host, pilot) = f.host(V1_PILOT);
    let located = host.locate(&pilot, "mupilot-p1").unwrap();
    let Cgroup::V1(c) = located.cgroup().clone() else {
        panic!("v1 memory is mounted: {located:?}")
    };
    assert_eq!(c.memory, f.cg("memory/job/step/mupilot-p1"));
    assert_eq!(c.cpu, f.cg("cpu/job/mupilot-p1"));
    assert_eq!(c.cpuacct, f.cg("cpuacct/job/mupilot-p1"));
    assert_eq!(c.pids, f.cg("pids/job/mupilot-p1"));
    assert_eq!(c.freezer, f.cg("freezer/job/mupilot-p1"));
    assert_eq!(c.cpuset, None);
    // The stage is in the root cpuset already, not in the root devices cgroup.
    let own = vec![
        (vec!["cpuset".to_string()], "/job".to_string()),
        (vec!["devices".to_string()], "/".to_string()),
    ];
    let mut want: Vec<PathBuf> = c.dirs().iter().map(|d| d.join("tasks")).collect();
    want.push(f.cg("devices/job/tasks"));
    assert_eq!(located.join_files(&own), want);

    // Created: a directory per hierarchy, with the limits (the parents are the pilot's).
    mkdirs(&[
        &f.cg("memory/job/step"),
        &f.cg("cpu/job"),
        &f.cg("cpuacct/job"),
        &f.cg("pids/job"),
        &f.cg("freezer/job"),
    ]);
    let cg = located.clone().create(limits()).unwrap();
    let read = |p: PathBuf| fs::read_to_string(p).unwrap();
    assert_eq!(read(c.memory.join("memory.limit_in_bytes")), "1048576");
    assert_eq!(read(c.cpu.join("cpu.cfs_quota_us")), "200000");
    assert_eq!(read(c.pids.join("pids.max")), "8");
    assert!(
        !c.memory.join("memory.memsw.limit_in_bytes").exists(),
        "no swap accounting: not created"
    );
    assert_eq!(cg.display(), c.memory.display().to_string());
    // A second payload of that name is refused and leaves the first one alone.
    let e = located.clone().create(limits()).unwrap_err();
    assert!(
        matches!(&e, CgroupError::Create { path, .. } if *path == c.memory),
        "{e}"
    );
    assert!(c.freezer.exists());
}

#[test]
fn v1_shared_hierarchies_get_one_directory_and_a_comounted_cpuset_its_cpus() {
    let mut f = Fake::new();
    f.v1("memory", "memory");
    f.v1("cpu,cpuacct", "cpu,cpuacct");
    f.v1("pids,cpuset", "pids,cpuset");
    f.v1("freezer", "freezer");
    let (host, pilot) = f.host("5:freezer:/j\n4:pids,cpuset:/j\n3:cpu,cpuacct:/j\n2:memory:/j\n");
    let located = host.locate(&pilot, "p").unwrap();
    let Cgroup::V1(c) = located.cgroup().clone() else {
        panic!()
    };
    assert_eq!(c.cpu, c.cpuacct);
    assert_eq!(c.dirs().len(), 4);
    assert_eq!(c.cpuset.as_deref(), Some(f.cg("pids,cpuset/j/p").as_path()));
    assert_eq!(located.join_files(&[]).len(), 4, "one join per hierarchy");
    for d in ["memory/j", "cpu,cpuacct/j", "freezer/j"] {
        mkdirs(&[&f.cg(d)]);
    }
    let parent = f.cg("pids,cpuset/j");
    mkdirs(&[&parent]);
    fs::write(parent.join("cpuset.cpus"), "0-3\n").unwrap();
    fs::write(parent.join("cpuset.mems"), "0\n").unwrap();
    located.create(limits()).unwrap();
    assert_eq!(
        fs::read_to_string(f.cg("pids,cpuset/j/p/cpuset.cpus")).unwrap(),
        "0-3"
    );
}

#[test]
fn v1_failure_to_create_leaves_nothing_it_made_and_names_what_is_missing() {
    let mut f = Fake::new();
    v1_host(&mut f);
    let (host, pilot) = f.host(V1_PILOT);
    let located = host.locate(&pilot, "p").unwrap();
    // The freezer parent is missing: everything made before it is removed again.
    mkdirs(&[
        &f.cg("memory/job/step"),
        &f.cg("cpu/job"),
        &f.cg("cpuacct/job"),
        &f.cg("pids/job"),
    ]);
    let e = located.create(limits()).unwrap_err();
    assert!(e.to_string().contains("freezer/job/p"), "{e}");
    for d in [
        "memory/job/step/p",
        "cpu/job/p",
        "cpuacct/job/p",
        "pids/job/p",
    ] {
        assert!(!f.cg(d).exists(), "{d} left behind");
    }

    // A pilot without a freezer line, and a host without a freezer hierarchy.
    let (host, pilot) = f.host("5:memory:/j\n2:cpu:/j\n3:cpuacct:/j\n8:pids:/j\n");
    let e = host.locate(&pilot, "p").unwrap_err();
    assert!(
        e.to_string()
            .contains("pilot process 4242 has no cgroup in the freezer hierarchy"),
        "{e}"
    );
    let mut f = Fake::new();
    for c in ["memory", "cpu", "cpuacct", "pids"] {
        f.v1(c, c);
    }
    let (host, pilot) = f.host(V1_PILOT);
    let e = host.locate(&pilot, "p").unwrap_err();
    assert!(
        e.to_string()
            .contains("v1 controller freezer is not mounted"),
        "{e}"
    );
}

#[test]
fn v1_ancestor_quota_is_the_tightest_scaled_to_the_period() {
    let mut f = Fake::new();
    let cpu = f.v1("cpu", "cpu");
    // The mount point's own files, then job (2 cores at 50 ms), step (unlimited), task (3
    // cores at 100 ms): the walk starts at the payload's parent and ends above the mount.
    let set = |dir: &Path, quota: &str, period: &str| {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("cpu.cfs_quota_us"), quota).unwrap();
        fs::write(dir.join("cpu.cfs_period_us"), period).unwrap();
    };
    set(&cpu, "-1\n", "100000\n");
    set(&cpu.join("job"), "100000\n", "50000\n");
    set(&cpu.join("job/step"), "-1\n", "100000\n");
    set(&cpu.join("job/step/task"), "300000\n", "100000\n");
    let payload = cpu.join("job/step/task/p");
    assert_eq!(v1::ancestor_quota(&payload, 100_000), Some(200_000));
    set(&cpu.join("job/step/task"), "150000\n", "100000\n");
    assert_eq!(v1::ancestor_quota(&payload, 100_000), Some(150_000));
    // Garbage limits nothing; nothing set anywhere is None.
    set(&cpu.join("job"), "lots\n", "100000\n");
    set(&cpu.join("job/step/task"), "-1\n", "100000\n");
    assert_eq!(v1::ancestor_quota(&payload, 100_000), None);
}

/// The v2 tests call the real `Host::locate`: mountinfo, /proc/PID/cgroup, the leaf.
#[test]
fn v2_payload_goes_beside_the_pilot_leaf() {
    let mut f = Fake::new();
    let mount = f.v2("cpuset cpu io memory pids\n");
    let job = mount.join("job");
    fs::create_dir(&job).unwrap();
    fs::write(
        job.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    fs::write(job.join("cgroup.subtree_control"), "").unwrap();
    fs::write(job.join("cgroup.procs"), "").unwrap();
    let (host, pilot) = f.host("0::/job\n");
    let located = host.locate(&pilot, "mupilot-p1").unwrap();
    assert_eq!(
        located.cgroup(),
        &Cgroup::V2(V2Cgroup {
            dir: job.join("mupilot-p1"),
            mount: mount.clone()
        })
    );
    // Each controller enabled for the children (cgroupfs takes one "+c" per write; a plain
    // file keeps the last).
    assert_eq!(
        fs::read_to_string(job.join("cgroup.subtree_control")).unwrap(),
        "+pids"
    );
    assert_eq!(
        located.join_files(&[]),
        [job.join("mupilot-p1/cgroup.procs")]
    );
    let cg = located.clone().create(limits()).unwrap();
    assert_eq!(
        fs::read_to_string(job.join("mupilot-p1/cpu.max")).unwrap(),
        "200000 100000"
    );
    assert_eq!(
        fs::read_to_string(job.join("mupilot-p1/memory.max")).unwrap(),
        "1048576"
    );
    assert_eq!(cg.display(), job.join("mupilot-p1").display().to_string());

    // The pilot already in the leaf: the next payload is a sibling, not nested.
    fs::create_dir(job.join("pilot")).unwrap();
    fs::write(job.join("cgroup.subtree_control"), "memory cpu pids\n").unwrap();
    let (host, pilot) = f.host("0::/job/pilot\n");
    let located = host.locate(&pilot, "mupilot-p2").unwrap();
    assert_eq!(
        located.cgroup().procs_files(),
        [job.join("mupilot-p2/cgroup.procs")]
    );
    assert_eq!(
        fs::read_to_string(job.join("cgroup.subtree_control")).unwrap(),
        "memory cpu pids\n",
        "enabled: nothing written"
    );

    // A missing controller is a clear error naming it and the cgroup.
    fs::write(job.join("cgroup.controllers"), "cpu memory\n").unwrap();
    let e = host.locate(&pilot, "mupilot-p3").unwrap_err();
    assert!(
        e.to_string()
            .contains("controller pids is not available in"),
        "{e}"
    );
    assert!(e.to_string().contains(&job.display().to_string()), "{e}");
}

#[test]
fn v2_pilot_processes_move_into_the_leaf_first() {
    let mut f = Fake::new();
    let mount = f.v2("cpu memory pids\n");
    let job = mount.join("job");
    fs::create_dir(&job).unwrap();
    fs::write(job.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    fs::write(job.join("cgroup.subtree_control"), "").unwrap();
    // A plain file keeps listing the pid, so every round moves it again; the last write to the
    // leaf is the pid.
    fs::write(job.join("cgroup.procs"), "77\n").unwrap();
    let (host, pilot) = f.host("0::/job\n");
    host.locate(&pilot, "p").unwrap();
    assert_eq!(
        fs::read_to_string(job.join("pilot/cgroup.procs")).unwrap(),
        "77"
    );
}

#[test]
fn v2_in_the_root_cgroup_and_without_a_unified_line() {
    let mut f = Fake::new();
    let mount = f.v2("cpu memory pids\n");
    fs::write(mount.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    // Processes in the root cgroup stay there: the root is exempt from the rule.
    fs::write(mount.join("cgroup.procs"), "1\n").unwrap();
    let (host, pilot) = f.host("0::/\n");
    let located = host.locate(&pilot, "p").unwrap();
    assert_eq!(
        located.cgroup().join_files(),
        [mount.join("p/cgroup.procs")]
    );
    assert!(!mount.join("pilot").exists());
    let (host, pilot) = f.host("3:cpu:/x\n");
    let e = host.locate(&pilot, "p").unwrap_err();
    assert!(
        e.to_string().contains("no cgroup in the unified hierarchy"),
        "{e}"
    );
    let f = Fake::new();
    let (host, pilot) = f.host("0::/\n");
    let e = host.locate(&pilot, "p").unwrap_err();
    assert!(
        e.to_string()
            .contains("no usable cgroup hierarchy: no memory controller in"),
        "{e}"
    );
    assert!(e.to_string().contains("proc/self/mountinfo"), "{e}");
}

#[test]
fn a_plan_carries_the_located_cgroup_unchanged() {
    let mut f = Fake::new();
    v1_host(&mut f);
    let (host, pilot) = f.host(V1_PILOT);
    let located = host.locate(&pilot, "p").unwrap();
    let back: Located = serde_json::from_str(&serde_json::to_string(&located).unwrap()).unwrap();
    assert_eq!(back.cgroup(), located.cgroup());
    assert_eq!(back.join_files(&[]), located.join_files(&[]));
}

#[test]
fn usage_and_leaving_read_and_write_each_layouts_files() {
    let mut f = Fake::new();
    v1_host(&mut f);
    let (host, pilot) = f.host(V1_PILOT);
    let located = host.locate(&pilot, "p").unwrap();
    let Cgroup::V1(c) = located.cgroup().clone() else {
        panic!()
    };
    mkdirs(&c.dirs());
    fs::write(c.cpuacct.join("cpuacct.usage"), "2500000000\n").unwrap();
    fs::write(c.memory.join("memory.max_usage_in_bytes"), "1048576\n").unwrap();
    fs::write(
        c.memory.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    )
    .unwrap();
    let u = located.cgroup().usage();
    assert_eq!(
        (u.cpu_seconds, u.peak_memory_bytes, u.oom_killed),
        (2.5, Some(1 << 20), true)
    );
    fs::write(c.memory.join("memory.usage_in_bytes"), "524288\n").unwrap();
    let live = located.cgroup().live_usage();
    assert_eq!(
        (live.cpu_seconds, live.memory_bytes, live.peak_memory_bytes),
        (2.5, 1 << 19, Some(1 << 20))
    );
    fs::write(c.freezer.join("cgroup.procs"), "7\n8\n").unwrap();
    fs::write(c.memory.join("cgroup.procs"), "8\n9\n").unwrap();
    assert_eq!(located.cgroup().pids(), [7, 8, 9]);
    // Leaving writes "0" to each parent's tasks: the pilot's cgroups.
    located.leave();
    assert_eq!(
        fs::read_to_string(f.cg("memory/job/step/tasks")).unwrap(),
        "0"
    );
    assert_eq!(fs::read_to_string(f.cg("freezer/job/tasks")).unwrap(), "0");

    let mut f = Fake::new();
    let mount = f.v2("cpu memory pids\n");
    fs::write(mount.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    let (host, pilot) = f.host("0::/\n");
    let located = host.locate(&pilot, "p").unwrap();
    let dir = mount.join("p");
    mkdirs(&[&dir]);
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 1500000\nuser_usec 1000000\n",
    )
    .unwrap();
    fs::write(dir.join("memory.peak"), "4096\n").unwrap();
    fs::write(dir.join("memory.events"), "low 0\noom 1\noom_kill 0\n").unwrap();
    let u = located.cgroup().usage();
    assert_eq!(
        (u.cpu_seconds, u.peak_memory_bytes, u.oom_killed),
        (1.5, Some(4096), false)
    );
    fs::write(dir.join("memory.current"), "2048\n").unwrap();
    let live = located.cgroup().live_usage();
    assert_eq!(
        (live.cpu_seconds, live.memory_bytes, live.peak_memory_bytes),
        (1.5, 2048, Some(4096))
    );
    // A kernel before 5.19 has no memory.peak: no peak is claimed (not 0, not a sample).
    fs::remove_file(dir.join("memory.peak")).unwrap();
    assert_eq!(located.cgroup().live_usage().peak_memory_bytes, None);
    assert_eq!(located.cgroup().usage().peak_memory_bytes, None);
    located.leave();
    assert_eq!(fs::read_to_string(mount.join("cgroup.procs")).unwrap(), "0");
}
