//! `pilot.toml`: the pilot's configuration, parsed into a typed value at the edge.
//!
//! Holds parsing, defaults and validation only; it opens no sockets and loads no keys (the CLI
//! does that right after, so a bad certificate is still named at startup). Relative paths are
//! resolved against the directory of the config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::slot::Overrides;

/// Default helper socket.
pub const DEFAULT_SWITCH_SOCKET: &str = "/run/mupilot/switch.sock";

/// Errors reading pilot.toml; each names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pilot config {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pilot config {path} is not valid: {message}see docs/vo-framework.md for every key")]
    Parse { path: PathBuf, message: String },
    #[error("pilot config {path}: key '{key}' = {value:?} is invalid: {why}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: String,
    },
}

/// The file as written (every key; unknown keys are refused by name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_url: String,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    switch_socket: Option<PathBuf>,
    #[serde(default)]
    work_dir: Option<PathBuf>,
    #[serde(default)]
    pilot_id: Option<String>,
    #[serde(default)]
    trace_log: Option<PathBuf>,
    #[serde(default)]
    idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    poll_interval_seconds: Option<u64>,
    #[serde(default)]
    shutdown_margin_seconds: Option<u64>,
    #[serde(default)]
    grace_seconds: Option<u64>,
    #[serde(default)]
    heartbeat_seconds: Option<u64>,
    #[serde(default)]
    max_payloads: Option<u32>,
    #[serde(default)]
    drain_file: Option<PathBuf>,
    #[serde(default)]
    upload_reserve_seconds: Option<u64>,
    #[serde(default)]
    outbox_wait_seconds: Option<u64>,
    #[serde(default)]
    proxy_renew_margin_seconds: Option<u64>,
    #[serde(default)]
    slot: Overrides,
}

/// The pilot's configuration with defaults applied and paths made absolute.
#[derive(Debug, Clone)]
pub struct PilotConfig {
    /// The file it came from (for messages).
    pub source: PathBuf,
    /// VO server base URL, without a trailing '/'.
    pub server_url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub switch_socket: PathBuf,
    pub pilot_id: String,
    pub work_dir: PathBuf,
    pub trace_log: PathBuf,
    pub idle_timeout: Duration,
    pub poll_interval: Duration,
    pub shutdown_margin: Duration,
    pub grace: Duration,
    /// How often a running payload's status is re-sent (operator commands come back on it).
    pub heartbeat: Duration,
    pub max_payloads: Option<u32>,
    pub drain_file: Option<PathBuf>,
    /// The end of the slot kept for the last records and leaving: undelivered reports are
    /// retried until the deadline minus this.
    pub upload_reserve: Duration,
    /// With nothing else to do, how long undelivered reports are retried before the pilot
    /// leaves them in its outbox for the next pilot.
    pub outbox_wait: Duration,
    /// How long before a payload's delegated proxy expires the pilot renews it.
    pub proxy_renew_margin: Duration,
    pub slot: Overrides,
}

impl PilotConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        Self::parse(&text, path, &base)
    }

    /// Parses config text; `path` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message names the line, the column and the key (or the unknown key and
            // the keys that are accepted).
            message: format!("{e}\n"),
        })?;
        let bad = |key, value: String, why: &str| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            value,
            why: why.to_string(),
        };
        let server_url = raw.server_url.trim_end_matches('/').to_string();
        if !server_url.starts_with("https://") || server_url.len() <= "https://".len() {
            return Err(bad(
                "server_url",
                raw.server_url,
                "must be an https:// URL of the VO server, e.g. \"https://vo.example.org:8443\"",
            ));
        }
        let pilot_id = match raw.pilot_id {
            Some(id) if crate::util::is_safe_id(&id) => id,
            Some(id) => {
                return Err(bad(
                    "pilot_id",
                    id,
                    "must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'",
                ))
            }
            None => default_pilot_id(),
        };
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let work_dir = raw
            .work_dir
            .map(abs)
            .or_else(|| {
                super::trace_query::work_env().map(|w| std::path::absolute(&w).unwrap_or(w))
            })
            .unwrap_or_else(|| std::env::temp_dir().join(format!("mupilot-{pilot_id}")));
        let trace_log = raw
            .trace_log
            .map(abs)
            .unwrap_or_else(|| work_dir.join("trace.jsonl"));
        let secs = |key, v: Option<u64>, default: u64, min: u64| {
            let s = v.unwrap_or(default);
            if s < min {
                Err(bad(key, s.to_string(), &format!("must be at least {min}")))
            } else {
                Ok(Duration::from_secs(s))
            }
        };
        if raw.max_payloads == Some(0) {
            return Err(bad(
                "max_payloads",
                "0".into(),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if raw.slot.cores == Some(0) {
            return Err(bad(
                "slot.cores",
                "0".into(),
                "must be at least 1 (leave it out to use what the batch system grants)",
            ));
        }
        Ok(PilotConfig {
            source: path.to_path_buf(),
            server_url,
            cert: abs(raw.cert),
            key: abs(raw.key),
            ca: raw
                .ca
                .map(abs)
                .unwrap_or_else(|| PathBuf::from(crate::tls::DEFAULT_CA_DIR)),
            switch_socket: raw
                .switch_socket
                .map(abs)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SWITCH_SOCKET)),
            pilot_id,
            work_dir,
            trace_log,
            idle_timeout: secs("idle_timeout_seconds", raw.idle_timeout_seconds, 60, 1)?,
            poll_interval: secs("poll_interval_seconds", raw.poll_interval_seconds, 2, 1)?,
            shutdown_margin: secs(
                "shutdown_margin_seconds",
                raw.shutdown_margin_seconds,
                120,
                0,
            )?,
            grace: secs("grace_seconds", raw.grace_seconds, 30, 0)?,
            heartbeat: secs("heartbeat_seconds", raw.heartbeat_seconds, 30, 1)?,
            max_payloads: raw.max_payloads,
            drain_file: raw.drain_file.map(abs),
            upload_reserve: secs("upload_reserve_seconds", raw.upload_reserve_seconds, 30, 0)?,
            outbox_wait: secs("outbox_wait_seconds", raw.outbox_wait_seconds, 3600, 0)?,
            proxy_renew_margin: secs(
                "proxy_renew_margin_seconds",
                raw.proxy_renew_margin_seconds,
                3600,
                60,
            )?,
            slot: raw.slot,
        })
    }
}

/// `<hostname>-<pid>`, with characters outside the safe-id set replaced by '-'.
pub fn default_pilot_id() -> String {
    let host = hostname();
    let mut id: String = format!("{host}-{}", std::process::id())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    // Keep the pid (the distinguishing part) when a long host name must be cut.
    if id.len() > 64 {
        id = id[id.len() - 64..].to_string();
    }
    id.trim_start_matches('.').to_string()
}

/// This machine's host name ("localhost" when it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "server_url = \"https://vo.example:8443/\"\ncert = \"p.crt\"\nkey = \"/abs/p.key\"\n";

    fn parse(text: &str) -> Result<PilotConfig, ConfigError> {
        PilotConfig::parse(text, Path::new("/etc/x/pilot.toml"), Path::new("/etc/x"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.server_url, "https://vo.example:8443");
        assert_eq!(c.cert, PathBuf::from("/etc/x/p.crt"));
        assert_eq!(c.key, PathBuf::from("/abs/p.key"));
        assert_eq!(c.ca, PathBuf::from("/etc/grid-security/certificates"));
        assert_eq!(c.switch_socket, PathBuf::from(DEFAULT_SWITCH_SOCKET));
        assert_eq!(c.trace_log, c.work_dir.join("trace.jsonl"));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.grace, Duration::from_secs(30));
        assert!(crate::util::is_safe_id(&c.pilot_id));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(&format!("{MIN}idle_timeout = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("idle_timeout"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("/etc/x/pilot.toml"), "{err}");
    }

    #[test]
    fn unknown_slot_key_is_named() {
        let err = parse(&format!("{MIN}[slot]\ngpus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpus"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = parse("server_url = \"https://x\"\ncert = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&MIN.replace("https://", "http://"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server_url"), "{err}");
        let err = parse(&format!("{MIN}pilot_id = \"a/b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pilot_id"), "{err}");
        let err = parse(&format!("{MIN}poll_interval_seconds = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_interval_seconds"), "{err}");
        // The message names the key's own minimum.
        let err = parse(&format!("{MIN}proxy_renew_margin_seconds = 30\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy_renew_margin_seconds") && err.contains("at least 60"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = PilotConfig::load(Path::new("/nonexistent/plt-pilot.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/plt-pilot.toml"), "{err}");
    }
}
