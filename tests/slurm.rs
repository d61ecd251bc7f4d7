//! The pilot under a real Slurm (slurmctld + slurmd + munge, started by scripts/slurm.sh):
//! slot discovery matches the allocation, payload cgroups nest in the job's cgroup, an OOM
//! stays in its payload, the time limit and scancel stop payloads and leave final records.
//!
//! Built only with `--features slurm-tests`; scripts/test.sh starts Slurm, runs these, stops it.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{find_file, processes_of, Accounts, Stack, SERIAL};

const PILOT: &str = "mpt-slurm-pilot";
// A `-t 3` job leaves a pilot with the default 120 s shutdown margin about 60 s for payloads,
// so the payloads here ask for 30 s of wall time: a payload that does not fit is handed back.
const ACC_A: &str = "mpt-slurm-a";

fn stack() -> (Accounts, Stack) {
    let accounts = Accounts::create(&[PILOT, ACC_A]);
    let stack = Stack::start(PILOT, &[("alice", ACC_A), ("bob", ACC_A)]);
    (accounts, stack)
}

/// Writes a batch script that runs the pilot and returns its path.
fn batch_script(stack: &Stack, name: &str, body: &str) -> std::path::PathBuf {
    let path = stack.dir.path().join(format!("{name}.sh"));
    let script = format!(
        "#!/bin/sh\n{body}\n",
        body = body
            .replace("@MUPILOT@", &support::bin("mupilot").display().to_string())
            .replace(
                "@CONFIG@",
                &stack.vo.join("pilot.toml").display().to_string()
            )
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// The job's working directory, writable by the pilot account (the job runs as it).
fn job_dir(stack: &Stack) -> std::path::PathBuf {
    let dir = stack.dir.path().join("jobs");
    if !dir.exists() {
        std::fs::create_dir(&dir).unwrap();
        let uid = Accounts::uid(PILOT);
        nix::unistd::chown(&dir, Some(uid.into()), None).unwrap();
    }
    dir
}

/// Submits as the pilot account; returns the job id.
fn sbatch(stack: &Stack, args: &[&str], script: &Path) -> String {
    let out_file = job_dir(stack).join("slurm-%j.out");
    let out = Command::new("runuser")
        .args(["-u", PILOT, "--", "sbatch", "--parsable"])
        .arg(format!("--output={}", out_file.display()))
        .arg(format!("--chdir={}", job_dir(stack).display()))
        .args(args)
        .arg(script)
        .output()
        .expect("sbatch runs");
    assert!(
        out.status.success(),
        "sbatch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

fn job_state(id: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix("JobState="))
        .unwrap_or("GONE")
        .to_string()
}

fn wait_job_end(id: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let st = job_state(id);
        if !matches!(
            st.as_str(),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
        ) {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} still {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_job_running(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while job_state(id) != "RUNNING" {
        assert!(Instant::now() < deadline, "job {id} never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job_output(stack: &Stack, id: &str) -> String {
    std::fs::read_to_string(job_dir(stack).join(format!("slurm-{id}.out"))).unwrap_or_default()
}

fn set_pilot_option(stack: &Stack, line: &str) {
    let p = stack.vo.join("pilot.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    // Top-level keys must precede any table in TOML.
    let (head, tail) = match text.find("\n[") {
        Some(i) => text.split_at(i + 1),
        None => (text.as_str(), ""),
    };
    std::fs::write(&p, format!("{head}{line}\n{tail}")).unwrap();
}

#[test]
fn limits_match_the_allocation_and_payload_cgroups_nest_in_the_job() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, stack) = stack();
    let id = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "128M",
            "--walltime",
            "30",
            "--",
            "cat",
            "/proc/self/cgroup",
        ],
    );
    let script = batch_script(
        &stack,
        "limits",
        "@MUPILOT@ limits --json\necho ==\n@MUPILOT@ run --config @CONFIG@ --idle-timeout 2\necho pilot-exit=$?\ncat /proc/self/cgroup",
    );
    let job = sbatch(&stack, &["-c", "2", "--mem=1G", "-t", "3"], &script);
    wait_job_end(&job, Duration::from_secs(120));
    let out = job_output(&stack, &job);
    let json_text = out.split("==").next().unwrap();
    let limits: serde_json::Value = serde_json::from_str(json_text.trim())
        .unwrap_or_else(|e| panic!("limits --json: {e}\n{out}"));
    assert_eq!(limits["batch_system"], "slurm", "{limits}");
    assert_eq!(limits["batch_job_id"], job.as_str());
    assert_eq!(limits["cores"], 2, "{limits}");
    assert_eq!(limits["memory_bytes"], 1u64 << 30, "{limits}");
    let deadline = limits["deadline_unix"]
        .as_i64()
        .expect("a deadline from Slurm");
    let now = chrono::Utc::now().timestamp();
    assert!(
        deadline > now - 60 && deadline <= now + 181,
        "{deadline} vs {now}"
    );
    assert!(out.contains("pilot-exit=0"), "{out}\n{}", stack.logs());

    // The payload's own cgroup lies inside the job's memory cgroup.
    let st = stack.status("alice", &id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
    let outdir = stack.output("alice", &id);
    let cg = std::fs::read_to_string(find_file(&outdir, "stdout").expect("stdout")).unwrap();
    let mem_line = cg
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .unwrap_or_else(|| panic!("no memory cgroup in {cg}"));
    assert!(
        mem_line.contains(&format!("/job_{job}/")),
        "payload cgroup {mem_line} is not inside Slurm job {job}"
    );
}

#[test]
fn oom_stays_in_its_payload_and_the_pilot_runs_the_next() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, stack) = stack();
    let hog = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "64M",
            "--walltime",
            "30",
            "--",
            "sh",
            "-c",
            "head -c 400M /dev/zero | tail > /dev/null",
        ],
    );
    let next = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "64M",
            "--walltime",
            "30",
            "--",
            "echo",
            "next",
        ],
    );
    let script = batch_script(
        &stack,
        "oom",
        "@MUPILOT@ run --config @CONFIG@ --idle-timeout 2",
    );
    let job = sbatch(&stack, &["-c", "1", "--mem=512M", "-t", "3"], &script);
    wait_job_end(&job, Duration::from_secs(120));
    let st = stack.status("alice", &hog);
    assert_eq!(st["state"], "failed", "{st}\n{}", job_output(&stack, &job));
    assert!(
        st["reason"].as_str().unwrap_or("").contains("oom"),
        "kill reason not reported: {st}"
    );
    let st = stack.status("alice", &next);
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(job_state(&job), "COMPLETED");
}

#[test]
fn time_limit_and_scancel_stop_payloads_and_leave_final_records() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, stack) = stack();
    set_pilot_option(&stack, "grace_seconds = 3");
    let long = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "64M",
            "--walltime",
            "600",
            "--",
            "sleep",
            "1000",
        ],
    );
    // Time limit: the pilot never starts a payload that cannot end before its deadline, so the
    // limit is cut after the payload started (as a site admin or a preemption would); Slurm
    // then sends SIGTERM at the new limit and the pilot must stop the payload and record it.
    let script = batch_script(
        &stack,
        "tl",
        "exec @MUPILOT@ run --config @CONFIG@ --idle-timeout 600",
    );
    let job = sbatch(&stack, &["-c", "1", "--mem=256M", "-t", "30"], &script);
    wait_job_running(&job);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.status("alice", &long)["state"] != "running" {
        assert!(
            Instant::now() < deadline,
            "payload never started\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut = Command::new("scontrol")
        .args(["update", &format!("JobId={job}"), "TimeLimit=1"])
        .status()
        .unwrap();
    assert!(cut.success());
    wait_job_end(&job, Duration::from_secs(180));
    let st = stack.status("alice", &long);
    assert!(
        matches!(st["state"].as_str(), Some("failed" | "cancelled" | "lost")),
        "{st}"
    );
    let uid = Accounts::uid(ACC_A);
    assert!(
        processes_of(uid).is_empty(),
        "payload processes survived the time limit"
    );
    let trace = Stack::records(&stack.trace_log());
    assert!(
        trace
            .iter()
            .any(|r| r["payload_id"] == long.as_str() && r["event"] == "end"),
        "no final trace record for {long}"
    );

    // scancel: nothing of the payload survives.
    let long2 = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "64M",
            "--walltime",
            "600",
            "--",
            "sh",
            "-c",
            "(setsid sleep 1000 &); sleep 1000",
        ],
    );
    let job2 = sbatch(&stack, &["-c", "1", "--mem=256M", "-t", "30"], &script);
    wait_job_running(&job2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.status("alice", &long2)["state"] != "running" {
        assert!(Instant::now() < deadline, "payload never started");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(Command::new("scancel")
        .arg(&job2)
        .status()
        .unwrap()
        .success());
    wait_job_end(&job2, Duration::from_secs(90));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_of(uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "payload processes survived scancel: {:?}",
            processes_of(uid)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
