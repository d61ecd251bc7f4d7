//! Rotation naming and retention for chained logs.
//!
//! A rotated file is named `<log>.<UTC timestamp of rotation>` (e.g.
//! `audit.jsonl.20261123T031200.123456Z`), so names sort oldest first and a rotation is one
//! `rename(2)`: a crash never leaves two files with the same role. The chain continues into
//! the new file. Retention deletes rotated files only, never the current one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::RecordError;

const STAMP: &str = "%Y%m%dT%H%M%S%.6fZ";

/// When to rotate a log, and how long rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotatePolicy {
    /// Rotate before an append once the current file holds this many bytes.
    pub max_bytes: Option<u64>,
    /// Rotate before an append once the current file's first record is this old.
    pub max_age: Option<Duration>,
    /// Delete rotated files rotated longer ago than this; `None` keeps them forever.
    pub retention: Option<Duration>,
}

/// 180 days: the minimum the site policy (P11) asks audit logs to be kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(180 * 86400);

impl Default for RotatePolicy {
    /// 64 MiB or 7 days per file, rotated files kept 180 days.
    fn default() -> Self {
        RotatePolicy {
            max_bytes: Some(64 << 20),
            max_age: Some(Duration::from_secs(7 * 86400)),
            retention: Some(DEFAULT_RETENTION),
        }
    }
}

/// The name a log gets when rotated at `at`.
pub fn rotated_name(log: &Path, at: DateTime<Utc>) -> PathBuf {
    let mut at = at;
    loop {
        let mut name = log.as_os_str().to_owned();
        name.push(".");
        name.push(at.format(STAMP).to_string());
        let p = PathBuf::from(name);
        if !p.exists() {
            return p;
        }
        // Two rotations in one microsecond: keep names unique and ordered.
        at += chrono::Duration::microseconds(1);
    }
}

/// When a rotated file was rotated, from its name; `None` if `path` is not a rotated file of `log`.
pub fn rotated_at(log: &Path, path: &Path) -> Option<DateTime<Utc>> {
    let base = log.file_name()?.to_str()?;
    let name = path.file_name()?.to_str()?;
    let stamp = name.strip_prefix(base)?.strip_prefix('.')?;
    NaiveDateTime::parse_from_str(stamp, STAMP)
        .ok()
        .map(|n| n.and_utc())
}

/// The rotated files of `log`, oldest first.
pub fn rotated_files(log: &Path) -> Result<Vec<PathBuf>, RecordError> {
    let dir = match log.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RecordError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out: Vec<(DateTime<Utc>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| dir.join(e.file_name()))
        .filter_map(|p| rotated_at(log, &p).map(|t| (t, p)))
        .collect();
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// Every file of the chain of `log`, oldest first: its rotated files, then `log` itself if
/// it exists.
pub fn chain_files(log: &Path) -> Result<Vec<PathBuf>, RecordError> {
    let mut files = rotated_files(log)?;
    if log.exists() {
        files.push(log.to_path_buf());
    }
    Ok(files)
}

/// Deletes rotated files of `log` rotated more than `keep` before `now`; returns them.
pub fn apply_retention(
    log: &Path,
    keep: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<PathBuf>, RecordError> {
    let expired = expired_files(log, keep, now)?;
    delete_files(&expired)?;
    Ok(expired)
}

/// The rotated files of `log` rotated more than `keep` before `now`, oldest first.
pub fn expired_files(
    log: &Path,
    keep: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<PathBuf>, RecordError> {
    let Some(cutoff) = chrono::Duration::from_std(keep)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
    else {
        return Ok(Vec::new());
    };
    Ok(rotated_files(log)?
        .into_iter()
        .filter(|p| rotated_at(log, p).is_some_and(|t| t < cutoff))
        .collect())
}

/// Deletes rotated files (retention).
pub fn delete_files(files: &[PathBuf]) -> Result<(), RecordError> {
    for p in files {
        std::fs::remove_file(p).map_err(|source| RecordError::Write {
            path: p.clone(),
            source,
        })?;
        tracing::info!(file = %p.display(), "deleted rotated log past retention");
    }
    Ok(())
}
