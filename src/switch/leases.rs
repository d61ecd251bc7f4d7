//! Pool-account leases in a gridmapdir, the layout LCMAPS and the Globus gridmapdir tools use.
//!
//! The directory holds one empty file per pool account (`dteam001`, `dteam002`, ...). A lease
//! is a hard link to an account's file named by the owner's URL-encoded, lower-cased DN, with
//! `:` and the URL-encoded, lower-cased groups appended when the mapping depends on groups. An
//! account whose file has one link is free; two links, leased. The link's mtime is the lease's
//! last use: a lease unused for longer than the TTL expires, and its account is quarantined —
//! its processes killed, its files in scratch and the temporary directories removed — before
//! anyone else gets it. An exhausted pool is a denial, never a wait.
//!
//! Runs as root inside the helper. All changes happen under one exclusive `flock` on
//! `<gridmapdir>/.mupilot.lock`, so concurrent launches (threads or processes) never hand the
//! same account to two owners. The time a lease began, which the directory does not keep, is
//! kept in `<state_dir>/leases/<account>`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Errors of the lease layer; each names the pool or the file.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("pool '{prefix}' is exhausted: all {size} accounts are leased to other owners (gridmapdir {dir}); add accounts to the pool or shorten lease_ttl")]
    Exhausted {
        prefix: String,
        size: usize,
        dir: PathBuf,
    },
    #[error("pool '{prefix}' has no accounts in gridmapdir {dir}: create one empty file per pool account there (e.g. {prefix}001)")]
    EmptyPool { prefix: String, dir: PathBuf },
    #[error("gridmapdir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "quarantine of account {account} failed: {why}; it stays quarantined and is not handed out"
    )]
    Cleanup { account: String, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LeaseError + '_ {
    move |source| LeaseError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where an account stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Free,
    Leased,
    /// The lease expired; the account waits for cleanup before reuse.
    Expired,
}

/// One account of the directory, for `mupilot-switch leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    pub account: String,
    /// The lease name decoded back to the owner's DN (and groups), when leased.
    pub owner: Option<String>,
    /// Unix time the lease began (null when unknown or free).
    pub since: Option<i64>,
    /// Unix time the lease was last used.
    pub last_used: Option<i64>,
    pub state: LeaseState,
}

/// Cleans up an account before it is reused: kill its processes, remove its files.
pub trait Quarantine {
    fn clean(&self, account: &str) -> Result<(), String>;
}

/// A gridmapdir with a lease lifetime.
pub struct Gridmapdir {
    dir: PathBuf,
    meta_dir: PathBuf,
    ttl: Duration,
}

/// The lease link name for an owner: URL-encoded, lower-cased DN, then `:group` per group.
pub fn lease_name(dn: &str, groups: &[String]) -> String {
    let mut name = url_encode(&dn.to_lowercase());
    for g in groups {
        name.push(':');
        name.push_str(&url_encode(&g.to_lowercase()));
    }
    name
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lease links start with '%' (an encoded '/'); account files do not, and our lock is a dotfile.
fn is_lease_name(name: &str) -> bool {
    name.starts_with('%')
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The directory's lock, held for one operation (released when dropped).
type DirLock = nix::fcntl::Flock<File>;

impl Gridmapdir {
    pub fn new(dir: &Path, state_dir: &Path, ttl: Duration) -> Result<Gridmapdir, LeaseError> {
        let meta_dir = state_dir.join("leases");
        fs::create_dir_all(&meta_dir).map_err(io_err(&meta_dir))?;
        if !dir.is_dir() {
            return Err(LeaseError::Io {
                path: dir.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "gridmapdir is not a directory"),
            });
        }
        Ok(Gridmapdir {
            dir: dir.to_path_buf(),
            meta_dir,
            ttl,
        })
    }

    fn lock(&self) -> Result<DirLock, LeaseError> {
        let path = self.dir.join(".mupilot.lock");
        let f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // Blocking flock; every holder does a few metadata operations and returns.
        let mut f = f;
        loop {
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
                Ok(guard) => return Ok(guard),
                Err((back, nix::errno::Errno::EINTR)) => f = back,
                Err((_, e)) => return Err(io_err(&path)(e.into())),
            }
        }
    }

    /// Pool accounts with `prefix`, sorted, with their inode and link count.
    fn accounts(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, LeaseError> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || is_lease_name(&name) || !name.starts_with(prefix) {
                continue;
            }
            let m = e.path().symlink_metadata().map_err(io_err(&e.path()))?;
            if m.is_file() {
                v.push((name, m.ino(), m.nlink()));
            }
        }
        v.sort();
        Ok(v)
    }

    /// Lease links, by inode.
    fn leases(&self) -> Result<BTreeMap<u64, (String, SystemTime)>, LeaseError> {
        let mut map = BTreeMap::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_lease_name(&name) {
                continue;
            }
            let m = e.path().symlink_metadata().map_err(io_err(&e.path()))?;
            map.insert(
                m.ino(),
                (name, m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
            );
        }
        Ok(map)
    }

    /// Gives the owner an account of the pool `prefix` (its own again while its lease lives).
    /// `in_use(account)` says whether payloads of that account run now: such a lease never
    /// expires under them.
    pub fn acquire(
        &self,
        dn: &str,
        groups: &[String],
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<String, LeaseError> {
        let _lock = self.lock()?;
        let name = lease_name(dn, groups);
        let link = self.dir.join(&name);
        let accounts = self.accounts(prefix)?;
        if accounts.is_empty() {
            return Err(LeaseError::EmptyPool {
                prefix: prefix.to_string(),
                dir: self.dir.clone(),
            });
        }
        if let Ok(m) = link.symlink_metadata() {
            if let Some((account, _, _)) = accounts.iter().find(|(_, ino, _)| *ino == m.ino()) {
                touch(&link)?;
                return Ok(account.clone());
            }
            // A link into another pool (or a stale one): leave it; this pool gets its own.
        }
        self.reclaim_expired(prefix, in_use, quarantine)?;
        let accounts = self.accounts(prefix)?;
        for (account, _, nlink) in &accounts {
            if *nlink != 1 || self.meta_dir.join(format!("{account}.quarantine")).exists() {
                continue;
            }
            let target = self.dir.join(account);
            match fs::hard_link(&target, &link) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Our own name linked to another pool's account; replace it.
                    fs::remove_file(&link).map_err(io_err(&link))?;
                    fs::hard_link(&target, &link).map_err(io_err(&link))?;
                }
                Err(e) => return Err(io_err(&link)(e)),
            }
            touch(&link)?;
            let meta = self.meta_dir.join(account);
            let record = serde_json::json!({"owner": name, "since": unix_secs(SystemTime::now())});
            fs::write(&meta, record.to_string()).map_err(io_err(&meta))?;
            return Ok(account.clone());
        }
        Err(LeaseError::Exhausted {
            prefix: prefix.to_string(),
            size: accounts.len(),
            dir: self.dir.clone(),
        })
    }

    /// Marks a lease as used now (called when a payload of the account ends).
    pub fn touch_account(&self, account: &str) -> Result<(), LeaseError> {
        let _lock = self.lock()?;
        let target = self.dir.join(account);
        let ino = match target.symlink_metadata() {
            Ok(m) => m.ino(),
            Err(_) => return Ok(()),
        };
        if let Some((name, _)) = self.leases()?.get(&ino) {
            touch(&self.dir.join(name))?;
        }
        Ok(())
    }

    fn reclaim_expired(
        &self,
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<(), LeaseError> {
        let now = SystemTime::now();
        let leases = self.leases()?;
        for (account, ino, nlink) in self.accounts(prefix)? {
            let marker = self.meta_dir.join(format!("{account}.quarantine"));
            let lease = leases.get(&ino);
            let expired = match lease {
                Some((_, mtime)) => {
                    nlink >= 2
                        && now.duration_since(*mtime).unwrap_or_default() > self.ttl
                        && !in_use(&account)
                }
                None => false,
            };
            if !expired && !marker.exists() {
                continue;
            }
            // Quarantine first, so a failed cleanup keeps the account out of circulation.
            fs::write(&marker, b"").map_err(io_err(&marker))?;
            if let Some((name, _)) = lease {
                let p = self.dir.join(name);
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            quarantine
                .clean(&account)
                .map_err(|why| LeaseError::Cleanup {
                    account: account.clone(),
                    why,
                })?;
            let _ = fs::remove_file(self.meta_dir.join(&account));
            fs::remove_file(&marker).map_err(io_err(&marker))?;
        }
        Ok(())
    }

    /// Every account of the directory with its lease.
    pub fn list(&self) -> Result<Vec<LeaseInfo>, LeaseError> {
        let _lock = self.lock()?;
        let leases = self.leases()?;
        let now = SystemTime::now();
        let mut out = Vec::new();
        for (account, ino, _) in self.accounts("")? {
            let meta: Option<serde_json::Value> = fs::read(self.meta_dir.join(&account))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let info = match leases.get(&ino) {
                Some((name, mtime)) => LeaseInfo {
                    account,
                    owner: Some(decode_lease_name(name)),
                    since: meta.as_ref().and_then(|m| m["since"].as_i64()),
                    last_used: Some(unix_secs(*mtime)),
                    state: if now.duration_since(*mtime).unwrap_or_default() > self.ttl {
                        LeaseState::Expired
                    } else {
                        LeaseState::Leased
                    },
                },
                None => LeaseInfo {
                    account,
                    owner: None,
                    since: None,
                    last_used: None,
                    state: LeaseState::Free,
                },
            };
            out.push(info);
        }
        Ok(out)
    }
}

/// Turns a lease link name back into `DN[ group ...]` for humans.
pub fn decode_lease_name(name: &str) -> String {
    name.split(':')
        .map(url_decode)
        .collect::<Vec<_>>()
        .join(" ")
}

fn touch(path: &Path) -> Result<(), LeaseError> {
    let now = nix::sys::time::TimeSpec::from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    nix::sys::stat::utimensat(
        None,
        path,
        &now,
        &now,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(path)(e.into()))
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
        let pids = pids_of_uid(uid);
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

fn pids_of_uid(uid: u32) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let status = fs::read_to_string(e.path().join("status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            let hit = line
                .split_whitespace()
                .skip(1)
                .take(3)
                .any(|u| u.parse() == Ok(uid));
            // Zombies hold no resources and cannot be killed again; skip them.
            let zombie = status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'));
            (hit && !zombie).then_some(pid)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Recorder(Mutex<Vec<String>>);
    impl Quarantine for Recorder {
        fn clean(&self, account: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(account.to_string());
            Ok(())
        }
    }

    fn pool(n: usize, ttl: Duration) -> (tempfile::TempDir, Gridmapdir) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("gridmapdir");
        fs::create_dir(&dir).unwrap();
        for i in 1..=n {
            File::create(dir.join(format!("pool{i:03}"))).unwrap();
        }
        let g = Gridmapdir::new(&dir, &t.path().join("state"), ttl).unwrap();
        (t, g)
    }

    #[test]
    fn names_are_gridmapdir_compatible() {
        assert_eq!(
            lease_name("/DC=org/CN=Alice Smith", &[]),
            "%2fdc%3dorg%2fcn%3dalice%20smith"
        );
        assert_eq!(
            lease_name("/CN=a", &["/demo/Role=prod".into()]),
            "%2fcn%3da:%2fdemo%2frole%3dprod"
        );
        assert_eq!(decode_lease_name("%2fcn%3da:%2fdemo"), "/cn=a /demo");
    }

    #[test]
    fn same_owner_keeps_its_account_others_get_others() {
        let (_t, g) = pool(2, Duration::from_secs(3600));
        let q = Recorder(Mutex::new(vec![]));
        let a1 = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
        let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
        let a2 = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        let err = g.acquire("/CN=c", &[], "pool", &|_| false, &q).unwrap_err();
        assert!(
            matches!(err, LeaseError::Exhausted { size: 2, .. }),
            "{err}"
        );
        let listed = g.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|l| l.state == LeaseState::Leased));
        assert_eq!(listed[0].owner.as_deref(), Some("/cn=a"));
    }

    #[test]
    fn expired_lease_is_quarantined_and_reused() {
        let (_t, g) = pool(1, Duration::from_millis(50));
        let q = Recorder(Mutex::new(vec![]));
        let a = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        // In use: never reclaimed under a running payload.
        assert!(g.acquire("/CN=b", &[], "pool", &|_| true, &q).is_err());
        let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
        assert_eq!(a, b);
        assert_eq!(q.0.lock().unwrap().as_slice(), std::slice::from_ref(&a));
    }

    #[test]
    fn failed_cleanup_keeps_account_out_of_circulation() {
        struct Fails;
        impl Quarantine for Fails {
            fn clean(&self, _: &str) -> Result<(), String> {
                Err("cannot".into())
            }
        }
        let (_t, g) = pool(1, Duration::from_millis(10));
        let q = Recorder(Mutex::new(vec![]));
        g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(
            g.acquire("/CN=b", &[], "pool", &|_| false, &Fails),
            Err(LeaseError::Cleanup { .. })
        ));
        // Still quarantined: a later acquire retries cleanup before handing it out.
        let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
        assert_eq!(b, "pool001");
    }
}
