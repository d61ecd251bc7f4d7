//! The pilot's own cgroup: whatever the batch system or the site set on it (or on any
//! ancestor, since a parent's limit binds its children) bounds the slot. Parses
//! /proc/self/cgroup and reads, under /sys/fs/cgroup:
//! - v1: cpu.cfs_quota_us / cpu.cfs_period_us, cpuset.effective_cpus or cpuset.cpus,
//!   memory.limit_in_bytes (the "unlimited" huge value is ignored);
//! - v2 (pure, or the unified hierarchy of a hybrid host): cpu.max, cpuset.cpus.effective,
//!   memory.max.
//!
//! Reads only through [`Env`] and changes nothing.

use super::env::Env;
use super::parse;
use super::source::{Finding, Problems};

const NAME: &str = "cgroup";

/// v1 writes the largest page-aligned i64 for "no limit"; anything this large is no limit.
const UNLIMITED_FLOOR: u64 = 1 << 62;

/// One line of /proc/self/cgroup: "hierarchy-id:controller-list:path".
struct Membership {
    controllers: Vec<String>,
    path: String,
    list: String,
}

/// Reads the cgroup limits; None when /proc/self/cgroup is unreadable or nothing binds.
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let text = env.read("/proc/self/cgroup").ok()?;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(list), Some(path)) if path.starts_with('/') => lines.push(Membership {
                controllers: list
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path: path.to_string(),
                list: list.to_string(),
            }),
            _ => p.bad(
                NAME,
                "/proc/self/cgroup line",
                line,
                "is not id:controllers:path",
            ),
        }
    }
    let mut f = Finding::new(NAME, false);
    let v1 = |c: &str| lines.iter().find(|m| m.controllers.iter().any(|x| x == c));
    let mut version = Vec::new();

    // v1 hierarchies, each controller under its own mount.
    for ctl in ["cpu", "cpuset", "memory"] {
        let Some(m) = v1(ctl) else { continue };
        let mount = [m.list.as_str(), ctl]
            .iter()
            .map(|d| format!("/sys/fs/cgroup/{d}"))
            .find(|d| env.path(d).is_dir());
        let Some(mount) = mount else { continue };
        if !version.contains(&"v1") {
            version.push("v1");
        }
        match ctl {
            "cpu" => v1_cpu(env, &mount, &m.path, &mut f, p),
            "cpuset" => cpuset(
                env,
                &mount,
                &m.path,
                &["cpuset.effective_cpus", "cpuset.cpus"],
                &mut f,
                p,
            ),
            _ => v1_memory(env, &mount, &m.path, &mut f, p),
        }
    }

    // The unified hierarchy: "0::/path". On a pure v2 host /sys/fs/cgroup holds
    // cgroup.controllers; on a hybrid host it is mounted at /sys/fs/cgroup/unified.
    if let Some(m) = lines.iter().find(|m| m.controllers.is_empty()) {
        let mount = if env.path("/sys/fs/cgroup/cgroup.controllers").is_file() {
            Some("/sys/fs/cgroup")
        } else if env
            .path("/sys/fs/cgroup/unified/cgroup.controllers")
            .is_file()
        {
            Some("/sys/fs/cgroup/unified")
        } else {
            None
        };
        if let Some(mount) = mount {
            version.push("v2");
            if v1("cpu").is_none() {
                v2_cpu(env, mount, &m.path, &mut f, p);
            }
            if v1("cpuset").is_none() {
                cpuset(env, mount, &m.path, &["cpuset.cpus.effective"], &mut f, p);
            }
            if v1("memory").is_none() {
                v2_memory(env, mount, &m.path, &mut f, p);
            }
        }
    }
    if f.cores.is_none() && f.memory_bytes.is_none() {
        return None;
    }
    f.note("version", version.join("+"));
    Some(f)
}

/// The cgroup and all its ancestors up to the hierarchy root, as directories under `mount`.
fn ancestors(mount: &str, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = path.trim_end_matches('/').to_string();
    loop {
        out.push(format!("{mount}{cur}"));
        match cur.rfind('/') {
            Some(i) if !cur.is_empty() => cur.truncate(i),
            _ => break,
        }
    }
    out
}

fn read_file(env: &Env, file: &str, p: &mut Problems) -> Option<String> {
    match env.read(file) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            p.say(NAME, format!("{file}: cannot read: {e}"));
            None
        }
    }
}

/// A CPU quota as whole cores: rounds down, never below one. A quota of more than 2^32
/// periods limits nothing a machine has, so it is u32::MAX cores, not a truncated count.
fn quota_cores(quota: u64, period: u64) -> u32 {
    u32::try_from(quota / period.max(1))
        .unwrap_or(u32::MAX)
        .max(1)
}

fn v1_cpu(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        let qf = format!("{dir}/cpu.cfs_quota_us");
        let Some(q) = read_file(env, &qf, p) else {
            continue;
        };
        if q == "-1" {
            continue;
        }
        let Some(q) = p.parse(NAME, &qf, &q, |s| {
            s.parse::<u64>()
                .map_err(|_| "is not -1 or microseconds".into())
        }) else {
            continue;
        };
        let pf = format!("{dir}/cpu.cfs_period_us");
        let Some(per) = read_file(env, &pf, p)
            .and_then(|s| p.parse(NAME, &pf, &s, |s| parse::count(s).map(u64::from)))
        else {
            continue;
        };
        let c = quota_cores(q, per);
        if f.cores.map_or(true, |x| c < x) {
            f.note("cores_file", qf);
        }
        f.lower_cores(c);
    }
}

fn v2_cpu(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        let file = format!("{dir}/cpu.max");
        let Some(v) = read_file(env, &file, p) else {
            continue;
        };
        let mut w = v.split_whitespace();
        let (quota, period) = (w.next().unwrap_or(""), w.next().unwrap_or("100000"));
        if quota == "max" {
            continue;
        }
        let parsed = quota
            .parse::<u64>()
            .ok()
            .zip(period.parse::<u64>().ok().filter(|p| *p > 0));
        let Some((q, per)) = parsed else {
            p.bad(NAME, &file, &v, "is not \"max\" or \"quota period\"");
            continue;
        };
        let c = quota_cores(q, per);
        if f.cores.map_or(true, |x| c < x) {
            f.note("cores_file", file);
        }
        f.lower_cores(c);
    }
}

/// The nearest cpuset file along the ancestors (a child's cpuset is a subset of its parent's).
/// The hierarchy root always lists every CPU, which limits nothing, so it is not read.
fn cpuset(env: &Env, mount: &str, path: &str, names: &[&str], f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path).into_iter().filter(|d| d != mount) {
        for name in names {
            let file = format!("{dir}/{name}");
            let Some(v) = read_file(env, &file, p) else {
                continue;
            };
            if v.is_empty() {
                continue;
            }
            if let Some(c) = p.parse(NAME, &file, &v, parse::cpu_list_count) {
                if f.cores.map_or(true, |x| c < x) {
                    f.note("cores_file", file);
                }
                f.lower_cores(c);
            }
            return;
        }
    }
}

fn memory_limit(env: &Env, file: &str, f: &mut Finding, p: &mut Problems) {
    let Some(v) = read_file(env, file, p) else {
        return;
    };
    if v == "max" {
        return;
    }
    if let Some(b) = p.parse(NAME, file, &v, |s| {
        s.parse::<u64>()
            .map_err(|_| "is not \"max\" or a byte count".into())
    }) {
        if b >= UNLIMITED_FLOOR {
            return;
        }
        if f.memory_bytes.map_or(true, |x| b < x) {
            f.note("memory_file", file.to_string());
        }
        f.lower_memory(b);
    }
}

fn v1_memory(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        memory_limit(env, &format!("{dir}/memory.limit_in_bytes"), f, p);
    }
}

fn v2_memory(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        memory_limit(env, &format!("{dir}/memory.max"), f, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestor_walk() {
        assert_eq!(
            ancestors("/m", "/a/b"),
            vec!["/m/a/b".to_string(), "/m/a".into(), "/m".into()]
        );
        assert_eq!(ancestors("/m", "/"), vec!["/m".to_string()]);
    }

    #[test]
    fn quota_rounds_down_not_below_one() {
        assert_eq!(quota_cores(150000, 100000), 1);
        assert_eq!(quota_cores(50000, 100000), 1);
        assert_eq!(quota_cores(250000, 100000), 2);
    }
}
