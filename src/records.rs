//! Append-only, hash-chained JSON-lines logs: the helper's audit log and the pilot's trace log.
//!
//! Every line is one JSON object written by one `write(2)` on an `O_APPEND` descriptor. Each
//! line carries `seq` (1, 2, ...) and `prev`, the lower-case hex SHA-256 of the previous line's
//! bytes (without its newline); the first line of a chain has `prev` = 64 zeros. Editing,
//! deleting, reordering or inserting a line breaks the chain at that line, which
//! [`verify_file`] names. A torn last line (a crash mid-write) is reported, never silently
//! dropped; the writer starts a new line after it so later records stay readable.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync after every record (the audit default: a record acknowledged is a record kept).
    #[default]
    Always,
    /// fsync when [`ChainWriter::sync`] is called (callers batch records).
    Batch,
    /// leave it to the kernel.
    Never,
}

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

/// Appends records to one chained log file.
pub struct ChainWriter {
    path: PathBuf,
    file: File,
    seq: u64,
    prev: String,
    fsync: FsyncPolicy,
    /// Set when the file ended in a torn line at open; reported once to the caller.
    torn_tail: Option<u64>,
}

impl ChainWriter {
    /// Opens (creating with `mode`) the log at `path` and finds the chain's head.
    pub fn open(path: &Path, mode: u32, fsync: FsyncPolicy) -> Result<Self, RecordError> {
        let open_err = |source| RecordError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(mode)
            .open(path)
            .map_err(open_err)?;
        let (seq, prev, torn_tail) = read_head(&mut file).map_err(|source| RecordError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut w = ChainWriter {
            path: path.to_path_buf(),
            file,
            seq,
            prev,
            fsync,
            torn_tail,
        };
        if w.torn_tail.is_some() {
            // Terminate the torn line so the next record starts on a line of its own; the torn
            // line stays in the file, where verification reports it.
            w.write_raw(b"\n")?;
        }
        Ok(w)
    }

    /// The line number of a torn last line found at open, if there was one.
    pub fn torn_tail(&self) -> Option<u64> {
        self.torn_tail
    }

    /// The hash of the last record (the chain head), for syslog anchoring.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.prev)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record. `record` must serialise to a JSON object; `seq` and `prev` are
    /// added in front of its fields. Returns the record's sequence number.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<u64, RecordError> {
        let value = serde_json::to_value(record).map_err(|_| RecordError::NotAnObject)?;
        let serde_json::Value::Object(map) = value else {
            return Err(RecordError::NotAnObject);
        };
        let seq = self.seq + 1;
        let mut line = format!("{{\"seq\":{seq},\"prev\":\"{}\"", self.prev);
        for (k, v) in map.iter().filter(|(k, _)| *k != "seq" && *k != "prev") {
            line.push(',');
            line.push_str(&serde_json::to_string(k).expect("string serialises"));
            line.push(':');
            line.push_str(&serde_json::to_string(v).expect("value serialises"));
        }
        line.push('}');
        let hash = hex::encode(Sha256::digest(line.as_bytes()));
        line.push('\n');
        self.write_raw(line.as_bytes())?;
        if self.fsync == FsyncPolicy::Always {
            self.sync()?;
        }
        self.seq = seq;
        self.prev = hash;
        Ok(seq)
    }

    /// Forces appended records to disk.
    pub fn sync(&mut self) -> Result<(), RecordError> {
        self.file.sync_data().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), RecordError> {
        // One write(2) per record on an O_APPEND descriptor: concurrent readers never see
        // half a record unless the machine dies mid-write (the torn tail case).
        self.file
            .write_all(bytes)
            .map_err(|source| RecordError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads the file to find the last complete record's seq and hash.
fn read_head(file: &mut File) -> io::Result<(u64, String, Option<u64>)> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&mut *file);
    let mut seq = 0u64;
    let mut prev = GENESIS.to_string();
    let mut line = Vec::new();
    let mut lineno = 0u64;
    let mut torn = None;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        if line.last() != Some(&b'\n') {
            torn = Some(lineno);
            break;
        }
        line.pop();
        if line.is_empty() {
            continue;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
            if let Some(s) = v.get("seq").and_then(|s| s.as_u64()) {
                seq = s;
            }
        }
        prev = hex::encode(Sha256::digest(&line));
    }
    Ok((seq, prev, torn))
}

/// The first place where a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// 1-based line number in the file.
    pub line: u64,
    pub reason: String,
}

/// What verification of a log found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub path: PathBuf,
    pub records: u64,
    /// Hash of the last intact record (the head), to compare with an anchored copy.
    pub head: String,
    pub last_seq: u64,
    pub first_break: Option<ChainBreak>,
}

/// Verifies a whole chain. `start_prev`/`start_seq` continue a chain from an earlier file
/// (rotation); pass [`GENESIS`] and 0 for a fresh chain.
pub fn verify_reader<R: Read>(
    path: &Path,
    input: R,
    start_prev: &str,
    start_seq: u64,
) -> io::Result<VerifyReport> {
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut prev = start_prev.to_string();
    let mut expect_seq = start_seq + 1;
    let mut records = 0u64;
    let mut lineno = 0u64;
    let mut line = Vec::new();
    let mut first_break = None;
    while first_break.is_none() {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| {
            Some(ChainBreak {
                line: lineno,
                reason,
            })
        };
        if !complete {
            first_break =
                bad("torn last line: the record was cut short (crash or truncation)".into());
            break;
        }
        let Some(rec_prev) = extract_prefix(&line) else {
            first_break = bad("not a chained record (no leading seq and prev fields)".into());
            break;
        };
        if rec_prev.1 != prev {
            first_break = bad(format!(
                "prev hash does not match the previous line: a record was edited, removed, inserted or reordered before here (seq {})",
                rec_prev.0
            ));
            break;
        }
        if rec_prev.0 != expect_seq {
            first_break = bad(format!(
                "sequence number {} where {} was expected",
                rec_prev.0, expect_seq
            ));
            break;
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_err() {
            first_break = bad("line is not valid JSON".into());
            break;
        }
        prev = hex::encode(Sha256::digest(&line));
        expect_seq += 1;
        records += 1;
    }
    Ok(VerifyReport {
        path: path.to_path_buf(),
        records,
        head: prev,
        last_seq: expect_seq - 1,
        first_break,
    })
}

/// Verifies one log file from the beginning of a chain.
pub fn verify_file(path: &Path) -> Result<VerifyReport, RecordError> {
    let f = File::open(path).map_err(|source| RecordError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(path, f, GENESIS, 0).map_err(|source| RecordError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses the fixed `{"seq":N,"prev":"<hex>"` prefix the writer puts on every line.
fn extract_prefix(line: &[u8]) -> Option<(u64, &str)> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"prev\":\"")?;
    let hash = rest.get(..64)?;
    if rest.get(64) != Some(&b'"') {
        return None;
    }
    Some((seq, std::str::from_utf8(hash).ok()?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn torn_tail_is_reported_and_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        write_n(&p, 2);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
        drop(f);
        let r = verify_file(&p).unwrap();
        assert_eq!(r.first_break.unwrap().line, 3);
        let w = ChainWriter::open(&p, 0o600, FsyncPolicy::Never).unwrap();
        assert_eq!(w.torn_tail(), Some(3));
        assert_eq!(w.head().0, 2);
    }
}
