//! The identity switch of the payload process: root -> the account, with no capability left
//! and no way back. Runs only in the single-threaded payload child of the stage's init.
//!
//! Order matters: securebits and the bounding set need CAP_SETPCAP, so they come while still
//! root; then groups, gid, uid, a fresh session keyring; then the remaining sets are cleared and every one is verified
//! empty from /proc/self/status; finally no_new_privs.

use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use super::Account;

type StepResult<T> = Result<T, (String, String)>;

fn os_err(step: &str) -> (String, String) {
    (step.to_owned(), std::io::Error::last_os_error().to_string())
}

/// Switches to `account` and drops every privilege; verifies the result.
pub(crate) fn drop_to(account: &Account) -> StepResult<()> {
    if account.uid == 0 || account.gid == 0 {
        return Err((
            "identity switch".into(),
            format!(
                "refusing to run a payload as uid {} gid {} (root)",
                account.uid, account.gid
            ),
        ));
    }
    // No root magic for this process or its descendants, locked. NO_SETUID_FIXUP itself is
    // NOT set: the kernel's fixup on setuid is what clears permitted/effective below.
    let bits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(os_err("set securebits"));
    }
    // Bounding set: drop every capability the kernel knows (EINVAL marks the end).
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(("drop bounding set".into(), e.to_string()));
        }
    }
    let mut groups: Vec<Gid> = account.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    groups.push(Gid::from_raw(account.gid));
    groups.sort_unstable_by_key(|g| g.as_raw());
    groups.dedup();
    if groups.iter().any(|g| g.as_raw() == 0) {
        return Err((
            "setgroups".into(),
            "supplementary group 0 (root) is not allowed for payloads".into(),
        ));
    }
    setgroups(&groups).map_err(|e| ("setgroups".to_owned(), e.to_string()))?;
    let gid = Gid::from_raw(account.gid);
    setresgid(gid, gid, gid).map_err(|e| ("setresgid".to_owned(), e.to_string()))?;
    let uid = Uid::from_raw(account.uid);
    setresuid(uid, uid, uid).map_err(|e| ("setresuid".to_owned(), e.to_string()))?;
    fresh_session_keyring()?;
    // Ambient and inheritable survive setuid: clear them; permitted/effective were cleared by
    // the setuid fixup but are cleared again explicitly.
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(os_err("clear ambient capabilities"));
    }
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| ("clear capabilities".to_owned(), e.to_string()))?;
    }
    verify(account)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("set no_new_privs"));
    }
    Ok(())
}

/// Replaces the session keyring inherited from the helper with a new, empty one owned by the
/// account. The session keyring survives fork, exec and setuid, and whoever has it as session
/// keyring *possesses* it and every key in it: without this step every payload could read the
/// helper's keys (systemd gives each service its own session keyring) and leave keys there for
/// the next payload. (Thread and process keyrings are not inherited across fork.)
fn fresh_session_keyring() -> StepResult<()> {
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name takes no pointer the kernel reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if rc >= 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // A kernel without keyrings has nothing to inherit.
        Some(libc::ENOSYS) => Ok(()),
        Some(libc::EDQUOT) => Err((
            "fresh session keyring".into(),
            format!("{e}: the account's key quota is used up; raise kernel.keys.maxkeys"),
        )),
        _ => Err(("fresh session keyring".into(), e.to_string())),
    }
}

/// Reads back ids and all five capability sets from /proc/self/status.
fn verify(account: &Account) -> StepResult<()> {
    let s = "verify dropped privileges";
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| (s.to_owned(), format!("/proc/self/status: {e}")))?;
    for line in status.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb"
                if u64::from_str_radix(v, 16) != Ok(0) =>
            {
                return Err((s.into(), format!("{k} is {v}, expected 0")));
            }
            "Uid" | "Gid" => {
                let want = if k == "Uid" { account.uid } else { account.gid };
                if !v.split_whitespace().all(|x| x == want.to_string()) {
                    return Err((s.into(), format!("{k} is {v}, expected {want} everywhere")));
                }
            }
            _ => {}
        }
    }
    Ok(())
}
