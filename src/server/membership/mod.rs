//! The VO membership registry of reference 002 on top of the store: who manages the VO, who
//! may ask for what, the audit log of every transaction, notifications at reinstatement, and
//! the purge of personal data a year after a membership ends. [`api`] serves it under
//! `/v1/membership/`, [`cli`] is `mupilot-server membership ...`. The SQL lives in
//! `store/registry.rs`; the wire types and their checks in [`types`]. Nothing here decides
//! payload matching: that stays the store's `status = 'registered' AND renewal_due > now`.

pub(crate) mod api;
pub(crate) mod audit;
pub(crate) mod cli;
pub(crate) mod config;
pub(crate) mod notify;
pub mod types;

use chrono::{DateTime, Utc};

use self::audit::{AuditLog, AuditRecord};
use self::config::MembershipSettings;
use self::types::RequestView;
use super::store::{Effect, Store, StoreError};

/// The registry's policy and its audit log, shared by the API handlers and the purge job.
pub struct Registry {
    /// The VO's name (server.toml `vo`): the root group a new member's FQANs start from.
    pub vo: String,
    pub settings: MembershipSettings,
    pub audit: AuditLog,
}

/// The role a certificate has towards the registry, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manager,
    SecurityOfficer,
    Operations,
    Other,
}

impl Registry {
    pub fn new(vo: &str, settings: &MembershipSettings) -> Self {
        Registry {
            vo: vo.to_string(),
            audit: AuditLog::new(&settings.audit_log, settings.audit_log_retention_days),
            settings: settings.clone(),
        }
    }

    /// Checks a registration of `dn`, by the API's `register` (the certificate's owner) and by
    /// the operator's `member add` alike: the data its kind requires, the AUP versions
    /// accepted being the current ones, FQANs of this VO (default: the VO's root group).
    pub fn new_registration(
        &self,
        dn: &str,
        req: types::RegisterRequest,
    ) -> Result<super::store::NewRegistration, types::FieldError> {
        types::check_dn("dn", dn)?;
        req.registration.check(req.kind)?;
        req.accept.check(
            &self.settings.grid_aup_version,
            &self.settings.vo_aup_version,
        )?;
        let fqans = if req.fqans.is_empty() {
            vec![format!("/{}", self.vo)]
        } else {
            req.fqans
        };
        types::check_fqans(&self.vo, &fqans)?;
        Ok(super::store::NewRegistration {
            dn: dn.to_string(),
            vo: self.vo.clone(),
            kind: req.kind,
            registration: req.registration,
            grid_aup_version: req.accept.grid_aup,
            vo_aup_version: req.accept.vo_aup,
            fqans,
        })
    }

    /// `dn`'s role: a VO manager by `manager_dns`, or by holding one of `manager_fqans` as
    /// an active member; a security officer or operations by their lists.
    pub fn role(&self, store: &Store, dn: &str, now: DateTime<Utc>) -> Result<Role, StoreError> {
        let s = &self.settings;
        if s.manager_dns.iter().any(|d| d == dn) {
            return Ok(Role::Manager);
        }
        if !s.manager_fqans.is_empty() {
            if let Some(m) = store.member(dn)? {
                if m.is_active(now) && m.fqans.iter().any(|f| s.manager_fqans.contains(f)) {
                    return Ok(Role::Manager);
                }
            }
        }
        Ok(if s.security_officer_dns.iter().any(|d| d == dn) {
            Role::SecurityOfficer
        } else if s.operations_dns.iter().any(|d| d == dn) {
            Role::Operations
        } else {
            Role::Other
        })
    }

    /// Refuses `dn` unless it is a VO manager.
    pub fn require_manager(
        &self,
        store: &Store,
        dn: &str,
        what: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if self.role(store, dn, now)? == Role::Manager {
            return Ok(());
        }
        Err(StoreError::Forbidden(format!(
            "{dn} may not {what}: only a VO manager may (listed in manager_dns of [membership] in the VO's server.toml, or an active member holding one of its manager_fqans {:?})",
            self.settings.manager_fqans
        )))
    }

    /// Records one transaction; an audit record that cannot be written is logged whole
    /// (tracing) and returned as an error, so the caller answers that it was not recorded.
    pub fn record(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        self.audit.append(rec).map_err(|e| {
            tracing::error!(error = %e, record = ?rec, "cannot write the membership audit record");
            StoreError::Io {
                path: self.audit.path().to_path_buf(),
                source: std::io::Error::other(format!(
                    "the change was made but its audit record could not be written ({e}); it is in the server's log"
                )),
            }
        })
    }

    /// Records a request's state and what its approval did; then delivers the
    /// notifications it made through the hook (recording each outcome).
    pub fn record_request(
        &self,
        store: &Store,
        action: &'static str,
        actor: &str,
        req: &RequestView,
        effect: Option<&Effect>,
    ) -> Result<(), StoreError> {
        let mut rec = AuditRecord::new(action, actor, &req.state);
        rec.request_id = Some(req.id.clone());
        rec.kind = Some(req.kind.as_str());
        rec.subject_dn = Some(req.subject_dn.clone());
        rec.verification = req.verification.clone();
        let mut details = serde_json::Map::new();
        details.insert("requester_dn".into(), req.requester_dn.clone().into());
        // What was asked, without the personal registration data (names, e-mail, phone).
        for key in [
            "fqans",
            "reason",
            "reported_by",
            "grid_aup",
            "vo_aup",
            "kind",
        ] {
            if let Some(v) = req.details.get(key) {
                details.insert(key.into(), v.clone());
            }
        }
        if let Some(e) = effect {
            if !e.cancelled.is_empty() {
                details.insert("payloads_cancelled".into(), e.cancelled.clone().into());
            }
            if !e.cancelling.is_empty() {
                details.insert("payloads_cancel_sent".into(), e.cancelling.clone().into());
            }
        }
        rec.details = serde_json::Value::Object(details);
        self.record(&rec)?;
        if let Some(e) = effect {
            for n in &e.notifications {
                let delivery = match &self.settings.notify_command {
                    Some(argv) => {
                        let d = notify::deliver(argv, n);
                        store.set_notification_delivery(n.seq, &d)?;
                        d
                    }
                    None => "recorded (no notify_command configured)".to_string(),
                };
                let mut rec = AuditRecord::new(
                    "notify",
                    actor,
                    if delivery.starts_with("failed") {
                        "failed"
                    } else {
                        "done"
                    },
                );
                rec.request_id = Some(n.request_id.clone());
                rec.subject_dn = Some(n.subject_dn.clone());
                rec.details = serde_json::json!({
                    "recipient_dn": n.recipient_dn,
                    "delivery": delivery,
                });
                self.record(&rec)?;
            }
        }
        Ok(())
    }

    /// Deletes the registry data of memberships that ended more than the retention period
    /// before `now` (and requests decided, notifications written, that long ago), and
    /// records the run (counts, no DNs).
    pub fn purge(
        &self,
        store: &Store,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<super::store::MembershipPurged, StoreError> {
        let cutoff = now - chrono::Duration::days(i64::from(self.settings.retention_days));
        let n = store.purge_membership(cutoff)?;
        let mut rec = AuditRecord::new("purge", actor, "done");
        rec.details = serde_json::json!({
            "members_purged": n.members,
            "requests_purged": n.requests,
            "notifications_purged": n.notifications,
            "ended_before": super::store::ts_text(cutoff),
        });
        self.record(&rec)?;
        Ok(n)
    }
}
