//! The membership registry (P3): who may submit, in which VO, with which FQANs, until when.
//! A member is active while `status = registered` and `renewal_due` lies in the future;
//! `renewal_due` is what envelopes carry as `membership_valid_until`.

use chrono::{DateTime, Months, Utc};
use serde::Serialize;

use super::db::{vals, Conn, Row};
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

fn member_from(mut r: Row) -> Result<Member, StoreError> {
    let dn = r.text(0)?;
    let fqans = r.text(2)?;
    Ok(Member {
        fqans: serde_json::from_str(&fqans)
            .map_err(|e| StoreError::Corrupt(format!("fqans of {dn}: {e}")))?,
        status: MemberStatus::parse(&r.text(3)?)?,
        registered_at: parse_ts(&r.text(4)?)?,
        renewal_due: parse_ts(&r.text(5)?)?,
        vo: r.text(1)?,
        dn,
    })
}

fn member_in(c: &mut dyn Conn, dn: &str) -> Result<Option<Member>, StoreError> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM members WHERE dn = ?1"),
        vals![dn],
    )?
    .map(member_from)
    .transpose()
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
        self.tx(|c| {
            c.execute(
                "INSERT INTO members (dn, vo, fqans, status, registered_at, renewal_due)
                 VALUES (?1, ?2, ?3, 'registered', ?4, ?5)
                 ON CONFLICT (dn) DO UPDATE SET vo = ?2, fqans = ?3, status = 'registered',
                    registered_at = ?4, renewal_due = ?5",
                vals![dn, vo, &fq, ts(now), ts(due(now))],
            )?;
            member_in(c, dn)?.ok_or_else(|| StoreError::NoMember(dn.into()))
        })
    }

    /// Sets a member's status (suspend, remove). A removed member's delegated credentials
    /// are deleted with their keys.
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

    /// Renews a registered or suspended member for another twelve months from `now`.
    pub fn renew_member(&self, dn: &str, now: DateTime<Utc>) -> Result<Member, StoreError> {
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
                    "member {dn} was removed; register it again with `mupilot-server member add`"
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
