//! The membership registry (P3): who may submit, in which VO, with which FQANs, until when.
//! A member is active while `status = registered` and `renewal_due` lies in the future;
//! `renewal_due` is what envelopes carry as `membership_valid_until`.

use chrono::{DateTime, Months, Utc};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{parse_ts, ts, Store, StoreError};
use crate::server::config::MemberSeed;

/// How long a registration or renewal lasts.
pub const MEMBERSHIP_MONTHS: u32 = 12;

/// Registry status of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    Registered,
    Suspended,
    Removed,
}

impl MemberStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Suspended => "suspended",
            Self::Removed => "removed",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
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
}

impl Member {
    /// May this member submit, and may their payloads be matched, at `now`?
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.status == MemberStatus::Registered && self.renewal_due > now
    }
}

fn due(from: DateTime<Utc>) -> DateTime<Utc> {
    from.checked_add_months(Months::new(MEMBERSHIP_MONTHS))
        .expect("a date twelve months ahead is representable")
}

fn row_to_member(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, String, String, String, String)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn member_from(
    (dn, vo, fqans, status, reg, due): (String, String, String, String, String, String),
) -> Result<Member, StoreError> {
    Ok(Member {
        fqans: serde_json::from_str(&fqans)
            .map_err(|e| StoreError::Corrupt(format!("fqans of {dn}: {e}")))?,
        status: MemberStatus::parse(&status)?,
        registered_at: parse_ts(&reg)?,
        renewal_due: parse_ts(&due)?,
        dn,
        vo,
    })
}

const COLUMNS: &str = "dn, vo, fqans, status, registered_at, renewal_due";

impl Store {
    /// Inserts the `[[member]]` seeds that are not in the registry yet (existing entries,
    /// suspended or removed ones included, are left alone: the registry is the authority).
    pub fn seed_members(
        &self,
        vo: &str,
        seeds: &[MemberSeed],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let conn = self.lock();
        let mut n = 0;
        for s in seeds {
            let fqans = serde_json::to_string(&s.fqans).expect("strings serialise");
            n += conn.execute(
                "INSERT OR IGNORE INTO members (dn, vo, fqans, status, registered_at, renewal_due)
                 VALUES (?1, ?2, ?3, 'registered', ?4, ?5)",
                params![s.dn, vo, fqans, ts(now), ts(due(now))],
            )?;
        }
        Ok(n)
    }

    /// Registers a DN, or registers it again if it was suspended or removed (new dates).
    pub fn add_member(
        &self,
        dn: &str,
        vo: &str,
        fqans: &[String],
        now: DateTime<Utc>,
    ) -> Result<Member, StoreError> {
        if !dn.starts_with('/') {
            return Err(StoreError::Invalid(format!(
                "DN {dn:?} is not grid style; write it like /DC=org/DC=example/CN=name"
            )));
        }
        let fq = serde_json::to_string(fqans).expect("strings serialise");
        self.lock().execute(
            "INSERT INTO members (dn, vo, fqans, status, registered_at, renewal_due)
             VALUES (?1, ?2, ?3, 'registered', ?4, ?5)
             ON CONFLICT(dn) DO UPDATE SET vo = ?2, fqans = ?3, status = 'registered',
                registered_at = ?4, renewal_due = ?5",
            params![dn, vo, fq, ts(now), ts(due(now))],
        )?;
        self.member(dn)?
            .ok_or_else(|| StoreError::NoMember(dn.into()))
    }

    /// Sets a member's status (suspend, remove).
    pub fn set_member_status(&self, dn: &str, status: MemberStatus) -> Result<Member, StoreError> {
        let n = self.lock().execute(
            "UPDATE members SET status = ?2 WHERE dn = ?1",
            params![dn, status.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NoMember(dn.into()));
        }
        self.member(dn)?
            .ok_or_else(|| StoreError::NoMember(dn.into()))
    }

    /// Renews a registered or suspended member for another twelve months from `now`.
    pub fn renew_member(&self, dn: &str, now: DateTime<Utc>) -> Result<Member, StoreError> {
        let m = self
            .member(dn)?
            .ok_or_else(|| StoreError::NoMember(dn.into()))?;
        if m.status == MemberStatus::Removed {
            return Err(StoreError::Conflict(format!(
                "member {dn} was removed; register it again with `mupilot-server member add`"
            )));
        }
        self.lock().execute(
            "UPDATE members SET renewal_due = ?2 WHERE dn = ?1",
            params![dn, ts(due(now))],
        )?;
        self.member(dn)?
            .ok_or_else(|| StoreError::NoMember(dn.into()))
    }

    /// One member, if registered at all.
    pub fn member(&self, dn: &str) -> Result<Option<Member>, StoreError> {
        let row = self
            .lock()
            .query_row(
                &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1"),
                params![dn],
                row_to_member,
            )
            .optional()?;
        row.map(member_from).transpose()
    }

    /// Every member, ordered by DN.
    pub fn members(&self) -> Result<Vec<Member>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM members ORDER BY dn"))?;
        let rows = stmt
            .query_map([], row_to_member)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(member_from).collect()
    }
}
