//! The request log: one record per HTTPS request the server answers (client address and TCP
//! port, the certificate's DN and kind, the member a portal acted for, the person responsible
//! for a robot or portal, the action, the payload, the status), in the same hash-chained
//! JSON-lines format as the helper's audit log and the pilot's trace
//! ([`crate::records::ChainWriter`]): mode 0600, rotated at 64 MiB or 7 days with the chain
//! continued, rotated files deleted after the retention period, the chain head sent to syslog
//! every hour and at shutdown. Kept out of the SQL store on purpose: it is the record of
//! what was asked of the server, readable and verifiable with the database gone.
//!
//! When the file cannot take a record (a full disk), the record waits in memory (bounded, in
//! order) and a retry thread writes the backlog every 0.5 s until it succeeds; meanwhile
//! [`RequestLog::writable`] is false and the gate refuses the requests that need a record.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;

use crate::records::{
    Appended, BatchLimits, ChainWriter, FsyncPolicy, Keep, PendingSync, RecordError, RotatePolicy,
};

/// How often records kept in memory are retried while the file cannot take them.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// Records not synced before their answer reach the disk within this.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// One request as answered.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// When the request arrived (RFC 3339, microseconds).
    pub time: String,
    /// Always `request`.
    pub event: &'static str,
    /// The server instance that answered (`mupilot-server@HOST`).
    pub server: String,
    pub client_ip: String,
    pub client_port: u16,
    /// The client certificate's subject.
    pub dn: String,
    /// `user`, `operator`, `pilot`, `robot`, `portal` or `unregistered_robot`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub responsible: Option<String>,
    pub action: &'static str,
    pub method: String,
    pub path: String,
    pub payload_id: Option<String>,
    pub status: u16,
    /// The error code of a refusal (`not_authorized`, `rate_limited`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    pub micros: u64,
}

/// The open request log, shared by every connection.
pub struct RequestLog {
    shared: Arc<Mutex<Shared>>,
    path: PathBuf,
    host: String,
}

struct Shared {
    w: ChainWriter,
    retrying: bool,
}

impl RequestLog {
    /// Opens (creating 0600) the log at `path`; rotated files older than `retention` are
    /// deleted at rotation. `host` names this server in anchor records.
    pub fn open(path: &Path, retention: Duration, host: &str) -> Result<Self, RecordError> {
        use std::os::unix::fs::PermissionsExt;
        let policy = RotatePolicy {
            retention: Some(retention),
            ..RotatePolicy::default()
        };
        // Syncs come from the background syncer (every SYNC_INTERVAL) and from the callers
        // of synced records; an append syncs by itself only if the syncer falls far behind.
        let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Batch)?
            .with_rotation(policy)
            .with_batch_limits(BatchLimits {
                max_records: 100_000,
                max_delay: Duration::from_secs(5),
            });
        w.start_background_sync(SYNC_INTERVAL)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| RecordError::Open {
                path: path.to_path_buf(),
                source,
            },
        )?;
        if let Some(line) = w.torn_tail() {
            tracing::warn!(log = %path.display(), line, "request log ended in a torn record (a crash or a full disk); removed, and a `torn` record says so");
        }
        let log = RequestLog {
            shared: Arc::new(Mutex::new(Shared { w, retrying: false })),
            path: path.to_path_buf(),
            host: host.to_string(),
        };
        log.lock().retry_while_kept(&log.shared);
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False while records wait in memory for the file (it could not take the last one).
    pub fn writable(&self) -> bool {
        !self.lock().w.has_backlog()
    }

    /// Appends `rec`. With `synced`, returns the sync to wait for before the answer leaves;
    /// otherwise the record reaches the disk within [`SYNC_INTERVAL`]. A record the file
    /// cannot take is kept in memory (`keep` says how hard) and written when it can.
    pub fn append(&self, rec: &RequestRecord, keep: Keep, synced: bool) -> Option<PendingSync> {
        let mut s = self.lock();
        let res = if synced {
            s.w.append_or_keep_unsynced(rec, keep)
        } else {
            s.w.append_or_keep(rec, keep)
        };
        match res {
            Ok(Appended::Written(_)) if synced => match s.w.pending_sync() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot sync the request log");
                    None
                }
            },
            Ok(Appended::Written(_)) => None,
            Ok(Appended::Kept(e)) => {
                tracing::error!(error = %e, kept = s.w.kept(), payload_id = ?rec.payload_id, action = rec.action, "cannot write the request record; kept in memory until the log takes records again");
                s.retry_while_kept(&self.shared);
                None
            }
            Ok(Appended::Dropped(e)) => {
                tracing::error!(error = %e, record = ?rec, "cannot write the request record and the backlog is full; counted in the next write_failed record");
                s.retry_while_kept(&self.shared);
                None
            }
            Err(e) => {
                tracing::error!(error = %e, record = ?rec, "cannot write the request record");
                None
            }
        }
    }

    /// Sends the chain head to syslog and records it (a truncated tail is then detectable).
    pub fn anchor(&self) {
        let mut s = self.lock();
        if let Err(e) = crate::records::anchor::anchor(&mut s.w, &self.host) {
            tracing::error!(error = %e, "cannot anchor the request log's chain head");
        }
    }

    /// At shutdown: writes what waits in memory, or logs each record whole when the file
    /// still cannot take it ([`ChainWriter::finish`]).
    pub fn finish(&self) {
        let mut s = self.lock();
        s.w.finish();
        let _ = s.w.sync();
    }
}

impl Shared {
    /// Starts the retry thread unless one runs or nothing waits. It holds the log weakly,
    /// so it ends with the log as well as when the backlog is written.
    fn retry_while_kept(&mut self, shared: &Arc<Mutex<Shared>>) {
        if self.retrying || !self.w.has_backlog() {
            return;
        }
        let weak: Weak<Mutex<Shared>> = Arc::downgrade(shared);
        let thread = std::thread::Builder::new()
            .name("request-log-retry".into())
            .spawn(move || loop {
                std::thread::sleep(RETRY_INTERVAL);
                let Some(shared) = weak.upgrade() else { return };
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                if s.w.write_kept().and_then(|()| s.w.sync()).is_ok() {
                    tracing::warn!(
                        "request log writable again; the records kept in memory are written"
                    );
                    s.retrying = false;
                    return;
                }
            });
        match thread {
            Ok(_) => self.retrying = true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the request log's retry thread; kept records go with the next record")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(payload: &str, status: u16) -> RequestRecord {
        RequestRecord {
            time: crate::records::now_rfc3339(),
            event: "request",
            server: "mupilot-server@test".into(),
            client_ip: "192.0.2.7".into(),
            client_port: 40123,
            dn: "/CN=portal".into(),
            kind: "portal",
            on_behalf_of: Some("/CN=alice".into()),
            responsible: Some("/CN=manager".into()),
            action: "submit",
            method: "POST".into(),
            path: "/v1/payloads".into(),
            payload_id: Some(payload.into()),
            status,
            error: None,
            reason: None,
            retry_after: None,
            micros: 812,
        }
    }

    #[test]
    fn records_chain_with_private_mode_and_leave_out_what_does_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("requests.jsonl");
        let log = RequestLog::open(&p, Duration::from_secs(86400), "test").unwrap();
        log.append(&record("p-1", 201), Keep::Essential, true)
            .unwrap()
            .wait()
            .unwrap();
        let mut plain = record("p-1", 200);
        plain.on_behalf_of = None;
        plain.responsible = None;
        assert!(log.append(&plain, Keep::BestEffort, false).is_none());
        log.anchor();
        assert!(log.writable());
        log.finish();
        let recs = crate::records::read_records(&p).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0]["client_port"], 40123);
        assert_eq!(recs[0]["on_behalf_of"], "/CN=alice");
        assert!(recs[1].get("on_behalf_of").is_none());
        assert_eq!(recs[2]["event"], "anchor");
        let r = crate::records::verify_file(&p).unwrap();
        assert_eq!((r.records, r.first_break), (3, None));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
