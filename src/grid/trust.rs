//! The site's CA directory as an OpenSSL trust store: CA certificates by hashed name
//! (`<hash>.0`), their CRLs (`<hash>.r0`, as `fetch-crl` writes them), proxy certificates
//! allowed and every certificate in a chain checked against its CA's CRL. OpenSSL loads files
//! from the directory as lookups need them and keeps them, so a changed CRL is only seen by a
//! new store: [`TrustStore::is_stale`] says when to build one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use openssl::ssl::SslFiletype;
use openssl::stack::Stack;
use openssl::x509::store::{X509Lookup, X509Store, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Ref, X509StoreContext, X509VerifyResult, X509};

use super::dn::grid_dn;
use super::CredentialRefusal;

/// The CA directory, loaded.
pub struct TrustStore {
    store: X509Store,
    dir: PathBuf,
    mtime: Option<SystemTime>,
    loaded: Instant,
}

/// Why a chain did not verify, as OpenSSL reports it.
pub struct ChainFailure {
    pub code: i32,
    pub reason: String,
    pub subject: String,
    pub issuer: String,
}

fn mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

impl TrustStore {
    /// Builds the store over `dir`.
    pub fn load(dir: &Path) -> Result<TrustStore, CredentialRefusal> {
        let site = |what: String| {
            CredentialRefusal::Site(format!("CA directory {}: {what}", dir.display()))
        };
        if !dir.is_dir() {
            return Err(site(
                "not a directory; install the IGTF CA bundle (and fetch-crl) or set grid.cert_dir"
                    .into(),
            ));
        }
        let path = dir
            .to_str()
            .ok_or_else(|| site("path is not UTF-8".into()))?;
        let mtime = mtime(dir);
        let mut b = X509StoreBuilder::new().map_err(|e| site(e.to_string()))?;
        b.add_lookup(X509Lookup::hash_dir())
            .and_then(|l| l.add_dir(path, SslFiletype::PEM))
            .map_err(|e| site(e.to_string()))?;
        // CRL_CHECK_ALL: the user certificate and every CA above it, not only the leaf (a
        // proxy, which has no CRL). A CA without a CRL in the directory fails, as grid
        // middleware's default does: fetch-crl keeps them there.
        b.set_flags(
            X509VerifyFlags::ALLOW_PROXY_CERTS
                | X509VerifyFlags::CRL_CHECK
                | X509VerifyFlags::CRL_CHECK_ALL,
        )
        .map_err(|e| site(e.to_string()))?;
        Ok(TrustStore {
            store: b.build(),
            dir: dir.to_path_buf(),
            mtime,
            loaded: Instant::now(),
        })
    }

    /// The directory this store was built from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory changed since loading (fetch-crl renames new files in, which
    /// changes its mtime) or the store is older than `max_age`.
    pub fn is_stale(&self, max_age: Duration) -> bool {
        self.loaded.elapsed() >= max_age || mtime(&self.dir) != self.mtime
    }

    /// Verifies `leaf` up to a CA in the directory, with `untrusted` as the intermediate
    /// certificates (the rest of a proxy file). OpenSSL checks signatures, validity against
    /// the system clock, CRLs and its own proxy rules (RFC 3820 naming and path length).
    pub fn verify(&self, leaf: &X509Ref, untrusted: &[X509]) -> Result<(), ChainFailure> {
        let fail = |reason: String| ChainFailure {
            code: -1,
            reason,
            subject: grid_dn(leaf.subject_name()),
            issuer: grid_dn(leaf.issuer_name()),
        };
        let mut chain = Stack::new().map_err(|e| fail(e.to_string()))?;
        for c in untrusted {
            chain.push(c.clone()).map_err(|e| fail(e.to_string()))?;
        }
        let mut ctx = X509StoreContext::new().map_err(|e| fail(e.to_string()))?;
        let outcome = ctx.init(&self.store, leaf, &chain, |c| {
            let ok = c.verify_cert()?;
            Ok(if ok {
                None
            } else {
                let (subject, issuer) = c
                    .current_cert()
                    .map(|x| (grid_dn(x.subject_name()), grid_dn(x.issuer_name())))
                    .unwrap_or_default();
                Some((c.error(), subject, issuer))
            })
        });
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some((err, subject, issuer))) => Err(failure(err, subject, issuer)),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

fn failure(err: X509VerifyResult, subject: String, issuer: String) -> ChainFailure {
    ChainFailure {
        code: err.as_raw(),
        reason: err.error_string().to_string(),
        subject,
        issuer,
    }
}

/// OpenSSL's verification error codes the refusal tells apart.
pub const X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT: i32 = 2;
pub const X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: i32 = 20;
pub const X509_V_ERR_UNABLE_TO_GET_CRL: i32 = 3;
pub const X509_V_ERR_CRL_NOT_YET_VALID: i32 = 11;
pub const X509_V_ERR_CRL_HAS_EXPIRED: i32 = 12;
pub const X509_V_ERR_CERT_REVOKED: i32 = 23;

impl ChainFailure {
    /// The refusal for this failure against the CA directory `dir`.
    pub fn refusal(self, dir: &Path) -> CredentialRefusal {
        match self.code {
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT | X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY => {
                CredentialRefusal::UnknownCa {
                    dn: self.subject,
                    issuer: self.issuer,
                    cert_dir: dir.into(),
                }
            }
            X509_V_ERR_CERT_REVOKED => CredentialRefusal::Revoked {
                dn: self.subject,
                issuer: self.issuer,
                cert_dir: dir.into(),
            },
            X509_V_ERR_UNABLE_TO_GET_CRL
            | X509_V_ERR_CRL_NOT_YET_VALID
            | X509_V_ERR_CRL_HAS_EXPIRED => CredentialRefusal::Crl {
                dn: self.subject,
                issuer: self.issuer,
                reason: self.reason,
                cert_dir: dir.into(),
            },
            _ => CredentialRefusal::Chain {
                dn: self.subject,
                reason: self.reason,
                cert_dir: dir.into(),
            },
        }
    }
}
