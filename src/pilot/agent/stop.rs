//! Stopping: graceful stop and drain requests, SIGTERM then SIGKILL through the helper, and
//! the periodic checks (drain file, slot deadline, grace time, heartbeats, launch timeouts).

use tokio::time::Instant;

use super::{Agent, Control, Phase, SIGKILL, SIGTERM, USAGE_WAIT};
use crate::pilot::client::ServerApi;
use crate::pilot::helper_client::HelperApi;
use crate::pilot::reporter::ReportJob;
use crate::protocol::api::{PayloadState, StatusReport};
use crate::protocol::switch_wire::PayloadUsage;

impl<S: ServerApi, H: HelperApi> Agent<S, H> {
    /// SIGTERM now; the tick sends SIGKILL after the grace time.
    pub(super) fn terminate(&mut self, id: &str, why: &str) {
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

    pub(super) fn on_control(&mut self, c: Control) {
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

    pub(super) fn running_ids(&self) -> Vec<String> {
        self.payloads
            .iter()
            .filter(|(_, p)| p.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(super) fn kill(&mut self, id: &str) {
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

    pub(super) fn on_tick(&mut self) {
        self.retry_trace();
        self.renew_proxies();
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
        let mut to_fence = Vec::new();
        let utc_now = chrono::Utc::now();
        let mut heartbeat_due = false;
        for (id, p) in &mut self.payloads {
            match p.phase {
                Phase::Running => {
                    if p.term_at.is_some_and(|t| now >= t + self.cfg.grace) && !p.killed {
                        to_kill.push(id.clone());
                    }
                    if !p.running_acked
                        && p.term_at.is_none()
                        && p.requeue_after
                            .is_some_and(|t| utc_now >= t - fence_margin(self.cfg.grace))
                    {
                        to_fence.push(id.clone());
                    }
                    if now >= p.heartbeat_due && !p.heartbeat_busy {
                        heartbeat_due = true;
                    }
                }
                Phase::Launching if now >= p.launched_at + self.cfg.launch_timeout => {
                    to_fail.push(id.clone());
                }
                _ => {}
            }
        }
        if heartbeat_due {
            self.heartbeat_round(now);
        }
        for id in to_kill {
            tracing::warn!(payload_id = %id, "grace time over: SIGKILL");
            self.kill(&id);
        }
        for id in to_fail {
            self.launch_timed_out(&id);
        }
        for id in to_fence {
            let reason = "stopped by the pilot: the VO server could not be told that it started before the time it queues unstarted payloads again (requeue_after), so it must not run on here while another pilot may start it".to_string();
            tracing::error!(payload_id = %id, %reason, "stopping the payload so it never runs twice");
            if let Some(p) = self.payloads.get_mut(&id) {
                p.stop_reason = Some(reason.clone());
            }
            self.terminate(&id, &reason);
        }
    }

    /// A heartbeat is due: first ask the helper once for every payload's usage (the
    /// heartbeats go out with its `running` answer, [`Agent::send_heartbeats`]); if it has
    /// not answered within [`USAGE_WAIT`], they go with the usage last heard.
    fn heartbeat_round(&mut self, now: Instant) {
        match self.usage_asked {
            None => {
                self.usage_asked = Some(now);
                if let Err(e) = self.helper.status() {
                    self.on_helper_lost(&e.to_string());
                }
            }
            Some(asked) if now >= asked + USAGE_WAIT => {
                tracing::warn!("the helper did not report usage in time; heartbeats go with the last usage heard");
                self.usage_asked = None;
                self.send_heartbeats(now, false);
            }
            Some(_) => {}
        }
    }

    /// Sends the heartbeat of every running payload that is due, with its usage; with
    /// `early`, also of those due within half their interval, so the heartbeats of payloads
    /// started at different times fall into one round (one usage request per round). A
    /// heartbeat earlier than asked is harmless: the server wants one *at least* that often.
    pub(super) fn send_heartbeats(&mut self, now: Instant, early: bool) {
        for p in self.payloads.values_mut() {
            if p.phase != Phase::Running || p.heartbeat_busy {
                continue;
            }
            let due = now >= p.heartbeat_due || (early && now + p.heartbeat / 2 >= p.heartbeat_due);
            if !due {
                continue;
            }
            p.heartbeat_due = now + p.heartbeat;
            p.heartbeat_busy = true;
            let mut report = StatusReport {
                pilot_id: self.cfg.pilot_id.clone(),
                state: Some(PayloadState::Running),
                account: p.record.account.clone(),
                uid: p.record.uid,
                ..Default::default()
            };
            add_usage(&mut report, p.usage, p.server_live);
            p.reporter.send(ReportJob::Status {
                report,
                heartbeat: true,
            });
        }
    }

    pub(super) fn launch_timed_out(&mut self, id: &str) {
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
        p.reporter.send(ReportJob::Final {
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

/// How long before the server's `requeue_after` the pilot stops a payload the server does not
/// know started: the grace time (TERM to KILL) plus a minute for clock skew between the
/// pilot's node and the server and for the last report.
fn fence_margin(grace: std::time::Duration) -> chrono::Duration {
    chrono::Duration::seconds(60 + grace.as_secs() as i64)
}

/// Puts a payload's usage so far into a running report: CPU seconds and peak memory (fields
/// every server takes), and the current memory only for a server that announced
/// `live_usage` (older ones refuse the field).
pub(super) fn add_usage(report: &mut StatusReport, usage: Option<PayloadUsage>, server_live: bool) {
    let Some(u) = usage else {
        return;
    };
    report.cpu_seconds = Some(u.cpu_seconds);
    report.peak_memory_bytes = u.peak_memory_bytes;
    if server_live {
        report.memory_bytes = Some(u.memory_bytes);
    }
}
