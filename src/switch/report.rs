//! What the helper reports about one payload of a connection: the syslog line and the
//! `started` event when it runs ([`report_started`]), and, in the payload's waiter thread,
//! its end ([`report_end`]): wait, end record, `exited` to the pilot, then the cleanup that
//! need not delay the report ([`Reported`]). Must not read requests or decide anything: the
//! connection (connection.rs) does.

use std::sync::Arc;

use super::audit::{AuditEvent, AuditRecord};
use super::connection::Sender;
use super::daemon::Helper;
use super::launch::Started;
use super::syslog;
use crate::protocol::switch_wire::{ExitReport, SwitchEvent};

/// The syslog line and the `started` event of a payload that runs; `caller` is the pilot's
/// (uid, pid).
pub(super) fn report_started(sender: &Sender, s: &Started, (pilot_uid, pilot_pid): (u32, i32)) {
    let Started {
        payload_id,
        account,
        handle,
        record,
        ..
    } = s;
    syslog::line(
        true,
        &format!(
            "start payload={payload_id} owner={} account={} uid={} pilot_uid={pilot_uid} pilot_pid={pilot_pid}",
            syslog::quote(record.owner_dn.as_deref().unwrap_or("")),
            account.name,
            account.uid,
        ),
    );
    tracing::info!(%payload_id, account = %account.name, uid = account.uid, pid = handle.pid(), "started");
    let ev = SwitchEvent::Started {
        payload_id: payload_id.clone(),
        account: account.name.clone(),
        uid: account.uid,
        gid: account.gid,
        pid: handle.pid(),
        cgroup: handle.cgroup(),
        scratch: handle.scratch().display().to_string(),
    };
    if let Err(e) = sender.send(&ev) {
        tracing::warn!(error = %e, "cannot send event to the pilot");
    }
}

/// Waits for one payload to end, records it, tells the pilot (if it is still there); what
/// is left to do after that is the returned [`Reported`]'s, done when it is dropped.
pub(super) fn report_end(
    helper: Arc<Helper>,
    sender: &Sender,
    payload_id: String,
    running: super::sandbox::Running,
    start: AuditRecord,
) -> Reported {
    // The scratch directory and the empty cgroup are removed after the exit is reported.
    let (result, residue) = match running.wait_then_clean_later() {
        Ok((o, r)) => (Ok(o), Some(r)),
        Err(e) => (Err(e), None),
    };
    let mut rec = start.follow_up(AuditEvent::End);
    rec.end = Some(rec.time.clone());
    let report = match result {
        Ok(o) => {
            use base64::Engine;
            rec.exit_code = o.exit_code;
            rec.signal = o.signal;
            rec.cpu_seconds = Some(o.cpu_seconds);
            rec.peak_memory_bytes = o.peak_memory_bytes;
            rec.kill_reason = o.kill_reason.clone();
            ExitReport {
                exit_code: o.exit_code,
                signal: o.signal,
                cpu_seconds: o.cpu_seconds,
                peak_memory_bytes: o.peak_memory_bytes,
                wall_seconds: o.wall_seconds,
                kill_reason: o.kill_reason,
                outputs: o
                    .outputs
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                outputs_skipped: o.outputs_skipped,
            }
        }
        Err(e) => {
            tracing::error!(%payload_id, error = %e, "payload supervision failed");
            rec.reason = Some(format!("sandbox: {e}"));
            rec.kill_reason = Some("helper_error".into());
            ExitReport {
                kill_reason: Some("helper_error".into()),
                ..Default::default()
            }
        }
    };
    // Written now, on disk right after the report below: a crash in between leaves the start
    // without an end, which the next helper records as `lost` (never a silent gap).
    // A log that cannot take it (a full disk) keeps it in memory until it can.
    let end_synced = helper.audit.append_unsynced_or_keep(&rec);
    syslog::line(
        false,
        &format!(
            "end payload={payload_id} account={} uid={} exit_code={} signal={} kill_reason={}",
            rec.account.as_deref().unwrap_or(""),
            rec.uid.unwrap_or(0),
            opt(rec.exit_code),
            opt(rec.signal),
            rec.kill_reason.as_deref().unwrap_or("-"),
        ),
    );
    tracing::info!(%payload_id, exit_code = ?report.exit_code, signal = ?report.signal, "ended");
    // The end record is written; no process of the payload is left: report, then make the
    // record durable and remove what remains ([`Reported`]). The registry entry goes last,
    // so shutdown waits for the removal too.
    helper.registry.ended(&payload_id);
    if let Err(e) = sender.send(&SwitchEvent::Exited {
        payload_id: payload_id.clone(),
        report,
    }) {
        tracing::info!(error = %e, "pilot did not receive the exit event");
    }
    Reported {
        helper,
        payload_id,
        end_synced,
        residue,
        account: rec.account,
    }
}

/// A payload whose end is recorded and reported: its end record is still to be made durable,
/// its emptied scratch directory and cgroup removed, its registry entry dropped and its pool
/// lease renewed. Done when dropped, on whichever thread drops it.
pub(super) struct Reported {
    helper: Arc<Helper>,
    payload_id: String,
    end_synced: Option<crate::records::PendingSync>,
    residue: Option<super::sandbox::Residue>,
    account: Option<String>,
}

impl Drop for Reported {
    fn drop(&mut self) {
        let (helper, payload_id) = (&self.helper, &self.payload_id);
        if let Some(Err(e)) = self.end_synced.take().map(|p| p.wait()) {
            tracing::error!(%payload_id, error = %e, "cannot sync the end record to disk");
        }
        drop(self.residue.take());
        helper.registry.remove(payload_id);
        // A pool lease lives from its last use: the end of a payload is a use.
        if let (Some(pool), Some(account)) = (helper.authz.pool(), self.account.as_deref()) {
            if let Err(e) = pool.touch_account(account) {
                tracing::warn!(%payload_id, account, error = %e, "cannot renew the pool lease");
            }
        }
    }
}

fn opt(v: Option<i32>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}
