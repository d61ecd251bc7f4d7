//! The pilot's trace log (P4, P11): one hash-chained `start` record when a payload is matched
//! and one `end` record when it is over, in the VO's own file (work_dir/trace.jsonl by default).
//!
//! Every record carries every field (null when unknown), so operators can grep and query one
//! schema. A record the log cannot take (a full disk) is kept in memory, in order, and written
//! by the next write or [`TraceLog::retry`] that succeeds; the pilot fetches no work meanwhile. Owner fields come from the envelope body as the pilot read it without verifying the
//! signature: informational here; the helper's audit log is the verified record.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Serialize;

use crate::protocol::envelope::{EnvelopeBody, SignedEnvelope};
use crate::records::{Appended, ChainWriter, FsyncPolicy, Keep, RecordError};

/// The slot as recorded.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SlotFields {
    pub cores: u32,
    pub memory_bytes: u64,
    pub deadline_unix: Option<i64>,
}

/// One trace record. `event` is `start` or `end`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceRecord {
    pub time: String,
    pub event: &'static str,
    pub pilot_id: String,
    pub host: String,
    pub server_url: String,
    pub batch_system: Option<String>,
    pub batch_job_id: Option<String>,
    pub slot: SlotFields,
    pub payload_id: String,
    pub owner_dn: Option<String>,
    pub vo: Option<String>,
    pub fqans: Vec<String>,
    pub jobtag: Option<String>,
    pub envelope_sha256: Option<String>,
    pub bundle_sha256: Option<String>,
    pub match_time: String,
    /// `permit` (the helper started it), `deny` (the helper refused), `not_launched` (handed
    /// back or failed before the helper decided), null in `start` records.
    pub decision: Option<&'static str>,
    pub denial_class: Option<String>,
    pub reason: Option<String>,
    pub account: Option<String>,
    pub uid: Option<u32>,
    pub cgroup: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub cpu_seconds: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
    pub wall_seconds: Option<f64>,
    pub kill_reason: Option<String>,
    /// `ok` or `error: <why>`; null when there was nothing to upload.
    pub upload: Option<String>,
    /// The final state reported to the server.
    pub state: Option<String>,
}

/// Reads the envelope body without verifying it (the pilot holds no VO key; the helper
/// verifies). Only for display, records and fitting.
pub fn peek_body(env: &SignedEnvelope) -> Result<EnvelopeBody, String> {
    if env.body.len() > crate::protocol::envelope::MAX_BODY_B64 {
        return Err("envelope body is too large".into());
    }
    let bytes = B64
        .decode(&env.body)
        .map_err(|e| format!("envelope body is not base64: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("envelope body is not valid JSON: {e}"))
}

/// The open trace log.
pub struct TraceLog {
    writer: ChainWriter,
}

impl TraceLog {
    /// Opens (creating 0600) the log; a torn last line (a crash or a full disk) is removed
    /// and a `torn` record says so.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let writer = ChainWriter::open(path, 0o600, FsyncPolicy::Batch)?;
        if let Some(line) = writer.torn_tail() {
            tracing::warn!(
                log = %path.display(),
                line,
                "trace log ended in a torn record (a crash or a full disk); removed, and a `torn` record says so"
            );
        }
        Ok(TraceLog { writer })
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }

    /// Appends one record and forces it to disk: start and end records are rare (two per
    /// payload), so a sync each costs little and a crash loses none. When the log cannot
    /// take it, the record is kept in memory (written by a later `write` or `retry`) and the
    /// error is returned, so the pilot fetches no new work until the log takes records again.
    pub fn write(&mut self, rec: &TraceRecord) -> Result<(), RecordError> {
        match self.writer.append_or_keep(rec, Keep::Essential)? {
            Appended::Written(_) => self.writer.sync(),
            Appended::Kept(e) => {
                tracing::error!(error = %e, kept = self.writer.kept(), "trace record kept in memory until the log takes records again");
                Err(e)
            }
            Appended::Dropped(e) => {
                tracing::error!(error = %e, record = ?rec, "trace record neither written nor kept (backlog full); counted in the next write_failed record");
                Err(e)
            }
        }
    }

    /// Writes the records kept in memory; true when none is left (the log takes records).
    pub fn retry(&mut self) -> bool {
        match self.writer.write_kept().and_then(|()| self.writer.sync()) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, kept = self.writer.kept(), "trace log still not writable");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_chain_and_carry_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trace.jsonl");
        let mut t = TraceLog::open(&p).unwrap();
        let rec = TraceRecord {
            time: crate::records::now_rfc3339(),
            event: "start",
            payload_id: "p1".into(),
            ..Default::default()
        };
        t.write(&rec).unwrap();
        t.write(&TraceRecord {
            event: "end",
            decision: Some("deny"),
            ..rec.clone()
        })
        .unwrap();
        drop(t);
        let r = crate::records::verify_file(&p).unwrap();
        assert_eq!(r.records, 2);
        assert!(r.first_break.is_none());
        let recs = crate::records::read_records(&p).unwrap();
        assert_eq!(recs[1]["decision"], "deny");
        assert!(recs[0].get("kill_reason").is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
