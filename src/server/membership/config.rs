//! `[membership]` in server.toml: the current AUP versions, who manages the VO (by DN or by a
//! role FQAN in the registry), who may ask for suspensions, the audit log, how long personal
//! data outlives a membership, the optional notify hook. Parsing only.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::server::config::{resolve, ConfigError};

/// The longest personal registration data may be kept after a membership ends (reference
/// 002: audit logs with personal data no longer than one year).
pub const MAX_RETENTION_DAYS: u32 = crate::server::config::MAX_PERSONAL_DATA_DAYS;

/// `[membership]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMembership {
    grid_aup_version: Option<String>,
    vo_aup_version: Option<String>,
    #[serde(default)]
    manager_dns: Vec<String>,
    #[serde(default)]
    manager_fqans: Vec<String>,
    #[serde(default)]
    security_officer_dns: Vec<String>,
    #[serde(default)]
    operations_dns: Vec<String>,
    audit_log: Option<PathBuf>,
    personal_data_retention_days: Option<u32>,
    audit_log_retention_days: Option<u32>,
    purge_interval_seconds: Option<u64>,
    notify_command: Option<Vec<String>>,
}

/// The checked `[membership]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipSettings {
    pub grid_aup_version: String,
    pub vo_aup_version: String,
    /// VO managers by certificate DN (they need not be members).
    pub manager_dns: Vec<String>,
    /// VO managers by a role FQAN they hold as active members, e.g. `/demo/Role=VO-Admin`.
    pub manager_fqans: Vec<String>,
    /// Who may ask for a member's suspension besides the managers (reference 002 4.6).
    pub security_officer_dns: Vec<String>,
    pub operations_dns: Vec<String>,
    /// The hash-chained audit log of membership transactions.
    pub audit_log: PathBuf,
    /// How long personal registration data, decided requests and notifications outlive
    /// the membership or their decision (`personal_data_retention_days`).
    pub retention_days: u32,
    /// How long a rotated audit log file is kept (`audit_log_retention_days`): at least the
    /// traceability policy's minimum, at most a year.
    pub audit_log_retention_days: u32,
    pub purge_interval_seconds: u64,
    /// Run with one notification (JSON) on stdin, e.g. a mail hook.
    pub notify_command: Option<Vec<String>>,
}

impl MembershipSettings {
    /// Checks `[membership]` (absent: defaults); relative paths are relative to `base`.
    pub fn check(
        path: &Path,
        base: &Path,
        data_dir: &Path,
        vo: &str,
        raw: RawMembership,
    ) -> Result<Self, ConfigError> {
        let value = |key: &'static str, v: &str, why: String| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            value: v.to_string(),
            why,
        };
        let version = |key: &'static str, v: Option<String>| -> Result<String, ConfigError> {
            let v = v.unwrap_or_else(|| "1".to_string());
            if v.is_empty() || v.len() > 64 || v.chars().any(char::is_control) {
                return Err(value(
                    key,
                    &v,
                    "must be 1-64 characters on one line, e.g. \"1.2\"; raise it when the AUP changes and members re-accept at renewal".into(),
                ));
            }
            Ok(v)
        };
        for (key, list) in [
            ("membership.manager_dns", &raw.manager_dns),
            ("membership.security_officer_dns", &raw.security_officer_dns),
            ("membership.operations_dns", &raw.operations_dns),
        ] {
            for dn in list {
                if !dn.starts_with('/') {
                    return Err(value(
                        key,
                        dn,
                        "a DN is written grid style, e.g. \"/DC=org/DC=example/CN=manager\"".into(),
                    ));
                }
            }
        }
        for f in &raw.manager_fqans {
            if f != &format!("/{vo}") && !f.starts_with(&format!("/{vo}/")) {
                return Err(value(
                    "membership.manager_fqans",
                    f,
                    format!("must be an FQAN of VO {vo}, e.g. \"/{vo}/Role=VO-Admin\""),
                ));
            }
        }
        let retention_days = raw
            .personal_data_retention_days
            .unwrap_or(MAX_RETENTION_DAYS);
        // The registry's own data has no minimum: the audit log keeps the transactions.
        crate::server::config::check_days(
            path,
            "membership.personal_data_retention_days",
            retention_days,
            1,
            None,
            MAX_RETENTION_DAYS,
        )?;
        let audit_log_retention_days = raw.audit_log_retention_days.unwrap_or(MAX_RETENTION_DAYS);
        crate::server::config::check_days(
            path,
            "membership.audit_log_retention_days",
            audit_log_retention_days,
            crate::server::config::MIN_AUDIT_DAYS,
            Some(crate::server::config::MIN_AUDIT_REF),
            MAX_RETENTION_DAYS,
        )?;
        let purge_interval_seconds = raw.purge_interval_seconds.unwrap_or(3600);
        if !(1..=86400).contains(&purge_interval_seconds) {
            return Err(value(
                "membership.purge_interval_seconds",
                &purge_interval_seconds.to_string(),
                "must be between 1 and 86400 (the purge runs at least daily)".into(),
            ));
        }
        if let Some(cmd) = &raw.notify_command {
            if cmd.is_empty() || !cmd[0].starts_with('/') {
                return Err(value(
                    "membership.notify_command",
                    &format!("{cmd:?}"),
                    "must be an argv whose first element is an absolute path, e.g. [\"/usr/local/bin/vo-notify\", \"--mail\"]; it gets each notification as JSON on stdin".into(),
                ));
            }
        }
        Ok(MembershipSettings {
            grid_aup_version: version("membership.grid_aup_version", raw.grid_aup_version)?,
            vo_aup_version: version("membership.vo_aup_version", raw.vo_aup_version)?,
            manager_dns: raw.manager_dns,
            manager_fqans: raw.manager_fqans,
            security_officer_dns: raw.security_officer_dns,
            operations_dns: raw.operations_dns,
            audit_log: raw
                .audit_log
                .map(|p| resolve(base, &p))
                .unwrap_or_else(|| data_dir.join("membership-audit.jsonl")),
            retention_days,
            audit_log_retention_days,
            purge_interval_seconds,
            notify_command: raw.notify_command,
        })
    }
}
