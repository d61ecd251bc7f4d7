//! Who gets a connection thread: the accept loop refuses callers that are no allowed pilot and
//! connections beyond the per-uid and total caps, cheaply (no thread, one small non-blocking
//! write), and audits refusals aggregated: the first refusal of a uid in an interval in full,
//! the rest as one summary record with their count when the interval ends.
//!
//! Must not block on the refused caller, and must not write an audit record per refusal: any
//! local uid that can reach the socket could otherwise fill the root audit log (P11).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::audit::{AuditEvent, AuditLog};

/// Open connections per uid and in all.
pub struct Admission {
    per_uid: usize,
    total: usize,
    open: Mutex<(HashMap<u32, usize>, usize)>,
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    admission: Arc<Admission>,
    uid: u32,
}

impl Admission {
    pub fn new(per_uid: usize, total: usize) -> Arc<Admission> {
        Arc::new(Admission {
            per_uid,
            total,
            open: Mutex::new((HashMap::new(), 0)),
        })
    }

    /// A place for one more connection of `uid`, or why there is none.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Admitted, String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (by_uid, total) = &mut *open;
        let mine = by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.per_uid {
            return Err(format!(
                "uid {uid} already has {mine} open connections, the most this helper allows per uid (limits.max_connections_per_uid); close one"
            ));
        }
        if *total >= self.total {
            return Err(format!(
                "the helper already serves {total} connections, its limit (limits.max_connections); try again later"
            ));
        }
        *by_uid.entry(uid).or_insert(0) += 1;
        *total += 1;
        Ok(Admitted {
            admission: self.clone(),
            uid,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (by_uid, total) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// Refusals of one uid in the current interval.
struct Window {
    since: Instant,
    since_rfc3339: String,
    /// Refusals after the first, not yet recorded.
    more: u64,
    last_reason: String,
}

/// The aggregated audit of refused connections.
pub struct Refusals {
    interval: Duration,
    windows: Mutex<HashMap<u32, Window>>,
}

impl Refusals {
    pub fn new(interval: Duration) -> Refusals {
        Refusals {
            interval,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Records one refusal: in full when it is the uid's first in the interval, else counted.
    pub fn refused(&self, audit: &AuditLog, uid: u32, pid: i32, reason: &str) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = windows.get_mut(&uid) {
            if w.since.elapsed() < self.interval {
                w.more += 1;
                if w.last_reason != reason {
                    w.last_reason = reason.to_string();
                }
                return;
            }
            let w = windows.remove(&uid).expect("present");
            summarise(audit, uid, &w);
        }
        let mut rec = audit.record(AuditEvent::RefusedCaller);
        rec.pilot_uid = Some(uid);
        rec.pilot_pid = Some(pid);
        rec.decision = Some("deny");
        rec.reason = Some(reason.to_string());
        windows.insert(
            uid,
            Window {
                since: Instant::now(),
                since_rfc3339: rec.time.clone(),
                more: 0,
                last_reason: reason.to_string(),
            },
        );
        audit.append_or_log(&rec);
    }

    /// Writes the summary of every interval that has ended (all of them with `all`, at
    /// shutdown) and forgets those windows.
    pub fn flush(&self, audit: &AuditLog, all: bool) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let ended: Vec<u32> = windows
            .iter()
            .filter(|(_, w)| all || w.since.elapsed() >= self.interval)
            .map(|(uid, _)| *uid)
            .collect();
        for uid in ended {
            let w = windows.remove(&uid).expect("present");
            summarise(audit, uid, &w);
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// One record for the refusals after the first of an interval (none when there were none).
fn summarise(audit: &AuditLog, uid: u32, w: &Window) {
    if w.more == 0 {
        return;
    }
    let mut rec = audit.record(AuditEvent::RefusedSummary);
    rec.pilot_uid = Some(uid);
    rec.decision = Some("deny");
    rec.refused_count = Some(w.more);
    rec.start = Some(w.since_rfc3339.clone());
    rec.end = Some(rec.time.clone());
    rec.reason = Some(format!(
        "{} more connections of uid {uid} refused since {} (last reason: {})",
        w.more, w.since_rfc3339, w.last_reason
    ));
    audit.append_or_log(&rec);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_uid_and_in_all_free_on_drop() {
        let a = Admission::new(2, 3);
        let x1 = a.admit(1).unwrap();
        let _x2 = a.admit(1).unwrap();
        assert!(a
            .admit(1)
            .err()
            .unwrap()
            .contains("max_connections_per_uid"));
        let _y1 = a.admit(2).unwrap();
        assert!(a.admit(3).err().unwrap().contains("limits.max_connections"));
        drop(x1);
        let _x3 = a.admit(1).unwrap();
    }

    #[test]
    fn refusals_are_recorded_once_per_interval_then_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(&path, "test-node").unwrap();
        let r = Refusals::new(Duration::from_millis(300));
        for _ in 0..100 {
            r.refused(&audit, 5001, 1, "not allowed");
        }
        r.refused(&audit, 5002, 2, "not allowed");
        let recs = crate::records::read_records(&path).unwrap();
        assert_eq!(recs.len(), 2, "{recs:?}");
        std::thread::sleep(Duration::from_millis(350));
        r.flush(&audit, false);
        let recs = crate::records::read_records(&path).unwrap();
        assert_eq!(recs.len(), 3, "{recs:?}");
        assert_eq!(recs[2]["event"], "refused_summary");
        assert_eq!(recs[2]["refused_count"], 99);
        assert_eq!(recs[2]["pilot_uid"], 5001);
        // uid 5002 had a single refusal: nothing to summarise.
        r.flush(&audit, true);
        assert_eq!(crate::records::read_records(&path).unwrap().len(), 3);
    }
}
