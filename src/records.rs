//! Append-only, hash-chained JSON-lines logs: the helper's audit log and the pilot's trace log.
//!
//! Every line is one JSON object written by one `write(2)` on an `O_APPEND` descriptor. Each
//! line carries `seq` (1, 2, ...) and `prev`, the lower-case hex SHA-256 of the previous line's
//! bytes (without its newline); the first line of a chain has `prev` = 64 zeros. Editing,
//! deleting, reordering or inserting a line breaks the chain at that line, which
//! [`verify_file`] names. A torn last line (a crash mid-write) is reported, never silently
//! dropped; the writer starts a new line after it so later records stay readable.
//!
//! Rooms: `chain` (the writer, fsync batching, rotation), `verify` (chain and anchor checks),
//! `rotate` (file naming, retention), `anchor` (chain head to syslog), `query` (fast
//! who/list/open-starts over a log or a rotated set), `cli` (`list`, `export`, `verify`: the
//! commands every program's log has),
//! `lost` (closing starts that never got an end), `schema` (the event kinds and field names
//! writers and readers share).
//! Nothing here reaches TLS, HTTP or async code: the helper links all of it.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

// anchor: syslog(3) has no safe binding (the record layer's one unsafe block).
pub mod anchor;
#[forbid(unsafe_code)]
mod chain;
#[forbid(unsafe_code)]
pub mod cli;
#[forbid(unsafe_code)]
pub mod lost;
#[forbid(unsafe_code)]
pub mod query;
#[forbid(unsafe_code)]
pub mod rotate;
#[forbid(unsafe_code)]
pub mod schema;
#[forbid(unsafe_code)]
mod verify;

pub use chain::{
    Appended, BatchLimits, ChainWriter, FsyncPolicy, Keep, KeepLimits, PendingSync, SyncStarted,
};
pub use rotate::RotatePolicy;
pub use verify::{
    verify_files, verify_reader, Anchor, AnchorCheck, ChainBreak, ChainReport, VerifyReport,
};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the record layer; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot open log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write log {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read log {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("record is not a JSON object")]
    NotAnObject,
}

/// Verifies one log file from the beginning of a chain.
pub fn verify_file(path: &Path) -> Result<VerifyReport, RecordError> {
    verify::verify_file(path)
}

/// Reads every complete record of a log as JSON values (for queries and exports).
pub fn read_records(path: &Path) -> Result<Vec<serde_json::Value>, RecordError> {
    let f = File::open(path).map_err(|source| RecordError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|source| RecordError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            out.push(v);
        }
    }
    Ok(out)
}

/// RFC 3339 UTC time with microseconds, the time format of every record.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Parses a record's `time` (RFC 3339).
pub fn parse_record_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Parses a time given on a command line: RFC 3339 (`2026-11-23T03:12:00Z`), or
/// `YYYY-MM-DD HH:MM[:SS]` / `YYYY-MM-DDTHH:MM[:SS]` taken as UTC, or `YYYY-MM-DD` (midnight UTC).
pub fn parse_user_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let s = s.trim();
    if let Some(t) = parse_record_time(s) {
        return Ok(t);
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(n.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(format!(
        "time {s:?} is not understood: use RFC 3339 (2026-11-23T03:12:00Z) or \"YYYY-MM-DD HH:MM[:SS]\" in UTC"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs::OpenOptions;
    use std::io::Write;

    fn write_n(path: &Path, n: u64) {
        let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Never).unwrap();
        for i in 0..n {
            w.append(&json!({"event": "start", "i": i})).unwrap();
        }
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        write_n(&p, 3);
        write_n(&p, 2);
        let r = verify_file(&p).unwrap();
        assert_eq!(r.records, 5);
        assert_eq!(r.last_seq, 5);
        assert!(r.first_break.is_none(), "{:?}", r.first_break);
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn put(p: &Path, ls: &[String]) {
        std::fs::write(p, ls.join("\n") + "\n").unwrap();
    }

    #[test]
    fn tampering_is_found_at_the_right_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        write_n(&p, 5);
        let orig = lines(&p);

        let mut edited = orig.clone();
        edited[1] = edited[1].replace("start", "stArt");
        put(&p, &edited);
        assert_eq!(verify_file(&p).unwrap().first_break.unwrap().line, 3);

        let mut deleted = orig.clone();
        deleted.remove(2);
        put(&p, &deleted);
        assert_eq!(verify_file(&p).unwrap().first_break.unwrap().line, 3);

        let mut swapped = orig.clone();
        swapped.swap(1, 2);
        put(&p, &swapped);
        assert_eq!(verify_file(&p).unwrap().first_break.unwrap().line, 2);

        let mut inserted = orig.clone();
        inserted.insert(
            2,
            format!("{{\"seq\":3,\"prev\":\"{GENESIS}\",\"event\":\"forged\"}}"),
        );
        put(&p, &inserted);
        assert_eq!(verify_file(&p).unwrap().first_break.unwrap().line, 3);
    }

    #[test]
    fn records_keep_field_order_and_never_carry_their_own_chain_fields() {
        #[derive(serde::Serialize)]
        struct R {
            time: &'static str,
            event: &'static str,
            first_seq: u64,
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Never).unwrap();
        w.append(&R {
            time: "2026-11-23T00:00:00Z",
            event: "start",
            first_seq: 4,
        })
        .unwrap();
        // A record copied from a log carries seq/prev: the writer's own replace them.
        w.append(&json!({"seq": 99, "prev": "x", "event": "lost", "nested": {"seq": 1}}))
            .unwrap();
        w.append(&json!({})).unwrap();
        assert!(w.append(&json!(["not", "an", "object"])).is_err());
        drop(w);
        let l = lines(&p);
        assert!(l[0].starts_with("{\"seq\":1,\"prev\":\"0000"));
        assert!(l[0]
            .ends_with(",\"time\":\"2026-11-23T00:00:00Z\",\"event\":\"start\",\"first_seq\":4}"));
        assert!(l[1].starts_with("{\"seq\":2,\"prev\":\""));
        assert!(!l[1].contains("\"seq\":99") && !l[1].contains("\"prev\":\"x\""));
        assert!(l[1].contains("\"nested\":{\"seq\":1}"));
        assert_eq!(l[2].len(), "{\"seq\":3,\"prev\":\"\"}".len() + 64);
        let r = verify_file(&p).unwrap();
        assert_eq!((r.records, r.first_break), (3, None));
    }

    #[test]
    fn torn_tail_is_reported_and_writer_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        write_n(&p, 2);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
        drop(f);
        let r = verify_file(&p).unwrap();
        assert_eq!((r.first_break, r.torn_tail, r.records), (None, Some(3), 2));
        let w = ChainWriter::open(&p, 0o600, FsyncPolicy::Never).unwrap();
        assert_eq!(w.torn_tail(), Some(3));
        // The fragment is gone and a `torn` record (seq 3) says what was removed.
        assert_eq!(w.head().0, 3);
        drop(w);
        let recs = read_records(&p).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2]["event"], "torn");
        assert_eq!(recs[2]["removed_bytes"], 19);
        let r = verify_file(&p).unwrap();
        assert_eq!((r.first_break, r.torn_tail, r.records), (None, None, 3));
    }
}
