//! Resolving a mapped account name to a local account (getpwnam + getgrouplist, cached for a
//! minute) and refusing accounts a payload must never run as: root, anything below `min_uid`,
//! the calling pilot's own uid, any other pilot account, or root's group. Looks accounts up;
//! changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{getgrouplist, Gid, User};

use super::sandbox::Account;

/// Why a mapped account cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account '{name}' (from the grid-mapfile) does not exist on this host; create it or fix the mapping")]
    Unknown { name: String },
    #[error("cannot look up account '{name}': {why}")]
    Lookup { name: String, why: String },
    #[error("account '{name}' has uid 0 (root); payloads never run as root, fix the mapping")]
    Root { name: String },
    #[error("account '{name}' has uid {uid}, below min_uid {min_uid}; map to a payload account or lower min_uid")]
    BelowMinUid {
        name: String,
        uid: u32,
        min_uid: u32,
    },
    #[error("account '{name}' has uid {uid}, the calling pilot's own uid; payloads never run as the pilot, fix the mapping")]
    PilotUid { name: String, uid: u32 },
    #[error("account '{name}' has uid {uid}, an allowed pilot account; payloads never run as a pilot, fix the mapping")]
    OtherPilot { name: String, uid: u32 },
    #[error(
        "account '{name}' is in group 0 (root); remove it from the root group or fix the mapping"
    )]
    RootGroup { name: String },
}

/// What an account must not be.
pub struct AccountRules<'a> {
    pub min_uid: u32,
    pub pilot_uid: u32,
    pub pilot_uids: &'a BTreeSet<u32>,
}

/// Looks `name` up and checks it against `rules` (uncached; the helper uses [`AccountCache`]).
#[cfg(test)]
fn resolve(name: &str, rules: &AccountRules<'_>) -> Result<Account, AccountError> {
    let account = lookup(name)?;
    check(&account, rules)?;
    Ok(account)
}

/// The account database's answer for `name`: uid, primary gid and supplementary groups.
fn lookup(name: &str) -> Result<Account, AccountError> {
    let lookup = |why: String| AccountError::Lookup {
        name: name.to_string(),
        why,
    };
    let user = User::from_name(name)
        .map_err(|e| lookup(e.to_string()))?
        .ok_or_else(|| AccountError::Unknown {
            name: name.to_string(),
        })?;
    let gid = user.gid.as_raw();
    let cname = CString::new(name).map_err(|_| lookup("name contains NUL".into()))?;
    let groups: Vec<u32> = getgrouplist(&cname, Gid::from_raw(gid))
        .map_err(|e| lookup(format!("getgrouplist: {e}")))?
        .into_iter()
        .map(|g| g.as_raw())
        .filter(|g| *g != gid)
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect();
    Ok(Account {
        name: user.name,
        uid: user.uid.as_raw(),
        gid,
        groups,
    })
}

/// The rules every account must pass, on every launch (also for a cached lookup).
fn check(a: &Account, rules: &AccountRules<'_>) -> Result<(), AccountError> {
    let (uid, n) = (a.uid, a.name.clone());
    if uid == 0 {
        return Err(AccountError::Root { name: n });
    }
    if uid == rules.pilot_uid {
        return Err(AccountError::PilotUid { name: n, uid });
    }
    if rules.pilot_uids.contains(&uid) {
        return Err(AccountError::OtherPilot { name: n, uid });
    }
    if uid < rules.min_uid {
        return Err(AccountError::BelowMinUid {
            name: n,
            uid,
            min_uid: rules.min_uid,
        });
    }
    if a.gid == 0 || a.groups.contains(&0) {
        return Err(AccountError::RootGroup { name: n });
    }
    Ok(())
}

/// How long a looked-up account is reused (nscd keeps passwd entries 600 s by default).
const CACHE_TTL: Duration = Duration::from_secs(60);
/// The local files whose change empties the cache at once.
const ACCOUNT_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// Accounts looked up recently. getpwnam + getgrouplist walk every NSS module (files, systemd,
/// sss, ldap) on each call (measured in docs/benchmarks.md); a pilot starts many payloads of
/// few accounts. Entries live [`CACHE_TTL`], and all go when /etc/passwd or /etc/group change;
/// only successful lookups are kept, and [`AccountRules`] are checked on every use.
#[derive(Default)]
pub struct AccountCache {
    inner: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<String, (Account, Instant)>,
    /// (mtime, inode) of each of [`ACCOUNT_FILES`] when the entries were made.
    files: Vec<Option<(i64, i64, u64)>>,
}

fn account_files_state() -> Vec<Option<(i64, i64, u64)>> {
    ACCOUNT_FILES
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.ino()))
        })
        .collect()
}

impl AccountCache {
    /// [`resolve`], from the cache when the entry is fresh.
    pub fn resolve(&self, name: &str, rules: &AccountRules<'_>) -> Result<Account, AccountError> {
        let files = account_files_state();
        let cached = {
            let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if st.files != files {
                st.entries.clear();
                st.files = files;
            }
            st.entries
                .get(name)
                .filter(|(_, at)| at.elapsed() < CACHE_TTL)
                .map(|(a, _)| a.clone())
        };
        let account = match cached {
            Some(a) => a,
            None => {
                let a = lookup(name)?;
                self.inner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entries
                    .insert(name.to_string(), (a.clone(), Instant::now()));
                a
            }
        };
        check(&account, rules)?;
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_low_uids_are_refused() {
        let pilots = BTreeSet::new();
        let rules = AccountRules {
            min_uid: 1000,
            pilot_uid: 4242,
            pilot_uids: &pilots,
        };
        assert!(matches!(
            resolve("root", &rules),
            Err(AccountError::Root { .. })
        ));
        assert!(matches!(
            resolve("no-such-account-swd", &rules),
            Err(AccountError::Unknown { .. })
        ));
        if User::from_name("daemon").ok().flatten().is_some() {
            assert!(matches!(
                resolve("daemon", &rules),
                Err(AccountError::BelowMinUid { .. })
            ));
        }
        let rules = AccountRules {
            min_uid: 1000,
            pilot_uid: 65534,
            pilot_uids: &pilots,
        };
        if User::from_name("nobody").ok().flatten().is_some() {
            assert!(matches!(
                resolve("nobody", &rules),
                Err(AccountError::PilotUid { uid: 65534, .. })
            ));
            // A cached account is checked against the rules of each call.
            let cache = AccountCache::default();
            let lenient = AccountRules {
                min_uid: 1000,
                pilot_uid: 4242,
                pilot_uids: &pilots,
            };
            let a = cache.resolve("nobody", &lenient).unwrap();
            assert_eq!(a.uid, 65534);
            assert!(matches!(
                cache.resolve("nobody", &rules),
                Err(AccountError::PilotUid { uid: 65534, .. })
            ));
            assert!(matches!(
                cache.resolve("no-such-account-swd", &lenient),
                Err(AccountError::Unknown { .. })
            ));
        }
    }
}
