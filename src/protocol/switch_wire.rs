//! The local protocol between a pilot and the helper on `/run/mupilot/switch.sock`.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. A `launch` frame
//! carries file descriptors (SCM_RIGHTS on the frame's first byte): the payload's stdout
//! and stderr, files the pilot opened in its own work directory, so payload output never
//! passes through the helper and counts against the pilot's batch slot, and the input bundle
//! as a sealed memfd (never bytes inside the JSON). One connection per pilot; when it closes,
//! the helper kills that pilot's payloads (P10).
//!
//! The helper reads requests with [`ReadLimits`]: at most [`MAX_REQUEST_FRAME`] bytes, never
//! allocated from the announced length before the bytes arrive, and within deadlines.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::envelope::SignedEnvelope;

/// Largest frame a pilot accepts from the helper (output archives travel inside `exited`).
pub const MAX_FRAME: usize = 256 << 20;
/// Largest request the helper accepts from a pilot: control frames only (the bundle travels
/// as a descriptor), so an envelope (at most 1 MiB of base64) is the biggest part.
pub const MAX_REQUEST_FRAME: usize = 1 << 20;
/// Most descriptors one frame may carry (launch: stdout, stderr, bundle; glexec: stdin,
/// stdout, stderr and two proxy files; stage plan: two gates, the bundle, stdin and two
/// outputs).
pub const MAX_FDS: usize = 6;

/// What the pilot tells the helper about itself and its slot, once per connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PilotHello {
    pub pilot_id: String,
    /// The DN of the pilot's certificate, as the pilot reports it (for the audit record).
    #[serde(default)]
    pub pilot_dn: Option<String>,
    #[serde(default)]
    pub batch_system: Option<String>,
    #[serde(default)]
    pub batch_job_id: Option<String>,
    /// The slot the pilot discovered; the helper checks launches against it.
    #[serde(default)]
    pub slot_cores: Option<u32>,
    #[serde(default)]
    pub slot_memory_bytes: Option<u64>,
    #[serde(default)]
    pub slot_deadline_unix: Option<i64>,
}

/// Pilot -> helper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SwitchRequest {
    /// First frame on a connection.
    Hello(PilotHello),
    /// Run this payload. Carries two fds (stdout, stderr) or none (output discarded), plus
    /// the bundle's when the envelope names a digest.
    Launch {
        envelope: SignedEnvelope,
        /// Which of the frame's descriptors (0-based) is the input bundle: a memfd sealed
        /// against writes, growing and shrinking ([`sealed_memfd`]). The stdout and stderr
        /// descriptors are the others, in that order.
        #[serde(default)]
        bundle_fd: Option<usize>,
    },
    /// Send a signal to a running payload of this pilot (the whole payload cgroup).
    Signal {
        payload_id: String,
        signal: i32,
        #[serde(default)]
        reason: Option<String>,
    },
    /// List this pilot's running payloads with their usage so far (the pilot asks once per
    /// heartbeat round for all of them; the helper answers about this connection's only).
    Status,
    /// Relay an operator command (cancel, signal, information) signed by the VO server for one
    /// of this pilot's payloads; the helper authorizes the requester named in it.
    Command {
        command: super::command::SignedCommand,
    },
    /// The envelope carries `credential` (the owner delegated a proxy to the VO server): the
    /// helper verifies the envelope as for a launch, without spending its nonce, makes the
    /// payload's key pair (kept for this connection only, never shown to the pilot) and
    /// answers `proxy_csr`, or `denied` (final, as for a launch).
    ProxyRequest { envelope: SignedEnvelope },
    /// `launch` for an envelope with `credential`: `chain_pem` is what the VO server issued
    /// for the `proxy_csr` of this envelope (`protocol::delegation::IssuedProxy`).
    LaunchWithProxy {
        envelope: SignedEnvelope,
        #[serde(default)]
        bundle_fd: Option<usize>,
        chain_pem: String,
    },
    /// A fresh key and CSR to renew the proxy of a running payload of this pilot: answered
    /// `proxy_csr` or `proxy_refused`.
    ProxyRenew { payload_id: String },
    /// The chain the VO server issued for the renewal CSR: the helper verifies it and replaces
    /// the payload's proxy file; answered `proxy_delivered` or `proxy_refused`.
    ProxyRenewed {
        payload_id: String,
        chain_pem: String,
    },
    /// gLExec-compatible entry (`mupilot-glexec`): run a command as the owner of a proxy the
    /// caller holds. Not a VO envelope: the helper verifies the proxy against its `[grid]`
    /// table and runs it only when switch.toml's `[glexec]` table enables it. Answered like a
    /// launch (`started` then `exited`, or `denied`).
    Glexec(GlexecRequest),
    /// Site admin (peer uid 0 only, sent as the first frame instead of `hello`): kill every
    /// running payload of `owner_dn` on this node, and with `ban` refuse that DN from now on.
    /// Answered by `killed` (or `error`).
    AdminKill {
        owner_dn: String,
        #[serde(default)]
        ban: bool,
    },
}

/// A `glexec` request. The proxy files travel as descriptors the caller opened (so the
/// helper never opens a path the pilot names, and checks owner and mode on the open file);
/// each `*_fd` is an index into the frame's descriptors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlexecRequest {
    /// The command and its arguments (looked up in the payload's PATH).
    pub argv: Vec<String>,
    /// The caller's environment; the helper keeps only what gLExec kept (`GLEXEC_*`, `TZ`)
    /// and the names the site lists in `glexec.preserve_env`.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// GLEXEC_CLIENT_CERT: the proxy (with its private key) naming the user to run as.
    pub client_cert_fd: usize,
    /// GLEXEC_SOURCE_PROXY when it is another file: the proxy delivered to the payload
    /// (default: the client certificate's file).
    #[serde(default)]
    pub source_proxy_fd: Option<usize>,
    /// The payload's stdin (read end: a pipe or a regular file), stdout and stderr (a pipe or a
    /// regular file opened for writing); absent: /dev/null.
    #[serde(default)]
    pub stdin_fd: Option<usize>,
    #[serde(default)]
    pub stdout_fd: Option<usize>,
    #[serde(default)]
    pub stderr_fd: Option<usize>,
}

/// Why a payload was not run. A denial is final: the pilot reports it, never retries locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialClass {
    /// The request itself is wrong: bad signature, expired, replayed, digest mismatch, slot exceeded.
    Caller,
    /// The helper could not do its part: cgroup, account, disk.
    System,
    /// A local authorization decision said no: ban, policy, no mapping, expired membership.
    Authorization,
}

impl DenialClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::System => "system",
            Self::Authorization => "authorization",
        }
    }
}

/// One running payload, as `status` and `information` report it. The fields after `cgroup`
/// are absent from helpers before live usage (and `processes` from `status` answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningPayload {
    pub payload_id: String,
    pub account: String,
    pub uid: u32,
    pub pid: i32,
    pub cgroup: String,
    /// When the helper wrote its start record (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Read from its cgroup as the helper answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<PayloadUsage>,
    /// What the envelope reserved for it: cores and memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// How many processes its cgroup holds (`information` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
}

/// A running payload's resource use so far, from its cgroup (`cgroups::LiveUsage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadUsage {
    /// CPU time of all its processes so far.
    pub cpu_seconds: f64,
    /// Memory charged to its cgroup now.
    pub memory_bytes: u64,
    /// The most memory ever charged to it; absent on cgroup v2 kernels before 5.19, which
    /// keep no peak (`memory.peak`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

#[cfg(feature = "switch")]
impl From<crate::cgroups::LiveUsage> for PayloadUsage {
    fn from(u: crate::cgroups::LiveUsage) -> Self {
        PayloadUsage {
            cpu_seconds: u.cpu_seconds,
            memory_bytes: u.memory_bytes,
            peak_memory_bytes: u.peak_memory_bytes,
        }
    }
}

/// How a payload ended, with what it used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Exit code when the payload's main process exited normally.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Signal number when it was killed by a signal.
    #[serde(default)]
    pub signal: Option<i32>,
    pub cpu_seconds: f64,
    /// The most memory its cgroup was ever charged; absent where the kernel keeps no peak
    /// (cgroup v2 before Linux 5.19), never a 0 that would read as "used nothing".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    pub wall_seconds: f64,
    /// Why the helper or the kernel ended it: `oom`, `walltime`, `pilot_request`, `pilot_gone`, ...
    #[serde(default)]
    pub kill_reason: Option<String>,
    /// base64 of a tar.gz of the declared outputs that existed (regular files and directories only).
    #[serde(default)]
    pub outputs: Option<String>,
    /// Outputs that were skipped, and why (symlink, too large, missing).
    #[serde(default)]
    pub outputs_skipped: Vec<String>,
}

/// Helper -> pilot. (No `deny_unknown_fields`: newer helpers may add fields, and serde does
/// not combine it with the flattened exit report.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SwitchEvent {
    /// Answer to `hello`.
    Welcome {
        /// The helper's node name (switch.toml `node_name`, the kernel's host name by
        /// default); envelopes are accepted only when bound to it.
        host: String,
        helper_version: String,
    },
    /// The payload runs.
    Started {
        payload_id: String,
        account: String,
        uid: u32,
        gid: u32,
        pid: i32,
        cgroup: String,
        scratch: String,
    },
    /// The payload was not run, and will not be.
    Denied {
        /// Empty when the envelope could not be read at all.
        payload_id: String,
        class: DenialClass,
        reason: String,
    },
    /// The payload ended.
    Exited {
        payload_id: String,
        #[serde(flatten)]
        report: ExitReport,
    },
    /// Answer to `signal`.
    Signalled {
        payload_id: String,
        ok: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Answer to `status`.
    Running { payloads: Vec<RunningPayload> },
    /// Answer to `command`: whether it was authorized and carried out.
    CommandDone {
        payload_id: String,
        action: super::command::CommandAction,
        requester: String,
        ok: bool,
        /// Why not, or what was done.
        reason: String,
        /// For `information`: the payload's state so far (boxed: the other events stay small).
        #[serde(default)]
        information: Option<Box<RunningPayload>>,
        /// The command's nonce, so the pilot can tell which request this answers (absent
        /// when the helper could not read the command, and from older helpers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// Answer to `proxy_request` and `proxy_renew`: the PEM certificate request for the
    /// payload's new key, to relay to `POST /v1/payloads/{id}/proxy`.
    ProxyCsr { payload_id: String, csr_pem: String },
    /// Answer to `proxy_renewed`: the payload's proxy file now holds the new proxy.
    ProxyDelivered {
        payload_id: String,
        /// The new proxy's serial (lower-case hex) and the credential's not-after.
        serial: String,
        not_after: String,
    },
    /// Answer to `proxy_renew` or `proxy_renewed`: no renewal, and why. The payload keeps
    /// running with the proxy it has.
    ProxyRefused { payload_id: String, reason: String },
    /// Answer to `admin_kill`: the payload ids that were killed (empty: none was running).
    Killed { payloads: Vec<String> },
    /// The request could not be understood; the connection stays usable.
    Error { reason: String },
}

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("{0}")]
    Deadline(String),
    #[error("frame is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Writes one frame, attaching `fds` to its first byte.
pub fn write_frame<T: Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), WireError> {
    write_frame_to(stream, msg, fds)
}

/// [`write_frame`] through a shared reference (a socket needs no exclusive access to be
/// written; the accept loop answers refused callers this way).
pub fn write_frame_to<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len(), MAX_FRAME));
    }
    let header = (body.len() as u32).to_be_bytes();
    if fds.is_empty() {
        let mut buf = Vec::with_capacity(4 + body.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&body);
        let mut w = stream;
        w.write_all(&buf)?;
    } else {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let iov = [io::IoSlice::new(&header)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let mut sent = loop {
            match sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        };
        let mut w = stream;
        while sent < header.len() {
            sent += w.write(&header[sent..])?;
        }
        w.write_all(&body)?;
    }
    Ok(())
}

/// What a reader accepts: the largest frame and how long the sender may take.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub max_bytes: usize,
    /// The whole frame must have arrived by then (the helper: hello within N s of connect).
    pub deadline: Option<Instant>,
    /// Once its first byte arrived, a frame must be complete within this (a pilot may stay
    /// idle between frames for its whole life, but never hold a frame half-sent).
    pub frame_time: Option<Duration>,
}

impl ReadLimits {
    /// No deadline, frames up to [`MAX_FRAME`]: a pilot reading the helper's events, a stage
    /// reading its plan.
    pub const TRUSTED: ReadLimits = ReadLimits {
        max_bytes: MAX_FRAME,
        deadline: None,
        frame_time: None,
    };
}

/// Reads one frame and the descriptors that came with it (no deadline, [`MAX_FRAME`]).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    read_frame_limited(stream, &ReadLimits::TRUSTED)
}

/// Reads one frame within `limits`. The body grows as its bytes arrive, so an announced
/// length costs nothing until the sender really sends that much; a length above
/// `limits.max_bytes` is refused before any of the body is read. Deadlines are kept with
/// poll(2) only when a read would block: a frame that arrived whole costs no extra call.
#[allow(unsafe_code)] // owning the descriptors SCM_RIGHTS installed
pub fn read_frame_limited<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
    limits: &ReadLimits,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    use nix::sys::socket::{recv, recvmsg, ControlMessageOwned, MsgFlags};
    let mut header = [0u8; 4];
    let mut fds = Vec::new();
    let mut got = 0;
    // Until the first byte: the caller's deadline only; after it, the frame's too.
    let mut until = limits.deadline;
    while got < header.len() {
        if until.is_some() {
            wait_readable(stream, until, got > 0, limits)?;
        }
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [io::IoSliceMut::new(&mut header[got..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                for fd in received {
                    // SAFETY: the kernel just installed `fd` in our table for us (SCM_RIGHTS);
                    // nothing else owns it, so taking ownership here is the only reference.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if n == 0 {
            return Err(WireError::Closed);
        }
        if got == 0 {
            if let Some(t) = limits.frame_time {
                let frame_end = Instant::now() + t;
                until = Some(until.map_or(frame_end, |u| u.min(frame_end)));
            }
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > limits.max_bytes {
        return Err(WireError::TooLarge(len, limits.max_bytes));
    }
    let mut body = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        // Without a deadline a plain blocking read (it keeps any SO_RCVTIMEO the caller set).
        let flags = if until.is_some() {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        match recv(stream.as_raw_fd(), &mut chunk[..want], flags) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) if until.is_some() => {
                wait_readable(stream, until, true, limits)?
            }
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    Ok((serde_json::from_slice(&body)?, fds))
}

/// Waits until `stream` has something to read, at most until `until` (none: no limit).
fn wait_readable(
    stream: &UnixStream,
    until: Option<Instant>,
    begun: bool,
    limits: &ReadLimits,
) -> Result<(), WireError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let timeout = match until {
            None => PollTimeout::NONE,
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(late(begun, limits));
                }
                // Rounded up, so a wait never ends just before the deadline.
                let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue, // the deadline check above ends it
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
}

fn late(begun: bool, limits: &ReadLimits) -> WireError {
    WireError::Deadline(match (begun, limits.frame_time) {
        (true, Some(t)) => format!(
            "a frame was begun but not completed within {} s; send each frame whole",
            t.as_secs()
        ),
        _ => "no complete request arrived in time (hello is due right after connecting)".into(),
    })
}

/// Reads a file from its start by position (pread), never through the file offset, which a
/// descriptor received over SCM_RIGHTS shares with the sender's.
pub struct ReadAt<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    pub fn new(file: &'a std::fs::File) -> Self {
        ReadAt { file, pos: 0 }
    }
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A memfd holding `bytes`, sealed against writing, growing, shrinking and further seals, so
/// a receiver can check it once and trust it after. Its pages are charged to the cgroup of
/// the process that writes them (the pilot's, P7), not to the receiver's.
#[allow(unsafe_code)] // memfd_create(2) and F_ADD_SEALS
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: memfd_create with a NUL-terminated name we own and constant flags; the result
    // is checked and owned below.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor memfd_create just returned to us and nobody else holds.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own with an integer argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn frames_roundtrip_with_fds() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let req = SwitchRequest::Signal {
            payload_id: "p1".into(),
            signal: 15,
            reason: None,
        };
        write_frame(&mut a, &req, &[f.as_fd().as_raw_fd(), f.as_raw_fd()]).unwrap();
        write_frame(&mut a, &SwitchRequest::Status, &[]).unwrap();
        let (got, fds): (SwitchRequest, _) = read_frame(&mut b).unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 2);
        let (got2, fds2): (SwitchRequest, _) = read_frame(&mut b).unwrap();
        assert_eq!(got2, SwitchRequest::Status);
        assert!(fds2.is_empty());
        drop(a);
        assert!(matches!(
            read_frame::<SwitchRequest>(&mut b),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn limited_reads_refuse_long_frames_and_late_ones() {
        use std::io::Write;
        let limits = ReadLimits {
            max_bytes: MAX_REQUEST_FRAME,
            deadline: None,
            frame_time: Some(Duration::from_millis(200)),
        };
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(200u32 << 20).to_be_bytes()).unwrap();
        assert!(matches!(
            read_frame_limited::<SwitchRequest>(&mut b, &limits),
            Err(WireError::TooLarge(209715200, MAX_REQUEST_FRAME))
        ));
        // A frame in two parts within the deadline, then one left half-sent.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let body = serde_json::to_vec(&SwitchRequest::Status).unwrap();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        a.write_all(&frame[..6]).unwrap();
        let rest = frame[6..].to_vec();
        let mut a2 = a.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            a2.write_all(&rest).unwrap();
        });
        let (got, _) = read_frame_limited::<SwitchRequest>(&mut b, &limits).unwrap();
        assert_eq!(got, SwitchRequest::Status);
        t.join().unwrap();
        a.write_all(&frame[..6]).unwrap();
        let started = Instant::now();
        let e = read_frame_limited::<SwitchRequest>(&mut b, &limits).unwrap_err();
        assert!(matches!(e, WireError::Deadline(_)), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        // A deadline before the first byte (hello).
        let (_a, mut b) = UnixStream::pair().unwrap();
        let hello = ReadLimits {
            deadline: Some(Instant::now() + Duration::from_millis(100)),
            ..limits
        };
        let e = read_frame_limited::<SwitchRequest>(&mut b, &hello).unwrap_err();
        assert!(e.to_string().contains("hello is due"), "{e}");
    }

    #[test]
    fn event_json_shape() {
        let ev = SwitchEvent::Denied {
            payload_id: "p".into(),
            class: DenialClass::Authorization,
            reason: "no mapping".into(),
        };
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            s,
            r#"{"type":"denied","payload_id":"p","class":"authorization","reason":"no mapping"}"#
        );
    }

    #[test]
    fn an_unknown_peak_is_absent_not_zero() {
        let exited = |peak| SwitchEvent::Exited {
            payload_id: "p".into(),
            report: ExitReport {
                exit_code: Some(0),
                peak_memory_bytes: peak,
                ..Default::default()
            },
        };
        let unknown = serde_json::to_string(&exited(None)).unwrap();
        assert!(!unknown.contains("peak_memory_bytes"), "{unknown}");
        assert_eq!(
            serde_json::from_str::<SwitchEvent>(&unknown).unwrap(),
            exited(None)
        );
        // What helpers before this field was optional send: always a number.
        let older = r#"{"type":"exited","payload_id":"p","exit_code":0,"cpu_seconds":1.5,"peak_memory_bytes":4096,"wall_seconds":2.0}"#;
        let SwitchEvent::Exited { report, .. } = serde_json::from_str(older).unwrap() else {
            panic!("not an exit")
        };
        assert_eq!(report.peak_memory_bytes, Some(4096));
    }
}
