//! Grid Engine (SGE, UGE, OGE, SoGE): JOB_ID, NSLOTS, PE_HOSTFILE (slots on this host), and
//! the job's limits h_rt/s_rt/h_vmem/s_vmem from the shepherd's `config` file in
//! $SGE_JOB_SPOOL_DIR or, failing that, `qstat -j $JOB_ID`. Reads only through [`Env`].

use std::collections::BTreeMap;

use super::env::{CmdOutcome, Env};
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "sge";

/// Reads the Grid Engine slot; None unless JOB_ID and one of SGE_ROOT, SGE_CELL,
/// SGE_JOB_SPOOL_DIR are set (JOB_ID alone is too generic a name to trust).
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let id = env.var("JOB_ID")?;
    if ["SGE_ROOT", "SGE_CELL", "SGE_JOB_SPOOL_DIR"]
        .iter()
        .all(|k| env.var(k).is_none())
    {
        return None;
    }
    if !super::valid_job_id(id) {
        p.bad(NAME, "JOB_ID", id, super::BAD_JOB_ID);
        return None;
    }
    let mut f = Finding::new(NAME, true);
    f.job_id = Some(id.to_string());

    // Slots on this host: the PE host file ("host slots queue processors" per line), else
    // NSLOTS (the whole job's slots, equal to this host's for a serial or one-host job).
    if let Some(path) = env.var("PE_HOSTFILE") {
        match env.read(path) {
            Ok(text) => {
                for line in text.lines() {
                    let mut w = line.split_whitespace();
                    if let (Some(host), Some(slots)) = (w.next(), w.next()) {
                        if env.is_this_host(host) {
                            let what = format!("PE_HOSTFILE {path} slots for {host}");
                            if let Some(c) = p.parse(NAME, &what, slots, parse::count) {
                                match f.cores.unwrap_or(0).checked_add(c) {
                                    Some(sum) => f.cores = Some(sum),
                                    None => p.bad(NAME, &what, slots, "makes more than 2^32 slots"),
                                }
                            }
                        }
                    }
                }
                if f.cores.is_some() {
                    f.note("cores_from", "PE_HOSTFILE");
                }
            }
            Err(e) => p.say(NAME, format!("PE_HOSTFILE={path}: cannot read: {e}")),
        }
    }
    // NSLOTS is checked even when the host file gave the count.
    if let (None, Some((var, c))) = (f.cores, p.first_of(env, NAME, &["NSLOTS"], parse::count)) {
        f.cores = Some(c);
        f.note("cores_from", var);
    }

    // Limits: the shepherd's config file first (no daemon round trip), then qstat -j.
    let mut start = None;
    let mut limits = None;
    if let Some(dir) = env.var("SGE_JOB_SPOOL_DIR") {
        let config = format!("{}/config", dir.trim_end_matches('/'));
        if let Ok(text) = env.read(&config) {
            let kv: BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| parse::key_value(l, '='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            limits = Some((kv, config.clone()));
        }
        // The spool directory is created when the job starts: its mtime is the start.
        start = std::fs::metadata(env.path(dir))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
    }
    if limits.is_none() {
        match env.runner.run("qstat", &["-j", id]) {
            CmdOutcome::Output(out) => limits = Some((qstat_limits(&out), "qstat -j".into())),
            CmdOutcome::Failed(why) => p.say(NAME, format!("qstat: {why}")),
            CmdOutcome::Missing => {}
        }
    }
    if let Some((kv, from)) = limits {
        let start = start.unwrap_or(env.now).min(env.now);
        // s_rt sends SIGUSR1 before h_rt kills: the pilot must be done by the first of them.
        for key in ["h_rt", "s_rt"] {
            if let Some(v) = kv.get(key).filter(|v| !v.eq_ignore_ascii_case("INFINITY")) {
                let what = format!("{key} in {from}");
                if let Some(secs) = p.parse(NAME, &what, v, |s| {
                    parse::hms(s).and_then(|secs| parse::deadline(start, secs).map(|_| secs))
                }) {
                    f.lower_deadline(start + secs);
                    f.note(key, secs);
                }
            }
        }
        // h_vmem/s_vmem are per slot: the node gets that times its slots.
        for key in ["h_vmem", "s_vmem"] {
            if let Some(v) = kv.get(key) {
                if let Some(Some(per_slot)) =
                    p.parse(NAME, &format!("{key} in {from}"), v, parse::sge_memory)
                {
                    let slots = f.cores.unwrap_or(1);
                    match per_slot.checked_mul(u64::from(slots)) {
                        Some(b) => {
                            f.lower_memory(b);
                            f.note(key, per_slot);
                        }
                        None => p.bad(
                            NAME,
                            &format!("{key} in {from}"),
                            &format!("{v} x {slots} slots"),
                            "is more than 2^64 bytes",
                        ),
                    }
                }
            }
        }
        f.note("limits_from", from);
    }
    Some(f)
}

/// The "hard resource_list" and "soft resource_list" lines of `qstat -j` ("h_rt=3600,h_vmem=2G");
/// a hard value wins over a soft one of the same name.
fn qstat_limits(out: &str) -> BTreeMap<String, String> {
    let mut kv = BTreeMap::new();
    for prefix in [
        "soft resource_list:",
        "soft_resource_list:",
        "hard resource_list:",
        "hard_resource_list:",
    ] {
        for line in out.lines() {
            if let Some(list) = line.trim().strip_prefix(prefix) {
                for item in list.trim().split(',') {
                    if let Some((k, v)) = parse::key_value(item, '=') {
                        kv.insert(k.to_string(), v.to_string());
                    }
                }
            }
        }
    }
    kv
}
