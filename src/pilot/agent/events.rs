//! The agent's reactions to helper events (started, denied, exited, connection lost), to
//! reporter results and to operator commands. State changes only; no I/O but helper signals
//! and reporter queues.

use tokio::time::Instant;

use super::{Agent, Phase, SIGKILL};
use crate::pilot::client::ServerApi;
use crate::pilot::helper_client::HelperApi;
use crate::pilot::reporter::{ArchiveSource, ReportJob, Reported};
use crate::protocol::api::{InformationAnswer, OperatorCommand, PayloadState, StatusReport};
use crate::protocol::command::{CommandAction, CommandBody, SignedCommand};
use crate::protocol::switch_wire::{DenialClass, ExitReport, RunningPayload, SwitchEvent};
use crate::records::now_rfc3339;

impl<S: ServerApi, H: HelperApi> Agent<S, H> {
    pub(super) fn on_helper_event(&mut self, ev: SwitchEvent) {
        match ev {
            SwitchEvent::Started {
                payload_id,
                account,
                uid,
                cgroup,
                pid,
                ..
            } => self.on_started(payload_id, account, uid, cgroup, pid),
            SwitchEvent::Denied {
                payload_id,
                class,
                reason,
            } => self.on_denied(payload_id, class, reason),
            SwitchEvent::Exited { payload_id, report } => self.on_exited(payload_id, report),
            SwitchEvent::Signalled {
                payload_id,
                ok,
                reason,
            } => {
                if !ok {
                    tracing::warn!(%payload_id, reason = ?reason, "helper could not signal the payload");
                }
            }
            SwitchEvent::Error { reason } => {
                tracing::error!(%reason, "helper could not understand a request")
            }
            SwitchEvent::CommandDone {
                payload_id,
                action,
                requester,
                ok,
                reason,
                information,
                nonce,
            } => {
                if action == CommandAction::Information {
                    self.on_information(payload_id, ok, reason, information.map(|i| *i), nonce);
                } else {
                    self.on_command_done(payload_id, action, requester, ok, reason);
                }
            }
            SwitchEvent::Running { payloads } => self.on_usage(payloads),
            SwitchEvent::ProxyCsr {
                payload_id,
                csr_pem,
            } => self.on_proxy_csr(payload_id, csr_pem),
            SwitchEvent::ProxyDelivered {
                payload_id,
                serial,
                not_after,
            } => self.on_proxy_delivered(payload_id, serial, not_after),
            SwitchEvent::ProxyRefused { payload_id, reason } => {
                self.on_proxy_refused(payload_id, reason)
            }
            SwitchEvent::Welcome { .. } | SwitchEvent::Killed { .. } => {}
        }
    }

    /// The helper's answer to `status`: each payload's usage so far. The heartbeats that
    /// waited for it go now.
    fn on_usage(&mut self, payloads: Vec<RunningPayload>) {
        for r in payloads {
            if let (Some(p), Some(u)) = (self.payloads.get_mut(&r.payload_id), r.usage) {
                p.usage = Some(u);
            }
        }
        if self.usage_asked.take().is_some() {
            self.send_heartbeats(Instant::now(), true);
        }
    }

    /// The helper's answer to a relayed `information` request goes to the server at once, in
    /// a running report (with the usage it carries), under the request's id.
    fn on_information(
        &mut self,
        payload_id: String,
        ok: bool,
        reason: String,
        information: Option<RunningPayload>,
        nonce: Option<String>,
    ) {
        let Some(p) = self.payloads.get_mut(&payload_id) else {
            return;
        };
        let request_id = match nonce {
            Some(n) => {
                p.info_pending.retain(|r| *r != n);
                n
            }
            None if !p.info_pending.is_empty() => p.info_pending.remove(0),
            None => return,
        };
        tracing::info!(%payload_id, %request_id, ok, %reason, "relaying the helper's information answer");
        if let Some(u) = information.as_ref().and_then(|i| i.usage) {
            p.usage = Some(u);
        }
        self.report_information(&payload_id, request_id, ok, reason, information);
    }

    /// Sends an information answer for `id` in a running report.
    fn report_information(
        &mut self,
        id: &str,
        request_id: String,
        ok: bool,
        reason: String,
        payload: Option<RunningPayload>,
    ) {
        let Some(p) = self.payloads.get(id) else {
            return;
        };
        if !p.server_live {
            return;
        }
        let mut report = StatusReport {
            pilot_id: self.cfg.pilot_id.clone(),
            state: (p.phase == Phase::Running).then_some(PayloadState::Running),
            account: p.record.account.clone(),
            uid: p.record.uid,
            information: Some(InformationAnswer {
                request_id,
                ok,
                reason,
                payload,
            }),
            ..Default::default()
        };
        super::stop::add_usage(&mut report, p.usage, p.server_live);
        p.reporter.send(ReportJob::Status {
            report,
            heartbeat: false,
        });
    }

    fn on_command_done(
        &mut self,
        payload_id: String,
        action: CommandAction,
        requester: String,
        ok: bool,
        reason: String,
    ) {
        if ok {
            tracing::info!(%payload_id, action = action.as_str(), %requester, %reason, "operator command carried out");
            return;
        }
        // The site's decision stands: the payload goes on (P6).
        tracing::warn!(%payload_id, action = action.as_str(), %requester, %reason, "operator command refused by the helper");
        if action == CommandAction::Cancel {
            if let Some(p) = self.payloads.get_mut(&payload_id) {
                p.cancelled_by = None;
            }
        }
    }

    pub(super) fn on_started(
        &mut self,
        id: String,
        account: String,
        uid: u32,
        cgroup: String,
        pid: i32,
    ) {
        let stopping = self.stopping;
        let Some(p) = self.payloads.get_mut(&id) else {
            // A launch the pilot already gave up on (timeout): it must not run unsupervised.
            tracing::error!(payload_id = %id, "helper started a payload the pilot gave up on; killing it");
            let _ = self
                .helper
                .signal(&id, SIGKILL, "pilot gave up on this launch");
            return;
        };
        tracing::info!(payload_id = %id, %account, uid, pid, "payload started");
        p.phase = Phase::Running;
        p.record.decision = Some("permit");
        p.record.account = Some(account.clone());
        p.record.uid = Some(uid);
        p.record.cgroup = Some(cgroup);
        p.reporter.send(ReportJob::Status {
            report: StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(PayloadState::Running),
                account: Some(account),
                uid: Some(uid),
                ..Default::default()
            },
            heartbeat: false,
        });
        if stopping || p.cancelled_by.is_some() {
            self.terminate(&id, "pilot stopping");
        }
    }

    pub(super) fn on_denied(&mut self, id: String, class: DenialClass, reason: String) {
        // An empty id means the helper could not read the envelope: it answers launches in
        // order, so it is the oldest launch still waiting.
        let id = if id.is_empty() {
            match self
                .payloads
                .iter()
                .filter(|(_, p)| p.phase == Phase::Launching)
                .min_by_key(|(_, p)| p.launched_at)
            {
                Some((k, _)) => k.clone(),
                None => return tracing::error!(%reason, "helper denied an unknown launch"),
            }
        } else {
            id
        };
        let Some(p) = self.payloads.get_mut(&id) else {
            return tracing::error!(payload_id = %id, %reason, "denial for an unknown payload");
        };
        // Only a local authorization decision is `denied`; a wrong request (caller) or a
        // site that could not serve it (system) is `failed`, with the class and reason.
        let state = PayloadState::of_refusal(Some(class.as_str()));
        tracing::warn!(payload_id = %id, class = class.as_str(), %state, %reason, "helper refused the payload; final");
        self.capacity.release(&id);
        p.phase = Phase::Ending;
        p.record.decision = Some("deny");
        p.record.denial_class = Some(class.as_str().into());
        p.record.reason = Some(reason.clone());
        p.record.state = Some(state.as_str().into());
        if state == PayloadState::Denied {
            self.summary.denied += 1;
        } else {
            self.summary.failed += 1;
        }
        p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(state),
                reason: Some(reason),
                denial_class: Some(class.as_str().into()),
                ..Default::default()
            },
            archive: None,
        });
    }

    pub(super) fn on_exited(&mut self, id: String, r: ExitReport) {
        let stopping = self.stopping;
        let Some(p) = self.payloads.get_mut(&id) else {
            return tracing::error!(payload_id = %id, "exit of an unknown payload");
        };
        if p.phase == Phase::Ending {
            return;
        }
        self.capacity.release(&id);
        p.phase = Phase::Ending;
        let (state, reason) = if let Some(who) = &p.cancelled_by {
            self.summary.cancelled += 1;
            (PayloadState::Cancelled, Some(format!("cancelled by {who}")))
        } else if r.exit_code == Some(0) && r.signal.is_none() {
            self.summary.done += 1;
            (PayloadState::Done, None)
        } else {
            self.summary.failed += 1;
            let why = match (&r.kill_reason, p.term_at.is_some() && stopping) {
                (Some(k), _) => Some(k.clone()),
                (None, _) if p.stop_reason.is_some() => p.stop_reason.clone(),
                (None, true) => Some("pilot stopping".to_string()),
                (None, false) => None,
            };
            (PayloadState::Failed, why)
        };
        tracing::info!(payload_id = %id, state = %state, exit_code = ?r.exit_code, signal = ?r.signal, "payload ended");
        if p.record.decision.is_none() {
            p.record.decision = Some("permit");
        }
        p.record.exit_code = r.exit_code;
        p.record.signal = r.signal;
        p.record.cpu_seconds = Some(r.cpu_seconds);
        p.record.peak_memory_bytes = r.peak_memory_bytes;
        p.record.wall_seconds = Some(r.wall_seconds);
        p.record.kill_reason = r.kill_reason.clone();
        p.record.reason = reason.clone();
        p.record.state = Some(state.as_str().into());
        let archive = ArchiveSource {
            outputs_b64: r.outputs.clone(),
            stdout: p.dir.join("stdout"),
            stderr: p.dir.join("stderr"),
            dir: p.dir.clone(),
        };
        p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(state),
                account: p.record.account.clone(),
                uid: p.record.uid,
                exit_code: r.exit_code,
                signal: r.signal,
                cpu_seconds: Some(r.cpu_seconds),
                peak_memory_bytes: r.peak_memory_bytes,
                wall_seconds: Some(r.wall_seconds),
                reason: reason.or(r.kill_reason),
                denial_class: None,
                outputs_skipped: r.outputs_skipped.clone(),
                memory_bytes: None,
                information: None,
            },
            archive: Some(archive),
        });
    }

    /// The helper is gone, and with it our payloads (it kills them when the pilot's
    /// connection closes, and we cannot reach them without it). What the helper started, or
    /// may have started (a launch it got but did not answer), is `lost`: it is over, its end
    /// unknown. A launch that never reached the helper is handed back unstarted (`queued`),
    /// and the server queues it again.
    pub(super) fn on_helper_lost(&mut self, why: &str) {
        if self.helper_lost {
            return;
        }
        tracing::error!(reason = %why, "connection to the helper lost; its payloads are killed; reporting them lost, and requeueing those it never got");
        self.helper_lost = true;
        self.summary.end_reason = format!("helper connection lost: {why}");
        let ids: Vec<String> = self
            .payloads
            .iter()
            .filter(|(_, p)| p.phase != Phase::Ending)
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            self.capacity.release(&id);
            let pilot_id = self.cfg.pilot_id.clone();
            let p = self.payloads.get_mut(&id).expect("listed above");
            p.phase = Phase::Ending;
            if !p.reached_helper {
                let reason = format!("not started: the helper connection was lost before the launch reached it ({why}); requeue");
                tracing::warn!(payload_id = %id, "launch never reached the helper; handing it back");
                p.record.decision = Some("not_launched");
                p.record.reason = Some(reason.clone());
                p.record.state = Some("queued".into());
                self.summary.handed_back += 1;
                p.reporter.send(ReportJob::Final {
                    report: StatusReport {
                        pilot_id,
                        state: Some(PayloadState::Queued),
                        reason: Some(reason),
                        ..Default::default()
                    },
                    archive: None,
                });
                continue;
            }
            let reason = if p.record.account.is_some() {
                format!("pilot lost its helper connection while the payload ran: {why}")
            } else {
                format!("pilot lost its helper connection after sending the launch, before the helper answered; it may have started: {why}")
            };
            p.record.kill_reason = Some("helper_gone".into());
            p.record.reason = Some(format!("helper connection lost: {why}"));
            p.record.state = Some("lost".into());
            self.summary.lost += 1;
            p.reporter.send(ReportJob::Final {
                report: StatusReport {
                    pilot_id,
                    state: Some(PayloadState::Lost),
                    account: p.record.account.clone(),
                    uid: p.record.uid,
                    reason: Some(reason),
                    ..Default::default()
                },
                archive: Some(ArchiveSource {
                    outputs_b64: None,
                    stdout: p.dir.join("stdout"),
                    stderr: p.dir.join("stderr"),
                    dir: p.dir.clone(),
                }),
            });
        }
    }

    pub(super) fn on_reported(&mut self, r: Reported) {
        match r {
            Reported::Commands {
                payload_id,
                commands,
            } => {
                for c in commands {
                    self.on_command(&payload_id, c);
                }
            }
            Reported::Acked { payload_id } => {
                if let Some(p) = self.payloads.get_mut(&payload_id) {
                    p.running_acked = true;
                }
            }
            Reported::Stored { payload_id } => {
                if let Some(p) = self.payloads.get_mut(&payload_id) {
                    p.stored = true;
                }
            }
            Reported::Adopted { entry, upload } => self.on_adopted(*entry, upload),
            Reported::AdoptedAll => {
                self.adoption = None;
                if self.payloads.is_empty() {
                    self.idle_since = Instant::now();
                }
            }
            Reported::HeartbeatDone { payload_id } => {
                if let Some(p) = self.payloads.get_mut(&payload_id) {
                    p.heartbeat_busy = false;
                }
            }
            Reported::Finished { payload_id, upload } => {
                let Some(p) = self.payloads.remove(&payload_id) else {
                    // A payload that never reached the helper: its records are written.
                    self.detached.remove(&payload_id);
                    return;
                };
                if upload.as_deref().is_some_and(|u| u != "ok") {
                    self.summary.upload_errors += 1;
                }
                let mut rec = p.record;
                rec.time = now_rfc3339();
                rec.event = "end";
                rec.upload = upload;
                self.write_trace(&rec);
                if self.payloads.is_empty() {
                    self.idle_since = Instant::now();
                }
            }
        }
    }

    /// An entry of an earlier pilot's outbox was sent: a `delivered` trace record says what
    /// this pilot sent on whose behalf.
    fn on_adopted(&mut self, entry: crate::pilot::outbox::Entry, upload: Option<String>) {
        self.summary.adopted += 1;
        tracing::info!(payload_id = %entry.payload_id, from_pilot = %entry.report.pilot_id, state = ?entry.report.state, upload = ?upload, "delivered an earlier pilot's outbox entry");
        let rec = crate::pilot::trace::TraceRecord {
            time: now_rfc3339(),
            event: "delivered",
            pilot_id: self.cfg.pilot_id.clone(),
            host: self.cfg.host.clone(),
            server_url: self.cfg.server_url.clone(),
            batch_system: self.slot.batch_system.clone(),
            batch_job_id: self.slot.batch_job_id.clone(),
            slot: crate::pilot::trace::SlotFields {
                cores: self.slot.cores,
                memory_bytes: self.slot.memory_bytes,
                deadline_unix: self.slot.deadline_unix,
            },
            payload_id: entry.payload_id.clone(),
            reason: Some(format!(
                "sent from the outbox of pilot {} (written {}){}",
                entry.report.pilot_id,
                entry.written,
                entry
                    .report
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )),
            account: entry.report.account.clone(),
            uid: entry.report.uid,
            exit_code: entry.report.exit_code,
            signal: entry.report.signal,
            upload,
            state: entry.report.state.map(|s| s.as_str().to_string()),
            ..Default::default()
        };
        self.write_trace(&rec);
    }

    pub(super) fn on_command(&mut self, id: &str, c: OperatorCommand) {
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        if p.phase == Phase::Ending {
            return;
        }
        match c {
            // Signed by the VO server: the helper authorizes the requester and acts.
            OperatorCommand::Cancel {
                requester,
                signed: Some(signed),
            }
            | OperatorCommand::Signal {
                requester,
                signed: Some(signed),
                ..
            } => {
                if p.phase != Phase::Running {
                    return tracing::warn!(payload_id = %id, "operator command for a payload not running yet; ignored");
                }
                tracing::info!(payload_id = %id, %requester, "relaying a signed operator command");
                if claimed_action(&signed) == Some(CommandAction::Cancel) {
                    p.cancelled_by = Some(requester.clone());
                }
                if let Err(e) = self.helper.command(&signed) {
                    self.on_helper_lost(&e.to_string());
                }
            }
            OperatorCommand::Information {
                requester,
                request_id,
                signed,
            } => {
                let Some(signed) = signed.filter(|_| p.phase == Phase::Running) else {
                    tracing::warn!(payload_id = %id, %requester, "information request for a payload not running here yet (or unsigned); answered as such");
                    let why = "the pilot has not seen the payload start yet; ask again".into();
                    return self.report_information(id, request_id, false, why, None);
                };
                tracing::info!(payload_id = %id, %requester, "relaying a signed information request");
                p.info_pending.push(request_id);
                if let Err(e) = self.helper.command(&signed) {
                    self.on_helper_lost(&e.to_string());
                }
            }
            OperatorCommand::Unknown => {
                tracing::warn!(payload_id = %id, "the VO server sent a command this pilot does not know; ignored");
            }
            OperatorCommand::Cancel {
                requester,
                signed: None,
            } => {
                tracing::info!(payload_id = %id, %requester, "cancel requested");
                p.cancelled_by = Some(requester.clone());
                if p.phase == Phase::Running {
                    self.terminate(id, &format!("cancelled by {requester}"));
                }
            }
            OperatorCommand::Signal {
                requester,
                signal,
                signed: None,
            } => {
                if !(1..=64).contains(&signal) || p.phase != Phase::Running {
                    return tracing::warn!(payload_id = %id, signal, "operator signal ignored (out of range or not running)");
                }
                tracing::info!(payload_id = %id, %requester, signal, "relaying operator signal");
                let why = format!("signal {signal} requested by {requester}");
                if let Err(e) = self.helper.signal(id, signal, &why) {
                    self.on_helper_lost(&e.to_string());
                }
            }
        }
    }
}

/// The action a signed command claims (unverified: only to remember a cancel is under way;
/// the helper verifies and decides).
fn claimed_action(signed: &SignedCommand) -> Option<CommandAction> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&signed.body)
        .ok()?;
    serde_json::from_slice::<CommandBody>(&bytes)
        .ok()
        .map(|b| b.action)
}
