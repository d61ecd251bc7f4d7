//! WLCG machine/job features (HSF-TN-2016-02): directories named by $MACHINEFEATURES and
//! $JOBFEATURES with one value per file. Used: allocated_cpu, wall_limit_secs + jobstart_secs,
//! shutdowntime (machine) and shutdowntime_job/shutdowntime (job), mem_limit_GB, max_rss_GB.
//! total_cpu and hs06 are shown only. Reads only through [`Env`]; no HTTP (URL forms of the
//! variables are reported as unsupported).

use super::env::Env;
use super::parse;
use super::source::{Finding, Problems};

/// Bytes per GB in the features files: read as 10^9 bytes, the cautious reading (a GiB
/// reading would grant 7% more than a site meaning SI gigabytes intended).
const GB: f64 = 1e9;

struct Dir<'a> {
    source: &'static str,
    var: &'static str,
    path: &'a str,
}

impl Dir<'_> {
    /// The trimmed content of one key file; a missing file is simply absent.
    fn value(&self, env: &Env, key: &str, p: &mut Problems) -> Option<String> {
        let file = format!("{}/{key}", self.path.trim_end_matches('/'));
        match env.read(&file) {
            Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                p.say(self.source, format!("{file}: cannot read: {e}"));
                None
            }
        }
    }

    fn number(&self, env: &Env, key: &str, p: &mut Problems) -> Option<f64> {
        let v = self.value(env, key, p)?;
        let what = format!("{}/{key} (${})", self.path.trim_end_matches('/'), self.var);
        p.parse(self.source, &what, &v, parse::decimal)
    }
}

fn dir<'a>(
    env: &'a Env,
    var: &'static str,
    source: &'static str,
    p: &mut Problems,
) -> Option<Dir<'a>> {
    let path = env.var(var)?;
    if path.contains("://") {
        p.say(
            source,
            format!("${var}={path} is a URL; only a local directory is supported, ignored"),
        );
        return None;
    }
    Some(Dir { source, var, path })
}

/// Reads $JOBFEATURES; None when it is unset.
pub fn read_job(env: &Env, p: &mut Problems) -> Option<Finding> {
    let d = dir(env, "JOBFEATURES", "jobfeatures", p)?;
    let mut f = Finding::new("jobfeatures", false);
    if let Some(c) = d.number(env, "allocated_cpu", p) {
        if c >= 1.0 {
            f.cores = p.parse(d.source, "allocated_cpu", &c.to_string(), |_| {
                parse::cores(c)
            });
        } else {
            p.bad(
                d.source,
                "allocated_cpu",
                &c.to_string(),
                "is below one core",
            );
        }
    }
    let secs = |key: &str, p: &mut Problems| {
        let v = d.number(env, key, p)?;
        p.parse(d.source, key, &v.to_string(), |_| parse::seconds(v))
    };
    let wall = secs("wall_limit_secs", p);
    // Without the start time the limit still bounds what is left from now.
    let start = secs("jobstart_secs", p).unwrap_or(env.now);
    if let Some(w) = wall {
        let sum = format!("{start} + {w}");
        if let Some(t) = p.parse(d.source, "jobstart_secs + wall_limit_secs", &sum, |_| {
            parse::deadline(start, w)
        }) {
            f.lower_deadline(t);
            f.note("wall_limit_secs", w);
        }
    }
    for key in ["shutdowntime_job", "shutdowntime"] {
        if let Some(t) = secs(key, p) {
            f.lower_deadline(t);
            f.note(key, t);
        }
    }
    for key in ["mem_limit_GB", "max_rss_GB"] {
        if let Some(gb) = d.number(env, key, p) {
            if gb > 0.0 {
                if let Some(b) = p.parse(d.source, key, &gb.to_string(), |_| parse::bytes(gb, GB)) {
                    f.lower_memory(b);
                    f.note(key, gb);
                }
            }
        }
    }
    (!f.is_empty()).then_some(f)
}

/// Reads $MACHINEFEATURES; None when it is unset.
pub fn read_machine(env: &Env, p: &mut Problems) -> Option<Finding> {
    let d = dir(env, "MACHINEFEATURES", "machinefeatures", p)?;
    let mut f = Finding::new("machinefeatures", false);
    if let Some(t) = d.number(env, "shutdowntime", p) {
        f.deadline_unix = p.parse(d.source, "shutdowntime", &t.to_string(), |_| {
            parse::seconds(t)
        });
    }
    for key in ["total_cpu", "hs06"] {
        if let Some(v) = d.number(env, key, p) {
            f.note(key, v);
        }
    }
    (!f.is_empty()).then_some(f)
}
