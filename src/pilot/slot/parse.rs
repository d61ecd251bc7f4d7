//! Value parsers shared by the batch system sources: counts, CPU lists, durations and memory
//! sizes in the notations the batch systems document. Pure functions; errors are short phrases
//! ("is not a whole number") that the caller wraps with the source, variable and value.

/// The last deadline discovery accepts: the end of the year 9999 (a later one is a broken
/// value, and keeping deadlines far from i64::MAX keeps every later subtraction exact).
pub const MAX_DEADLINE: i64 = 253_402_300_799;

/// `base + secs` as a deadline (Unix time); an error instead of an overflow or a deadline
/// past [`MAX_DEADLINE`].
pub fn deadline(base: i64, secs: i64) -> Result<i64, String> {
    base.checked_add(secs)
        .filter(|t| *t <= MAX_DEADLINE)
        .ok_or_else(|| format!("puts the deadline past the year 9999 ({base} + {secs} s)"))
}

/// `v * mult` whole bytes; an error when it does not fit in 64 bits (a float cast would
/// saturate silently).
pub fn bytes(v: f64, mult: f64) -> Result<u64, String> {
    let b = (v * mult).floor();
    if (0.0..18_446_744_073_709_551_616.0).contains(&b) {
        Ok(b as u64)
    } else {
        Err("is more than 2^64 bytes".into())
    }
}

/// Whole cores from a decimal count (rounded down); an error beyond 32 bits.
pub fn cores(v: f64) -> Result<u32, String> {
    let c = v.floor();
    if (0.0..=u32::MAX as f64).contains(&c) {
        Ok(c as u32)
    } else {
        Err("is more than 2^32 cores".into())
    }
}

/// A Unix time or a number of seconds from a decimal (rounded down); an error when it is
/// past the year 9999.
pub fn seconds(v: f64) -> Result<i64, String> {
    let t = v.floor();
    if t.is_finite() && t.abs() <= MAX_DEADLINE as f64 {
        Ok(t as i64)
    } else {
        Err("is more seconds than there are until the year 9999".into())
    }
}

/// A positive whole number of cores (0 is no allocation, so it is rejected too).
pub fn count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("is zero".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("is not a positive whole number".into()),
    }
}

/// A non-negative integer (seconds, MiB, Unix time).
pub fn int(s: &str) -> Result<i64, String> {
    let t = s.trim();
    t.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| "is not a non-negative whole number".to_string())
}

/// A non-negative decimal number (machine/job features allow "2.5").
pub fn decimal(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| "is not a non-negative number".to_string())
}

/// Counts the CPUs in a Linux CPU list such as "0-3,8,10-11" (cpuset.cpus).
pub fn cpu_list_count(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is an empty CPU list".into());
    }
    let mut n: u32 = 0;
    for part in s.split(',') {
        let bad = || format!("has a malformed CPU range {part:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad())?;
                let b: u32 = b.trim().parse().map_err(|_| bad())?;
                if b < a {
                    return Err(bad());
                }
                n = (b - a)
                    .checked_add(1)
                    .and_then(|k| n.checked_add(k))
                    .ok_or_else(|| "counts more than 2^32 CPUs".to_string())?;
            }
            None => {
                part.trim().parse::<u32>().map_err(|_| bad())?;
                n = n
                    .checked_add(1)
                    .ok_or_else(|| "counts more than 2^32 CPUs".to_string())?;
            }
        }
    }
    Ok(n)
}

/// Seconds from "[[H:]M:]S" (PBS walltime, SGE time specifier, LSF -hms) or plain seconds.
/// Empty fields count as zero ("1::1" is one hour and one second, as SGE documents);
/// a fractional second part ("00:10:00.5") is truncated.
pub fn hms(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let parts: Vec<&str> = t.split(':').collect();
    if t.is_empty() || parts.len() > 3 {
        return Err("is not [[hours:]minutes:]seconds".into());
    }
    let mut total: i64 = 0;
    for (i, p) in parts.iter().enumerate() {
        let p = if i == parts.len() - 1 {
            p.split('.').next().unwrap_or("")
        } else {
            p
        };
        let v: i64 = if p.is_empty() && parts.len() > 1 {
            0
        } else {
            p.parse()
                .ok()
                .filter(|v: &i64| *v >= 0)
                .ok_or_else(|| "is not [[hours:]minutes:]seconds".to_string())?
        };
        total = total
            .checked_mul(60)
            .and_then(|t| t.checked_add(v))
            .ok_or_else(|| "is more seconds than fit in 64 bits".to_string())?;
    }
    Ok(total)
}

/// Slurm's time-limit notation: "minutes", "minutes:seconds", "hours:minutes:seconds",
/// "days-hours", "days-hours:minutes", "days-hours:minutes:seconds".
/// Ok(None) for "UNLIMITED"/"INFINITE".
pub fn slurm_duration(s: &str) -> Result<Option<i64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("UNLIMITED") || t.eq_ignore_ascii_case("INFINITE") {
        return Ok(None);
    }
    let err = || "is not a Slurm time ([days-]hours:minutes:seconds or minutes)".to_string();
    // Each field is bounded so the sums below cannot overflow (2^32 days is far beyond any
    // real limit; a larger value is an error, not a wrapped number).
    let num = |p: &str| -> Result<i64, String> {
        p.parse::<i64>()
            .ok()
            .filter(|v| (0..1 << 32).contains(v))
            .ok_or_else(err)
    };
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(num(d)?), r),
        None => (None, t),
    };
    let f: Vec<&str> = rest.split(':').collect();
    let secs = match (days, f.as_slice()) {
        (None, [m]) => num(m)? * 60,
        (None, [m, s]) => num(m)? * 60 + num(s)?,
        (None, [h, m, s]) | (Some(_), [h, m, s]) => num(h)? * 3600 + num(m)? * 60 + num(s)?,
        (Some(_), [h]) => num(h)? * 3600,
        (Some(_), [h, m]) => num(h)? * 3600 + num(m)? * 60,
        _ => return Err(err()),
    };
    Ok(Some(days.unwrap_or(0) * 86400 + secs))
}

/// Slurm's per-node CPU list ("2", "2(x3)", "72(x2),36"): the value for node `index`.
pub fn slurm_cpus_per_node(s: &str, index: usize) -> Result<u32, String> {
    let mut seen = 0usize;
    for group in s.trim().split(',') {
        let (value, repeat) = match group.split_once("(x") {
            Some((v, r)) => {
                let r = r
                    .strip_suffix(')')
                    .and_then(|r| r.parse::<usize>().ok())
                    .ok_or_else(|| format!("has a malformed repeat {group:?}"))?;
                (v, r)
            }
            None => (group, 1),
        };
        let value = count(value).map_err(|e| format!("has {value:?} which {e}"))?;
        if index < seen + repeat {
            return Ok(value);
        }
        seen += repeat;
    }
    Err(format!("lists {seen} nodes, none for node index {index}"))
}

/// SGE memory specifier: k/m/g multiply by powers of 1000, K/M/G by powers of 1024
/// (sge_types(1)). Ok(None) for "INFINITY".
pub fn sge_memory(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("INFINITY") {
        return Ok(None);
    }
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1000),
        Some('K') => (&t[..t.len() - 1], 1 << 10),
        Some('m') => (&t[..t.len() - 1], 1000 * 1000),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1000 * 1000 * 1000),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1000u64.pow(4)),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| "is not a memory size like 2G or 512M".to_string())?;
    bytes(v, mult as f64).map(Some)
}

/// PBS size: an integer with an optional suffix b, kb, mb, gb, tb, pb (powers of 1024) or
/// w, kw, mw, gw, tw (words of 8 bytes), case-insensitive, as pbs_resources(7) documents.
pub fn pbs_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| "is not a PBS size like 4gb or 512mb".to_string())?;
    let (scale, word) = match unit.strip_suffix('w') {
        Some(p) => (p, 8u64),
        None => (unit.strip_suffix('b').unwrap_or(unit), 1u64),
    };
    if unit.is_empty() {
        return Ok(n);
    }
    let mult: u64 = match scale {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err("has an unknown unit (use b, kb, mb, gb, tb)".into()),
    };
    n.checked_mul(mult)
        .and_then(|b| b.checked_mul(word))
        .ok_or_else(|| "is more than 2^64 bytes".to_string())
}

/// Splits a "Name = value" ClassAd-like or "key=value" line; the value loses surrounding quotes.
pub fn key_value(line: &str, sep: char) -> Option<(&str, &str)> {
    let (k, v) = line.split_once(sep)?;
    let k = k.trim();
    if k.is_empty() {
        return None;
    }
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    Some((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(count(" 4\n"), Ok(4));
        assert!(count("0").is_err());
        assert!(count("four").is_err());
        assert!(count("-1").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list_count("0-3,8,10-11\n"), Ok(7));
        assert_eq!(cpu_list_count("1"), Ok(1));
        assert!(cpu_list_count("").is_err());
        assert!(cpu_list_count("3-1").is_err());
        assert!(cpu_list_count("a-b").is_err());
        assert!(cpu_list_count("0-4294967295").is_err());
    }

    #[test]
    fn hms_forms() {
        assert_eq!(hms("01:00:00"), Ok(3600));
        assert_eq!(hms("1::1"), Ok(3601));
        assert_eq!(hms("10:30"), Ok(630));
        assert_eq!(hms("7200"), Ok(7200));
        assert_eq!(hms("48:00:00"), Ok(172800));
        assert_eq!(hms("00:10:00.5"), Ok(600));
        assert!(hms("").is_err());
        assert!(hms("1:2:3:4").is_err());
        assert!(hms("ten").is_err());
        assert!(hms("9223372036854775807:00:00").is_err());
    }

    #[test]
    fn slurm_durations() {
        assert_eq!(slurm_duration("30"), Ok(Some(1800)));
        assert_eq!(slurm_duration("30:15"), Ok(Some(1815)));
        assert_eq!(slurm_duration("01:00:00"), Ok(Some(3600)));
        assert_eq!(slurm_duration("2-00"), Ok(Some(172800)));
        assert_eq!(slurm_duration("1-02:03"), Ok(Some(86400 + 7380)));
        assert_eq!(slurm_duration("1-02:03:04"), Ok(Some(86400 + 7384)));
        assert_eq!(slurm_duration("UNLIMITED"), Ok(None));
        assert!(slurm_duration("soon").is_err());
        assert!(slurm_duration("9223372036854775807-00").is_err());
    }

    #[test]
    fn slurm_cpu_lists() {
        assert_eq!(slurm_cpus_per_node("2", 0), Ok(2));
        assert_eq!(slurm_cpus_per_node("2(x3)", 2), Ok(2));
        assert_eq!(slurm_cpus_per_node("4,2(x2)", 0), Ok(4));
        assert_eq!(slurm_cpus_per_node("4,2(x2)", 2), Ok(2));
        assert_eq!(slurm_cpus_per_node("72(x2),36", 2), Ok(36));
        assert!(slurm_cpus_per_node("4,2(x2)", 3).is_err());
        assert!(slurm_cpus_per_node("2(x", 0).is_err());
        assert!(slurm_cpus_per_node("x", 0).is_err());
    }

    #[test]
    fn sge_memory_units() {
        assert_eq!(sge_memory("2G"), Ok(Some(2 << 30)));
        assert_eq!(sge_memory("512M"), Ok(Some(512 << 20)));
        assert_eq!(sge_memory("2g"), Ok(Some(2_000_000_000)));
        assert_eq!(sge_memory("1.5G"), Ok(Some(3 << 29)));
        assert_eq!(sge_memory("4096"), Ok(Some(4096)));
        assert_eq!(sge_memory("INFINITY"), Ok(None));
        assert!(sge_memory("lots").is_err());
        assert!(sge_memory("99999999999T").is_err());
    }

    #[test]
    fn pbs_sizes() {
        assert_eq!(pbs_size("4gb"), Ok(4 << 30));
        assert_eq!(pbs_size("512MB"), Ok(512 << 20));
        assert_eq!(pbs_size("1024kb"), Ok(1 << 20));
        assert_eq!(pbs_size("100"), Ok(100));
        assert_eq!(pbs_size("100b"), Ok(100));
        assert_eq!(pbs_size("2kw"), Ok(2 * 1024 * 8));
        assert!(pbs_size("4xb").is_err());
        assert!(pbs_size("17179869184gb").is_err());
        assert!(pbs_size("gb").is_err());
    }

    #[test]
    fn checked_conversions() {
        assert_eq!(bytes(1.5, 1024.0), Ok(1536));
        assert!(bytes(1e30, 1.0).is_err());
        assert_eq!(cores(2.7), Ok(2));
        assert!(cores(1e12).is_err());
        assert_eq!(deadline(10, 5), Ok(15));
        assert!(deadline(i64::MAX, 1).is_err());
        assert!(deadline(0, MAX_DEADLINE + 1).is_err());
        assert!(seconds(1e300).is_err());
    }

    #[test]
    fn key_values() {
        assert_eq!(key_value("Cpus = 4", '='), Some(("Cpus", "4")));
        assert_eq!(
            key_value("Name = \"slot1@wn\"", '='),
            Some(("Name", "slot1@wn"))
        );
        assert_eq!(key_value("no separator", '='), None);
    }
}
