//! The helper daemon: shared state, the accept loop (a thread per pilot connection) and
//! orderly shutdown on SIGTERM/SIGINT (every payload killed and its end recorded).
//!
//! Threads only: no async runtime, no HTTP, no TLS. Privileged sandbox work happens in stage
//! processes the sandbox spawns, never in a fork of this multi-threaded process.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::accounts::AccountCache;
use super::activation::{self, ActivationError, ListenSource};
use super::admission::{Admission, Refusals};
use super::audit::{AuditEvent, AuditLog};
use super::authorize::{Authorizer, AuthzSources};
use super::config::SwitchConfig;
use super::leases::{Gridmapdir, KillAndClean, LeaseError};
use super::registry::Registry;
use super::replay::{ReplayCache, ReplayError};
use super::sandbox::StagePool;
use crate::policy::{Bans, PolicyStack, ReloadError};
use crate::records::RecordError;

/// How often the audit chain's head goes to syslog (and at shutdown).
const ANCHOR_INTERVAL: Duration = Duration::from_secs(3600);

/// How long shutdown waits for killed payloads' end records.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// State shared by every connection.
pub struct Helper {
    pub cfg: SwitchConfig,
    pub audit: AuditLog,
    pub replay: Mutex<ReplayCache>,
    pub authz: Authorizer,
    pub registry: Registry,
    /// Uids of every allowed pilot account.
    pub allowed_uids: BTreeSet<u32>,
    /// Idle stage processes, one taken per launch.
    pub stages: StagePool,
    /// Accounts looked up recently.
    pub accounts: AccountCache,
    /// Open connections per uid and in all (`[limits]`).
    pub admission: Arc<Admission>,
    /// Refused connections, audited aggregated.
    pub refusals: Refusals,
    /// Verifies owners' proxies (switch.toml `[grid]`); None: the site verifies none.
    #[cfg(feature = "grid")]
    pub verifier: Option<crate::grid::Verifier>,
    /// Payload proxy keys made ahead (filled by the `key-pool` thread when `[grid]` is set).
    #[cfg(feature = "grid")]
    pub key_pool: crate::switch::proxy::pool::KeyPool,
    next_conn: AtomicU64,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("audit log: {0}")]
    Audit(#[from] RecordError),
    #[error("{0}")]
    Replay(#[from] ReplayError),
    #[error("{0}")]
    Listen(#[from] ActivationError),
    #[error("cannot install signal handlers: {0}")]
    Signals(nix::Error),
    #[error("authorization source: {0}")]
    AuthzSource(#[from] ReloadError),
    #[error("{0}")]
    Leases(#[from] LeaseError),
    #[error("{0}")]
    Sandbox(#[from] crate::switch::sandbox::SandboxError),
}

impl Helper {
    /// Opens the audit log and the replay cache of a validated config.
    pub fn new(cfg: SwitchConfig) -> Result<Self, DaemonError> {
        let audit = AuditLog::open(&cfg.audit_log, &cfg.node_name)?;
        let replay = ReplayCache::open(&cfg.replay_cache_path())?;
        let authz = build_authorizer(&cfg)?;
        Ok(Helper {
            allowed_uids: cfg.allowed_uids(),
            audit,
            replay: Mutex::new(replay),
            authz,
            registry: Registry::default(),
            stages: StagePool::new(&cfg.sandbox, cfg.sandbox.warm_stages)?,
            accounts: AccountCache::default(),
            admission: Admission::new(
                cfg.limits.max_connections_per_uid,
                cfg.limits.max_connections,
            ),
            refusals: Refusals::new(cfg.limits.refusal_audit_interval),
            #[cfg(feature = "grid")]
            verifier: cfg.grid.clone().map(crate::grid::Verifier::new),
            #[cfg(feature = "grid")]
            key_pool: Default::default(),
            next_conn: AtomicU64::new(1),
            cfg,
        })
    }

    /// Kills every payload with `reason` and records it (P10).
    pub fn kill_payloads(&self, conn_id: Option<u64>, reason: &str) {
        self.kill_entries(self.registry.list(conn_id), reason);
    }

    /// The site's emergency stop: kills every payload of `owner_dn` on this node and, with
    /// `ban`, adds the DN to the first configured DN ban list, so no new payload of it starts.
    /// Returns the killed payload ids.
    pub fn admin_kill(&self, owner_dn: &str, ban: bool) -> Result<Vec<String>, String> {
        if ban {
            let Some(list) = self.cfg.authz.ban_users.first() else {
                return Err(format!(
                    "--ban needs a DN ban list: add authz.ban_users to {}",
                    self.cfg.path.display()
                ));
            };
            crate::policy::bans::append_dn(list, owner_dn).map_err(|e| e.to_string())?;
        }
        let entries = self.registry.of_owner(owner_dn);
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let mut rec = self.audit.record(AuditEvent::Kill);
        rec.owner_dn = Some(owner_dn.to_string());
        rec.reason = Some(format!(
            "site admin: kill every payload of the owner{} ({} running)",
            if ban { " and ban the DN" } else { "" },
            ids.len()
        ));
        rec.kill_reason = Some("site_admin".into());
        self.audit.append_or_log(&rec);
        self.kill_entries(entries, "site_admin");
        Ok(ids)
    }

    fn kill_entries(&self, entries: Vec<(String, super::registry::Entry)>, reason: &str) {
        for (payload_id, entry) in entries {
            let Some(handle) = entry.handle else { continue };
            // Recorded before the kill, so the log reads start, kill, end.
            let mut rec = entry.record.follow_up(AuditEvent::Kill);
            rec.kill_reason = Some(reason.to_string());
            self.audit.append_or_log(&rec);
            handle.kill(reason);
            tracing::info!(%payload_id, reason, "killed payload");
        }
    }
}

/// The decision chain of switch.toml: ban lists, site and VO policies, maps, pool leases.
pub fn build_authorizer(cfg: &SwitchConfig) -> Result<Authorizer, DaemonError> {
    let a = &cfg.authz;
    let mut bans = Bans::new();
    for p in &a.ban_users {
        bans = bans.with_dn_file(p)?;
    }
    for p in &a.ban_fqans {
        bans = bans.with_fqan_file(p)?;
    }
    for p in &a.ban_vos {
        bans = bans.with_vo_file(p)?;
    }
    let mut policies = std::collections::BTreeMap::new();
    for vo in &cfg.vos {
        let mut stack = PolicyStack::new();
        let mut any = false;
        if let Some(site) = &a.site_policy {
            stack = stack.with_file("site policy", site)?;
            any = true;
        }
        if let Some(own) = &vo.policy {
            stack = stack.with_file(format!("VO {} policy", vo.name), own)?;
            any = true;
        }
        if any {
            policies.insert(vo.name.clone(), stack);
        }
    }
    let pool = match &a.gridmapdir {
        Some(dir) => {
            let g = Gridmapdir::new(
                dir,
                &cfg.state_dir,
                Duration::from_secs(a.lease_ttl_seconds),
            )?;
            Some(match &a.lcmaps_groupmapfile {
                Some(file) => g.with_groupmapfile(file),
                None => g,
            })
        }
        None => None,
    };
    // An expired pool account is cleaned where payloads and others could have left files.
    let quarantine = KillAndClean {
        roots: vec![
            cfg.sandbox.scratch_root.clone(),
            "/tmp".into(),
            "/var/tmp".into(),
            "/dev/shm".into(),
        ],
    };
    Ok(Authorizer::new(
        AuthzSources {
            vos: cfg.vos.iter().map(|v| v.name.clone()).collect(),
            bans,
            policies,
            gridmap: cfg.gridmap.clone(),
            groupmap: a.groupmap.clone(),
            pool,
        },
        Box::new(quarantine),
    )?)
}

/// Write end of the self-pipe the signal handler writes to (-1 before installation).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` lives on this stack frame for the call
        // and the fd is the pipe's write end, which stays open for the life of the process.
        unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
    }
}

/// Installs SIGTERM/SIGINT handlers that wake the returned pipe. A handler, not a blocked
/// mask: a blocked mask would be inherited by the stage processes and payloads.
fn install_signals() -> Result<OwnedFd, nix::Error> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    SIGNAL_PIPE.store(std::os::fd::IntoRawFd::into_raw_fd(w), Ordering::Relaxed);
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only loads an atomic and calls write(2), both async-signal-safe.
        unsafe { sigaction(sig, &act) }?;
    }
    Ok(r)
}

/// Runs the daemon until SIGTERM/SIGINT. Returns the process exit code.
pub fn serve(cfg: SwitchConfig) -> Result<i32, DaemonError> {
    // The socket first: activation edits the environment, which must happen before threads.
    let (listener, source) =
        activation::listener(&cfg.socket, cfg.socket_group.as_ref().map(|g| g.1))?;
    super::syslog::open();
    let helper = match Helper::new(cfg) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            if let ListenSource::Path(p) = &source {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    // A previous helper that died left starts without ends: its payloads' stage processes saw
    // it go and tore them down, so they end here as `lost` (never a silent gap, P11).
    match helper.audit.close_open_starts() {
        Ok(lost) if !lost.is_empty() => {
            tracing::warn!(payloads = ?lost, "recorded payloads of a previous helper as lost")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot close the previous run's open records"),
    }
    let sig_read = install_signals().map_err(DaemonError::Signals)?;
    let h = helper.clone();
    std::thread::Builder::new()
        .name("anchor".into())
        .spawn(move || loop {
            std::thread::sleep(ANCHOR_INTERVAL);
            h.audit.anchor();
        })
        .expect("spawning the anchor thread");
    match &source {
        ListenSource::Systemd => tracing::info!("listening on the socket passed by systemd"),
        ListenSource::Path(p) => tracing::info!(socket = %p.display(), "listening"),
    }
    tracing::info!(
        config = %helper.cfg.path.display(),
        audit_log = %helper.cfg.audit_log.display(),
        vos = ?helper.cfg.vos.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        allowed_uids = ?helper.allowed_uids,
        "mupilot-switch ready"
    );

    if helper.cfg.socket_group.is_none() && matches!(source, ListenSource::Path(_)) {
        tracing::warn!(
            socket = %helper.cfg.socket.display(),
            "the socket is 0666: every local uid, payloads included, can connect; set socket_group in {} to the group of the pilot accounts",
            helper.cfg.path.display()
        );
    }
    if let Some(path) = helper.cfg.metrics_textfile.clone() {
        // Off the launch path: the counters are atomics the audit log bumps; only this
        // thread encodes and writes them, every metrics_interval.
        let h = helper.clone();
        write_metrics(&h, &path);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || loop {
                std::thread::sleep(h.cfg.metrics_interval);
                write_metrics(&h, &path);
            })
            .expect("spawning the metrics thread");
    }
    // Delegated launches and renewals take a key made ahead instead of making one on the
    // pilot's connection thread (switch::proxy::pool).
    #[cfg(feature = "grid")]
    if helper.verifier.is_some() {
        let h = helper.clone();
        std::thread::Builder::new()
            .name("key-pool".into())
            .spawn(move || h.key_pool.refill())
            .expect("spawning the key pool thread");
    }
    // Refusal summaries are written when their interval ends.
    let h = helper.clone();
    std::thread::Builder::new()
        .name("refusals".into())
        .spawn(move || loop {
            std::thread::sleep(h.refusals.interval() / 4);
            h.refusals.flush(&h.audit, false);
        })
        .expect("spawning the refusals thread");
    let h = helper.clone();
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(h, listener))
        .expect("spawning the accept thread");

    // Wait for a signal.
    let mut sig_file = std::fs::File::from(sig_read);
    let mut b = [0u8; 1];
    loop {
        match std::io::Read::read(&mut sig_file, &mut b) {
            Ok(1) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "signal pipe failed");
                break;
            }
        }
    }
    tracing::info!(signal = b[0], "stopping: killing every payload");
    helper.kill_payloads(None, "helper_stopping");
    if !helper.registry.wait_empty(SHUTDOWN_GRACE) {
        tracing::warn!(
            "some payloads did not finish their teardown in time; their end records may be missing"
        );
    }
    helper.refusals.flush(&helper.audit, true);
    helper.audit.anchor();
    helper.audit.finish();
    if let Some(path) = &helper.cfg.metrics_textfile {
        write_metrics(&helper, path);
    }
    if let ListenSource::Path(p) = &source {
        let _ = std::fs::remove_file(p);
    }
    Ok(0)
}

/// Rewrites the metrics textfile; a failure is logged, never fatal (the helper's work does
/// not depend on its metrics).
fn write_metrics(helper: &Helper, path: &std::path::Path) {
    let text = helper
        .audit
        .metrics()
        .render(helper.registry.list(None).len());
    if let Err(e) = super::metrics::write_textfile(path, &text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics textfile");
    }
}

fn accept_loop(helper: Arc<Helper>, listener: UnixListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let Some((peer, admitted)) = admit(&helper, &stream) else {
                    continue;
                };
                let conn_id = helper.next_conn.fetch_add(1, Ordering::Relaxed);
                let h = helper.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("conn-{conn_id}"))
                    .spawn(move || super::connection::serve(h, stream, conn_id, peer, admitted));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Decides, on the accept thread and before any thread or allocation for it, whether a
/// connection is served: its caller must be an allowed pilot (or root, for admin requests)
/// with a free place under the connection caps, and its process must be held (pidfd). A
/// refused caller gets one short error frame, written without blocking, and the audit
/// record aggregation of [`Refusals`].
fn admit(
    helper: &Helper,
    stream: &std::os::unix::net::UnixStream,
) -> Option<(super::peer::Peer, super::admission::Admitted)> {
    use nix::sys::socket::{getsockopt, sockopt};
    let accepted = super::peer::boot_ticks_now();
    let creds = match getsockopt(stream, sockopt::PeerCredentials) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read peer credentials; closing");
            return None;
        }
    };
    let (uid, pid) = (creds.uid(), creds.pid());
    let refuse = |reason: String| {
        tracing::debug!(uid, pid, %reason, "refused caller");
        helper.refusals.refused(&helper.audit, uid, pid, &reason);
        let _ = stream.set_nonblocking(true);
        let _ = crate::protocol::switch_wire::write_frame_to(
            stream,
            &crate::protocol::switch_wire::SwitchEvent::Error { reason },
            &[],
        );
    };
    // Root may connect for site-admin requests (`audit kill`) even when it is no pilot.
    if !helper.allowed_uids.contains(&uid) && uid != 0 {
        refuse(format!(
            "uid {uid} is not an allowed pilot account of this helper (allowed_pilots in {})",
            helper.cfg.path.display()
        ));
        return None;
    }
    let admitted = match helper.admission.admit(uid) {
        Ok(a) => a,
        Err(reason) => {
            refuse(reason);
            return None;
        }
    };
    match super::peer::Peer::of(stream, helper.cfg.limits.peer_pidfd, accepted) {
        Ok(peer) => Some((peer, admitted)),
        Err(e) => {
            refuse(e.to_string());
            None
        }
    }
}
