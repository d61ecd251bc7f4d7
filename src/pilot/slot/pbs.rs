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
    // Every cores variable that is set is checked, used or not. PBS_NCPUS is what some
    // Torque/OpenPBS wrappers export next to PBS Pro's NCPUS.
    let ppn = p.first_of(
        env,
        NAME,
        &["PBS_NUM_PPN", "NCPUS", "PBS_NCPUS"],
        parse::count,
    );
    let np = p.first_of(env, NAME, &["PBS_NP"], parse::count);
    if f.cores.is_none() {
        // PBS_NP is the whole job's count: this node's only when the job has one node.
        let one_node = env.var("PBS_NUM_NODES").is_none_or(|n| n == "1");
        if let Some((var, c)) = ppn.or(np.filter(|_| one_node)) {
            f.cores = Some(c);
            f.note("cores_from", var);
        }
    }
    let walltime = p.first_of(env, NAME, &["PBS_WALLTIME"], parse::int);

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
                    let left = limit.saturating_sub(used).max(0);
                    if let Some(d) = p.parse(
                        NAME,
                        "qstat Resource_List.walltime",
                        &limit.to_string(),
                        |_| parse::deadline(env.now, left),
                    ) {
                        f.lower_deadline(d);
                        f.note("walltime_seconds", limit);
                        f.note("deadline_from", "qstat");
                        have_deadline = true;
                    }
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
    if let (false, Some((var, w))) = (have_deadline, walltime) {
        let start = nodefile_mtime.unwrap_or(env.now).min(env.now);
        if let Some(d) = p.parse(NAME, var, &w.to_string(), |_| parse::deadline(start, w)) {
            f.lower_deadline(d);
            f.note("walltime_seconds", w);
            f.note("deadline_from", var);
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
