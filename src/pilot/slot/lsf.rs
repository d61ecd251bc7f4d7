//! IBM Spectrum LSF: LSB_JOBID, LSB_MCPU_HOSTS ("hostA 4 hostB 2": the count for this host),
//! LSB_DJOB_NUMPROC, and run limit, run time and memory limit from
//! `bjobs -o "runtimelimit run_time memlimit delimiter=';'" -noheader -hms ID`.
//! Reads only through [`Env`].

use super::env::{CmdOutcome, Env};
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "lsf";

/// Reads the LSF slot; None when this is not an LSF job (no LSB_JOBID).
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let id = env.var("LSB_JOBID")?;
    if !super::valid_job_id(id) {
        p.bad(NAME, "LSB_JOBID", id, super::BAD_JOB_ID);
        return None;
    }
    let mut f = Finding::new(NAME, true);
    f.job_id = Some(id.to_string());

    if let Some(v) = env.var("LSB_MCPU_HOSTS") {
        let words: Vec<&str> = v.split_whitespace().collect();
        if words.len() % 2 != 0 {
            p.bad(NAME, "LSB_MCPU_HOSTS", v, "is not \"host count\" pairs");
        } else {
            for pair in words.chunks(2) {
                if env.is_this_host(pair[0]) {
                    let what = format!("LSB_MCPU_HOSTS count for {}", pair[0]);
                    if let Some(c) = p.parse(NAME, &what, pair[1], parse::count) {
                        match f.cores.unwrap_or(0).checked_add(c) {
                            Some(sum) => f.cores = Some(sum),
                            None => p.bad(NAME, "LSB_MCPU_HOSTS", v, "counts more than 2^32 CPUs"),
                        }
                    }
                }
            }
            if f.cores.is_some() {
                f.note("cores_from", "LSB_MCPU_HOSTS");
            }
        }
    }
    // Both whole-job counts are checked whether or not they are needed.
    let numproc = p.first_of(
        env,
        NAME,
        &["LSB_DJOB_NUMPROC", "LSB_MAX_NUM_PROCESSORS"],
        parse::count,
    );
    if let (None, Some((var, c))) = (f.cores, numproc) {
        f.cores = Some(c);
        f.note("cores_from", var);
    }

    let args = [
        "-o",
        "runtimelimit run_time memlimit delimiter=';'",
        "-noheader",
        "-hms",
        id,
    ];
    match env.runner.run("bjobs", &args) {
        CmdOutcome::Output(out) => parse_bjobs(env, out.trim(), &mut f, p),
        CmdOutcome::Failed(why) => p.say(NAME, format!("bjobs: {why}")),
        CmdOutcome::Missing => {}
    }
    Some(f)
}

/// One line "limit;run_time;memlimit", "-" for an unset field. With -hms the times are
/// hh:mm:ss; without it the limit is minutes ("60.0/hostA" when ABS_RUNLIMIT is set) and the
/// run time "N second(s)".
fn parse_bjobs(env: &Env, line: &str, f: &mut Finding, p: &mut Problems) {
    let fields: Vec<&str> = line.lines().next().unwrap_or("").split(';').collect();
    if fields.len() != 3 {
        p.bad(
            NAME,
            "bjobs output",
            line,
            "is not runtimelimit;run_time;memlimit",
        );
        return;
    }
    let (limit, used, mem) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
    if limit != "-" && !limit.is_empty() {
        if let Some(limit) = p.parse(NAME, "bjobs runtimelimit", limit, lsf_limit) {
            let used = if used == "-" || used.is_empty() {
                0
            } else {
                p.parse(NAME, "bjobs run_time", used, lsf_run_time)
                    .unwrap_or(0)
            };
            let left = limit.saturating_sub(used).max(0);
            if let Some(d) = p.parse(NAME, "bjobs runtimelimit", &limit.to_string(), |_| {
                parse::deadline(env.now, left)
            }) {
                f.lower_deadline(d);
                f.note("runtimelimit_seconds", limit);
                f.note("deadline_from", "bjobs");
            }
        }
    }
    if mem != "-" && !mem.is_empty() {
        if let Some(b) = p.parse(NAME, "bjobs memlimit", mem, lsf_memory) {
            f.lower_memory(b);
            f.note("memory_from", "bjobs memlimit");
        }
    }
}

fn lsf_limit(s: &str) -> Result<i64, String> {
    let t = s.split('/').next().unwrap_or("").trim();
    if t.contains(':') {
        return parse::hms(t);
    }
    let minutes: f64 = t
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| "is neither hh:mm:ss nor minutes".to_string())?;
    parse::seconds(minutes * 60.0)
}

fn lsf_run_time(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if t.contains(':') {
        return parse::hms(t);
    }
    let n = t.split_whitespace().next().unwrap_or("");
    parse::int(n)
}

/// "2 G", "2048 M", "1.5 Gbytes", "512000" (LSF's default limit unit is KB).
fn lsf_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| "is not a memory size like 2 G".to_string())?;
    let mult: u64 = match unit.trim().chars().next().map(|c| c.to_ascii_uppercase()) {
        None | Some('K') => 1 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        Some('B') => 1,
        _ => return Err("has an unknown unit (K, M, G, T)".into()),
    };
    parse::bytes(v, mult as f64)
}
