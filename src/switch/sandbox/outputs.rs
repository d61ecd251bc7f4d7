//! Copying a finished payload's declared outputs (files and directory trees) out of its
//! scratch into a tar.gz, as root, without ever following a symlink (the payload controlled
//! every name in its scratch).
//!
//! Runs in the helper after every payload process is dead. Regular files and directories are
//! copied; symlinks (at the top or anywhere inside a tree), FIFOs, sockets, devices, other
//! filesystems and files not owned by the payload's account are listed as skipped with the
//! reason. The walk goes by descriptors: each name is looked up once with fstatat
//! (AT_SYMLINK_NOFOLLOW), opened with openat(O_NOFOLLOW) relative to its directory's
//! descriptor and checked to be the same inode, so a directory swapped for a symlink during the
//! copy is refused, never followed. The size limit is over everything copied.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::protocol::api::MAX_OUTPUTS_SKIPPED;
use crate::util::is_relative_clean_path;

/// Most entries (files and directories) one payload's outputs may hold: each costs a tar
/// header in memory even when empty.
const MAX_ENTRIES: usize = 100_000;
/// Deepest directory nesting copied (each level holds one descriptor during the walk).
const MAX_DEPTH: usize = 64;

/// Result of collecting outputs.
pub(crate) struct Collected {
    /// tar.gz of the copied files; `None` when no outputs were declared.
    pub archive: Option<Vec<u8>>,
    /// "path: reason" for each declared output, or entry inside a declared directory, that
    /// was not copied.
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

/// Opens the directory `rel` below `dir` refusing symlinks in every component and never
/// leaving `dir`. openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) where available (Linux >=
/// 5.6), otherwise a per-component openat(O_NOFOLLOW) walk.
fn open_dir_beneath(dir: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    let c = CString::new(rel).map_err(|_| io::ErrorKind::InvalidInput)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
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
    let mut cur: Option<OwnedFd> = None;
    for comp in rel.split('/') {
        let c = CString::new(comp).map_err(|_| io::ErrorKind::InvalidInput)?;
        let at = cur.as_ref().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
        // SAFETY: openat with a valid dirfd and a NUL-terminated single component.
        let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor from the kernel.
        cur = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    cur.ok_or_else(|| io::ErrorKind::InvalidInput.into())
}

/// lstat of one name in a directory (never follows a symlink).
fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dirfd, a NUL-terminated name, a writable stat buffer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens one name in a directory: O_NOFOLLOW (a symlink put there since the lstat fails
/// with ELOOP), O_NONBLOCK (a FIFO put there cannot block the helper).
fn open_at(dir: &OwnedFd, name: &CStr, directory: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    // SAFETY: openat with a valid dirfd and a NUL-terminated single component.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor from the kernel, owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// What a file type is called in a skip reason.
fn special(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFLNK => "symbolic link, not followed",
        libc::S_IFIFO => "a FIFO, not copied",
        libc::S_IFSOCK => "a socket, not copied",
        libc::S_IFCHR | libc::S_IFBLK => "a device, not copied",
        _ => "not a regular file or directory",
    }
}

/// The names in a directory (without "." and ".."), sorted so the archive's order does not
/// depend on the filesystem's. Read through a duplicate descriptor: the caller keeps `dir`
/// for its openat calls.
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let dup = dir.try_clone()?;
    // SAFETY: fdopendir gets a valid directory descriptor; on success the DIR owns it (it is
    // released from `dup` below and closed by closedir), on failure `dup` still owns it.
    let d = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; cleared so a NULL from readdir can tell end from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `d` is a valid open DIR, used by this thread only.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it is copied
        // before the next readdir call.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `d` is open and closed exactly once (closing its descriptor).
    unsafe { libc::closedir(d) };
    result?;
    names.sort();
    Ok(names)
}

type Tar = tar::Builder<flate2::write::GzEncoder<Vec<u8>>>;

/// The state of one collection: the archive, the budget, what was skipped.
struct Walk {
    tar: Tar,
    owner: u32,
    /// The scratch directory's filesystem: nothing on another one (a mount) is copied.
    dev: u64,
    limit: u64,
    used: u64,
    entries: usize,
    skipped: Vec<String>,
    /// Skips beyond [`MAX_OUTPUTS_SKIPPED`], only counted (a tree of a million FIFOs must not
    /// make a million-line report).
    more_skipped: usize,
}

impl Walk {
    fn skip(&mut self, path: &Path, why: impl std::fmt::Display) {
        if self.skipped.len() < MAX_OUTPUTS_SKIPPED {
            self.skipped.push(format!("{}: {why}", path.display()));
        } else {
            self.more_skipped += 1;
        }
    }

    /// Copies `name` (in the directory `dir`) as `path` in the archive: a regular file, or a
    /// directory with everything in it.
    fn entry(&mut self, dir: &OwnedFd, name: &CStr, path: &Path, depth: usize) {
        let st = match lstat_at(dir, name) {
            Ok(st) => st,
            Err(e) => return self.skip(path, reason(&e)),
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return self.skip(path, special(st.st_mode));
        }
        if st.st_dev != self.dev {
            return self.skip(path, "on another filesystem (a mount point), not copied");
        }
        if self.entries >= MAX_ENTRIES {
            return self.skip(path, format!("more than {MAX_ENTRIES} output entries"));
        }
        let fd = match open_at(dir, name, kind == libc::S_IFDIR) {
            Ok(fd) => fd,
            Err(e) => return self.skip(path, reason(&e)),
        };
        let f = File::from(fd);
        let meta = match f.metadata() {
            Ok(m) => m,
            Err(e) => return self.skip(path, e),
        };
        // The name may have been replaced between the lstat and the open.
        if meta.dev() != st.st_dev || meta.ino() != st.st_ino {
            return self.skip(path, "replaced while being copied, not copied");
        }
        self.entries += 1;
        if meta.is_dir() {
            self.directory(f, path, &meta, depth);
        } else {
            self.file(f, path, &meta);
        }
    }

    fn file(&mut self, mut f: File, path: &Path, meta: &std::fs::Metadata) {
        // A hard link to someone else's file (possible where fs.protected_hardlinks is off)
        // must not be read out with root's rights.
        if meta.uid() != self.owner {
            return self.skip(path, "not owned by the payload's account");
        }
        let left = self.limit - self.used;
        if meta.len() > left {
            return self.skip(
                path,
                format!(
                    "{} bytes would exceed the output limit of {} bytes ({left} left)",
                    meta.len(),
                    self.limit
                ),
            );
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        if let Err(e) = (&mut f).take(meta.len()).read_to_end(&mut data) {
            return self.skip(path, e);
        }
        self.used += data.len() as u64;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_entry_type(tar::EntryType::Regular);
        if let Err(e) = self.tar.append_data(&mut h, path, &data[..]) {
            self.skip(path, e);
        }
    }

    fn directory(&mut self, d: File, path: &Path, meta: &std::fs::Metadata, depth: usize) {
        if meta.uid() != self.owner {
            return self.skip(path, "directory not owned by the payload's account");
        }
        if depth >= MAX_DEPTH {
            return self.skip(
                path,
                format!("nested more than {MAX_DEPTH} directories deep"),
            );
        }
        let dir = OwnedFd::from(d);
        // Names first, sorted (the archive's order does not depend on the filesystem's),
        // read through a duplicate: the walk keeps `dir` for its openat calls.
        let names = match list(&dir) {
            Ok(n) => n,
            Err(e) => return self.skip(path, e),
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_entry_type(tar::EntryType::Directory);
        if let Err(e) = self.tar.append_data(&mut h, path, io::empty()) {
            return self.skip(path, e);
        }
        for name in names {
            let child = path.join(OsStr::from_bytes(name.to_bytes()));
            self.entry(&dir, &name, &child, depth + 1);
        }
    }
}

/// Collects `outputs` (relative to `scratch`; files or directories) up to `limit` bytes in
/// total. Only files owned by `owner` (the payload's account) are copied.
pub(crate) fn collect(scratch: &Path, outputs: &[String], limit: u64, owner: u32) -> Collected {
    if outputs.is_empty() {
        return Collected {
            archive: None,
            skipped: Vec::new(),
        };
    }
    let opened = open_dir(scratch).and_then(|d| {
        let dev = File::from(d.try_clone()?).metadata()?.dev();
        Ok((d, dev))
    });
    let (root, dev) = match opened {
        Ok(r) => r,
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
    let mut w = Walk {
        tar: tar::Builder::new(gz),
        owner,
        dev,
        limit,
        used: 0,
        entries: 0,
        skipped: Vec::new(),
        more_skipped: 0,
    };
    for o in outputs {
        if !is_relative_clean_path(o) {
            w.skip(Path::new(o), "not a clean relative path");
            continue;
        }
        let (parent, name) = match o.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, o.as_str()),
        };
        let dir = match parent.map(|p| open_dir_beneath(&root, p)) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                w.skip(Path::new(o), reason(&e));
                continue;
            }
        };
        let Ok(name) = CString::new(name) else {
            w.skip(Path::new(o), "not a clean relative path");
            continue;
        };
        w.entry(dir.as_ref().unwrap_or(&root), &name, Path::new(o), 0);
    }
    let mut skipped = w.skipped;
    if w.more_skipped > 0 {
        skipped.push(format!("... and {} more skipped entries", w.more_skipped));
    }
    let archive = w
        .tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| skipped.push(format!("output archive: {e}")))
        .ok();
    Collected { archive, skipped }
}

#[cfg(test)]
#[path = "outputs_tests.rs"]
mod tests;
