//! The helper's audit log (P4, P11): one hash-chained JSON-lines record per refused caller,
//! denial, start, end, kill and signal, written through [`crate::records::ChainWriter`]
//! (mode 0600, every record on disk before the helper acts on it) by one writer shared behind a mutex, plus one syslog
//! line per identity switch. Records; decides nothing.
//!
//! When the log cannot take a record (a full disk): a start record that cannot be written
//! refuses the launch (the caller's [`AuditLog::append_unsynced`] fails); every other record
//! (denial, end, kill, signal, lost) is kept in memory, in order and bounded, and written as
//! soon as the log takes records again, by the next record or by a retry thread that runs
//! only while records wait.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::records::{Appended, ChainWriter, FsyncPolicy, Keep, PendingSync, RecordError};

/// How often kept records are retried while the log cannot take them.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

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
    /// A running payload's proxy was replaced by a renewed one (`proxy_serial`, `fqans`).
    ProxyRenewed,
    /// A renewal of a payload's proxy was refused (`reason`); the payload keeps its proxy.
    ProxyRefused,
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
    /// The payload's delivered proxy (start and proxy_renewed records): its serial (hex) and
    /// the credential's not-after; `fqans` are then the verified ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_not_after: Option<String>,
    /// The entry a payload came through when it is not a VO envelope: `glexec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
    /// SHA-256 of the proxy file a gLExec request's owner was verified from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_sha256: Option<String>,
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
    writer: Arc<Mutex<Shared>>,
    host: String,
    /// Counted as records are written (switch.toml `metrics_textfile`).
    metrics: Arc<super::metrics::SwitchMetrics>,
}

/// The writer and whether a retry thread runs for it (both changed only under the lock).
struct Shared {
    w: ChainWriter,
    retrying: bool,
}

impl AuditEvent {
    /// Records about a payload that ran (or acts on one) are bounded by the payloads the
    /// helper runs and are kept first; denials and refusals, which a caller can make in any
    /// number, only in the half of the backlog they may use.
    fn keep(self) -> Keep {
        match self {
            AuditEvent::RefusedCaller
            | AuditEvent::RefusedSummary
            | AuditEvent::Denied
            | AuditEvent::ProxyRefused => Keep::BestEffort,
            AuditEvent::Start
            | AuditEvent::End
            | AuditEvent::Kill
            | AuditEvent::Signal
            | AuditEvent::ProxyRenewed => Keep::Essential,
        }
    }
}

impl AuditLog {
    /// Opens (creating 0600) the audit log and forces its mode to 0600. `host` is the
    /// helper's node name (switch.toml `node_name`), written into every record.
    pub fn open(path: &Path, host: &str) -> Result<Self, RecordError> {
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
        let log = AuditLog {
            writer: Arc::new(Mutex::new(Shared { w, retrying: false })),
            host: host.to_string(),
            metrics: Arc::new(super::metrics::SwitchMetrics::new()),
        };
        // A torn tail that could not be removed at open: its note waits in memory.
        log.lock().retry_while_kept(&log.writer);
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The counters the records feed (launches, denials, kills, write latency).
    pub fn metrics(&self) -> &Arc<super::metrics::SwitchMetrics> {
        &self.metrics
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

    /// Appends `rec` (fsynced when this returns Ok); on an error it is neither written nor
    /// kept.
    pub fn append(&self, rec: &AuditRecord) -> Result<u64, RecordError> {
        let t = Instant::now();
        let res = self.lock().w.append(rec);
        self.metrics.record(rec, res.is_ok(), t.elapsed());
        res
    }

    /// Appends `rec` without waiting for the disk: the caller waits on the returned
    /// [`PendingSync`] outside the writer's lock (start records while the stage builds the
    /// sandbox). Records kept in memory are written first; when the log cannot take them or
    /// `rec`, this fails and `rec` is not kept (a start record: the launch is refused).
    pub fn append_unsynced(&self, rec: &AuditRecord) -> Result<PendingSync, RecordError> {
        // Two vDSO clock reads and three atomic adds: nothing the launch path would notice.
        let t = Instant::now();
        let res = self
            .lock()
            .w
            .append_unsynced(rec)
            .map(|(_, pending)| pending);
        self.metrics.record(rec, res.is_ok(), t.elapsed());
        res
    }

    /// Appends `rec` without waiting for the disk (end records, synced after the exit was
    /// reported); when the log cannot take it, it is kept in memory (see
    /// [`AuditLog::append_or_log`]) and there is nothing to wait for.
    pub fn append_unsynced_or_keep(&self, rec: &AuditRecord) -> Option<PendingSync> {
        let t = Instant::now();
        let mut s = self.lock();
        let keep = rec.event.map_or(Keep::Essential, AuditEvent::keep);
        let res = s.w.append_or_keep_unsynced(rec, keep);
        self.metrics
            .record(rec, matches!(res, Ok(Appended::Written(_))), t.elapsed());
        match res {
            Ok(Appended::Written(_)) => match s.w.pending_sync() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot sync the audit record");
                    None
                }
            },
            other => {
                s.report(other, rec);
                s.retry_while_kept(&self.writer);
                None
            }
        }
    }

    /// After a crash: writes a `lost` end record for every payload whose start has no end
    /// (its stage noticed the helper gone and tore it down). Returns their ids.
    pub fn close_open_starts(&self) -> Result<Vec<String>, RecordError> {
        let mut s = self.lock();
        let closed =
            crate::records::lost::close_open_starts(&mut s.w, "helper restarted; end not recorded");
        s.retry_while_kept(&self.writer);
        closed
    }

    /// Sends the chain head to syslog and records it, so a truncated tail is detectable.
    pub fn anchor(&self) {
        let mut s = self.lock();
        if let Err(e) = crate::records::anchor::anchor(&mut s.w, &self.host) {
            tracing::error!(error = %e, "cannot anchor the audit chain head");
        }
    }

    /// Appends `rec` (fsynced). When the log cannot take it (a full disk), it is kept in
    /// memory and written, in order, as soon as the log takes records again (a retry thread
    /// tries every 0.5 s while records wait); the failure is logged. Used for every record
    /// but the start record, which must be on disk before the payload may run.
    pub fn append_or_log(&self, rec: &AuditRecord) {
        let t = Instant::now();
        let mut s = self.lock();
        let keep = rec.event.map_or(Keep::Essential, AuditEvent::keep);
        let res = s.w.append_or_keep(rec, keep);
        self.metrics
            .record(rec, matches!(res, Ok(Appended::Written(_))), t.elapsed());
        match res {
            Ok(Appended::Written(_)) => {}
            other => {
                s.report(other, rec);
                s.retry_while_kept(&self.writer);
            }
        }
    }

    /// At shutdown: writes the records kept in memory, or logs each one whole when the log
    /// still cannot take them (see [`ChainWriter::finish`]).
    pub fn finish(&self) {
        self.lock().w.finish();
    }

    /// Records waiting in memory for the log.
    pub fn kept(&self) -> usize {
        self.lock().w.kept()
    }
}

impl Shared {
    fn report(&self, outcome: Result<Appended, RecordError>, rec: &AuditRecord) {
        match outcome {
            Ok(Appended::Written(_)) => {}
            Ok(Appended::Kept(e)) => tracing::error!(
                error = %e,
                kept = self.w.kept(),
                event = ?rec.event,
                payload_id = ?rec.payload_id,
                "cannot write audit record; kept in memory until the log takes records again"
            ),
            Ok(Appended::Dropped(e)) => tracing::error!(
                error = %e,
                record = ?rec,
                "cannot write audit record and the backlog is full; counted in the next write_failed record"
            ),
            Err(e) => tracing::error!(error = %e, record = ?rec, "cannot write audit record"),
        }
    }

    /// Starts the retry thread if records wait and none runs. It holds only a weak reference,
    /// writes the backlog every [`RETRY_INTERVAL`] and ends when nothing waits.
    fn retry_while_kept(&mut self, shared: &Arc<Mutex<Shared>>) {
        if self.retrying || !self.w.has_backlog() {
            return;
        }
        let weak: Weak<Mutex<Shared>> = Arc::downgrade(shared);
        let spawned = std::thread::Builder::new()
            .name("audit-retry".into())
            .spawn(move || loop {
                std::thread::sleep(RETRY_INTERVAL);
                let Some(shared) = weak.upgrade() else { return };
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                match s.w.write_kept() {
                    Ok(()) => {
                        tracing::warn!("audit log writable again; the records kept in memory are written");
                        s.retrying = false;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, kept = s.w.kept(), "audit log still not writable"),
                }
            });
        match spawned {
            Ok(_) => self.retrying = true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the audit retry thread; kept records are written with the next record")
            }
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
        let log = AuditLog::open(&p, "wn01").unwrap();
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
