//! Per-source discovery tests through the Env seam: each batch system's documented variable
//! and file layouts, the minimum rule, overrides, and malformed values reported (never a crash).

mod slot_common;

use mupilot::pilot::slot::{
    discover_with, discover_with_overrides, CmdOutcome, Overrides, SlotReport,
};
use slot_common::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn run(root: &std::path::Path, vars: &[(&str, &str)], cmds: &[(&str, CmdOutcome)]) -> SlotReport {
    let (env, _) = env(root, vars, cmds);
    discover_with(&env)
}

fn chosen(r: &SlotReport, field: &str) -> String {
    r.chosen.get(field).cloned().unwrap_or_default()
}

fn has_problem(r: &SlotReport, needles: &[&str]) -> bool {
    r.problems
        .iter()
        .any(|p| needles.iter().all(|n| p.contains(n)))
}

// ---------- host fallback ----------

#[test]
fn no_sources_gives_host_values_and_says_so() {
    let root = root();
    let r = run(root.path(), &[], &[]);
    assert_eq!(r.slot.batch_system, None);
    assert_eq!(r.slot.batch_job_id, None);
    assert_eq!(r.slot.cores, HOST_CORES);
    assert_eq!(r.slot.memory_bytes, HOST_MEM);
    assert_eq!(r.slot.deadline_unix, None);
    assert_eq!(chosen(&r, "cores"), "host");
    assert_eq!(chosen(&r, "memory_bytes"), "host");
    assert!(!r.chosen.contains_key("deadline_unix"));
    assert_eq!(r.sources["host"]["cores"], HOST_CORES);
    assert_eq!(r.sources["host"]["memory_bytes"], HOST_MEM);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn limits_json_has_the_documented_keys() {
    let root = root();
    let r = run(
        root.path(),
        &[("SLURM_JOB_ID", "77"), ("SLURM_CPUS_ON_NODE", "2")],
        &[],
    );
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
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert!(v["deadline_unix"].is_null());
    assert_eq!(v["sources"]["slurm"]["cores"], 2);
    assert_eq!(v["chosen"]["cores"], "slurm");
    // And it reads back.
    let back: SlotReport = serde_json::from_value(v).unwrap();
    assert_eq!(back.slot, r.slot);
    // The text form names the winner of each field.
    let text = mupilot::pilot::slot::render_text(&r, NOW);
    assert!(text.contains("cores:         2  (from slurm)"), "{text}");
    assert!(text.contains("deadline:      unknown"), "{text}");
}

// ---------- Slurm ----------

#[test]
fn slurm_env_and_scontrol_end_time() {
    let root = root();
    let (env, runner) = env(
        root.path(),
        &[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_CPUS_ON_NODE", "2"),
            ("SLURM_MEM_PER_NODE", "1024"),
        ],
        &[(
            "scontrol",
            out(
                "JobId=4242 JobName=pilot UserId=mupilot(990) JobState=RUNNING RunTime=00:05:00 \
                 TimeLimit=01:00:00 SubmitTime=2026-11-23T11:50:00 StartTime=2026-11-23T12:00:00 \
                 EndTime=2026-11-23T13:00:00 Partition=grid NumCPUs=2\n",
            ),
        )],
    );
    let r = discover_with(&env);
    assert_eq!(r.slot.batch_system.as_deref(), Some("slurm"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("4242"));
    assert_eq!(r.slot.cores, 2);
    assert_eq!(r.slot.memory_bytes, GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3600));
    assert_eq!(chosen(&r, "cores"), "slurm");
    assert_eq!(chosen(&r, "memory_bytes"), "slurm");
    assert_eq!(chosen(&r, "deadline_unix"), "slurm");
    assert_eq!(chosen(&r, "batch_job_id"), "slurm");
    assert_eq!(r.sources["slurm"]["deadline_from"], "scontrol");
    assert_eq!(runner.calls.lock().unwrap()[0], "scontrol show job -o 4242");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn slurm_local_time_uses_the_offset() {
    let root = root();
    let (mut env, _) = env(
        root.path(),
        &[("SLURM_JOB_ID", "1")],
        &[("scontrol", out("JobId=1 EndTime=2026-11-23T14:00:00"))],
    );
    env.local_offset = chrono::FixedOffset::east_opt(3600);
    let r = discover_with(&env);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3600));
}

#[test]
fn slurm_cpus_per_node_list_and_mem_per_cpu() {
    let root = root();
    let r = run(
        root.path(),
        &[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_JOB_CPUS_PER_NODE", "4,2(x2)"),
            ("SLURM_NODEID", "2"),
            ("SLURM_MEM_PER_CPU", "512"),
        ],
        &[],
    );
    assert_eq!(r.slot.cores, 2);
    assert_eq!(r.slot.memory_bytes, GIB);
    assert_eq!(r.sources["slurm"]["cores_from"], "SLURM_JOB_CPUS_PER_NODE");
    // Node 0 of the same list has 4.
    let r = run(
        root.path(),
        &[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_JOB_CPUS_PER_NODE", "4,2(x2)"),
        ],
        &[],
    );
    assert_eq!(r.slot.cores, 4);
}

#[test]
fn slurm_end_time_from_env_then_start_plus_limit_then_squeue() {
    let root = root();
    let end = (NOW + 7200).to_string();
    let r = run(
        root.path(),
        &[("SLURM_JOB_ID", "5"), ("SLURM_JOB_END_TIME", &end)],
        &[("scontrol", out("EndTime=2030-01-01T00:00:00"))],
    );
    assert_eq!(r.slot.deadline_unix, Some(NOW + 7200));

    let r = run(
        root.path(),
        &[("SLURM_JOB_ID", "5")],
        &[(
            "scontrol",
            out("JobId=5 TimeLimit=1-00:00:00 StartTime=2026-11-23T11:00:00 EndTime=Unknown"),
        )],
    );
    assert_eq!(r.slot.deadline_unix, Some(NOW - 3600 + 86400));

    // scontrol not installed: squeue's %e.
    let r = run(
        root.path(),
        &[("SLURM_JOB_ID", "5")],
        &[("squeue", out("2026-11-23T12:30:00\n"))],
    );
    assert_eq!(r.slot.deadline_unix, Some(NOW + 1800));
    assert_eq!(r.sources["slurm"]["deadline_from"], "squeue");

    // Neither installed: no deadline, and no problem either.
    let r = run(root.path(), &[("SLURM_JOB_ID", "5")], &[]);
    assert_eq!(r.slot.deadline_unix, None);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn slurm_malformed_values_are_reported_and_ignored() {
    let root = root();
    let r = run(
        root.path(),
        &[
            ("SLURM_JOB_ID", "5"),
            ("SLURM_CPUS_ON_NODE", "two"),
            ("SLURM_MEM_PER_NODE", "lots"),
            ("SLURM_JOB_END_TIME", "tomorrow"),
        ],
        &[
            (
                "scontrol",
                CmdOutcome::Failed("scontrol exited with 1: Invalid job id".into()),
            ),
            ("squeue", out("not-a-date")),
        ],
    );
    assert_eq!(r.slot.cores, HOST_CORES);
    assert_eq!(chosen(&r, "cores"), "host");
    assert_eq!(r.slot.memory_bytes, HOST_MEM);
    assert_eq!(r.slot.deadline_unix, None);
    assert!(
        has_problem(&r, &["slurm", "SLURM_CPUS_ON_NODE", "\"two\""]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(
        &r,
        &["slurm", "SLURM_MEM_PER_NODE", "\"lots\""]
    ));
    assert!(has_problem(
        &r,
        &["slurm", "SLURM_JOB_END_TIME", "\"tomorrow\""]
    ));
    assert!(has_problem(&r, &["slurm", "scontrol", "Invalid job id"]));
    assert!(has_problem(&r, &["slurm", "squeue", "not-a-date"]));
    // A job id that could pass as an option is refused outright.
    let r = run(root.path(), &[("SLURM_JOB_ID", "--help")], &[]);
    assert_eq!(r.slot.batch_system, None);
    assert!(has_problem(&r, &["SLURM_JOB_ID", "--help"]));
}

#[test]
fn huge_values_are_reported_never_wrapped_and_every_ignored_value_is_named() {
    let root = root();
    // 2^44 MiB is 2^64 bytes: `mib << 20` used to wrap to 0.
    let r = run(
        root.path(),
        &[
            ("SLURM_JOB_ID", "5"),
            ("SLURM_CPUS_ON_NODE", "4"),
            ("SLURM_CPUS_PER_TASK", "x"),
            ("SLURM_MEM_PER_NODE", "17592186044416"),
            ("SLURM_MEM_PER_CPU", "4611686018427387904"),
            ("SLURM_JOB_END_TIME", "9223372036854775807"),
        ],
        &[],
    );
    assert_eq!(r.slot.memory_bytes, HOST_MEM, "{:?}", r.problems);
    assert_eq!(chosen(&r, "memory_bytes"), "host");
    assert_eq!(r.slot.cores, 4);
    assert!(
        has_problem(&r, &["SLURM_MEM_PER_NODE", "17592186044416", "2^64"]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(&r, &["SLURM_MEM_PER_CPU", "2^64"]));
    assert!(has_problem(&r, &["SLURM_JOB_END_TIME", "9999"]));
    // A fallback that was not needed is still checked.
    assert!(has_problem(&r, &["SLURM_CPUS_PER_TASK", "\"x\""]));
    // MEM_PER_CPU times the CPUs overflowing is reported, not saturated.
    let r = run(
        root.path(),
        &[
            ("SLURM_JOB_ID", "5"),
            ("SLURM_CPUS_ON_NODE", "64"),
            ("SLURM_MEM_PER_CPU", "1099511627776"),
        ],
        &[],
    );
    assert_eq!(r.slot.memory_bytes, HOST_MEM);
    assert!(
        has_problem(&r, &["SLURM_MEM_PER_CPU", "x 64 CPUs", "2^64"]),
        "{:?}",
        r.problems
    );

    let r = run(
        root.path(),
        &[
            ("PBS_JOBID", "9.pbs"),
            ("PBS_NCPUS", "x"),
            ("PBS_NUM_PPN", "2"),
        ],
        &[],
    );
    assert_eq!(r.slot.cores, 2);
    assert!(
        has_problem(&r, &["pbs", "PBS_NCPUS", "\"x\""]),
        "{:?}",
        r.problems
    );
    let r = run(
        root.path(),
        &[("PBS_JOBID", "9.pbs"), ("PBS_NCPUS", "3")],
        &[],
    );
    assert_eq!(r.slot.cores, 3);
    assert_eq!(r.sources["pbs"]["cores_from"], "PBS_NCPUS");

    let r = run(
        root.path(),
        &[("LSB_JOBID", "7"), ("LSB_MAX_NUM_PROCESSORS", "abc")],
        &[],
    );
    assert!(
        has_problem(&r, &["lsf", "LSB_MAX_NUM_PROCESSORS", "\"abc\""]),
        "{:?}",
        r.problems
    );
    let r = run(
        root.path(),
        &[("LSB_JOBID", "7"), ("LSB_MAX_NUM_PROCESSORS", "3")],
        &[],
    );
    assert_eq!(r.slot.cores, 3);
    let r = run(
        root.path(),
        &[
            ("LSB_JOBID", "7"),
            ("LSB_MCPU_HOSTS", "wn042 4294967295 wn042.example.org 2"),
        ],
        &[],
    );
    assert!(
        has_problem(&r, &["LSB_MCPU_HOSTS", "2^32"]),
        "{:?}",
        r.problems
    );
    // PBS sizes and SGE sizes that do not fit are errors, not saturated.
    let r = run(
        root.path(),
        &[("PBS_JOBID", "9.pbs")],
        &[("qstat", out("Job Id: 9.pbs\n    Resource_List.mem = 17179869184gb\n    Resource_List.walltime = 9223372036854775807\n"))],
    );
    assert_eq!(r.slot.memory_bytes, HOST_MEM);
    assert_eq!(r.slot.deadline_unix, None);
    assert!(
        has_problem(&r, &["Resource_List.mem", "2^64"]),
        "{:?}",
        r.problems
    );
    assert!(
        has_problem(&r, &["Resource_List.walltime", "9999"]),
        "{:?}",
        r.problems
    );
}

// ---------- HTCondor ----------

const MACHINE_AD: &str = r#"Arch = "X86_64"
Cpus = 4
Memory = 8192
Disk = 10000000
GLIDEIN_ToDie = 1795464000
TimeToLive = 86400
MyCurrentTime = 1795435200
MaxJobRetirementTime = 3600
Name = "slot1_1@wn042.example.org"
"#;

const JOB_AD: &str = r#"ClusterId = 1234
ProcId = 7
RequestCpus = 2
RequestMemory = ifthenelse(MemoryUsage =!= undefined,MemoryUsage,2048)
JobStartDate = 1795431600
MaxWallTime = 14400
Owner = "mupilot"
"#;

#[test]
fn condor_machine_and_job_ads() {
    let root = root();
    write(root.path(), "/scratch/dir_1/.machine.ad", MACHINE_AD);
    write(root.path(), "/scratch/dir_1/.job.ad", JOB_AD);
    let r = run(
        root.path(),
        &[
            ("_CONDOR_MACHINE_AD", "/scratch/dir_1/.machine.ad"),
            ("_CONDOR_JOB_AD", "/scratch/dir_1/.job.ad"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system.as_deref(), Some("htcondor"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("1234.7"));
    assert_eq!(r.slot.cores, 4);
    assert_eq!(r.slot.memory_bytes, 8192 * MIB);
    // JobStartDate + MaxWallTime = NOW - 3600 + 14400 is earlier than GLIDEIN_ToDie (NOW + 8h)
    // and TimeToLive (NOW + 1 day).
    assert_eq!(r.slot.deadline_unix, Some(NOW + 10800));
    assert_eq!(chosen(&r, "deadline_unix"), "htcondor");
    assert_eq!(r.sources["htcondor"]["max_job_retirement_time"], 3600);
    assert!(r.problems.is_empty(), "{:?}", r.problems);

    // Without a machine ad the job ad's request is used; an expression there is shown, not
    // guessed at, and is no problem.
    let r = run(
        root.path(),
        &[("_CONDOR_JOB_AD", "/scratch/dir_1/.job.ad")],
        &[],
    );
    assert_eq!(r.slot.cores, 2);
    assert_eq!(chosen(&r, "memory_bytes"), "host");
    assert!(r.sources["htcondor"]["RequestMemory_expression"].is_string());
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn condor_job_ad_only_uses_requests_and_glidein_to_die() {
    let root = root();
    write(
        root.path(),
        "/j.ad",
        "ClusterId = 5\nProcId = 0\nRequestCpus = 1\nRequestMemory = 2048\n",
    );
    write(root.path(), "/m.ad", "GLIDEIN_ToDie = 1795437000\n");
    let r = run(
        root.path(),
        &[("_CONDOR_JOB_AD", "/j.ad"), ("_CONDOR_MACHINE_AD", "/m.ad")],
        &[],
    );
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("5.0"));
    assert_eq!(r.slot.cores, 1);
    assert_eq!(r.slot.memory_bytes, 2048 * MIB);
    assert_eq!(r.slot.deadline_unix, Some(1_795_437_000));
}

#[test]
fn condor_malformed_and_missing_files_are_reported() {
    let root = root();
    write(root.path(), "/m.ad", "Cpus = four\nMemory = -5\n");
    let r = run(
        root.path(),
        &[
            ("_CONDOR_MACHINE_AD", "/m.ad"),
            ("_CONDOR_JOB_AD", "/nonexistent.ad"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system.as_deref(), Some("htcondor"));
    assert_eq!(r.slot.cores, HOST_CORES);
    assert!(
        has_problem(&r, &["htcondor", "Cpus", "_CONDOR_MACHINE_AD", "\"four\""]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(&r, &["htcondor", "Memory", "\"-5\""]));
    assert!(has_problem(
        &r,
        &["htcondor", "_CONDOR_JOB_AD=/nonexistent.ad"]
    ));
}

// ---------- PBS / Torque / OpenPBS ----------

const QSTAT_F: &str = "Job Id: 812.pbs.example.org
    Job_Name = pilot
    Job_Owner = mupilot@ce.example.org
    resources_used.cput = 00:01:00
    resources_used.mem = 10240kb
    resources_used.walltime = 00:10:00
    job_state = R
    queue = grid
    Resource_List.mem = 2gb
    Resource_List.ncpus = 3
    Resource_List.nodes = 1:ppn=3
    Resource_List.walltime = 01:00:00
    Variable_List = PBS_O_HOME=/home/mupilot,PBS_O_LANG=C,
\tPBS_O_SHELL=/bin/bash
";

#[test]
fn pbs_nodefile_and_qstat() {
    let root = root();
    write(
        root.path(),
        "/var/spool/pbs/aux/812",
        "wn042.example.org\nwn042.example.org\nwn043.example.org\nwn042.example.org\n",
    );
    let (env, runner) = env(
        root.path(),
        &[
            ("PBS_JOBID", "812.pbs.example.org"),
            ("PBS_NODEFILE", "/var/spool/pbs/aux/812"),
            ("PBS_NUM_PPN", "8"),
        ],
        &[("qstat", out(QSTAT_F))],
    );
    let r = discover_with(&env);
    assert_eq!(r.slot.batch_system.as_deref(), Some("pbs"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("812.pbs.example.org"));
    assert_eq!(r.slot.cores, 3);
    assert_eq!(r.sources["pbs"]["cores_from"], "PBS_NODEFILE");
    assert_eq!(r.slot.memory_bytes, 2 * GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3000));
    assert_eq!(
        runner.calls.lock().unwrap()[0],
        "qstat -f 812.pbs.example.org"
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn pbs_without_qstat_uses_ppn_and_pbs_walltime() {
    let root = root();
    let r = run(
        root.path(),
        &[
            ("PBS_JOBID", "13"),
            ("PBS_NUM_PPN", "2"),
            ("PBS_WALLTIME", "7200"),
        ],
        &[],
    );
    assert_eq!(r.slot.cores, 2);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 7200));
    // OpenPBS's NCPUS when there is no PPN.
    let r = run(root.path(), &[("PBS_JOBID", "13"), ("NCPUS", "6")], &[]);
    assert_eq!(r.slot.cores, 6);
}

#[test]
fn pbs_malformed_values_are_reported() {
    let root = root();
    write(root.path(), "/nodes", "other-host\n");
    let r = run(
        root.path(),
        &[
            ("PBS_JOBID", "13"),
            ("PBS_NODEFILE", "/nodes"),
            ("PBS_NUM_PPN", "2.5"),
            ("PBS_WALLTIME", "1h"),
        ],
        &[(
            "qstat",
            out("    Resource_List.walltime = forever\n    Resource_List.mem = 4xb\n"),
        )],
    );
    assert_eq!(r.slot.cores, HOST_CORES);
    assert_eq!(r.slot.deadline_unix, None);
    assert!(
        has_problem(
            &r,
            &["pbs", "PBS_NODEFILE=/nodes", "does not list this host"]
        ),
        "{:?}",
        r.problems
    );
    assert!(has_problem(&r, &["pbs", "PBS_NUM_PPN", "\"2.5\""]));
    assert!(has_problem(&r, &["pbs", "PBS_WALLTIME", "\"1h\""]));
    assert!(has_problem(
        &r,
        &["pbs", "Resource_List.walltime", "\"forever\""]
    ));
    assert!(has_problem(&r, &["pbs", "Resource_List.mem", "\"4xb\""]));
}

// ---------- Grid Engine ----------

#[test]
fn sge_pe_hostfile_and_shepherd_config() {
    let root = root();
    write(root.path(), "/spool/wn042/active_jobs/77.1/pe_hostfile", "wn042.example.org 2 all.q@wn042.example.org UNDEFINED\nwn043.example.org 4 all.q@wn043.example.org UNDEFINED\n");
    write(
        root.path(),
        "/spool/wn042/active_jobs/77.1/config",
        "job_id=77\nh_rt=02:00:00\ns_rt=1:50:0\nh_vmem=2G\ns_vmem=INFINITY\n",
    );
    // The spool directory's mtime is the job start: set it an hour back.
    let dir = root.path().join("spool/wn042/active_jobs/77.1");
    let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs((NOW - 3600) as u64);
    std::fs::File::open(&dir)
        .unwrap()
        .set_modified(start)
        .unwrap();
    let r = run(
        root.path(),
        &[
            ("JOB_ID", "77"),
            ("SGE_ROOT", "/opt/sge"),
            ("NSLOTS", "6"),
            ("PE_HOSTFILE", "/spool/wn042/active_jobs/77.1/pe_hostfile"),
            ("SGE_JOB_SPOOL_DIR", "/spool/wn042/active_jobs/77.1"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system.as_deref(), Some("sge"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("77"));
    assert_eq!(r.slot.cores, 2);
    assert_eq!(r.slot.memory_bytes, 4 * GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW - 3600 + 6600));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn sge_qstat_j_fallback() {
    let root = root();
    let qstat = "==============================================================
job_number:                 78
owner:                      mupilot
hard resource_list:         h_rt=3600,h_vmem=512M
soft resource_list:         s_rt=3000
";
    let r = run(
        root.path(),
        &[("JOB_ID", "78"), ("SGE_CELL", "default"), ("NSLOTS", "1")],
        &[("qstat", out(qstat))],
    );
    assert_eq!(r.slot.cores, 1);
    assert_eq!(r.slot.memory_bytes, 512 * MIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3000));
    // JOB_ID alone (no SGE_* variable) is not taken as Grid Engine.
    let r = run(root.path(), &[("JOB_ID", "78"), ("NSLOTS", "1")], &[]);
    assert_eq!(r.slot.batch_system, None);
}

#[test]
fn sge_malformed_values_are_reported() {
    let root = root();
    write(root.path(), "/spool/config", "h_rt=soon\nh_vmem=huge\n");
    let r = run(
        root.path(),
        &[
            ("JOB_ID", "79"),
            ("SGE_JOB_SPOOL_DIR", "/spool"),
            ("NSLOTS", "0"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system.as_deref(), Some("sge"));
    assert!(
        has_problem(&r, &["sge", "NSLOTS", "\"0\""]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(
        &r,
        &["sge", "h_rt", "/spool/config", "\"soon\""]
    ));
    assert!(has_problem(&r, &["sge", "h_vmem", "\"huge\""]));
    assert_eq!(r.slot.deadline_unix, None);
}

// ---------- LSF ----------

#[test]
fn lsf_mcpu_hosts_and_bjobs() {
    let root = root();
    let (env, runner) = env(
        root.path(),
        &[
            ("LSB_JOBID", "5150"),
            ("LSB_MCPU_HOSTS", "wn041 4 wn042 2"),
            ("LSB_DJOB_NUMPROC", "6"),
        ],
        &[("bjobs", out("01:00:00;00:15:00;2 G\n"))],
    );
    let r = discover_with(&env);
    assert_eq!(r.slot.batch_system.as_deref(), Some("lsf"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("5150"));
    assert_eq!(r.slot.cores, 2);
    assert_eq!(r.slot.memory_bytes, 2 * GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 2700));
    assert!(runner.calls.lock().unwrap()[0].starts_with("bjobs -o runtimelimit run_time memlimit"));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // Minutes with a host (ABS_RUNLIMIT) and "N second(s)" run time, no memory limit.
    let r = run(
        root.path(),
        &[("LSB_JOBID", "5150"), ("LSB_DJOB_NUMPROC", "3")],
        &[("bjobs", out("60.0/wn042;600 second(s);-"))],
    );
    assert_eq!(r.slot.cores, 3);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3000));
    assert_eq!(chosen(&r, "memory_bytes"), "host");
}

#[test]
fn lsf_malformed_values_are_reported() {
    let root = root();
    let r = run(
        root.path(),
        &[("LSB_JOBID", "1"), ("LSB_MCPU_HOSTS", "wn042 four extra")],
        &[("bjobs", out("garbage"))],
    );
    assert!(
        has_problem(&r, &["lsf", "LSB_MCPU_HOSTS", "wn042 four extra"]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(&r, &["lsf", "bjobs output", "garbage"]));
    assert_eq!(r.slot.cores, HOST_CORES);
}

// ---------- machine/job features ----------

fn features(root: &std::path::Path) {
    for (k, v) in [
        ("allocated_cpu", "4\n"),
        ("wall_limit_secs", "7200\n"),
        ("jobstart_secs", "1795431600\n"),
        ("cpu_limit_secs", "28800\n"),
        ("mem_limit_GB", "8\n"),
        ("max_rss_GB", "6.5\n"),
        ("max_swap_GB", "0\n"),
    ] {
        write(root, &format!("/etc/jobfeatures/{k}"), v);
    }
    write(root, "/etc/machinefeatures/shutdowntime", "1795437000\n");
    write(root, "/etc/machinefeatures/total_cpu", "64\n");
    write(root, "/etc/machinefeatures/hs06", "800.5\n");
}

#[test]
fn machine_and_job_features() {
    let root = root();
    features(root.path());
    let r = run(
        root.path(),
        &[
            ("JOBFEATURES", "/etc/jobfeatures"),
            ("MACHINEFEATURES", "/etc/machinefeatures/"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system, None);
    assert_eq!(r.slot.cores, 4);
    assert_eq!(chosen(&r, "cores"), "jobfeatures");
    assert_eq!(r.slot.memory_bytes, 6_500_000_000);
    // jobstart + wall limit = NOW + 3600; the machine shuts down at NOW + 1800.
    assert_eq!(r.sources["jobfeatures"]["deadline_unix"], NOW + 3600);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 1800));
    assert_eq!(chosen(&r, "deadline_unix"), "machinefeatures");
    assert_eq!(r.sources["machinefeatures"]["total_cpu"], 64.0);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn features_malformed_and_url_forms_are_reported() {
    let root = root();
    write(root.path(), "/jf/allocated_cpu", "many\n");
    write(root.path(), "/jf/mem_limit_GB", "-1\n");
    let r = run(
        root.path(),
        &[
            ("JOBFEATURES", "/jf"),
            ("MACHINEFEATURES", "https://mjf.example.org/wn042"),
        ],
        &[],
    );
    assert!(
        has_problem(&r, &["jobfeatures", "/jf/allocated_cpu", "\"many\""]),
        "{:?}",
        r.problems
    );
    assert!(has_problem(
        &r,
        &["jobfeatures", "/jf/mem_limit_GB", "\"-1\""]
    ));
    assert!(has_problem(&r, &["machinefeatures", "is a URL"]));
    assert_eq!(r.slot.cores, HOST_CORES);
}

// ---------- cgroups ----------

#[test]
fn cgroup_v1_cpu_quota_cpuset_and_memory_with_ancestors() {
    let root = root();
    let r = root.path();
    write(r, "/proc/self/cgroup", "12:pids:/slurm/uid_990/job_4242\n4:memory:/slurm/uid_990/job_4242/step_batch\n3:cpuset:/slurm/uid_990/job_4242\n2:cpu,cpuacct:/slurm/uid_990/job_4242\n1:name=systemd:/user.slice\n0::/user.slice\n");
    // cpu,cpuacct is a joint mount (with a cpu symlink on real hosts; here only the joint dir).
    write(
        r,
        "/sys/fs/cgroup/cpu,cpuacct/slurm/uid_990/job_4242/cpu.cfs_quota_us",
        "250000\n",
    );
    write(
        r,
        "/sys/fs/cgroup/cpu,cpuacct/slurm/uid_990/job_4242/cpu.cfs_period_us",
        "100000\n",
    );
    write(r, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
    write(
        r,
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us",
        "100000\n",
    );
    write(
        r,
        "/sys/fs/cgroup/cpuset/slurm/uid_990/job_4242/cpuset.cpus",
        "0-2\n",
    );
    write(r, "/sys/fs/cgroup/cpuset/cpuset.cpus", "0-63\n");
    // The step's own limit is "unlimited"; the job's (its parent) binds.
    write(
        r,
        "/sys/fs/cgroup/memory/slurm/uid_990/job_4242/step_batch/memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    write(
        r,
        "/sys/fs/cgroup/memory/slurm/uid_990/job_4242/memory.limit_in_bytes",
        "3221225472\n",
    );
    write(
        r,
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    let rep = run(r, &[], &[]);
    assert_eq!(rep.slot.cores, 2, "{:?}", rep.sources);
    assert_eq!(rep.slot.memory_bytes, 3 * GIB);
    assert_eq!(chosen(&rep, "cores"), "cgroup");
    assert_eq!(chosen(&rep, "memory_bytes"), "cgroup");
    assert_eq!(rep.sources["cgroup"]["version"], "v1");
    assert_eq!(
        rep.sources["cgroup"]["memory_file"],
        "/sys/fs/cgroup/memory/slurm/uid_990/job_4242/memory.limit_in_bytes"
    );
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn cgroup_v1_fractional_quota_rounds_down_not_below_one() {
    let root = root();
    let r = root.path();
    write(r, "/proc/self/cgroup", "2:cpu,cpuacct:/job\n");
    write(r, "/sys/fs/cgroup/cpu/job/cpu.cfs_quota_us", "50000\n");
    write(r, "/sys/fs/cgroup/cpu/job/cpu.cfs_period_us", "100000\n");
    assert_eq!(run(r, &[], &[]).slot.cores, 1);
    write(r, "/sys/fs/cgroup/cpu/job/cpu.cfs_quota_us", "350000\n");
    assert_eq!(run(r, &[], &[]).slot.cores, 3);
}

#[test]
fn cgroup_v2_cpu_max_cpuset_memory_max_and_parent_limits() {
    let root = root();
    let r = root.path();
    write(
        r,
        "/proc/self/cgroup",
        "0::/system.slice/mupilot.service/pilot\n",
    );
    write(
        r,
        "/sys/fs/cgroup/cgroup.controllers",
        "cpuset cpu io memory pids\n",
    );
    let leaf = "/sys/fs/cgroup/system.slice/mupilot.service/pilot";
    let parent = "/sys/fs/cgroup/system.slice/mupilot.service";
    write(r, &format!("{leaf}/cpu.max"), "max 100000\n");
    write(r, &format!("{leaf}/memory.max"), "max\n");
    write(r, &format!("{leaf}/cpuset.cpus.effective"), "0-5\n");
    write(r, &format!("{parent}/cpu.max"), "150000 100000\n");
    write(r, &format!("{parent}/memory.max"), "2147483648\n");
    write(r, "/sys/fs/cgroup/system.slice/memory.max", "4294967296\n");
    let rep = run(r, &[], &[]);
    assert_eq!(rep.slot.cores, 1);
    assert_eq!(rep.slot.memory_bytes, 2 * GIB);
    assert_eq!(rep.sources["cgroup"]["version"], "v2");
    assert_eq!(
        rep.sources["cgroup"]["memory_file"],
        format!("{parent}/memory.max")
    );
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn cgroup_hybrid_uses_v1_controllers() {
    let root = root();
    let r = root.path();
    write(r, "/proc/self/cgroup", "4:memory:/a\n0::/a\n");
    write(r, "/sys/fs/cgroup/unified/cgroup.controllers", "\n");
    write(
        r,
        "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
        "1073741824\n",
    );
    let rep = run(r, &[], &[]);
    assert_eq!(rep.slot.memory_bytes, GIB);
    assert_eq!(rep.sources["cgroup"]["version"], "v1+v2");
}

#[test]
fn cgroup_malformed_files_are_reported() {
    let root = root();
    let r = root.path();
    write(r, "/proc/self/cgroup", "0::/x\ngarbage line\n");
    write(r, "/sys/fs/cgroup/cgroup.controllers", "cpu memory\n");
    write(r, "/sys/fs/cgroup/x/cpu.max", "fast\n");
    write(r, "/sys/fs/cgroup/x/memory.max", "1G\n");
    write(r, "/sys/fs/cgroup/x/cpuset.cpus.effective", "0-\n");
    let rep = run(r, &[], &[]);
    assert!(
        has_problem(&rep, &["cgroup", "/proc/self/cgroup", "garbage line"]),
        "{:?}",
        rep.problems
    );
    assert!(has_problem(
        &rep,
        &["cgroup", "/sys/fs/cgroup/x/cpu.max", "\"fast\""]
    ));
    assert!(has_problem(
        &rep,
        &["cgroup", "/sys/fs/cgroup/x/memory.max", "\"1G\""]
    ));
    assert!(has_problem(
        &rep,
        &["cgroup", "cpuset.cpus.effective", "\"0-\""]
    ));
    assert_eq!(rep.slot.cores, HOST_CORES);
    assert_eq!(rep.slot.memory_bytes, HOST_MEM);
}

// ---------- the minimum rule and overrides ----------

#[test]
fn minimum_over_every_source_and_chosen_names_the_winner() {
    let root = root();
    let r = root.path();
    features(r);
    write(r, "/proc/self/cgroup", "4:memory:/job\n2:cpu:/job\n");
    write(
        r,
        "/sys/fs/cgroup/memory/job/memory.limit_in_bytes",
        "5368709120\n",
    );
    write(r, "/sys/fs/cgroup/cpu/job/cpu.cfs_quota_us", "300000\n");
    write(r, "/sys/fs/cgroup/cpu/job/cpu.cfs_period_us", "100000\n");
    let end = (NOW + 900).to_string();
    let rep = run(
        r,
        &[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_CPUS_ON_NODE", "6"),
            ("SLURM_MEM_PER_NODE", "16384"),
            ("SLURM_JOB_END_TIME", &end),
            ("JOBFEATURES", "/etc/jobfeatures"),
            ("MACHINEFEATURES", "/etc/machinefeatures"),
        ],
        &[],
    );
    // slurm 6, jobfeatures 4, cgroup 3, host 8 -> 3 from cgroup.
    assert_eq!(rep.slot.cores, 3);
    assert_eq!(chosen(&rep, "cores"), "cgroup");
    // slurm 16 GiB, jobfeatures 6.5 GB, cgroup 5 GiB, host ~15.6 GiB -> cgroup.
    assert_eq!(rep.slot.memory_bytes, 5 * GIB);
    assert_eq!(chosen(&rep, "memory_bytes"), "cgroup");
    // slurm NOW+900, jobfeatures NOW+3600, machinefeatures NOW+1800 -> slurm.
    assert_eq!(rep.slot.deadline_unix, Some(NOW + 900));
    assert_eq!(chosen(&rep, "deadline_unix"), "slurm");
    assert_eq!(rep.slot.batch_system.as_deref(), Some("slurm"));
    for s in ["slurm", "jobfeatures", "machinefeatures", "cgroup", "host"] {
        assert!(rep.sources.contains_key(s), "missing source {s}");
    }
    // Equal values: the more specific source (batch before host) is named.
    let rep = run(
        r,
        &[("SLURM_JOB_ID", "1"), ("SLURM_CPUS_ON_NODE", "8")],
        &[],
    );
    assert_eq!(chosen(&rep, "cores"), "cgroup");
    let bare = slot_common::root();
    let rep = run(
        bare.path(),
        &[("SLURM_JOB_ID", "1"), ("SLURM_CPUS_ON_NODE", "8")],
        &[],
    );
    assert_eq!(chosen(&rep, "cores"), "slurm");
}

#[test]
fn overrides_only_lower() {
    let root = root();
    let (env, _) = env(
        root.path(),
        &[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_CPUS_ON_NODE", "4"),
            ("SLURM_MEM_PER_NODE", "4096"),
            ("SLURM_JOB_END_TIME", &(NOW + 3600).to_string()),
        ],
        &[],
    );
    let high = Overrides {
        cores: Some(64),
        memory_bytes: Some(1 << 40),
        walltime_seconds: Some(86400),
    };
    let r = discover_with_overrides(&env, &high);
    assert_eq!(r.slot.cores, 4);
    assert_eq!(r.slot.memory_bytes, 4 * GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 3600));
    assert_eq!(chosen(&r, "cores"), "slurm");
    let low = Overrides {
        cores: Some(1),
        memory_bytes: Some(GIB),
        walltime_seconds: Some(600),
    };
    let r = discover_with_overrides(&env, &low);
    assert_eq!(r.slot.cores, 1);
    assert_eq!(r.slot.memory_bytes, GIB);
    assert_eq!(r.slot.deadline_unix, Some(NOW + 600));
    assert_eq!(chosen(&r, "cores"), "override");
    assert_eq!(r.sources["override"]["walltime_seconds"], 600);
    // A zero override is a mistake, reported and ignored (not a zero-core slot).
    let zero = Overrides {
        cores: Some(0),
        ..Overrides::default()
    };
    let r = discover_with_overrides(&env, &zero);
    assert_eq!(r.slot.cores, 4);
    assert!(has_problem(&r, &["override", "cores"]));
}

#[test]
fn innermost_batch_system_names_the_job() {
    // An HTCondor glidein running inside a Slurm job.
    let root = root();
    write(
        root.path(),
        "/j.ad",
        "ClusterId = 3\nProcId = 1\nRequestCpus = 1\n",
    );
    let r = run(
        root.path(),
        &[
            ("_CONDOR_JOB_AD", "/j.ad"),
            ("SLURM_JOB_ID", "99"),
            ("SLURM_CPUS_ON_NODE", "4"),
        ],
        &[],
    );
    assert_eq!(r.slot.batch_system.as_deref(), Some("htcondor"));
    assert_eq!(r.slot.batch_job_id.as_deref(), Some("3.1"));
    assert_eq!(r.slot.cores, 1);
    assert!(r.sources.contains_key("slurm"));
}

#[test]
fn garbage_everywhere_never_panics() {
    let garbage = [
        "",
        " ",
        "-",
        "0",
        "-1",
        "99999999999999999999999",
        "18446744073709551615",
        "9223372036854775807",
        "17592186044416",
        "0-4294967295",
        "1e308",
        "NaN",
        "x(x",
        "4,2(x",
        "(x2)",
        ":",
        "::",
        "1:2:3:4",
        "\u{0}",
        "ümlaut",
        "2G2",
        "max max",
        "-3-4",
    ];
    let vars = [
        "SLURM_JOB_ID",
        "SLURM_CPUS_ON_NODE",
        "SLURM_JOB_CPUS_PER_NODE",
        "SLURM_NODEID",
        "SLURM_CPUS_PER_TASK",
        "SLURM_MEM_PER_NODE",
        "SLURM_MEM_PER_CPU",
        "SLURM_JOB_END_TIME",
        "PBS_JOBID",
        "PBS_NUM_PPN",
        "PBS_NP",
        "NCPUS",
        "PBS_WALLTIME",
        "JOB_ID",
        "SGE_ROOT",
        "NSLOTS",
        "LSB_JOBID",
        "LSB_MCPU_HOSTS",
        "LSB_DJOB_NUMPROC",
        "LSB_MAX_NUM_PROCESSORS",
        "PBS_NCPUS",
    ];
    let root = root();
    write(root.path(), "/proc/self/cgroup", "0::/g\n");
    write(root.path(), "/sys/fs/cgroup/cgroup.controllers", "");
    for g in garbage {
        write(root.path(), "/sys/fs/cgroup/g/cpu.max", g);
        write(root.path(), "/sys/fs/cgroup/g/memory.max", g);
        write(
            root.path(),
            "/ad",
            &format!("Cpus = {g}\nMemory = {g}\nClusterId = {g}\nProcId = 1\n"),
        );
        let mut v: Vec<(&str, &str)> = vars.iter().map(|k| (*k, g)).collect();
        v.push(("_CONDOR_MACHINE_AD", "/ad"));
        v.push(("_CONDOR_JOB_AD", "/ad"));
        let r = run(
            root.path(),
            &v,
            &[
                ("scontrol", out(g)),
                ("squeue", out(g)),
                ("qstat", out(g)),
                ("bjobs", out(g)),
            ],
        );
        assert!(r.slot.cores >= 1);
        assert!(r.slot.cores <= HOST_CORES);
        assert!(r.slot.memory_bytes <= HOST_MEM);
    }
}
