//! Retention in the store: a payload's input bundle and output archive are deleted a
//! configured time after it reached its final state, and the row keeps when
//! (`files_deleted_at`), so its status still says what happened to them; later the records
//! themselves go ([`Store::expire_records`]): a finished payload's row with its operator
//! commands and `information` answers, and the record of each proxy issued, once older than
//! `record_retention_days` (the policies' 180 days to a year). No HTTP here; the periodic jobs
//! that call these are the listener's, and `membership purge` runs them by hand.

use chrono::{DateTime, Utc};

use super::db::vals;
use super::{ts, Store, StoreError};

/// How many payloads one call expires at most (the job runs again soon); records are
/// deleted in transactions of this many payloads.
const BATCH: i64 = 500;

/// What one run of [`Store::expire_records`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecordsExpired {
    pub payloads: usize,
    pub commands: usize,
    pub information: usize,
    pub proxy_signings: usize,
}

impl Store {
    /// Deletes the bundle and output archive of payloads in a final state whose last change
    /// is older than `before`, and records `now` as their `files_deleted_at`. A file that
    /// cannot be deleted (other than already gone) leaves its payload for the next call and
    /// is reported. Returns how many payloads' files were deleted.
    pub fn expire_files(
        &self,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        // Several instances may run this at once: they may pick the same payloads, and then
        // both delete (a file already gone is fine) and the guarded UPDATE counts it once.
        let ids: Vec<String> = self.conn(|c| {
            c.query(
                "SELECT id FROM payloads
                 WHERE state NOT IN ('queued', 'matched', 'running')
                   AND files_deleted_at IS NULL AND updated_at < ?1
                 ORDER BY seq LIMIT ?2",
                vals![ts(before), BATCH],
            )?
            .into_iter()
            .map(|mut r| r.text(0))
            .collect()
        })?;
        let mut done = 0;
        let mut first_err = None;
        for id in ids {
            let mut ok = true;
            for path in [self.bundle_path(&id), self.output_path(&id)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        ok = false;
                        first_err.get_or_insert(StoreError::Io { path, source });
                    }
                }
            }
            if ok {
                // The row is final, so nothing else changes it but an upload of a late output
                // archive, which the API refuses once this is set.
                done += self.conn(|c| {
                    c.execute(
                        "UPDATE payloads SET files_deleted_at = ?2
                         WHERE id = ?1 AND files_deleted_at IS NULL",
                        vals![&id, ts(now)],
                    )
                })? as usize;
            }
        }
        match first_err {
            Some(e) if done == 0 => Err(e),
            Some(e) => {
                tracing::error!(error = %e, "retention: a payload file could not be deleted; retried later");
                Ok(done)
            }
            None => Ok(done),
        }
    }

    /// Deletes the records older than `before`: payloads in a final state whose files are
    /// already deleted and whose last change is older (with their operator commands and
    /// `information` requests and answers), and the records of proxies whose notAfter is
    /// older. Payloads not final, or final but with their files still kept, stay whatever
    /// their age. Runs in batches until nothing is left; safe to run from several instances
    /// at once (each row is deleted and counted once).
    pub fn expire_records(&self, before: DateTime<Utc>) -> Result<RecordsExpired, StoreError> {
        // A payload's row holds its owner's DN, argv and environment: personal data, erased.
        self.erasing(|| self.expire_rows(before))
    }

    fn expire_rows(&self, before: DateTime<Utc>) -> Result<RecordsExpired, StoreError> {
        let mut out = RecordsExpired::default();
        loop {
            let n = self.tx(|c| {
                let lock = c.engine().lock_row();
                let ids: Vec<String> = c
                    .query(
                        &format!(
                            "SELECT id FROM payloads
                             WHERE state NOT IN ('queued', 'matched', 'running')
                               AND files_deleted_at IS NOT NULL AND updated_at < ?1
                             ORDER BY seq LIMIT ?2{lock}"
                        ),
                        vals![ts(before), BATCH],
                    )?
                    .into_iter()
                    .map(|mut r| r.text(0))
                    .collect::<Result<_, _>>()?;
                let mut batch = RecordsExpired::default();
                for id in &ids {
                    batch.information += c
                        .execute("DELETE FROM information WHERE payload_id = ?1", vals![id])?
                        as usize;
                    batch.commands += c
                        .execute("DELETE FROM commands WHERE payload_id = ?1", vals![id])?
                        as usize;
                    batch.payloads +=
                        c.execute("DELETE FROM payloads WHERE id = ?1", vals![id])? as usize;
                }
                Ok((ids.len(), batch))
            })?;
            out.payloads += n.1.payloads;
            out.commands += n.1.commands;
            out.information += n.1.information;
            if n.0 < BATCH as usize {
                break;
            }
        }
        out.proxy_signings = self.conn(|c| {
            c.execute(
                "DELETE FROM proxy_signings WHERE not_after < ?1",
                vals![ts(before)],
            )
        })? as usize;
        Ok(out)
    }

    /// When the payload's files were deleted by retention, if they were.
    pub fn files_deleted_at(&self, id: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let t = self.conn(|c| {
            c.query_opt(
                "SELECT files_deleted_at FROM payloads WHERE id = ?1",
                vals![id],
            )?
            .map(|mut r| r.opt_text(0))
            .transpose()
        })?;
        match t {
            None => Err(StoreError::NotFound(id.into())),
            Some(t) => t.as_deref().map(super::parse_ts).transpose(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::{MatchRequest, PayloadState, StatusReport};
    use crate::server::config::MemberSeed;
    use crate::server::store::NewPayload;
    use chrono::Duration;
    use std::os::unix::fs::PermissionsExt;

    fn new_payload() -> NewPayload {
        NewPayload {
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
            bundle_sha256: Some("00".repeat(32)),
            delegation_id: None,
        }
    }

    #[test]
    fn final_payloads_lose_their_files_and_keep_when() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let s = Store::open(&data).unwrap();
        s.seed_members(
            "demo",
            &[MemberSeed {
                dn: "/CN=a".into(),
                fqans: vec![],
            }],
            Utc::now(),
        )
        .unwrap();
        let t0 = Utc::now();
        let done = s.submit(&new_payload(), Some(b"bundle"), t0).unwrap();
        let queued = s.submit(&new_payload(), Some(b"bundle"), t0).unwrap();
        let req = MatchRequest {
            pilot_id: "p".into(),
            batch_system: None,
            batch_job_id: None,
            host: "h".into(),
            free_cores: 1,
            free_memory_bytes: 1 << 30,
            seconds_left: 3600,
        };
        assert_eq!(s.match_one("/CN=p", &req, t0).unwrap().unwrap().id, done);
        let rep = StatusReport {
            pilot_id: "p".into(),
            state: Some(PayloadState::Done),
            exit_code: Some(0),
            ..Default::default()
        };
        s.apply_status(&done, "/CN=p", &rep, t0).unwrap();
        super::super::write_atomic(&s.output_path(&done), b"out").unwrap();
        s.set_has_output(&done, t0).unwrap();
        for p in [s.bundle_path(&done), s.output_path(&done)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        // Not old enough yet.
        assert_eq!(s.expire_files(t0 - Duration::seconds(1), t0).unwrap(), 0);
        let later = t0 + Duration::seconds(10);
        assert_eq!(s.expire_files(later, later).unwrap(), 1);
        assert!(!s.bundle_path(&done).exists() && !s.output_path(&done).exists());
        // The queued payload keeps its bundle.
        assert!(s.bundle_path(&queued).exists());
        let v = s.view(&done).unwrap();
        assert_eq!(
            v.files_deleted_at.map(|t| t.timestamp()),
            Some(later.timestamp())
        );
        assert!(v.has_output);
        assert_eq!(s.expire_files(later, later).unwrap(), 0);
    }
}
