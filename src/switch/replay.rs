//! The replay cache: every envelope nonce the helper has accepted, kept on disk in `state_dir`
//! until its envelope can no longer verify, so a replayed envelope is refused, also after a
//! restart.
//!
//! The file holds one line per nonce, `<sha256(vo NUL nonce)> <unix expiry>`, appended and
//! fsynced before the payload of that envelope may run (the launch waits for the sync while
//! the stage builds the sandbox), so a crash never forgets the nonce of a payload that ran. Expired lines
//! are pruned by rewriting the file (temp file, fsync, rename) at open and when they pile up.
//! This module only remembers; it decides nothing else.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::records::{PendingSync, RecordError};

/// Nonces stay this long after their envelope's not_after: a clock stepped back by up to this
/// much still cannot make a pruned envelope valid again.
pub const KEEP_AFTER_EXPIRY_SECONDS: i64 = 3600;

/// Errors of the cache file; each names it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay cache {path}: {source}; check that state_dir is a writable local directory")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ReplayError {
    /// The error of a failed [`PendingSync`] of the cache file.
    pub fn from_sync(e: RecordError) -> Self {
        match e {
            RecordError::Write { path, source } | RecordError::Open { path, source } => {
                ReplayError::Io { path, source }
            }
            other => ReplayError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }
}

/// The set of seen nonces and its file.
pub struct ReplayCache {
    path: PathBuf,
    file: File,
    seen: HashMap<String, i64>,
    lines_in_file: usize,
}

fn key(vo: &str, nonce: &str) -> String {
    crate::protocol::envelope::sha256_hex(format!("{vo}\0{nonce}").as_bytes())
}

impl ReplayCache {
    /// Loads the cache from `path` (created 0600 if missing), dropping expired entries.
    pub fn open(path: &Path) -> Result<Self, ReplayError> {
        let io = |source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        };
        let now = Utc::now().timestamp();
        let mut seen = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io)?;
                    let mut parts = line.split_whitespace();
                    let (Some(k), Some(exp)) = (parts.next(), parts.next()) else {
                        // A torn last line (crash mid-append): its envelope was never
                        // answered as started, and dropping it only loses that one nonce.
                        continue;
                    };
                    let Ok(exp) = exp.parse::<i64>() else {
                        continue;
                    };
                    if k.len() == 64 && exp > now {
                        seen.insert(k.to_string(), exp);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let file = rewrite(path, &seen).map_err(io)?;
        Ok(ReplayCache {
            path: path.to_path_buf(),
            file,
            lines_in_file: seen.len(),
            seen,
        })
    }

    /// Records `nonce` of `vo`, valid until `not_after`. Returns `Ok(false)` when it was seen
    /// before (a replay). The entry is on disk when this returns `Ok(true)`.
    pub fn check_and_insert(
        &mut self,
        vo: &str,
        nonce: &str,
        not_after: DateTime<Utc>,
    ) -> Result<bool, ReplayError> {
        match self.check_and_insert_unsynced(vo, nonce, not_after)? {
            None => Ok(false),
            Some(pending) => {
                pending.wait().map_err(ReplayError::from_sync)?;
                Ok(true)
            }
        }
    }

    /// [`ReplayCache::check_and_insert`] without waiting for the disk: `None` for a replay,
    /// otherwise the entry is written (a later check in this process already refuses the
    /// nonce) and on disk once the returned [`PendingSync`] is waited for, which the launch
    /// does outside the cache's lock before the payload may run.
    pub fn check_and_insert_unsynced(
        &mut self,
        vo: &str,
        nonce: &str,
        not_after: DateTime<Utc>,
    ) -> Result<Option<PendingSync>, ReplayError> {
        let now = Utc::now().timestamp();
        let k = key(vo, nonce);
        if let Some(exp) = self.seen.get(&k) {
            if *exp > now {
                return Ok(None);
            }
        }
        let exp = not_after.timestamp() + KEEP_AFTER_EXPIRY_SECONDS;
        let path = self.path.clone();
        let io = |source| ReplayError::Io {
            path: path.clone(),
            source,
        };
        self.file
            .write_all(format!("{k} {exp}\n").as_bytes())
            .map_err(io)?;
        self.seen.insert(k, exp);
        self.lines_in_file += 1;
        if self.lines_in_file > 2 * self.seen.len() + 1024 {
            // The rewrite syncs the whole file, the new entry included.
            self.prune(now)?;
        }
        let file = self.file.try_clone().map_err(io)?;
        Ok(Some(PendingSync::new(file, path)))
    }

    /// Whether `nonce` of `vo` was used already (a launch's check without spending it).
    #[cfg(feature = "grid")]
    pub fn contains(&self, vo: &str, nonce: &str) -> bool {
        self.seen.contains_key(&key(vo, nonce))
    }

    /// Number of live entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    fn prune(&mut self, now: i64) -> Result<(), ReplayError> {
        self.seen.retain(|_, exp| *exp > now);
        self.file = rewrite(&self.path, &self.seen).map_err(|source| ReplayError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.lines_in_file = self.seen.len();
        Ok(())
    }
}

/// Writes `seen` to a temp file, fsyncs and renames it over `path`; returns an append handle.
fn rewrite(path: &Path, seen: &HashMap<String, i64>) -> std::io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut buf = String::new();
    for (k, exp) in seen {
        buf.push_str(&format!("{k} {exp}\n"));
    }
    f.write_all(buf.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn replay_is_refused_also_after_reopen_and_expired_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("replay-cache");
        let later = Utc::now() + Duration::minutes(5);
        let mut c = ReplayCache::open(&p).unwrap();
        assert!(c
            .check_and_insert("demo", "nonce-aaaaaaaaaaaaaaaa", later)
            .unwrap());
        assert!(!c
            .check_and_insert("demo", "nonce-aaaaaaaaaaaaaaaa", later)
            .unwrap());
        assert!(c
            .check_and_insert("other", "nonce-aaaaaaaaaaaaaaaa", later)
            .unwrap());
        let long_ago = Utc::now() - Duration::hours(3);
        assert!(c
            .check_and_insert("demo", "old-nonce-bbbbbbbbbbbb", long_ago)
            .unwrap());
        drop(c);
        let mut c = ReplayCache::open(&p).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!c
            .check_and_insert("demo", "nonce-aaaaaaaaaaaaaaaa", later)
            .unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
