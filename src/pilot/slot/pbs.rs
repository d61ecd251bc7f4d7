//! PBS, Torque and OpenPBS: PBS_JOBID, the node file (one line per allocated CPU and host),
//! PBS_NUM_PPN / NCPUS / PBS_NP, PBS_WALLTIME (Torque, seconds) and, when qstat is installed,
//! `qstat -f` (Resource_List.walltime, resources_used.walltime, Resource_List.mem).
//! Reads only through [`Env`].

use std::collections::BTreeMap;

use super::env::{CmdOutcome, Env};
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "pbs";

/// Reads the PBS slot; None when this is not a PBS job (no PBS_JOBID).
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let id = env.var("PBS_JOBID")?;
    if !super::valid_job_id(id) {
        p.bad(NAME, "PBS_JOBID", id, super::BAD_JOB_ID);
        return None;
    }
    let mut f = Finding::new(NAME, true);
    f.job_id = Some(id.to_string());

    // Cores on this node: the node file counts them exactly; then the per-node variables.
    let mut nodefile_mtime = None;
    if let Some(path) = env.var("PBS_NODEFILE") {
        match env.read(path) {
            Ok(text) => {
                nodefile_mtime = std::fs::metadata(env.path(path))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64);
                let n = text.lines().filter(|l| env.is_this_host(l.trim())).count() as u32;
                if n > 0 {
                    f.cores = Some(n);
                    f.note("cores_from", "PBS_NODEFILE");
                } else {
                    p.say(
                        NAME,
                        format!(
                            "PBS_NODEFILE={path} does not list this host ({}); file ignored",
                            env.hostname
                        ),
                    );
                }
            }
            Err(e) => p.say(NAME, format!("PBS_NODEFILE={path}: cannot read: {e}")),
        }
    }
    for var in ["PBS_NUM_PPN", "NCPUS"] {
        if f.cores.is_some() {
            break;
        }
        if let Some(v) = env.var(var) {
            if let Some(c) = p.parse(NAME, var, v, parse::count) {
                f.cores = Some(c);
                f.note("cores_from", var);
            }
        }
    }
    // PBS_NP counts the whole job: it binds this node only when the job has one node.
    if f.cores.is_none() && env.var("PBS_NUM_NODES").map_or(true, |n| n == "1") {
        if let Some(v) = env.var("PBS_NP") {
            if let Some(c) = p.parse(NAME, "PBS_NP", v, parse::count) {
                f.cores = Some(c);
                f.note("cores_from", "PBS_NP");
            }
        }
    }

    // Wall time from qstat: the limit minus what has been used is what is left now.
    let mut have_deadline = false;
    match env.runner.run("qstat", &["-f", id]) {
        CmdOutcome::Output(out) => {
            let attrs = qstat_attributes(&out);
            let get = |k: &str| attrs.get(k).map(String::as_str);
            if let Some(limit) = get("Resource_List.walltime") {
                if let Some(limit) =
                    p.parse(NAME, "qstat Resource_List.walltime", limit, parse::hms)
                {
                    let used = get("resources_used.walltime")
                        .and_then(|u| p.parse(NAME, "qstat resources_used.walltime", u, parse::hms))
                        .unwrap_or(0);
                    f.lower_deadline(env.now + (limit - used).max(0));
                    f.note("walltime_seconds", limit);
                    f.note("deadline_from", "qstat");
                    have_deadline = true;
                }
            }
            if let Some(mem) = get("Resource_List.mem") {
                if let Some(b) = p.parse(NAME, "qstat Resource_List.mem", mem, parse::pbs_size) {
                    f.memory_bytes = Some(b);
                    f.note("memory_from", "qstat Resource_List.mem");
                }
            }
            if f.cores.is_none() {
                if let Some(n) = get("Resource_List.ncpus") {
                    if let Some(c) = p.parse(NAME, "qstat Resource_List.ncpus", n, parse::count) {
                        f.cores = Some(c);
                        f.note("cores_from", "qstat Resource_List.ncpus");
                    }
                }
            }
        }
        CmdOutcome::Failed(why) => p.say(NAME, format!("qstat: {why}")),
        CmdOutcome::Missing => {}
    }
    // Torque's PBS_WALLTIME is the limit in seconds, counted from the job start; the node
    // file is written when the job starts, so its mtime estimates that start.
    if !have_deadline {
        if let Some(v) = env.var("PBS_WALLTIME") {
            if let Some(w) = p.parse(NAME, "PBS_WALLTIME", v, parse::int) {
                let start = nodefile_mtime.unwrap_or(env.now).min(env.now);
                f.lower_deadline(start + w);
                f.note("walltime_seconds", w);
                f.note("deadline_from", "PBS_WALLTIME");
            }
        }
    }
    Some(f)
}

/// `qstat -f` prints "    name = value" lines; long values continue on tab-indented lines.
fn qstat_attributes(out: &str) -> BTreeMap<String, String> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in out.lines() {
        if line.starts_with('\t') {
            if let Some(k) = &last {
                if let Some(v) = attrs.get_mut(k) {
                    v.push_str(line.trim());
                }
            }
            continue;
        }
        match parse::key_value(line, '=') {
            Some((k, v)) if !k.contains(' ') => {
                attrs.insert(k.to_string(), v.to_string());
                last = Some(k.to_string());
            }
            _ => last = None,
        }
    }
    attrs
}
