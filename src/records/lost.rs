//! Closing payloads whose end was never recorded: after a crash or restart, every `start`
//! with no `end` gets a `lost` record, so the log never holds a silent gap (P4, P11).
//!
//! Writes only `lost` records; deciding that a payload is really gone (its cgroup empty or
//! killed) is the caller's job and must happen first.

use super::query::open_starts;
use super::rotate::chain_files;
use super::schema::{Event, LOST_COPIES};
use super::{Appended, ChainWriter, Keep, RecordError};

/// The `lost` record that closes an open start found by [`open_starts`]: the payload's end
/// was never recorded (the helper or the machine stopped while it ran). `reason` says what
/// the restarted helper found, e.g. "helper restarted; payload cgroup was empty".
pub fn lost_record(start: &serde_json::Value, reason: &str) -> serde_json::Value {
    let now = super::now_rfc3339();
    let mut m = serde_json::Map::new();
    m.insert("time".into(), now.clone().into());
    m.insert("event".into(), Event::Lost.name().into());
    for k in LOST_COPIES {
        if let Some(v) = start.get(*k) {
            m.insert((*k).into(), v.clone());
        }
    }
    if !m.contains_key("start") {
        if let Some(t) = start.get("time") {
            m.insert("start".into(), t.clone());
        }
    }
    m.insert("end".into(), now.into());
    m.insert("reason".into(), reason.into());
    m.insert("kill_reason".into(), "lost".into());
    serde_json::Value::Object(m)
}

/// Appends a `lost` record for every open start in the chain of `writer` (its rotated files
/// included) and returns their payload ids. Call it at helper startup, after the payloads of
/// the previous run were killed or found gone.
pub fn close_open_starts(
    writer: &mut ChainWriter,
    reason: &str,
) -> Result<Vec<String>, RecordError> {
    let files = chain_files(writer.path())?;
    let mut closed = Vec::new();
    for start in open_starts(&files)? {
        // A log that cannot take it now (a full disk) keeps it in memory for later.
        match writer.append_or_keep_unsynced(&lost_record(&start, reason), Keep::Essential)? {
            Appended::Written(_) => {}
            Appended::Kept(e) | Appended::Dropped(e) => {
                tracing::error!(error = %e, "cannot write a lost record now; kept in memory")
            }
        }
        if let Some(id) = start.get("payload_id").and_then(|v| v.as_str()) {
            closed.push(id.to_string());
        }
    }
    if !writer.has_backlog() {
        writer.sync()?;
    }
    Ok(closed)
}
