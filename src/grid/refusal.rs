//! Why a credential is refused: one variant per check, each message naming what failed and the
//! value, as an authorization denial shows it (and `check-proxy` prints it).

use std::path::PathBuf;

use chrono::{DateTime, Utc};

fn t(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn hours(secs: i64) -> String {
    if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else {
        format!("{secs} s")
    }
}

/// A credential the site does not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialRefusal {
    #[error("credential unreadable: {0}")]
    Unreadable(String),
    #[error("not a proxy: {dn} is an end-entity certificate; delegate an RFC 3820 proxy, never the user's own credential")]
    NotAProxy { dn: String },
    #[error("{what} expired at {}: {dn}", t(at))]
    Expired {
        what: &'static str,
        dn: String,
        at: DateTime<Utc>,
    },
    #[error("{what} not valid before {}: {dn}", t(from))]
    NotYetValid {
        what: &'static str,
        dn: String,
        from: DateTime<Utc>,
    },
    #[error("issuer {issuer} of {dn} not in the CA directory {}", cert_dir.display())]
    UnknownCa {
        dn: String,
        issuer: String,
        cert_dir: PathBuf,
    },
    #[error("certificate revoked: {dn} (CRL of {issuer} in {})", cert_dir.display())]
    Revoked {
        dn: String,
        issuer: String,
        cert_dir: PathBuf,
    },
    #[error("no usable CRL of {issuer} for {dn}: {reason} (CA directory {}; fetch-crl keeps CRLs current)", cert_dir.display())]
    Crl {
        dn: String,
        issuer: String,
        reason: String,
        cert_dir: PathBuf,
    },
    #[error("chain verification failed at {dn}: {reason} (CA directory {})", cert_dir.display())]
    Chain {
        dn: String,
        reason: String,
        cert_dir: PathBuf,
    },
    #[error("proxy subject {subject} is not its issuer {issuer} plus one CN (RFC 3820 3.4)")]
    ProxyName { subject: String, issuer: String },
    #[error(
        "proxy path length exceeded: {dn} allows {allowed} proxies below it, the chain has {below}"
    )]
    PathLength {
        dn: String,
        allowed: u64,
        below: usize,
    },
    #[error("chain too long: {proxies} proxies > max {max}")]
    ChainTooLong { proxies: usize, max: usize },
    #[error("proxy lifetime {} above the site maximum {}: {dn}", hours(*lifetime), hours(*max))]
    LifetimeTooLong { dn: String, lifetime: i64, max: i64 },
    #[error("limited proxy refused by site policy (limited_proxies = \"refuse\"): {dn}")]
    Limited { dn: String },
    #[error("proxy policy language {oid} not accepted (only inherit-all and limited): {dn}")]
    ProxyPolicy { dn: String, oid: String },
    #[error("owner mismatch: the proxy is {found}, the envelope names {expected}")]
    OwnerMismatch { found: String, expected: String },
    #[error("no VOMS attribute certificate in the proxy (extension 1.3.6.1.4.1.8005.100.100.5)")]
    NoAc,
    #[error("VOMS attribute certificate malformed: {0}")]
    AcMalformed(String),
    #[error("AC is for VO {ac_vo}, the envelope's VO is {expected}")]
    AcVo { ac_vo: String, expected: String },
    #[error("AC signer {signer} not in vomsdir/{vo} ({detail})")]
    AcSignerNotInVomsdir {
        signer: String,
        vo: String,
        detail: String,
    },
    #[error("AC signer certificate {signer} not trusted: {reason}")]
    AcSignerUntrusted { signer: String, reason: String },
    #[error(
        "AC signature does not verify with the key of {signer} (the AC was altered or forged)"
    )]
    AcSignature { signer: String },
    #[error("AC expired at {}: VO {vo}", t(at))]
    AcExpired { vo: String, at: DateTime<Utc> },
    #[error("AC not valid before {}: VO {vo}", t(from))]
    AcNotYetValid { vo: String, from: DateTime<Utc> },
    #[error("AC holder {holder} is not the proxy's end-entity certificate {ee}")]
    AcHolder { holder: String, ee: String },
    #[error("AC FQAN {fqan} is outside its VO {vo}")]
    FqanOutsideVo { fqan: String, vo: String },
    #[error("envelope FQAN {fqan} not in the verified AC ({}); envelope_fqans = \"must_agree\"", verified.join(", "))]
    FqanDisagrees { fqan: String, verified: Vec<String> },
    #[error("the issued proxy {dn} is not for the key this node made for the payload (a chain for another request, or replayed)")]
    NotOurKey { dn: String },
    #[error("site trust store unusable: {0}")]
    Site(String),
}
