//! Copying a finished payload's declared outputs out of its scratch into a tar.gz, as root,
//! without ever following a symlink (the payload controlled every name in its scratch).
//!
//! Runs in the helper after every payload process is dead. Only regular files are copied;
//! everything else is listed as skipped with the reason.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::util::is_relative_clean_path;

/// Result of collecting outputs.
pub(crate) struct Collected {
    /// tar.gz of the copied files; `None` when no outputs were declared.
    pub archive: Option<Vec<u8>>,
    /// "path: reason" for each declared output that was not copied.
    pub skipped: Vec<String>,
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// Opens `rel` below `dir` refusing symlinks in every component and never leaving `dir`.
/// openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) where available (Linux >= 5.6), otherwise a
/// per-component openat(O_NOFOLLOW) walk.
fn open_beneath(dir: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(rel).map_err(|_| io::ErrorKind::InvalidInput)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: open_how is plain data; zeroed is a valid value and we set its fields.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    // SAFETY: openat2 reads `c` (NUL-terminated, alive) and `how` (size passed exactly); it
    // returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh descriptor returned by the kernel, owned only here.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let comps: Vec<&str> = rel.split('/').collect();
    let mut cur: Option<OwnedFd> = None;
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let c = std::ffi::CString::new(*comp).map_err(|_| io::ErrorKind::InvalidInput)?;
        let at = cur.as_ref().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
        let fl = if last {
            flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC
        };
        // SAFETY: openat with a valid dirfd and a NUL-terminated single component.
        let fd = unsafe { libc::openat(at, c.as_ptr(), fl) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor from the kernel.
        cur = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    cur.ok_or_else(|| io::ErrorKind::InvalidInput.into())
}

fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "symbolic link, not followed".into(),
        Some(libc::EXDEV) => "leaves the scratch directory".into(),
        Some(libc::ENOENT) => "missing".into(),
        Some(libc::ENOTDIR) => "a path component is not a directory".into(),
        _ => e.to_string(),
    }
}

/// Collects `outputs` (relative to `scratch`) up to `limit` bytes in total. Only files owned
/// by `owner` (the payload's account) are copied: a hard link to someone else's file (possible
/// where fs.protected_hardlinks is off) must not be read out with root's rights.
pub(crate) fn collect(scratch: &Path, outputs: &[String], limit: u64, owner: u32) -> Collected {
    if outputs.is_empty() {
        return Collected {
            archive: None,
            skipped: Vec::new(),
        };
    }
    let mut skipped = Vec::new();
    let dir = match open_dir(scratch) {
        Ok(d) => d,
        Err(e) => {
            return Collected {
                archive: None,
                skipped: outputs
                    .iter()
                    .map(|o| format!("{o}: scratch unreadable: {e}"))
                    .collect(),
            }
        }
    };
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut used: u64 = 0;
    for o in outputs {
        if !is_relative_clean_path(o) {
            skipped.push(format!("{o}: not a clean relative path"));
            continue;
        }
        let fd = match open_beneath(&dir, o) {
            Ok(fd) => fd,
            Err(e) => {
                skipped.push(format!("{o}: {}", reason(&e)));
                continue;
            }
        };
        let mut f = File::from(fd);
        let meta = match f.metadata() {
            Ok(m) => m,
            Err(e) => {
                skipped.push(format!("{o}: {e}"));
                continue;
            }
        };
        if !meta.is_file() {
            skipped.push(format!("{o}: not a regular file"));
            continue;
        }
        if std::os::unix::fs::MetadataExt::uid(&meta) != owner {
            skipped.push(format!("{o}: not owned by the payload's account"));
            continue;
        }
        if used + meta.len() > limit {
            skipped.push(format!(
                "{o}: {} bytes would exceed the output limit of {limit} bytes",
                meta.len()
            ));
            continue;
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        if let Err(e) = (&mut f).take(meta.len()).read_to_end(&mut data) {
            skipped.push(format!("{o}: {e}"));
            continue;
        }
        used += data.len() as u64;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(
            meta.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
        );
        h.set_entry_type(tar::EntryType::Regular);
        if let Err(e) = tar.append_data(&mut h, o, &data[..]) {
            skipped.push(format!("{o}: {e}"));
        }
    }
    let archive = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| skipped.push(format!("output archive: {e}")))
        .ok();
    Collected { archive, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_symlinks_and_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ok.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("sub/etc")).unwrap();
        let c = collect(
            d.path(),
            &[
                "ok.txt".into(),
                "link".into(),
                "sub/etc/passwd".into(),
                "../x".into(),
                "nope".into(),
                "sub".into(),
            ],
            1 << 20,
            0,
        );
        assert_eq!(c.skipped.len(), 5, "{:?}", c.skipped);
        let bytes = c.archive.unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["ok.txt"]);
    }

    #[test]
    fn respects_limit() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 100]).unwrap();
        std::fs::write(d.path().join("b"), vec![0u8; 100]).unwrap();
        let c = collect(d.path(), &["a".into(), "b".into()], 150, 0);
        assert_eq!(collect(d.path(), &["a".into()], 150, 4242).skipped.len(), 1);
        assert_eq!(c.skipped.len(), 1);
        assert!(c.skipped[0].starts_with("b:"));
    }
}
