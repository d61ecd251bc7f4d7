//! Payload rows: submit, match (exactly one pilot per payload), status reports, operator
//! commands, output bookkeeping, reads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::db::{vals, Conn, Row};
use super::{parse_ts, ts, Store, StoreError};
use crate::protocol::api::{
    InformationAnswer, InformationView, MatchRequest, OperatorCommand, PayloadState, PayloadView,
    StatusReport,
};
use crate::protocol::Resources;

/// A validated submission.
#[derive(Debug, Clone)]
pub struct NewPayload {
    pub owner_dn: String,
    pub vo: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub jobtag: Option<String>,
    pub resources: Resources,
    pub outputs: Vec<String>,
    pub bundle_sha256: Option<String>,
    /// The owner's delegated credential the payload runs with (checked by the API).
    pub delegation_id: Option<String>,
}

/// What a match hands to the envelope signer.
#[derive(Debug, Clone)]
pub struct Matched {
    pub id: String,
    pub owner_dn: String,
    pub vo: String,
    pub fqans: Vec<String>,
    pub membership_valid_until: DateTime<Utc>,
    pub jobtag: Option<String>,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub bundle_sha256: Option<String>,
    pub resources: Resources,
    pub outputs: Vec<String>,
    /// The delegation and its notAfter, when the payload runs with one.
    pub delegation: Option<(String, DateTime<Utc>)>,
}

fn parse_state(s: &str) -> Result<PayloadState, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| StoreError::Corrupt(format!("payload state {s:?}")))
}

fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Stored integers are i64; saturate the (unsigned) request values.
fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The skipped outputs as stored: JSON text, None when there are none; bounded (a pilot's
/// list is cut, with a last entry saying so, rather than its final state refused).
fn skipped_json(list: &[String]) -> Option<String> {
    use crate::protocol::api::{MAX_OUTPUTS_SKIPPED, MAX_OUTPUT_SKIP_CHARS};
    if list.is_empty() {
        return None;
    }
    let mut kept: Vec<String> = list
        .iter()
        .take(MAX_OUTPUTS_SKIPPED)
        .map(|s| s.chars().take(MAX_OUTPUT_SKIP_CHARS).collect())
        .collect();
    if list.len() > MAX_OUTPUTS_SKIPPED {
        kept.push(format!(
            "... and {} more skipped entries not kept by the server",
            list.len() - MAX_OUTPUTS_SKIPPED
        ));
    }
    serde_json::to_string(&kept).ok()
}

/// A queued payload that fits the request (?1 cores, ?2 memory, ?3 wall time) of an active
/// member at ?4 (`p` payloads, `m` members).
const MATCHABLE: &str = "p.state = 'queued' AND p.cores <= ?1 AND p.memory_bytes <= ?2 \
    AND p.walltime_seconds <= ?3 AND m.status = 'registered' AND m.renewal_due > ?4 \
    AND (p.delegation_id IS NULL OR EXISTS (SELECT 1 FROM delegations d \
        WHERE d.id = p.delegation_id AND d.chain_pem IS NOT NULL AND d.not_after > ?4))";

/// What a match returns, in [`matched_from`]'s order.
const MATCHED_COLUMNS: &str = "p.id, p.owner_dn, m.vo, m.fqans, m.renewal_due, p.jobtag, \
    p.argv, p.env, p.bundle_sha256, p.cores, p.memory_bytes, p.walltime_seconds, p.outputs, \
    p.delegation_id, (SELECT d.not_after FROM delegations d WHERE d.id = p.delegation_id)";

fn matched_from(mut r: Row) -> Result<Matched, StoreError> {
    Ok(Matched {
        id: r.text(0)?,
        owner_dn: r.text(1)?,
        vo: r.text(2)?,
        fqans: json("member fqans", &r.text(3)?)?,
        membership_valid_until: parse_ts(&r.text(4)?)?,
        jobtag: r.opt_text(5)?,
        argv: json("argv", &r.text(6)?)?,
        env: json("env", &r.text(7)?)?,
        bundle_sha256: r.opt_text(8)?,
        resources: Resources {
            cores: r.int(9)? as u32,
            memory_bytes: r.int(10)? as u64,
            walltime_seconds: r.int(11)? as u64,
        },
        outputs: json("outputs", &r.text(12)?)?,
        delegation: match (r.opt_text(13)?, r.opt_text(14)?) {
            (Some(id), Some(t)) => Some((id, parse_ts(&t)?)),
            _ => None,
        },
    })
}

const VIEW_COLUMNS: &str = "id, owner_dn, vo, state, argv, jobtag, cores, memory_bytes, \
    walltime_seconds, outputs, submitted_at, updated_at, pilot_id, host, batch_job_id, account, \
    uid, exit_code, signal, cpu_seconds, peak_memory_bytes, reason, denial_class, has_output, \
    outputs_skipped, files_deleted_at, memory_bytes_now, usage_at";

fn into_view(mut r: Row) -> Result<PayloadView, StoreError> {
    Ok(PayloadView {
        payload_id: r.text(0)?,
        owner_dn: r.text(1)?,
        vo: r.text(2)?,
        state: parse_state(&r.text(3)?)?,
        argv: json("argv", &r.text(4)?)?,
        jobtag: r.opt_text(5)?,
        resources: Resources {
            cores: r.int(6)? as u32,
            memory_bytes: r.int(7)? as u64,
            walltime_seconds: r.int(8)? as u64,
        },
        outputs: json("outputs", &r.text(9)?)?,
        submitted_at: parse_ts(&r.text(10)?)?,
        updated_at: r.opt_text(11)?.as_deref().map(parse_ts).transpose()?,
        pilot_id: r.opt_text(12)?,
        host: r.opt_text(13)?,
        batch_job_id: r.opt_text(14)?,
        account: r.opt_text(15)?,
        uid: r.opt_int(16)?.map(|u| u as u32),
        exit_code: r.opt_int(17)?.map(|v| v as i32),
        signal: r.opt_int(18)?.map(|v| v as i32),
        cpu_seconds: r.opt_real(19)?,
        peak_memory_bytes: r.opt_int(20)?.map(|m| m as u64),
        reason: r.opt_text(21)?,
        denial_class: r.opt_text(22)?,
        has_output: r.flag(23)?,
        outputs_skipped: match r.opt_text(24)? {
            Some(s) => json("outputs_skipped", &s)?,
            None => Vec::new(),
        },
        files_deleted_at: r.opt_text(25)?.as_deref().map(parse_ts).transpose()?,
        memory_bytes_now: r.opt_int(26)?.map(|m| m as u64),
        usage_at: r.opt_text(27)?.as_deref().map(parse_ts).transpose()?,
    })
}

impl Store {
    /// Stores a submission (bundle bytes first, then the row) and returns its new id.
    pub fn submit(
        &self,
        p: &NewPayload,
        bundle: Option<&[u8]>,
        now: DateTime<Utc>,
    ) -> Result<String, StoreError> {
        let id = format!("p-{}", uuid::Uuid::new_v4().simple());
        if let Some(b) = bundle {
            super::write_atomic(&self.bundle_path(&id), b)?;
        }
        let res = self.conn(|c| {
            c.execute(
                "INSERT INTO payloads (id, owner_dn, vo, state, argv, env, jobtag, cores,
                    memory_bytes, walltime_seconds, outputs, bundle_sha256, submitted_at,
                    updated_at, delegation_id)
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)",
                vals![
                    &id,
                    &p.owner_dn,
                    &p.vo,
                    serde_json::to_string(&p.argv).expect("strings serialise"),
                    serde_json::to_string(&p.env).expect("strings serialise"),
                    &p.jobtag,
                    p.resources.cores,
                    sat(p.resources.memory_bytes),
                    sat(p.resources.walltime_seconds),
                    serde_json::to_string(&p.outputs).expect("strings serialise"),
                    &p.bundle_sha256,
                    ts(now),
                    &p.delegation_id,
                ],
            )
        });
        if let Err(e) = res {
            let _ = std::fs::remove_file(self.bundle_path(&id));
            return Err(e);
        }
        Ok(id)
    }

    /// Picks the oldest queued payload that fits and whose owner is still an active member,
    /// and marks it matched to this pilot, atomically. SQLite: a SELECT and a guarded UPDATE
    /// in one `BEGIN IMMEDIATE` transaction. PostgreSQL: one statement (one round trip, its
    /// own transaction) whose candidate row is claimed with `FOR UPDATE SKIP LOCKED`: an
    /// instance matching at the same moment takes the next payload instead of waiting for
    /// this one or taking it too.
    pub fn match_one(
        &self,
        pilot_dn: &str,
        req: &MatchRequest,
        now: DateTime<Utc>,
    ) -> Result<Option<Matched>, StoreError> {
        let params = vals![
            req.free_cores,
            sat(req.free_memory_bytes),
            sat(req.seconds_left),
            ts(now),
            pilot_dn,
            &req.pilot_id,
            &req.host,
            &req.batch_job_id,
        ];
        if self.engine() == super::Engine::Postgres {
            let claim = super::Engine::Postgres.claim("p");
            let row = self.conn(|c| {
                c.query_opt(
                    &format!(
                        "WITH candidate AS (
                            SELECT p.seq FROM payloads p JOIN members m ON m.dn = p.owner_dn
                            WHERE {MATCHABLE} ORDER BY p.seq LIMIT 1{claim})
                         UPDATE payloads p SET state = 'matched', pilot_dn = ?5, pilot_id = ?6,
                            host = ?7, batch_job_id = ?8, updated_at = ?4
                         FROM candidate, members m
                         WHERE p.seq = candidate.seq AND m.dn = p.owner_dn
                         RETURNING {MATCHED_COLUMNS}"
                    ),
                    params,
                )
            })?;
            return row.map(matched_from).transpose();
        }
        self.tx(|c| {
            let row = c.query_opt(
                &format!(
                    "SELECT {MATCHED_COLUMNS} FROM payloads p JOIN members m ON m.dn = p.owner_dn
                     WHERE {MATCHABLE} ORDER BY p.seq LIMIT 1"
                ),
                &params[..4],
            )?;
            let Some(r) = row else {
                return Ok(None);
            };
            // The state guard makes the claim safe even against another process on the same
            // SQLite file.
            let changed = c.execute(
                "UPDATE payloads SET state = 'matched', pilot_dn = ?2, pilot_id = ?3, host = ?4,
                    batch_job_id = ?5, updated_at = ?6
                 WHERE id = ?1 AND state = 'queued'",
                vals![
                    r.peek_text(0)?,
                    pilot_dn,
                    &req.pilot_id,
                    &req.host,
                    &req.batch_job_id,
                    ts(now)
                ],
            )?;
            if changed != 1 {
                return Ok(None);
            }
            matched_from(r).map(Some)
        })
    }

    /// Undoes a match whose envelope could not be built or sent (e.g. the bundle file is
    /// unreadable): the payload is failed with a reason rather than left hanging.
    pub fn fail_matched(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn(|c| {
            c.execute(
                "UPDATE payloads SET state = 'failed', reason = ?2, updated_at = ?3
                 WHERE id = ?1 AND state = 'matched'",
                vals![id, reason, ts(now)],
            )
        })?;
        Ok(())
    }

    /// Recovers payloads whose pilot went away (see [`SweepRules`]):
    /// - a payload matched before `matched_before` and never reported running is queued
    ///   again (its envelope has expired by then, so no helper starts it from the old one, and
    ///   the pilot kills one it started but could not report in time: docs/vo-operator.md),
    ///   or failed once it was requeued `max_requeues` times;
    /// - a running payload with no report since `silent_before` (its pilot missed
    ///   `missed_heartbeats` heartbeats) becomes `lost`, marked as the server's verdict so a
    ///   late final report from that pilot can still replace it;
    /// - a queued payload whose delegated credential expired or was deleted fails.
    ///
    /// Several instances may sweep at once: the stale rows are claimed (skipped when another
    /// sweep or a report holds them) and every change is guarded by the state it found, so
    /// each payload is requeued or lost once.
    pub fn sweep(&self, rules: &SweepRules, now: DateTime<Utc>) -> Result<Swept, StoreError> {
        self.tx(|c| {
            let mut swept = Swept::default();
            let claim = c.engine().claim("payloads");
            let stale = c.query(
                &format!(
                    "SELECT id, requeues, pilot_id FROM payloads
                     WHERE state = 'matched' AND updated_at < ?1{claim}"
                ),
                vals![ts(rules.matched_before)],
            )?;
            for mut r in stale {
                let (id, requeues, pilot) = (r.text(0)?, r.int(1)?, r.opt_text(2)?);
                let why = format!(
                    "pilot {} never reported it running before its envelope expired",
                    pilot.as_deref().unwrap_or("?")
                );
                match requeue(c, &id, requeues, self.requeue_limit, &why, now)? {
                    Some(true) => swept.requeued += 1,
                    Some(false) => swept.failed += 1,
                    None => {}
                }
            }
            // A queued payload whose delegated credential expired (or was deleted) can never
            // get a worker-node proxy: it fails instead of waiting forever.
            swept.failed += c.execute(
                "UPDATE payloads SET state = 'failed', updated_at = ?1,
                    reason = 'not started: its delegated credential expired before a pilot took it; delegate anew (mupilot-server delegate) and submit again'
                 WHERE state = 'queued' AND delegation_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM delegations d WHERE d.id = payloads.delegation_id
                        AND d.chain_pem IS NOT NULL AND d.not_after > ?1)",
                vals![ts(now)],
            )? as usize;
            swept.lost = c.execute(
                "UPDATE payloads SET state = 'lost', lost_by_server = 1, updated_at = ?2,
                    reason = 'lost: no report from pilot ' || COALESCE(pilot_id, '?') || ' for '
                        || CAST(?3 AS TEXT)
                 WHERE state = 'running' AND updated_at < ?1",
                vals![ts(rules.silent_before), ts(now), &rules.silence],
            )? as usize;
            Ok(swept)
        })
    }

    /// Applies a status report from the pilot holding the payload; returns the operator
    /// commands not delivered yet (each is delivered once).
    pub fn apply_status(
        &self,
        id: &str,
        pilot_dn: &str,
        rep: &StatusReport,
        now: DateTime<Utc>,
    ) -> Result<Vec<OperatorCommand>, StoreError> {
        self.tx(|c| {
            let lock = c.engine().lock_row();
            let mut r = c
                .query_opt(
                    &format!("SELECT state, pilot_dn, pilot_id FROM payloads WHERE id = ?1{lock}"),
                    vals![id],
                )?
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            let state = parse_state(&r.text(0)?)?;
            let (holder_dn, holder_id) = (r.opt_text(1)?, r.opt_text(2)?);
            if holder_dn.as_deref() != Some(pilot_dn)
                || holder_id.as_deref() != Some(&rep.pilot_id)
            {
                return Err(StoreError::Forbidden(format!(
                    "payload {id} is not held by pilot {:?} ({pilot_dn}); only the pilot it was matched to may report on it",
                    rep.pilot_id
                )));
            }
            if let Some(a) = &rep.information {
                store_answer(c, id, a, now)?;
            }
            if state.is_final() {
                repeated_or_late(c, id, state, rep, now)?;
                return Ok(Vec::new());
            }
            let new_state = match rep.state {
                None => state,
                Some(PayloadState::Matched) => {
                    return Err(StoreError::Invalid(
                        "a pilot cannot report state `matched`; report running, a final state, or queued to hand it back".into(),
                    ))
                }
                Some(PayloadState::Queued) if state != PayloadState::Matched => {
                    return Err(StoreError::Conflict(format!(
                        "payload {id} is {state}; only a matched payload that has not started can be handed back"
                    )))
                }
                Some(PayloadState::Running)
                    if state == PayloadState::Running || state == PayloadState::Matched =>
                {
                    PayloadState::Running
                }
                // `denied` is reserved for local authorization decisions: a refusal of class
                // caller or system (as an older pilot reports it) is stored as `failed`.
                Some(PayloadState::Denied) => PayloadState::of_refusal(rep.denial_class.as_deref()),
                Some(s) => s,
            };
            let mut commands = take_commands(c, id)?;
            if new_state == PayloadState::Queued {
                // Handed back unstarted. A cancel that arrived meanwhile takes effect now.
                let cancelled_by = commands.iter().find_map(|c| match c {
                    OperatorCommand::Cancel { requester, .. } => Some(requester.clone()),
                    _ => None,
                });
                match cancelled_by {
                    Some(who) => {
                        c.execute(
                            "UPDATE payloads SET state = 'cancelled', reason = ?2, updated_at = ?3
                             WHERE id = ?1",
                            vals![id, format!("cancelled by {who}"), ts(now)],
                        )?;
                    }
                    None => {
                        let requeues = c
                            .query_one("SELECT requeues FROM payloads WHERE id = ?1", vals![id])?
                            .int(0)?;
                        let why = rep.reason.as_deref().unwrap_or("handed back by its pilot");
                        requeue(c, id, requeues, self.requeue_limit, why, now)?;
                    }
                }
                commands.clear();
            } else {
                write_report(c, id, new_state, rep, rep.reason.as_deref(), now)?;
            }
            Ok(commands)
        })
    }

    /// Cancels on behalf of `requester`: a queued payload at once; a matched or running one
    /// through a command for its pilot. Returns the state after the call.
    pub fn cancel(
        &self,
        id: &str,
        requester: &str,
        is_operator: bool,
        now: DateTime<Utc>,
    ) -> Result<PayloadState, StoreError> {
        self.tx(|c| {
            let state = managed_state(c, id, requester, is_operator, "cancel")?;
            Ok(match state {
                PayloadState::Queued => {
                    c.execute(
                        "UPDATE payloads SET state = 'cancelled', reason = ?2, updated_at = ?3
                         WHERE id = ?1",
                        vals![id, format!("cancelled by {requester}"), ts(now)],
                    )?;
                    PayloadState::Cancelled
                }
                PayloadState::Matched | PayloadState::Running => {
                    let cmd = OperatorCommand::Cancel {
                        requester: requester.to_string(),
                        signed: None,
                    };
                    queue_command(c, id, &cmd)?;
                    state
                }
                s => {
                    return Err(StoreError::Conflict(format!(
                        "payload {id} is already {s}; there is nothing to cancel"
                    )))
                }
            })
        })
    }

    /// Queues a signal for a matched or running payload on behalf of `requester` (its owner or
    /// a VO operator); the pilot relays it, signed, to the site's helper.
    pub fn queue_signal(
        &self,
        id: &str,
        requester: &str,
        is_operator: bool,
        signal: i32,
    ) -> Result<PayloadState, StoreError> {
        if !(1..=64).contains(&signal) {
            return Err(StoreError::Invalid(format!(
                "signal {signal} is not a signal number (1-64)"
            )));
        }
        self.tx(|c| {
            let state = managed_state(c, id, requester, is_operator, "signal")?;
            if !matches!(state, PayloadState::Matched | PayloadState::Running) {
                return Err(StoreError::Conflict(format!(
                    "payload {id} is {state}; only a matched or running payload can be signalled"
                )));
            }
            let cmd = OperatorCommand::Signal {
                requester: requester.to_string(),
                signal,
                signed: None,
            };
            queue_command(c, id, &cmd)?;
            Ok(state)
        })
    }

    /// Asks the site's helper, through the pilot holding running payload `id`, what it sees
    /// of it, on behalf of `requester` (its owner or a VO operator, as for cancel and
    /// signal; the helper authorizes the requester again with the site's policies). Returns
    /// the request's id: the pilot picks the request up with its next heartbeat and relays
    /// the answer under it.
    pub fn request_information(
        &self,
        id: &str,
        requester: &str,
        is_operator: bool,
        now: DateTime<Utc>,
    ) -> Result<String, StoreError> {
        self.tx(|c| {
            let state = managed_state(c, id, requester, is_operator, "ask about")?;
            match state {
                PayloadState::Running => {}
                PayloadState::Queued | PayloadState::Matched => {
                    return Err(StoreError::Conflict(format!(
                        "payload {id} is {state}: it has not started at a site yet, so no helper can be asked; try again once it runs"
                    )))
                }
                s => {
                    return Err(StoreError::Conflict(format!(
                        "payload {id} is {s}: no pilot holds it any more, so no helper can be asked; `mupilot-server status {id}` shows the last values reported"
                    )))
                }
            }
            let request_id = format!("{:032x}", rand::random::<u128>());
            c.execute(
                "INSERT INTO information (request_id, payload_id, requester_dn, requested_at)
                 VALUES (?1, ?2, ?3, ?4)",
                vals![&request_id, id, requester, ts(now)],
            )?;
            let cmd = OperatorCommand::Information {
                requester: requester.to_string(),
                request_id: request_id.clone(),
                signed: None,
            };
            queue_command(c, id, &cmd)?;
            Ok(request_id)
        })
    }

    /// An information request of payload `id` and its answer so far, with the payload's
    /// state, pilot and last report. Readable by the requester, the owner or an operator.
    pub fn information(
        &self,
        id: &str,
        request_id: &str,
        reader: &str,
        is_operator: bool,
        heartbeat_seconds: u64,
    ) -> Result<InformationView, StoreError> {
        self.conn(|c| {
            let mut r = c
                .query_opt(
                    "SELECT i.requester_dn, i.requested_at, i.answered_at, i.answer, p.state,
                            p.pilot_id, p.host, p.updated_at, p.owner_dn
                     FROM information i JOIN payloads p ON p.id = i.payload_id
                     WHERE i.request_id = ?1 AND i.payload_id = ?2",
                    vals![request_id, id],
                )?
                .ok_or_else(|| {
                    StoreError::NotFound(format!("{id} has no information request {request_id}"))
                })?;
            let requester = r.text(0)?;
            if reader != requester && reader != r.peek_text(8)? && !is_operator {
                return Err(StoreError::Forbidden(format!(
                    "{reader} may not read information request {request_id}: only its requester, the payload's owner or a VO operator may"
                )));
            }
            Ok(InformationView {
                request_id: request_id.to_string(),
                payload_id: id.to_string(),
                requester,
                requested_at: parse_ts(&r.text(1)?)?,
                answered_at: r.opt_text(2)?.as_deref().map(parse_ts).transpose()?,
                answer: r
                    .opt_text(3)?
                    .map(|a| json("information answer", &a))
                    .transpose()?,
                state: parse_state(&r.text(4)?)?,
                pilot_id: r.opt_text(5)?,
                host: r.opt_text(6)?,
                updated_at: r.opt_text(7)?.as_deref().map(parse_ts).transpose()?,
                heartbeat_seconds,
            })
        })
    }

    /// The DN of the pilot that holds (or last held) a payload.
    pub fn holder(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn(|c| {
            c.query_opt("SELECT pilot_dn FROM payloads WHERE id = ?1", vals![id])?
                .ok_or_else(|| StoreError::NotFound(id.into()))?
                .opt_text(0)
        })
    }

    /// Records that the output archive is stored.
    pub fn set_has_output(&self, id: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn(|c| {
            c.execute(
                "UPDATE payloads SET has_output = 1, updated_at = ?2 WHERE id = ?1",
                vals![id, ts(now)],
            )
        })?;
        Ok(())
    }

    /// One payload as its owner sees it.
    pub fn view(&self, id: &str) -> Result<PayloadView, StoreError> {
        let row = self.conn(|c| {
            c.query_opt(
                &format!("SELECT {VIEW_COLUMNS} FROM payloads WHERE id = ?1"),
                vals![id],
            )
        })?;
        into_view(row.ok_or_else(|| StoreError::NotFound(id.into()))?)
    }

    /// Payloads of one owner (or of everyone), optionally in one state, oldest first.
    pub fn list(
        &self,
        owner: Option<&str>,
        state: Option<PayloadState>,
    ) -> Result<Vec<PayloadView>, StoreError> {
        let rows = self.conn(|c| {
            c.query(
                &format!(
                    "SELECT {VIEW_COLUMNS} FROM payloads
                     WHERE (CAST(?1 AS TEXT) IS NULL OR owner_dn = ?1)
                       AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)
                     ORDER BY seq"
                ),
                vals![owner, state.map(|s| s.as_str())],
            )
        })?;
        rows.into_iter().map(into_view).collect()
    }

    /// How many payloads each VO has in each state (`(vo, state, count)`), for the metrics
    /// endpoint. One grouped scan; states with no payload are absent.
    pub fn count_by_state(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.conn(|c| {
            c.query(
                "SELECT vo, state, COUNT(*) FROM payloads GROUP BY vo, state",
                vals![],
            )?
            .into_iter()
            .map(|mut r| Ok((r.text(0)?, r.text(1)?, r.int(2)?)))
            .collect()
        })
    }

    /// The distinct pilot ids holding a matched or running payload (a busy pilot asks for no
    /// work but is alive), for the metrics endpoint.
    pub fn busy_pilots(&self) -> Result<Vec<String>, StoreError> {
        self.conn(|c| {
            c.query(
                "SELECT DISTINCT pilot_id FROM payloads
                 WHERE state IN ('matched', 'running') AND pilot_id IS NOT NULL",
                vals![],
            )?
            .into_iter()
            .map(|mut r| r.text(0))
            .collect()
        })
    }
}

/// What the sweeper decides by (server.toml: `heartbeat_seconds`, `missed_heartbeats`,
/// `envelope_lifetime_seconds`, `max_requeues`).
#[derive(Debug, Clone)]
pub struct SweepRules {
    /// Matched before this and never reported running: requeue (or fail at the limit).
    pub matched_before: DateTime<Utc>,
    /// Running with no report since this: lost.
    pub silent_before: DateTime<Utc>,
    /// How the silence is described in the reason, e.g. "90 s (3 missed heartbeats of 30 s)".
    pub silence: String,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub requeued: usize,
    /// Requeued too often, or queued with an expired delegation: failed instead.
    pub failed: usize,
    pub lost: usize,
}

/// Writes a report's state and the fields it carries (a field it leaves out keeps its value);
/// the state is the pilot's word now, so the sweeper's `lost` mark goes.
fn write_report(
    c: &mut dyn Conn,
    id: &str,
    state: PayloadState,
    rep: &StatusReport,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE payloads SET state = ?2, lost_by_server = 0,
            account = COALESCE(?3, account), uid = COALESCE(?4, uid),
            exit_code = COALESCE(?5, exit_code), signal = COALESCE(?6, signal),
            cpu_seconds = COALESCE(?7, cpu_seconds),
            peak_memory_bytes = COALESCE(?8, peak_memory_bytes),
            wall_seconds = COALESCE(?9, wall_seconds), reason = COALESCE(?10, reason),
            denial_class = COALESCE(?11, denial_class), updated_at = ?12,
            outputs_skipped = COALESCE(?13, outputs_skipped),
            memory_bytes_now = COALESCE(?14, memory_bytes_now),
            usage_at = COALESCE(?15, usage_at)
         WHERE id = ?1",
        vals![
            id,
            state.as_str(),
            &rep.account,
            rep.uid,
            rep.exit_code,
            rep.signal,
            rep.cpu_seconds,
            rep.peak_memory_bytes.map(sat),
            rep.wall_seconds,
            reason,
            &rep.denial_class,
            ts(now),
            skipped_json(&rep.outputs_skipped),
            rep.memory_bytes.map(sat),
            (rep.cpu_seconds.is_some() || rep.memory_bytes.is_some()).then(|| ts(now))
        ],
    )?;
    Ok(())
}

/// Keeps the helper's answer to an information request of payload `id` (the first answer
/// stands; an answer for a request the server never made is refused).
fn store_answer(
    c: &mut dyn Conn,
    id: &str,
    a: &InformationAnswer,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE information SET answered_at = ?3, answer = ?4
         WHERE request_id = ?1 AND payload_id = ?2 AND answered_at IS NULL",
        vals![
            &a.request_id,
            id,
            ts(now),
            serde_json::to_string(a).expect("answers serialise")
        ],
    )?;
    if n == 0 {
        let known = c
            .query_opt(
                "SELECT 1 FROM information WHERE request_id = ?1 AND payload_id = ?2",
                vals![&a.request_id, id],
            )?
            .is_some();
        if !known {
            return Err(StoreError::Invalid(format!(
                "information answer for request {:?}, which the server never made for payload {id}",
                a.request_id
            )));
        }
    }
    Ok(())
}

/// Queues matched payload `id` again after a hand-off that never started it, or fails it when
/// it was requeued `limit` times already. Returns Some(true) when it was queued, Some(false)
/// when failed, None when it was no longer matched (another instance's sweep or report got
/// there first).
fn requeue(
    c: &mut dyn Conn,
    id: &str,
    requeues: i64,
    limit: u32,
    why: &str,
    now: DateTime<Utc>,
) -> Result<Option<bool>, StoreError> {
    if requeues >= i64::from(limit) {
        let n = c.execute(
            "UPDATE payloads SET state = 'failed', updated_at = ?2, reason = ?3
             WHERE id = ?1 AND state = 'matched'",
            vals![
                id,
                ts(now),
                format!(
                    "not started after {} hand-offs (max_requeues = {limit}); the last: {why}",
                    requeues + 1
                )
            ],
        )?;
        return Ok((n == 1).then_some(false));
    }
    let n = c.execute(
        "UPDATE payloads SET state = 'queued', requeues = requeues + 1, pilot_dn = NULL,
            pilot_id = NULL, host = NULL, batch_job_id = NULL, updated_at = ?2,
            reason = ?3 WHERE id = ?1 AND state = 'matched'",
        vals![
            id,
            ts(now),
            format!("requeued ({} of {limit}): {why}", requeues + 1)
        ],
    )?;
    Ok((n == 1).then_some(true))
}

/// A report for a payload already in a final state, from the pilot that holds it:
/// - the same final state again (the pilot resent it from its outbox because it never saw
///   the answer): accepted and ignored, the first report stands;
/// - a final state for a payload the sweeper marked `lost` (its pilot was silent but alive):
///   the late report is the truth and replaces the verdict, once;
/// - anything else: 409, the final state is not reopened.
fn repeated_or_late(
    c: &mut dyn Conn,
    id: &str,
    state: PayloadState,
    rep: &StatusReport,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if rep.state == Some(state) {
        return Ok(());
    }
    let mut r = c.query_one(
        "SELECT lost_by_server, updated_at FROM payloads WHERE id = ?1",
        vals![id],
    )?;
    let (by_server, since) = (r.flag(0)?, r.opt_text(1)?);
    let late = rep.state.filter(|s| s.is_final());
    match late {
        Some(s) if state == PayloadState::Lost && by_server => {
            let reason = format!(
                "{} (reported late: the server had marked it lost at {})",
                rep.reason.as_deref().unwrap_or(s.as_str()),
                since.as_deref().unwrap_or("?")
            );
            write_report(c, id, s, rep, Some(&reason), now)?;
            Ok(())
        }
        _ => Err(StoreError::Conflict(format!(
            "payload {id} is already {state}; a final state is not reopened{}",
            if state == PayloadState::Lost && by_server {
                " (only the pilot's final report replaces the server's `lost`)"
            } else {
                ""
            }
        ))),
    }
}

/// The state of payload `id` (its row locked for the transaction), once `requester` is known
/// to be its owner or a VO operator (the only ones who may `verb` it).
fn managed_state(
    c: &mut dyn Conn,
    id: &str,
    requester: &str,
    is_operator: bool,
    verb: &str,
) -> Result<PayloadState, StoreError> {
    let lock = c.engine().lock_row();
    let mut r = c
        .query_opt(
            &format!("SELECT owner_dn, state FROM payloads WHERE id = ?1{lock}"),
            vals![id],
        )?
        .ok_or_else(|| StoreError::NotFound(id.into()))?;
    if r.text(0)? != requester && !is_operator {
        return Err(StoreError::Forbidden(format!(
            "{requester} may not {verb} payload {id}: only its owner or a VO operator may"
        )));
    }
    parse_state(&r.text(1)?)
}

/// Stores an operator command for the pilot holding `id` (stored unsigned; the API signs each
/// command as it delivers it).
pub(super) fn queue_command(
    c: &mut dyn Conn,
    id: &str,
    cmd: &OperatorCommand,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO commands (payload_id, command) VALUES (?1, ?2)",
        vals![id, serde_json::to_string(cmd).expect("commands serialise")],
    )?;
    Ok(())
}

fn take_commands(c: &mut dyn Conn, id: &str) -> Result<Vec<OperatorCommand>, StoreError> {
    let rows = c.query(
        "SELECT seq, command FROM commands WHERE payload_id = ?1 AND delivered = 0 ORDER BY seq",
        vals![id],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for mut r in rows {
        out.push(json("operator command", &r.text(1)?)?);
        c.execute(
            "UPDATE commands SET delivered = 1 WHERE seq = ?1",
            vals![r.int(0)?],
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::MemberSeed;
    use chrono::Duration;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("data")).unwrap();
        let seed = MemberSeed {
            dn: "/CN=a".into(),
            fqans: vec!["/demo".into()],
        };
        s.seed_members("demo", &[seed], Utc::now()).unwrap();
        (d, s)
    }

    fn new_payload() -> NewPayload {
        NewPayload {
            owner_dn: "/CN=a".into(),
            vo: "demo".into(),
            argv: vec!["/bin/true".into()],
            env: Default::default(),
            jobtag: None,
            resources: Resources {
                cores: 1,
                memory_bytes: 64 << 20,
                walltime_seconds: 60,
            },
            outputs: vec![],
            bundle_sha256: None,
            delegation_id: None,
        }
    }

    fn mreq() -> MatchRequest {
        MatchRequest {
            pilot_id: "p".into(),
            batch_system: None,
            batch_job_id: None,
            host: "h".into(),
            free_cores: 1,
            free_memory_bytes: 1 << 30,
            seconds_left: 3600,
        }
    }

    fn synchronous(s: &Store) -> i64 {
        s.sqlite()
            .unwrap()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    }

    /// The connection that matches runs with synchronous=FULL (2) in WAL mode, before and
    /// after a submission and a match went through it: the match is on disk before
    /// match_one returns (and so before its envelope is signed and sent).
    #[test]
    fn matches_are_committed_with_synchronous_full() {
        let (_d, s) = store();
        assert_eq!(synchronous(&s), 2);
        let mode: String = s
            .sqlite()
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let id = s
            .submit(&new_payload(), Some(b"bundle"), Utc::now())
            .unwrap();
        assert_eq!(std::fs::read(s.bundle_path(&id)).unwrap(), b"bundle");
        let m = s.match_one("/CN=p", &mreq(), Utc::now()).unwrap().unwrap();
        assert_eq!(m.id, id);
        assert_eq!(synchronous(&s), 2);
    }

    fn rules(matched_before: DateTime<Utc>, silent_before: DateTime<Utc>) -> SweepRules {
        SweepRules {
            matched_before,
            silent_before,
            silence: "90 s (3 missed heartbeats of 30 s)".into(),
        }
    }

    fn report(state: PayloadState) -> StatusReport {
        StatusReport {
            pilot_id: "p".into(),
            state: Some(state),
            ..Default::default()
        }
    }

    /// Heartbeats keep the usage (the last one heard stays after the end, the final report's
    /// CPU and peak replace theirs); an information request is queued as a command once the
    /// payload runs, its answer kept once, readable by the requester, the owner and
    /// operators only.
    #[test]
    fn heartbeats_keep_usage_and_information_answers_are_kept_for_their_readers() {
        use crate::protocol::api::InformationAnswer;
        let (_d, s) = store();
        let now = Utc::now();
        let id = s.submit(&new_payload(), None, now).unwrap();
        let e = s.request_information(&id, "/CN=a", false, now).unwrap_err();
        assert!(e.to_string().contains("has not started"), "{e}");
        s.match_one("/CN=p", &mreq(), now).unwrap().unwrap();
        let mut beat = report(PayloadState::Running);
        beat.cpu_seconds = Some(1.5);
        beat.memory_bytes = Some(10 << 20);
        beat.peak_memory_bytes = Some(12 << 20);
        s.apply_status(&id, "/CN=p", &beat, now).unwrap();
        let v = s.view(&id).unwrap();
        assert_eq!(
            (v.cpu_seconds, v.memory_bytes_now, v.peak_memory_bytes),
            (Some(1.5), Some(10 << 20), Some(12 << 20))
        );
        assert!(v.usage_at.is_some());
        // Only the owner or an operator may ask.
        let e = s.request_information(&id, "/CN=b", false, now).unwrap_err();
        assert!(matches!(e, StoreError::Forbidden(_)), "{e}");
        let rid = s.request_information(&id, "/CN=op", true, now).unwrap();
        let cmds = s.apply_status(&id, "/CN=p", &beat, now).unwrap();
        assert!(
            matches!(&cmds[..], [OperatorCommand::Information { request_id, .. }] if *request_id == rid)
        );
        assert!(s
            .information(&id, &rid, "/CN=op", true, 30)
            .unwrap()
            .answer
            .is_none());
        // An answer to a request never made is refused; the real one is kept once.
        let mut answer = InformationAnswer {
            request_id: "ff".into(),
            ok: true,
            reason: "information".into(),
            payload: None,
        };
        let mut rep = report(PayloadState::Running);
        rep.information = Some(answer.clone());
        assert!(s.apply_status(&id, "/CN=p", &rep, now).is_err());
        answer.request_id = rid.clone();
        rep.information = Some(answer.clone());
        s.apply_status(&id, "/CN=p", &rep, now).unwrap();
        let mut later = answer.clone();
        later.reason = "again".into();
        rep.information = Some(later);
        s.apply_status(&id, "/CN=p", &rep, now).unwrap();
        let got = s.information(&id, &rid, "/CN=a", false, 30).unwrap();
        assert_eq!(got.answer, Some(answer));
        assert_eq!(got.requester, "/CN=op");
        let e = s.information(&id, &rid, "/CN=b", false, 30).unwrap_err();
        assert!(matches!(e, StoreError::Forbidden(_)), "{e}");
        // The end: final CPU and peak, the last memory heard stays.
        let mut end = report(PayloadState::Done);
        end.cpu_seconds = Some(2.0);
        end.peak_memory_bytes = Some(13 << 20);
        s.apply_status(&id, "/CN=p", &end, now).unwrap();
        let v = s.view(&id).unwrap();
        assert_eq!(
            (v.cpu_seconds, v.memory_bytes_now, v.peak_memory_bytes),
            (Some(2.0), Some(10 << 20), Some(13 << 20))
        );
        let e = s.request_information(&id, "/CN=a", false, now).unwrap_err();
        assert!(e.to_string().contains("no pilot holds it"), "{e}");
    }

    #[test]
    fn sweep_requeues_unstarted_and_loses_silent_running() {
        let (_d, s) = store();
        let t0 = Utc::now();
        let a = s.submit(&new_payload(), None, t0).unwrap();
        let b = s.submit(&new_payload(), None, t0).unwrap();
        assert_eq!(s.match_one("/CN=p", &mreq(), t0).unwrap().unwrap().id, a);
        assert_eq!(s.match_one("/CN=p", &mreq(), t0).unwrap().unwrap().id, b);
        let running = report(PayloadState::Running);
        s.apply_status(&b, "/CN=p", &running, t0).unwrap();
        // Nothing is old enough yet.
        let early = t0 - Duration::seconds(1);
        assert_eq!(s.sweep(&rules(early, early), t0).unwrap(), Swept::default());
        let later = t0 + Duration::seconds(91);
        let after = t0 + Duration::seconds(1);
        let swept = s.sweep(&rules(after, after), later).unwrap();
        assert_eq!((swept.requeued, swept.failed, swept.lost), (1, 0, 1));
        let va = s.view(&a).unwrap();
        assert_eq!(va.state, PayloadState::Queued);
        assert_eq!(va.pilot_id, None);
        assert!(va.reason.unwrap().contains("requeued (1 of 5)"));
        let vb = s.view(&b).unwrap();
        assert_eq!(vb.state, PayloadState::Lost);
        assert!(
            vb.reason.unwrap().contains("3 missed heartbeats"),
            "lost reason"
        );
        // The old holder can no longer report on the requeued payload.
        assert!(matches!(
            s.apply_status(&a, "/CN=p", &running, later),
            Err(StoreError::Forbidden(_))
        ));
        // A late heartbeat does not reopen the server's `lost`...
        assert!(matches!(
            s.apply_status(&b, "/CN=p", &running, later),
            Err(StoreError::Conflict(_))
        ));
        // ...the pilot's late final report replaces it, once.
        let mut done = report(PayloadState::Done);
        done.exit_code = Some(0);
        s.apply_status(&b, "/CN=p", &done, later).unwrap();
        let vb = s.view(&b).unwrap();
        assert_eq!(vb.state, PayloadState::Done);
        assert_eq!(vb.exit_code, Some(0));
        assert!(vb.reason.unwrap().contains("reported late"));
        // The same report again (resent from the pilot's outbox) is accepted and changes
        // nothing; a different final state is refused.
        s.apply_status(&b, "/CN=p", &done, later).unwrap();
        assert_eq!(s.view(&b).unwrap().state, PayloadState::Done);
        assert!(matches!(
            s.apply_status(&b, "/CN=p", &report(PayloadState::Failed), later),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn a_pilots_own_lost_is_final_and_repeats_are_idempotent() {
        let (_d, s) = store();
        let t0 = Utc::now();
        let a = s.submit(&new_payload(), None, t0).unwrap();
        s.match_one("/CN=p", &mreq(), t0).unwrap().unwrap();
        s.apply_status(&a, "/CN=p", &report(PayloadState::Running), t0)
            .unwrap();
        s.apply_status(&a, "/CN=p", &report(PayloadState::Lost), t0)
            .unwrap();
        s.apply_status(&a, "/CN=p", &report(PayloadState::Lost), t0)
            .unwrap();
        assert!(matches!(
            s.apply_status(&a, "/CN=p", &report(PayloadState::Done), t0),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.view(&a).unwrap().state, PayloadState::Lost);
    }

    #[test]
    fn hand_backs_count_and_fail_at_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("data")).unwrap();
        s.set_requeue_limit(2);
        let seed = MemberSeed {
            dn: "/CN=a".into(),
            fqans: vec!["/demo".into()],
        };
        s.seed_members("demo", &[seed], Utc::now()).unwrap();
        let t0 = Utc::now();
        let a = s.submit(&new_payload(), None, t0).unwrap();
        let mut back = report(PayloadState::Queued);
        back.reason = Some("not started: helper connection lost".into());
        for n in 1..=2 {
            s.match_one("/CN=p", &mreq(), t0).unwrap().unwrap();
            s.apply_status(&a, "/CN=p", &back, t0).unwrap();
            let v = s.view(&a).unwrap();
            assert_eq!(v.state, PayloadState::Queued);
            assert!(v.reason.unwrap().contains(&format!("requeued ({n} of 2)")));
        }
        // The third hand-off that ends unstarted fails it, with the reason.
        s.match_one("/CN=p", &mreq(), t0).unwrap().unwrap();
        s.apply_status(&a, "/CN=p", &back, t0).unwrap();
        let v = s.view(&a).unwrap();
        assert_eq!(v.state, PayloadState::Failed);
        let reason = v.reason.unwrap();
        assert!(reason.contains("not started after 3 hand-offs"), "{reason}");
        assert!(reason.contains("helper connection lost"), "{reason}");
    }

    /// A database made by the releases before migrations (their schema, without the columns
    /// added since, or complete) upgrades in place: its rows are kept, it is recorded at V1 and
    /// brought to the current version, and a second open changes nothing.
    #[test]
    fn databases_made_before_migrations_upgrade_in_place() {
        // The releases' SCHEMA constant, byte for byte (it became migrations/sqlite/V1).
        let released = include_str!("migrations/sqlite/V1__initial.sql");
        let older = released
            .replace(",\n    requeues          INTEGER NOT NULL DEFAULT 0", "")
            .replace(",\n    lost_by_server    INTEGER NOT NULL DEFAULT 0", "");
        assert!(!older.contains("requeues"));
        for schema in [released.to_string(), older] {
            let d = tempfile::tempdir().unwrap();
            let data = d.path().join("data");
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&data)
                .unwrap();
            let now = ts(Utc::now());
            {
                let c = rusqlite::Connection::open(data.join("mupilot.db")).unwrap();
                c.execute_batch(&schema).unwrap();
                c.execute(
                    "INSERT INTO members VALUES ('/CN=a', 'demo', '[]', 'registered', ?1, '2999-01-01T00:00:00.000000Z')",
                    [&now],
                )
                .unwrap();
                c.execute(
                    "INSERT INTO payloads (id, owner_dn, vo, state, argv, env, cores, memory_bytes,
                        walltime_seconds, outputs, submitted_at, updated_at)
                     VALUES ('p-old', '/CN=a', 'demo', 'queued', '[\"/bin/true\"]', '{}', 1, 1, 1,
                        '[]', ?1, ?1)",
                    [&now],
                )
                .unwrap();
            }
            for _ in 0..2 {
                let s = Store::open(&data).unwrap();
                let versions: Vec<i64> = s
                    .sqlite()
                    .unwrap()
                    .prepare("SELECT version FROM refinery_schema_history ORDER BY version")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                // Recorded at every migration there is (V1 as a no-op, the later ones run).
                // (refinery lists its embedded migrations in no particular order)
                let mut all: Vec<i64> = super::super::sqlite_schema::migrations::runner()
                    .get_migrations()
                    .iter()
                    .map(|m| i64::from(m.version()))
                    .collect();
                all.sort_unstable();
                assert_eq!(versions, all);
                assert_eq!(s.view("p-old").unwrap().state, PayloadState::Queued);
                let m = s.match_one("/CN=p", &mreq(), Utc::now()).unwrap();
                if let Some(m) = m {
                    assert_eq!(m.id, "p-old");
                    let mut back = report(PayloadState::Queued);
                    back.reason = Some("handed back".into());
                    s.apply_status("p-old", "/CN=p", &back, Utc::now()).unwrap();
                }
                let a = s.submit(&new_payload(), None, Utc::now()).unwrap();
                assert_eq!(s.view(&a).unwrap().state, PayloadState::Queued);
            }
        }
    }

    #[test]
    fn denied_is_kept_for_authorization_refusals_only() {
        let (_d, s) = store();
        let now = Utc::now();
        for (class, expected) in [
            (Some("authorization"), PayloadState::Denied),
            (None, PayloadState::Denied),
            (Some("system"), PayloadState::Failed),
            (Some("caller"), PayloadState::Failed),
        ] {
            let id = s.submit(&new_payload(), None, now).unwrap();
            assert_eq!(s.match_one("/CN=p", &mreq(), now).unwrap().unwrap().id, id);
            // As a pilot older than the classes reports every refusal.
            let rep = StatusReport {
                pilot_id: "p".into(),
                state: Some(PayloadState::Denied),
                reason: Some("why".into()),
                denial_class: class.map(str::to_string),
                ..Default::default()
            };
            s.apply_status(&id, "/CN=p", &rep, now).unwrap();
            let v = s.view(&id).unwrap();
            assert_eq!(v.state, expected, "{class:?}");
            assert_eq!(v.denial_class.as_deref(), class);
            assert_eq!(v.reason.as_deref(), Some("why"));
        }
    }

    #[test]
    fn expired_membership_is_not_matched() {
        let (_d, s) = store();
        let now = Utc::now();
        s.submit(&new_payload(), None, now).unwrap();
        let in_two_years = now + Duration::days(730);
        assert!(s
            .match_one("/CN=p", &mreq(), in_two_years)
            .unwrap()
            .is_none());
        s.renew_member("/CN=a", in_two_years - Duration::days(1))
            .unwrap();
        assert!(s
            .match_one("/CN=p", &mreq(), in_two_years)
            .unwrap()
            .is_some());
    }
}
