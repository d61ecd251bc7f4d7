//! The portal controls' part of `server.toml`: `[[portal]]`, `[[robot]]`, `[rate_limits]`
//! and `[request_log]`, checked and turned into [`PortalSettings`]. Parsing only: nothing is
//! opened here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::super::config::{resolve, ConfigError};

/// A submission rate: a token bucket that refills `per_minute` submissions a minute and holds
/// at most `burst` of them (so `burst` may be spent at once after a quiet spell).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// Submissions added to the bucket per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }
}

/// What a portal may do for the members it names (`actions` of a `[[portal]]`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PortalAction {
    /// `POST /v1/payloads`.
    Submit,
    /// List, view and download the member's payloads.
    Read,
    /// Cancel the member's payloads.
    Cancel,
    /// Signal the member's running payloads.
    Signal,
}

fn default_actions() -> Vec<PortalAction> {
    vec![PortalAction::Submit, PortalAction::Read]
}

/// One `[[portal]]`: a host or service certificate allowed to act for VO members.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortalEntry {
    /// The portal's certificate subject.
    pub dn: String,
    /// The DN of the person responsible for the portal (its manager).
    pub responsible: String,
    /// How to reach the responsible person (free text, e.g. an e-mail address).
    #[serde(default)]
    pub contact: Option<String>,
    #[serde(default = "default_actions")]
    pub actions: Vec<PortalAction>,
    /// The submission rate agreed with the portal: required, the policy wants it agreed.
    pub rate: Rate,
}

/// One `[[robot]]`: a robot certificate and the person responsible for it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RobotEntry {
    pub dn: String,
    pub responsible: String,
    /// This robot's own submission rate (else `[rate_limits] robot`).
    #[serde(default)]
    pub rate: Option<Rate>,
}

/// `[rate_limits]`: the submission rate of each user and of each robot without a rate of
/// its own. Absent: not limited (portals always are, by their own `rate`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default)]
    pub user: Option<Rate>,
    #[serde(default)]
    pub robot: Option<Rate>,
}

/// `[request_log]`: where every request is recorded and how long rotated files are kept.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestLogConfig {
    /// Default: `requests.jsonl` in `data_dir`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Default: [`DEFAULT_REQUEST_LOG_RETENTION_DAYS`].
    #[serde(default)]
    pub retention_days: Option<u32>,
}

/// Rotated request log files are deleted this many days after their rotation by default:
/// the 180 days the traceability and logging policy asks of audit logs (also the least
/// accepted; a year is the most, see [`crate::server::config::check_days`]).
pub const DEFAULT_REQUEST_LOG_RETENTION_DAYS: u32 = crate::server::config::MIN_AUDIT_DAYS;

/// The portal controls of one server, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalSettings {
    pub portals: Vec<PortalEntry>,
    pub robots: Vec<RobotEntry>,
    pub rate_limits: RateLimits,
    pub request_log: PathBuf,
    pub request_log_retention: Duration,
}

/// The raw sections, as `server.toml` holds them.
pub struct RawSections {
    pub portals: Vec<PortalEntry>,
    pub robots: Vec<RobotEntry>,
    pub rate_limits: RateLimits,
    pub request_log: RequestLogConfig,
}

fn value_error(path: &Path, key: &'static str, value: &str, why: &str) -> ConfigError {
    ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn check_dn(path: &Path, key: &'static str, dn: &str) -> Result<(), ConfigError> {
    if dn.starts_with('/') && !dn.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(value_error(
            path,
            key,
            dn,
            "a DN is written grid style, e.g. \"/DC=org/DC=example/CN=portal.example.org\"",
        ))
    }
}

fn check_rate(path: &Path, key: &'static str, r: &Rate) -> Result<(), ConfigError> {
    if r.per_minute == 0 || r.burst == 0 {
        return Err(value_error(
            path,
            key,
            &format!("{{ per_minute = {}, burst = {} }}", r.per_minute, r.burst),
            "per_minute and burst must both be at least 1 (leave [rate_limits] user/robot out to not limit them)",
        ));
    }
    Ok(())
}

impl PortalSettings {
    /// Checks the sections of the config file at `path`; `base` resolves relative paths.
    pub fn check(
        path: &Path,
        base: &Path,
        data_dir: &Path,
        raw: RawSections,
    ) -> Result<Self, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for p in &raw.portals {
            check_dn(path, "portal.dn", &p.dn)?;
            check_dn(path, "portal.responsible", &p.responsible)?;
            check_rate(path, "portal.rate", &p.rate)?;
            if p.actions.is_empty() {
                return Err(value_error(
                    path,
                    "portal.actions",
                    "[]",
                    "a portal needs at least one action: \"submit\", \"read\", \"cancel\" or \"signal\"",
                ));
            }
            if !seen.insert(p.dn.as_str()) {
                return Err(value_error(
                    path,
                    "portal.dn",
                    &p.dn,
                    "is listed twice; keep one [[portal]] per certificate",
                ));
            }
        }
        for r in &raw.robots {
            check_dn(path, "robot.dn", &r.dn)?;
            check_dn(path, "robot.responsible", &r.responsible)?;
            if let Some(rate) = &r.rate {
                check_rate(path, "robot.rate", rate)?;
            }
            if r.responsible == r.dn {
                return Err(value_error(
                    path,
                    "robot.responsible",
                    &r.responsible,
                    "must name the person responsible for the robot, not the robot itself",
                ));
            }
            if !seen.insert(r.dn.as_str()) {
                return Err(value_error(
                    path,
                    "robot.dn",
                    &r.dn,
                    "is listed twice (as a robot, or as a robot and a portal); a certificate is one or the other",
                ));
            }
        }
        for (key, rate) in [
            ("rate_limits.user", raw.rate_limits.user),
            ("rate_limits.robot", raw.rate_limits.robot),
        ] {
            if let Some(r) = rate {
                check_rate(path, key, &r)?;
            }
        }
        let days = raw
            .request_log
            .retention_days
            .unwrap_or(DEFAULT_REQUEST_LOG_RETENTION_DAYS);
        // The request log is the portal policy's audit log (kept at least the traceability
        // policy's minimum) and holds DNs and client addresses (personal data: at most a year).
        crate::server::config::check_days(
            path,
            "request_log.retention_days",
            days,
            crate::server::config::MIN_AUDIT_DAYS,
            Some(crate::server::config::MIN_AUDIT_REF),
            DEFAULT_REQUEST_LOG_RETENTION_DAYS,
        )?;
        let request_log = match &raw.request_log.path {
            Some(p) => resolve(base, p),
            None => data_dir.join("requests.jsonl"),
        };
        Ok(PortalSettings {
            portals: raw.portals,
            robots: raw.robots,
            rate_limits: raw.rate_limits,
            request_log,
            request_log_retention: Duration::from_secs(u64::from(days) * 86400),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::server::config::ServerConfig;
    use std::path::Path;

    const BASE: &str = r#"
listen = "127.0.0.1:8443"
cert = "server.crt"
key = "server.key"
ca = "ca.pem"
data_dir = "data"
vo = "demo"
signing_key = "vo.key"
"#;

    fn parse(extra: &str) -> Result<ServerConfig, String> {
        ServerConfig::parse(
            Path::new("/etc/mupilot/server.toml"),
            &format!("{BASE}{extra}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn portals_robots_limits_and_the_request_log_parse_with_their_defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            c.portal.request_log,
            Path::new("/etc/mupilot/data/requests.jsonl")
        );
        assert_eq!(c.portal.request_log_retention.as_secs(), 180 * 86400);
        assert_eq!(c.portal.rate_limits.user, None);
        let c = parse(
            r#"
[rate_limits]
user = { per_minute = 30, burst = 10 }
[request_log]
path = "/var/log/mupilot/requests.jsonl"
retention_days = 365
[[portal]]
dn = "/DC=org/CN=portal.example.org"
responsible = "/DC=org/CN=Portal Manager"
rate = { per_minute = 600, burst = 50 }
[[robot]]
dn = "/DC=org/CN=Robot: nightly - Alice"
responsible = "/DC=org/CN=Alice"
"#,
        )
        .unwrap();
        assert_eq!(
            c.portal.portals[0].actions.len(),
            2,
            "submit and read by default"
        );
        assert_eq!(c.portal.robots[0].rate, None);
        assert_eq!(c.portal.rate_limits.user.unwrap().burst, 10);
        assert_eq!(c.portal.request_log_retention.as_secs(), 365 * 86400);
    }

    #[test]
    fn bad_entries_are_named_with_the_fix() {
        // A portal's rate is what the VO agreed with it: required.
        let e = parse("[[portal]]\ndn = \"/CN=p\"\nresponsible = \"/CN=m\"\n").unwrap_err();
        assert!(e.contains("rate"), "{e}");
        let e = parse("[[robot]]\ndn = \"/CN=r\"\nresponsible = \"/CN=r\"\n").unwrap_err();
        assert!(
            e.contains("robot.responsible") && e.contains("not the robot itself"),
            "{e}"
        );
        let e = parse(
            "[[robot]]\ndn = \"/CN=x\"\nresponsible = \"/CN=a\"\n[[portal]]\ndn = \"/CN=x\"\nresponsible = \"/CN=m\"\nrate = { per_minute = 1, burst = 1 }\n",
        )
        .unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = parse("[rate_limits]\nuser = { per_minute = 0, burst = 5 }\n").unwrap_err();
        assert!(
            e.contains("rate_limits.user") && e.contains("at least 1"),
            "{e}"
        );
        let e = parse("[[robot]]\ndn = \"CN=r\"\nresponsible = \"/CN=a\"\n").unwrap_err();
        assert!(e.contains("robot.dn") && e.contains("grid style"), "{e}");
        let e = parse("[request_log]\nretention_days = 0\n").unwrap_err();
        assert!(e.contains("request_log.retention_days"), "{e}");
        let e = parse(
            "[[portal]]\ndn = \"/CN=p\"\nresponsible = \"/CN=m\"\nactions = [\"delete\"]\nrate = { per_minute = 1, burst = 1 }\n",
        )
        .unwrap_err();
        assert!(e.contains("delete"), "{e}");
    }
}
