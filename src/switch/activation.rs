//! Getting the listening socket: from systemd socket activation (fd 3 with LISTEN_PID and
//! LISTEN_FDS), or by binding the configured path. Access control is SO_PEERCRED on each
//! connection, not the socket file's mode, so the socket is world-connectable (0666).
//! Must run before any thread is started (it edits the environment).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The socket could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: fd 3 is not a listening unix stream socket ({why}); check ListenStream= in mupilot-switch.socket")]
    NotASocket { why: String },
    #[error("cannot create socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {path} is in use by a running helper; stop it first (systemctl stop mupilot-switch.socket mupilot-switch.service)")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another 'socket' path")]
    NotSocketFile { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the listener came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSource {
    Systemd,
    Path(PathBuf),
}

/// Takes the systemd-passed socket when this process is the one it was meant for, else binds
/// `path`.
/// The socket `bind` makes is mode 0660 owned by root and `group` (the pilot accounts' group), or 0666 without
/// a group (the helper then warns: every local uid, payloads included, can connect).
pub fn listener(
    path: &Path,
    group: Option<u32>,
) -> Result<(UnixListener, ListenSource), ActivationError> {
    if let Some(l) = from_systemd()? {
        return Ok((l, ListenSource::Systemd));
    }
    Ok((bind(path, group)?, ListenSource::Path(path.to_path_buf())))
}

fn from_systemd() -> Result<Option<UnixListener>, ActivationError> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    // Children (the stage process, payloads) must never believe the socket is theirs.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if !pid_ok || fds == 0 {
        return Ok(None);
    }
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    // SAFETY: systemd's protocol hands this process fd 3 (LISTEN_PID matched our pid) and
    // nothing else in the process owns it; the checks below refuse anything that is not a
    // listening unix stream socket before it is used.
    let listener = unsafe { UnixListener::from_raw_fd(LISTEN_FDS_START) };
    let not = |why: String| ActivationError::NotASocket { why };
    match getsockopt(&listener, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(not(format!("socket type {t:?}"))),
        Err(e) => return Err(not(e.to_string())),
    }
    if !getsockopt(&listener, sockopt::AcceptConn).map_err(|e| not(e.to_string()))? {
        return Err(not("not listening".into()));
    }
    listener.local_addr().map_err(|e| not(e.to_string()))?;
    nix::fcntl::fcntl(
        LISTEN_FDS_START,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| not(e.to_string()))?;
    Ok(Some(listener))
}

fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, ActivationError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ActivationError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| ActivationError::Dir {
                    path: dir.to_path_buf(),
                    source,
                },
            )?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ActivationError::NotSocketFile {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ActivationError::InUse {
                path: path.to_path_buf(),
            });
        }
        // A stale socket left by a helper that died: nobody accepts on it any more.
        std::fs::remove_file(path).map_err(|source| ActivationError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let bind_err = |source| ActivationError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // Bound with the umask's mode (the unit's UMask=0077: root only), then opened up.
    let l = UnixListener::bind(path).map_err(bind_err)?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(bind_err)?;
            0o660
        }
        None => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(l)
}
