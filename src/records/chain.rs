//! The chain writer: appends hash-chained JSON lines to one log, with fsync batching and
//! size/age rotation (the chain continues into the next file), and what it does when the file
//! cannot take a record (a full disk): a failed write never leaves a fragment that a later
//! record would continue (the file is cut back to its last complete record, and until that
//! succeeds nothing more is written), and records the caller wants kept wait in memory, in
//! order, bounded, until the file takes them again.
//!
//! Holds only the writing side; verification lives in `verify`, rotation naming and retention
//! in `rotate`. Must not interpret record contents beyond the `seq`/`prev` prefix, `time` and
//! `event`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::rotate::{self, RotatePolicy};
use super::{RecordError, GENESIS};

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync after every record (the audit default: a record acknowledged is a record kept).
    #[default]
    Always,
    /// fsync when [`ChainWriter::sync`] is called, when [`BatchLimits`] are reached on append,
    /// or from the background syncer ([`ChainWriter::start_background_sync`]).
    Batch,
    /// leave it to the kernel.
    Never,
}

/// How much a [`FsyncPolicy::Batch`] writer may leave unsynced before an append syncs itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sync after this many unsynced records.
    pub max_records: u64,
    /// Sync on the first append this long after the last sync.
    pub max_delay: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_records: 1000,
            max_delay: Duration::from_millis(100),
        }
    }
}

/// Whether a record the file cannot take now is kept in memory until it can
/// ([`ChainWriter::append_or_keep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Kept while the backlog holds less than [`KeepLimits::max_bytes`]: records about a
    /// payload that ran (end, kill, signal, lost), whose number the caller bounds.
    Essential,
    /// Kept while the backlog holds less than half of it (denials, refused callers: a caller
    /// can make any number of them), so they never crowd out essential records.
    BestEffort,
}

/// How much a writer keeps in memory while its file cannot take records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepLimits {
    /// Bytes of kept records (serialised) at most; beyond it records are counted, not kept.
    pub max_bytes: usize,
}

impl Default for KeepLimits {
    /// 4 MiB: thousands of records (an audit record is ~0.7 KiB).
    fn default() -> Self {
        KeepLimits { max_bytes: 4 << 20 }
    }
}

/// What became of a record given to [`ChainWriter::append_or_keep`].
#[derive(Debug)]
pub enum Appended {
    /// Written with this `seq`.
    Written(u64),
    /// Not written (the error says why); kept in memory and written, in order, as soon as the
    /// file takes records again.
    Kept(RecordError),
    /// Not written and not kept (the backlog is full): counted, and the count is written with
    /// the backlog (`write_failed` record); the record itself goes to the program's log.
    Dropped(RecordError),
}

/// Records waiting for the file, oldest first, and what happened since the first failure.
#[derive(Default)]
struct Backlog {
    /// Record bodies (JSON objects without `seq`/`prev`).
    records: VecDeque<String>,
    bytes: usize,
    /// When writing first failed and the last error, until the next `write_failed` record.
    failed_since: Option<String>,
    error: String,
    /// Kept records written since then (the `write_failed` record's `kept`).
    flushed: u64,
    /// Records that were neither written nor kept, by `event`, and their time range.
    dropped: BTreeMap<String, u64>,
    dropped_first: Option<String>,
    dropped_last: Option<String>,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.failed_since.is_none()
    }

    fn dropped_count(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// Appends records to one chained log file (and, with rotation, its successors).
pub struct ChainWriter {
    path: PathBuf,
    mode: u32,
    file: File,
    seq: u64,
    prev: String,
    fsync: FsyncPolicy,
    batch: BatchLimits,
    unsynced: u64,
    last_sync: Instant,
    /// Set when the file ended in a torn line at open; reported once to the caller.
    torn_tail: Option<u64>,
    rotation: Option<RotatePolicy>,
    /// Bytes in the current file.
    size: u64,
    /// `time` of the current file's first record (for age rotation).
    first_time: Option<chrono::DateTime<chrono::Utc>>,
    syncer: Option<BackgroundSync>,
    /// The file holds a fragment after this many bytes (a failed write, or a torn tail found
    /// at open, that could not be cut off yet): nothing is written until it is.
    repair_to: Option<u64>,
    /// A rotation renamed the file but could not create the new one: create it before writing.
    reopen: bool,
    backlog: Backlog,
    keep_limits: KeepLimits,
}

impl ChainWriter {
    /// Opens (creating with `mode`) the log at `path` and finds the chain's head. When the
    /// file is empty and rotated files of it exist (`path.<timestamp>`), the chain continues
    /// from the newest of them.
    pub fn open(path: &Path, mode: u32, fsync: FsyncPolicy) -> Result<Self, RecordError> {
        let file = open_append(path, mode)?;
        let mut w = ChainWriter {
            path: path.to_path_buf(),
            mode,
            file,
            seq: 0,
            prev: GENESIS.to_string(),
            fsync,
            batch: BatchLimits::default(),
            unsynced: 0,
            last_sync: Instant::now(),
            torn_tail: None,
            rotation: None,
            size: 0,
            first_time: None,
            syncer: None,
            repair_to: None,
            reopen: false,
            backlog: Backlog::default(),
            keep_limits: KeepLimits::default(),
        };
        let torn = w.load_head()?;
        if let Some(torn) = torn {
            // The file ends in a write cut short (a crash or a full disk): never a record (no
            // write of it completed, so nobody acted on it). Cut it off, so that only a last
            // line can ever be torn, and say so in the chain. If it cannot be cut off now,
            // nothing is written until it can; the note waits in memory like any kept record.
            w.repair_to = Some(torn.good_size);
            let note = serde_json::json!({
                "time": super::now_rfc3339(),
                "event": "torn",
                "removed_bytes": torn.bytes,
                "removed_sha256": torn.sha256,
                "reason": "the log ended in a record cut short (a crash or a full disk); it was never complete and was removed",
            });
            w.keep(note.to_string(), Keep::Essential);
            if let Err(e) = w.write_kept() {
                tracing::error!(log = %path.display(), error = %e, "cannot remove the torn end of the log yet; records are kept in memory until it can be");
            }
        }
        Ok(w)
    }

    /// Rotates the file by size or age as `policy` says, deleting rotated files past retention.
    pub fn with_rotation(mut self, policy: RotatePolicy) -> Self {
        self.rotation = Some(policy);
        self
    }

    /// Changes how much the writer keeps in memory while its file cannot take records.
    pub fn with_keep_limits(mut self, limits: KeepLimits) -> Self {
        self.keep_limits = limits;
        self
    }

    /// Changes when a [`FsyncPolicy::Batch`] writer syncs on its own.
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> Self {
        self.batch = limits;
        self
    }

    /// The line number of a torn last line found at open (and removed), if there was one.
    pub fn torn_tail(&self) -> Option<u64> {
        self.torn_tail
    }

    /// The sequence number and hash of the last record (the chain head), for anchoring.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.prev)
    }

    /// The current file (rotated files sit beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record. `record` must serialise to a JSON object; `seq` and `prev` are
    /// added in front of its fields. Records kept in memory are written first. Returns the
    /// record's sequence number; on an error the record was not written (or, if only the
    /// fsync failed, written but perhaps not on disk) and is not kept.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<u64, RecordError> {
        let body = record_body(record)?;
        match self.append_body(body, None, true)? {
            Appended::Written(seq) => Ok(seq),
            Appended::Kept(e) | Appended::Dropped(e) => Err(e),
        }
    }

    /// Appends one record like [`ChainWriter::append`]; when the file cannot take it (or
    /// records kept earlier) the record is kept in memory as `keep` allows and written, in
    /// order, by the next append or [`ChainWriter::write_kept`] that succeeds. An `Err` is a
    /// record that is not an object, or an fsync that failed after the record was written.
    pub fn append_or_keep<T: Serialize>(
        &mut self,
        record: &T,
        keep: Keep,
    ) -> Result<Appended, RecordError> {
        let body = record_body(record)?;
        self.append_body(body, Some(keep), true)
    }

    /// [`ChainWriter::append_or_keep`] without the fsync: a written record reaches the disk
    /// with [`ChainWriter::pending_sync`]'s `wait()` or the next synced append.
    pub fn append_or_keep_unsynced<T: Serialize>(
        &mut self,
        record: &T,
        keep: Keep,
    ) -> Result<Appended, RecordError> {
        let body = record_body(record)?;
        self.append_body(body, Some(keep), false)
    }

    /// Appends one record like [`ChainWriter::append`] but leaves the fsync to the caller, to
    /// do outside whatever lock guards this writer: the record is written (other readers see
    /// it, a crash of this process keeps it) and reaches the disk when the returned
    /// [`PendingSync`] is waited for, or with the next synced append.
    pub fn append_unsynced<T: Serialize>(
        &mut self,
        record: &T,
    ) -> Result<(u64, PendingSync), RecordError> {
        let body = record_body(record)?;
        let seq = match self.append_body(body, None, false)? {
            Appended::Written(seq) => seq,
            Appended::Kept(e) | Appended::Dropped(e) => return Err(e),
        };
        Ok((seq, self.pending_sync()?))
    }

    /// A [`PendingSync`] of everything written so far (its own descriptor of the file).
    pub fn pending_sync(&self) -> Result<PendingSync, RecordError> {
        let file = self.file.try_clone().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(PendingSync {
            file,
            path: self.path.clone(),
        })
    }

    /// Records kept in memory, waiting for the file (plus the `write_failed` note, if due).
    pub fn kept(&self) -> usize {
        self.backlog.records.len()
    }

    /// True while records wait in memory or a failure is still to be recorded.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Writes the records kept in memory (after a `write_failed` record saying since when,
    /// why, how many were kept and how many dropped) and syncs as the policy says. Ok when
    /// nothing is left in memory.
    pub fn write_kept(&mut self) -> Result<(), RecordError> {
        if self.backlog.is_empty() && self.repair_to.is_none() && !self.reopen {
            return Ok(());
        }
        self.repair()?;
        self.flush_backlog()?;
        self.sync_per_policy()
    }

    fn append_body(
        &mut self,
        body: String,
        keep: Option<Keep>,
        sync: bool,
    ) -> Result<Appended, RecordError> {
        // Kept records go first: the chain keeps the order in which records were made.
        let written = self.flush_backlog().and_then(|()| self.write_body(&body));
        let seq = match written {
            Ok(seq) => seq,
            Err(e) => {
                let Some(keep) = keep else {
                    return Err(e);
                };
                self.note_failure(&e);
                return Ok(if self.keep(body, keep) {
                    Appended::Kept(e)
                } else {
                    Appended::Dropped(e)
                });
            }
        };
        if sync {
            self.sync_per_policy()?;
        }
        Ok(Appended::Written(seq))
    }

    /// Writes one record body as the next line of the chain (rotating first if due).
    fn write_body(&mut self, body: &str) -> Result<u64, RecordError> {
        self.repair()?;
        // The record's own time drives age rotation; parsed only when it matters.
        let needs_time =
            self.first_time.is_none() || self.rotation.is_some_and(|p| p.max_age.is_some());
        let time = if needs_time {
            super::verify::extract_time(body.as_bytes())
        } else {
            None
        };
        self.maybe_rotate(time)?;
        let seq = self.seq + 1;
        let mut line = String::with_capacity(body.len() + 96);
        line.push_str("{\"seq\":");
        line.push_str(&seq.to_string());
        line.push_str(",\"prev\":\"");
        line.push_str(&self.prev);
        line.push('"');
        if body.len() > 2 {
            line.push(',');
        }
        line.push_str(&body[1..]);
        let hash = hex::encode(Sha256::digest(line.as_bytes()));
        line.push('\n');
        self.write_raw(line.as_bytes())?;
        self.seq = seq;
        self.prev = hash;
        if self.first_time.is_none() {
            self.first_time = Some(time.unwrap_or_else(chrono::Utc::now));
        }
        self.unsynced += 1;
        Ok(seq)
    }

    fn sync_per_policy(&mut self) -> Result<(), RecordError> {
        match self.fsync {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::Batch => {
                if self.unsynced >= self.batch.max_records
                    || self.last_sync.elapsed() >= self.batch.max_delay
                {
                    self.sync()?;
                } else if let Some(s) = &self.syncer {
                    s.dirty.store(true, Ordering::Release);
                }
            }
            FsyncPolicy::Never => {}
        }
        Ok(())
    }

    /// Writes what waits in memory: the kept records, oldest first, then, when a failure is
    /// still to be told, a `write_failed` record saying since when, why, how many of the
    /// records before it were kept in memory and how many were dropped. Stops at the first
    /// failure, keeping the rest.
    fn flush_backlog(&mut self) -> Result<(), RecordError> {
        if self.backlog.is_empty() {
            return Ok(());
        }
        while let Some(body) = self.backlog.records.pop_front() {
            if let Err(e) = self.write_body(&body) {
                self.backlog.records.push_front(body);
                self.note_failure(&e);
                return Err(e);
            }
            self.backlog.bytes -= body.len();
            self.backlog.flushed += 1;
        }
        if let Some(since) = self.backlog.failed_since.clone() {
            let b = &self.backlog;
            let mut m = serde_json::Map::new();
            m.insert("time".into(), super::now_rfc3339().into());
            m.insert("event".into(), "write_failed".into());
            m.insert("failed_since".into(), since.into());
            m.insert("error".into(), b.error.clone().into());
            m.insert("kept".into(), b.flushed.into());
            m.insert("dropped".into(), b.dropped_count().into());
            if !b.dropped.is_empty() {
                m.insert(
                    "dropped_events".into(),
                    serde_json::to_value(&b.dropped).expect("a map of counts serialises"),
                );
                m.insert("dropped_first_time".into(), b.dropped_first.clone().into());
                m.insert("dropped_last_time".into(), b.dropped_last.clone().into());
            }
            let note = serde_json::Value::Object(m).to_string();
            if let Err(e) = self.write_body(&note) {
                self.backlog.error = e.to_string();
                return Err(e);
            }
            self.backlog = Backlog::default();
        }
        self.backlog.flushed = 0;
        Ok(())
    }

    fn note_failure(&mut self, e: &RecordError) {
        let b = &mut self.backlog;
        if b.failed_since.is_none() {
            b.failed_since = Some(super::now_rfc3339());
        }
        b.error = e.to_string();
    }

    /// Keeps `body` for later if `keep` allows; otherwise counts it (and logs it whole, so it
    /// is not lost silently). Returns whether it was kept.
    fn keep(&mut self, body: String, keep: Keep) -> bool {
        let cap = match keep {
            Keep::Essential => self.keep_limits.max_bytes,
            Keep::BestEffort => self.keep_limits.max_bytes / 2,
        };
        let b = &mut self.backlog;
        if b.bytes + body.len() <= cap {
            b.bytes += body.len();
            b.records.push_back(body);
            return true;
        }
        let (event, time) = event_and_time(&body);
        *b.dropped.entry(event).or_insert(0) += 1;
        if b.dropped_first.is_none() {
            b.dropped_first = time.clone();
        }
        b.dropped_last = time;
        tracing::error!(log = %self.path.display(), record = %body, "log not writable and its backlog is full: record counted, not kept");
        false
    }

    /// Forces appended records to disk.
    pub fn sync(&mut self) -> Result<(), RecordError> {
        self.file.sync_data().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Starts a thread that fsyncs the log every `interval` while records are unsynced, so a
    /// [`FsyncPolicy::Batch`] writer that goes quiet still reaches the disk within `interval`.
    /// The thread stops when the writer is dropped.
    pub fn start_background_sync(&mut self, interval: Duration) -> Result<(), RecordError> {
        self.syncer = None;
        let file = self.file.try_clone().map_err(|source| RecordError::Open {
            path: self.path.clone(),
            source,
        })?;
        self.syncer = Some(BackgroundSync::start(file, interval));
        Ok(())
    }

    /// Rotates now: the current file gets its rotated name and a fresh file starts, its first
    /// record chained to the last record of the old one. Returns the rotated file's path.
    pub fn rotate(&mut self) -> Result<Option<PathBuf>, RecordError> {
        // Never rotate a fragment away: a rotated file ends in a complete record.
        self.repair()?;
        if self.size == 0 {
            return Ok(None);
        }
        self.sync()?;
        let target = rotate::rotated_name(&self.path, chrono::Utc::now());
        std::fs::rename(&self.path, &target).map_err(|source| RecordError::Write {
            path: target.clone(),
            source,
        })?;
        // From here the file named `path` is gone: until a new one exists nothing is written
        // (else records would go on into the rotated file).
        self.size = 0;
        self.first_time = None;
        self.reopen = true;
        self.open_after_rotation()?;
        if let Some(keep) = self.rotation.and_then(|p| p.retention) {
            self.apply_retention(keep)?;
        }
        Ok(Some(target))
    }

    /// Creates the new current file after a rotation renamed the old one.
    fn open_after_rotation(&mut self) -> Result<(), RecordError> {
        self.file = open_append(&self.path, self.mode)?;
        self.reopen = false;
        sync_dir(&self.path);
        if let Some(s) = &mut self.syncer {
            if let Ok(f) = self.file.try_clone() {
                s.replace_file(f);
            }
        }
        Ok(())
    }

    /// Deletes rotated files past retention, after a `retention` record naming them and the
    /// first record still kept is written, so verification can tell retention from deletion.
    /// When the record cannot be written the files stay (until the next rotation).
    fn apply_retention(&mut self, keep: Duration) -> Result<(), RecordError> {
        let expired = rotate::expired_files(&self.path, keep, chrono::Utc::now())?;
        if expired.is_empty() {
            return Ok(());
        }
        let kept = rotate::rotated_files(&self.path)?
            .into_iter()
            .find(|p| !expired.contains(p));
        let first_seq = match &kept {
            Some(p) => first_seq_of(p)?,
            None => None,
        }
        .unwrap_or(self.seq + 1);
        let names: Vec<String> = expired
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let note = serde_json::json!({
            "time": super::now_rfc3339(),
            "event": "retention",
            "deleted": names,
            "first_seq": first_seq,
        });
        if let Err(e) = self.write_body(&note.to_string()) {
            tracing::warn!(log = %self.path.display(), error = %e, "cannot record retention; the expired rotated files stay until the next rotation");
            return Ok(());
        }
        rotate::delete_files(&expired)
    }

    fn maybe_rotate(
        &mut self,
        time: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), RecordError> {
        let Some(policy) = self.rotation else {
            return Ok(());
        };
        if self.size == 0 {
            return Ok(());
        }
        let too_big = policy.max_bytes.is_some_and(|m| self.size >= m);
        let too_old = match (policy.max_age, self.first_time) {
            (Some(age), Some(first)) => {
                let now = time.unwrap_or_else(chrono::Utc::now);
                now.signed_duration_since(first)
                    .to_std()
                    .is_ok_and(|d| d >= age)
            }
            _ => false,
        };
        if too_big || too_old {
            self.rotate()?;
        }
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), RecordError> {
        // One write(2) per record on an O_APPEND descriptor: concurrent readers never see
        // half a record unless the machine dies mid-write (the torn tail case).
        if let Err(source) = self.file.write_all(bytes) {
            // A short write (a full disk) left part of the line in the file: cut it off, so
            // the next record starts a line of its own. If even that fails, nothing is
            // written until it succeeds ([`ChainWriter::repair`]).
            if let Err(e) = self.file.set_len(self.size) {
                tracing::error!(log = %self.path.display(), error = %e, size = self.size, "cannot cut a failed write off the log; no record is written until it can be");
                self.repair_to = Some(self.size);
            }
            return Err(RecordError::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Makes the file fit for the next record: creates it after a rotation that could not,
    /// and cuts off a fragment left by a failed write or found at open.
    fn repair(&mut self) -> Result<(), RecordError> {
        if self.reopen {
            self.open_after_rotation()?;
        }
        if let Some(size) = self.repair_to {
            self.file
                .set_len(size)
                .and_then(|()| self.file.sync_data())
                .map_err(|source| RecordError::Write {
                    path: self.path.clone(),
                    source,
                })?;
            self.size = size;
            self.repair_to = None;
        }
        Ok(())
    }

    /// Finds the chain's head; returns the torn tail, if the file ends in one.
    fn load_head(&mut self) -> Result<Option<Torn>, RecordError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Read { path, source }
        };
        let head = read_head(&mut self.file).map_err(read_err(&self.path))?;
        self.size = head.size;
        self.torn_tail = head.torn.as_ref().map(|t| t.line);
        self.first_time = head.first_time;
        if head.records > 0 {
            self.seq = head.seq;
            self.prev = head.prev;
            return Ok(head.torn);
        }
        // Empty current file: continue the chain of the newest rotated file, if any.
        if let Some(last) = rotate::rotated_files(&self.path)?.pop() {
            let mut f = File::open(&last).map_err(read_err(&last))?;
            let h = read_head(&mut f).map_err(read_err(&last))?;
            self.seq = h.seq;
            self.prev = h.prev;
        }
        Ok(head.torn)
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        self.finish();
        if self.fsync == FsyncPolicy::Batch && self.unsynced > 0 {
            let _ = self.file.sync_data();
        }
    }
}

impl ChainWriter {
    /// The last chance for records kept in memory (a program that exits, or drops its
    /// writer): writes them, or, when the file still cannot take them, logs each one whole
    /// (and the count of those dropped) to the program's log (journal, batch job output), so
    /// none is lost silently. Returns how many could not be written.
    pub fn finish(&mut self) -> usize {
        if !self.has_backlog() {
            return 0;
        }
        let Err(e) = self.write_kept() else {
            return 0;
        };
        let b = &self.backlog;
        tracing::error!(
            log = %self.path.display(),
            error = %e,
            kept = b.records.len(),
            dropped = b.dropped_count(),
            dropped_events = ?b.dropped,
            "the log cannot be written; its unwritten records follow"
        );
        for body in &b.records {
            tracing::error!(log = %self.path.display(), record = %body, "unwritten record");
        }
        let n = b.records.len();
        // Logged: not again when the writer is dropped.
        self.backlog = Backlog::default();
        n
    }
}

/// The `event` (or "unknown") and `time` of a record body, for counting dropped records.
fn event_and_time(body: &str) -> (String, Option<String>) {
    #[derive(serde::Deserialize)]
    struct R {
        event: Option<String>,
        time: Option<String>,
    }
    match serde_json::from_str::<R>(body) {
        Ok(r) => (r.event.unwrap_or_else(|| "unknown".into()), r.time),
        Err(_) => ("unknown".into(), None),
    }
}

/// The record serialised as a JSON object without `seq`/`prev` (the writer puts its own in
/// front). Structs keep their field order; the common case is one serialisation.
fn record_body<T: Serialize>(record: &T) -> Result<String, RecordError> {
    let body = serde_json::to_string(record).map_err(|_| RecordError::NotAnObject)?;
    if !body.starts_with('{') {
        return Err(RecordError::NotAnObject);
    }
    let has_chain_keys = memchr::memmem::find(body.as_bytes(), b"\"seq\":").is_some()
        || memchr::memmem::find(body.as_bytes(), b"\"prev\":").is_some();
    if !has_chain_keys {
        return Ok(body);
    }
    // Rare: the record carries its own seq/prev (e.g. a record copied from a log); drop them.
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|_| RecordError::NotAnObject)?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(RecordError::NotAnObject);
    };
    map.remove("seq");
    map.remove("prev");
    Ok(serde_json::Value::Object(map).to_string())
}

/// The `seq` of the first record of a file.
fn first_seq_of(path: &Path) -> Result<Option<u64>, RecordError> {
    let f = File::open(path).map_err(|source| RecordError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = Vec::new();
    let mut reader = BufReader::new(f);
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| RecordError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        if let Some((seq, _)) = super::verify::extract_prefix(&line) {
            return Ok(Some(seq));
        }
    }
}

fn open_append(path: &Path, mode: u32) -> Result<File, RecordError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(mode)
        .open(path)
        .map_err(|source| RecordError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// fsyncs the directory holding `path`, so a rotation's rename survives a crash.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// A line at the end of a file without its newline: a write cut short.
struct Torn {
    /// Its line number.
    line: u64,
    /// The file's size without it.
    good_size: u64,
    bytes: u64,
    sha256: String,
}

struct Head {
    seq: u64,
    prev: String,
    torn: Option<Torn>,
    records: u64,
    size: u64,
    first_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads the file to find the last complete record's seq and hash.
fn read_head(file: &mut File) -> io::Result<Head> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(1 << 20, &mut *file);
    let mut h = Head {
        seq: 0,
        prev: GENESIS.to_string(),
        torn: None,
        records: 0,
        size: 0,
        first_time: None,
    };
    let mut line = Vec::new();
    let mut lineno = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        if line.last() != Some(&b'\n') {
            h.torn = Some(Torn {
                line: lineno,
                good_size: h.size,
                bytes: n as u64,
                sha256: hex::encode(Sha256::digest(&line)),
            });
            h.size += n as u64;
            break;
        }
        h.size += n as u64;
        line.pop();
        let Some((seq, _)) = super::verify::extract_prefix(&line) else {
            // Not a record (a line torn by an older writer, which terminated it and went on):
            // not part of the chain.
            continue;
        };
        if h.first_time.is_none() {
            h.first_time = super::verify::extract_time(&line);
        }
        h.seq = seq;
        h.records += 1;
        h.prev = hex::encode(Sha256::digest(&line));
    }
    Ok(h)
}

/// Data written to a file but perhaps not on disk yet ([`ChainWriter::append_unsynced`]).
/// Holds its own descriptor of the file, so waiting needs no lock on the writer.
#[must_use = "the data is not durable until wait() returns Ok"]
pub struct PendingSync {
    file: File,
    path: PathBuf,
}

impl PendingSync {
    /// A pending sync of `file` (a descriptor of its own, such as from `try_clone`).
    pub fn new(file: File, path: PathBuf) -> Self {
        PendingSync { file, path }
    }

    /// Blocks until everything written to the file before this call is on disk.
    pub fn wait(self) -> Result<(), RecordError> {
        self.file.sync_data().map_err(|source| RecordError::Write {
            path: self.path,
            source,
        })
    }

    /// Starts the sync on the process's sync thread and returns at once, so that the caller
    /// can do other work (or sync another file) while the disk is busy; [`SyncStarted::wait`]
    /// collects the result. Without a sync thread the sync happens in `wait`.
    pub fn start(self) -> SyncStarted {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let Some(thread) = sync_thread() else {
            return SyncStarted::Later(self);
        };
        match thread.send((self, done)) {
            Ok(()) => SyncStarted::Running(result),
            Err(std::sync::mpsc::SendError((pending, _))) => SyncStarted::Later(pending),
        }
    }
}

/// A sync started with [`PendingSync::start`].
pub enum SyncStarted {
    Running(std::sync::mpsc::Receiver<Result<(), RecordError>>),
    Later(PendingSync),
}

impl SyncStarted {
    /// Blocks until the file is on disk (as [`PendingSync::wait`]).
    pub fn wait(self) -> Result<(), RecordError> {
        match self {
            SyncStarted::Running(result) => result.recv().unwrap_or_else(|_| {
                Err(RecordError::Write {
                    path: PathBuf::from("(sync thread)"),
                    source: std::io::Error::other("the sync thread ended"),
                })
            }),
            SyncStarted::Later(pending) => pending.wait(),
        }
    }
}

type SyncJob = (
    PendingSync,
    std::sync::mpsc::SyncSender<Result<(), RecordError>>,
);

/// The one thread that runs [`PendingSync::start`]ed syncs, started on first use (None when
/// it cannot be started: the syncs then happen in [`SyncStarted::wait`]).
fn sync_thread() -> Option<&'static std::sync::mpsc::Sender<SyncJob>> {
    static THREAD: std::sync::OnceLock<Option<std::sync::mpsc::Sender<SyncJob>>> =
        std::sync::OnceLock::new();
    THREAD
        .get_or_init(|| {
            let (jobs, queue) = std::sync::mpsc::channel::<SyncJob>();
            std::thread::Builder::new()
                .name("records-sync".into())
                .spawn(move || {
                    for (pending, done) in queue {
                        let _ = done.send(pending.wait());
                    }
                })
                .ok()
                .map(|_| jobs)
        })
        .as_ref()
}

/// The thread behind [`ChainWriter::start_background_sync`].
struct BackgroundSync {
    dirty: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    file: Arc<Mutex<File>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundSync {
    fn start(file: File, interval: Duration) -> Self {
        let dirty = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let file = Arc::new(Mutex::new(file));
        let (d, s, f) = (dirty.clone(), stop.clone(), file.clone());
        let thread = std::thread::Builder::new()
            .name("records-fsync".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    std::thread::park_timeout(interval);
                    if d.swap(false, Ordering::AcqRel) {
                        if let Ok(f) = f.lock() {
                            if let Err(e) = f.sync_data() {
                                tracing::error!(error = %e, "background fsync of the log failed");
                            }
                        }
                    }
                }
            })
            .ok();
        BackgroundSync {
            dirty,
            stop,
            file,
            thread,
        }
    }

    fn replace_file(&mut self, f: File) {
        if let Ok(mut g) = self.file.lock() {
            *g = f;
        }
    }
}

impl Drop for BackgroundSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
