//! The helper's audit log (P4, P11): one hash-chained JSON-lines record per refused caller,
//! denial, start, end, kill and signal, written through [`crate::records::ChainWriter`]
//! (mode 0600, every record on disk before the helper acts on it) by one writer shared behind a mutex, plus one syslog
//! line per identity switch. Records; decides nothing.

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::records::{ChainWriter, FsyncPolicy, PendingSync, RecordError};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    RefusedCaller,
    /// How many more connections of one uid were refused in an interval (`refused_count`).
    RefusedSummary,
    Denied,
    Start,
    End,
    Kill,
    Signal,
}

/// One audit record. Fields that do not apply are left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub event: Option<AuditEvent>,
    pub host: String,
    pub helper_pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pilot_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pilot_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pilot_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pilot_dn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_dn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqans: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobtag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denial_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argv_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_count: Option<u64>,
}

impl AuditRecord {
    /// A later record about the same payload (signal, kill, end): this (start) record's facts,
    /// a fresh time, `event`, and no decision or reason of its own yet.
    pub fn follow_up(&self, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            time: crate::records::now_rfc3339(),
            event: Some(event),
            decision: None,
            reason: None,
            ..self.clone()
        }
    }
}

/// SHA-256 of the argv joined with NUL bytes: names the exact command in records.
pub fn argv_sha256(argv: &[String]) -> String {
    crate::protocol::envelope::sha256_hex(argv.join("\0").as_bytes())
}

/// The shared audit writer.
pub struct AuditLog {
    writer: Mutex<ChainWriter>,
    host: String,
}

impl AuditLog {
    /// Opens (creating 0600) the audit log and forces its mode to 0600.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        use std::os::unix::fs::PermissionsExt;
        // Rotation keeps the chain across files and deletes rotated files after 180 days (P11).
        let w = ChainWriter::open(path, 0o600, FsyncPolicy::Always)?
            .with_rotation(crate::records::rotate::RotatePolicy::default());
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| RecordError::Open {
                path: path.to_path_buf(),
                source,
            },
        )?;
        if let Some(line) = w.torn_tail() {
            tracing::warn!(
                path = %path.display(),
                line,
                "audit log ended in a torn record (a crash mid-write); it stays in place and `mupilot-switch audit verify` reports it"
            );
        }
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(AuditLog {
            writer: Mutex::new(w),
            host,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// A record of `event` with time, host and helper pid filled in.
    pub fn record(&self, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            time: crate::records::now_rfc3339(),
            event: Some(event),
            host: self.host.clone(),
            helper_pid: std::process::id(),
            ..Default::default()
        }
    }

    /// Appends `rec` (fsynced when this returns Ok).
    pub fn append(&self, rec: &AuditRecord) -> Result<u64, RecordError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.append(rec)
    }

    /// Appends `rec` without waiting for the disk: the caller waits on the returned
    /// [`PendingSync`] outside the writer's lock (start records while the stage builds the
    /// sandbox, end records after the exit was reported).
    pub fn append_unsynced(&self, rec: &AuditRecord) -> Result<PendingSync, RecordError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.append_unsynced(rec).map(|(_, pending)| pending)
    }

    /// After a crash: writes a `lost` end record for every payload whose start has no end
    /// (its stage noticed the helper gone and tore it down). Returns their ids.
    pub fn close_open_starts(&self) -> Result<Vec<String>, RecordError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        crate::records::lost::close_open_starts(&mut w, "helper restarted; end not recorded")
    }

    /// Sends the chain head to syslog and records it, so a truncated tail is detectable.
    pub fn anchor(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = crate::records::anchor::anchor(&mut w, &self.host) {
            tracing::error!(error = %e, "cannot anchor the audit chain head");
        }
    }

    /// Appends `rec`; a failure is logged loudly (used where nothing else can be done, such as
    /// the end record of a payload that already ended).
    pub fn append_or_log(&self, rec: &AuditRecord) {
        if let Err(e) = self.append(rec) {
            tracing::error!(error = %e, record = ?rec, "cannot write audit record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_chain_and_skip_empty_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&p).unwrap();
        let mut r = log.record(AuditEvent::Denied);
        r.decision = Some("deny");
        r.reason = Some("no mapping".into());
        log.append(&r).unwrap();
        log.append(&log.record(AuditEvent::RefusedCaller)).unwrap();
        let recs = crate::records::read_records(&p).unwrap();
        assert_eq!(recs[0]["event"], "denied");
        assert_eq!(recs[0]["decision"], "deny");
        assert!(recs[0].get("uid").is_none());
        assert_eq!(recs[1]["event"], "refused_caller");
        assert!(crate::records::verify_file(&p)
            .unwrap()
            .first_break
            .is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            argv_sha256(&["a".into(), "b".into()]),
            crate::protocol::envelope::sha256_hex(b"a\0b")
        );
    }
}
