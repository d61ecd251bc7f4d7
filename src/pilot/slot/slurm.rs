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
    // Every cores variable that is set is checked (a malformed fallback is reported even when
    // an earlier one gave the value); the first good one wins.
    let index = match env.var("SLURM_NODEID") {
        Some(n) => p
            .parse(NAME, "SLURM_NODEID", n, |s| {
                s.parse::<usize>().map_err(|_| "is not a node index".into())
            })
            .unwrap_or(0),
        None => 0,
    };
    let on_node = p.first_of(env, NAME, &["SLURM_CPUS_ON_NODE"], parse::count);
    let per_node = p.first_of(env, NAME, &["SLURM_JOB_CPUS_PER_NODE"], |s| {
        parse::slurm_cpus_per_node(s, index)
    });
    let per_task = p.first_of(env, NAME, &["SLURM_CPUS_PER_TASK"], parse::count);
    if let Some((from, c)) = on_node.or(per_node).or(per_task) {
        f.cores = Some(c);
        f.note("cores_from", from);
    }

    let per_node = p.first_of(env, NAME, &["SLURM_MEM_PER_NODE"], |s| {
        mebibytes(s).and_then(mib_to_bytes)
    });
    let per_cpu = p.first_of(env, NAME, &["SLURM_MEM_PER_CPU"], |s| {
        mebibytes(s).and_then(mib_to_bytes)
    });
    if let Some((from, b)) = per_node {
        f.memory_bytes = Some(b);
        f.note("memory_from", from);
    } else if let Some((from, per_cpu)) = per_cpu {
        match f.cores {
            Some(c) => match per_cpu.checked_mul(u64::from(c)) {
                Some(b) => {
                    f.memory_bytes = Some(b);
                    f.note("memory_from", from);
                }
                None => p.bad(
                    NAME,
                    from,
                    &format!("{per_cpu} bytes x {c} CPUs"),
                    "is more than 2^64 bytes",
                ),
            },
            None => p.say(
                NAME,
                "SLURM_MEM_PER_CPU is set but the CPU count is unknown; memory ignored",
            ),
        }
    }

    read_deadline(env, id, &mut f, p);
    Some(f)
}

/// Slurm memory variables are MiB, sometimes with an explicit "M" suffix.
/// MiB as bytes; an error instead of a wrap to a small number (2^44 MiB and more).
fn mib_to_bytes(mib: u64) -> Result<u64, String> {
    mib.checked_mul(1 << 20)
        .ok_or_else(|| "is more than 2^64 bytes".to_string())
}

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
        if let Some(t) = p.parse(NAME, "SLURM_JOB_END_TIME", v, |s| {
            parse::int(s).and_then(|t| parse::deadline(0, t))
        }) {
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
    p.parse(
        NAME,
        "scontrol StartTime + TimeLimit",
        &format!("{start} + {limit}"),
        |_| parse::deadline(start, limit),
    )
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
