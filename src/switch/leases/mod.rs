//! Pool-account leases in a gridmapdir, shared with LCMAPS-based services on the same host.
//!
//! The directory holds one empty file per pool account (`dteam001`, `dteam002`, ...; an account
//! of pool `dteam` is `dteam` followed by digits only, as LCMAPS's strict prefix match). A lease
//! is a hard link to an account's file named exactly as LCMAPS names it (see [`lease_name`]): the
//! lower-cased DN with every byte outside `[a-z0-9]` percent-encoded, then, when the group map
//! chose the pool (LCMAPS's `voms_poolaccount`), `:` and the pool's unix group. So an owner
//! mapped by LCMAPS and by the helper holds one lease, whichever mapped first. An account whose
//! file has one link is free; two links, leased; more, two mappers raced for it and both back
//! off, as LCMAPS does. The link's mtime is the lease's last use: a lease unused for longer
//! than the TTL expires, and its account is quarantined — its processes killed, its files in
//! scratch and the temporary directories removed — before anyone else gets it; but an account
//! in use never expires and is never handed to a new owner: payloads of it run, or any process
//! runs under its uid (real, effective or saved; see [`procs`]), such as a job another
//! LCMAPS-based service started. While an expired account is checked and cleaned, its lease is
//! held under [`hold_name`], a second link no owner's name matches, so LCMAPS neither reuses the
//! lease nor hands the account out meanwhile. An exhausted pool is a denial, never a wait. Leases named the helper's former way (`-_.~` kept, the FQAN
//! appended) are still honoured and renamed to LCMAPS's name on their owner's next launch.
//!
//! Runs as root inside the helper. All changes happen under one exclusive `flock` on
//! `<gridmapdir>/.mupilot.lock`, so concurrent launches (threads or processes) never hand the
//! same account to two owners; LCMAPS does not take that lock, so every link is checked after it
//! is made (link count and inode), as LCMAPS checks its own. The time a lease began, which the
//! directory does not keep, is kept in `<state_dir>/leases/<account>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

mod acquire;
mod expiry;
mod groupmapfile;
mod names;
mod procs;
mod quarantine;

pub use groupmapfile::{Groupmapfile, GroupmapfileError};
use names::is_lease_name;
pub use names::{decode_lease_name, former_lease_name, is_pool_account, lcmaps_encode, lease_name};
pub use procs::{busy_accounts, live_uids};
pub use quarantine::{kill_uid, KillAndClean, Quarantine};

/// Errors of the lease layer; each names the pool or the file.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("pool '{prefix}' is exhausted: all {size} accounts are leased to other owners or run processes ({busy} of them without a lease but with processes; gridmapdir {dir}); add accounts to the pool or shorten lease_ttl")]
    Exhausted {
        prefix: String,
        size: usize,
        busy: usize,
        dir: PathBuf,
    },
    #[error("pool '{prefix}': cannot tell whether accounts {accounts:?} run processes: {why}; their leases are neither expired nor handed out")]
    ProcessScan {
        prefix: String,
        accounts: Vec<String>,
        why: String,
    },
    #[error("pool '{prefix}' has no accounts in gridmapdir {dir}: create one empty file per pool account there (e.g. {prefix}001)")]
    EmptyPool { prefix: String, dir: PathBuf },
    #[error("gridmapdir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "quarantine of account {account} failed: {why}; it stays quarantined and is not handed out"
    )]
    Cleanup { account: String, why: String },
    #[error("pool '{prefix}': cannot name leases as LCMAPS does, the primary group of pool account {account} is unknown: {why}; give the pool's accounts their unix group (useradd -g GROUP)")]
    PoolGroup {
        prefix: String,
        account: String,
        why: String,
    },
    #[error(transparent)]
    Groupmapfile(#[from] GroupmapfileError),
    #[error("gridmapdir lease {path}: {why}")]
    Inconsistent { path: PathBuf, why: String },
    #[error("the owner's lease {lease} holds account {account} outside pool '{prefix}' and payloads or processes of {account} run now; the owner gets pool '{prefix}' when they end")]
    Moving {
        lease: String,
        account: String,
        prefix: String,
    },
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

/// The primary unix group name of an account; NSS by default, tests inject their own.
pub type GroupOf = dyn Fn(&str) -> Result<String, String> + Send + Sync;

/// Which of the given accounts run processes ([`busy_accounts`] by default).
pub type BusyOf = dyn Fn(&[String]) -> Result<HashSet<String>, String> + Send + Sync;

/// The name an account's lease is held under while the account is checked for processes and
/// quarantined: a second link to the account file (so LCMAPS, counting links, sees it leased)
/// that is no owner's lease name (encoded DNs start with `%2f`), so no mapper reuses it.
pub fn hold_name(account: &str) -> String {
    format!("%mupilot-hold:{account}")
}

/// How long a pool's unix group is reused before it is looked up again.
const GROUP_TTL: Duration = Duration::from_secs(60);

/// A gridmapdir with a lease lifetime.
pub struct Gridmapdir {
    dir: PathBuf,
    meta_dir: PathBuf,
    ttl: Duration,
    group_of: Box<GroupOf>,
    busy_of: Box<BusyOf>,
    /// Per pool prefix: its unix group and when it was looked up.
    groups: Mutex<HashMap<String, (String, Instant)>>,
    /// The site's LCMAPS groupmapfile, when leases are named with secondary groups.
    groupmapfile: Option<PathBuf>,
    /// The groupmapfile as parsed, and when it was read.
    groupmap: Mutex<Option<(std::sync::Arc<Groupmapfile>, Instant)>>,
}

/// What the directory holds under a lease name.
enum Existing {
    None,
    /// Linked to this account of the pool.
    Ours(String),
    /// A lease whose account file is gone (one link): LCMAPS removes it, so do we.
    Solitary,
    /// Linked to a file that is no account of this pool (the inode).
    Elsewhere(u64),
}

/// The outcome of linking a lease name to an account file.
enum Linked {
    Done,
    /// Another mapper linked the same account in the same instant; both back off.
    Raced,
    /// The lease name appeared meanwhile (LCMAPS mapped the same owner).
    NameTaken,
}

/// The primary group of `account` through NSS (getpwnam, getgrgid).
pub fn nss_primary_group(account: &str) -> Result<String, String> {
    let user = nix::unistd::User::from_name(account)
        .map_err(|e| format!("cannot look up account {account}: {e}"))?
        .ok_or_else(|| format!("account {account} does not exist"))?;
    let group = nix::unistd::Group::from_gid(user.gid)
        .map_err(|e| format!("cannot look up gid {}: {e}", user.gid))?
        .ok_or_else(|| format!("gid {} of account {account} has no group entry", user.gid))?;
    Ok(group.name)
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
            group_of: Box::new(nss_primary_group),
            busy_of: Box::new(busy_accounts),
            groups: Mutex::new(HashMap::new()),
            groupmapfile: None,
            groupmap: Mutex::new(None),
        })
    }

    /// Replaces how a pool account's primary group is found (NSS by default).
    pub fn with_group_lookup(mut self, group_of: Box<GroupOf>) -> Gridmapdir {
        self.group_of = group_of;
        self
    }

    /// Names leases of FQAN-mapped owners as LCMAPS's default configuration does: with the
    /// groups the site's LCMAPS groupmapfile maps the owner's FQANs to (primary, then secondary;
    /// see [`Groupmapfile`]) instead of the pool's own group alone (which agrees with LCMAPS run
    /// with `-do_not_use_secondary_gids`). The file is read again a minute after it was read.
    pub fn with_groupmapfile(mut self, path: &Path) -> Gridmapdir {
        self.groupmapfile = Some(path.to_path_buf());
        self
    }

    /// The group names of the lease of an owner with `owner_fqans` whose FQAN chose pool `prefix`.
    fn lease_groups(
        &self,
        prefix: &str,
        owner_fqans: &[String],
    ) -> Result<Vec<String>, LeaseError> {
        let Some(path) = &self.groupmapfile else {
            return Ok(vec![self.pool_group(prefix)?]);
        };
        let cached = self
            .groupmap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(_, at)| at.elapsed() < GROUP_TTL)
            .map(|(g, _)| g.clone());
        let map = match cached {
            Some(map) => map,
            None => {
                let map = std::sync::Arc::new(Groupmapfile::load(path)?);
                *self.groupmap.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((map.clone(), Instant::now()));
                map
            }
        };
        Ok(map.lease_groups(owner_fqans)?)
    }

    /// Replaces how accounts with live processes are found (`/proc` by default).
    pub fn with_busy_lookup(mut self, busy_of: Box<BusyOf>) -> Gridmapdir {
        self.busy_of = busy_of;
        self
    }

    /// The accounts among `accounts` that run processes.
    fn busy(&self, prefix: &str, accounts: &[String]) -> Result<HashSet<String>, LeaseError> {
        if accounts.is_empty() {
            return Ok(HashSet::new());
        }
        (self.busy_of)(accounts).map_err(|why| LeaseError::ProcessScan {
            prefix: prefix.to_string(),
            accounts: accounts.to_vec(),
            why,
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

    /// Pool accounts of `prefix` (every account file when empty), sorted, with their inode and
    /// link count. Skips what LCMAPS skips: leases, dotfiles, `root`, backups (`~`).
    fn accounts(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, LeaseError> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                || is_lease_name(&name)
                || name == "root"
                || name.contains('~')
                || !(prefix.is_empty() || is_pool_account(&name, prefix))
            {
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

    /// The unix group LCMAPS names a lease of pool `prefix` by: the primary group of the pool's
    /// first account (a pool's accounts share one, as the site's groupmapfile maps the FQAN to
    /// it). Looked up before the directory lock is taken (NSS may be slow), cached a minute.
    fn pool_group(&self, prefix: &str) -> Result<String, LeaseError> {
        if let Some((g, at)) = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(prefix)
        {
            if at.elapsed() < GROUP_TTL {
                return Ok(g.clone());
            }
        }
        let Some((first, _, _)) = self.accounts(prefix)?.into_iter().next() else {
            return Err(LeaseError::EmptyPool {
                prefix: prefix.to_string(),
                dir: self.dir.clone(),
            });
        };
        let group = (self.group_of)(&first).map_err(|why| LeaseError::PoolGroup {
            prefix: prefix.to_string(),
            account: first,
            why,
        })?;
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(prefix.to_string(), (group.clone(), Instant::now()));
        Ok(group)
    }

    /// What `link` is, judged as LCMAPS's `get_pool_mapping` judges an existing lease.
    fn existing(
        &self,
        link: &Path,
        accounts: &[(String, u64, u64)],
    ) -> Result<Existing, LeaseError> {
        let m = match link.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::None),
            Err(e) => return Err(io_err(link)(e)),
        };
        let inconsistent = |why: String| LeaseError::Inconsistent {
            path: link.to_path_buf(),
            why,
        };
        if !m.is_file() {
            return Err(inconsistent(
                "is not a regular file; remove it (leases are hard links to account files)".into(),
            ));
        }
        match m.nlink() {
            1 => Ok(Existing::Solitary),
            2 => Ok(
                match accounts.iter().find(|(_, ino, _)| *ino == m.ino()) {
                    Some((account, _, _)) => Existing::Ours(account.clone()),
                    None => Existing::Elsewhere(m.ino()),
                },
            ),
            n => Err(inconsistent(format!(
                "has {n} links: two owners hold one account file; remove the lease that is not the account's owner's"
            ))),
        }
    }

    /// Links the lease name `link` to `account`'s file (inode `ino`) and checks the result as
    /// LCMAPS's `create_link` does: two links to the account's inode, else back off.
    fn link_checked(&self, account: &str, ino: u64, link: &Path) -> Result<Linked, LeaseError> {
        let target = self.dir.join(account);
        match fs::hard_link(&target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Linked::NameTaken),
            Err(e) => return Err(io_err(link)(e)),
        }
        let m = link.symlink_metadata().map_err(io_err(link))?;
        if m.ino() == ino && m.nlink() == 2 {
            return Ok(Linked::Done);
        }
        // LCMAPS linked another owner to the same account in the same instant (it does not
        // take our lock); it backs off on seeing three links, and so do we.
        fs::remove_file(link).map_err(io_err(link))?;
        Ok(Linked::Raced)
    }

    /// Gives the owner an account of the pool `prefix` (its own again while its lease lives).
    /// `fqans` are the FQANs that chose the pool through the group map (empty when the
    /// grid-mapfile mapped the DN): they make the lease LCMAPS's `voms_poolaccount` kind, named
    /// with the pool's unix group. `in_use(account)` says whether payloads of that account run
    /// now: such a lease never expires under them.
    pub fn acquire(
        &self,
        dn: &str,
        fqans: &[String],
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<String, LeaseError> {
        self.acquire_for(dn, fqans, fqans, prefix, in_use, quarantine)
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

fn touch(path: &Path) -> Result<(), LeaseError> {
    set_last_use(path, SystemTime::now())
}

/// Sets a lease's time of last use (its mtime, as LCMAPS keeps it), not following symlinks.
fn set_last_use(path: &Path, at: SystemTime) -> Result<(), LeaseError> {
    let at = nix::sys::time::TimeSpec::from(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    nix::sys::stat::utimensat(
        None,
        path,
        &at,
        &at,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(path)(e.into()))
}

#[cfg(test)]
mod tests;
