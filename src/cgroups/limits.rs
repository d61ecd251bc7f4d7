//! What a cgroup's limit files say, and the ancestors whose limits bind a cgroup: the parsing
//! both the helper (clamping a payload's CPU quota to its pilot's) and the pilot's slot
//! discovery (its slot is at most what its cgroup and every ancestor allow) rely on.
//!
//! Pure functions on text and paths; reads no file, so each caller reads its own way (the
//! helper from cgroupfs, the pilot through its slot environment).

/// v1 writes the largest page-aligned i64 for "no limit"; anything this large is no limit.
pub const UNLIMITED_FLOOR: u64 = 1 << 62;

/// A CPU bandwidth limit: `quota_us` of CPU time in every `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuQuota {
    /// As whole cores: rounds down, never below one. A quota of more than 2^32 periods
    /// limits nothing a machine has, so it is u32::MAX cores, not a truncated count.
    pub fn cores(&self) -> u32 {
        u32::try_from(self.quota_us / self.period_us.max(1))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// The quota for the same share of CPU in another period.
    pub fn scaled_to(&self, period_us: u64) -> u64 {
        self.quota_us.saturating_mul(period_us) / self.period_us.max(1)
    }
}

/// v1 `cpu.cfs_quota_us`: `-1` is no limit (`None`).
pub fn v1_quota(text: &str) -> Result<Option<u64>, &'static str> {
    match text.trim() {
        "-1" => Ok(None),
        t => t
            .parse::<u64>()
            .map(Some)
            .map_err(|_| "is not -1 or microseconds"),
    }
}

/// v1 `cpu.cfs_period_us`: a positive number of microseconds.
pub fn v1_period(text: &str) -> Result<u64, &'static str> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or("is not a positive number of microseconds")
}

/// v2 `cpu.max`: `max [period]` is no limit, else `quota [period]` (period 100000 when absent).
pub fn v2_cpu_max(text: &str) -> Result<Option<CpuQuota>, &'static str> {
    let mut w = text.split_whitespace();
    let (quota, period) = (w.next().unwrap_or(""), w.next().unwrap_or("100000"));
    if quota == "max" {
        return Ok(None);
    }
    match (quota.parse::<u64>(), period.parse::<u64>()) {
        (Ok(quota_us), Ok(period_us)) if period_us > 0 => Ok(Some(CpuQuota {
            quota_us,
            period_us,
        })),
        _ => Err("is not \"max\" or \"quota period\""),
    }
}

/// v1 `memory.limit_in_bytes` or v2 `memory.max`: `max` or v1's huge "unlimited" value is no
/// limit (`None`).
pub fn memory_limit(text: &str) -> Result<Option<u64>, &'static str> {
    match text.trim() {
        "max" => Ok(None),
        t => match t.parse::<u64>() {
            Ok(b) if b >= UNLIMITED_FLOOR => Ok(None),
            Ok(b) => Ok(Some(b)),
            Err(_) => Err("is not \"max\" or a byte count"),
        },
    }
}

/// The cgroup at `path` (as in `/proc/PID/cgroup`) and every ancestor up to the hierarchy's
/// root, as directories below `mount`, the cgroup itself first: a parent's limit binds its
/// children.
pub fn ancestors(mount: &str, path: &str) -> Vec<String> {
    let mount = mount.trim_end_matches('/');
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestor_walk() {
        assert_eq!(ancestors("/m", "/a/b"), ["/m/a/b", "/m/a", "/m"]);
        assert_eq!(ancestors("/m", "/"), ["/m"]);
        assert_eq!(ancestors("/m/", "/a/"), ["/m/a", "/m"]);
    }

    #[test]
    fn quota_rounds_down_not_below_one_and_scales() {
        let q = |quota_us, period_us| CpuQuota {
            quota_us,
            period_us,
        };
        assert_eq!(q(150000, 100000).cores(), 1);
        assert_eq!(q(50000, 100000).cores(), 1);
        assert_eq!(q(250000, 100000).cores(), 2);
        assert_eq!(q(u64::MAX, 1).cores(), u32::MAX);
        assert_eq!(q(50000, 50000).scaled_to(100000), 100000);
    }

    #[test]
    fn limit_files() {
        assert_eq!(v1_quota("-1\n"), Ok(None));
        assert_eq!(v1_quota("50000"), Ok(Some(50000)));
        assert!(v1_quota("x").is_err());
        assert!(v1_period("0").is_err());
        assert_eq!(v2_cpu_max("max 100000"), Ok(None));
        assert_eq!(
            v2_cpu_max("200000 50000\n"),
            Ok(Some(CpuQuota {
                quota_us: 200000,
                period_us: 50000
            }))
        );
        assert_eq!(v2_cpu_max("300000").unwrap().unwrap().period_us, 100000);
        assert!(v2_cpu_max("fast").is_err() && v2_cpu_max("1 0").is_err());
        assert_eq!(memory_limit("max"), Ok(None));
        assert_eq!(memory_limit("9223372036854771712"), Ok(None));
        assert_eq!(memory_limit("268435456\n"), Ok(Some(268435456)));
        assert!(memory_limit("1G").is_err());
    }
}
