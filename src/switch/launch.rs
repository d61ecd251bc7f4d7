//! The launch path, in the order the checks must happen: which VO key, signature and validity
//! window, replay, bundle digest, membership, authorization, mapping, account, slot, output
//! descriptors, sandbox, start record, exec. Each failure is a distinct [`LaunchError`] variant
//! with its [`DenialClass`]. Nothing is launched without a permit, and never as the pilot's
//! uid; no payload code runs before its nonce and its start record are on disk.
//!
//! Must not write to the pilot's connection: the caller answers (`started` or `denied`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::Utc;

use super::accounts::{AccountError, AccountRules};
use super::audit::{argv_sha256, AuditEvent, AuditRecord};
use super::authorize::{AuthzError, AuthzRequest};
use super::daemon::Helper;
use super::peer::{Peer, PeerError};
use super::proxy::{LaunchProxy, ProxyError};
use super::registry::{Ask, SlotError};
use super::replay::ReplayError;
use super::sandbox::cgroup::PilotCgroups;
use super::sandbox::{self, Account, Handle, LaunchPlan, Running, SandboxError};
use crate::protocol::envelope::{EnvelopeBody, EnvelopeError, Expect, Owner, VerifiedEnvelope};
use crate::protocol::switch_wire::{DenialClass, PilotHello};
use crate::protocol::SignedEnvelope;
use crate::records::RecordError;

/// The pilot on the other end of a connection, as the kernel and its hello describe it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub conn_id: u64,
    pub uid: u32,
    pub pid: i32,
    pub hello: PilotHello,
    /// The process that connected, held by a pidfd.
    pub peer: Arc<Peer>,
    /// Its cgroups, read at hello; payloads go below them. None before hello.
    pub cgroups: Option<PilotCgroups>,
}

/// Why a payload was not launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("envelope cannot be read: {0}")]
    Unreadable(EnvelopeError),
    #[error("VO '{vo}' is not configured on this site (no [[vo]] for it in {config})")]
    UnknownVo { vo: String, config: String },
    #[error("{0}")]
    Envelope(EnvelopeError),
    #[error("envelope nonce '{nonce}' was used before: replayed envelope")]
    Replayed { nonce: String },
    #[error("{0}")]
    ReplayCache(ReplayError),
    #[error("the envelope names bundle sha256 {expected} but no bundle came with the launch")]
    BundleMissing { expected: String },
    #[error("a bundle came with the launch but the envelope names none")]
    BundleUnexpected,
    #[error("bundle descriptor: {0}")]
    BundleDescriptor(String),
    #[error("bundle of {size} bytes exceeds this site's limit of {max} bytes (limits.bundle_max_bytes in {config})")]
    BundleTooLarge { size: u64, max: u64, config: String },
    #[error("{0}")]
    Peer(PeerError),
    #[error("bundle sha256 {got} does not match the envelope's bundle_sha256 {expected}")]
    BundleDigest { expected: String, got: String },
    #[error("VO membership of \"{dn}\" in '{vo}' expired at {until}")]
    MembershipExpired {
        dn: String,
        vo: String,
        until: String,
    },
    #[error("{0}")]
    Authz(AuthzError),
    #[error("{0}")]
    Account(AccountError),
    #[error("{0}")]
    Slot(SlotError),
    #[error("launch carried {0} descriptors; send two (stdout, stderr) or none")]
    FdCount(usize),
    #[error("{which} descriptor is {kind}; pass a regular file or a pipe (opened for writing; stdin: for reading)")]
    OutputFd { which: &'static str, kind: String },
    #[error("sandbox: {0}")]
    Sandbox(SandboxError),
    #[error("cannot write the start record to the audit log ({0}); the payload was stopped")]
    Audit(RecordError),
    /// The sandbox failed after the start record was written (an end record closes it).
    #[error("sandbox: {0}")]
    SandboxAfterStart(SandboxError),
    /// The owner's delegated proxy: missing, refused, or not deliverable.
    #[error("{0}")]
    Proxy(ProxyError),
}

impl LaunchError {
    /// Who is to blame, as the pilot and the VO server see it.
    pub fn class(&self) -> DenialClass {
        use LaunchError::*;
        match self {
            Unreadable(_) | UnknownVo { .. } | Envelope(_) | Replayed { .. } => DenialClass::Caller,
            BundleMissing { .. }
            | BundleUnexpected
            | BundleDescriptor(_)
            | BundleTooLarge { .. }
            | BundleDigest { .. } => DenialClass::Caller,
            Peer(_) => DenialClass::Caller,
            Slot(_) | FdCount(_) | OutputFd { .. } => DenialClass::Caller,
            MembershipExpired { .. } => DenialClass::Authorization,
            Authz(e) if e.is_system() => DenialClass::System,
            Authz(_) => DenialClass::Authorization,
            Account(AccountError::Unknown { .. }) | Account(AccountError::Lookup { .. }) => {
                DenialClass::System
            }
            Account(_) => DenialClass::Authorization,
            Sandbox(SandboxError::Bundle { .. })
            | SandboxAfterStart(SandboxError::Bundle { .. }) => DenialClass::Caller,
            ReplayCache(_) | Sandbox(_) | Audit(_) | SandboxAfterStart(_) => DenialClass::System,
            Proxy(e) => e.class(),
        }
    }

    /// True when the audit log already holds this launch's start and end records, so the
    /// caller writes no `denied` record for it.
    pub fn recorded_as_end(&self) -> bool {
        matches!(self, LaunchError::SandboxAfterStart(_))
    }
}

/// A payload that runs: the caller supervises it.
pub struct Started {
    pub payload_id: String,
    pub account: Account,
    pub handle: Handle,
    pub running: Running,
    /// The start record (written), the base of the end record.
    pub record: AuditRecord,
}

/// The payload id an unverified envelope claims, only to label a denial for the pilot that
/// sent it ("" when unreadable or not a safe id).
pub fn claimed_payload_id(env: &SignedEnvelope) -> String {
    #[derive(serde::Deserialize)]
    struct Claim {
        payload_id: String,
    }
    B64.decode(&env.body)
        .ok()
        .and_then(|b| serde_json::from_slice::<Claim>(&b).ok())
        .map(|c| c.payload_id)
        .filter(|id| crate::util::is_safe_id(id))
        .unwrap_or_default()
}

/// Removes a reservation unless the payload started.
struct Reservation<'a> {
    helper: &'a Helper,
    payload_id: String,
    committed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.helper.registry.remove(&self.payload_id);
        }
    }
}

/// Runs every check and, when all pass, starts the payload. `rec` is filled as facts become
/// known, so the caller's denial record says as much as was established.
pub fn launch(
    helper: &Helper,
    caller: &Caller,
    envelope: &SignedEnvelope,
    bundle_fd: Option<usize>,
    mut fds: Vec<OwnedFd>,
    proxy: Option<LaunchProxy<'_>>,
    rec: &mut AuditRecord,
) -> Result<Started, LaunchError> {
    rec.payload_id = Some(claimed_payload_id(envelope)).filter(|s| !s.is_empty());
    rec.envelope_sha256 = envelope.digest().ok();

    // 0. The process that connected (and said hello) is still there and still the caller's:
    //    its cgroups, pinned at hello, are the batch job's the payload goes into (P7).
    caller
        .peer
        .check_still_caller()
        .map_err(LaunchError::Peer)?;
    if caller.cgroups.is_none() {
        return Err(LaunchError::Peer(PeerError::Gone { pid: caller.pid }));
    }
    let bundle_fd = match bundle_fd {
        None => None,
        Some(i) if i < fds.len() => Some(fds.remove(i)),
        Some(i) => {
            return Err(LaunchError::BundleDescriptor(format!(
                "bundle_fd {i} names no descriptor of this launch ({} came)",
                fds.len()
            )))
        }
    };

    let now = Utc::now();
    let verified = verify_envelope(helper, caller, envelope, rec, now)?;
    let body = verified.body();

    // c. Replay: the nonce is consumed now, whatever happens next (a denial is final). It is
    //    on disk before the payload may run (step j).
    let nonce_synced = helper
        .replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check_and_insert_unsynced(&body.owner.vo, &body.nonce, body.not_after)
        .map_err(LaunchError::ReplayCache)?
        .ok_or_else(|| LaunchError::Replayed {
            nonce: body.nonce.clone(),
        })?;

    // d. The bundle is present exactly when the envelope names one, and matches it.
    let bundle = match (&body.bundle_sha256, bundle_fd) {
        (None, None) => None,
        (None, Some(_)) => return Err(LaunchError::BundleUnexpected),
        (Some(expected), None) => {
            return Err(LaunchError::BundleMissing {
                expected: expected.clone(),
            })
        }
        (Some(expected), Some(fd)) => {
            let got = bundle_digest(&fd, helper)?;
            if &got != expected {
                return Err(LaunchError::BundleDigest {
                    expected: expected.clone(),
                    got,
                });
            }
            Some(Arc::new(fd))
        }
    };

    // d2. The owner's proxy (issue 17): an envelope with `credential` runs only with a proxy
    //     for the key this helper made for it, verified against `[grid]` for the envelope's
    //     owner DN and VO; its FQANs are the ones the decision below sees. Nothing for an
    //     envelope without one.
    let delivery =
        super::proxy::for_launch(helper, body, proxy, now).map_err(LaunchError::Proxy)?;
    let decided_body;
    let decided = match &delivery {
        None => body,
        Some(d) => {
            d.note(rec);
            decided_body = EnvelopeBody {
                owner: Owner {
                    fqans: d.fqans.clone(),
                    ..body.owner.clone()
                },
                ..body.clone()
            };
            &decided_body
        }
    };

    // e. Membership (P3): the VO vouches for it until this time only.
    if body.owner.membership_valid_until < now {
        return Err(LaunchError::MembershipExpired {
            dn: body.owner.dn.clone(),
            vo: body.owner.vo.clone(),
            until: body.owner.membership_valid_until.to_rfc3339(),
        });
    }

    // i. Output descriptors (checked before anything is decided for them), then the
    //    steps every verified request shares.
    let (stdout, stderr) = output_fds(fds)?;
    launch_verified(
        helper,
        caller,
        Verified {
            body: decided,
            bundle,
            stdio: [None, stdout, stderr],
            nonce: Some(nonce_synced),
            delivery,
        },
        now,
        rec,
    )
}

/// A request whose origin was verified (a VO envelope, or a gLExec request's proxy): what the
/// shared steps from the local decision on need.
pub(super) struct Verified<'a> {
    /// The payload as the VO signed it, or as the helper built it from a verified proxy.
    pub body: &'a EnvelopeBody,
    pub bundle: Option<Arc<OwnedFd>>,
    /// stdin, stdout, stderr (each checked by the caller; None: /dev/null).
    pub stdio: [Option<OwnedFd>; 3],
    /// The replay-cache entry to make durable before the payload may exec (envelopes only).
    pub nonce: Option<crate::records::PendingSync>,
    /// The owner's verified proxy (an envelope's delegated one, for the key this helper
    /// made; or a gLExec request's source proxy): written into the scratch before the payload
    /// may start (`proxy::deliver`, the one writer), its variables in the payload's
    /// environment.
    pub delivery: Option<super::proxy::Delivery>,
}

/// The steps every verified request shares, in order: the local decision and the mapping,
/// the account, the slot, the sandbox, the start record (with the replay entry) on disk, exec.
pub(super) fn launch_verified(
    helper: &Helper,
    caller: &Caller,
    v: Verified<'_>,
    now: chrono::DateTime<Utc>,
    rec: &mut AuditRecord,
) -> Result<Started, LaunchError> {
    let Verified {
        body,
        bundle,
        stdio: [stdin, stdout, stderr],
        nonce: nonce_synced,
        delivery,
    } = v;
    let Some(pilot_cgroups) = caller.cgroups.clone() else {
        return Err(LaunchError::Peer(PeerError::Gone { pid: caller.pid }));
    };

    // f. + g. The local decision and the mapping (P5, P6).
    let permit = helper
        .authz
        .decide(
            &AuthzRequest {
                body,
                pilot_uid: caller.uid,
                pilot_dn: caller.hello.pilot_dn.as_deref(),
            },
            &|account| helper.registry.account_in_use(account),
        )
        .map_err(LaunchError::Authz)?;
    rec.account = Some(permit.account.clone());
    let account = helper
        .accounts
        .resolve(
            &permit.account,
            &AccountRules {
                min_uid: helper.cfg.min_uid,
                pilot_uid: caller.uid,
                pilot_uids: &helper.allowed_uids,
            },
        )
        .map_err(LaunchError::Account)?;
    // The one rule that must hold whatever any step above decided.
    assert!(account.uid != 0 && account.uid != caller.uid);
    rec.uid = Some(account.uid);
    rec.gid = Some(account.gid);

    // h. The pilot's slot, minus what its running payloads hold.
    helper
        .registry
        .reserve(
            caller.conn_id,
            &body.payload_id,
            Ask {
                cores: body.resources.cores,
                memory_bytes: body.resources.memory_bytes,
                walltime_seconds: body.resources.walltime_seconds,
            },
            &caller.hello,
            &account,
            now.timestamp(),
        )
        .map_err(LaunchError::Slot)?;
    let mut reservation = Reservation {
        helper,
        payload_id: body.payload_id.clone(),
        committed: false,
    };

    // i. The sandbox.
    let plan = LaunchPlan {
        payload_id: body.payload_id.clone(),
        account: account.clone(),
        argv: body.argv.clone(),
        env: match &delivery {
            None => body.env.clone(),
            Some(d) => body.env.clone().into_iter().chain(d.env.clone()).collect(),
        },
        cores: body.resources.cores,
        memory_bytes: body.resources.memory_bytes,
        walltime_seconds: body.resources.walltime_seconds,
        pilot: pilot_cgroups,
        bundle,
        outputs: body.outputs.clone(),
        stdin: stdin.map(Arc::new),
    };
    let mut starting = sandbox::begin(&helper.cfg.sandbox, &helper.stages, plan, stdout, stderr)
        .map_err(LaunchError::Sandbox)?;
    // The proxy goes into the new scratch before the stage may go on (it unpacks the bundle
    // after the cgroup gate, below): the payload never starts without it. The start record
    // is its delivery record (proxy_serial, proxy_not_after, the verified fqans).
    if let Some(d) = &delivery {
        super::proxy::deliver(starting.scratch(), account.uid, account.gid, &d.file)
            .map_err(LaunchError::Proxy)?;
    }

    // j. While the stage builds the scratch view: the nonce goes to disk (on the sync
    //    thread) while the payload cgroup is created here; then the start record is written
    //    and synced. Until both are on disk the payload waits at the exec gate; an error here
    //    withdraws it (dropping `starting` kills the stage and removes what was made), and
    //    after the start record an end record closes it.
    let nonce_synced = nonce_synced.map(|n| n.start());
    starting.create_cgroup().map_err(LaunchError::Sandbox)?;
    let mut start = rec.clone();
    start.time = crate::records::now_rfc3339();
    start.event = Some(AuditEvent::Start);
    start.decision = Some("permit");
    start.reason = Some(format!("mapped by {}", permit.mapped_by));
    start.cgroup = Some(starting.cgroup());
    start.scratch = Some(starting.scratch().display().to_string());
    start.start = Some(start.time.clone());
    let pending = helper
        .audit
        .append_unsynced(&start)
        .map_err(LaunchError::Audit)?;
    let durable = pending.wait().map_err(LaunchError::Audit).and_then(|()| {
        nonce_synced.map_or(Ok(()), |n| {
            n.wait()
                .map_err(|e| LaunchError::ReplayCache(super::replay::ReplayError::from_sync(e)))
        })
    });
    if let Err(e) = durable {
        helper
            .audit
            .append_or_log(&end_without_run(&start, "audit_failed", &e.to_string()));
        return Err(e);
    }

    // k. The payload may exec.
    let running = match starting.release() {
        Ok(r) => r,
        Err(e) => {
            // The start record is on disk: an end record closes it.
            helper.audit.append_or_log(&end_without_run(
                &start,
                "setup_failed",
                &format!("sandbox: {e}"),
            ));
            return Err(LaunchError::SandboxAfterStart(e));
        }
    };
    let handle = running.handle.clone();
    helper.registry.set_running(
        &body.payload_id,
        handle.clone(),
        start.clone(),
        body.clone(),
    );
    reservation.committed = true;
    Ok(Started {
        payload_id: body.payload_id.clone(),
        account,
        handle,
        running,
        record: start,
    })
}

/// `proxy_request`: the envelope checked as for a launch (steps a and b, and the replay check
/// without spending the nonce), then a key made for the payload and kept in `keys`. Returns
/// the payload id and the CSR.
#[cfg(feature = "grid")]
pub fn proxy_csr(
    helper: &Helper,
    caller: &Caller,
    envelope: &SignedEnvelope,
    keys: &mut super::proxy::keys::PendingKeys,
    rec: &mut AuditRecord,
) -> Result<(String, String), LaunchError> {
    rec.payload_id = Some(claimed_payload_id(envelope)).filter(|s| !s.is_empty());
    let verified = verify_envelope(helper, caller, envelope, rec, Utc::now())?;
    let body = verified.body();
    let seen = helper
        .replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&body.owner.vo, &body.nonce);
    if seen {
        return Err(LaunchError::Replayed {
            nonce: body.nonce.clone(),
        });
    }
    if body.credential.is_none() {
        return Err(LaunchError::Proxy(ProxyError::NotDelegated));
    }
    if helper.verifier.is_none() {
        return Err(LaunchError::Proxy(ProxyError::NoGrid {
            config: helper.cfg.path.display().to_string(),
        }));
    }
    let purpose = super::proxy::keys::Purpose::Launch(verified.digest().to_string());
    let csr = keys
        .request(&helper.key_pool, &body.payload_id, purpose)
        .map_err(LaunchError::Proxy)?;
    Ok((body.payload_id.clone(), csr))
}

/// Steps a and b of a launch, also the first of `proxy_request`: the VO the envelope claims
/// selects the key (nothing else is read unverified), then signature, format, validity window
/// and the binding to this node and this pilot. Fills `rec` with what the envelope says.
fn verify_envelope(
    helper: &Helper,
    caller: &Caller,
    envelope: &SignedEnvelope,
    rec: &mut AuditRecord,
    now: chrono::DateTime<Utc>,
) -> Result<VerifiedEnvelope, LaunchError> {
    // a. The VO the envelope claims selects the key; nothing else is read unverified.
    let vo_name = envelope.claimed_vo().map_err(LaunchError::Unreadable)?;
    rec.vo = Some(vo_name.clone());
    let vo = helper
        .cfg
        .vo(&vo_name)
        .ok_or_else(|| LaunchError::UnknownVo {
            vo: vo_name.clone(),
            config: helper.cfg.path.display().to_string(),
        })?;

    // b. Signature, format, validity window (its length within the site's maximum, now
    //    inside it) and the binding to this node and this pilot: an envelope runs once, on
    //    the node of the pilot it was matched to.
    let verified = envelope
        .verify(
            &vo.key,
            &Expect {
                now,
                node: &helper.cfg.node_name,
                pilot_id: &caller.hello.pilot_id,
                max_validity: chrono::Duration::seconds(
                    helper.cfg.max_envelope_validity_seconds as i64,
                ),
            },
        )
        .map_err(LaunchError::Envelope)?;
    let body = verified.body();
    rec.payload_id = Some(body.payload_id.clone());
    rec.owner_dn = Some(body.owner.dn.clone());
    rec.fqans = Some(body.owner.fqans.clone());
    rec.jobtag = body.jobtag.clone();
    rec.argv_sha256 = Some(argv_sha256(&body.argv));
    rec.bundle_sha256 = body.bundle_sha256.clone();
    rec.envelope_sha256 = Some(verified.digest().to_string());

    Ok(verified)
}

/// The SHA-256 of a bundle descriptor, after checking it is a memfd sealed against writing,
/// growing and shrinking (so what the stage unpacks is what was checked here) and within the
/// site's size limit. Read by position in 64 KiB pieces: the helper holds no copy of it.
fn bundle_digest(fd: &OwnedFd, helper: &Helper) -> Result<String, LaunchError> {
    use sha2::Digest;
    let bad = |what: String| LaunchError::BundleDescriptor(what);
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| bad(format!("fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad(
            "is not a regular file; pass a sealed memfd (memfd_create, F_ADD_SEALS)".into(),
        ));
    }
    // SAFETY: fcntl on a descriptor we own with no pointer argument.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let needed = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    if seals < 0 || seals & needed != needed {
        return Err(bad(
            "is not sealed against writing, growing and shrinking, so it could change after the digest check; pass a memfd with F_SEAL_WRITE, F_SEAL_GROW and F_SEAL_SHRINK".into(),
        ));
    }
    let size = st.st_size as u64;
    let max = helper.cfg.limits.bundle_max_bytes;
    if size > max {
        return Err(LaunchError::BundleTooLarge {
            size,
            max,
            config: helper.cfg.path.display().to_string(),
        });
    }
    let file = std::fs::File::from(fd.try_clone().map_err(|e| bad(format!("dup: {e}")))?);
    let mut hasher = sha2::Sha256::new();
    let mut reader = crate::protocol::switch_wire::ReadAt::new(&file);
    let mut buf = [0u8; 64 << 10];
    loop {
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(format!("read: {e}"))),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The end record of a payload whose start was recorded but which never started: its sandbox
/// failed, or the start record could not be made durable.
fn end_without_run(start: &AuditRecord, kill_reason: &str, reason: &str) -> AuditRecord {
    let mut end = start.follow_up(AuditEvent::End);
    end.end = Some(end.time.clone());
    end.kill_reason = Some(kill_reason.into());
    end.reason = Some(reason.into());
    end
}

/// Checks the launch's descriptors: none, or two (stdout, stderr) that are regular files or
/// pipes opened for writing. Anything else (a socket, a directory, a device) could give the
/// payload a channel the pilot should not hand it.
fn output_fds(fds: Vec<OwnedFd>) -> Result<(Option<OwnedFd>, Option<OwnedFd>), LaunchError> {
    match fds.len() {
        0 => return Ok((None, None)),
        2 => {}
        n => return Err(LaunchError::FdCount(n)),
    }
    for (fd, which) in fds.iter().zip(["stdout", "stderr"]) {
        check_stdio_fd(fd, which, true)?;
    }
    let mut it = fds.into_iter();
    Ok((it.next(), it.next()))
}

/// Checks one of a payload's standard descriptors: a regular file or a pipe, open for writing
/// (`writing`, stdout and stderr) or for reading (stdin). A socket, terminal or other device
/// would hand the payload a channel to the caller (a terminal's TIOCSTI injects input).
pub(super) fn check_stdio_fd(
    fd: &OwnedFd,
    which: &'static str,
    writing: bool,
) -> Result<(), LaunchError> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| LaunchError::OutputFd {
        which,
        kind: format!("not inspectable ({e})"),
    })?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFIFO => None,
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFBLK => Some("a block device"),
        _ => Some("of an unknown type"),
    };
    if let Some(kind) = kind {
        return Err(LaunchError::OutputFd {
            which,
            kind: kind.into(),
        });
    }
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| {
        LaunchError::OutputFd {
            which,
            kind: format!("not inspectable ({e})"),
        }
    })?;
    let mode = nix::fcntl::OFlag::from_bits_truncate(flags) & nix::fcntl::OFlag::O_ACCMODE;
    match (writing, mode) {
        (true, nix::fcntl::OFlag::O_RDONLY) => Err(LaunchError::OutputFd {
            which,
            kind: "opened read-only".into(),
        }),
        (false, nix::fcntl::OFlag::O_WRONLY) => Err(LaunchError::OutputFd {
            which,
            kind: "opened write-only".into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
