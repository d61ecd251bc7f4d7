//! Slurm: what the job's environment (sbatch OUTPUT ENVIRONMENT VARIABLES) and, for the end
//! time, `scontrol show job -o` or `squeue -o %e` say. Reads only through [`Env`].

use super::env::{CmdOutcome, Env};
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "slurm";

/// Reads the Slurm slot; None when this is not a Slurm job (no SLURM_JOB_ID).
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let (id_var, id) = ["SLURM_JOB_ID", "SLURM_JOBID"]
        .iter()
        .find_map(|k| env.var(k).map(|v| (*k, v)))?;
    let mut f = Finding::new(NAME, true);
    if !super::valid_job_id(id) {
        p.bad(NAME, id_var, id, super::BAD_JOB_ID);
        return None;
    }
    f.job_id = Some(id.to_string());

    // Cores on this node: SLURM_CPUS_ON_NODE is exactly that; SLURM_JOB_CPUS_PER_NODE lists
    // all nodes, indexed by SLURM_NODEID; SLURM_CPUS_PER_TASK is a last resort (a batch
    // script owns every task's CPUs, so it is only a lower estimate).
    let mut cores_from = None;
    if let Some(v) = env.var("SLURM_CPUS_ON_NODE") {
        if let Some(c) = p.parse(NAME, "SLURM_CPUS_ON_NODE", v, parse::count) {
            f.cores = Some(c);
            cores_from = Some("SLURM_CPUS_ON_NODE");
        }
    }
    if f.cores.is_none() {
        if let Some(v) = env.var("SLURM_JOB_CPUS_PER_NODE") {
            let index = match env.var("SLURM_NODEID") {
                Some(n) => p
                    .parse(NAME, "SLURM_NODEID", n, |s| {
                        s.parse::<usize>().map_err(|_| "is not a node index".into())
                    })
                    .unwrap_or(0),
                None => 0,
            };
            if let Some(c) = p.parse(NAME, "SLURM_JOB_CPUS_PER_NODE", v, |s| {
                parse::slurm_cpus_per_node(s, index)
            }) {
                f.cores = Some(c);
                cores_from = Some("SLURM_JOB_CPUS_PER_NODE");
            }
        }
    }
    if f.cores.is_none() {
        if let Some(v) = env.var("SLURM_CPUS_PER_TASK") {
            if let Some(c) = p.parse(NAME, "SLURM_CPUS_PER_TASK", v, parse::count) {
                f.cores = Some(c);
                cores_from = Some("SLURM_CPUS_PER_TASK");
            }
        }
    }
    if let Some(from) = cores_from {
        f.note("cores_from", from);
    }

    // Memory: --mem gives MiB per node; --mem-per-cpu gives MiB per allocated CPU.
    if let Some(v) = env.var("SLURM_MEM_PER_NODE") {
        if let Some(mib) = p.parse(NAME, "SLURM_MEM_PER_NODE", v, mebibytes) {
            f.memory_bytes = Some(mib << 20);
            f.note("memory_from", "SLURM_MEM_PER_NODE");
        }
    }
    if f.memory_bytes.is_none() {
        if let Some(v) = env.var("SLURM_MEM_PER_CPU") {
            if let Some(mib) = p.parse(NAME, "SLURM_MEM_PER_CPU", v, mebibytes) {
                match f.cores {
                    Some(c) => {
                        f.memory_bytes = Some((mib << 20) * c as u64);
                        f.note("memory_from", "SLURM_MEM_PER_CPU");
                    }
                    None => p.say(
                        NAME,
                        "SLURM_MEM_PER_CPU is set but the CPU count is unknown; memory ignored",
                    ),
                }
            }
        }
    }

    read_deadline(env, id, &mut f, p);
    Some(f)
}

/// Slurm memory variables are MiB, sometimes with an explicit "M" suffix.
fn mebibytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix('M').unwrap_or(t);
    match t.parse::<u64>() {
        Ok(0) => Err("is zero (--mem=0 asks for the whole node; the other sources apply)".into()),
        Ok(v) => Ok(v),
        Err(_) => Err("is not a whole number of MiB".into()),
    }
}

/// The end time: SLURM_JOB_END_TIME (Slurm ≥ 23.02), else scontrol, else squeue.
fn read_deadline(env: &Env, id: &str, f: &mut Finding, p: &mut Problems) {
    if let Some(v) = env.var("SLURM_JOB_END_TIME") {
        if let Some(t) = p.parse(NAME, "SLURM_JOB_END_TIME", v, parse::int) {
            f.deadline_unix = Some(t);
            f.note("deadline_from", "SLURM_JOB_END_TIME");
            return;
        }
    }
    match env.runner.run("scontrol", &["show", "job", "-o", id]) {
        CmdOutcome::Output(out) => {
            if let Some(t) = from_scontrol(env, &out, p) {
                f.deadline_unix = Some(t);
                f.note("deadline_from", "scontrol");
                return;
            }
        }
        CmdOutcome::Failed(why) => p.say(NAME, format!("scontrol: {why}")),
        CmdOutcome::Missing => {}
    }
    match env.runner.run("squeue", &["-h", "-j", id, "-o", "%e"]) {
        CmdOutcome::Output(out) => {
            let v = out.trim();
            if v.is_empty() || v.eq_ignore_ascii_case("N/A") || v == "Unknown" {
                return;
            }
            if let Some(t) = p.parse(NAME, "squeue %e", v, |s| local_time(env, s)) {
                f.deadline_unix = Some(t);
                f.note("deadline_from", "squeue");
            }
        }
        CmdOutcome::Failed(why) => p.say(NAME, format!("squeue: {why}")),
        CmdOutcome::Missing => {}
    }
}

/// EndTime from `scontrol show job -o` (one line of Key=Value words), else StartTime+TimeLimit.
fn from_scontrol(env: &Env, out: &str, p: &mut Problems) -> Option<i64> {
    let field = |key: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    };
    if let Some(end) = field("EndTime").filter(|v| *v != "Unknown" && *v != "None") {
        if let Some(t) = p.parse(NAME, "scontrol EndTime", end, |s| local_time(env, s)) {
            return Some(t);
        }
    }
    let start = field("StartTime").filter(|v| *v != "Unknown" && *v != "None")?;
    let start = p.parse(NAME, "scontrol StartTime", start, |s| local_time(env, s))?;
    let limit = field("TimeLimit")?;
    let limit = p.parse(NAME, "scontrol TimeLimit", limit, parse::slurm_duration)??;
    Some(start + limit)
}

/// Slurm prints times as local "YYYY-MM-DDTHH:MM:SS".
fn local_time(env: &Env, s: &str) -> Result<i64, String> {
    use chrono::{NaiveDateTime, TimeZone};
    let naive = NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S")
        .map_err(|_| "is not a time like 2026-11-23T13:00:00".to_string())?;
    let t = match env.local_offset {
        Some(off) => off.from_local_datetime(&naive).earliest(),
        None => chrono::Local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.fixed_offset()),
    };
    t.map(|t| t.timestamp())
        .ok_or_else(|| "does not exist in the local time zone".to_string())
}
