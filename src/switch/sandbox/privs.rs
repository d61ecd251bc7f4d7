//! The identity switch of a payload's processes: root -> the account, with no capability left
//! and no way back. Two halves, split by when they can run:
//!
//! - [`limit_future_execs`], once per stage before any plan (idle time): securebits and the
//!   bounding set, which only govern what a later exec may gain, so the stage keeps its own
//!   capabilities. Inherited by every process the stage starts.
//! - [`switch_to`], in the payload process (and the bundle unpacker): groups, gid, uid, a
//!   fresh session keyring, every remaining capability set cleared and read back, then
//!   no_new_privs. System calls only (rustix's raw, per-thread ones where it has them), no
//!   allocation: the payload process shares the stage's memory until its exec (payload.rs),
//!   so this code must not touch the heap or any lock, and it reports a failure as a
//!   [`Failed`] of static parts.

use rustix::thread::{CapabilitySet, CapabilitySets, Gid, Uid};

use super::step::StageError;
use super::Account;

type StepResult<T> = Result<T, StageError>;

/// A failed step of code that cannot allocate: its name, the errno (0 for a failed check)
/// and, for a check, what was found. Turned into a message by [`Failed::describe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failed {
    pub step: &'static str,
    pub errno: i32,
    pub detail: &'static str,
}

impl Failed {
    /// The step failed with the calling thread's errno.
    pub fn os(step: &'static str) -> Failed {
        Failed {
            step,
            errno: nix::errno::Errno::last_raw(),
            detail: "",
        }
    }

    /// The step failed with `errno` (a rustix call's error, which leaves errno alone).
    pub fn errno(step: &'static str, e: rustix::io::Errno) -> Failed {
        Failed {
            step,
            errno: e.raw_os_error(),
            detail: "",
        }
    }

    /// A check failed: `detail` says what was found.
    pub fn check(step: &'static str, detail: &'static str) -> Failed {
        Failed {
            step,
            errno: 0,
            detail,
        }
    }

    /// (step, message) as the stage reports it.
    pub fn describe(&self) -> (String, String) {
        let mut msg = if self.errno != 0 {
            nix::errno::Errno::from_raw(self.errno).to_string()
        } else {
            String::new()
        };
        if self.errno == libc::EDQUOT && self.step == KEYRING {
            msg.push_str(": the account's key quota is used up; raise kernel.keys.maxkeys");
        }
        if !self.detail.is_empty() {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(self.detail);
        }
        (self.step.to_owned(), msg)
    }
}

const KEYRING: &str = "fresh session keyring";

/// The account as the switch needs it: checked (never root, never group 0) and laid out for
/// setgroups(2) before the payload process exists.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// The supplementary groups and the primary gid, sorted, without duplicates.
    groups: Vec<libc::gid_t>,
    /// The same, typed for rustix, laid out here because the switch cannot allocate.
    ids: (Uid, Gid, Vec<Gid>),
}

impl Identity {
    pub fn of(account: &Account) -> StepResult<Identity> {
        if account.uid == 0 || account.gid == 0 {
            return Err(StageError::new(
                "identity switch",
                format!(
                    "refusing to run a payload as uid {} gid {} (root)",
                    account.uid, account.gid
                ),
            ));
        }
        // -1 is "leave unchanged" to setres[ug]id and setgroups' callers: the switch would
        // keep root's id. Refused here by name rather than by the read-back after the switch.
        if account.uid == libc::uid_t::MAX || account.gid == libc::gid_t::MAX {
            return Err(StageError::new(
                "identity switch",
                format!(
                    "refusing uid {} gid {}: 4294967295 (-1) means \"leave unchanged\" to the kernel and is no account; fix the account's entry in the passwd/group database",
                    account.uid, account.gid
                ),
            ));
        }
        let mut groups: Vec<libc::gid_t> = account.groups.clone();
        groups.push(account.gid);
        groups.sort_unstable();
        groups.dedup();
        if groups.contains(&0) {
            return Err(StageError::new(
                "setgroups",
                "supplementary group 0 (root) is not allowed for payloads",
            ));
        }
        if groups.contains(&libc::gid_t::MAX) {
            return Err(StageError::new(
                "setgroups",
                "supplementary group 4294967295 (-1) is no group; fix the account's groups",
            ));
        }
        // Unchecked is sound: 0 and -1 are refused above, every other value is a valid id.
        let ids = (
            Uid::from_raw_unchecked(account.uid),
            Gid::from_raw_unchecked(account.gid),
            groups.iter().map(|g| Gid::from_raw_unchecked(*g)).collect(),
        );
        Ok(Identity {
            uid: account.uid,
            gid: account.gid,
            groups,
            ids,
        })
    }
}

/// Securebits and the bounding set, for this process and everything it starts: no root magic
/// on exec (locked), and no capability any exec could ever gain. Both need CAP_SETPCAP and
/// change only what a later exec gets, never this process's own capabilities, so the stage
/// does this before its plan arrives. Verified from /proc/self/status.
pub(crate) fn limit_future_execs() -> StepResult<()> {
    // NO_SETUID_FIXUP itself is NOT set: the kernel's fixup on setuid is what clears
    // permitted/effective in [`switch_to`].
    let bits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(Failed::os("set securebits").into());
    }
    // Every capability the kernel knows (EINVAL marks the end).
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            if nix::errno::Errno::last_raw() == libc::EINVAL {
                break;
            }
            return Err(Failed::os("drop bounding set").into());
        }
    }
    let s = "verify bounding set";
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| StageError::new(s, format!("/proc/self/status: {e}")))?;
    match status.lines().find_map(|l| l.strip_prefix("CapBnd:")) {
        Some(v) if u64::from_str_radix(v.trim(), 16) == Ok(0) => Ok(()),
        v => Err(StageError::new(s, format!("CapBnd is {v:?}, expected 0"))),
    }
}

/// Switches the calling process to `id` and drops every privilege it still has, then reads
/// the result back. Per-thread system calls on data prepared beforehand (rustix's, raw): no
/// allocation, no lock, no libc wrapper that coordinates threads (glibc's setuid family signals every thread of the
/// process; the payload process shares the stage's memory, not its threads).
///
/// Order: groups, gid, uid (the setuid fixup clears permitted and effective, as securebits
/// leave it on); a fresh session keyring, created as the account; ambient, inheritable,
/// permitted and effective cleared; ids, groups and capabilities read back; no_new_privs.
pub(crate) fn switch_to(id: &Identity) -> Result<(), Failed> {
    let (uid, gid, groups) = &id.ids;
    rustix::thread::set_thread_groups(groups).map_err(|e| Failed::errno("setgroups", e))?;
    rustix::thread::set_thread_res_gid(*gid, *gid, *gid)
        .map_err(|e| Failed::errno("setresgid", e))?;
    rustix::thread::set_thread_res_uid(*uid, *uid, *uid)
        .map_err(|e| Failed::errno("setresuid", e))?;
    fresh_session_keyring()?;
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(Failed::os("clear ambient capabilities"));
        }
    }
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none)
        .map_err(|e| Failed::errno("clear capabilities", e))?;
    verify(id)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Failed::os("set no_new_privs"));
    }
    Ok(())
}

/// Reads back ids, groups and capabilities through the kernel's own view: every uid and gid
/// must be the account's, the groups exactly the prepared list, and the effective, permitted
/// and inheritable sets empty. (Ambient capabilities need no check: the kernel keeps them a
/// subset of permitted and inheritable; the bounding set was verified empty when the stage
/// limited it, and nothing can raise it.)
fn verify(id: &Identity) -> Result<(), Failed> {
    let s = "verify dropped privileges";
    let (mut r, mut e, mut sv) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids to our locals; getgroups writes at most
    // `buf.len()` gids into `buf`; all on this stack. (rustix has no getresuid, and its
    // getgroups allocates.)
    unsafe {
        if libc::syscall(libc::SYS_getresuid, &mut r, &mut e, &mut sv) != 0 {
            return Err(Failed::os(s));
        }
        if [r, e, sv] != [id.uid; 3] {
            return Err(Failed::check(s, "a uid differs from the account's"));
        }
        if libc::syscall(libc::SYS_getresgid, &mut r, &mut e, &mut sv) != 0 {
            return Err(Failed::os(s));
        }
        if [r, e, sv] != [id.gid; 3] {
            return Err(Failed::check(s, "a gid differs from the account's"));
        }
        let n = libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>());
        if n < 0 {
            return Err(Failed::os(s));
        }
        if n as usize != id.groups.len() {
            return Err(Failed::check(s, "the groups differ from the account's"));
        }
        // Up to 256 groups are compared one by one (a stack buffer; more are rare, and their
        // count was checked above).
        let mut buf = [0 as libc::gid_t; 256];
        if id.groups.len() <= buf.len() {
            let n = libc::syscall(libc::SYS_getgroups, buf.len(), buf.as_mut_ptr());
            if n < 0 {
                return Err(Failed::os(s));
            }
            if buf[..n as usize] != id.groups[..] {
                return Err(Failed::check(s, "the groups differ from the account's"));
            }
        }
    }
    let caps = rustix::thread::capabilities(None).map_err(|e| Failed::errno(s, e))?;
    if !(caps.effective | caps.permitted | caps.inheritable).is_empty() {
        return Err(Failed::check(
            s,
            "a capability is still set after clearing them",
        ));
    }
    Ok(())
}

/// Replaces the session keyring inherited from the helper with a new, empty one owned by the
/// account. The session keyring survives fork, exec and setuid, and whoever has it as session
/// keyring *possesses* it and every key in it: without this step every payload could read the
/// helper's keys (systemd gives each service its own session keyring) and leave keys there for
/// the next payload. (Thread and process keyrings are not inherited across fork.)
fn fresh_session_keyring() -> Result<(), Failed> {
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name takes no pointer the kernel reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    match rc {
        r if r >= 0 => Ok(()),
        // A kernel without keyrings has nothing to inherit.
        _ if nix::errno::Errno::last_raw() == libc::ENOSYS => Ok(()),
        _ => Err(Failed::os(KEYRING)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(uid: u32, gid: u32, groups: &[u32]) -> Account {
        Account {
            name: "a".into(),
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_and_group_zero_are_refused_before_any_process_exists() {
        assert!(Identity::of(&account(0, 100, &[])).is_err());
        assert!(Identity::of(&account(100, 0, &[])).is_err());
        let e = Identity::of(&account(100, 100, &[5, 0])).unwrap_err();
        assert_eq!(e.step, "setgroups");
        assert!(e.source.to_string().contains("group 0"), "{e}");
    }

    #[test]
    fn the_kernels_leave_unchanged_id_is_refused_before_any_process_exists() {
        for (uid, gid, groups) in [
            (u32::MAX, 100, vec![]),
            (100, u32::MAX, vec![]),
            (100, 100, vec![u32::MAX]),
        ] {
            let e = Identity::of(&account(uid, gid, &groups)).unwrap_err();
            assert!(e.source.to_string().contains("4294967295 (-1)"), "{e}");
        }
    }

    #[test]
    fn groups_include_the_primary_gid_sorted_once() {
        let id = Identity::of(&account(1000, 1000, &[20, 1000, 5, 20])).unwrap();
        assert_eq!(id.groups, vec![5, 20, 1000]);
    }

    #[test]
    fn failures_describe_errno_and_check() {
        let f = Failed {
            step: KEYRING,
            errno: libc::EDQUOT,
            detail: "",
        };
        let (step, msg) = f.describe();
        assert_eq!(step, KEYRING);
        assert!(
            msg.starts_with("EDQUOT") && msg.contains("kernel.keys.maxkeys"),
            "{msg}"
        );
        let (_, msg) = Failed::check("verify dropped privileges", "a uid differs").describe();
        assert_eq!(msg, "a uid differs");
    }
}
