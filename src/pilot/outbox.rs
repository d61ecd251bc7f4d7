//! The pilot's durable outbox: what it still owes the VO server (final states, output
//! archives, the last word of heartbeats that did not get through), kept in the work dir so a
//! server outage, a pilot crash or the end of the pilot's slot loses none of it.
//!
//! Layout: `work_dir/outbox/<pilot_id>/` holds `lock` (flock'ed while that pilot lives),
//! `<payload_id>.json` (an [`Entry`]) and `<payload_id>.tar.gz` (its output archive). Every file
//! is written under a temporary name, fsynced, renamed into place and the directory fsynced,
//! so an entry is either whole or absent. A pilot that starts later in the same work dir
//! takes the lock of every directory whose pilot is gone ([`adopt`]) and sends what it left.
//!
//! Holds the files only: no network (the reporter sends), no helper.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::protocol::api::{PayloadState, StatusReport};

/// Errors of the outbox; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}; the pilot's work_dir must be writable by the pilot account")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox {path} is locked by a running pilot with the same pilot_id; give each pilot its own pilot_id")]
    Busy { path: PathBuf },
}

/// One thing owed to the server for one payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub payload_id: String,
    /// The report to send; its `pilot_id` is the pilot the payload was matched to (the only
    /// one the server accepts it from), whichever pilot sends it.
    pub report: StatusReport,
    /// An output archive `<payload_id>.tar.gz` is beside this entry.
    pub archive: bool,
    /// The payload's work directory (stdout, stderr), removed once everything is delivered.
    pub dir: Option<PathBuf>,
    /// When the entry was written (RFC 3339).
    pub written: String,
}

impl Entry {
    /// True when the report is a final state (false: the last word of a heartbeat).
    pub fn is_final(&self) -> bool {
        self.report.state.is_some_and(PayloadState::is_final)
    }
}

/// One pilot's outbox directory, locked while it is in use.
pub struct Outbox {
    dir: PathBuf,
    _lock: Flock<File>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory all pilots of a work dir keep their outboxes in.
pub fn root(work_dir: &Path) -> PathBuf {
    work_dir.join("outbox")
}

impl Outbox {
    /// Creates and locks `work_dir/outbox/<pilot_id>/`.
    pub fn open(work_dir: &Path, pilot_id: &str) -> Result<Outbox, OutboxError> {
        let dir = root(work_dir).join(pilot_id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        match Self::lock(&dir)? {
            Some(o) => Ok(o),
            None => Err(OutboxError::Busy { path: dir }),
        }
    }

    /// Locks `dir` without waiting; None when a live pilot holds it.
    fn lock(dir: &Path) -> Result<Option<Outbox>, OutboxError> {
        let path = dir.join("lock");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Outbox {
                dir: dir.to_path_buf(),
                _lock: lock,
            })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(OutboxError::Io {
                path,
                source: e.into(),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Where the output archive of `id` is kept.
    pub fn archive_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tar.gz"))
    }

    /// Stores the output archive of `id` durably (before the entry that names it).
    pub fn put_archive(&self, id: &str, bytes: &[u8]) -> Result<(), OutboxError> {
        write_durably(&self.dir, &self.archive_path(id), bytes)
    }

    /// Stores (or replaces) the entry of its payload durably.
    pub fn put(&self, entry: &Entry) -> Result<(), OutboxError> {
        let bytes = serde_json::to_vec(entry).expect("an entry serialises");
        write_durably(&self.dir, &self.entry_path(&entry.payload_id), &bytes)
    }

    /// Forgets `id`: the entry first (then a crash leaves at most an archive nobody names,
    /// removed with the directory), then the archive. Not fsynced: an entry that comes back
    /// after a crash is sent again, and the server takes a repeat as a no-op.
    pub fn remove(&self, id: &str) {
        for p in [self.entry_path(id), self.archive_path(id)] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove an outbox file");
                }
            }
        }
    }

    /// Forgets the entry of `id` but keeps its archive (the server refused it for good: the
    /// outputs stay on the node for the VO operator).
    pub fn remove_entry_only(&self, id: &str) {
        let _ = std::fs::remove_file(self.entry_path(id));
    }

    /// Every entry, oldest first by payload id order (the order does not matter to the server).
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Entry> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| read_entry(&p))
            .collect();
        out.sort_by(|a, b| a.payload_id.cmp(&b.payload_id));
        out
    }

    /// Removes the directory once nothing is left in it but the lock (an adopted outbox
    /// whose entries were all delivered).
    pub fn remove_if_empty(self) {
        let left = std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(Result::ok).any(|e| e.file_name() != "lock"))
            .unwrap_or(true);
        if !left {
            let _ = std::fs::remove_file(self.dir.join("lock"));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            // Never half-written (renamed into place whole): someone else's file. Keep it.
            tracing::error!(path = %path.display(), error = %e, "outbox entry is not readable; left in place");
            None
        }
    }
}

/// tmp + write + fsync + rename + directory fsync.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io_err(path))
}

/// Takes over the outboxes other pilots left in `work_dir` (their lock is free: they are
/// gone). The caller sends their entries and calls [`Outbox::remove_if_empty`].
pub fn adopt(work_dir: &Path, own_pilot_id: &str) -> Vec<Outbox> {
    let root = root(work_dir);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        if name.to_str() == Some(own_pilot_id) || !e.path().is_dir() {
            continue;
        }
        match Outbox::lock(&e.path()) {
            Ok(Some(o)) => out.push(o),
            Ok(None) => {} // its pilot still runs and sends them itself
            Err(err) => tracing::warn!(error = %err, "cannot look into another pilot's outbox"),
        }
    }
    out
}

/// What a pilot that adopts a non-final entry sends instead: the pilot that wrote it could not
/// report for a while and is gone now; the helper kills a pilot's payloads when its
/// connection closes, so the payload is over, but how it ended is not known.
pub fn last_word_to_lost(mut e: Entry, adopter: &str) -> Entry {
    let was = e.report.pilot_id.clone();
    e.report.state = Some(PayloadState::Lost);
    e.report.reason = Some(format!(
        "pilot {was} ended while the payload ran and its last reports did not reach the server; \
         the helper stops a pilot's payloads when the pilot goes, so it is over, but its end is \
         unknown (reported by pilot {adopter} from {was}'s outbox)"
    ));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, state: PayloadState) -> Entry {
        Entry {
            payload_id: id.into(),
            report: StatusReport {
                pilot_id: "old".into(),
                state: Some(state),
                ..Default::default()
            },
            archive: false,
            dir: None,
            written: crate::records::now_rfc3339(),
        }
    }

    #[test]
    fn entries_survive_and_are_adopted_only_when_their_pilot_is_gone() {
        let wd = tempfile::tempdir().unwrap();
        let old = Outbox::open(wd.path(), "old").unwrap();
        old.put(&entry("p1", PayloadState::Done)).unwrap();
        old.put_archive("p1", b"\x1f\x8barchive").unwrap();
        old.put(&entry("p2", PayloadState::Running)).unwrap();
        // The same pilot id twice at once is refused; a live pilot's outbox is not adopted.
        assert!(matches!(
            Outbox::open(wd.path(), "old"),
            Err(OutboxError::Busy { .. })
        ));
        assert!(adopt(wd.path(), "new").is_empty());
        drop(old);
        let adopted = adopt(wd.path(), "new");
        assert_eq!(adopted.len(), 1);
        let o = &adopted[0];
        let es = o.entries();
        assert_eq!(es.len(), 2);
        assert!(es[0].is_final() && !es[1].is_final());
        assert_eq!(
            std::fs::read(o.archive_path("p1")).unwrap(),
            b"\x1f\x8barchive"
        );
        let lost = last_word_to_lost(es[1].clone(), "new");
        assert_eq!(lost.report.state, Some(PayloadState::Lost));
        assert_eq!(lost.report.pilot_id, "old");
        for e in &es {
            o.remove(&e.payload_id);
        }
        let o = adopted.into_iter().next().unwrap();
        let dir = o.dir().to_path_buf();
        o.remove_if_empty();
        assert!(!dir.exists());
        // No temporary files were left anywhere.
        assert!(std::fs::read_dir(root(wd.path())).unwrap().next().is_none());
    }
}
