//! Writing the payload's proxy file into its scratch, as its account: a new 0600 file under a
//! random name, then `rename(2)` over `x509up`, so the payload sees the old proxy or the new
//! one, never half of one, and nothing the payload planted is followed.
//!
//! The payload owns its scratch directory and may have put anything at `x509up` or at any
//! name: the directory is opened without following a link (its parent, the scratch root, is
//! root's), the new file is created with `O_EXCL|O_NOFOLLOW`, and `rename` replaces a planted
//! link or file instead of writing through it. All of it runs with this thread's filesystem
//! ids set to the account's (`setfsuid`, per thread), so root's file capabilities do not
//! apply and the file is the account's from its creation.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::ProxyError;

/// The proxy file's name in the payload's scratch (`X509_USER_PROXY` points at it).
pub const PROXY_FILE: &str = "x509up";

/// Where a payload whose scratch is `scratch` finds its proxy.
pub fn proxy_path(scratch: &Path) -> PathBuf {
    scratch.join(PROXY_FILE)
}

/// This thread's filesystem ids set to an account's until dropped.
struct FsIdentity;

impl FsIdentity {
    fn assume(uid: u32, gid: u32) -> Result<FsIdentity, String> {
        // SAFETY: setfsgid/setfsuid take plain integers and change only the calling thread's
        // filesystem ids (the kernel keeps them per thread; glibc does not broadcast these two
        // to other threads). Leaving uid 0 for the fsuid drops this thread's effective file
        // capabilities; the guard's drop sets both back to 0, which restores them.
        let (now_uid, now_gid) = unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
            // An invalid id changes nothing and returns the current one.
            (
                libc::setfsuid(u32::MAX) as u32,
                libc::setfsgid(u32::MAX) as u32,
            )
        };
        let guard = FsIdentity;
        if now_uid != uid || now_gid != gid {
            return Err(format!(
                "cannot take the account's filesystem ids {uid}:{gid} (have {now_uid}:{now_gid})"
            ));
        }
        Ok(guard)
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as in `assume`; back to root's filesystem ids on this thread.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}

/// Writes `contents` as `scratch/x509up`, mode 0600, owned by `uid:gid`, replacing what is
/// there atomically.
pub fn deliver(scratch: &Path, uid: u32, gid: u32, contents: &[u8]) -> Result<(), ProxyError> {
    let target = proxy_path(scratch);
    let fail = |reason: String| ProxyError::Deliver {
        path: target.display().to_string(),
        reason,
    };
    let _as_account = FsIdentity::assume(uid, gid).map_err(fail)?;
    let dir = nix::fcntl::open(
        scratch,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(format!("cannot open the scratch directory: {e}")))?;
    // SAFETY: `open` just returned this descriptor to us; nothing else owns it.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let tmp = format!(".{PROXY_FILE}.{:016x}", rand::random::<u64>());
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| fail(format!("cannot create {tmp}: {e}")))?;
    // SAFETY: `openat` just returned this descriptor to us; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = file
        .write_all(contents)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            // The umask cannot widen 0600, but set it exactly.
            nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(0o600))
                .map_err(|e| e.to_string())
        })
        .and_then(|()| {
            nix::fcntl::renameat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                Some(dir.as_raw_fd()),
                PROXY_FILE,
            )
            .map_err(|e| format!("cannot rename over {PROXY_FILE}: {e}"))
        });
    if let Err(reason) = written {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(fail(reason));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// (Root.) The file is the account's, 0600, replaces a planted symlink without writing
    /// through it, and the thread is root again afterwards.
    #[test]
    fn replaces_a_planted_link_as_the_account() {
        let d = tempfile::tempdir().unwrap();
        let scratch = d.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        std::os::unix::fs::symlink(&victim, proxy_path(&scratch)).unwrap();
        assert!(
            nix::unistd::geteuid().is_root(),
            "run as root (docs/testing.md)"
        );
        // The account must reach its scratch, as below the 0711 scratch root.
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        std::os::unix::fs::chown(&scratch, Some(65534), Some(65534)).unwrap();
        deliver(&scratch, 65534, 65534, b"proxy one").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        let m = std::fs::symlink_metadata(proxy_path(&scratch)).unwrap();
        assert!(m.is_file());
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (65534, 65534, 0o600));
        deliver(&scratch, 65534, 65534, b"proxy two").unwrap();
        assert_eq!(std::fs::read(proxy_path(&scratch)).unwrap(), b"proxy two");
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            1,
            "no temp file left"
        );
        // Root's filesystem ids are back: root can write where the account cannot.
        std::fs::write(d.path().join("root-only"), b"ok").unwrap();
        // A directory planted at the name is not replaced; the temp file is removed.
        std::fs::remove_file(proxy_path(&scratch)).unwrap();
        std::fs::create_dir(proxy_path(&scratch)).unwrap();
        std::fs::write(proxy_path(&scratch).join("f"), b"").unwrap();
        let e = deliver(&scratch, 65534, 65534, b"x").unwrap_err();
        assert!(e.to_string().contains("cannot rename"), "{e}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 1);
    }
}
