//! Batch slot discovery: what the batch system, machine/job features and the pilot's own
//! cgroup grant this pilot. The effective slot is the minimum of every source present (P7:
//! batch limits are the ceiling; payloads never get more than the free part of it).
//!
//! One module per source (slurm, condor, pbs, sge, lsf, features, cgroup), all reading through
//! the [`env::Env`] seam; this file combines them and prints `mupilot limits`. Discovery never
//! fails: a malformed value is reported in `problems` and ignored.

pub mod env;
mod parse;
mod source;

mod cgroup;
mod condor;
mod features;
mod lsf;
mod pbs;
mod sge;
mod slurm;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use env::{CmdOutcome, CommandRunner, Env, SystemRunner};
use source::{Finding, Problems};

/// Explicit limits from pilot.toml or flags; they lower, never raise, what sources say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// At most this many cores.
    #[serde(default)]
    pub cores: Option<u32>,
    /// At most this much memory.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// End at most this many seconds after discovery.
    #[serde(default)]
    pub walltime_seconds: Option<u64>,
}

/// The effective slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// "slurm", "htcondor", "pbs", "sge" or "lsf"; null outside a batch job.
    pub batch_system: Option<String>,
    /// The batch system's job id (HTCondor: ClusterId.ProcId).
    pub batch_job_id: Option<String>,
    /// Whole cores, at least 1.
    pub cores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Unix time the slot ends (null when unknown).
    pub deadline_unix: Option<i64>,
}

/// The slot plus what every source said (for `mupilot limits`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotReport {
    #[serde(flatten)]
    pub slot: Slot,
    /// source name -> the values it gave.
    pub sources: BTreeMap<String, serde_json::Value>,
    /// Malformed values that were ignored, each naming the source and value.
    pub problems: Vec<String>,
    /// For each slot field ("cores", "memory_bytes", "deadline_unix", "batch_job_id"), the
    /// source whose value won.
    #[serde(default)]
    pub chosen: BTreeMap<String, String>,
}

/// Why a job id was refused (it is passed to scontrol/qstat/bjobs as an argument).
pub(crate) const BAD_JOB_ID: &str =
    "is not a job id (1-128 of letters, digits and . _ - [ ] @, not starting with -)";

/// A job id safe to pass as a command argument and to show.
pub(crate) fn valid_job_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-[]@".contains(c))
}

/// Discovers the slot from the process environment, files and cgroups. Runs the batch query
/// commands (each with a timeout): call it once at start, the limits do not change.
pub fn discover(overrides: &Overrides) -> SlotReport {
    discover_with_overrides(&Env::real(), overrides)
}

/// Discovers the slot through `env` (tests pass a fake environment, root and runner).
pub fn discover_with(env: &Env) -> SlotReport {
    discover_with_overrides(env, &Overrides::default())
}

/// Discovers the slot through `env`, lowered by `overrides`.
pub fn discover_with_overrides(env: &Env, overrides: &Overrides) -> SlotReport {
    let mut p = Problems::default();
    for (name, value) in &env.unreadable {
        p.bad("environment", name, value, "is not UTF-8 text");
    }
    // Order matters only for ties and for naming the batch system: the innermost system
    // first (an HTCondor glidein inside a Slurm job is an HTCondor job to the payloads).
    let readers: [fn(&Env, &mut Problems) -> Option<Finding>; 8] = [
        condor::read,
        slurm::read,
        pbs::read,
        lsf::read,
        sge::read,
        features::read_job,
        features::read_machine,
        cgroup::read,
    ];
    let mut found: Vec<Finding> = readers.iter().filter_map(|r| r(env, &mut p)).collect();
    if let Some(o) = override_finding(env, overrides, &mut p) {
        found.insert(0, o);
    }
    found.push(host_finding(env, &mut p));
    combine(found, p.0)
}

/// Overrides as a source named "override" (they only ever lower).
fn override_finding(env: &Env, o: &Overrides, p: &mut Problems) -> Option<Finding> {
    let mut f = Finding::new("override", false);
    match o.cores {
        Some(0) => p.bad("override", "[slot] cores", "0", "is zero"),
        Some(c) => f.cores = Some(c),
        None => {}
    }
    match o.memory_bytes {
        Some(0) => p.bad("override", "[slot] memory_bytes", "0", "is zero"),
        Some(m) => f.memory_bytes = Some(m),
        None => {}
    }
    if let Some(w) = o.walltime_seconds {
        f.deadline_unix = Some(env.now.saturating_add(w.min(i64::MAX as u64 / 2) as i64));
        f.note("walltime_seconds", w);
    }
    (!f.is_empty()).then_some(f)
}

/// The host itself: always present, so the slot never exceeds the machine, and the fallback
/// when no other source names cores or memory.
fn host_finding(env: &Env, p: &mut Problems) -> Finding {
    let mut f = Finding::new("host", false);
    f.cores = env.host_cores;
    match env.read("/proc/meminfo") {
        Ok(text) => {
            if let Some(line) = text.lines().find(|l| l.starts_with("MemTotal:")) {
                let v = line["MemTotal:".len()..].trim();
                let kb = v.strip_suffix("kB").unwrap_or(v).trim();
                if let Some(kb) = p.parse("host", "/proc/meminfo MemTotal", v, |_| {
                    kb.parse::<u64>().map_err(|_| "is not \"N kB\"".into())
                }) {
                    f.memory_bytes = Some(kb * 1024);
                }
            }
        }
        Err(e) => p.say("host", format!("/proc/meminfo: cannot read: {e}")),
    }
    f
}

/// The minimum of every source; ties go to the earlier source (override, batch, features,
/// cgroup, host), so `chosen` names the most specific one.
fn combine(found: Vec<Finding>, problems: Vec<String>) -> SlotReport {
    let mut chosen = BTreeMap::new();
    let mut pick = |field: &str, vals: Vec<(&'static str, Option<i128>)>| -> Option<i128> {
        let mut best: Option<(&str, i128)> = None;
        for (name, v) in vals {
            if let Some(v) = v {
                if best.is_none_or(|(_, b)| v < b) {
                    best = Some((name, v));
                }
            }
        }
        best.map(|(name, v)| {
            chosen.insert(field.to_string(), name.to_string());
            v
        })
    };
    let cores = pick(
        "cores",
        found
            .iter()
            .map(|f| (f.name, f.cores.map(i128::from)))
            .collect(),
    );
    let memory = pick(
        "memory_bytes",
        found
            .iter()
            .map(|f| (f.name, f.memory_bytes.map(i128::from)))
            .collect(),
    );
    let deadline = pick(
        "deadline_unix",
        found
            .iter()
            .map(|f| (f.name, f.deadline_unix.map(i128::from)))
            .collect(),
    );
    let batch = found.iter().find(|f| f.batch);
    if let Some(b) = batch {
        if b.job_id.is_some() {
            chosen.insert("batch_job_id".into(), b.name.to_string());
        }
    }
    SlotReport {
        slot: Slot {
            batch_system: batch.map(|b| b.name.to_string()),
            batch_job_id: batch.and_then(|b| b.job_id.clone()),
            // The host always reports cores (affinity) and memory; 1 core / 0 bytes only if
            // even that failed, which `problems` then explains.
            cores: cores.map_or(1, |c| c.max(1) as u32),
            memory_bytes: memory.map_or(0, |m| m as u64),
            deadline_unix: deadline.map(|d| d as i64),
        },
        sources: found
            .iter()
            .map(|f| (f.name.to_string(), f.to_json()))
            .collect(),
        problems,
        chosen,
    }
}

/// `mupilot limits [--json]`: prints the discovered slot; returns the exit code (0: the
/// report was printed, problems included; 1: stdout could not be written).
pub fn limits_main(json: bool, overrides: &Overrides) -> i32 {
    let report = discover(overrides);
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mupilot limits: cannot encode the report as JSON: {e}");
                return 1;
            }
        }
    } else {
        render_text(&report, chrono::Utc::now().timestamp())
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mupilot limits: cannot write to stdout: {e}");
            1
        }
    }
}

/// The human-readable form of a report.
pub fn render_text(r: &SlotReport, now: i64) -> String {
    let by = |k: &str| {
        r.chosen
            .get(k)
            .map_or(String::new(), |s| format!("  (from {s})"))
    };
    let mut s = String::new();
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    s.push_str(&format!(
        "batch system:  {}\n",
        or_none(&r.slot.batch_system)
    ));
    s.push_str(&format!(
        "batch job id:  {}\n",
        or_none(&r.slot.batch_job_id)
    ));
    s.push_str(&format!("cores:         {}{}\n", r.slot.cores, by("cores")));
    s.push_str(&format!(
        "memory:        {} bytes ({:.1} GiB){}\n",
        r.slot.memory_bytes,
        r.slot.memory_bytes as f64 / (1u64 << 30) as f64,
        by("memory_bytes")
    ));
    match r.slot.deadline_unix {
        Some(d) => {
            let when = chrono::DateTime::from_timestamp(d, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| d.to_string());
            s.push_str(&format!(
                "deadline:      {when} ({} s left){}\n",
                d - now,
                by("deadline_unix")
            ));
        }
        None => s.push_str("deadline:      unknown\n"),
    }
    s.push_str("sources:\n");
    for (name, v) in &r.sources {
        s.push_str(&format!("  {name}: {v}\n"));
    }
    if r.problems.is_empty() {
        s.push_str("problems:      none");
    } else {
        s.push_str("problems:\n");
        for pr in &r.problems {
            s.push_str(&format!("  - {pr}\n"));
        }
        s.pop();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        for ok in [
            "4242",
            "812.pbs.example.org",
            "1234[5].server",
            "77",
            "job_1@ce",
        ] {
            assert!(valid_job_id(ok), "{ok}");
        }
        for bad in ["", "-h", "--help", "1 2", "a;b", "$(x)", &"9".repeat(129)] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }
}
