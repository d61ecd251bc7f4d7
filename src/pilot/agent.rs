//! The agent loop: fetch payloads that fit the slot, launch them through the helper, follow
//! them to their end, report, and stop cleanly.
//!
//! One task owns all state and reacts to four sources: helper events, control events (signals,
//! drain), reporter results and a short tick (drain file, deadline, kill escalation,
//! heartbeats). Network calls run on spawned tasks, so the loop never blocks on the server.
//! It never runs a payload itself: the only way to start one is [`HelperApi::launch`] (P6).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::client::{ClientError, ServerApi};
use super::fit::{seconds_left, Capacity};
use super::helper_client::{HelperApi, HelperMsg};
use super::reporter::{self, ArchiveSource, ReportJob, Reported};
use super::slot::Slot;
use super::trace::{peek_body, SlotFields, TraceLog, TraceRecord};
use crate::protocol::api::{MatchRequest, OperatorCommand, PayloadState, StatusReport, Work};
use crate::protocol::switch_wire::{DenialClass, ExitReport, SwitchEvent};
use crate::records::now_rfc3339;

/// SIGTERM and SIGKILL numbers as the helper expects them.
pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGKILL: i32 = libc::SIGKILL;

/// Tunables of the loop (from pilot.toml and flags; tests use short ones).
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub pilot_id: String,
    pub host: String,
    pub server_url: String,
    pub work_dir: PathBuf,
    pub poll_interval: Duration,
    pub idle_timeout: Duration,
    pub shutdown_margin: Duration,
    pub grace: Duration,
    /// Status heartbeat period for running payloads (operator commands come back on it).
    pub heartbeat: Duration,
    /// How long the helper may take to answer a launch before the pilot gives up on it.
    pub launch_timeout: Duration,
    /// Loop tick: drain file, deadline and escalation checks.
    pub tick: Duration,
    pub max_payloads: Option<u32>,
    pub drain_file: Option<PathBuf>,
}

/// Requests from outside the loop (signal handlers, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Graceful stop: TERM, then KILL after the grace time, final reports, exit.
    Stop(String),
    /// Finish what runs, fetch nothing new, exit.
    Drain(String),
}

/// Counts for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub launched: u32,
    pub done: u32,
    pub failed: u32,
    pub denied: u32,
    pub cancelled: u32,
    pub lost: u32,
    pub handed_back: u32,
    pub upload_errors: u32,
    pub end_reason: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ended ({}): {} launched, {} done, {} failed, {} denied, {} cancelled, {} lost, {} handed back, {} upload errors",
            self.end_reason,
            self.launched,
            self.done,
            self.failed,
            self.denied,
            self.cancelled,
            self.lost,
            self.handed_back,
            self.upload_errors
        )
    }
}

/// How the loop ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// 0 after a normal end (idle, drained, stopped, max payloads), 1 when the helper
    /// connection was lost or the trace log could not be written.
    pub exit_code: i32,
    pub summary: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sent to the helper; no answer yet.
    Launching,
    Running,
    /// Over; the reporter is sending the final state and the outputs.
    Ending,
}

struct Payload {
    record: TraceRecord,
    phase: Phase,
    launched_at: Instant,
    /// When SIGTERM went out (stop or cancel); SIGKILL follows after the grace time.
    term_at: Option<Instant>,
    killed: bool,
    cancelled_by: Option<String>,
    reporter: mpsc::UnboundedSender<ReportJob>,
    heartbeat_due: Instant,
    heartbeat_busy: bool,
    dir: PathBuf,
}

/// The loop and its state.
pub struct Agent<S: ServerApi, H: HelperApi> {
    cfg: AgentSettings,
    slot: Slot,
    server: Arc<S>,
    helper: Arc<H>,
    trace: TraceLog,
    capacity: Capacity,
    payloads: BTreeMap<String, Payload>,
    back_tx: mpsc::UnboundedSender<Reported>,
    match_tx: mpsc::UnboundedSender<Result<Option<Work>, ClientError>>,
    match_in_flight: bool,
    /// The in-flight match, aborted on a stop so a hanging server cannot delay it.
    match_task: Option<tokio::task::JoinHandle<()>>,
    next_match: Instant,
    idle_since: Instant,
    launches: u32,
    stopping: bool,
    draining: bool,
    helper_lost: bool,
    trace_failed: bool,
    summary: Summary,
}

/// Runs the agent until it ends; see [`Outcome`].
pub async fn run<S: ServerApi, H: HelperApi>(
    cfg: AgentSettings,
    slot: Slot,
    server: Arc<S>,
    helper: Arc<H>,
    mut helper_rx: mpsc::UnboundedReceiver<HelperMsg>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
    trace: TraceLog,
) -> Outcome {
    let (back_tx, mut back_rx) = mpsc::unbounded_channel();
    let (match_tx, mut match_rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut a = Agent {
        capacity: Capacity::new(slot.cores, slot.memory_bytes),
        cfg,
        slot,
        server,
        helper,
        trace,
        payloads: BTreeMap::new(),
        back_tx,
        match_tx,
        match_in_flight: false,
        match_task: None,
        next_match: now,
        idle_since: now,
        launches: 0,
        stopping: false,
        draining: false,
        helper_lost: false,
        trace_failed: false,
        summary: Summary::default(),
    };
    let mut helper_open = true;
    loop {
        a.on_tick();
        if let Some(code) = a.finished() {
            return Outcome {
                exit_code: code,
                summary: a.summary,
            };
        }
        a.maybe_match();
        tokio::select! {
            msg = helper_rx.recv(), if helper_open => match msg {
                Some(HelperMsg::Event(ev)) => a.on_helper_event(ev),
                Some(HelperMsg::Closed(why)) => { helper_open = false; a.on_helper_lost(&why) }
                None => { helper_open = false; a.on_helper_lost("helper reader ended") }
            },
            Some(c) = control_rx.recv() => a.on_control(c),
            Some(r) = back_rx.recv() => a.on_reported(r),
            Some(m) = match_rx.recv() => a.on_matched(m),
            _ = tokio::time::sleep(a.cfg.tick) => {}
        }
    }
}

impl<S: ServerApi, H: HelperApi> Agent<S, H> {
    fn fetching(&self) -> bool {
        !self.stopping
            && !self.draining
            && !self.helper_lost
            && !self.trace_failed
            && self.cfg.max_payloads.map_or(true, |m| self.launches < m)
    }

    fn seconds_left(&self) -> u64 {
        seconds_left(
            self.slot.deadline_unix,
            chrono::Utc::now().timestamp(),
            self.cfg.shutdown_margin,
        )
    }

    /// The exit code once nothing is left to wait for.
    fn finished(&mut self) -> Option<i32> {
        if !self.payloads.is_empty() || self.match_in_flight {
            return None;
        }
        let (code, why) = if self.helper_lost {
            (1, "helper connection lost")
        } else if self.trace_failed {
            (1, "trace log not writable")
        } else if self.stopping {
            (0, "stopped")
        } else if self.draining {
            (0, "drained")
        } else if !self.fetching() {
            (0, "max payloads reached")
        } else if self.idle_since.elapsed() >= self.cfg.idle_timeout {
            (0, "idle timeout")
        } else {
            return None;
        };
        if self.summary.end_reason.is_empty() {
            self.summary.end_reason = why.to_string();
        }
        Some(code)
    }

    fn maybe_match(&mut self) {
        if !self.fetching()
            || self.match_in_flight
            || Instant::now() < self.next_match
            || !self.capacity.has_room()
        {
            return;
        }
        let seconds_left = self.seconds_left();
        if seconds_left == 0 {
            return;
        }
        let req = MatchRequest {
            pilot_id: self.cfg.pilot_id.clone(),
            batch_system: self.slot.batch_system.clone(),
            batch_job_id: self.slot.batch_job_id.clone(),
            host: self.cfg.host.clone(),
            free_cores: self.capacity.free_cores(),
            free_memory_bytes: self.capacity.free_memory_bytes(),
            seconds_left,
        };
        self.match_in_flight = true;
        let server = self.server.clone();
        let tx = self.match_tx.clone();
        self.match_task = Some(tokio::spawn(async move {
            let _ = tx.send(server.match_work(req).await);
        }));
    }

    fn on_matched(&mut self, m: Result<Option<Work>, ClientError>) {
        self.match_in_flight = false;
        match m {
            Ok(Some(work)) => {
                self.idle_since = Instant::now();
                self.next_match = Instant::now();
                self.on_work(work);
            }
            Ok(None) => self.next_match = Instant::now() + self.cfg.poll_interval,
            Err(e) => {
                tracing::error!(error = %e, "asking the VO server for work failed");
                self.next_match = Instant::now() + self.cfg.poll_interval;
            }
        }
    }

    fn base_record(&self, work: &Work) -> TraceRecord {
        let now = now_rfc3339();
        TraceRecord {
            time: now.clone(),
            event: "start",
            pilot_id: self.cfg.pilot_id.clone(),
            host: self.cfg.host.clone(),
            server_url: self.cfg.server_url.clone(),
            batch_system: self.slot.batch_system.clone(),
            batch_job_id: self.slot.batch_job_id.clone(),
            slot: SlotFields {
                cores: self.slot.cores,
                memory_bytes: self.slot.memory_bytes,
                deadline_unix: self.slot.deadline_unix,
            },
            payload_id: work.payload_id.clone(),
            envelope_sha256: work.envelope.digest().ok(),
            match_time: now,
            ..Default::default()
        }
    }

    fn write_trace(&mut self, rec: &TraceRecord) {
        if let Err(e) = self.trace.write(rec) {
            // No record, no launch (P4): stop fetching, finish what runs, exit non-zero.
            tracing::error!(error = %e, "cannot write the trace log; the pilot stops fetching work");
            self.trace_failed = true;
        }
    }

    /// Writes start and end at once for a payload that never reached the helper.
    fn not_launched(&mut self, mut rec: TraceRecord, state: PayloadState, reason: String) {
        self.write_trace(&rec);
        let report = StatusReport {
            pilot_id: self.cfg.pilot_id.clone(),
            state: Some(state),
            reason: Some(reason.clone()),
            ..Default::default()
        };
        let tx = reporter::spawn(
            self.server.clone(),
            rec.payload_id.clone(),
            self.back_tx.clone(),
        );
        let _ = tx.send(ReportJob::Final {
            report,
            archive: None,
        });
        rec.time = now_rfc3339();
        rec.event = "end";
        rec.decision = Some("not_launched");
        rec.reason = Some(reason);
        rec.state = Some(state.as_str().into());
        self.write_trace(&rec);
    }

    fn on_work(&mut self, work: Work) {
        let id = work.payload_id.clone();
        if !crate::util::is_safe_id(&id) || self.payloads.contains_key(&id) {
            tracing::error!(payload_id = %id, "VO server sent a payload id that is unsafe or already running; ignored");
            return;
        }
        let mut rec = self.base_record(&work);
        let body = match peek_body(&work.envelope) {
            Ok(b) => b,
            Err(why) => {
                self.summary.failed += 1;
                let reason = format!("pilot cannot read the envelope: {why}");
                return self.not_launched(rec, PayloadState::Failed, reason);
            }
        };
        rec.owner_dn = Some(body.owner.dn.clone());
        rec.vo = Some(body.owner.vo.clone());
        rec.fqans = body.owner.fqans.clone();
        rec.jobtag = body.jobtag.clone();
        rec.bundle_sha256 = body.bundle_sha256.clone();
        if body.payload_id != id {
            self.summary.failed += 1;
            let reason = format!("envelope is for payload '{}', not '{id}'", body.payload_id);
            return self.not_launched(rec, PayloadState::Failed, reason);
        }
        let span = tracing::info_span!("payload", payload_id = %id, owner = %body.owner.dn);
        let _g = span.enter();
        if !self.fetching() {
            self.summary.handed_back += 1;
            let reason = format!("handed back: pilot {} is ending", self.cfg.pilot_id);
            return self.not_launched(rec, PayloadState::Queued, reason);
        }
        if let Some(why) = self.capacity.misfit(&body.resources, self.seconds_left()) {
            tracing::warn!(%why, "payload does not fit; handed back");
            self.summary.handed_back += 1;
            // The server should not have sent it; do not ask again at once.
            self.next_match = Instant::now() + self.cfg.poll_interval;
            let reason = format!("handed back by pilot {}: {why}", self.cfg.pilot_id);
            return self.not_launched(rec, PayloadState::Queued, reason);
        }
        let dir = self.cfg.work_dir.join(&id);
        let files = open_output_files(&dir);
        let (stdout, stderr) = match files {
            Ok(f) => f,
            Err(e) => {
                self.summary.failed += 1;
                let reason = format!("pilot cannot create {}: {e}", dir.display());
                return self.not_launched(rec, PayloadState::Failed, reason);
            }
        };
        self.write_trace(&rec);
        if self.trace_failed {
            self.summary.failed += 1;
            let reason = "pilot cannot write its trace log".to_string();
            return self.not_launched(rec, PayloadState::Failed, reason);
        }
        let reporter = reporter::spawn(self.server.clone(), id.clone(), self.back_tx.clone());
        self.capacity.hold(&id, body.resources);
        self.payloads.insert(
            id.clone(),
            Payload {
                record: rec,
                phase: Phase::Launching,
                launched_at: Instant::now(),
                term_at: None,
                killed: false,
                cancelled_by: None,
                reporter,
                heartbeat_due: Instant::now() + self.cfg.heartbeat,
                heartbeat_busy: false,
                dir,
            },
        );
        self.launches += 1;
        self.summary.launched += 1;
        tracing::info!(
            cores = body.resources.cores,
            memory_bytes = body.resources.memory_bytes,
            "launching through the helper"
        );
        if let Err(e) = self
            .helper
            .launch(&work.envelope, work.bundle.as_deref(), &stdout, &stderr)
        {
            self.on_helper_lost(&e.to_string());
        }
    }

    fn on_helper_event(&mut self, ev: SwitchEvent) {
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
            SwitchEvent::Welcome { .. } | SwitchEvent::Running { .. } => {}
        }
    }

    fn on_started(&mut self, id: String, account: String, uid: u32, cgroup: String, pid: i32) {
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
        let _ = p.reporter.send(ReportJob::Status {
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

    fn on_denied(&mut self, id: String, class: DenialClass, reason: String) {
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
        tracing::warn!(payload_id = %id, class = class.as_str(), %reason, "helper denied the payload; final");
        self.capacity.release(&id);
        p.phase = Phase::Ending;
        p.record.decision = Some("deny");
        p.record.denial_class = Some(class.as_str().into());
        p.record.reason = Some(reason.clone());
        p.record.state = Some("denied".into());
        self.summary.denied += 1;
        let _ = p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(PayloadState::Denied),
                reason: Some(reason),
                denial_class: Some(class.as_str().into()),
                ..Default::default()
            },
            archive: None,
        });
    }

    fn on_exited(&mut self, id: String, r: ExitReport) {
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
        p.record.peak_memory_bytes = Some(r.peak_memory_bytes);
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
        let _ = p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(state),
                account: p.record.account.clone(),
                uid: p.record.uid,
                exit_code: r.exit_code,
                signal: r.signal,
                cpu_seconds: Some(r.cpu_seconds),
                peak_memory_bytes: Some(r.peak_memory_bytes),
                wall_seconds: Some(r.wall_seconds),
                reason: reason.or(r.kill_reason),
                denial_class: None,
            },
            archive: Some(archive),
        });
    }

    /// The helper is gone, and with it our payloads (it kills them when the pilot's
    /// connection closes, and we cannot reach them without it).
    fn on_helper_lost(&mut self, why: &str) {
        if self.helper_lost {
            return;
        }
        tracing::error!(reason = %why, "connection to the helper lost; its payloads are killed; reporting them lost");
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
            let p = self.payloads.get_mut(&id).expect("listed above");
            p.phase = Phase::Ending;
            p.record.kill_reason = Some("helper_gone".into());
            p.record.reason = Some(format!("helper connection lost: {why}"));
            p.record.state = Some("lost".into());
            self.summary.lost += 1;
            let _ = p.reporter.send(ReportJob::Final {
                report: StatusReport {
                    pilot_id: self.cfg.pilot_id.clone(),
                    state: Some(PayloadState::Lost),
                    account: p.record.account.clone(),
                    uid: p.record.uid,
                    reason: Some(format!("pilot lost its helper connection: {why}")),
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

    fn on_reported(&mut self, r: Reported) {
        match r {
            Reported::Commands {
                payload_id,
                commands,
            } => {
                for c in commands {
                    self.on_command(&payload_id, c);
                }
            }
            Reported::HeartbeatDone { payload_id } => {
                if let Some(p) = self.payloads.get_mut(&payload_id) {
                    p.heartbeat_busy = false;
                }
            }
            Reported::Finished { payload_id, upload } => {
                let Some(p) = self.payloads.remove(&payload_id) else {
                    return; // not_launched reporters: records already written
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

    fn on_command(&mut self, id: &str, c: OperatorCommand) {
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        if p.phase == Phase::Ending {
            return;
        }
        match c {
            OperatorCommand::Cancel { requester } => {
                tracing::info!(payload_id = %id, %requester, "cancel requested");
                p.cancelled_by = Some(requester.clone());
                if p.phase == Phase::Running {
                    self.terminate(id, &format!("cancelled by {requester}"));
                }
            }
            OperatorCommand::Signal { requester, signal } => {
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

    /// SIGTERM now; the tick sends SIGKILL after the grace time.
    fn terminate(&mut self, id: &str, why: &str) {
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        if p.term_at.is_some() || p.phase != Phase::Running {
            return;
        }
        p.term_at = Some(Instant::now());
        if let Err(e) = self.helper.signal(id, SIGTERM, why) {
            self.on_helper_lost(&e.to_string());
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Stop(why) if self.stopping => {
                tracing::warn!(reason = %why, "second stop request: killing payloads now");
                let ids: Vec<String> = self.running_ids();
                for id in ids {
                    self.kill(&id);
                }
            }
            Control::Stop(why) => {
                tracing::info!(reason = %why, "graceful stop: no more work, terminating payloads");
                self.stopping = true;
                self.summary.end_reason = format!("stopped: {why}");
                if let Some(t) = self.match_task.take() {
                    // A payload the server matched to us in the meantime stays `matched` on
                    // the server until its envelope expires; nothing runs it.
                    t.abort();
                    self.match_in_flight = false;
                }
                for id in self.running_ids() {
                    self.terminate(&id, &format!("pilot stopping: {why}"));
                }
            }
            Control::Drain(why) => {
                if !self.draining {
                    tracing::info!(reason = %why, "draining: finishing running payloads, fetching no more");
                    self.draining = true;
                    if self.summary.end_reason.is_empty() {
                        self.summary.end_reason = format!("drained: {why}");
                    }
                }
            }
        }
    }

    fn running_ids(&self) -> Vec<String> {
        self.payloads
            .iter()
            .filter(|(_, p)| p.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn kill(&mut self, id: &str) {
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        if p.killed {
            return;
        }
        p.killed = true;
        if let Err(e) = self.helper.signal(id, SIGKILL, "grace time over") {
            self.on_helper_lost(&e.to_string());
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if !self.draining {
            if let Some(f) = &self.cfg.drain_file {
                if f.exists() {
                    let why = format!("drain file {} appeared", f.display());
                    self.on_control(Control::Drain(why));
                }
            }
        }
        if !self.stopping {
            if let Some(d) = self.slot.deadline_unix {
                let margin = self.cfg.shutdown_margin.as_secs() as i64;
                if chrono::Utc::now().timestamp() >= d - margin {
                    self.on_control(Control::Stop("slot deadline minus shutdown margin".into()));
                }
            }
        }
        let mut to_kill = Vec::new();
        let mut to_fail = Vec::new();
        for (id, p) in &mut self.payloads {
            match p.phase {
                Phase::Running => {
                    if p.term_at.is_some_and(|t| now >= t + self.cfg.grace) && !p.killed {
                        to_kill.push(id.clone());
                    }
                    if now >= p.heartbeat_due && !p.heartbeat_busy {
                        p.heartbeat_due = now + self.cfg.heartbeat;
                        p.heartbeat_busy = true;
                        let _ = p.reporter.send(ReportJob::Status {
                            report: StatusReport {
                                pilot_id: self.cfg.pilot_id.clone(),
                                state: Some(PayloadState::Running),
                                account: p.record.account.clone(),
                                uid: p.record.uid,
                                ..Default::default()
                            },
                            heartbeat: true,
                        });
                    }
                }
                Phase::Launching if now >= p.launched_at + self.cfg.launch_timeout => {
                    to_fail.push(id.clone());
                }
                _ => {}
            }
        }
        for id in to_kill {
            tracing::warn!(payload_id = %id, "grace time over: SIGKILL");
            self.kill(&id);
        }
        for id in to_fail {
            self.launch_timed_out(&id);
        }
    }

    fn launch_timed_out(&mut self, id: &str) {
        let reason = format!(
            "the helper did not answer the launch within {} s",
            self.cfg.launch_timeout.as_secs()
        );
        tracing::error!(payload_id = %id, %reason, "launch timed out");
        self.capacity.release(id);
        self.summary.failed += 1;
        let pilot_id = self.cfg.pilot_id.clone();
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        p.phase = Phase::Ending;
        p.record.decision = Some("not_launched");
        p.record.reason = Some(reason.clone());
        p.record.state = Some("failed".into());
        let _ = p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id,
                state: Some(PayloadState::Failed),
                reason: Some(reason),
                ..Default::default()
            },
            archive: None,
        });
        // If it starts after all, on_started kills it: the pilot no longer supervises it.
    }
}

/// Creates work_dir/<id>/ (0700) and its stdout and stderr files (0600).
fn open_output_files(dir: &std::path::Path) -> std::io::Result<(File, File)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let open = |name| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    Ok((open("stdout")?, open("stderr")?))
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
