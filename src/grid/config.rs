//! The site's settings for grid credentials: where the CA directory and vomsdir are, and the
//! local policy on limited proxies, proxy lifetime, chain length and the envelope's FQANs.
//! Plain data with defaults; reading the files it names is [`super::trust`]'s and
//! [`super::lsc`]'s work.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where grid middleware keeps the CA directory (IGTF bundle, `fetch-crl`'s CRLs).
pub const DEFAULT_CERT_DIR: &str = "/etc/grid-security/certificates";
/// Where grid middleware keeps the VOMS servers' `.lsc` files, one directory per VO.
pub const DEFAULT_VOMSDIR: &str = "/etc/grid-security/vomsdir";

/// Grid credential settings (a `[grid]` table in switch.toml once wired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GridConfig {
    /// CA certificates as `<hash>.0` and their CRLs as `<hash>.r0` (`openssl rehash`).
    pub cert_dir: PathBuf,
    /// `<VO>/<host>.lsc` for each VOMS server the site trusts.
    pub vomsdir: PathBuf,
    /// Whether a chain with a limited proxy (RFC 3820 policy id-ppl-limited, Globus OID
    /// 1.3.6.1.4.1.3536.1.1.1.9) may run payloads.
    pub limited_proxies: LimitedProxies,
    /// Longest validity (not-after minus not-before) of any proxy in the chain. The default is
    /// the portal policy's bound for stored credentials (1,000,000 s).
    pub max_proxy_lifetime_seconds: u64,
    /// Most proxies in one chain (delegations after the end-entity certificate).
    pub max_chain_length: usize,
    /// What the envelope's registry FQANs count for once the AC's are verified.
    pub envelope_fqans: EnvelopeFqans,
    /// Re-read the CA directory at least this often even when its mtime is unchanged (a CRL
    /// rewritten in place), and drop cached verifications with it.
    pub ca_reload_seconds: u64,
}

impl Default for GridConfig {
    fn default() -> Self {
        GridConfig {
            cert_dir: PathBuf::from(DEFAULT_CERT_DIR),
            vomsdir: PathBuf::from(DEFAULT_VOMSDIR),
            limited_proxies: LimitedProxies::Refuse,
            max_proxy_lifetime_seconds: 1_000_000,
            max_chain_length: 5,
            envelope_fqans: EnvelopeFqans::Ignore,
            ca_reload_seconds: 3600,
        }
    }
}

/// Site policy on limited proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitedProxies {
    /// A chain with a limited proxy is refused (a limited proxy is meant for data access,
    /// not for starting jobs).
    #[default]
    Refuse,
    /// Accepted; the verified credential says `limited`.
    Accept,
}

/// How the envelope's FQANs (the VO registry's word) relate to the verified AC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeFqans {
    /// Only the AC's FQANs count; the envelope's are not looked at.
    #[default]
    Ignore,
    /// The envelope's FQANs count when it has any, else the AC's (the registry stays the
    /// authority on groups; the proxy proves identity and VO).
    Accept,
    /// Every FQAN the envelope names must be in the verified AC, else the payload is refused;
    /// the AC's FQANs count.
    MustAgree,
}

impl GridConfig {
    /// The configuration's problems, each naming the key, the value and the fix.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_chain_length == 0 {
            out.push(
                "grid.max_chain_length = 0 refuses every proxy; set it to at least 1 (default 5)"
                    .to_string(),
            );
        }
        if self.max_proxy_lifetime_seconds == 0 {
            out.push(
                "grid.max_proxy_lifetime_seconds = 0 refuses every proxy; set it to at least 3600 (default 1000000)"
                    .to_string(),
            );
        }
        for (key, dir) in [("cert_dir", &self.cert_dir), ("vomsdir", &self.vomsdir)] {
            if !dir.is_dir() {
                out.push(format!(
                    "grid.{key} = {}: not a directory; install the IGTF CA bundle and fetch-crl (cert_dir) or the VOs' .lsc files (vomsdir), or point the key at them",
                    dir.display()
                ));
            }
        }
        out
    }

    /// The FQANs that feed bans, policies and the group map, from the verified AC's and the
    /// envelope's per [`EnvelopeFqans`].
    pub fn effective_fqans(
        &self,
        envelope: &[String],
        verified: &[String],
    ) -> Result<Vec<String>, super::CredentialRefusal> {
        match self.envelope_fqans {
            EnvelopeFqans::Ignore => Ok(verified.to_vec()),
            EnvelopeFqans::Accept if !envelope.is_empty() => Ok(envelope.to_vec()),
            EnvelopeFqans::Accept => Ok(verified.to_vec()),
            EnvelopeFqans::MustAgree => {
                let norm: Vec<String> = verified
                    .iter()
                    .map(|f| super::voms::short_fqan(f))
                    .collect();
                match envelope
                    .iter()
                    .find(|f| !norm.contains(&super::voms::short_fqan(f)))
                {
                    Some(f) => Err(super::CredentialRefusal::FqanDisagrees {
                        fqan: f.clone(),
                        verified: verified.to_vec(),
                    }),
                    None => Ok(verified.to_vec()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml() {
        let c: GridConfig = toml::from_str("").unwrap();
        assert_eq!(c, GridConfig::default());
        let c: GridConfig = toml::from_str(
            "limited_proxies = \"accept\"\nenvelope_fqans = \"must_agree\"\nmax_chain_length = 3",
        )
        .unwrap();
        assert_eq!(c.limited_proxies, LimitedProxies::Accept);
        assert_eq!(c.envelope_fqans, EnvelopeFqans::MustAgree);
        assert_eq!(c.max_chain_length, 3);
        let e = toml::from_str::<GridConfig>("max_chain = 3").unwrap_err();
        assert!(e.to_string().contains("max_chain"), "{e}");
    }

    #[test]
    fn problems_name_key_value_and_fix() {
        let d = tempfile::tempdir().unwrap();
        let c = GridConfig {
            cert_dir: d.path().into(),
            vomsdir: d.path().into(),
            ..GridConfig::default()
        };
        assert!(c.problems().is_empty());
        let c = GridConfig {
            max_chain_length: 0,
            vomsdir: d.path().join("missing"),
            ..c
        };
        let p = c.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("grid.max_chain_length = 0"), "{p:?}");
        assert!(
            p[1].contains("grid.vomsdir") && p[1].contains("missing") && p[1].contains(".lsc"),
            "{p:?}"
        );
    }

    #[test]
    fn fqan_modes() {
        let ac = vec![
            "/atlas/Role=NULL/Capability=NULL".to_string(),
            "/atlas/prod/Role=production".into(),
        ];
        let env = vec!["/atlas".to_string()];
        let mut c = GridConfig::default();
        assert_eq!(c.effective_fqans(&env, &ac).unwrap(), ac);
        c.envelope_fqans = EnvelopeFqans::Accept;
        assert_eq!(c.effective_fqans(&env, &ac).unwrap(), env);
        assert_eq!(c.effective_fqans(&[], &ac).unwrap(), ac);
        c.envelope_fqans = EnvelopeFqans::MustAgree;
        assert_eq!(c.effective_fqans(&env, &ac).unwrap(), ac);
        let e = c
            .effective_fqans(&["/atlas/admin".to_string()], &ac)
            .unwrap_err();
        assert!(e.to_string().contains("/atlas/admin"), "{e}");
    }
}
