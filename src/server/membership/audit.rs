//! The audit log of membership transactions (reference 002 4.7): one hash-chained JSON-lines
//! record per request filed, decided, carried out or purged, written with the same
//! [`ChainWriter`] as the request log and the helper's audit log (mode 0600, rotated weekly,
//! rotated files deleted after `audit_log_retention_days`, 180 days to a year: the records
//! name DNs). Records carry DNs, kinds, outcomes and verification notes, never the
//! registration data itself (names, addresses, phone numbers live only in the database,
//! where the purge reaches them).
//!
//! Both `serve` and the command line (`membership purge`) write it: each append takes an
//! exclusive lock on `<log>.lock`, opens the chain at its current head, appends, syncs and
//! closes, so the two never fork the chain. Membership transactions are a few a day; the
//! open per record costs a read of the file's tail.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::records::{ChainWriter, FsyncPolicy, RecordError, RotatePolicy};

/// One membership transaction.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub time: String,
    /// Always `membership`.
    pub event: &'static str,
    /// `register`, `request`, `approve`, `reject`, `suspend`, `reinstate`, `remove`,
    /// `notify`, `purge`.
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_dn: Option<String>,
    /// The certificate that asked (or the server account, for the command line).
    pub actor_dn: String,
    /// `pending`, `approved`, `rejected`, `done`, `delivered`, `failed`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    /// What changed, without personal data (e.g. FQANs, a reason, payloads stopped).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl AuditRecord {
    pub fn new(action: &'static str, actor: &str, outcome: &str) -> Self {
        AuditRecord {
            time: crate::records::now_rfc3339(),
            event: "membership",
            action,
            request_id: None,
            kind: None,
            subject_dn: None,
            actor_dn: actor.to_string(),
            outcome: outcome.to_string(),
            verification: None,
            details: serde_json::Value::Null,
        }
    }
}

/// The audit log's place and retention.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    retention: Duration,
}

impl AuditLog {
    pub fn new(path: &Path, retention_days: u32) -> Self {
        AuditLog {
            path: path.to_path_buf(),
            retention: Duration::from_secs(u64::from(retention_days) * 86400),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rec` and syncs it: on disk when this returns Ok.
    pub fn append(&self, rec: &AuditRecord) -> Result<(), RecordError> {
        let lock_path = self.path.with_extension("lock");
        let io = |source| RecordError::Open {
            path: lock_path.clone(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io)?;
        // Held until `lock` is dropped at the end of this function: one writer at a time
        // across the server and the command line.
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(std::io::Error::from(e)))?;
        let policy = RotatePolicy {
            max_bytes: Some(64 << 20),
            max_age: Some(Duration::from_secs(7 * 86400)),
            retention: Some(self.retention),
        };
        let mut w =
            ChainWriter::open(&self.path, 0o600, FsyncPolicy::Always)?.with_rotation(policy);
        w.append(rec)?;
        w.sync()?;
        // Root running `member ...` or `membership purge` on the server's host must not leave
        // files the server's account cannot open (its next change would fail to be audited).
        for p in [&lock_path, &self.path] {
            owned_like_directory(p).map_err(|source| RecordError::Open {
                path: p.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }
}

/// As root, gives `path` the owner of its directory when they differ (a file root created in
/// the server account's data directory); otherwise does nothing.
fn owned_like_directory(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let dir = std::fs::metadata(path.parent().unwrap_or(Path::new(".")))?;
    let file = std::fs::metadata(path)?;
    if (file.uid(), file.gid()) != (dir.uid(), dir.gid()) {
        std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root's files in a directory another account owns are handed to that account.
    #[test]
    fn files_root_creates_belong_to_the_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            panic!("runs as root (scripts/test.sh does): it checks root's chown");
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let p = dir.path().join("membership-audit.jsonl");
        AuditLog::new(&p, 365)
            .append(&AuditRecord::new("purge", "root", "done"))
            .unwrap();
        for f in [p.clone(), p.with_extension("lock")] {
            let m = std::fs::metadata(&f).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", f.display());
        }
    }

    /// Two writers (as `serve` and `membership purge` are) append in turn without forking
    /// the chain.
    #[test]
    fn writers_in_turn_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("membership-audit.jsonl");
        let a = AuditLog::new(&p, 365);
        let b = AuditLog::new(&p, 365);
        for i in 0..4 {
            let log = if i % 2 == 0 { &a } else { &b };
            log.append(&AuditRecord::new("approve", "/CN=m", "approved"))
                .unwrap();
        }
        let r = crate::records::verify_file(&p).unwrap();
        assert_eq!((r.records, r.first_break), (4, None));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
