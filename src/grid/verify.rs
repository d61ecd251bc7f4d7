//! The entry point: [`Verifier::verify`] takes a proxy file's bytes, the owner and VO the
//! envelope claims, and the time, and returns what was verified or why it is refused. Order of
//! checks: the chain's shape (RFC 3820 rules, site limits, validity), the chain against the
//! CA directory (OpenSSL: signatures, CRLs), the VOMS AC against the vomsdir, then the claim.
//! Results are cached by digest ([`super::cache`]); the claim is checked on every call.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use openssl::x509::X509;

use super::ac::OID_VOMS_ACS;
use super::cache::{digest, DigestCache, CAPACITY};
use super::dn::grid_dn;
use super::proxy::{self, Cert};
use super::trust::TrustStore;
use super::voms::{self, short_fqan};
use super::{CredentialRefusal, GridConfig};

/// What the envelope says about the credential's owner. `None` skips that comparison
/// (`check-proxy` without `--owner`/`--vo`); the launch path gives both.
#[derive(Debug, Clone, Copy, Default)]
pub struct Claim<'a> {
    pub owner_dn: Option<&'a str>,
    pub vo: Option<&'a str>,
}

impl<'a> Claim<'a> {
    /// The owner DN and VO of an envelope.
    pub fn owner(owner_dn: &'a str, vo: &'a str) -> Self {
        Claim {
            owner_dn: Some(owner_dn),
            vo: Some(vo),
        }
    }
}

/// A credential that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCredential {
    /// The end-entity certificate's subject, grid form.
    pub owner_dn: String,
    /// The CA that issued it.
    pub issuer_dn: String,
    /// Proxy serial numbers (lower-case hex without leading zeros), newest first.
    pub proxy_serials: Vec<String>,
    /// The earliest not-after of the chain and the AC: the credential is unusable after it.
    pub not_after: DateTime<Utc>,
    /// Whether a proxy in the chain is limited (only when the site accepts them).
    pub limited: bool,
    /// The VO of the verified AC.
    pub vo: String,
    /// Its FQANs, most significant first, `/Role=NULL/Capability=NULL` dropped.
    pub fqans: Vec<String>,
    /// The VOMS server that signed the AC, and its `host:port`.
    pub ac_signer: String,
    pub voms_uri: String,
    /// SHA-256 (hex) of the credential as presented.
    pub digest: String,
}

type Stamp = [Option<SystemTime>; 2];

struct State {
    trust: Option<TrustStore>,
    cache: DigestCache<Stamp, Arc<VerifiedCredential>>,
}

/// Verifies grid credentials under one site configuration; safe to share between threads.
pub struct Verifier {
    cfg: GridConfig,
    state: Mutex<State>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Verifier {
    /// A verifier for `cfg`; the CA directory is read on first use.
    pub fn new(cfg: GridConfig) -> Self {
        Verifier {
            cfg,
            state: Mutex::new(State {
                trust: None,
                cache: DigestCache::new(CAPACITY),
            }),
        }
    }

    pub fn config(&self) -> &GridConfig {
        &self.cfg
    }

    fn stamp(&self, vo: &str) -> Stamp {
        [mtime(&self.cfg.vomsdir), mtime(&self.cfg.vomsdir.join(vo))]
    }

    /// Verifies `chain_pem` (a proxy file: proxy first, its key skipped, then the certificates
    /// it was delegated from) for `claim` at `now`.
    pub fn verify(
        &self,
        chain_pem: &[u8],
        claim: &Claim<'_>,
        now: DateTime<Utc>,
    ) -> Result<Arc<VerifiedCredential>, CredentialRefusal> {
        let key = digest(chain_pem);
        // One lock around lookup and cold verification: a cold one takes about a millisecond,
        // and two launches with the same new credential then verify it once.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let max_age = Duration::from_secs(self.cfg.ca_reload_seconds);
        if st.trust.as_ref().is_none_or(|t| t.is_stale(max_age)) {
            st.trust = Some(TrustStore::load(&self.cfg.cert_dir)?);
            st.cache.clear();
        }
        let cred = match st.cache.get(&key, now, |c| self.stamp(&c.vo)) {
            Some(c) => c,
            None => {
                let trust = st.trust.as_ref().expect("loaded above");
                let c = Arc::new(self.verify_uncached(chain_pem, trust, now, &key)?);
                let stamp = self.stamp(&c.vo);
                st.cache.insert(key, c.not_after, stamp, c.clone(), now);
                c
            }
        };
        drop(st);
        check_claim(&cred, claim)?;
        Ok(cred)
    }

    /// Drops cached verifications (for measurements, and after a site changes policy).
    pub fn clear_cache(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cache
            .clear();
    }

    fn verify_uncached(
        &self,
        chain_pem: &[u8],
        trust: &TrustStore,
        now: DateTime<Utc>,
        key: &[u8; 32],
    ) -> Result<VerifiedCredential, CredentialRefusal> {
        let x509s = X509::stack_from_pem(chain_pem)
            .map_err(|e| CredentialRefusal::Unreadable(format!("not PEM certificates: {e}")))?;
        if x509s.is_empty() {
            return Err(CredentialRefusal::Unreadable("no certificate in it".into()));
        }
        let certs = x509s
            .into_iter()
            .map(Cert::new)
            .collect::<Result<Vec<_>, _>>()?;
        let shape = proxy::check(&certs, &self.cfg, now)?;
        let rest: Vec<X509> = certs[1..].iter().map(|c| c.x509.clone()).collect();
        trust
            .verify(&certs[0].x509, &rest)
            .map_err(|f| f.refusal(trust.dir()))?;
        let ee = &certs[shape.proxies];
        let ext = certs[..shape.proxies]
            .iter()
            .find_map(|c| c.extension(&OID_VOMS_ACS))
            .ok_or(CredentialRefusal::NoAc)?;
        let ac = voms::verify(ext, &ee.x509, &self.cfg.vomsdir, trust, now)?;
        Ok(VerifiedCredential {
            owner_dn: ee.dn(),
            issuer_dn: grid_dn(ee.x509.issuer_name()),
            proxy_serials: certs[..shape.proxies]
                .iter()
                .map(|c| {
                    c.x509
                        .serial_number()
                        .to_bn()
                        .ok()
                        .and_then(|b| serial_hex(&b).ok())
                        .unwrap_or_default()
                })
                .collect(),
            not_after: shape.not_after.min(ac.not_after),
            limited: shape.limited,
            fqans: ac.fqans.iter().map(|f| short_fqan(f)).collect(),
            vo: ac.vo,
            ac_signer: ac.signer,
            voms_uri: ac.uri,
            digest: hex::encode(key),
        })
    }
}

fn check_claim(cred: &VerifiedCredential, claim: &Claim<'_>) -> Result<(), CredentialRefusal> {
    if let Some(dn) = claim.owner_dn {
        if dn != cred.owner_dn {
            return Err(CredentialRefusal::OwnerMismatch {
                found: cred.owner_dn.clone(),
                expected: dn.to_string(),
            });
        }
    }
    if let Some(vo) = claim.vo {
        if vo != cred.vo {
            return Err(CredentialRefusal::AcVo {
                ac_vo: cred.vo.clone(),
                expected: vo.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_verifier_serves_every_connection_thread() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Verifier>();
    }
}

/// A certificate serial as every record and answer names it: lower-case hex without leading
/// zeros (OpenSSL prints whole bytes, so a serial whose first nibble is 0 would otherwise have
/// two spellings).
pub(crate) fn serial_hex(b: &openssl::bn::BigNumRef) -> Result<String, openssl::error::ErrorStack> {
    let s = b.to_hex_str()?.to_lowercase();
    Ok(match s.trim_start_matches('0') {
        "" => "0".to_string(),
        t => t.to_string(),
    })
}

#[cfg(test)]
mod serial_tests {
    #[test]
    fn serials_have_one_spelling() {
        let b = openssl::bn::BigNum::from_hex_str("081FBC031D4730B0").unwrap();
        assert_eq!(super::serial_hex(&b).unwrap(), "81fbc031d4730b0");
        let z = openssl::bn::BigNum::from_u32(0).unwrap();
        assert_eq!(super::serial_hex(&z).unwrap(), "0");
    }
}
