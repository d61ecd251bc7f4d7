//! Membership requests and their decisions (reference 002): registration, group/role
//! changes, renewal, suspension, removal and reinstatement as rows with requester, time,
//! details, outcome, approver and verification; the effect of an approval on the member and
//! on their payloads, in the same transaction; notifications owed at reinstatement; the
//! purge of personal data a year after a membership ends. Who may decide is checked by the
//! caller (server/membership); here only what the rows themselves decide (a subject never
//! approves a request about itself, a request is decided once).

use chrono::{DateTime, Utc};

use super::db::{vals, Conn, Row};
use super::members::{due, member_from, member_in, Suspension, COLUMNS};
use super::{parse_ts, ts, Member, MemberStatus, Store, StoreError};
use crate::protocol::api::OperatorCommand;
use crate::server::membership::types::{
    EntityKind, Notification, Registration, RequestKind, RequestView,
};

/// A request about to be filed.
#[derive(Debug, Clone)]
pub struct FiledRequest {
    pub kind: RequestKind,
    pub subject_dn: String,
    pub requester_dn: String,
    pub details: serde_json::Value,
}

/// A registration: the member row (pending) and its membership request.
#[derive(Debug, Clone)]
pub struct NewRegistration {
    pub dn: String,
    pub vo: String,
    pub kind: EntityKind,
    pub registration: Registration,
    pub grid_aup_version: String,
    pub vo_aup_version: String,
    pub fqans: Vec<String>,
}

/// What one run of [`Store::purge_membership`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MembershipPurged {
    /// Members whose membership ended before the cutoff (their entry and registration data).
    pub members: usize,
    /// Requests: all of a purged member's, and others decided before the cutoff.
    pub requests: usize,
    /// Notifications: all about a purged member, and others written before the cutoff.
    pub notifications: usize,
}

/// What an approval did besides deciding the request.
#[derive(Debug, Clone, Default)]
pub struct Effect {
    /// The member after the change (None for a rejection).
    pub member: Option<Member>,
    /// Queued payloads of the member that were cancelled.
    pub cancelled: Vec<String>,
    /// Matched or running payloads a signed cancel was queued for (their pilots carry it to
    /// the site's helper).
    pub cancelling: Vec<String>,
    /// Notifications written (reinstatement).
    pub notifications: Vec<Notification>,
}

const REQ_COLUMNS: &str = "id, kind, subject_dn, requester_dn, requested_at, details, state, \
    decided_by, decided_at, verification, note";

fn request_from(mut r: Row) -> Result<RequestView, StoreError> {
    let kind = r.text(1)?;
    let details = r.text(5)?;
    Ok(RequestView {
        id: r.text(0)?,
        kind: RequestKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("request kind {kind:?}")))?,
        subject_dn: r.text(2)?,
        requester_dn: r.text(3)?,
        requested_at: parse_ts(&r.text(4)?)?,
        details: serde_json::from_str(&details)
            .map_err(|e| StoreError::Corrupt(format!("request details: {e}")))?,
        state: r.text(6)?,
        decided_by: r.opt_text(7)?,
        decided_at: r.opt_text(8)?.as_deref().map(parse_ts).transpose()?,
        verification: r.opt_text(9)?,
        note: r.opt_text(10)?,
    })
}

fn notification_from(mut r: Row) -> Result<Notification, StoreError> {
    Ok(Notification {
        seq: r.int(0)?,
        created_at: parse_ts(&r.text(1)?)?,
        recipient_dn: r.text(2)?,
        subject_dn: r.text(3)?,
        request_id: r.text(4)?,
        message: r.text(5)?,
        delivery: r.opt_text(6)?,
    })
}

fn new_id() -> String {
    format!("r-{}", uuid::Uuid::new_v4().simple())
}

fn insert_request(
    c: &mut dyn Conn,
    id: &str,
    f: &FiledRequest,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    c.execute(
        &format!(
            "INSERT INTO membership_requests ({REQ_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, 'pending', NULL, NULL, NULL, NULL)"
        ),
        vals![
            id,
            f.kind.as_str(),
            &f.subject_dn,
            &f.requester_dn,
            ts(now),
            f.details.to_string()
        ],
    )?;
    Ok(())
}

fn request_in(c: &mut dyn Conn, id: &str, lock: bool) -> Result<RequestView, StoreError> {
    let lock = if lock { c.engine().lock_row() } else { "" };
    c.query_opt(
        &format!("SELECT {REQ_COLUMNS} FROM membership_requests WHERE id = ?1{lock}"),
        vals![id],
    )?
    .map(request_from)
    .transpose()?
    .ok_or_else(|| {
        StoreError::NotFound(format!(
            "membership request {id} (list them with `mupilot-server membership requests`)"
        ))
    })
}

fn locked_member(c: &mut dyn Conn, dn: &str) -> Result<Member, StoreError> {
    let lock = c.engine().lock_row();
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1{lock}"),
        vals![dn],
    )?
    .map(member_from)
    .transpose()?
    .ok_or_else(|| StoreError::NoMember(dn.into()))
}

/// Stops a member's work: queued payloads are cancelled (recorded with `why`), matched and
/// running ones get a cancel command from `requester` for their pilots, as
/// `mupilot-server cancel` would queue it.
fn stop_payloads(
    c: &mut dyn Conn,
    dn: &str,
    requester: &str,
    why: &str,
    now: DateTime<Utc>,
    effect: &mut Effect,
) -> Result<(), StoreError> {
    let rows = c.query(
        &format!(
            "SELECT id, state FROM payloads WHERE owner_dn = ?1 \
             AND state IN ('queued', 'matched', 'running') ORDER BY seq{}",
            c.engine().lock_row()
        ),
        vals![dn],
    )?;
    for mut r in rows {
        let id = r.text(0)?;
        if r.text(1)? == "queued" {
            c.execute(
                "UPDATE payloads SET state = 'cancelled', reason = ?2, updated_at = ?3
                 WHERE id = ?1 AND state = 'queued'",
                vals![&id, why, ts(now)],
            )?;
            effect.cancelled.push(id);
        } else {
            let cmd = OperatorCommand::Cancel {
                requester: requester.to_string(),
                signed: None,
            };
            super::payloads::queue_command(c, &id, &cmd)?;
            effect.cancelling.push(id);
        }
    }
    Ok(())
}

impl Store {
    /// Registers `r.dn` as pending with its membership request. A DN that is pending,
    /// registered or suspended is refused (renew, or ask for a change, instead); a removed
    /// one registers anew.
    pub fn register(
        &self,
        r: &NewRegistration,
        now: DateTime<Utc>,
    ) -> Result<RequestView, StoreError> {
        let reg = serde_json::to_string(&r.registration).expect("registrations serialise");
        let fqans = serde_json::to_string(&r.fqans).expect("strings serialise");
        self.tx(|c| {
            let lock = c.engine().lock_row();
            let existing = c
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1{lock}"),
                    vals![&r.dn],
                )?
                .map(member_from)
                .transpose()?;
            if let Some(m) = &existing {
                if m.status != MemberStatus::Removed {
                    return Err(StoreError::Conflict(format!(
                        "{} is already in the registry ({}); renew with `mupilot-server membership renew` or ask for other groups with `membership change`",
                        r.dn,
                        m.state(now)
                    )));
                }
            }
            // A pending row is never active: the dates are placeholders until approval.
            c.execute(
                "INSERT INTO members (dn, vo, fqans, status, registered_at, renewal_due, kind,
                    registration, grid_aup_version, vo_aup_version, aup_accepted_at, ended_at,
                    suspension)
                 VALUES (?1, ?2, '[]', 'pending', ?3, ?3, ?4, ?5, ?6, ?7, ?3, NULL, NULL)
                 ON CONFLICT (dn) DO UPDATE SET vo = ?2, fqans = '[]', status = 'pending',
                    registered_at = ?3, renewal_due = ?3, kind = ?4, registration = ?5,
                    grid_aup_version = ?6, vo_aup_version = ?7, aup_accepted_at = ?3,
                    ended_at = NULL, suspension = NULL",
                vals![
                    &r.dn,
                    &r.vo,
                    ts(now),
                    r.kind.as_str(),
                    &reg,
                    &r.grid_aup_version,
                    &r.vo_aup_version
                ],
            )?;
            let id = new_id();
            let filed = FiledRequest {
                kind: RequestKind::Membership,
                subject_dn: r.dn.clone(),
                requester_dn: r.dn.clone(),
                details: serde_json::json!({
                    "kind": r.kind.as_str(),
                    "fqans": serde_json::from_str::<serde_json::Value>(&fqans).expect("json"),
                    "grid_aup": r.grid_aup_version,
                    "vo_aup": r.vo_aup_version,
                }),
            };
            insert_request(c, &id, &filed, now)?;
            request_in(c, &id, false)
        })
    }

    /// Files a request for a manager's decision. The subject must be in the registry; one
    /// pending request of a kind per subject.
    pub fn file_request(
        &self,
        f: &FiledRequest,
        now: DateTime<Utc>,
    ) -> Result<RequestView, StoreError> {
        self.tx(|c| {
            let m = locked_member(c, &f.subject_dn)?;
            if m.status == MemberStatus::Removed {
                return Err(StoreError::Conflict(format!(
                    "{} was removed from the VO; a {} request no longer applies (register again)",
                    f.subject_dn,
                    f.kind.as_str()
                )));
            }
            let open = c.query_opt(
                "SELECT id FROM membership_requests WHERE subject_dn = ?1 AND kind = ?2 AND state = 'pending'",
                vals![&f.subject_dn, f.kind.as_str()],
            )?;
            if let Some(mut r) = open {
                return Err(StoreError::Conflict(format!(
                    "{} already has a pending {} request ({}); wait for a VO manager's decision",
                    f.subject_dn,
                    f.kind.as_str(),
                    r.text(0)?
                )));
            }
            let id = new_id();
            insert_request(c, &id, f, now)?;
            request_in(c, &id, false)
        })
    }

    /// Decides a pending request as `approver` (already known to be a VO manager): records
    /// the outcome and, when approved, applies it to the member (and their payloads) in the
    /// same transaction. Nobody decides a request about themself.
    pub fn decide(
        &self,
        id: &str,
        approver: &str,
        approve: bool,
        verification: &str,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(RequestView, Effect), StoreError> {
        let out = self.tx(|c| {
            let req = request_in(c, id, true)?;
            if req.state != "pending" {
                return Err(StoreError::Conflict(format!(
                    "membership request {id} was already {} by {} at {}",
                    req.state,
                    req.decided_by.as_deref().unwrap_or("?"),
                    req.decided_at.map(ts).unwrap_or_default()
                )));
            }
            if req.subject_dn == approver {
                return Err(StoreError::Forbidden(format!(
                    "{approver} may not decide request {id}: it is about {approver} themself; another VO manager decides it"
                )));
            }
            let outcome = if approve { "approved" } else { "rejected" };
            c.execute(
                "UPDATE membership_requests SET state = ?2, decided_by = ?3, decided_at = ?4,
                    verification = ?5, note = ?6 WHERE id = ?1 AND state = 'pending'",
                vals![id, outcome, approver, ts(now), verification, note.map(str::to_string)],
            )?;
            let mut effect = Effect::default();
            if approve {
                apply(c, &req, approver, now, &mut effect)?;
            } else if req.kind == RequestKind::Membership {
                // A refused registration ends there: the personal data is purged with the
                // other ended memberships.
                c.execute(
                    "UPDATE members SET status = 'removed', ended_at = ?2 WHERE dn = ?1 AND status = 'pending'",
                    vals![&req.subject_dn, ts(now)],
                )?;
            }
            if effect.member.is_none() {
                effect.member = member_in(c, &req.subject_dn)?;
            }
            Ok((request_in(c, id, false)?, effect))
        })?;
        self.end_credentials(&out.1)?;
        Ok(out)
    }

    /// Files a request and approves it in one transaction: what a VO manager does at once
    /// (an emergency suspension, a reinstatement, a removal), and a member's own removal.
    pub fn file_and_decide(
        &self,
        f: &FiledRequest,
        approver: &str,
        verification: &str,
        now: DateTime<Utc>,
    ) -> Result<(RequestView, Effect), StoreError> {
        let out = self.tx(|c| {
            let m = locked_member(c, &f.subject_dn)?;
            let self_removal = f.kind == RequestKind::Removal && approver == f.subject_dn;
            if approver == f.subject_dn && !self_removal {
                return Err(StoreError::Forbidden(format!(
                    "{approver} may not {} themself; another VO manager does",
                    f.kind.as_str()
                )));
            }
            let allowed = match f.kind {
                RequestKind::Suspension => m.status == MemberStatus::Registered,
                RequestKind::Reinstatement => m.status == MemberStatus::Suspended,
                RequestKind::Removal => m.status != MemberStatus::Removed,
                _ => false,
            };
            if !allowed {
                return Err(StoreError::Conflict(format!(
                    "{} is {}: a {} does not apply",
                    f.subject_dn,
                    m.state(now),
                    f.kind.as_str()
                )));
            }
            let id = new_id();
            insert_request(c, &id, f, now)?;
            c.execute(
                "UPDATE membership_requests SET state = 'approved', decided_by = ?2,
                    decided_at = ?3, verification = ?4 WHERE id = ?1",
                vals![&id, approver, ts(now), verification],
            )?;
            let req = request_in(c, &id, false)?;
            let mut effect = Effect::default();
            apply(c, &req, approver, now, &mut effect)?;
            Ok((req, effect))
        })?;
        self.end_credentials(&out.1)?;
        Ok(out)
    }

    /// A removed member's delegated credentials go with the membership, keys first (outside
    /// the transaction: the key files are not the database's).
    fn end_credentials(&self, effect: &Effect) -> Result<(), StoreError> {
        match &effect.member {
            Some(m) if m.status == MemberStatus::Removed => {
                self.delete_delegations_of(&m.dn).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// One request.
    pub fn membership_request(&self, id: &str) -> Result<RequestView, StoreError> {
        self.conn(|c| request_in(c, id, false))
    }

    /// Requests, oldest first: all, or those `dn` filed or is the subject of; optionally only
    /// in `state`.
    pub fn membership_requests(
        &self,
        dn: Option<&str>,
        state: Option<&str>,
    ) -> Result<Vec<RequestView>, StoreError> {
        self.conn(|c| {
            c.query(
                &format!(
                    "SELECT {REQ_COLUMNS} FROM membership_requests
                     WHERE (CAST(?1 AS TEXT) IS NULL OR subject_dn = ?1 OR requester_dn = ?1)
                       AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)
                     ORDER BY seq"
                ),
                vals![dn.map(str::to_string), state.map(str::to_string)],
            )?
            .into_iter()
            .map(request_from)
            .collect()
        })
    }

    /// Every notification, oldest first.
    pub fn membership_notifications(&self) -> Result<Vec<Notification>, StoreError> {
        self.conn(|c| {
            c.query(
                "SELECT seq, created_at, recipient_dn, subject_dn, request_id, message, delivery
                 FROM membership_notifications ORDER BY seq",
                vals![],
            )?
            .into_iter()
            .map(notification_from)
            .collect()
        })
    }

    /// Records how a notification was delivered (the notify hook's outcome).
    pub fn set_notification_delivery(&self, seq: i64, delivery: &str) -> Result<(), StoreError> {
        self.conn(|c| {
            c.execute(
                "UPDATE membership_notifications SET delivery = ?2 WHERE seq = ?1",
                vals![seq, delivery],
            )
            .map(|_| ())
        })
    }

    /// Deletes every trace in the registry of memberships that ended before `cutoff`:
    /// removed or refused (`ended_at`), or lapsed without renewal (`renewal_due`). The member
    /// row, its registration data, the requests about it and the notifications about it go;
    /// so do other members' requests decided, and notifications written, before `cutoff`.
    ///
    /// Erased, not only deleted ([`Store::erasing`]).
    pub fn purge_membership(&self, cutoff: DateTime<Utc>) -> Result<MembershipPurged, StoreError> {
        self.erasing(|| self.purge_rows(cutoff))
    }

    fn purge_rows(&self, cutoff: DateTime<Utc>) -> Result<MembershipPurged, StoreError> {
        self.tx(|c| {
            let ended = c.query(
                "SELECT dn FROM members
                 WHERE (status = 'removed' AND ended_at < ?1)
                    OR (status = 'registered' AND renewal_due < ?1)",
                vals![ts(cutoff)],
            )?;
            let mut out = MembershipPurged::default();
            for mut r in ended {
                let dn = r.text(0)?;
                out.requests += c.execute(
                    "DELETE FROM membership_requests WHERE subject_dn = ?1",
                    vals![&dn],
                )? as usize;
                out.notifications += c.execute(
                    "DELETE FROM membership_notifications WHERE subject_dn = ?1",
                    vals![&dn],
                )? as usize;
                out.members += c.execute("DELETE FROM members WHERE dn = ?1", vals![&dn])? as usize;
            }
            // Members who stay accumulate requests (renewals carry re-confirmed personal data)
            // and notifications: once decided (or written) longer ago than the retention
            // period they go too. The audit log keeps the transactions; a pending request
            // stays until decided.
            out.requests += c.execute(
                "DELETE FROM membership_requests WHERE state <> 'pending' AND decided_at < ?1",
                vals![ts(cutoff)],
            )? as usize;
            out.notifications += c.execute(
                "DELETE FROM membership_notifications WHERE created_at < ?1",
                vals![ts(cutoff)],
            )? as usize;
            Ok(out)
        })
    }
}

/// Applies an approved request to its subject.
fn apply(
    c: &mut dyn Conn,
    req: &RequestView,
    approver: &str,
    now: DateTime<Utc>,
    effect: &mut Effect,
) -> Result<(), StoreError> {
    let dn = req.subject_dn.as_str();
    let m = locked_member(c, dn)?;
    let d = &req.details;
    let conflict = |what: &str| {
        StoreError::Conflict(format!(
            "{dn} is {}: the {} request {} cannot be approved ({what})",
            m.state(now),
            req.kind.as_str(),
            req.id
        ))
    };
    match req.kind {
        RequestKind::Membership => {
            if m.status != MemberStatus::Pending {
                return Err(conflict("only a pending registration is approved"));
            }
            c.execute(
                "UPDATE members SET status = 'registered', fqans = ?2, registered_at = ?3,
                    renewal_due = ?4 WHERE dn = ?1",
                vals![dn, d["fqans"].to_string(), ts(now), ts(due(now))],
            )?;
        }
        RequestKind::Attributes => {
            if m.status != MemberStatus::Registered {
                return Err(conflict("groups and roles change for registered members"));
            }
            c.execute(
                "UPDATE members SET fqans = ?2 WHERE dn = ?1",
                vals![dn, d["fqans"].to_string()],
            )?;
        }
        RequestKind::Renewal => {
            if m.status != MemberStatus::Registered {
                return Err(conflict("registered members renew"));
            }
            c.execute(
                "UPDATE members SET renewal_due = ?2, registration = ?3, grid_aup_version = ?4,
                    vo_aup_version = ?5, aup_accepted_at = ?6 WHERE dn = ?1",
                vals![
                    dn,
                    ts(due(now)),
                    d["registration"].to_string(),
                    d["grid_aup"].as_str().unwrap_or_default(),
                    d["vo_aup"].as_str().unwrap_or_default(),
                    ts(req.requested_at)
                ],
            )?;
        }
        RequestKind::Suspension => {
            if m.status != MemberStatus::Registered {
                return Err(conflict("registered members are suspended"));
            }
            let reason = d["reason"].as_str().unwrap_or_default().to_string();
            let mut requesters = vec![req.requester_dn.clone()];
            if let Some(r) = d["reported_by"].as_str() {
                requesters.push(r.to_string());
            }
            let s = Suspension {
                reason: reason.clone(),
                requesters,
                by: approver.to_string(),
                at: now,
                request_id: req.id.clone(),
            };
            c.execute(
                "UPDATE members SET status = 'suspended', suspension = ?2 WHERE dn = ?1",
                vals![
                    dn,
                    serde_json::to_string(&s).expect("suspensions serialise")
                ],
            )?;
            let why = format!("owner suspended from the VO by {approver}: {reason}");
            stop_payloads(c, dn, approver, &why, now, effect)?;
        }
        RequestKind::Removal => {
            if m.status == MemberStatus::Removed {
                return Err(conflict("already removed"));
            }
            c.execute(
                "UPDATE members SET status = 'removed', ended_at = ?2, suspension = NULL WHERE dn = ?1",
                vals![dn, ts(now)],
            )?;
            let why = format!("owner removed from the VO (request {})", req.id);
            stop_payloads(c, dn, approver, &why, now, effect)?;
        }
        RequestKind::Reinstatement => {
            let Some(s) = &m.suspension else {
                return Err(conflict("only a suspended member is reinstated"));
            };
            if m.status != MemberStatus::Suspended {
                return Err(conflict("only a suspended member is reinstated"));
            }
            // Those who asked for the suspension are told before the member is active again:
            // the notification rows commit with the status change.
            let mut recipients = s.requesters.clone();
            recipients.dedup();
            for to in recipients {
                let message = format!(
                    "{dn}, suspended at {} at your request ({}: {}), is reinstated by {approver} (request {})",
                    ts(s.at),
                    s.request_id,
                    s.reason,
                    req.id
                );
                let r = c.query_one(
                    "INSERT INTO membership_notifications
                        (created_at, recipient_dn, subject_dn, request_id, message)
                     VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
                    vals![ts(now), &to, dn, &req.id, &message],
                )?;
                let seq = r.int(0)?;
                effect.notifications.push(Notification {
                    seq,
                    created_at: now,
                    recipient_dn: to,
                    subject_dn: dn.to_string(),
                    request_id: req.id.clone(),
                    message,
                    delivery: None,
                });
            }
            c.execute(
                "UPDATE members SET status = 'registered', suspension = NULL WHERE dn = ?1",
                vals![dn],
            )?;
        }
    }
    effect.member = member_in(c, dn)?;
    Ok(())
}
