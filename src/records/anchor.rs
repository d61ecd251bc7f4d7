//! Chain head anchoring: copies the head (file, seq, hash) of a log to syslog (journald reads
//! it), out of reach of whoever can rewrite the log file, and records that it did so.
//!
//! A later `verify --anchor SEQ:HASH` with the copy from syslog reveals a truncated or
//! rewritten tail, which the chain alone cannot. Must not block on syslog: `syslog(3)` drops
//! the message when no daemon listens.

use std::ffi::CString;

use serde::Serialize;

use super::{now_rfc3339, Anchor, ChainWriter, RecordError};

/// The `anchor` record appended after the head was sent to syslog.
#[derive(Debug, Clone, Serialize)]
struct AnchorRecord<'a> {
    time: String,
    event: &'static str,
    host: &'a str,
    file: String,
    anchor_seq: u64,
    anchor_hash: &'a str,
}

/// The syslog message for a head; [`parse_anchor_line`] reads it back.
pub fn anchor_message(file: &std::path::Path, anchor: &Anchor) -> String {
    format!(
        "mupilot log anchor file={} seq={} hash={}",
        file.display(),
        anchor.seq,
        anchor.hash
    )
}

/// Finds `seq=N hash=H` in a syslog/journal line written by [`anchor`].
pub fn parse_anchor_line(line: &str) -> Option<Anchor> {
    let rest = &line[line.find("mupilot log anchor ")?..];
    let mut seq: Option<u64> = None;
    let mut hash = None;
    for word in rest.split_whitespace() {
        if let Some(v) = word.strip_prefix("seq=") {
            seq = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("hash=") {
            hash = Some(v.to_string());
        }
    }
    format!("{}:{}", seq?, hash?).parse().ok()
}

/// Sends the writer's chain head to syslog (LOG_AUTHPRIV | LOG_INFO) and appends an `anchor`
/// record naming it. Returns the anchored head. An empty chain is not anchored.
pub fn anchor(writer: &mut ChainWriter, host: &str) -> Result<Option<Anchor>, RecordError> {
    anchor_at(writer, host, &now_rfc3339())
}

/// [`anchor`] with the anchor record's `time` given (RFC 3339), for replayable logs.
pub fn anchor_at(
    writer: &mut ChainWriter,
    host: &str,
    time: &str,
) -> Result<Option<Anchor>, RecordError> {
    let (seq, hash) = writer.head();
    if seq == 0 {
        return Ok(None);
    }
    let a = Anchor {
        seq,
        hash: hash.to_string(),
    };
    // The head must be on disk before the world is told about it.
    writer.sync()?;
    syslog_authpriv(&anchor_message(writer.path(), &a));
    writer.append(&AnchorRecord {
        time: time.to_string(),
        event: "anchor",
        host,
        // The base name only: the record stays the same wherever the log is read or moved.
        file: writer
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        anchor_seq: a.seq,
        anchor_hash: &a.hash,
    })?;
    Ok(Some(a))
}

/// Writes one message to syslog at LOG_AUTHPRIV | LOG_INFO (root-readable on most systems,
/// kept by journald).
#[allow(unsafe_code)] // syslog(3): libc has no safe binding
pub fn syslog_authpriv(message: &str) {
    let Ok(msg) = CString::new(message.replace('\0', " ")) else {
        return;
    };
    // SAFETY: `c"%s"` and `msg` are valid NUL-terminated C strings that outlive the call; the
    // constant "%s" format means the message is never interpreted as a format string, and
    // syslog(3) is thread-safe in glibc and musl. Without a prior openlog() it uses the
    // program name as ident and connects to /dev/log on demand.
    unsafe {
        libc::syslog(
            libc::LOG_AUTHPRIV | libc::LOG_INFO,
            c"%s".as_ptr(),
            msg.as_ptr(),
        )
    };
}
