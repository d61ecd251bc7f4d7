//! switch.toml's `[glexec]` table: whether the gLExec-compatible entry is on, for which VOs
//! and pilot accounts, which caller variables reach the payload, and the payload's own
//! resources. Plain data and its load-time checks; the request itself is `super`'s.

use std::collections::BTreeSet;

use serde::Deserialize;

/// `[glexec]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlexec {
    /// Off unless the site says so: the entry runs commands no VO signed.
    #[serde(default)]
    pub enabled: bool,
    /// The VOs whose members' proxies may be used (each also a `[[vo]]`).
    #[serde(default)]
    pub vos: Vec<String>,
    /// The pilot accounts (as written in `allowed_pilots`) that may use it; absent: all of them.
    #[serde(default)]
    pub pilots: Option<Vec<String>>,
    /// Caller variables passed to the payload besides `GLEXEC_*` and `TZ` (gLExec's
    /// `preserve_env_variables`).
    #[serde(default)]
    pub preserve_env: Vec<String>,
    #[serde(default = "default_cores")]
    pub cores: u32,
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
    #[serde(default = "default_walltime")]
    pub walltime_seconds: u64,
}

fn default_cores() -> u32 {
    1
}
fn default_memory() -> u64 {
    4 << 30
}
fn default_walltime() -> u64 {
    48 * 3600
}

/// The validated `[glexec]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlexecConfig {
    pub enabled: bool,
    pub vos: BTreeSet<String>,
    /// Uids allowed to use the entry (a subset of `allowed_pilots`); None: every allowed pilot.
    pub pilot_uids: Option<BTreeSet<u32>>,
    pub preserve_env: Vec<String>,
    /// The payload cgroup's limits (below the pilot's, whose batch limits keep holding).
    pub cores: u32,
    pub memory_bytes: u64,
    pub walltime_seconds: u64,
}

impl RawGlexec {
    /// Checks the table against the configured VOs and pilots (`written` name or uid, uid).
    /// Errors name the key and the fix.
    pub fn validate(
        self,
        vos: &[&str],
        pilots: &[(&str, u32)],
    ) -> Result<GlexecConfig, (String, String)> {
        if self.enabled && self.vos.is_empty() {
            return Err((
                "glexec.vos".into(),
                "is empty, so the enabled entry would refuse every proxy; list the VOs whose members' proxies may be used, e.g. [\"atlas\"]".into(),
            ));
        }
        for (i, vo) in self.vos.iter().enumerate() {
            if !vos.contains(&vo.as_str()) {
                return Err((
                    format!("glexec.vos[{i}]"),
                    format!("'{vo}' is not a configured [[vo]]; add it (its policy and ban lists apply to gLExec requests too) or remove it here"),
                ));
            }
        }
        let pilot_uids = match self.pilots {
            None => None,
            Some(names) => {
                let mut uids = BTreeSet::new();
                for (i, n) in names.iter().enumerate() {
                    match pilots.iter().find(|(w, uid)| w == n || uid.to_string() == *n) {
                        Some((_, uid)) => uids.insert(*uid),
                        None => {
                            return Err((
                                format!("glexec.pilots[{i}]"),
                                format!("'{n}' is not in allowed_pilots; the entry serves only allowed pilot accounts"),
                            ))
                        }
                    };
                }
                Some(uids)
            }
        };
        for (i, name) in self.preserve_env.iter().enumerate() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err((
                    format!("glexec.preserve_env[{i}]"),
                    format!("{name:?} is not a variable name"),
                ));
            }
        }
        if self.cores == 0 || self.memory_bytes == 0 {
            return Err((
                "glexec.cores".into(),
                format!(
                    "cores = {} and memory_bytes = {} must both be positive (defaults 1 and 4 GiB)",
                    self.cores, self.memory_bytes
                ),
            ));
        }
        Ok(GlexecConfig {
            enabled: self.enabled,
            vos: self.vos.into_iter().collect(),
            pilot_uids,
            preserve_env: self.preserve_env,
            cores: self.cores,
            memory_bytes: self.memory_bytes,
            walltime_seconds: self.walltime_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawGlexec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn keys_are_checked_against_vos_and_pilots() {
        let pilots = [("mupilot", 990), ("1234", 1234)];
        let c = raw("enabled = true\nvos = [\"atlas\"]\npilots = [\"mupilot\"]")
            .validate(&["atlas", "cms"], &pilots)
            .unwrap();
        assert_eq!(c.pilot_uids, Some([990].into()));
        assert_eq!((c.cores, c.memory_bytes), (1, 4 << 30));
        let e = raw("enabled = true")
            .validate(&["atlas"], &pilots)
            .unwrap_err();
        assert_eq!(e.0, "glexec.vos");
        let e = raw("enabled = true\nvos = [\"lhcb\"]")
            .validate(&["atlas"], &pilots)
            .unwrap_err();
        assert!(e.0 == "glexec.vos[0]" && e.1.contains("[[vo]]"), "{e:?}");
        let e = raw("vos = [\"atlas\"]\npilots = [\"other\"]")
            .validate(&["atlas"], &pilots)
            .unwrap_err();
        assert!(e.1.contains("allowed_pilots"), "{e:?}");
        let e = raw("vos = [\"atlas\"]\nmemory_bytes = 0")
            .validate(&["atlas"], &pilots)
            .unwrap_err();
        assert_eq!(e.0, "glexec.cores");
        assert!(toml::from_str::<RawGlexec>("enable = true").is_err());
    }
}
