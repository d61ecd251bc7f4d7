//! Which processes run under which uids, read from `/proc`: the real, effective and saved uid
//! of every live process (zombies hold nothing and are skipped). Used to keep a pool account
//! whose processes run — the helper's payloads or a job another LCMAPS-based service started
//! under the same account — from being expired, quarantined or handed to a new owner. Reads
//! only; kills nothing (the quarantine does, through [`pids_of_uid`]).
//!
//! One scan reads `/proc/<pid>/status` of every process (measured in
//! `own_process_is_seen_and_scan_cost_is_small`); it runs only when a lease has expired or a new
//! lease is made, never when an owner's lease is reused.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;

/// The inode of the initial pid namespace (the kernel's `PROC_PID_INIT_INO`).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Every live process as (pid, [real, effective, saved uid]).
fn processes() -> impl Iterator<Item = (i32, [u32; 3])> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            // A process that exits meanwhile has no status: it runs no more.
            let status = fs::read_to_string(e.path().join("status")).ok()?;
            Some((pid, status_uids(&status)?))
        })
}

/// The real, effective and saved uid of a `/proc/<pid>/status`, or None for a zombie.
fn status_uids(status: &str) -> Option<[u32; 3]> {
    let mut uids = None;
    for line in status.lines() {
        if let Some(state) = line.strip_prefix("State:") {
            if state.trim_start().starts_with('Z') {
                return None;
            }
        } else if let Some(rest) = line.strip_prefix("Uid:") {
            let mut it = rest.split_whitespace().map(|u| u.parse::<u32>().ok());
            uids = Some([it.next()??, it.next()??, it.next()??]);
        }
    }
    uids
}

/// Pids of the live processes whose real, effective or saved uid is `uid`.
pub(super) fn pids_of_uid(uid: u32) -> Vec<i32> {
    processes()
        .filter(|(_, uids)| uids.contains(&uid))
        .map(|(pid, _)| pid)
        .collect()
}

/// Every uid that is the real, effective or saved uid of a live process. Refuses when the
/// helper cannot see every process of the host (it runs in a pid namespace of its own, or
/// `/proc` is another namespace's): an account whose processes it cannot see must never be
/// taken as idle.
pub fn live_uids() -> Result<HashSet<u32>, String> {
    let ns = fs::metadata("/proc/self/ns/pid")
        .map_err(|e| format!("cannot read /proc/self/ns/pid: {e}"))?;
    if ns.ino() != INIT_PID_NS_INO {
        return Err(
            "the helper runs in a pid namespace of its own and cannot see every process of the host; run it in the host's pid namespace"
                .into(),
        );
    }
    let mut set = HashSet::new();
    for (_, uids) in processes() {
        set.extend(uids);
    }
    Ok(set)
}

/// The accounts among `accounts` with a live process (any of its three uids). An account NSS
/// does not know has no uid, and so no process.
pub fn busy_accounts(accounts: &[String]) -> Result<HashSet<String>, String> {
    if accounts.is_empty() {
        return Ok(HashSet::new());
    }
    let live = live_uids()?;
    Ok(accounts
        .iter()
        .filter(|a| {
            matches!(nix::unistd::User::from_name(a), Ok(Some(u)) if live.contains(&u.uid.as_raw()))
        })
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_give_three_uids_and_zombies_none() {
        let s = "Name:\tsleep\nState:\tS (sleeping)\nUid:\t1001\t1002\t1003\t1004\n";
        assert_eq!(status_uids(s), Some([1001, 1002, 1003]));
        let z = "Name:\tx\nState:\tZ (zombie)\nUid:\t1001\t1001\t1001\t1001\n";
        assert_eq!(status_uids(z), None);
        assert_eq!(status_uids("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_is_seen_and_scan_cost_is_small() {
        let me = nix::unistd::getuid().as_raw();
        assert!(pids_of_uid(me).contains(&(std::process::id() as i32)));
        let t = std::time::Instant::now();
        let live = live_uids().unwrap();
        let took = t.elapsed();
        assert!(live.contains(&me));
        let n = processes().count().max(1);
        eprintln!("one /proc scan: {took:?} for {n} processes");
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }
}
