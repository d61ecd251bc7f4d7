//! Payload rows: submit, match (exactly one pilot per payload), status reports, operator
//! commands, output bookkeeping, reads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{parse_ts, ts, Store, StoreError};
use crate::protocol::api::{
    MatchRequest, OperatorCommand, PayloadState, PayloadView, StatusReport,
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
}

fn parse_state(s: &str) -> Result<PayloadState, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| StoreError::Corrupt(format!("payload state {s:?}")))
}

fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// SQLite integers are i64; saturate the (unsigned) request values.
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

const VIEW_COLUMNS: &str = "id, owner_dn, vo, state, argv, jobtag, cores, memory_bytes, \
    walltime_seconds, outputs, submitted_at, updated_at, pilot_id, host, batch_job_id, account, \
    uid, exit_code, signal, cpu_seconds, peak_memory_bytes, reason, denial_class, has_output, \
    outputs_skipped, files_deleted_at";

/// Raw column values of a view row (converted outside the rusqlite closure).
struct ViewRow {
    id: String,
    owner_dn: String,
    vo: String,
    state: String,
    argv: String,
    jobtag: Option<String>,
    cores: i64,
    memory_bytes: i64,
    walltime_seconds: i64,
    outputs: String,
    submitted_at: String,
    updated_at: Option<String>,
    pilot_id: Option<String>,
    host: Option<String>,
    batch_job_id: Option<String>,
    account: Option<String>,
    uid: Option<i64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    cpu_seconds: Option<f64>,
    peak_memory_bytes: Option<i64>,
    reason: Option<String>,
    denial_class: Option<String>,
    has_output: bool,
    outputs_skipped: Option<String>,
    files_deleted_at: Option<String>,
}

fn view_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ViewRow> {
    Ok(ViewRow {
        id: r.get(0)?,
        owner_dn: r.get(1)?,
        vo: r.get(2)?,
        state: r.get(3)?,
        argv: r.get(4)?,
        jobtag: r.get(5)?,
        cores: r.get(6)?,
        memory_bytes: r.get(7)?,
        walltime_seconds: r.get(8)?,
        outputs: r.get(9)?,
        submitted_at: r.get(10)?,
        updated_at: r.get(11)?,
        pilot_id: r.get(12)?,
        host: r.get(13)?,
        batch_job_id: r.get(14)?,
        account: r.get(15)?,
        uid: r.get(16)?,
        exit_code: r.get(17)?,
        signal: r.get(18)?,
        cpu_seconds: r.get(19)?,
        peak_memory_bytes: r.get(20)?,
        reason: r.get(21)?,
        denial_class: r.get(22)?,
        has_output: r.get(23)?,
        outputs_skipped: r.get(24)?,
        files_deleted_at: r.get(25)?,
    })
}

impl ViewRow {
    fn into_view(self) -> Result<PayloadView, StoreError> {
        Ok(PayloadView {
            state: parse_state(&self.state)?,
            argv: json("argv", &self.argv)?,
            resources: Resources {
                cores: self.cores as u32,
                memory_bytes: self.memory_bytes as u64,
                walltime_seconds: self.walltime_seconds as u64,
            },
            outputs: json("outputs", &self.outputs)?,
            submitted_at: parse_ts(&self.submitted_at)?,
            updated_at: self.updated_at.as_deref().map(parse_ts).transpose()?,
            payload_id: self.id,
            owner_dn: self.owner_dn,
            vo: self.vo,
            jobtag: self.jobtag,
            pilot_id: self.pilot_id,
            host: self.host,
            batch_job_id: self.batch_job_id,
            account: self.account,
            uid: self.uid.map(|u| u as u32),
            exit_code: self.exit_code,
            signal: self.signal,
            cpu_seconds: self.cpu_seconds,
            peak_memory_bytes: self.peak_memory_bytes.map(|m| m as u64),
            reason: self.reason,
            denial_class: self.denial_class,
            has_output: self.has_output,
            outputs_skipped: match &self.outputs_skipped {
                Some(s) => json("outputs_skipped", s)?,
                None => Vec::new(),
            },
            files_deleted_at: self.files_deleted_at.as_deref().map(parse_ts).transpose()?,
        })
    }
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
        let res = self.lock().execute(
            "INSERT INTO payloads (id, owner_dn, vo, state, argv, env, jobtag, cores, memory_bytes,
                walltime_seconds, outputs, bundle_sha256, submitted_at, updated_at)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
            params![
                id,
                p.owner_dn,
                p.vo,
                serde_json::to_string(&p.argv).expect("strings serialise"),
                serde_json::to_string(&p.env).expect("strings serialise"),
                p.jobtag,
                p.resources.cores,
                sat(p.resources.memory_bytes),
                sat(p.resources.walltime_seconds),
                serde_json::to_string(&p.outputs).expect("strings serialise"),
                p.bundle_sha256,
                ts(now),
            ],
        );
        if let Err(e) = res {
            let _ = std::fs::remove_file(self.bundle_path(&id));
            return Err(e.into());
        }
        Ok(id)
    }

    /// Picks the oldest queued payload that fits and whose owner is still an active member,
    /// and marks it matched to this pilot, in one immediate transaction.
    pub fn match_one(
        &self,
        pilot_dn: &str,
        req: &MatchRequest,
        now: DateTime<Utc>,
    ) -> Result<Option<Matched>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .prepare_cached(
                "SELECT p.id, p.owner_dn, m.vo, m.fqans, m.renewal_due, p.jobtag, p.argv, p.env,
                        p.bundle_sha256, p.cores, p.memory_bytes, p.walltime_seconds, p.outputs
                 FROM payloads p JOIN members m ON m.dn = p.owner_dn
                 WHERE p.state = 'queued' AND p.cores <= ?1 AND p.memory_bytes <= ?2
                   AND p.walltime_seconds <= ?3 AND m.status = 'registered'
                   AND m.renewal_due > ?4
                 ORDER BY p.seq LIMIT 1",
            )?
            .query_row(
                params![
                    req.free_cores,
                    sat(req.free_memory_bytes),
                    sat(req.seconds_left),
                    ts(now)
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Option<String>>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, i64>(10)?,
                        r.get::<_, i64>(11)?,
                        r.get::<_, String>(12)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, owner_dn, vo, fqans, due, jobtag, argv, env, sha, cores, mem, wall, outputs)) =
            row
        else {
            return Ok(None);
        };
        // The state guard makes the claim safe even against another process on the same file.
        let changed = tx
            .prepare_cached(
                "UPDATE payloads SET state = 'matched', pilot_dn = ?2, pilot_id = ?3, host = ?4,
                    batch_job_id = ?5, updated_at = ?6
                 WHERE id = ?1 AND state = 'queued'",
            )?
            .execute(params![
                id,
                pilot_dn,
                req.pilot_id,
                req.host,
                req.batch_job_id,
                ts(now)
            ])?;
        if changed != 1 {
            return Ok(None);
        }
        let matched = Matched {
            fqans: json("member fqans", &fqans)?,
            membership_valid_until: parse_ts(&due)?,
            argv: json("argv", &argv)?,
            env: json("env", &env)?,
            outputs: json("outputs", &outputs)?,
            resources: Resources {
                cores: cores as u32,
                memory_bytes: mem as u64,
                walltime_seconds: wall as u64,
            },
            id,
            owner_dn,
            vo,
            jobtag,
            bundle_sha256: sha,
        };
        tx.commit()?;
        Ok(Some(matched))
    }

    /// Undoes a match whose envelope could not be built or sent (e.g. the bundle file is
    /// unreadable): the payload is failed with a reason rather than left hanging.
    pub fn fail_matched(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE payloads SET state = 'failed', reason = ?2, updated_at = ?3
             WHERE id = ?1 AND state = 'matched'",
            params![id, reason, ts(now)],
        )?;
        Ok(())
    }

    /// Recovers payloads whose pilot went away (see [`SweepRules`]):
    /// - a payload matched before `matched_before` and never reported running is queued
    ///   again (its envelope has expired by then, so no helper starts it from the old one, and
    ///   the pilot kills one it started but could not report in time: docs/vo-operator.md),
    ///   or failed once it was requeued `max_requeues` times;
    /// - a running payload with no report since `silent_before` (its pilot missed
    ///   `missed_heartbeats` heartbeats) becomes `lost`, marked as the server's verdict so a
    ///   late final report from that pilot can still replace it.
    pub fn sweep(&self, rules: &SweepRules, now: DateTime<Utc>) -> Result<Swept, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut swept = Swept::default();
        let stale: Vec<(String, i64, Option<String>)> = tx
            .prepare(
                "SELECT id, requeues, pilot_id FROM payloads WHERE state = 'matched' AND updated_at < ?1",
            )?
            .query_map(params![ts(rules.matched_before)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        for (id, requeues, pilot) in stale {
            let why = format!(
                "pilot {} never reported it running before its envelope expired",
                pilot.as_deref().unwrap_or("?")
            );
            if requeue(&tx, &id, requeues, self.requeue_limit, &why, now)? {
                swept.requeued += 1;
            } else {
                swept.failed += 1;
            }
        }
        swept.lost = tx.execute(
            "UPDATE payloads SET state = 'lost', lost_by_server = 1, updated_at = ?2,
                reason = 'lost: no report from pilot ' || COALESCE(pilot_id, '?') || ' for ' || ?3
             WHERE state = 'running' AND updated_at < ?1",
            params![ts(rules.silent_before), ts(now), rules.silence],
        )?;
        tx.commit()?;
        Ok(swept)
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (state, holder_dn, holder_id) = tx
            .query_row(
                "SELECT state, pilot_dn, pilot_id FROM payloads WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.into()))?;
        let state = parse_state(&state)?;
        if holder_dn.as_deref() != Some(pilot_dn) || holder_id.as_deref() != Some(&rep.pilot_id) {
            return Err(StoreError::Forbidden(format!(
                "payload {id} is not held by pilot {:?} ({pilot_dn}); only the pilot it was matched to may report on it",
                rep.pilot_id
            )));
        }
        if state.is_final() {
            self.repeated_or_late(&tx, id, state, rep, now)?;
            tx.commit()?;
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
            Some(PayloadState::Running) if state == PayloadState::Running || state == PayloadState::Matched => {
                PayloadState::Running
            }
            // `denied` is reserved for local authorization decisions: a refusal of class
            // caller or system (as an older pilot reports it) is stored as `failed`.
            Some(PayloadState::Denied) => PayloadState::of_refusal(rep.denial_class.as_deref()),
            Some(s) => s,
        };
        let mut commands = take_commands(&tx, id)?;
        if new_state == PayloadState::Queued {
            // Handed back unstarted. A cancel that arrived meanwhile takes effect now.
            let cancelled_by = commands.iter().find_map(|c| match c {
                OperatorCommand::Cancel { requester, .. } => Some(requester.clone()),
                _ => None,
            });
            match cancelled_by {
                Some(who) => {
                    tx.execute(
                        "UPDATE payloads SET state = 'cancelled', reason = ?2, updated_at = ?3
                         WHERE id = ?1",
                        params![id, format!("cancelled by {who}"), ts(now)],
                    )?;
                }
                None => {
                    let requeues: i64 = tx.query_row(
                        "SELECT requeues FROM payloads WHERE id = ?1",
                        params![id],
                        |r| r.get(0),
                    )?;
                    let why = rep.reason.as_deref().unwrap_or("handed back by its pilot");
                    requeue(&tx, id, requeues, self.requeue_limit, why, now)?;
                }
            }
            commands.clear();
        } else {
            write_report(&tx, id, new_state, rep, rep.reason.as_deref(), now)?;
        }
        tx.commit()?;
        Ok(commands)
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state = managed_state(&tx, id, requester, is_operator, "cancel")?;
        let after = match state {
            PayloadState::Queued => {
                tx.execute(
                    "UPDATE payloads SET state = 'cancelled', reason = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, format!("cancelled by {requester}"), ts(now)],
                )?;
                PayloadState::Cancelled
            }
            PayloadState::Matched | PayloadState::Running => {
                let cmd = OperatorCommand::Cancel {
                    requester: requester.to_string(),
                    signed: None,
                };
                queue_command(&tx, id, &cmd)?;
                state
            }
            s => {
                return Err(StoreError::Conflict(format!(
                    "payload {id} is already {s}; there is nothing to cancel"
                )))
            }
        };
        tx.commit()?;
        Ok(after)
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state = managed_state(&tx, id, requester, is_operator, "signal")?;
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
        queue_command(&tx, id, &cmd)?;
        tx.commit()?;
        Ok(state)
    }

    /// The DN of the pilot that holds (or last held) a payload.
    pub fn holder(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .query_row(
                "SELECT pilot_dn FROM payloads WHERE id = ?1",
                params![id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.into()))
    }

    /// Records that the output archive is stored.
    pub fn set_has_output(&self, id: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE payloads SET has_output = 1, updated_at = ?2 WHERE id = ?1",
            params![id, ts(now)],
        )?;
        Ok(())
    }

    /// One payload as its owner sees it.
    pub fn view(&self, id: &str) -> Result<PayloadView, StoreError> {
        let row = self
            .lock()
            .query_row(
                &format!("SELECT {VIEW_COLUMNS} FROM payloads WHERE id = ?1"),
                params![id],
                view_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.into()))?;
        row.into_view()
    }

    /// Payloads of one owner (or of everyone), optionally in one state, oldest first.
    pub fn list(
        &self,
        owner: Option<&str>,
        state: Option<PayloadState>,
    ) -> Result<Vec<PayloadView>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VIEW_COLUMNS} FROM payloads
             WHERE (?1 IS NULL OR owner_dn = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY seq"
        ))?;
        let rows = stmt
            .query_map(params![owner, state.map(|s| s.as_str())], view_row)?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        rows.into_iter().map(ViewRow::into_view).collect()
    }

    /// How many payloads each VO has in each state (`(vo, state, count)`), for the metrics
    /// endpoint. One grouped scan; states with no payload are absent.
    pub fn count_by_state(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT vo, state, COUNT(*) FROM payloads GROUP BY vo, state")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The distinct pilot ids holding a matched or running payload (a busy pilot asks for no
    /// work but is alive), for the metrics endpoint.
    pub fn busy_pilots(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT pilot_id FROM payloads
             WHERE state IN ('matched', 'running') AND pilot_id IS NOT NULL",
        )?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
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
    /// Requeued too often: failed instead.
    pub failed: usize,
    pub lost: usize,
}

/// Writes a report's state and the fields it carries (a field it leaves out keeps its value);
/// the state is the pilot's word now, so the sweeper's `lost` mark goes.
fn write_report(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    state: PayloadState,
    rep: &StatusReport,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE payloads SET state = ?2, lost_by_server = 0,
            account = COALESCE(?3, account), uid = COALESCE(?4, uid),
            exit_code = COALESCE(?5, exit_code), signal = COALESCE(?6, signal),
            cpu_seconds = COALESCE(?7, cpu_seconds),
            peak_memory_bytes = COALESCE(?8, peak_memory_bytes),
            wall_seconds = COALESCE(?9, wall_seconds), reason = COALESCE(?10, reason),
            denial_class = COALESCE(?11, denial_class), updated_at = ?12,
            outputs_skipped = COALESCE(?13, outputs_skipped)
         WHERE id = ?1",
        params![
            id,
            state.as_str(),
            rep.account,
            rep.uid,
            rep.exit_code,
            rep.signal,
            rep.cpu_seconds,
            rep.peak_memory_bytes.map(sat),
            rep.wall_seconds,
            reason,
            rep.denial_class,
            ts(now),
            skipped_json(&rep.outputs_skipped)
        ],
    )?;
    Ok(())
}

/// Queues payload `id` again after a hand-off that never started it, or fails it when it was
/// requeued `limit` times already. Returns true when it was queued.
fn requeue(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    requeues: i64,
    limit: u32,
    why: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    if requeues >= i64::from(limit) {
        tx.execute(
            "UPDATE payloads SET state = 'failed', updated_at = ?2, reason = ?3 WHERE id = ?1",
            params![
                id,
                ts(now),
                format!(
                    "not started after {} hand-offs (max_requeues = {limit}); the last: {why}",
                    requeues + 1
                )
            ],
        )?;
        return Ok(false);
    }
    tx.execute(
        "UPDATE payloads SET state = 'queued', requeues = requeues + 1, pilot_dn = NULL,
            pilot_id = NULL, host = NULL, batch_job_id = NULL, updated_at = ?2,
            reason = ?3 WHERE id = ?1",
        params![
            id,
            ts(now),
            format!("requeued ({} of {limit}): {why}", requeues + 1)
        ],
    )?;
    Ok(true)
}

impl Store {
    /// A report for a payload already in a final state, from the pilot that holds it:
    /// - the same final state again (the pilot resent it from its outbox because it never saw
    ///   the answer): accepted and ignored, the first report stands;
    /// - a final state for a payload the sweeper marked `lost` (its pilot was silent but alive):
    ///   the late report is the truth and replaces the verdict, once;
    /// - anything else: 409, the final state is not reopened.
    fn repeated_or_late(
        &self,
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        state: PayloadState,
        rep: &StatusReport,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if rep.state == Some(state) {
            return Ok(());
        }
        let (by_server, since): (bool, Option<String>) = tx.query_row(
            "SELECT lost_by_server, updated_at FROM payloads WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let late = rep.state.filter(|s| s.is_final());
        match late {
            Some(s) if state == PayloadState::Lost && by_server => {
                let reason = format!(
                    "{} (reported late: the server had marked it lost at {})",
                    rep.reason.as_deref().unwrap_or(s.as_str()),
                    since.as_deref().unwrap_or("?")
                );
                write_report(tx, id, s, rep, Some(&reason), now)?;
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
}

/// The state of payload `id`, once `requester` is known to be its owner or a VO operator (the
/// only ones who may `verb` it).
fn managed_state(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    requester: &str,
    is_operator: bool,
    verb: &str,
) -> Result<PayloadState, StoreError> {
    let (owner, state) = tx
        .query_row(
            "SELECT owner_dn, state FROM payloads WHERE id = ?1",
            params![id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(id.into()))?;
    if owner != requester && !is_operator {
        return Err(StoreError::Forbidden(format!(
            "{requester} may not {verb} payload {id}: only its owner or a VO operator may"
        )));
    }
    parse_state(&state)
}

/// Stores an operator command for the pilot holding `id` (stored unsigned; the API signs each
/// command as it delivers it).
fn queue_command(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    cmd: &OperatorCommand,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO commands (payload_id, command) VALUES (?1, ?2)",
        params![id, serde_json::to_string(cmd).expect("commands serialise")],
    )?;
    Ok(())
}

fn take_commands(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
) -> Result<Vec<OperatorCommand>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT seq, command FROM commands WHERE payload_id = ?1 AND delivered = 0 ORDER BY seq",
    )?;
    let rows = stmt
        .query_map(params![id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (seq, text) in rows {
        out.push(json("operator command", &text)?);
        tx.execute(
            "UPDATE commands SET delivered = 1 WHERE seq = ?1",
            params![seq],
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
        s.lock()
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
            .lock()
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

    #[test]
    fn columns_are_added_to_an_older_database() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .unwrap();
        {
            let c = rusqlite::Connection::open(data.join("mupilot.db")).unwrap();
            let old = super::super::SCHEMA
                .replace(",\n    requeues          INTEGER NOT NULL DEFAULT 0", "")
                .replace(",\n    lost_by_server    INTEGER NOT NULL DEFAULT 0", "");
            assert!(!old.contains("requeues"));
            c.execute_batch(&old).unwrap();
        }
        let s = Store::open(&data).unwrap();
        let seed = MemberSeed {
            dn: "/CN=a".into(),
            fqans: vec![],
        };
        s.seed_members("demo", &[seed], Utc::now()).unwrap();
        let a = s.submit(&new_payload(), None, Utc::now()).unwrap();
        assert_eq!(s.view(&a).unwrap().state, PayloadState::Queued);
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
