//! The pilot's side of the helper socket: one connection for the pilot's whole life.
//!
//! Holds the [`HelperApi`] seam the agent is written against and the real unix-socket client.
//! A reader thread turns helper events into [`HelperMsg`]s on a tokio channel. If the helper
//! is missing or refuses the pilot, the pilot stops: it never runs a payload itself (P6).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::protocol::command::SignedCommand;
use crate::protocol::envelope::SignedEnvelope;
use crate::protocol::switch_wire::{
    read_frame, sealed_memfd, write_frame, PilotHello, SwitchEvent, SwitchRequest, WireError,
};

/// How long the helper may take to answer `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the reader thread delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum HelperMsg {
    Event(SwitchEvent),
    /// The connection ended; the helper kills this pilot's payloads when that happens.
    Closed(String),
}

/// Errors reaching or using the helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot connect to the identity-switching helper at {socket}: {source}; is mupilot-switch installed and its socket unit started (systemctl status mupilot-switch.socket)? The pilot never runs payloads without it")]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the helper at {socket} refused this pilot: {reason}; the site must list this account in allowed_pilots of switch.toml")]
    Refused { socket: PathBuf, reason: String },
    #[error("the helper at {socket} answered hello with something unexpected: {what}")]
    Protocol { socket: PathBuf, what: String },
    #[error("cannot send to the helper: {0}")]
    Send(#[from] WireError),
    #[error("cannot pass the bundle to the helper: {0}")]
    Bundle(String),
}

/// Welcome details from the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The helper's node name (switch.toml `node_name`): envelopes must be bound to it.
    pub host: String,
    pub helper_version: String,
}

/// What the agent asks of the helper. Sends are synchronous frame writes; answers arrive as
/// [`HelperMsg`]s on the channel the connection was made with.
pub trait HelperApi: Send + Sync + 'static {
    /// Asks the helper to run a payload with `stdout`/`stderr` as its output files.
    fn launch(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
    ) -> Result<(), HelperError>;
    /// Asks the helper to signal a running payload of this pilot.
    fn signal(&self, payload_id: &str, signal: i32, reason: &str) -> Result<(), HelperError>;
    /// Relays an operator command signed by the VO server; the helper authorizes the
    /// requester named in it and answers `command_done`.
    fn command(&self, command: &SignedCommand) -> Result<(), HelperError>;
    /// Asks for this pilot's running payloads with their usage so far; the helper answers
    /// `running` (one request per heartbeat round, for all payloads).
    fn status(&self) -> Result<(), HelperError>;
    /// For an envelope with `credential`: asks the helper for the CSR of the payload's key
    /// (`proxy_csr`, or `denied`).
    fn proxy_request(&self, envelope: &SignedEnvelope) -> Result<(), HelperError>;
    /// [`HelperApi::launch`] with the chain the VO server issued for that CSR.
    fn launch_with_proxy(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
        chain_pem: &str,
    ) -> Result<(), HelperError>;
    /// Asks for a CSR to renew a running payload's proxy (`proxy_csr` or `proxy_refused`).
    fn proxy_renew(&self, payload_id: &str) -> Result<(), HelperError>;
    /// Hands the renewed chain to the helper (`proxy_delivered` or `proxy_refused`).
    fn proxy_renewed(&self, payload_id: &str, chain_pem: &str) -> Result<(), HelperError>;
}

/// The real connection to `mupilot-switch`.
pub struct HelperConnection {
    socket: PathBuf,
    writer: Mutex<UnixStream>,
}

/// Connects, says hello and waits for the welcome; then starts the reader thread.
pub fn connect(
    socket: &Path,
    hello: PilotHello,
) -> Result<
    (
        HelperConnection,
        Welcome,
        mpsc::UnboundedReceiver<HelperMsg>,
    ),
    HelperError,
> {
    let mut stream = UnixStream::connect(socket).map_err(|source| HelperError::Unreachable {
        socket: socket.to_path_buf(),
        source,
    })?;
    let refused = |reason: String| HelperError::Refused {
        socket: socket.to_path_buf(),
        reason,
    };
    // A helper that refuses by closing may do so before or after reading our hello.
    if let Err(e) = write_frame(&mut stream, &SwitchRequest::Hello(hello), &[]) {
        return Err(refused(format!("connection closed during hello ({e})")));
    }
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| refused(e.to_string()))?;
    let welcome = match read_frame::<SwitchEvent>(&mut stream) {
        Ok((
            SwitchEvent::Welcome {
                host,
                helper_version,
            },
            _,
        )) => Welcome {
            host,
            helper_version,
        },
        Ok((SwitchEvent::Error { reason }, _)) => return Err(refused(reason)),
        Ok((SwitchEvent::Denied { reason, .. }, _)) => return Err(refused(reason)),
        Ok((other, _)) => {
            return Err(HelperError::Protocol {
                socket: socket.to_path_buf(),
                what: format!("{other:?}"),
            })
        }
        Err(WireError::Closed) => {
            return Err(refused(
                "the helper closed the connection without a welcome".into(),
            ))
        }
        Err(e) => return Err(refused(e.to_string())),
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| refused(e.to_string()))?;
    let mut reader = stream.try_clone().map_err(|e| refused(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("helper-reader".into())
        .spawn(move || loop {
            match read_frame::<SwitchEvent>(&mut reader) {
                Ok((ev, _fds)) => {
                    if tx.send(HelperMsg::Event(ev)).is_err() {
                        return;
                    }
                }
                Err(WireError::Json(e)) => {
                    // One malformed frame is reported; framing is intact, so keep reading.
                    tracing::warn!(error = %e, "helper sent a frame the pilot cannot read");
                }
                Err(e) => {
                    let _ = tx.send(HelperMsg::Closed(e.to_string()));
                    return;
                }
            }
        })
        .map_err(|e| refused(format!("cannot start the reader thread: {e}")))?;
    Ok((
        HelperConnection {
            socket: socket.to_path_buf(),
            writer: Mutex::new(stream),
        },
        welcome,
        rx,
    ))
}

impl HelperConnection {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn send(&self, req: &SwitchRequest, fds: &[i32]) -> Result<(), HelperError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut w, req, fds)?;
        Ok(())
    }
}

impl Drop for HelperConnection {
    fn drop(&mut self) {
        // The reader thread holds a clone of the socket; shut it down so dropping the
        // connection really ends it (the helper then cleans up this pilot's payloads).
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

impl HelperConnection {
    /// `launch`, or `launch_with_proxy` with a chain.
    fn launch_frame(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
        chain_pem: Option<&str>,
    ) -> Result<(), HelperError> {
        // The bundle travels as a sealed memfd: its pages are the pilot's (its batch job pays
        // for them, P7) and the helper reads it by position, never as JSON.
        let bundle = match bundle {
            None => None,
            Some(b64) => {
                use base64::Engine;
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => Some(
                        sealed_memfd("mupilot-bundle", &bytes)
                            .map_err(|e| HelperError::Bundle(format!("memfd: {e}")))?,
                    ),
                    // The server's fault: launched without it, the helper denies the payload
                    // (bundle missing), which the pilot reports as for any denial.
                    Err(e) => {
                        tracing::warn!(error = %e, "the server's bundle is not valid base64");
                        None
                    }
                }
            }
        };
        let bundle_fd = bundle.as_ref().map(|_| 2);
        let req = match chain_pem {
            None => SwitchRequest::Launch {
                envelope: envelope.clone(),
                bundle_fd,
            },
            Some(chain) => SwitchRequest::LaunchWithProxy {
                envelope: envelope.clone(),
                bundle_fd,
                chain_pem: chain.to_string(),
            },
        };
        let mut fds = vec![stdout.as_raw_fd(), stderr.as_raw_fd()];
        fds.extend(bundle.as_ref().map(|b| b.as_raw_fd()));
        self.send(&req, &fds)
    }
}

impl HelperApi for HelperConnection {
    fn launch(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
    ) -> Result<(), HelperError> {
        self.launch_frame(envelope, bundle, stdout, stderr, None)
    }

    fn launch_with_proxy(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
        chain_pem: &str,
    ) -> Result<(), HelperError> {
        self.launch_frame(envelope, bundle, stdout, stderr, Some(chain_pem))
    }

    fn proxy_request(&self, envelope: &SignedEnvelope) -> Result<(), HelperError> {
        let req = SwitchRequest::ProxyRequest {
            envelope: envelope.clone(),
        };
        self.send(&req, &[])
    }

    fn proxy_renew(&self, payload_id: &str) -> Result<(), HelperError> {
        let req = SwitchRequest::ProxyRenew {
            payload_id: payload_id.to_string(),
        };
        self.send(&req, &[])
    }

    fn proxy_renewed(&self, payload_id: &str, chain_pem: &str) -> Result<(), HelperError> {
        let req = SwitchRequest::ProxyRenewed {
            payload_id: payload_id.to_string(),
            chain_pem: chain_pem.to_string(),
        };
        self.send(&req, &[])
    }

    fn signal(&self, payload_id: &str, signal: i32, reason: &str) -> Result<(), HelperError> {
        self.send(
            &SwitchRequest::Signal {
                payload_id: payload_id.to_string(),
                signal,
                reason: Some(reason.to_string()),
            },
            &[],
        )
    }

    fn command(&self, command: &SignedCommand) -> Result<(), HelperError> {
        self.send(
            &SwitchRequest::Command {
                command: command.clone(),
            },
            &[],
        )
    }

    fn status(&self) -> Result<(), HelperError> {
        self.send(&SwitchRequest::Status, &[])
    }
}
