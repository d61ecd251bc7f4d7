//! The site admin's client for `mupilot-switch audit kill`: asks the running helper, over its
//! unix socket and as root, to kill every payload of one owner on this node (P10), and
//! optionally to ban the owner. The helper checks the caller is uid 0 (SO_PEERCRED).
//!
//! Client side only; the helper daemon answers `admin_kill` itself.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::switch_wire::{
    read_frame, write_frame, SwitchEvent, SwitchRequest, WireError,
};

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to the helper at {socket}: {source} (is mupilot-switch running? are you root?)")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the helper at {socket} failed: {source}")]
    Wire { socket: PathBuf, source: WireError },
    #[error("the helper refused: {0}")]
    Refused(String),
    #[error("the helper answered with an unexpected message: {0}")]
    Unexpected(String),
}

/// Sends `admin_kill` for `owner_dn` and returns the ids of the payloads the helper killed.
pub fn admin_kill(
    socket: &Path,
    owner_dn: &str,
    ban: bool,
    timeout: Duration,
) -> Result<Vec<String>, AdminError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| AdminError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let wire = |source| AdminError::Wire {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| wire(e.into()))?;
    let req = SwitchRequest::AdminKill {
        owner_dn: owner_dn.to_string(),
        ban,
    };
    write_frame(&mut stream, &req, &[]).map_err(wire)?;
    let (event, _fds): (SwitchEvent, _) = read_frame(&mut stream).map_err(wire)?;
    match event {
        SwitchEvent::Killed { payloads } => Ok(payloads),
        SwitchEvent::Error { reason } => Err(AdminError::Refused(reason)),
        SwitchEvent::Denied { reason, .. } => Err(AdminError::Refused(reason)),
        other => Err(AdminError::Unexpected(format!("{other:?}"))),
    }
}
