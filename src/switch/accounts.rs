//! Resolving a mapped account name to a local account (getpwnam + getgrouplist) and refusing
//! accounts a payload must never run as: root, anything below `min_uid`, the calling pilot's
//! own uid, any other pilot account, or root's group. Looks accounts up; changes nothing.

use std::collections::BTreeSet;
use std::ffi::CString;

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

/// Looks `name` up and checks it against `rules`.
pub fn resolve(name: &str, rules: &AccountRules<'_>) -> Result<Account, AccountError> {
    let lookup = |why: String| AccountError::Lookup {
        name: name.to_string(),
        why,
    };
    let user = User::from_name(name)
        .map_err(|e| lookup(e.to_string()))?
        .ok_or_else(|| AccountError::Unknown {
            name: name.to_string(),
        })?;
    let uid = user.uid.as_raw();
    let gid = user.gid.as_raw();
    let n = name.to_string();
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
    let cname = CString::new(name).map_err(|_| lookup("name contains NUL".into()))?;
    let groups: Vec<u32> = getgrouplist(&cname, Gid::from_raw(gid))
        .map_err(|e| lookup(format!("getgrouplist: {e}")))?
        .into_iter()
        .map(|g| g.as_raw())
        .filter(|g| *g != gid)
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect();
    if gid == 0 || groups.contains(&0) {
        return Err(AccountError::RootGroup { name: n });
    }
    Ok(Account {
        name: user.name,
        uid,
        gid,
        groups,
    })
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
        }
    }
}
