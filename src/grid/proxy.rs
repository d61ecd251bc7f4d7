//! RFC 3820 proxy rules over a chain as a proxy file holds it (newest proxy first, then the
//! certificates it was delegated from, the end-entity certificate after the last proxy): which
//! certificates are proxies, their naming (issuer's subject plus one CN), path length
//! constraints, policy language (inherit-all or limited), validity windows, the site's
//! maximum lifetime and chain length. OpenSSL checks naming and path length too
//! ([`super::trust`]); checking them here as well gives refusals that name the rule.

use chrono::{DateTime, Utc};
use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef};
use der::{Decode, Sequence};
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::x509::{X509Ref, X509};
use x509_cert::ext::Extension;

use super::config::{GridConfig, LimitedProxies};
use super::dn::{entries, grid_dn};
use super::CredentialRefusal;

/// RFC 3820 ProxyCertInfo.
pub const OID_PROXY_CERT_INFO: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.14");
/// id-ppl-inheritAll: the proxy carries all its issuer's rights.
pub const OID_PPL_INHERIT_ALL: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.21.1");
/// Globus' limited-proxy policy language, as voms-proxy-init -limited writes it.
pub const OID_PPL_LIMITED: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3536.1.1.1.9");

/// A certificate's TBS read leniently: only the extensions are used, the rest is OpenSSL's.
#[derive(Sequence)]
struct LenientCert<'a> {
    tbs: LenientTbs<'a>,
    _alg: AnyRef<'a>,
    _sig: BitStringRef<'a>,
}

#[derive(Sequence)]
struct LenientTbs<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    _version: Option<AnyRef<'a>>,
    _serial: AnyRef<'a>,
    _sig: AnyRef<'a>,
    _issuer: AnyRef<'a>,
    _validity: AnyRef<'a>,
    _subject: AnyRef<'a>,
    _spki: AnyRef<'a>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    _issuer_uid: Option<BitStringRef<'a>>,
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT", optional = "true")]
    _subject_uid: Option<BitStringRef<'a>>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    extensions: Option<Vec<Extension>>,
}

/// RFC 3820 ProxyCertInfo; [`super::delegation`] encodes it for the proxies it signs.
#[derive(Sequence)]
pub(super) struct ProxyCertInfo<'a> {
    #[asn1(optional = "true")]
    pub(super) path_len: Option<u64>,
    pub(super) policy: ProxyPolicy<'a>,
}

#[derive(Sequence)]
pub(super) struct ProxyPolicy<'a> {
    pub(super) language: ObjectIdentifier,
    #[asn1(optional = "true")]
    pub(super) _policy: Option<OctetStringRef<'a>>,
}

impl<'a> ProxyCertInfo<'a> {
    /// The ProxyCertInfo of `c`, if it is a proxy.
    pub(super) fn of(c: &'a Cert) -> Result<Option<Self>, CredentialRefusal> {
        let Some(raw) = c.extension(&OID_PROXY_CERT_INFO) else {
            return Ok(None);
        };
        ProxyCertInfo::from_der(raw)
            .map(Some)
            .map_err(|e| CredentialRefusal::Unreadable(format!("ProxyCertInfo of {}: {e}", c.dn())))
    }
}

/// One certificate of the chain with its extensions.
pub struct Cert {
    pub x509: X509,
    pub extensions: Vec<Extension>,
}

impl Cert {
    /// Parses a certificate OpenSSL has read.
    pub fn new(x509: X509) -> Result<Cert, CredentialRefusal> {
        let der = x509
            .to_der()
            .map_err(|e| CredentialRefusal::Unreadable(e.to_string()))?;
        let c = LenientCert::from_der(&der).map_err(|e| {
            CredentialRefusal::Unreadable(format!(
                "certificate {}: {e}",
                grid_dn(x509.subject_name())
            ))
        })?;
        Ok(Cert {
            extensions: c.tbs.extensions.unwrap_or_default(),
            x509,
        })
    }

    /// The value of extension `oid`, if present.
    pub fn extension(&self, oid: &ObjectIdentifier) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.extn_id == *oid)
            .map(|e| e.extn_value.as_bytes())
    }

    /// The subject in grid form.
    pub fn dn(&self) -> String {
        grid_dn(self.x509.subject_name())
    }
}

/// The chain's shape once the proxy rules hold.
pub struct Shape {
    /// How many proxies precede the end-entity certificate.
    pub proxies: usize,
    /// Whether any proxy is limited.
    pub limited: bool,
    /// The earliest not-after in the chain.
    pub not_after: DateTime<Utc>,
}

/// `t` as a UTC time.
pub fn to_utc(t: &Asn1TimeRef) -> DateTime<Utc> {
    let secs = Asn1Time::from_unix(0)
        .and_then(|epoch| epoch.diff(t))
        .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs))
        .unwrap_or(0);
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

fn window(
    c: &X509Ref,
    what: &'static str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, CredentialRefusal> {
    let (from, to) = (to_utc(c.not_before()), to_utc(c.not_after()));
    let dn = || grid_dn(c.subject_name());
    if now < from {
        return Err(CredentialRefusal::NotYetValid {
            what,
            dn: dn(),
            from,
        });
    }
    if now > to {
        return Err(CredentialRefusal::Expired {
            what,
            dn: dn(),
            at: to,
        });
    }
    Ok(to)
}

/// Checks the RFC 3820 rules and the site's limits on `chain` (proxy first) at `now`; the
/// end-entity certificate is `chain[shape.proxies]`.
pub fn check(
    chain: &[Cert],
    cfg: &GridConfig,
    now: DateTime<Utc>,
) -> Result<Shape, CredentialRefusal> {
    let mut infos = Vec::new();
    for c in chain {
        let Some(pci) = ProxyCertInfo::of(c)? else {
            break;
        };
        infos.push((pci.path_len, pci.policy.language));
    }
    let proxies = infos.len();
    let Some(ee) = chain.get(proxies) else {
        return Err(CredentialRefusal::Unreadable(
            "the chain ends in a proxy; the end-entity certificate it was delegated from must follow it in the file".into(),
        ));
    };
    if proxies == 0 {
        return Err(CredentialRefusal::NotAProxy { dn: ee.dn() });
    }
    if proxies > cfg.max_chain_length {
        return Err(CredentialRefusal::ChainTooLong {
            proxies,
            max: cfg.max_chain_length,
        });
    }
    let mut not_after = window(&ee.x509, "certificate", now)?;
    let mut limited = false;
    for (i, (c, (path_len, language))) in chain.iter().zip(&infos).enumerate() {
        let issuer = &chain[i + 1];
        let (subject, parent) = (
            entries(c.x509.subject_name()),
            entries(issuer.x509.subject_name()),
        );
        let named = subject.len() == parent.len() + 1
            && subject[..parent.len()] == parent[..]
            && subject.last().is_some_and(|(k, _)| k == "CN")
            && c.x509
                .issuer_name()
                .try_cmp(issuer.x509.subject_name())
                .ok()
                == Some(std::cmp::Ordering::Equal);
        if !named {
            return Err(CredentialRefusal::ProxyName {
                subject: c.dn(),
                issuer: issuer.dn(),
            });
        }
        if let Some(allowed) = *path_len {
            if i as u64 > allowed {
                return Err(CredentialRefusal::PathLength {
                    dn: c.dn(),
                    allowed,
                    below: i,
                });
            }
        }
        if *language == OID_PPL_LIMITED {
            limited = true;
        } else if *language != OID_PPL_INHERIT_ALL {
            return Err(CredentialRefusal::ProxyPolicy {
                dn: c.dn(),
                oid: language.to_string(),
            });
        }
        let to = window(&c.x509, "proxy", now)?;
        not_after = not_after.min(to);
        let lifetime = (to - to_utc(c.x509.not_before())).num_seconds();
        let max = i64::try_from(cfg.max_proxy_lifetime_seconds).unwrap_or(i64::MAX);
        if lifetime > max {
            return Err(CredentialRefusal::LifetimeTooLong {
                dn: c.dn(),
                lifetime,
                max,
            });
        }
    }
    if limited && cfg.limited_proxies == LimitedProxies::Refuse {
        return Err(CredentialRefusal::Limited { dn: chain[0].dn() });
    }
    Ok(Shape {
        proxies,
        limited,
        not_after,
    })
}
