//! Everything that passes between the helper, its stages and the stage factory, and how.
//!
//! Holds the messages ([`ToStage`], [`FromStage`], [`ToFactory`], [`FromFactory`]), the
//! stage's arguments ([`Preparation`]), the plan ([`Plan`]), the one framing both ways (the
//! helper socket's, protocol/switch_wire.rs: a 4-byte big-endian length, that many bytes of
//! JSON, descriptors attached to the first byte), the gates (one byte on a pipe) and the
//! short spin that saves a cross-CPU wake-up when a message is due within microseconds.
//!
//! Must not act on a message: what the stage does with its plan is stage/, what the helper
//! does with an event is start.rs and running.rs. Nothing here allocates from an announced
//! length before the bytes arrived, and no message carries a credential.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::cgroup::Located;
use super::{Account, NetworkMode};
use crate::protocol::switch_wire::{self, ReadLimits};

/// Largest message either side accepts. A plan is bounded by the pilot's request (at most
/// `switch_wire::MAX_REQUEST_FRAME`, 1 MiB) plus the helper's allowlisted environment.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// The length header before each message's JSON.
const HEADER: usize = 4;

/// Everything a stage needs for one payload; no credentials, no secrets (the bundle is the
/// payload's input).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub payload_id: String,
    pub account: Account,
    pub argv: Vec<String>,
    /// The payload's complete environment, computed by the helper.
    pub env: Vec<(String, String)>,
    /// Where the payload cgroup goes (below the pilot's); the helper creates it while the stage
    /// builds the scratch view, the stage joins it (`Located::join_files`).
    pub cgroup: Located,
    pub scratch_root: PathBuf,
    pub scratch: PathBuf,
    pub nofile: u64,
    pub core_bytes: u64,
    pub allow_user_namespaces: bool,
    /// A bundle (tar.gz) comes as the descriptor after the two gates: a sealed memfd whose
    /// digest the helper checked.
    pub bundle: bool,
    /// The payload's stdin comes as the descriptor after the bundle's place (gLExec entry).
    #[serde(default)]
    pub stdin: bool,
}

/// Helper -> stage, on the stage's socketpair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum ToStage {
    /// A launch request arrived: the plan follows within a millisecond or two, so the stage
    /// spins for it instead of sleeping (`StagePool::wake_next`). Carries nothing.
    Wake,
    /// The payload to start. Its descriptors, in order: the exec gate, the cgroup gate, the
    /// bundle (when `bundle`), stdin (when `stdin`), then the payload's stdout and stderr
    /// (both or neither).
    Plan(Box<Plan>),
}

/// Whose fault a failed setup step is, which decides how the helper reports the denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Fault {
    /// The node's: a mount, a namespace, the disk (a system denial).
    Node,
    /// The input bundle is not a usable tar.gz (the caller's fault).
    Bundle,
}

/// Stage -> helper, on the same socketpair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum FromStage {
    /// The payload was exec'd. `pid` is its host pid, `stage_pid` the stage's.
    Started { pid: i32, stage_pid: i32 },
    /// A setup step failed; the payload did not run. Text from here on: it crossed a process
    /// boundary (the stage's `StageError`).
    Failed {
        step: String,
        error: String,
        fault: Fault,
    },
    /// The payload's main process ended; every other process of its namespace is gone.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// Helper -> stage factory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum ToFactory {
    /// Fork one idle stage.
    ForkOne,
}

/// Stage factory -> helper, one per [`ToFactory::ForkOne`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum FromFactory {
    /// A stage runs as `pid`; the message carries the helper's end of its socketpair and a
    /// pidfd of it.
    Forked { pid: i32 },
    /// No stage: the fork or the pidfd failed (a kernel before 5.3 has no pidfd_open).
    Failed { error: String },
}

/// Errors of the internal channels.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("the other end closed the channel")]
    Closed,
    #[error("the channel closed inside a message ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("a message of {0} bytes exceeds the limit of {MAX_MESSAGE} bytes")]
    TooLarge(usize),
    #[error("a message of the wrong shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl WireError {
    /// A read that timed out (the socket's SO_RCVTIMEO): the message may still come.
    pub fn timed_out(&self) -> bool {
        matches!(self, WireError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// As an io::Error, for callers whose error type only has room for one.
    pub fn into_io(self) -> io::Error {
        match self {
            WireError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

impl From<switch_wire::WireError> for WireError {
    fn from(e: switch_wire::WireError) -> Self {
        match e {
            switch_wire::WireError::Closed => WireError::Closed,
            switch_wire::WireError::TooLarge(n, _) => WireError::TooLarge(n),
            switch_wire::WireError::Json(e) => WireError::Json(e),
            switch_wire::WireError::Io(e) => WireError::Io(e),
            other @ switch_wire::WireError::Deadline(_) => WireError::Io(io::Error::other(other)),
        }
    }
}

/// Appends `msg` as one frame to `out`.
pub(crate) fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    serde_json::to_writer(&mut *out, msg)?;
    let len = out.len() - start - HEADER;
    if len > MAX_MESSAGE {
        out.truncate(start);
        return Err(WireError::TooLarge(len));
    }
    out[start..start + HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The first frame in `buf`: the message and how many bytes it took, or None while it is
/// incomplete. A header announcing more than [`MAX_MESSAGE`] is refused at once.
pub(crate) fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, WireError> {
    let Some(header) = buf.first_chunk::<HEADER>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    match buf.get(HEADER..HEADER + len) {
        Some(body) => Ok(Some((serde_json::from_slice(body)?, HEADER + len))),
        None => Ok(None),
    }
}

/// Sends `msg` with `fds` attached to its first byte, in one sendmsg (a single write
/// without descriptors).
pub(crate) fn send<T: Serialize>(
    channel: &UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), WireError> {
    if fds.is_empty() {
        return send_all(channel, std::slice::from_ref(msg));
    }
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut frame = Vec::new();
    encode(msg, &mut frame)?;
    let iov = [io::IoSlice::new(&frame)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let sent = loop {
        match sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        }
    };
    let mut w = channel;
    Ok(w.write_all(&frame[sent..])?)
}

/// Sends `msgs` in one write, so the other side wakes once for all of them.
pub(crate) fn send_all<T: Serialize>(channel: &UnixStream, msgs: &[T]) -> Result<(), WireError> {
    let mut out = Vec::new();
    for m in msgs {
        encode(m, &mut out)?;
    }
    let mut w = channel;
    Ok(w.write_all(&out)?)
}

/// Receives one message and the descriptors attached to it (close-on-exec). Blocks.
pub(crate) fn recv<T: DeserializeOwned>(
    channel: &mut UnixStream,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    let limits = ReadLimits {
        max_bytes: MAX_MESSAGE,
        ..ReadLimits::TRUSTED
    };
    Ok(switch_wire::read_frame_limited(channel, &limits)?)
}

/// The helper's reader of a stage's messages ([`FromStage`], which carry no descriptors):
/// buffered, so messages the stage sent in one write ([`send_all`]) cost one read, and the
/// caller can see whether the next one is already here ([`Events::has_message`]). A read that
/// times out keeps what arrived so far.
pub(crate) struct Events {
    channel: UnixStream,
    buf: Vec<u8>,
}

impl Events {
    pub fn new(channel: UnixStream) -> Self {
        Events {
            channel,
            buf: Vec::new(),
        }
    }

    /// The socket (for its read timeout, or a clone of it).
    pub fn channel(&self) -> &UnixStream {
        &self.channel
    }

    /// Whether a whole message is buffered, so [`Events::next`] returns without reading.
    pub fn has_message(&self) -> bool {
        matches!(
            decode::<serde::de::IgnoredAny>(&self.buf),
            Ok(Some(_)) | Err(_)
        )
    }

    /// The next message; blocks (up to the socket's read timeout).
    pub fn next(&mut self) -> Result<FromStage, WireError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((msg, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            match self.channel.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Err(WireError::Closed),
                Ok(0) => {
                    let want = self
                        .buf
                        .first_chunk::<HEADER>()
                        .map_or(HEADER, |h| HEADER + u32::from_be_bytes(*h) as usize);
                    return Err(WireError::Truncated {
                        got: self.buf.len(),
                        want,
                    });
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The byte that opens a gate: the read end of a pipe whose write end only the helper holds.
/// The *cgroup gate* opens once the payload cgroup exists with its limits (the stage joins it
/// after); the *exec gate* once the start record is on disk (the payload execs after). Closing
/// a gate without the byte withdraws the launch.
pub(crate) const GATE_OPEN: u8 = b'g';

/// Opens a gate (the helper). A stage that died meanwhile has closed its end: whoever waits
/// for the stage next reports that, so the write's error is not.
pub(crate) fn open_gate(mut gate: std::fs::File) {
    let _ = gate.write_all(&[GATE_OPEN]);
}

/// Why a gate did not open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GateError {
    #[error("the launch was withdrawn")]
    Withdrawn,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Blocks until `gate` opens (the stage); [`GateError::Withdrawn`] when it was closed
/// instead. (The payload's process, which cannot allocate, has its own reader in payload.rs.)
pub(crate) fn pass_gate(gate: &mut std::fs::File) -> Result<(), GateError> {
    let mut b = [0u8; 1];
    loop {
        match gate.read(&mut b) {
            Ok(1) if b[0] == GATE_OPEN => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
            _ => return Err(GateError::Withdrawn),
        }
    }
}

/// How long a waiter polls before it sleeps. Each launch passes a few bytes between the helper
/// and a stage that are due within a fraction of a millisecond (the plan after a wake-up, the
/// cgroup gate); a process that sleeps in the read is woken on another CPU, which on a virtual
/// machine costs more than the wait itself (docs/benchmarks.md, the wake-up analysis).
/// So the stage keeps its CPU for this long first. (Not the helper while it waits for
/// `started`: its thread would hold the CPU the stage and the payload need.) Bounded per
/// launch, and the poll yields between tries.
pub(crate) const SPIN_BUDGET: Duration = Duration::from_millis(1);

/// Returns once `fd` is readable or closed (or in error): true; or after [`SPIN_BUDGET`]:
/// false. The caller's read then takes the bytes or blocks for them.
pub(crate) fn spin_until_readable(fd: BorrowedFd<'_>) -> bool {
    let until = Instant::now() + SPIN_BUDGET;
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}

/// What a stage builds before its plan arrives: the namespaces and mounts that are the same
/// for every payload of this helper (site settings), and the Landlock ruleset. Passed as
/// arguments (`stage --network MODE --landlock yes|no --tmp-size-bytes N [--idle]`), so an
/// idle stage can do this work while nothing waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preparation {
    /// The network the payloads get: the site's, or loopback where the kernel cannot scope
    /// abstract sockets and the site chose that fallback (scope.rs).
    pub network: NetworkMode,
    /// Each payload becomes its own Landlock domain scoping abstract unix sockets and signals
    /// (scope.rs): the stage makes the ruleset before the plan, the payload's process enforces it.
    pub landlock: bool,
    /// Size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run/lock).
    pub tmp_size_bytes: u64,
}

impl Preparation {
    /// The stage's arguments after `stage`.
    pub fn args(&self) -> [String; 6] {
        [
            "--network".into(),
            self.network.as_str().into(),
            "--landlock".into(),
            if self.landlock { "yes" } else { "no" }.into(),
            "--tmp-size-bytes".into(),
            self.tmp_size_bytes.to_string(),
        ]
    }

    /// Parses the arguments after `stage`; also says whether `--idle` was given.
    pub(crate) fn parse(args: &[String]) -> Result<(Self, bool), String> {
        let mut network = None;
        let mut landlock = None;
        let mut tmp_size_bytes = None;
        let mut idle = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("stage argument {a} needs a value"))
            };
            match a.as_str() {
                "--network" => {
                    network = Some(match value()?.as_str() {
                        "host" => NetworkMode::Host,
                        "none" => NetworkMode::None,
                        "loopback" => NetworkMode::Loopback,
                        "pasta" => NetworkMode::Pasta,
                        other => {
                            return Err(format!(
                                "stage argument --network {other:?}: use host, none, loopback or pasta"
                            ))
                        }
                    })
                }
                "--landlock" => {
                    landlock = Some(match value()?.as_str() {
                        "yes" => true,
                        "no" => false,
                        other => {
                            return Err(format!("stage argument --landlock {other:?}: use yes or no"))
                        }
                    })
                }
                "--tmp-size-bytes" => {
                    let v = value()?;
                    tmp_size_bytes = Some(v.parse().map_err(|e| {
                        format!("stage argument --tmp-size-bytes {v:?}: {e} (use a byte count)")
                    })?)
                }
                "--idle" => idle = true,
                other => {
                    return Err(format!(
                        "unknown stage argument {other:?} (the helper passes --network, --landlock, --tmp-size-bytes and --idle)"
                    ))
                }
            }
        }
        match (network, landlock, tmp_size_bytes) {
            (Some(network), Some(landlock), Some(tmp_size_bytes)) => Ok((
                Preparation {
                    network,
                    landlock,
                    tmp_size_bytes,
                },
                idle,
            )),
            _ => Err(
                "the stage needs --network MODE, --landlock yes|no and --tmp-size-bytes N".into(),
            ),
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
