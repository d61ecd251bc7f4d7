//! The membership registry (P3): who may submit, in which VO, with which FQANs, until when.
//! A member is active while `status = registered` and `renewal_due` lies in the future;
//! `renewal_due` is what envelopes carry as `membership_valid_until`. A registration waits as
//! `pending` until a VO manager approves it (store/registry.rs holds the requests).

use chrono::{DateTime, Months, Utc};
use serde::Serialize;

use super::db::{vals, Conn, Row};
use super::{parse_ts, ts, Store, StoreError};
use crate::server::config::MemberSeed;
use crate::server::membership::types::{EntityKind, Registration};

/// How long a registration or renewal lasts.
pub const MEMBERSHIP_MONTHS: u32 = 12;

/// Registry status of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Registered by the member, not yet approved: not active.
    Pending,
    Registered,
    Suspended,
    Removed,
}

impl MemberStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Registered => "registered",
            Self::Suspended => "suspended",
            Self::Removed => "removed",
        }
    }
    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => Self::Pending,
            "registered" => Self::Registered,
            "suspended" => Self::Suspended,
            "removed" => Self::Removed,
            _ => return Err(StoreError::Corrupt(format!("member status {s:?}"))),
        })
    }
}

/// One registry entry.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub dn: String,
    pub vo: String,
    pub fqans: Vec<String>,
    pub status: MemberStatus,
    pub registered_at: DateTime<Utc>,
    pub renewal_due: DateTime<Utc>,
    /// `person`, `host`, `service` or `robot`.
    pub kind: EntityKind,
    /// The personal registration data; None for members seeded from server.toml, and after
    /// the retention purge.
    pub registration: Option<Registration>,
    /// The AUP versions last accepted, and when.
    pub grid_aup_version: Option<String>,
    pub vo_aup_version: Option<String>,
    pub aup_accepted_at: Option<DateTime<Utc>>,
    /// When the membership ended (removed, or the registration refused).
    pub ended_at: Option<DateTime<Utc>>,
    /// Why and at whose request the member is suspended.
    pub suspension: Option<Suspension>,
}

/// The record of a suspension, kept on the member while it lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Suspension {
    pub reason: String,
    /// Who asked for it (a security officer, operations, or the manager who acted at once).
    pub requesters: Vec<String>,
    pub by: String,
    pub at: DateTime<Utc>,
    pub request_id: String,
}

impl Member {
    /// May this member submit, and may their payloads be matched, at `now`?
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.status == MemberStatus::Registered && self.renewal_due > now
    }

    /// The state listings show: `active`, `expired` (renewal lapsed), `pending`,
    /// `suspended` or `removed`.
    pub fn state(&self, now: DateTime<Utc>) -> &'static str {
        match self.status {
            MemberStatus::Registered if self.renewal_due > now => "active",
            MemberStatus::Registered => "expired",
            s => s.as_str(),
        }
    }
}

pub(crate) fn due(from: DateTime<Utc>) -> DateTime<Utc> {
    from.checked_add_months(Months::new(MEMBERSHIP_MONTHS))
        .expect("a date twelve months ahead is representable")
}

fn opt_json<T: serde::de::DeserializeOwned>(
    dn: &str,
    what: &str,
    v: Option<String>,
) -> Result<Option<T>, StoreError> {
    v.map(|t| {
        serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{what} of {dn}: {e}")))
    })
    .transpose()
}

pub(crate) fn member_from(mut r: Row) -> Result<Member, StoreError> {
    let dn = r.text(0)?;
    let fqans = r.text(2)?;
    let kind = r.text(6)?;
    let registration = opt_json(&dn, "registration", r.opt_text(7)?)?;
    let suspension = opt_json(&dn, "suspension", r.opt_text(12)?)?;
    let opt_ts = |v: Option<String>| v.as_deref().map(parse_ts).transpose();
    Ok(Member {
        kind: EntityKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("member kind {kind:?}")))?,
        registration,
        grid_aup_version: r.opt_text(8)?,
        vo_aup_version: r.opt_text(9)?,
        aup_accepted_at: opt_ts(r.opt_text(10)?)?,
        ended_at: opt_ts(r.opt_text(11)?)?,
        suspension,
        fqans: serde_json::from_str(&fqans)
            .map_err(|e| StoreError::Corrupt(format!("fqans of {dn}: {e}")))?,
        status: MemberStatus::parse(&r.text(3)?)?,
        registered_at: parse_ts(&r.text(4)?)?,
        renewal_due: parse_ts(&r.text(5)?)?,
        vo: r.text(1)?,
        dn,
    })
}

pub(crate) fn member_in(c: &mut dyn Conn, dn: &str) -> Result<Option<Member>, StoreError> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1"),
        vals![dn],
    )?
    .map(member_from)
    .transpose()
}

pub(crate) const COLUMNS: &str = "dn, vo, fqans, status, registered_at, renewal_due, kind, \
    registration, grid_aup_version, vo_aup_version, aup_accepted_at, ended_at, suspension";

impl Store {
    /// Inserts the `[[member]]` seeds that are not in the registry yet (existing entries,
    /// suspended or removed ones included, are left alone: the registry is the authority).
    pub fn seed_members(
        &self,
        vo: &str,
        seeds: &[MemberSeed],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        self.tx(|c| {
            let mut n = 0;
            for s in seeds {
                let fqans = serde_json::to_string(&s.fqans).expect("strings serialise");
                n += c.execute(
                    "INSERT INTO members (dn, vo, fqans, status, registered_at, renewal_due)
                     VALUES (?1, ?2, ?3, 'registered', ?4, ?5) ON CONFLICT (dn) DO NOTHING",
                    vals![&s.dn, vo, fqans, ts(now), ts(due(now))],
                )?;
            }
            Ok(n as usize)
        })
    }

    /// Sets a member's status, nothing else. Suspensions and removals go through the
    /// registry ([`Store::file_and_decide`], [`Store::decide`]), which also stop the member's
    /// payloads and keep the request record.
    /// A removed member's delegated credentials are deleted with their keys.
    pub fn set_member_status(&self, dn: &str, status: MemberStatus) -> Result<Member, StoreError> {
        let m = self.tx(|c| {
            let n = c.execute(
                "UPDATE members SET status = ?2 WHERE dn = ?1",
                vals![dn, status.as_str()],
            )?;
            if n == 0 {
                return Err(StoreError::NoMember(dn.into()));
            }
            member_in(c, dn)?.ok_or_else(|| StoreError::NoMember(dn.into()))
        })?;
        if status == MemberStatus::Removed {
            self.delete_delegations_of(dn)?;
        }
        Ok(m)
    }

    /// Renews a registered or suspended member for another twelve months from `now`, with
    /// nothing re-confirmed: only the store's own unit tests use it. Renewals go through the
    /// registry (a `renewal` request, approved), which records the data and AUPs.
    #[cfg(test)]
    pub(crate) fn renew_member(&self, dn: &str, now: DateTime<Utc>) -> Result<Member, StoreError> {
        self.tx(|c| {
            let lock = c.engine().lock_row();
            let m = c
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1{lock}"),
                    vals![dn],
                )?
                .map(member_from)
                .transpose()?
                .ok_or_else(|| StoreError::NoMember(dn.into()))?;
            if m.status == MemberStatus::Removed {
                return Err(StoreError::Conflict(format!(
                    "member {dn} was removed; register it again (`mupilot-server membership register`, or `mupilot-server member add` with its registration data)"
                )));
            }
            c.execute(
                "UPDATE members SET renewal_due = ?2 WHERE dn = ?1",
                vals![dn, ts(due(now))],
            )?;
            member_in(c, dn)?.ok_or_else(|| StoreError::NoMember(dn.into()))
        })
    }

    /// One member, if registered at all.
    pub fn member(&self, dn: &str) -> Result<Option<Member>, StoreError> {
        self.conn(|c| member_in(c, dn))
    }

    /// Every member, ordered by DN.
    pub fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.conn(|c| {
            c.query(
                &format!("SELECT {COLUMNS} FROM members ORDER BY dn"),
                vals![],
            )?
            .into_iter()
            .map(member_from)
            .collect()
        })
    }
}
