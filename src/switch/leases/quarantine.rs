//! Quarantine of a pool account before it is reused: every process of the account killed, its
//! files in the scratch root and the temporary directories removed (never following symlinks).
//! Runs as root inside the helper; decides nothing about leases.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Cleans up an account before it is reused: kill its processes, remove its files.
pub trait Quarantine {
    fn clean(&self, account: &str) -> Result<(), String>;
}

/// The real quarantine: kill every process of the account, then remove its files from the
/// scratch root and the host's temporary directories (never following symlinks).
pub struct KillAndClean {
    pub roots: Vec<PathBuf>,
}

impl Quarantine for KillAndClean {
    fn clean(&self, account: &str) -> Result<(), String> {
        let uid = nix::unistd::User::from_name(account)
            .map_err(|e| format!("cannot look up account {account}: {e}"))?
            .ok_or_else(|| format!("account {account} does not exist"))?
            .uid
            .as_raw();
        if uid == 0 {
            return Err("refusing to clean up root".into());
        }
        kill_uid(uid)?;
        for root in &self.roots {
            remove_owned(root, uid, 0).map_err(|e| format!("{}: {e}", root.display()))?;
        }
        Ok(())
    }
}

/// Kills every process whose real, effective or saved uid is `uid`, until none is left.
pub fn kill_uid(uid: u32) -> Result<(), String> {
    for _round in 0..50 {
        let pids = super::procs::pids_of_uid(uid);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("processes of uid {uid} survive SIGKILL"))
}

/// Removes every entry below `dir` owned by `uid`, without following symlinks or crossing
/// into other filesystems' mount points below the root.
fn remove_owned(dir: &Path, uid: u32, depth: u32) -> io::Result<()> {
    if depth > 64 {
        return Ok(());
    }
    let dev = dir.symlink_metadata()?.dev();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let p = e.path();
        let Ok(m) = p.symlink_metadata() else {
            continue;
        };
        if m.uid() == uid {
            if m.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        } else if m.is_dir() && m.dev() == dev {
            remove_owned(&p, uid, depth + 1)?;
        }
    }
    Ok(())
}
