//! Verification of hash chains: one file, or a rotated set read oldest first as one chain,
//! optionally against anchors (seq + hash copied to syslog) that reveal a truncated tail.
//!
//! Read-only; never repairs a log. Reports the first bad line with the reason. Every line
//! must be a chained record, except the very last line of a log's current file, which may be
//! torn (a write cut short by a crash or a full disk, never a complete record; the writer
//! removes it before it writes again): a torn line anywhere else, an empty line or any other
//! junk is a break at its line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{RecordError, GENESIS};

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
    /// The last line, when it is cut short (no newline): a write that never completed (a
    /// crash or a full disk). Allowed only at the end of a log's current file.
    pub torn_tail: Option<u64>,
}

/// A chain head copied out of the log (to syslog): the record with `seq` had hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;
    /// Parses `SEQ:HASH` as printed in the syslog anchor line.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| format!("anchor {s:?} is not SEQ:HASH (e.g. 1234:3fa1...)"))?;
        let seq = seq
            .trim()
            .parse()
            .map_err(|_| format!("anchor {s:?}: {seq:?} is not a sequence number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "anchor {s:?}: the hash must be 64 hex digits (the SHA-256 from the syslog line)"
            ));
        }
        Ok(Anchor { seq, hash })
    }
}

/// The result of checking one anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnchorCheck {
    pub anchor: Anchor,
    pub ok: bool,
    pub detail: String,
}

/// What verification of a rotated set (oldest file first) found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// One report per file, in the order verified; verification stops at the first break.
    pub files: Vec<VerifyReport>,
    pub records: u64,
    /// `seq` of the first record; greater than 1 when retention removed older files.
    pub first_seq: u64,
    /// True when the set starts after record 1 and a `retention` record accounts for it.
    pub starts_after_retention: bool,
    pub last_seq: u64,
    pub head: String,
    /// The file and line of the first break.
    pub first_break: Option<(PathBuf, ChainBreak)>,
    pub anchors: Vec<AnchorCheck>,
}

impl ChainReport {
    /// True when no break was found and every anchor matched.
    pub fn intact(&self) -> bool {
        self.first_break.is_none() && self.anchors.iter().all(|a| a.ok)
    }
}

/// Incremental verifier state, carried from one file to the next.
struct Chain<'a> {
    prev: String,
    expect_seq: u64,
    /// Only for the first record of a set: accept its prev/seq as the chain's start.
    open_start: bool,
    anchors: &'a BTreeMap<u64, String>,
    anchor_hits: BTreeMap<u64, String>,
    /// `first_seq` of every `retention` record seen: where retention legitimately cut the chain.
    retention_starts: Vec<u64>,
}

/// Verifies a whole chain. `start_prev`/`start_seq` continue a chain from an earlier file
/// (rotation); pass [`GENESIS`] and 0 for a fresh chain.
pub fn verify_reader<R: Read>(
    path: &Path,
    input: R,
    start_prev: &str,
    start_seq: u64,
) -> io::Result<VerifyReport> {
    let none = BTreeMap::new();
    let mut chain = Chain {
        prev: start_prev.to_string(),
        expect_seq: start_seq + 1,
        open_start: false,
        anchors: &none,
        anchor_hits: BTreeMap::new(),
        retention_starts: Vec::new(),
    };
    chain.feed(path, input, true)
}

impl Chain<'_> {
    /// Checks one file. `last` says whether it is the current file of its log (the only
    /// place where the last line may be torn).
    fn feed<R: Read>(&mut self, path: &Path, input: R, last: bool) -> io::Result<VerifyReport> {
        let mut reader = BufReader::with_capacity(1 << 20, input);
        let mut records = 0u64;
        let mut lineno = 0u64;
        let mut line = Vec::new();
        let mut first_break = None;
        let mut torn_tail = None;
        loop {
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
            let bad = |reason: String| {
                Some(ChainBreak {
                    line: lineno,
                    reason,
                })
            };
            if !complete {
                if last {
                    torn_tail = Some(lineno);
                } else {
                    first_break = bad(
                        "torn line at the end of a rotated file: a rotated file always ends in a complete record, so it was cut short afterwards".into(),
                    );
                }
                break;
            }
            let parsed = extract_prefix(&line)
                .filter(|_| serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_ok());
            let Some((seq, rec_prev)) = parsed else {
                first_break = bad(if line.is_empty() {
                    "empty line: every line must be a chained record".into()
                } else {
                    "line is not a chained JSON record (edited, forged, or junk written into the log); only the last line of a log may be torn".into()
                });
                break;
            };
            if self.open_start {
                // The oldest retained file may start mid-chain (retention removed the files
                // before it); its first record's prev cannot be checked here, only anchored.
                self.open_start = false;
                self.prev = rec_prev.to_string();
                self.expect_seq = seq;
            }
            if rec_prev != self.prev {
                first_break = bad(format!(
                    "prev hash of seq {seq} does not match the record before it: the previous record was edited, or records were removed, inserted or reordered here"
                ));
                break;
            }
            if seq != self.expect_seq {
                first_break = bad(format!(
                    "sequence number {seq} where {} was expected: records were removed, inserted or reordered",
                    self.expect_seq
                ));
                break;
            }
            if memchr::memmem::find(&line, RETENTION_EVENT).is_some() {
                if let Some(s) = retention_first_seq(&line) {
                    self.retention_starts.push(s);
                }
            }
            self.prev = hex::encode(Sha256::digest(&line));
            if self.anchors.contains_key(&seq) {
                self.anchor_hits.insert(seq, self.prev.clone());
            }
            self.expect_seq += 1;
            records += 1;
        }
        Ok(VerifyReport {
            path: path.to_path_buf(),
            records,
            head: self.prev.clone(),
            last_seq: self.expect_seq - 1,
            first_break,
            torn_tail,
        })
    }
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

/// Verifies files (oldest first: rotated files, then the current one) as one chain and checks
/// each anchor: the anchored record must exist and have the anchored hash, else the tail was
/// truncated or rewritten. With `from_genesis`, the first record must be seq 1 with the
/// genesis prev; without it, a set may start at a later record (reported in `first_seq`) only
/// where a `retention` record in the set says retention deleted the files before it.
pub fn verify_files(
    paths: &[PathBuf],
    anchors: &[Anchor],
    from_genesis: bool,
) -> Result<ChainReport, RecordError> {
    let wanted: BTreeMap<u64, String> = anchors
        .iter()
        .map(|a| (a.seq, a.hash.to_ascii_lowercase()))
        .collect();
    let mut chain = Chain {
        prev: GENESIS.to_string(),
        expect_seq: 1,
        open_start: !from_genesis,
        anchors: &wanted,
        anchor_hits: BTreeMap::new(),
        retention_starts: Vec::new(),
    };
    let mut report = ChainReport {
        files: Vec::new(),
        records: 0,
        first_seq: 0,
        starts_after_retention: false,
        last_seq: 0,
        head: GENESIS.to_string(),
        first_break: None,
        anchors: Vec::new(),
    };
    for (i, path) in paths.iter().enumerate() {
        let read_err = |source| RecordError::Read {
            path: path.clone(),
            source,
        };
        let f = File::open(path).map_err(read_err)?;
        let r = chain
            .feed(path, f, i + 1 == paths.len())
            .map_err(read_err)?;
        if report.first_seq == 0 && r.records > 0 {
            report.first_seq = r.last_seq + 1 - r.records;
        }
        report.records += r.records;
        report.last_seq = r.last_seq;
        report.head = r.head.clone();
        let brk = r.first_break.clone();
        report.files.push(r);
        if let Some(b) = brk {
            report.first_break = Some((path.clone(), b));
            break;
        }
    }
    if report.first_break.is_none() && report.first_seq > 1 {
        report.starts_after_retention = chain.retention_starts.contains(&report.first_seq);
    }
    if report.first_break.is_none() && report.first_seq > 1 && !report.starts_after_retention {
        if let Some(first) = report.files.iter_mut().find(|f| f.records > 0) {
            let b = ChainBreak {
                line: 1,
                reason: format!(
                    "the chain starts at record {} but no retention record accounts for records 1-{}: they were deleted",
                    report.first_seq,
                    report.first_seq - 1
                ),
            };
            // The file's own report carries it too, so the file is not shown as intact.
            first.first_break = Some(b.clone());
            report.first_break = Some((first.path.clone(), b));
        }
    }
    for a in anchors {
        let want = a.hash.to_ascii_lowercase();
        let (ok, detail) = match chain.anchor_hits.get(&a.seq) {
            Some(h) if *h == want => (true, format!("record {} matches the anchor", a.seq)),
            Some(h) => (
                false,
                format!(
                    "record {} has hash {h}, the anchor says {want}: the log was rewritten from there on",
                    a.seq
                ),
            ),
            None if a.seq > report.last_seq => (
                false,
                format!(
                    "the log ends at record {} but the anchor shows record {} existed: the tail was truncated",
                    report.last_seq, a.seq
                ),
            ),
            None if report.first_break.is_some() => (
                false,
                format!("record {} lies beyond the break and cannot be checked", a.seq),
            ),
            None => (
                false,
                format!(
                    "record {} is older than the oldest retained file (first record {})",
                    a.seq, report.first_seq
                ),
            ),
        };
        report.anchors.push(AnchorCheck {
            anchor: Anchor {
                seq: a.seq,
                hash: want,
            },
            ok,
            detail,
        });
    }
    Ok(report)
}

const RETENTION_EVENT: &[u8] = super::schema::needle::RETENTION;

/// `first_seq` of a `retention` record (written when rotation deleted old files).
fn retention_first_seq(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct R<'a> {
        #[serde(borrow)]
        event: &'a str,
        first_seq: u64,
    }
    let r: R = serde_json::from_slice(line).ok()?;
    (r.event == "retention").then_some(r.first_seq)
}

/// Parses the fixed `{"seq":N,"prev":"<hex>"` prefix the writer puts on every line.
pub(crate) fn extract_prefix(line: &[u8]) -> Option<(u64, &str)> {
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

/// The record's `time`, when the line is a JSON object carrying one.
pub(crate) fn extract_time(line: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    #[derive(serde::Deserialize)]
    struct T<'a> {
        #[serde(borrow)]
        time: Option<&'a str>,
    }
    let t: T = serde_json::from_slice(line).ok()?;
    super::parse_record_time(t.time?)
}
