//! cgroupfs reads and writes whose errors name the file and the value.

use std::fs;
use std::io;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use super::CgroupError;

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// [`write`] to a file the kernel may not offer (swap accounting off): absent is fine. Opened
/// without O_CREAT, so a missing file is ENOENT (cgroupfs answers a create with EACCES).
pub(super) fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write;
    let written = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match written {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        }),
    }
}

/// Creates a directory that may exist already.
pub(super) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(CgroupError::Create {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Creates a payload cgroup directory; an existing one is an error (never reuse a cgroup that
/// may hold a previous payload's processes).
pub(super) fn mkdir_new(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir(path).map_err(|source| CgroupError::Create {
        path: path.to_owned(),
        source,
    })
}

/// The pids a `cgroup.procs` file lists (none when unreadable).
pub(super) fn pids_in(procs: &Path) -> Vec<i32> {
    fs::read_to_string(procs)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A number file (`cpuacct.usage`, `memory.peak`); 0 when absent or unreadable.
pub(super) fn number(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A number file the kernel may not offer (`memory.peak` before 5.19): None when absent;
/// 0 when present but unreadable (the cgroup is going).
pub(super) fn number_if_present(path: &Path) -> Option<u64> {
    match fs::read_to_string(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        r => Some(r.ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)),
    }
}

/// The value of `key` in a "key value" lines file (`cpu.stat`, `memory.events`); 0 when absent.
pub(super) fn keyed(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (a, b) = l.split_once(' ')?;
            (a == key).then(|| b.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Removes each directory, retrying briefly on EBUSY; whether all are gone.
pub(super) fn remove_dirs(dirs: &[&Path]) -> bool {
    let mut ok = true;
    for d in dirs {
        let mut removed = false;
        for _ in 0..200 {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => sleep(Duration::from_millis(10)),
                _ => {
                    removed = true;
                    break;
                }
            }
        }
        ok &= removed;
    }
    ok
}
