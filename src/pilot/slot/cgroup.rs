//! The pilot's own cgroup: whatever the batch system or the site set on it (or on any
//! ancestor, since a parent's limit binds its children) bounds the slot. Parses
//! /proc/self/cgroup and reads, under /sys/fs/cgroup:
//! - v1: cpu.cfs_quota_us / cpu.cfs_period_us, cpuset.effective_cpus or cpuset.cpus,
//!   memory.limit_in_bytes (the "unlimited" huge value is ignored);
//! - v2 (pure, or the unified hierarchy of a hybrid host): cpu.max, cpuset.cpus.effective,
//!   memory.max.
//!
//! What the files mean (limit values, ancestors, `/proc/self/cgroup` lines) is
//! [`crate::cgroups`]' (shared with the helper); this module finds the hierarchies where batch
//! systems mount them (`/sys/fs/cgroup/<controller>`, `/sys/fs/cgroup[/unified]`), turns values
//! into a [`Finding`] and reports bad ones to [`Problems`]. Reads only through [`Env`] and
//! changes nothing.

use super::env::Env;
use super::parse;
use super::source::{Finding, Problems};
use crate::cgroups::limits::{self, ancestors};
use crate::cgroups::membership;

const NAME: &str = "cgroup";

/// Reads the cgroup limits; None when /proc/self/cgroup is unreadable or nothing binds.
pub fn read(env: &Env, p: &mut Problems) -> Option<Finding> {
    let text = env.read("/proc/self/cgroup").ok()?;
    let (lines, bad) = membership::parse_all(&text);
    for line in bad {
        p.bad(
            NAME,
            "/proc/self/cgroup line",
            line,
            "is not id:controllers:path",
        );
    }
    let mut f = Finding::new(NAME, false);
    let v1 = |c: &str| lines.iter().find(|m| m.has(c));
    let mut version = Vec::new();

    // v1 hierarchies, each controller under its own mount.
    for ctl in ["cpu", "cpuset", "memory"] {
        let Some(m) = v1(ctl) else { continue };
        let mount = [m.list().as_str(), ctl]
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
    if let Some(m) = lines.iter().find(|m| m.is_unified()) {
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

/// Lowers the cores to what `quota` allows, noting the file when it binds most.
fn lower_cores(quota: limits::CpuQuota, file: String, f: &mut Finding) {
    let c = quota.cores();
    if f.cores.is_none_or(|x| c < x) {
        f.note("cores_file", file);
    }
    f.lower_cores(c);
}

fn v1_cpu(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        let qf = format!("{dir}/cpu.cfs_quota_us");
        let Some(q) = read_file(env, &qf, p) else {
            continue;
        };
        let Some(Some(quota_us)) =
            p.parse(NAME, &qf, &q, |s| limits::v1_quota(s).map_err(String::from))
        else {
            continue;
        };
        let pf = format!("{dir}/cpu.cfs_period_us");
        let Some(period_us) = read_file(env, &pf, p).and_then(|s| {
            p.parse(NAME, &pf, &s, |s| {
                limits::v1_period(s).map_err(String::from)
            })
        }) else {
            continue;
        };
        lower_cores(
            limits::CpuQuota {
                quota_us,
                period_us,
            },
            qf,
            f,
        );
    }
}

fn v2_cpu(env: &Env, mount: &str, path: &str, f: &mut Finding, p: &mut Problems) {
    for dir in ancestors(mount, path) {
        let file = format!("{dir}/cpu.max");
        let Some(v) = read_file(env, &file, p) else {
            continue;
        };
        if let Some(Some(quota)) = p.parse(NAME, &file, &v, |s| {
            limits::v2_cpu_max(s).map_err(String::from)
        }) {
            lower_cores(quota, file, f);
        }
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
                if f.cores.is_none_or(|x| c < x) {
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
    if let Some(Some(b)) = p.parse(NAME, file, &v, |s| {
        limits::memory_limit(s).map_err(String::from)
    }) {
        if f.memory_bytes.is_none_or(|x| b < x) {
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
