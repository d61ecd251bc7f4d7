//! Credentials members delegated to the server: the row (owner, the chain once uploaded, its
//! notAfter), the private key beside the database as a 0600 file
//! (`data_dir/delegations/<id>.key`, never in the database: a dump or a PostgreSQL server
//! holds no key), the record of every proxy signed for one, and their deletion when expired
//! or when the member is removed. No cryptography and no HTTP here: the API makes the key and
//! checks the chain (src/server/delegation.rs).

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::db::{vals, Conn};
use super::{parse_ts, ts, Store, StoreError};

/// A delegation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    pub id: String,
    pub owner_dn: String,
    pub created_at: DateTime<Utc>,
    /// While pending: when the request lapses; once uploaded: the chain's earliest notAfter.
    pub not_after: DateTime<Utc>,
    /// The chain the member uploaded (delegated proxy first); None while pending.
    pub chain_pem: Option<String>,
    pub serial: Option<String>,
    pub limited: bool,
}

/// One proxy signed for a delegation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    pub delegation_id: String,
    /// The payload a worker-node proxy was signed for; None for the member's own upload.
    pub payload_id: Option<String>,
    /// Who signed it: the member (upload) or the server (worker-node proxies).
    pub signer_dn: String,
    pub serial: String,
    pub subject: String,
    pub not_after: DateTime<Utc>,
    pub signed_at: DateTime<Utc>,
}

/// A payload as the proxy endpoint needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHolder {
    pub state: String,
    pub owner_dn: String,
    pub pilot_dn: Option<String>,
    pub delegation_id: Option<String>,
}

const COLUMNS: &str = "id, owner_dn, created_at, not_after, chain_pem, serial, limited";

fn delegation_in(c: &mut dyn Conn, id: &str) -> Result<Option<Delegation>, StoreError> {
    let Some(mut r) = c.query_opt(
        &format!("SELECT {COLUMNS} FROM delegations WHERE id = ?1"),
        vals![id],
    )?
    else {
        return Ok(None);
    };
    Ok(Some(Delegation {
        id: r.text(0)?,
        owner_dn: r.text(1)?,
        created_at: parse_ts(&r.text(2)?)?,
        not_after: parse_ts(&r.text(3)?)?,
        chain_pem: r.opt_text(4)?,
        serial: r.opt_text(5)?,
        limited: r.flag(6)?,
    }))
}

fn insert_signing(c: &mut dyn Conn, s: &Signing) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO proxy_signings (delegation_id, payload_id, signer_dn, serial, subject,
            not_after, signed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        vals![
            &s.delegation_id,
            &s.payload_id,
            &s.signer_dn,
            &s.serial,
            &s.subject,
            ts(s.not_after),
            ts(s.signed_at)
        ],
    )?;
    Ok(())
}

impl Store {
    /// Where a delegation's private key is kept.
    pub fn delegation_key_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("delegations").join(format!("{id}.key"))
    }

    /// Stores a new pending delegation: the key file first (0600, synced), then the row; the
    /// key is removed again if the row cannot be written.
    pub fn create_delegation(
        &self,
        id: &str,
        owner_dn: &str,
        key_pem: &[u8],
        pending_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let key = self.delegation_key_path(id);
        super::write_atomic(&key, key_pem)?;
        let res = self.conn(|c| {
            c.execute(
                "INSERT INTO delegations (id, owner_dn, created_at, not_after)
                 VALUES (?1, ?2, ?3, ?4)",
                vals![id, owner_dn, ts(now), ts(pending_until)],
            )
        });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&key);
            return Err(e);
        }
        Ok(())
    }

    /// How many of `owner_dn`'s delegations still wait for their chain at `now`.
    pub fn pending_delegations(
        &self,
        owner_dn: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        self.conn(|c| {
            c.query_one(
                "SELECT count(*) FROM delegations
                 WHERE owner_dn = ?1 AND chain_pem IS NULL AND not_after >= ?2",
                vals![owner_dn, ts(now)],
            )?
            .int(0)
        })
    }

    /// One delegation, if it exists.
    pub fn delegation(&self, id: &str) -> Result<Option<Delegation>, StoreError> {
        self.conn(|c| delegation_in(c, id))
    }

    /// Records the member's chain for a pending delegation of theirs, and its signing.
    /// Refused when it is someone else's, already completed, or lapsed.
    pub fn complete_delegation(
        &self,
        id: &str,
        owner_dn: &str,
        chain_pem: &str,
        limited: bool,
        signing: &Signing,
        now: DateTime<Utc>,
    ) -> Result<Delegation, StoreError> {
        self.tx(|c| {
            let lock = c.engine().lock_row();
            let d = c
                .query_opt(
                    &format!("SELECT owner_dn, chain_pem, not_after FROM delegations WHERE id = ?1{lock}"),
                    vals![id],
                )?
                .ok_or_else(|| StoreError::NotFound(format!("delegation {id}")))?;
            let mut d = d;
            if d.text(0)? != owner_dn {
                return Err(StoreError::Forbidden(format!(
                    "delegation {id} was requested by another member; request your own with POST /v1/delegations (`mupilot-server delegate`)"
                )));
            }
            if d.opt_text(1)?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "delegation {id} already holds a chain; request a new delegation to replace it"
                )));
            }
            let pending_until = parse_ts(&d.text(2)?)?;
            if pending_until < now {
                return Err(StoreError::Conflict(format!(
                    "delegation {id}'s request lapsed at {}; request a new delegation",
                    ts(pending_until)
                )));
            }
            c.execute(
                "UPDATE delegations SET chain_pem = ?2, not_after = ?3, serial = ?4, limited = ?5
                 WHERE id = ?1 AND chain_pem IS NULL",
                vals![
                    id,
                    chain_pem,
                    ts(signing.not_after),
                    &signing.serial,
                    i64::from(limited)
                ],
            )?;
            insert_signing(c, signing)?;
            delegation_in(c, id)?.ok_or_else(|| StoreError::NotFound(format!("delegation {id}")))
        })
    }

    /// Records a proxy the server signed for a delegation.
    pub fn record_signing(&self, s: &Signing) -> Result<(), StoreError> {
        self.conn(|c| insert_signing(c, s))
    }

    /// The proxies signed for a delegation, oldest first.
    pub fn signings(&self, delegation_id: &str) -> Result<Vec<Signing>, StoreError> {
        self.conn(|c| {
            c.query(
                "SELECT delegation_id, payload_id, signer_dn, serial, subject, not_after, signed_at
                 FROM proxy_signings WHERE delegation_id = ?1 ORDER BY seq",
                vals![delegation_id],
            )?
            .into_iter()
            .map(|mut r| {
                Ok(Signing {
                    delegation_id: r.text(0)?,
                    payload_id: r.opt_text(1)?,
                    signer_dn: r.text(2)?,
                    serial: r.text(3)?,
                    subject: r.text(4)?,
                    not_after: parse_ts(&r.text(5)?)?,
                    signed_at: parse_ts(&r.text(6)?)?,
                })
            })
            .collect()
        })
    }

    /// The payload's state, owner, holding pilot and delegation.
    pub fn proxy_holder(&self, id: &str) -> Result<ProxyHolder, StoreError> {
        self.conn(|c| {
            let mut r = c
                .query_opt(
                    "SELECT state, owner_dn, pilot_dn, delegation_id FROM payloads WHERE id = ?1",
                    vals![id],
                )?
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            Ok(ProxyHolder {
                state: r.text(0)?,
                owner_dn: r.text(1)?,
                pilot_dn: r.opt_text(2)?,
                delegation_id: r.opt_text(3)?,
            })
        })
    }

    /// Deletes delegations past their notAfter (lapsed requests and expired chains) with
    /// their keys: the key file first, so a row never outlives its key's deletion unnoticed.
    /// Returns how many were deleted.
    pub fn expire_delegations(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let ids: Vec<String> = self.conn(|c| {
            c.query(
                "SELECT id FROM delegations WHERE not_after < ?1",
                vals![ts(now)],
            )?
            .into_iter()
            .map(|mut r| r.text(0))
            .collect()
        })?;
        self.delete_delegations(&ids)
    }

    /// Deletes every delegation of `dn` with its key (the member was removed).
    pub fn delete_delegations_of(&self, dn: &str) -> Result<usize, StoreError> {
        let ids: Vec<String> = self.conn(|c| {
            c.query("SELECT id FROM delegations WHERE owner_dn = ?1", vals![dn])?
                .into_iter()
                .map(|mut r| r.text(0))
                .collect()
        })?;
        self.delete_delegations(&ids)
    }

    fn delete_delegations(&self, ids: &[String]) -> Result<usize, StoreError> {
        let mut done = 0;
        for id in ids {
            let key = self.delegation_key_path(id);
            match std::fs::remove_file(&key) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { path: key, source }),
            }
            done += self.conn(|c| c.execute("DELETE FROM delegations WHERE id = ?1", vals![id]))?
                as usize;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use std::os::unix::fs::PermissionsExt;

    fn signing(id: &str, now: DateTime<Utc>) -> Signing {
        Signing {
            delegation_id: id.into(),
            payload_id: None,
            signer_dn: "/CN=a".into(),
            serial: "1f".into(),
            subject: "/CN=a/CN=31".into(),
            not_after: now + Duration::hours(1),
            signed_at: now,
        }
    }

    #[test]
    fn a_delegation_lives_until_its_not_after_or_its_member() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("data")).unwrap();
        let now = Utc::now();
        s.create_delegation("d-1", "/CN=a", b"KEY", now + Duration::minutes(10), now)
            .unwrap();
        let key = s.delegation_key_path("d-1");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir = key.parent().unwrap();
        assert_eq!(
            std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Someone else's, then the owner's; a second upload conflicts.
        let e = s
            .complete_delegation("d-1", "/CN=b", "CHAIN", false, &signing("d-1", now), now)
            .unwrap_err();
        assert!(matches!(e, StoreError::Forbidden(_)), "{e}");
        let got = s
            .complete_delegation("d-1", "/CN=a", "CHAIN", true, &signing("d-1", now), now)
            .unwrap();
        assert_eq!(got.chain_pem.as_deref(), Some("CHAIN"));
        assert_eq!(s.pending_delegations("/CN=a", now).unwrap(), 0);
        assert!(got.limited);
        assert_eq!(
            got.not_after.timestamp(),
            (now + Duration::hours(1)).timestamp()
        );
        let e = s
            .complete_delegation("d-1", "/CN=a", "CHAIN", false, &signing("d-1", now), now)
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        assert_eq!(s.signings("d-1").unwrap().len(), 1);

        // A lapsed request cannot be completed.
        s.create_delegation("d-2", "/CN=a", b"KEY", now - Duration::seconds(1), now)
            .unwrap();
        assert_eq!(s.pending_delegations("/CN=a", now).unwrap(), 0);
        assert_eq!(
            s.pending_delegations("/CN=a", now - Duration::seconds(2))
                .unwrap(),
            1
        );
        let e = s
            .complete_delegation("d-2", "/CN=a", "CHAIN", false, &signing("d-2", now), now)
            .unwrap_err();
        assert!(e.to_string().contains("lapsed"), "{e}");

        // Retention takes the lapsed one now and the other after its notAfter.
        assert_eq!(s.expire_delegations(now).unwrap(), 1);
        assert!(s.delegation("d-2").unwrap().is_none());
        assert!(!s.delegation_key_path("d-2").exists());
        assert!(key.exists());
        assert_eq!(s.expire_delegations(now + Duration::hours(2)).unwrap(), 1);
        assert!(!key.exists() && s.delegation("d-1").unwrap().is_none());
        // The signing record stays.
        assert_eq!(s.signings("d-1").unwrap().len(), 1);

        // A payload queued with a delegation that expires before a match fails at the next
        // sweep; one whose delegation holds stays queued.
        s.create_delegation("d-4", "/CN=a", b"KEY", now + Duration::minutes(5), now)
            .unwrap();
        let sig = Signing {
            not_after: now + Duration::seconds(30),
            ..signing("d-4", now)
        };
        s.complete_delegation("d-4", "/CN=a", "CHAIN", false, &sig, now)
            .unwrap();
        let p = crate::server::store::NewPayload {
            owner_dn: "/CN=a".into(),
            vo: "demo".into(),
            argv: vec!["/bin/true".into()],
            env: Default::default(),
            jobtag: None,
            resources: crate::protocol::Resources {
                cores: 1,
                memory_bytes: 64 << 20,
                walltime_seconds: 60,
            },
            outputs: vec![],
            bundle_sha256: None,
            delegation_id: Some("d-4".into()),
        };
        let id = s.submit(&p, None, now).unwrap();
        let rules = crate::server::store::SweepRules {
            matched_before: now - Duration::hours(1),
            silent_before: now - Duration::hours(1),
            silence: "1 h".into(),
        };
        assert_eq!(s.sweep(&rules, now).unwrap().failed, 0);
        let later = now + Duration::seconds(31);
        assert_eq!(s.sweep(&rules, later).unwrap().failed, 1);
        let v = s.view(&id).unwrap();
        assert_eq!(v.state, crate::protocol::api::PayloadState::Failed);
        assert!(v.reason.unwrap().contains("delegated credential expired"));

        s.create_delegation("d-3", "/CN=a", b"KEY", now + Duration::hours(1), now)
            .unwrap();
        // Removing the member takes both it and the expired d-4 retention has not reached.
        assert_eq!(s.delete_delegations_of("/CN=a").unwrap(), 2);
        assert!(!s.delegation_key_path("d-3").exists());
        assert!(!s.delegation_key_path("d-4").exists());
    }
}
