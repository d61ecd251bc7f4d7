//! One pilot connection, admitted by the accept loop (`admission`; the caller's process held
//! as a pidfd, `peer`): the hello/welcome exchange (the pilot's cgroups pinned), then launch,
//! signal, status and glexec requests until the pilot hangs up; then every payload the pilot started
//! is killed (P10). Requests are bounded (`switch_wire::MAX_REQUEST_FRAME`) and timed: hello
//! within `limits.hello_timeout_seconds` of the accept, every later frame complete within
//! `limits.frame_timeout_seconds` of its first byte. Each payload gets a waiter thread
//! that waits for its end and reports it (report.rs). Every write to the pilot goes through one mutex.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::admission::Admitted;
use super::audit::{AuditEvent, AuditRecord};
use super::daemon::Helper;
use super::launch::{self, Caller, Started};
use super::peer::Peer;
use super::report::{report_end, report_started};
use crate::protocol::switch_wire::{
    read_frame_limited, write_frame, DenialClass, GlexecRequest, ReadLimits, SwitchEvent,
    SwitchRequest, WireError, MAX_REQUEST_FRAME,
};
use crate::protocol::SignedEnvelope;

/// A pilot that does not read its events for this long loses the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The write side of a connection, shared by the connection thread and the payloads' waiter
/// threads.
#[derive(Clone)]
pub(super) struct Sender(Arc<Mutex<UnixStream>>);

impl Sender {
    pub(super) fn send(&self, ev: &SwitchEvent) -> Result<(), WireError> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut s, ev, &[])
    }
}

/// Serves one admitted connection to the end.
pub fn serve(
    helper: Arc<Helper>,
    stream: UnixStream,
    conn_id: u64,
    peer: Peer,
    _admitted: Admitted,
) {
    let accepted = Instant::now();
    let (uid, pid) = (peer.uid, peer.pid);
    let sender = match stream.try_clone() {
        Ok(s) => {
            let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
            Sender(Arc::new(Mutex::new(s)))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot clone the connection; closing");
            return;
        }
    };
    let span = tracing::info_span!("pilot", conn = conn_id, uid, pid);
    let _enter = span.enter();
    let mut conn = Connection {
        helper: helper.clone(),
        stream,
        sender,
        caller: Caller {
            conn_id,
            uid,
            pid,
            hello: Default::default(),
            peer: Arc::new(peer),
            cgroups: None,
        },
        accepted,
        #[cfg(feature = "grid")]
        keys: Default::default(),
    };
    let _gone = KillOnClose {
        helper: helper.clone(),
        conn_id,
    };
    conn.run();
    tracing::info!("connection closed");
}

/// P10: a pilot that is gone leaves nothing running. A guard, so that even a panic in the
/// connection thread kills the pilot's payloads.
struct KillOnClose {
    helper: Arc<Helper>,
    conn_id: u64,
}

impl Drop for KillOnClose {
    fn drop(&mut self) {
        self.helper.kill_payloads(Some(self.conn_id), "pilot_gone");
    }
}

struct Connection {
    helper: Arc<Helper>,
    stream: UnixStream,
    sender: Sender,
    caller: Caller,
    accepted: Instant,
    /// Keys made for this pilot's payloads' proxies, waiting for their chains; dropped with
    /// the connection.
    #[cfg(feature = "grid")]
    keys: super::proxy::keys::PendingKeys,
}

impl Connection {
    fn run(&mut self) {
        if !self.hello() {
            return;
        }
        let limits = ReadLimits {
            max_bytes: MAX_REQUEST_FRAME,
            deadline: None,
            frame_time: Some(self.helper.cfg.limits.frame_timeout),
        };
        loop {
            match read_frame_limited::<SwitchRequest>(&mut self.stream, &limits) {
                Ok((SwitchRequest::Hello(_), _)) => {
                    self.send(SwitchEvent::Error {
                        reason: "hello was already sent on this connection".into(),
                    });
                }
                Ok((
                    SwitchRequest::Launch {
                        envelope,
                        bundle_fd,
                    },
                    fds,
                )) => self.launch(&envelope, bundle_fd, fds, None),
                Ok((
                    SwitchRequest::LaunchWithProxy {
                        envelope,
                        bundle_fd,
                        chain_pem,
                    },
                    fds,
                )) => self.launch(&envelope, bundle_fd, fds, Some(&chain_pem)),
                Ok((SwitchRequest::ProxyRequest { envelope }, _)) => self.proxy_request(&envelope),
                Ok((SwitchRequest::ProxyRenew { payload_id }, _)) => self.proxy_renew(&payload_id),
                Ok((
                    SwitchRequest::ProxyRenewed {
                        payload_id,
                        chain_pem,
                    },
                    _,
                )) => self.proxy_renewed(&payload_id, &chain_pem),
                Ok((
                    SwitchRequest::Signal {
                        payload_id,
                        signal,
                        reason,
                    },
                    _,
                )) => self.signal(&payload_id, signal, reason),
                Ok((SwitchRequest::Glexec(req), fds)) => self.glexec(&req, fds),
                Ok((SwitchRequest::Status, _)) => {
                    let payloads = self.helper.registry.status(self.caller.conn_id);
                    self.send(SwitchEvent::Running { payloads });
                }
                Ok((SwitchRequest::Command { command }, _)) => {
                    let ev = super::command::run(&self.helper, self.caller.conn_id, &command);
                    self.send(ev);
                }
                Ok((SwitchRequest::AdminKill { .. }, _)) => self.send(SwitchEvent::Error {
                    reason: "admin requests must be the first request of their own connection"
                        .into(),
                }),
                Err(WireError::Json(e)) => self.send(SwitchEvent::Error {
                    reason: format!("request not understood: {e}"),
                }),
                Err(WireError::Closed) => return,
                // The stream cannot be resynchronised: say why, then close.
                Err(e @ (WireError::TooLarge(..) | WireError::Deadline(_))) => {
                    tracing::warn!(error = %e, "closing the connection");
                    self.send(SwitchEvent::Error {
                        reason: format!("{e}; closing the connection"),
                    });
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "connection failed");
                    return;
                }
            }
        }
    }

    fn send(&self, ev: SwitchEvent) {
        if let Err(e) = self.sender.send(&ev) {
            tracing::warn!(error = %e, "cannot send event to the pilot");
        }
    }

    /// Reads the mandatory first frame; false when the connection must close.
    fn hello(&mut self) -> bool {
        let limits = ReadLimits {
            max_bytes: MAX_REQUEST_FRAME,
            deadline: Some(self.accepted + self.helper.cfg.limits.hello_timeout),
            frame_time: None,
        };
        let first = read_frame_limited::<SwitchRequest>(&mut self.stream, &limits);
        let reason = match first {
            Ok((SwitchRequest::AdminKill { owner_dn, ban }, _)) if self.caller.uid == 0 => {
                tracing::warn!(owner = %owner_dn, ban, "site admin kill");
                let ev = match self.helper.admin_kill(&owner_dn, ban) {
                    Ok(payloads) => SwitchEvent::Killed { payloads },
                    Err(reason) => SwitchEvent::Error { reason },
                };
                self.send(ev);
                return false;
            }
            Ok((SwitchRequest::Hello(_), _))
                if !self.helper.allowed_uids.contains(&self.caller.uid) =>
            {
                format!(
                    "uid {} is not an allowed pilot account of this helper (allowed_pilots in {}); root may only send admin requests",
                    self.caller.uid,
                    self.helper.cfg.path.display()
                )
            }
            Ok((SwitchRequest::Hello(h), _)) if crate::util::is_safe_id(&h.pilot_id) => {
                // The cgroups of the process that connected, read now and pinned: every
                // payload of this connection goes below them (P7).
                match self.caller.peer.pin_cgroups() {
                    Ok(c) => self.caller.cgroups = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "hello refused");
                        self.send(SwitchEvent::Error {
                            reason: e.to_string(),
                        });
                        return false;
                    }
                }
                tracing::info!(pilot_id = %h.pilot_id, batch_job_id = ?h.batch_job_id, "hello");
                self.caller.hello = h;
                self.send(SwitchEvent::Welcome {
                    host: self.helper.audit.host().to_string(),
                    helper_version: env!("CARGO_PKG_VERSION").to_string(),
                });
                return true;
            }
            Ok((SwitchRequest::Hello(h), _)) => format!(
                "pilot_id '{}' is not valid: use 1-64 characters of [A-Za-z0-9._-]",
                h.pilot_id
            ),
            Ok((SwitchRequest::AdminKill { .. }, _)) => {
                "admin requests are accepted from root only".to_string()
            }
            Ok(_) => "the first request on a connection must be hello".to_string(),
            Err(WireError::Closed) => return false,
            Err(e) => format!("hello not understood: {e}"),
        };
        self.send(SwitchEvent::Error { reason });
        false
    }

    /// A record with what is known about this pilot.
    fn record(&self, event: AuditEvent) -> AuditRecord {
        let h = &self.caller.hello;
        let mut rec = self.helper.audit.record(event);
        rec.pilot_uid = Some(self.caller.uid);
        rec.pilot_pid = Some(self.caller.pid);
        rec.pilot_id = Some(h.pilot_id.clone());
        rec.batch_job_id = h.batch_job_id.clone();
        rec.pilot_dn = h.pilot_dn.clone();
        rec
    }

    fn launch(
        &mut self,
        envelope: &SignedEnvelope,
        bundle_fd: Option<usize>,
        fds: Vec<OwnedFd>,
        chain_pem: Option<&str>,
    ) {
        self.helper.stages.wake_next();
        let mut rec = self.record(AuditEvent::Denied);
        // The key made for this very envelope (by its payload id and digest), used once.
        let proxy = chain_pem.map(|chain_pem| super::proxy::LaunchProxy {
            key: self.take_key(envelope),
            chain_pem,
        });
        let result = launch::launch(
            &self.helper,
            &self.caller,
            envelope,
            bundle_fd,
            fds,
            proxy,
            &mut rec,
        )
        .map_err(|e| (e.class(), e.to_string(), e.recorded_as_end()));
        self.answer(result, rec);
    }

    /// A `glexec` request (mupilot-glexec): a command as a verified proxy's owner, answered
    /// as a launch.
    fn glexec(&self, req: &GlexecRequest, fds: Vec<OwnedFd>) {
        self.helper.stages.wake_next();
        let mut rec = self.record(AuditEvent::Denied);
        let result = super::glexec::run(&self.helper, &self.caller, req, fds, &mut rec)
            .map_err(|e| (e.class(), e.to_string(), e.recorded_as_end()));
        self.answer(result, rec);
    }

    /// Answers a launch: `started` (and later `exited`), or `denied` with its class and
    /// reason, recorded unless an end record already closed it.
    fn answer(&self, result: Result<Started, (DenialClass, String, bool)>, rec: AuditRecord) {
        match result {
            Ok(started) => self.started(started),
            Err((class, reason, recorded_as_end)) => {
                self.deny_as(rec, class, reason, recorded_as_end)
            }
        }
    }

    #[cfg(feature = "grid")]
    fn take_key(&mut self, envelope: &SignedEnvelope) -> Option<super::proxy::PendingKey> {
        let digest = envelope.digest().ok()?;
        self.keys.take(
            &launch::claimed_payload_id(envelope),
            &super::proxy::keys::Purpose::Launch(digest),
        )
    }

    #[cfg(not(feature = "grid"))]
    fn take_key(&mut self, _envelope: &SignedEnvelope) -> Option<super::proxy::PendingKey> {
        None
    }

    /// Records and answers a denial of a launch or proxy request.
    fn deny(&self, rec: AuditRecord, e: launch::LaunchError) {
        self.deny_as(rec, e.class(), e.to_string(), e.recorded_as_end());
    }

    /// Records (unless an end record already closed it) and answers a denial with its class
    /// and reason: the one place a `denied` leaves the helper.
    fn deny_as(
        &self,
        mut rec: AuditRecord,
        class: DenialClass,
        reason: String,
        recorded_as_end: bool,
    ) {
        let payload_id = rec.payload_id.clone().unwrap_or_default();
        tracing::info!(%payload_id, class = class.as_str(), %reason, "denied");
        rec.time = crate::records::now_rfc3339();
        rec.event = Some(AuditEvent::Denied);
        rec.decision = Some("deny");
        rec.denial_class = Some(class.as_str());
        rec.reason = Some(reason.clone());
        if !recorded_as_end {
            self.helper.audit.append_or_log(&rec);
        }
        self.send(SwitchEvent::Denied {
            payload_id,
            class,
            reason,
        });
    }

    /// `proxy_request`: a CSR for a key made for the envelope's payload, or a denial.
    fn proxy_request(&mut self, envelope: &SignedEnvelope) {
        let mut rec = self.record(AuditEvent::Denied);
        #[cfg(feature = "grid")]
        let result = launch::proxy_csr(
            &self.helper,
            &self.caller,
            envelope,
            &mut self.keys,
            &mut rec,
        );
        #[cfg(not(feature = "grid"))]
        let result: Result<(String, String), _> = {
            rec.payload_id = Some(launch::claimed_payload_id(envelope)).filter(|s| !s.is_empty());
            Err(launch::LaunchError::Proxy(
                super::proxy::ProxyError::NotBuilt,
            ))
        };
        match result {
            Ok((payload_id, csr_pem)) => self.send(SwitchEvent::ProxyCsr {
                payload_id,
                csr_pem,
            }),
            Err(e) => self.deny(rec, e),
        }
    }

    /// `proxy_renew`: a CSR for a new key of a running payload of this pilot.
    fn proxy_renew(&mut self, payload_id: &str) {
        #[cfg(feature = "grid")]
        let result = super::proxy::renew::csr(
            &self.helper,
            self.caller.conn_id,
            &mut self.keys,
            payload_id,
        );
        #[cfg(not(feature = "grid"))]
        let result: Result<String, _> = Err(super::proxy::ProxyError::NotBuilt);
        match result {
            Ok(csr_pem) => self.send(SwitchEvent::ProxyCsr {
                payload_id: payload_id.to_string(),
                csr_pem,
            }),
            Err(e) => self.proxy_refused(payload_id, e),
        }
    }

    /// `proxy_renewed`: the new chain verified and delivered (a `proxy_renewed` record), or
    /// refused (a `proxy_refused` record); the payload keeps running either way.
    fn proxy_renewed(&mut self, payload_id: &str, chain_pem: &str) {
        #[cfg(feature = "grid")]
        let result = super::proxy::renew::renewed(
            &self.helper,
            self.caller.conn_id,
            &mut self.keys,
            payload_id,
            chain_pem,
        );
        #[cfg(not(feature = "grid"))]
        let result: Result<(super::proxy::Delivery, super::registry::Entry), _> = {
            let _ = chain_pem;
            Err(super::proxy::ProxyError::NotBuilt)
        };
        match result {
            Ok((d, entry)) => {
                let mut rec = entry.record.follow_up(AuditEvent::ProxyRenewed);
                rec.proxy_serial = Some(d.serial.clone());
                rec.proxy_not_after = Some(d.not_after.clone());
                rec.fqans = Some(d.fqans.clone());
                self.helper.audit.append_or_log(&rec);
                tracing::info!(payload_id, serial = %d.serial, "proxy renewed");
                self.send(SwitchEvent::ProxyDelivered {
                    payload_id: payload_id.to_string(),
                    serial: d.serial.clone(),
                    not_after: d.not_after.clone(),
                });
            }
            Err(e) => self.proxy_refused(payload_id, e),
        }
    }

    fn proxy_refused(&self, payload_id: &str, e: super::proxy::ProxyError) {
        let reason = e.to_string();
        tracing::info!(payload_id, %reason, "proxy renewal refused");
        // About this pilot's own payload when it is one; otherwise only the claim.
        let mut rec = match self.helper.registry.get(self.caller.conn_id, payload_id) {
            Some(entry) => entry.record.follow_up(AuditEvent::ProxyRefused),
            None => {
                let mut r = self.record(AuditEvent::ProxyRefused);
                r.payload_id = Some(payload_id.to_string()).filter(|p| crate::util::is_safe_id(p));
                r
            }
        };
        rec.decision = Some("deny");
        rec.denial_class = Some(e.class().as_str());
        rec.reason = Some(reason.clone());
        self.helper.audit.append_or_log(&rec);
        self.send(SwitchEvent::ProxyRefused {
            payload_id: payload_id.to_string(),
            reason,
        });
    }

    /// Hands a started payload to a waiter thread of its own, which reports `started`
    /// and then its end: one thread sends both, so `exited` can never overtake `started`, and
    /// the thread is ready for the end as early as possible.
    ///
    /// A payload that has ended already (its exit came with `started`, in one write: a short
    /// one) and copies no outputs is reported here, on the connection thread, without a thread
    /// start before the report (a new thread is put on an idle CPU, which may first have to
    /// wake up); what remains after the report goes to a thread.
    fn started(&self, s: Started) {
        let helper = self.helper.clone();
        let sender = self.sender.clone();
        let caller = (self.caller.uid, self.caller.pid);
        let handle = s.handle.clone();
        if s.running.has_ended() && !s.running.copies_outputs() {
            report_started(&sender, &s, caller);
            let reported = report_end(helper, &sender, s.payload_id, s.running, s.record);
            // Without a thread (spawn failed), the closure and `reported` in it are dropped
            // here, which finishes it on this thread.
            let _ = std::thread::Builder::new()
                .name("payload-end".into())
                .spawn(move || drop(reported));
            return;
        }
        let spawned = std::thread::Builder::new()
            .name(format!("payload-{}", s.payload_id))
            .spawn(move || {
                report_started(&sender, &s, caller);
                drop(report_end(
                    helper,
                    &sender,
                    s.payload_id,
                    s.running,
                    s.record,
                ));
            });
        if let Err(e) = spawned {
            // Without a waiter nobody would record the end: stop it now.
            tracing::error!(error = %e, "cannot start a waiter thread; killing the payload");
            handle.kill("helper_error");
        }
    }

    fn signal(&self, payload_id: &str, signal: i32, reason: Option<String>) {
        let answer = |ok: bool, why: Option<String>| SwitchEvent::Signalled {
            payload_id: payload_id.to_string(),
            ok,
            reason: why,
        };
        if !(1..=64).contains(&signal) {
            self.send(answer(
                false,
                Some(format!("signal {signal} is not a signal number (1-64)")),
            ));
            return;
        }
        let Some(entry) = self.helper.registry.get(self.caller.conn_id, payload_id) else {
            self.send(answer(
                false,
                Some(format!(
                    "payload '{payload_id}' is not running for this pilot"
                )),
            ));
            return;
        };
        let Some(handle) = entry.handle else {
            self.send(answer(false, Some("payload is still starting".into())));
            return;
        };
        // Recorded before the signal is sent, so the log reads start, signal, end even when
        // the payload dies of it at once.
        let mut rec = entry.record.follow_up(AuditEvent::Signal);
        rec.signal = Some(signal);
        rec.reason = Some(reason.unwrap_or_else(|| "pilot request".into()));
        self.helper.audit.append_or_log(&rec);
        let result = handle.signal(signal);
        if let Err(e) = &result {
            rec.time = crate::records::now_rfc3339();
            rec.reason = Some(format!("signal failed: {e}"));
            self.helper.audit.append_or_log(&rec);
        }
        match result {
            Ok(()) => self.send(answer(true, None)),
            Err(e) => self.send(answer(false, Some(e.to_string()))),
        }
    }
}
