//! HTCondor: the machine ad and job ad files the starter writes into the job's sandbox
//! (`_CONDOR_MACHINE_AD`, `_CONDOR_JOB_AD`, ClassAd text `Attr = value`). Reads only through
//! [`Env`]; evaluates no ClassAd expressions (a non-literal value is noted, not guessed).

use std::collections::BTreeMap;

use super::env::Env;
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "htcondor";

/// A parsed ad: lower-cased attribute name -> (original name, raw value text).
struct Ad {
    var: &'static str,
    attrs: BTreeMap<String, (String, String)>,
}

impl Ad {
    fn get(&self, attr: &str) -> Option<(&str, &str)> {
        self.attrs
            .get(&attr.to_ascii_lowercase())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .filter(|(_, v)| !v.eq_ignore_ascii_case("undefined"))
    }

    /// A literal number attribute. In the job ad, expressions (common in RequestMemory) are
    /// noted and skipped; the machine ad's values are literals, so anything there that is not
    /// a number is a malformed value, as is a job ad value that is neither.
    fn number(&self, attr: &str, f: &mut Finding, p: &mut Problems) -> Option<f64> {
        let (name, raw) = self.get(attr)?;
        if let Ok(v) = raw.parse::<f64>() {
            if v.is_finite() && v >= 0.0 {
                return Some(v);
            }
        }
        let expression =
            raw.contains(|c: char| c.is_ascii_alphabetic() || "()?:+*<>=!".contains(c));
        if expression && self.var == "_CONDOR_JOB_AD" {
            f.note(&format!("{name}_expression"), raw.to_string());
        } else {
            p.bad(
                NAME,
                &format!("{name} in {}", self.var),
                raw,
                "is not a non-negative number",
            );
        }
        None
    }
}

fn read_ad(env: &Env, var: &'static str, p: &mut Problems) -> Option<Ad> {
    let path = env.var(var)?;
    let text = match env.read(path) {
        Ok(t) => t,
        Err(e) => {
            p.say(NAME, format!("{var}={path}: cannot read the ad: {e}"));
            return None;
        }
    };
    let mut attrs = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = parse::key_value(line, '=') {
            attrs.insert(k.to_ascii_lowercase(), (k.to_string(), v.to_string()));
        }
    }
    Some(Ad { var, attrs })
}

/// Reads the HTCondor slot; None when neither ad file is named in the environment.
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    if env.var("_CONDOR_MACHINE_AD").is_none() && env.var("_CONDOR_JOB_AD").is_none() {
        return None;
    }
    let mut f = Finding::new(NAME, true);
    let machine = read_ad(env, "_CONDOR_MACHINE_AD", p);
    let job = read_ad(env, "_CONDOR_JOB_AD", p);

    if let Some(job) = &job {
        let cluster = job.get("ClusterId").map(|(_, v)| v.to_string());
        let proc_ = job.get("ProcId").map(|(_, v)| v.to_string());
        if let (Some(c), Some(pr)) = (cluster, proc_) {
            let id = format!("{c}.{pr}");
            if c.parse::<u64>().is_ok() && pr.parse::<u64>().is_ok() {
                f.job_id = Some(id);
            } else {
                p.bad(
                    NAME,
                    "ClusterId.ProcId in _CONDOR_JOB_AD",
                    &id,
                    "is not N.M",
                );
            }
        }
    }

    // Cores and memory: the slot's provisioned Cpus/Memory (machine ad) bind; the job ad's
    // *Provisioned and Request* values are used only when the machine ad is absent.
    let from = |ad: &Option<Ad>, attr: &str, f: &mut Finding, p: &mut Problems| {
        ad.as_ref().and_then(|a| a.number(attr, f, p))
    };
    let cores = from(&machine, "Cpus", &mut f, p)
        .map(|v| ("Cpus", v))
        .or_else(|| from(&job, "CpusProvisioned", &mut f, p).map(|v| ("CpusProvisioned", v)))
        .or_else(|| from(&job, "RequestCpus", &mut f, p).map(|v| ("RequestCpus", v)));
    if let Some((attr, v)) = cores {
        if v >= 1.0 {
            if let Some(c) = p.parse(NAME, attr, &v.to_string(), |_| parse::cores(v)) {
                f.cores = Some(c);
                f.note("cores_from", attr);
            }
        } else {
            p.bad(NAME, attr, &v.to_string(), "is below one core");
        }
    }
    let mem = from(&machine, "Memory", &mut f, p)
        .map(|v| ("Memory", v))
        .or_else(|| from(&job, "MemoryProvisioned", &mut f, p).map(|v| ("MemoryProvisioned", v)))
        .or_else(|| from(&job, "RequestMemory", &mut f, p).map(|v| ("RequestMemory", v)));
    if let Some((attr, mib)) = mem {
        if mib > 0.0 {
            if let Some(b) = p.parse(NAME, attr, &mib.to_string(), |_| {
                parse::bytes(mib, 1048576.0)
            }) {
                f.memory_bytes = Some(b);
                f.note("memory_from", attr);
            }
        } else {
            p.bad(NAME, attr, &mib.to_string(), "is zero MiB");
        }
    }

    // Wall time: JobStartDate + MaxWallTime; a glidein's GLIDEIN_ToDie (Unix time); the
    // startd's TimeToLive (seconds, counted from the ad's MyCurrentTime when present).
    // Every sum is checked: a time past the year 9999 is reported, not wrapped or clamped.
    let secs = |attr: &str, v: f64, p: &mut Problems| {
        p.parse(NAME, attr, &v.to_string(), |_| parse::seconds(v))
    };
    let start = from(&job, "JobStartDate", &mut f, p).and_then(|v| secs("JobStartDate", v, p));
    for ad in [&job, &machine] {
        let w = from(ad, "MaxWallTime", &mut f, p).and_then(|v| secs("MaxWallTime", v, p));
        if let (Some(start), Some(w)) = (start, w) {
            let sum = format!("{start} + {w}");
            if let Some(d) = p.parse(NAME, "JobStartDate + MaxWallTime", &sum, |_| {
                parse::deadline(start, w)
            }) {
                f.lower_deadline(d);
                f.note("max_wall_time", w);
            }
        }
    }
    let to_die = from(&machine, "GLIDEIN_ToDie", &mut f, p);
    if let Some(t) = to_die.and_then(|v| secs("GLIDEIN_ToDie", v, p)) {
        f.lower_deadline(t);
        f.note("glidein_to_die", t);
    }
    let ttl = from(&machine, "TimeToLive", &mut f, p);
    if let Some(ttl) = ttl.and_then(|v| secs("TimeToLive", v, p)) {
        let now = from(&machine, "MyCurrentTime", &mut f, p);
        let base = now
            .and_then(|v| secs("MyCurrentTime", v, p))
            .unwrap_or(env.now);
        let sum = format!("{base} + {ttl}");
        if let Some(d) = p.parse(NAME, "MyCurrentTime + TimeToLive", &sum, |_| {
            parse::deadline(base, ttl)
        }) {
            f.lower_deadline(d);
            f.note("time_to_live", ttl);
        }
    }
    // Retirement time is how long a job may keep running once the slot wants it gone; it
    // is no deadline by itself, so it is shown, not used.
    let retire = from(&machine, "MaxJobRetirementTime", &mut f, p);
    if let Some(r) = retire.and_then(|v| secs("MaxJobRetirementTime", v, p)) {
        f.note("max_job_retirement_time", r);
    }
    Some(f)
}
