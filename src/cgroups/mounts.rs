//! The cgroup hierarchies mounted in a mount namespace, from its `mountinfo` (proc(5)).
//!
//! [`parse`] is pure; [`MountCache`] keeps the last parse of one mountinfo file and parses it
//! again only after the kernel flagged a change of the mount table.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::CgroupError;

/// One cgroup mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup shown at `point`, as a path in the hierarchy (`/` unless a cgroup namespace
    /// or a bind mount shows a subtree).
    pub root: String,
    /// A cgroup2 (unified) mount.
    pub v2: bool,
    /// v1: the controllers of the hierarchy (from the mount options); v2: those listed in the
    /// root's `cgroup.controllers` when it was parsed.
    pub controllers: Vec<String>,
}

impl Mount {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The directory of the cgroup at `cg_path` (a path as in `/proc/PID/cgroup`).
    pub fn dir_of(&self, cg_path: &str) -> PathBuf {
        let rel = if self.root != "/" {
            cg_path.strip_prefix(self.root.as_str()).unwrap_or(cg_path)
        } else {
            cg_path
        };
        self.point.join(rel.trim_start_matches('/'))
    }
}

/// The cgroup mounts in a mountinfo text. A v2 mount's controllers are read from its
/// `cgroup.controllers` (unreadable: none).
pub fn parse(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        // "id parent maj:min root point opts [tags] - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let v2 = match r[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let point = PathBuf::from(unescape(l[4]));
        let controllers = if v2 {
            fs::read_to_string(point.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        } else {
            r[2].split(',').map(str::to_owned).collect()
        };
        out.push(Mount {
            point,
            root: unescape(l[3]),
            v2,
            controllers,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts of one mountinfo file as last parsed, and a descriptor of that file opened
/// before the parse: the kernel flags it to poll(2) with POLLPRI|POLLERR once the mount table
/// changed (proc(5)), so the next [`MountCache::get`] parses again. (A plain file, as in unit
/// tests, never flags: it is parsed once.)
#[derive(Debug)]
pub struct MountCache {
    path: PathBuf,
    last: Mutex<Option<(fs::File, Arc<Vec<Mount>>)>>,
}

impl MountCache {
    pub fn new(mountinfo: impl Into<PathBuf>) -> MountCache {
        MountCache {
            path: mountinfo.into(),
            last: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mounts, parsed again only when the mount table changed since the last call
    /// (docs/benchmarks.md: reading and parsing mountinfo is a measurable part of a launch).
    pub fn get(&self) -> Result<Arc<Vec<Mount>>, CgroupError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((watch, mounts)) = last.as_ref() {
            let mut fds = [PollFd::new(watch.as_fd(), PollFlags::POLLPRI)];
            if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
                return Ok(mounts.clone());
            }
        }
        let read_err = |source| CgroupError::Read {
            path: self.path.clone(),
            source,
        };
        // Opened first: a change during or after the parse below shows on the next poll.
        let watch = fs::File::open(&self.path).map_err(read_err)?;
        let text = fs::read_to_string(&self.path).map_err(read_err)?;
        let mounts = Arc::new(parse(&text));
        *last = Some((watch, mounts.clone()));
        Ok(mounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn cgroup_mounts_only_with_their_controllers_and_roots() {
        let m = parse(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 /job /sys/fs/cgroup/mem\\040x rw - cgroup cgroup rw,memory\n\
             41 31 0:38 / /nonexistent/unified rw shared:9 - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(m.len(), 3);
        assert!(m[0].has("cpu") && m[0].has("cpuacct") && !m[0].v2);
        assert_eq!(m[1].point, Path::new("/sys/fs/cgroup/mem x"));
        assert_eq!(
            m[1].dir_of("/job/step/p"),
            Path::new("/sys/fs/cgroup/mem x/step/p")
        );
        assert!(m[2].v2 && m[2].controllers.is_empty());
        assert_eq!(m[2].dir_of("/"), Path::new("/nonexistent/unified"));
    }
}
