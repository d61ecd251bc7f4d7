//! [`Reloading`]: a file-backed value that follows its file. Each use re-stats the file (device,
//! inode, size, mtime, ctime: a few microseconds) and reloads it when any of them changed, so an
//! edited ban list or policy takes effect for the next decision without a restart.
//!
//! Fail closed: after a change that does not load (unreadable, malformed), `get` returns the
//! error, never the old value, until the file is fixed. A file rewritten within the timestamp
//! granularity of its filesystem (same size, same mtime) is caught the way git catches "racy"
//! index entries: while the file's change time is within that granularity of our last read
//! (50 ms, or 2 s on filesystems with whole-second stamps), each use re-reads and compares.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A value that can be built from a file's bytes.
pub trait Load: Sized {
    /// The error a malformed file gives; its Display names file, line and fix.
    type Error: fmt::Display;
    /// Builds the value; `name` is the path as configured (for messages).
    fn load(name: &str, bytes: &[u8]) -> Result<Self, Self::Error>;
}

/// Why a followed file cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}: {message}; refusing until it is readable (hint: restore the file; an empty file means an empty list)")]
    Unreadable { path: String, message: String },
    #[error("{path} does not load after its last change, so it is not used and requests are refused until it is fixed: {message}")]
    Invalid { path: String, message: String },
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The file changed so recently (seen from `read_at`, taken before reading it) that a
    /// same-size rewrite could still get the same timestamps. Linux stamps files from a coarse
    /// clock (a few milliseconds); a filesystem with whole-second stamps shows zero nanoseconds.
    fn is_racy(&self, read_at: SystemTime) -> bool {
        let newest = self.mtime.max(self.ctime);
        let window = if newest.1 == 0 {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(50)
        };
        let changed = UNIX_EPOCH
            + Duration::new(
                newest.0.max(0) as u64,
                newest.1.clamp(0, 999_999_999) as u32,
            );
        match read_at.duration_since(changed) {
            Ok(age) => age < window,
            Err(_) => true,
        }
    }
}

struct State<T> {
    stamp: Option<Stamp>,
    racy: bool,
    content_hash: u64,
    current: Result<Arc<T>, ReloadError>,
}

/// A value loaded from a file and reloaded when the file changes. Cheap to query concurrently
/// (one mutex, one `stat`).
pub struct Reloading<T> {
    path: PathBuf,
    state: Mutex<State<T>>,
}

impl<T: Load> Reloading<T> {
    /// Loads the file now; an error here is a configuration error to report at startup.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ReloadError> {
        let r = Reloading {
            path: path.into(),
            state: Mutex::new(State {
                stamp: None,
                racy: true,
                content_hash: 0,
                current: Err(ReloadError::Unreadable {
                    path: String::new(),
                    message: "not loaded yet".into(),
                }),
            }),
        };
        r.get()?;
        Ok(r)
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current value, reloaded first if the file changed; the load error if the current
    /// version of the file does not load.
    pub fn get(&self) -> Result<Arc<T>, ReloadError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let name = self.path.display().to_string();
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                state.stamp = None;
                state.current = Err(ReloadError::Unreadable {
                    path: name,
                    message: e.to_string(),
                });
                return state.current.clone();
            }
        };
        let stamp = Stamp::of(&meta);
        if state.stamp == Some(stamp) && !state.racy {
            return state.current.clone();
        }
        let now = SystemTime::now();
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                state.stamp = None;
                state.current = Err(ReloadError::Unreadable {
                    path: name,
                    message: e.to_string(),
                });
                return state.current.clone();
            }
        };
        let hash = {
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let unchanged = state.stamp.is_some() && state.content_hash == hash;
        state.stamp = Some(stamp);
        state.racy = stamp.is_racy(now);
        if unchanged {
            return state.current.clone();
        }
        state.content_hash = hash;
        state.current = match T::load(&name, &bytes) {
            Ok(value) => {
                tracing::info!(path = %name, "loaded");
                Ok(Arc::new(value))
            }
            Err(e) => {
                tracing::error!(path = %name, error = %e, "file does not load; refusing until fixed");
                Err(ReloadError::Invalid {
                    path: name,
                    message: e.to_string(),
                })
            }
        };
        state.current.clone()
    }
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("path", &self.path)
            .finish()
    }
}
