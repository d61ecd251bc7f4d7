//! The agent loop: fetch payloads that fit the slot, launch them through the helper, follow
//! them to their end, report, and stop cleanly.
//!
//! One task owns all state and reacts to four sources: helper events, control events (signals,
//! drain), reporter results and a short tick (drain file, deadline, kill escalation,
//! heartbeats). Network calls run on spawned tasks, so the loop never blocks on the server.
//! It never runs a payload itself: the only way to start one is [`HelperApi::launch`] (P6).
//!
//! This file holds the state, the loop, matching and launching; `events` the reactions to
//! helper events, reports and operator commands; `stop` stopping, draining and the tick.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock (the monotonic clock, unless a test paused it): the agent's tests run on
// paused time, so every wait of the loop is exact and instant there.
use tokio::time::Instant;

use tokio::sync::mpsc;

use super::client::{ClientError, ServerApi};
use super::fit::{seconds_left, Capacity};
use super::helper_client::{HelperApi, HelperMsg};
use super::outbox::Outbox;
use super::reporter::{self, Patience, ReportJob, Reported, Reporter};
use super::slot::Slot;
use super::trace::{peek_body, SlotFields, TraceLog, TraceRecord};
use crate::protocol::api::{MatchRequest, PayloadState, StatusReport, Work};
use crate::protocol::switch_wire::PayloadUsage;
use crate::records::now_rfc3339;

mod events;
mod proxy;
mod stop;

/// How long due heartbeats wait for the helper's usage answer before they go without it (the
/// helper answers `status` in well under a millisecond; a busy one must not delay a
/// heartbeat the server counts).
pub const USAGE_WAIT: Duration = Duration::from_secs(1);

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
    /// What the pilot keeps of its slot's end for writing its last records and leaving: the
    /// outbox is retried until the deadline minus this.
    pub upload_reserve: Duration,
    /// With nothing else to do, how long the pilot keeps retrying its outbox (the slot's
    /// deadline minus `upload_reserve` ends it earlier; a stop request after `grace`).
    pub outbox_wait: Duration,
    /// Retry schedule of the outbox.
    pub patience: Patience,
    /// How long before a payload's delegated proxy expires it is renewed (at most half its
    /// life).
    pub proxy_renew_margin: Duration,
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
    /// Final states (and outputs) left undelivered in the outbox when the pilot left.
    pub unsent: u32,
    /// Entries of earlier pilots' outboxes this pilot delivered.
    pub adopted: u32,
    pub end_reason: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ended ({}): {} launched, {} done, {} failed, {} denied, {} cancelled, {} lost, {} handed back, {} upload errors, {} unsent, {} adopted",
            self.end_reason,
            self.launched,
            self.done,
            self.failed,
            self.denied,
            self.cancelled,
            self.lost,
            self.handed_back,
            self.upload_errors,
            self.unsent,
            self.adopted
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
    reporter: Reporter,
    heartbeat_due: Instant,
    heartbeat_busy: bool,
    /// The heartbeat the server asked for this payload (or the pilot's own).
    heartbeat: Duration,
    /// The server knows the payload runs (it took a `running` report).
    running_acked: bool,
    /// Its usage as the helper last reported it (`status`), sent with each heartbeat.
    usage: Option<PayloadUsage>,
    /// The server takes live usage and information answers (the match answer said so).
    server_live: bool,
    /// Information requests relayed to the helper and not answered yet (their ids).
    info_pending: Vec<String>,
    /// When the server queues it again unless it hears it started (from the match answer).
    requeue_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the pilot stopped it, when it was the pilot's own decision.
    stop_reason: Option<String>,
    /// The final state is in the outbox.
    stored: bool,
    /// The launch request was written to the helper whole (it may have acted on it). A
    /// payload whose launch never got there is handed back unstarted, not lost.
    reached_helper: bool,
    dir: PathBuf,
    /// The payload's delegated proxy (envelopes with `credential` only).
    proxy: Option<proxy::ProxyState>,
}

/// The loop and its state.
pub struct Agent<S: ServerApi, H: HelperApi> {
    cfg: AgentSettings,
    slot: Slot,
    server: Arc<S>,
    helper: Arc<H>,
    trace: TraceLog,
    outbox: Arc<Outbox>,
    /// The task sending earlier pilots' outbox entries, while it runs.
    adoption: Option<tokio::task::AbortHandle>,
    /// Reporters of payloads that ended before they reached the helper (their records are
    /// written), until their final report is delivered.
    detached: BTreeMap<String, tokio::task::AbortHandle>,
    /// When the pilot leaves even with undelivered reports (set once nothing else is left).
    leave_at: Option<Instant>,
    capacity: Capacity,
    payloads: BTreeMap<String, Payload>,
    back_tx: mpsc::UnboundedSender<Reported>,
    match_tx: mpsc::UnboundedSender<Result<Option<Work>, ClientError>>,
    /// The VO server's answers to proxy CSRs.
    proxy_tx: mpsc::UnboundedSender<proxy::Issued>,
    match_in_flight: bool,
    /// When the pilot asked the helper for its payloads' usage and has no answer yet: due
    /// heartbeats wait for it (at most [`USAGE_WAIT`]).
    usage_asked: Option<Instant>,
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

/// What the pilot writes down: the trace log (the VO's record of what ran) and the outbox
/// (what it still owes the server).
pub struct Ledger {
    pub trace: TraceLog,
    pub outbox: Outbox,
}

/// Runs the agent until it ends; see [`Outcome`].
pub async fn run<S: ServerApi, H: HelperApi>(
    cfg: AgentSettings,
    slot: Slot,
    server: Arc<S>,
    helper: Arc<H>,
    mut helper_rx: mpsc::UnboundedReceiver<HelperMsg>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
    ledger: Ledger,
) -> Outcome {
    let Ledger { trace, outbox } = ledger;
    let (back_tx, mut back_rx) = mpsc::unbounded_channel();
    // What earlier pilots in this work dir could not deliver goes first.
    let adopted = super::outbox::adopt(&cfg.work_dir, &cfg.pilot_id);
    let mut adoption = None;
    if !adopted.is_empty() {
        let n: usize = adopted.iter().map(|o| o.entries().len()).sum();
        tracing::warn!(
            entries = n,
            "sending what earlier pilots left in this work dir's outbox"
        );
        adoption = Some(reporter::spawn_adopted(
            server.clone(),
            adopted,
            cfg.pilot_id.clone(),
            cfg.patience,
            back_tx.clone(),
        ));
    }
    let (match_tx, mut match_rx) = mpsc::unbounded_channel();
    let (proxy_tx, mut proxy_rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut a = Agent {
        capacity: Capacity::new(slot.cores, slot.memory_bytes),
        cfg,
        slot,
        server,
        helper,
        trace,
        outbox: Arc::new(outbox),
        adoption,
        detached: BTreeMap::new(),
        leave_at: None,
        payloads: BTreeMap::new(),
        back_tx,
        match_tx,
        proxy_tx,
        match_in_flight: false,
        usage_asked: None,
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
            // Everything delivered: the pilot's outbox directory goes (an aborted reporter
            // may still hold it for a moment; the next pilot then removes it).
            if let Ok(outbox) = Arc::try_unwrap(a.outbox) {
                outbox.remove_if_empty();
            }
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
            Some(i) = proxy_rx.recv() => a.on_proxy_issued(i),
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
            && self.cfg.max_payloads.is_none_or(|m| self.launches < m)
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
        if self.match_in_flight {
            return None;
        }
        let would_end = !self.fetching() || self.idle_since.elapsed() >= self.cfg.idle_timeout;
        if !self.payloads.is_empty() || self.adoption.is_some() || !self.detached.is_empty() {
            // Only undelivered reports left, and nothing else to do? They are in the outbox:
            // wait for the server until the pilot must leave, then leave them to the next
            // pilot in this work dir.
            let only_outbox = self
                .payloads
                .values()
                .all(|p| p.phase == Phase::Ending && p.stored);
            if !would_end || !only_outbox {
                self.leave_at = None;
                return None;
            }
            let leave_at = match self.leave_at {
                Some(t) => t,
                None => *self.leave_at.insert(self.outbox_leave_at()),
            };
            if Instant::now() < leave_at {
                return None;
            }
            self.leave_with_unsent();
        }
        let (code, why) = if self.helper_lost {
            (1, "helper connection lost")
        } else if self.trace_failed
            && !self.stopping
            && !self.draining
            && self.idle_since.elapsed() < self.cfg.idle_timeout
        {
            // Trace records wait in memory for the log's disk: stay (fetching nothing) until
            // it takes them, or until the pilot must go anyway.
            return None;
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
        // Final states left in the outbox: the VO's records are incomplete until a later
        // pilot sends them, which the batch system's exit status should show.
        Some(if self.summary.unsent > 0 {
            code.max(1)
        } else {
            code
        })
    }

    /// When a pilot with nothing left but its outbox leaves: after `outbox_wait` (`grace`
    /// when it was asked to stop), and never later than the slot's deadline minus
    /// `upload_reserve`.
    fn outbox_leave_at(&self) -> Instant {
        let wait = if self.stopping {
            self.cfg.grace
        } else {
            self.cfg.outbox_wait
        };
        let mut at = Instant::now() + wait;
        if let Some(d) = self.slot.deadline_unix {
            let left =
                d - self.cfg.upload_reserve.as_secs() as i64 - chrono::Utc::now().timestamp();
            at = at.min(Instant::now() + Duration::from_secs(left.max(0) as u64));
        }
        at
    }

    /// Leaves with reports undelivered: each payload's end record says where they are, and a
    /// later pilot in the same work dir sends them.
    fn leave_with_unsent(&mut self) {
        let ids: Vec<String> = self.payloads.keys().cloned().collect();
        tracing::error!(
            unsent = ids.len(),
            outbox = %self.outbox.dir().display(),
            payloads = ?ids,
            "leaving with final states the VO server has not taken; they stay in the outbox and the next pilot started in this work dir sends them"
        );
        for id in ids {
            let p = self.payloads.remove(&id).expect("listed above");
            // Its entry is on disk; the task must let go of the outbox for the next pilot.
            p.reporter.task.abort();
            self.summary.unsent += 1;
            let mut rec = p.record;
            rec.time = now_rfc3339();
            rec.event = "end";
            rec.upload = Some(format!(
                "unsent: the VO server did not take the final state before the pilot had to leave; kept in {}",
                self.outbox.dir().display()
            ));
            self.write_trace(&rec);
        }
        for (id, task) in std::mem::take(&mut self.detached) {
            tracing::error!(payload_id = %id, "leaving with the report of a payload that never started undelivered; kept in the outbox");
            task.abort();
            self.summary.unsent += 1;
        }
        if let Some(task) = self.adoption.take() {
            tracing::error!(outbox = %super::outbox::root(&self.cfg.work_dir).display(), "leaving before earlier pilots' outbox entries were delivered; they stay for the next pilot");
            task.abort();
        }
        if self.summary.end_reason.is_empty() {
            self.summary.end_reason = "VO server unreachable".into();
        }
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
            // No record, no launch (P4): fetch nothing until the log takes the records kept in
            // memory (`retry_trace`), finish what runs.
            if !self.trace_failed {
                tracing::error!(error = %e, "cannot write the trace log; the pilot fetches no work until it can");
            }
            self.trace_failed = true;
        }
    }

    /// While the trace log fails: writes the records kept in memory; once it takes them,
    /// fetching resumes.
    fn retry_trace(&mut self) {
        if self.trace_failed && self.trace.retry() {
            tracing::warn!(
                "trace log writable again; its kept records are written and fetching resumes"
            );
            self.trace_failed = false;
            self.idle_since = Instant::now();
        }
    }

    /// Writes start and end at once for a payload that never reached the helper.
    fn not_launched(&mut self, rec: TraceRecord, state: PayloadState, reason: String) {
        self.write_trace(&rec);
        self.end_not_launched(rec, state, reason);
    }

    /// Reports and records the end of a payload whose start record is written (or kept).
    fn end_not_launched(&mut self, mut rec: TraceRecord, state: PayloadState, reason: String) {
        let report = StatusReport {
            pilot_id: self.cfg.pilot_id.clone(),
            state: Some(state),
            reason: Some(reason.clone()),
            ..Default::default()
        };
        let reporter = reporter::spawn(
            self.server.clone(),
            self.outbox.clone(),
            self.cfg.patience,
            rec.payload_id.clone(),
            self.back_tx.clone(),
        );
        reporter.send(ReportJob::Final {
            report,
            archive: None,
        });
        self.detached
            .insert(rec.payload_id.clone(), reporter.task.clone());
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
            // It never ran: another pilot may run it.
            self.summary.handed_back += 1;
            let reason = format!(
                "handed back: pilot {} cannot write its trace log",
                self.cfg.pilot_id
            );
            return self.end_not_launched(rec, PayloadState::Queued, reason);
        }
        let reporter = reporter::spawn(
            self.server.clone(),
            self.outbox.clone(),
            self.cfg.patience,
            id.clone(),
            self.back_tx.clone(),
        );
        // The server's interval is the longest silence it tolerates before it counts a
        // missed heartbeat; a shorter one of the pilot's own is kept (commands come back
        // sooner).
        let heartbeat = work.heartbeat_seconds.map_or(self.cfg.heartbeat, |s| {
            self.cfg.heartbeat.min(Duration::from_secs(s.max(1)))
        });
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
                heartbeat_due: Instant::now() + heartbeat,
                heartbeat_busy: false,
                heartbeat,
                running_acked: false,
                usage: None,
                server_live: work.live_usage,
                info_pending: Vec::new(),
                requeue_after: work.requeue_after,
                stop_reason: None,
                stored: false,
                reached_helper: false,
                dir,
                proxy: None,
            },
        );
        self.launches += 1;
        self.summary.launched += 1;
        tracing::info!(
            cores = body.resources.cores,
            memory_bytes = body.resources.memory_bytes,
            "launching through the helper"
        );
        if body.credential.is_some() {
            // The helper makes the payload's key; its CSR goes to the server, the chain comes
            // back with the launch (agent/proxy.rs). Until then the launch waits here.
            if let Some(p) = self.payloads.get_mut(&id) {
                p.proxy = Some(proxy::ProxyState {
                    launch: Some(proxy::PendingLaunch {
                        envelope: work.envelope.clone(),
                        bundle: work.bundle.clone(),
                        stdout,
                        stderr,
                    }),
                    ..Default::default()
                });
            }
            if let Err(e) = self.helper.proxy_request(&work.envelope) {
                self.on_helper_lost(&e.to_string());
            }
            return;
        }
        match self
            .helper
            .launch(&work.envelope, work.bundle.as_deref(), &stdout, &stderr)
        {
            Ok(()) => {
                if let Some(p) = self.payloads.get_mut(&id) {
                    p.reached_helper = true;
                }
            }
            // A frame the helper did not get whole is one it cannot act on.
            Err(e) => self.on_helper_lost(&e.to_string()),
        }
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
mod tests;
