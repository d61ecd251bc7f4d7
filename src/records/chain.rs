//! The chain writer: appends hash-chained JSON lines to one log, with fsync batching and
//! size/age rotation (the chain continues into the next file).
//!
//! Holds only the writing side; verification lives in `verify`, rotation naming and retention
//! in `rotate`. Must not interpret record contents beyond the `seq`/`prev` prefix and `time`.

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
        };
        w.load_head()?;
        if w.torn_tail.is_some() {
            // Terminate the torn line so the next record starts on a line of its own; the torn
            // line stays in the file, where verification reports it.
            w.write_raw(b"\n")?;
            w.sync()?;
        }
        Ok(w)
    }

    /// Rotates the file by size or age as `policy` says, deleting rotated files past retention.
    pub fn with_rotation(mut self, policy: RotatePolicy) -> Self {
        self.rotation = Some(policy);
        self
    }

    /// Changes when a [`FsyncPolicy::Batch`] writer syncs on its own.
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> Self {
        self.batch = limits;
        self
    }

    /// The line number of a torn last line found at open, if there was one.
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
    /// added in front of its fields. Returns the record's sequence number.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<u64, RecordError> {
        let body = record_body(record)?;
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
        Ok(seq)
    }

    /// Appends one record like [`ChainWriter::append`] but leaves the fsync to the caller, to
    /// do outside whatever lock guards this writer: the record is written (other readers see
    /// it, a crash of this process keeps it) and reaches the disk when the returned
    /// [`PendingSync`] is waited for, or with the next synced append.
    pub fn append_unsynced<T: Serialize>(
        &mut self,
        record: &T,
    ) -> Result<(u64, PendingSync), RecordError> {
        let policy = std::mem::replace(&mut self.fsync, FsyncPolicy::Never);
        let seq = self.append(record);
        self.fsync = policy;
        let seq = seq?;
        let file = self.file.try_clone().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok((
            seq,
            PendingSync {
                file,
                path: self.path.clone(),
            },
        ))
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
        if self.size == 0 {
            return Ok(None);
        }
        self.sync()?;
        let target = rotate::rotated_name(&self.path, chrono::Utc::now());
        std::fs::rename(&self.path, &target).map_err(|source| RecordError::Write {
            path: target.clone(),
            source,
        })?;
        self.file = open_append(&self.path, self.mode)?;
        sync_dir(&self.path);
        if let Some(s) = &mut self.syncer {
            if let Ok(f) = self.file.try_clone() {
                s.replace_file(f);
            }
        }
        self.size = 0;
        self.first_time = None;
        if let Some(keep) = self.rotation.and_then(|p| p.retention) {
            let deleted = rotate::apply_retention(&self.path, keep, chrono::Utc::now())?;
            if !deleted.is_empty() {
                self.record_retention(&deleted)?;
            }
        }
        Ok(Some(target))
    }

    /// Appends a `retention` record naming the deleted files and the first record still kept,
    /// so verification can tell retention from deletion.
    fn record_retention(&mut self, deleted: &[PathBuf]) -> Result<(), RecordError> {
        let oldest = rotate::rotated_files(&self.path)?.into_iter().next();
        let first_seq = match &oldest {
            Some(p) => first_seq_of(p)?,
            None => None,
        }
        .unwrap_or(self.seq + 1);
        let names: Vec<String> = deleted
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        self.append(&serde_json::json!({
            "time": super::now_rfc3339(),
            "event": "retention",
            "deleted": names,
            "first_seq": first_seq,
        }))?;
        Ok(())
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
        self.file
            .write_all(bytes)
            .map_err(|source| RecordError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn load_head(&mut self) -> Result<(), RecordError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Read { path, source }
        };
        let head = read_head(&mut self.file).map_err(read_err(&self.path))?;
        self.size = head.size;
        self.torn_tail = head.torn;
        self.first_time = head.first_time;
        if head.records > 0 || head.torn.is_some() {
            self.seq = head.seq;
            self.prev = head.prev;
            return Ok(());
        }
        // Empty current file: continue the chain of the newest rotated file, if any.
        if let Some(last) = rotate::rotated_files(&self.path)?.pop() {
            let mut f = File::open(&last).map_err(read_err(&last))?;
            let h = read_head(&mut f).map_err(read_err(&last))?;
            self.seq = h.seq;
            self.prev = h.prev;
        }
        Ok(())
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        if self.fsync == FsyncPolicy::Batch && self.unsynced > 0 {
            let _ = self.file.sync_data();
        }
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

struct Head {
    seq: u64,
    prev: String,
    torn: Option<u64>,
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
        h.size += n as u64;
        lineno += 1;
        if line.last() != Some(&b'\n') {
            h.torn = Some(lineno);
            break;
        }
        line.pop();
        let Some((seq, _)) = super::verify::extract_prefix(&line) else {
            // A torn line the writer already terminated: not part of the chain.
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
