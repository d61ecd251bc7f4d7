//! The pilot's relay of a payload's delegated proxy (issue 17 item 3): for an envelope with
//! `credential`, the helper's CSR goes to the VO server (`POST /v1/payloads/{id}/proxy`) and
//! the issued chain back to the helper with the launch; before the proxy expires the same for
//! a renewal. The pilot never sees a private key: only the CSR and the chain pass through it.
//!
//! A launch whose proxy the server will not issue ends `failed` with the server's reason
//! (the helper never runs a payload with `credential` without its proxy), or is handed back
//! to the queue when the server could not be reached at all; a renewal that
//! fails is retried until the proxy expires, the payload running on meanwhile: every minute,
//! or sooner when less is left, so a short proxy gets several tries before it expires.

use std::fs::File;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Agent, Phase};
use crate::pilot::client::{ClientError, ServerApi};
use crate::pilot::helper_client::HelperApi;
use crate::pilot::reporter::ReportJob;
use crate::protocol::api::{PayloadState, StatusReport};
use crate::protocol::delegation::{IssuedProxy, ProxyCsr};
use crate::protocol::envelope::SignedEnvelope;

/// How long after a failed renewal the pilot asks again, at most ...
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// ... and at least (a server that is down is not asked in a tight loop).
const RENEW_RETRY_MIN: Duration = Duration::from_secs(5);

/// The server's answer to a CSR, for the loop.
pub(super) type Issued = (String, Result<IssuedProxy, ClientError>);

/// A launch waiting for its proxy: what `launch_with_proxy` will send.
pub(super) struct PendingLaunch {
    pub envelope: SignedEnvelope,
    pub bundle: Option<String>,
    pub stdout: File,
    pub stderr: File,
}

/// A payload's delegated proxy, as the pilot follows it.
#[derive(Default)]
pub(super) struct ProxyState {
    /// Until the launch went out with its chain.
    pub launch: Option<PendingLaunch>,
    /// The delivered proxy's not-after.
    pub not_after: Option<DateTime<Utc>>,
    /// When to ask for a renewal.
    pub renew_at: Option<DateTime<Utc>>,
    /// A renewal is under way (CSR asked, server asked, or chain handed over).
    pub renewing: bool,
}

/// When to renew a proxy that expires at `not_after`: `margin` before, but never in the
/// first half of its life (a short proxy is not renewed in a loop).
fn renew_at(now: DateTime<Utc>, not_after: DateTime<Utc>, margin: Duration) -> DateTime<Utc> {
    let life = (not_after - now).max(chrono::Duration::zero());
    let margin = chrono::Duration::from_std(margin)
        .unwrap_or(chrono::Duration::MAX)
        .min(life / 2);
    not_after - margin
}

/// When to try again after a renewal failed at `now` for a proxy that expires at
/// `not_after`: a quarter of what is left, between [`RENEW_RETRY_MIN`] and [`RENEW_RETRY`];
/// `None` when that would be at or past the expiry. A fixed minute would give a proxy renewed
/// at half of a short life (`worker_proxy_seconds` of a few minutes) no second try at all.
fn retry_at(now: DateTime<Utc>, not_after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let left = (not_after - now).to_std().ok()?;
    let wait = (left / 4).clamp(RENEW_RETRY_MIN, RENEW_RETRY);
    let at = now + chrono::Duration::from_std(wait).ok()?;
    (at < not_after).then_some(at)
}

impl<S: ServerApi, H: HelperApi> Agent<S, H> {
    /// A CSR from the helper: for a launch waiting for its proxy, or a renewal.
    pub(super) fn on_proxy_csr(&mut self, id: String, csr_pem: String) {
        let Some(p) = self.payloads.get(&id) else {
            return tracing::warn!(payload_id = %id, "proxy CSR for an unknown payload");
        };
        let wanted = match (&p.phase, &p.proxy) {
            (Phase::Launching, Some(s)) => s.launch.is_some(),
            (Phase::Running, Some(s)) => s.renewing,
            _ => false,
        };
        if !wanted {
            return tracing::warn!(payload_id = %id, "proxy CSR nobody asked for; ignored");
        }
        tracing::info!(payload_id = %id, "asking the VO server for the payload's proxy");
        let server = self.server.clone();
        let tx = self.proxy_tx.clone();
        tokio::spawn(async move {
            let r = server.issue_proxy(id.clone(), ProxyCsr { csr_pem }).await;
            let _ = tx.send((id, r));
        });
    }

    /// The server's answer: the launch goes out with the chain, or a renewal is handed over.
    pub(super) fn on_proxy_issued(&mut self, (id, result): Issued) {
        let Some(p) = self.payloads.get_mut(&id) else {
            return;
        };
        let Some(state) = p.proxy.as_mut() else {
            return;
        };
        match (p.phase, result) {
            (Phase::Launching, Ok(issued)) => {
                let Some(l) = state.launch.take() else { return };
                state.not_after = Some(issued.not_after);
                state.renew_at = Some(renew_at(
                    Utc::now(),
                    issued.not_after,
                    self.cfg.proxy_renew_margin,
                ));
                let sent = self.helper.launch_with_proxy(
                    &l.envelope,
                    l.bundle.as_deref(),
                    &l.stdout,
                    &l.stderr,
                    &issued.chain_pem,
                );
                match sent {
                    Ok(()) => p.reached_helper = true,
                    Err(e) => self.on_helper_lost(&e.to_string()),
                }
            }
            // The server could not be reached (after the client's retries): the payload never
            // reached the helper, so it goes back to the queue for a later match rather than
            // failing for an outage. A refusal (expired delegation, owner no longer a member)
            // is final.
            (Phase::Launching, Err(e)) if e.is_transient() => {
                let reason = format!(
                    "handed back by pilot {}: the VO server could not be reached for the payload's proxy: {e}",
                    self.cfg.pilot_id
                );
                self.proxy_launch_failed(&id, PayloadState::Queued, reason);
            }
            (Phase::Launching, Err(e)) => {
                let reason = format!("the VO server issued no proxy for the payload: {e}");
                self.proxy_launch_failed(&id, PayloadState::Failed, reason);
            }
            (Phase::Running, Ok(issued)) => {
                if let Err(e) = self.helper.proxy_renewed(&id, &issued.chain_pem) {
                    self.on_helper_lost(&e.to_string());
                }
            }
            (Phase::Running, Err(e)) => {
                tracing::warn!(payload_id = %id, error = %e, "renewing the payload's proxy failed at the VO server; retrying");
                self.renewal_failed(&id);
            }
            (Phase::Ending, _) => {}
        }
    }

    /// The helper replaced the payload's proxy file.
    pub(super) fn on_proxy_delivered(&mut self, id: String, serial: String, not_after: String) {
        let margin = self.cfg.proxy_renew_margin;
        let Some(s) = self.payloads.get_mut(&id).and_then(|p| p.proxy.as_mut()) else {
            return;
        };
        s.renewing = false;
        match DateTime::parse_from_rfc3339(&not_after) {
            Ok(t) => {
                let t = t.with_timezone(&Utc);
                s.not_after = Some(t);
                s.renew_at = Some(renew_at(Utc::now(), t, margin));
            }
            Err(e) => {
                tracing::warn!(payload_id = %id, %not_after, error = %e, "helper sent an unreadable not-after")
            }
        }
        tracing::info!(payload_id = %id, %serial, %not_after, "payload's proxy renewed");
    }

    /// The helper refused a renewal: the payload keeps its proxy; try again later.
    pub(super) fn on_proxy_refused(&mut self, id: String, reason: String) {
        tracing::warn!(payload_id = %id, %reason, "helper refused to renew the payload's proxy");
        self.renewal_failed(&id);
    }

    fn renewal_failed(&mut self, id: &str) {
        if let Some(s) = self.payloads.get_mut(id).and_then(|p| p.proxy.as_mut()) {
            s.renewing = false;
            // Not past the expiry: a proxy that expired cannot be renewed from the worker node.
            s.renew_at = s.not_after.and_then(|t| retry_at(Utc::now(), t));
            match s.renew_at {
                Some(at) => {
                    tracing::info!(payload_id = %id, retry_at = %at.to_rfc3339(), "renewal of the payload's proxy will be tried again")
                }
                None => {
                    tracing::error!(payload_id = %id, "the payload's proxy expires before another renewal could be tried")
                }
            }
        }
    }

    /// From the tick: asks the helper for renewal CSRs of running payloads whose time came.
    pub(super) fn renew_proxies(&mut self) {
        let now = Utc::now();
        let due: Vec<String> = self
            .payloads
            .iter()
            .filter(|(_, p)| p.phase == Phase::Running)
            .filter_map(|(id, p)| {
                let s = p.proxy.as_ref()?;
                (!s.renewing && s.renew_at.is_some_and(|t| now >= t)).then(|| id.clone())
            })
            .collect();
        for id in due {
            if let Some(s) = self.payloads.get_mut(&id).and_then(|p| p.proxy.as_mut()) {
                s.renewing = true;
            }
            tracing::info!(payload_id = %id, "renewing the payload's proxy");
            if let Err(e) = self.helper.proxy_renew(&id) {
                return self.on_helper_lost(&e.to_string());
            }
        }
    }

    /// The launch cannot get its proxy: it ends `failed`, or is handed back (`queued`), never
    /// having reached the helper.
    fn proxy_launch_failed(&mut self, id: &str, state: PayloadState, reason: String) {
        tracing::error!(payload_id = %id, %reason, "payload not launched");
        self.capacity.release(id);
        if state == PayloadState::Queued {
            self.summary.handed_back += 1;
        } else {
            self.summary.failed += 1;
        }
        let pilot_id = self.cfg.pilot_id.clone();
        let Some(p) = self.payloads.get_mut(id) else {
            return;
        };
        p.phase = Phase::Ending;
        p.proxy = None;
        p.record.decision = Some("not_launched");
        p.record.reason = Some(reason.clone());
        p.record.state = Some(state.as_str().into());
        p.reporter.send(ReportJob::Final {
            report: StatusReport {
                pilot_id,
                state: Some(state),
                reason: Some(reason),
                ..Default::default()
            },
            archive: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_time_keeps_half_the_life() {
        let now = Utc::now();
        let h = chrono::Duration::hours;
        let m = Duration::from_secs(3600);
        assert_eq!(renew_at(now, now + h(12), m), now + h(11));
        assert_eq!(
            renew_at(now, now + h(1), m),
            now + chrono::Duration::minutes(30)
        );
        assert_eq!(renew_at(now, now - h(1), m), now - h(1));
    }

    #[test]
    fn a_failed_renewal_is_retried_before_the_proxy_expires() {
        let now = Utc::now();
        let s = chrono::Duration::seconds;
        // A 12 h proxy renewed an hour before its end: every minute, as before.
        assert_eq!(retry_at(now, now + s(3600)), Some(now + s(60)));
        // The shortest worker proxy (60 s), renewed at half its life: a quarter of what is
        // left, then never closer than 5 s apart, and never at or past the expiry.
        assert_eq!(
            retry_at(now, now + s(30)),
            Some(now + chrono::Duration::milliseconds(7500))
        );
        assert_eq!(retry_at(now, now + s(8)), Some(now + s(5)));
        assert_eq!(retry_at(now, now + s(5)), None);
        assert_eq!(retry_at(now, now - s(1)), None);
    }
}
