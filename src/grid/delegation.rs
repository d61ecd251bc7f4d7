//! Delegation without moving private keys: the side that will use a proxy makes its key pair
//! and a PKCS#10 request ([`new_key_request`]); the side holding a credential signs an RFC 3820
//! proxy for that request ([`Credential::sign_proxy`]) and returns the chain. The VO server
//! uses both halves (its key for the user's delegation; signing for the worker node's
//! request), the client signs for the server's request with the user's own proxy, and the
//! helper makes the worker node's key. [`check_delegated`] is what the receiver of a chain
//! checks before keeping it (its key, its owner, its lifetime).
//!
//! Cryptography and parsing only (OpenSSL): no file, socket or process here, so the helper may
//! link it. Keys stay in memory as OpenSSL objects; their PEM is made only for the caller to
//! store.

use chrono::{DateTime, Duration, Utc};
use der::asn1::ObjectIdentifier;
use der::Encode;
use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, PKeyRef, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::KeyUsage;
use openssl::x509::{X509Extension, X509Name, X509Req, X509};

use super::config::{GridConfig, LimitedProxies};
use super::dn::grid_dn;
use super::proxy::{
    self, to_utc, Cert, ProxyCertInfo, ProxyPolicy, OID_PPL_INHERIT_ALL, OID_PPL_LIMITED,
    OID_PROXY_CERT_INFO,
};
use super::CredentialRefusal;

/// The portal policy's bound on a stored credential's validity (and the default of the
/// site's `max_proxy_lifetime_seconds`).
pub const MAX_STORED_SECONDS: i64 = 1_000_000;
/// Size of the RSA keys made here: what grid middleware makes for proxies today.
pub const KEY_BITS: u32 = 2048;
/// The smallest RSA key a request may carry (NIST SP 800-131A: 112-bit security).
pub const MIN_RSA_BITS: u32 = 2048;
/// The smallest elliptic-curve key a request may carry.
pub const MIN_EC_BITS: u32 = 256;
/// A new proxy's notBefore is this far in the past, for clocks behind the signer's.
pub const SKEW_SECONDS: i64 = 300;

/// Why a delegation step failed; each message names the value and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    #[error(
        "the certificate request is unreadable: {0}; send one PEM `CERTIFICATE REQUEST` (PKCS#10)"
    )]
    Request(String),
    #[error("the certificate request's signature does not verify with its own key: it does not prove possession of the key")]
    RequestSignature,
    #[error("the certificate request's key is {kind} of {bits} bits; at least RSA {MIN_RSA_BITS} or EC {MIN_EC_BITS} bits is required (make it with `openssl req -newkey rsa:2048`)")]
    WeakKey { kind: String, bits: u32 },
    #[error("the credential is unreadable: {0}")]
    Credential(String),
    #[error("{0}")]
    Refused(#[from] CredentialRefusal),
    #[error("{dn} is not signed by the key of {issuer}, the next certificate in the chain")]
    Signature { dn: String, issuer: String },
    #[error("{dn} allows {allowed} proxies below it (RFC 3820 path length); one more delegation would make {below}: make the proxy without a path length limit (voms-proxy-init -path-length -1 or at least {below})")]
    PathLength {
        dn: String,
        allowed: u64,
        below: u64,
    },
    #[error("the chain's end-entity certificate is {found}, not the caller {expected}: a member delegates only their own credential")]
    NotTheCaller { found: String, expected: String },
    #[error("the delegated proxy {dn} is not for the key this delegation made: sign the certificate request this delegation returned")]
    WrongKey { dn: String },
    #[error("the delegated credential is valid until {}, {seconds} s from now; a stored credential may be valid at most {MAX_STORED_SECONDS} s (portal policy): delegate a shorter proxy (`mupilot-server delegate --lifetime SECONDS`, at most {MAX_STORED_SECONDS})", not_after.format("%Y-%m-%dT%H:%M:%SZ"))]
    TooLong {
        not_after: DateTime<Utc>,
        seconds: i64,
    },
    #[error("OpenSSL failed to {what}: {source}")]
    Openssl {
        what: &'static str,
        source: openssl::error::ErrorStack,
    },
}

fn ossl(what: &'static str) -> impl FnOnce(openssl::error::ErrorStack) -> DelegationError {
    move |source| DelegationError::Openssl { what, source }
}

/// A fresh key pair and a request for a proxy for it. The request's subject is a placeholder:
/// the signer names the proxy after its own credential (RFC 3820 3.4).
pub struct KeyRequest {
    pub key: PKey<Private>,
    pub csr_pem: String,
}

impl KeyRequest {
    /// The private key as unencrypted PKCS#8 PEM, for the caller to store 0600.
    pub fn key_pem(&self) -> Result<Vec<u8>, DelegationError> {
        self.key
            .private_key_to_pem_pkcs8()
            .map_err(ossl("write the private key"))
    }
}

/// Makes an RSA key pair of [`KEY_BITS`] and a SHA-256-signed PKCS#10 request for it.
pub fn new_key_request() -> Result<KeyRequest, DelegationError> {
    let key = PKey::from_rsa(Rsa::generate(KEY_BITS).map_err(ossl("generate an RSA key"))?)
        .map_err(ossl("wrap the RSA key"))?;
    let mut b = X509Req::builder().map_err(ossl("start a request"))?;
    let mut name = X509Name::builder().map_err(ossl("start a name"))?;
    name.append_entry_by_text("CN", "proxy request")
        .map_err(ossl("name the request"))?;
    b.set_subject_name(&name.build())
        .map_err(ossl("name the request"))?;
    b.set_pubkey(&key)
        .map_err(ossl("put the key in the request"))?;
    b.sign(&key, MessageDigest::sha256())
        .map_err(ossl("sign the request"))?;
    let pem = b.build().to_pem().map_err(ossl("write the request"))?;
    Ok(KeyRequest {
        key,
        csr_pem: String::from_utf8_lossy(&pem).into_owned(),
    })
}

/// Reads a request, checks that it proves possession of its key and that the key is strong
/// enough, and returns the key.
fn request_key(csr_pem: &[u8]) -> Result<PKey<openssl::pkey::Public>, DelegationError> {
    let req = X509Req::from_pem(csr_pem).map_err(|e| DelegationError::Request(e.to_string()))?;
    let key = req
        .public_key()
        .map_err(|e| DelegationError::Request(format!("its public key: {e}")))?;
    if !req.verify(&key).unwrap_or(false) {
        return Err(DelegationError::RequestSignature);
    }
    let bits = key.bits();
    let strong = match key.id() {
        Id::RSA => bits >= MIN_RSA_BITS,
        Id::EC => bits >= MIN_EC_BITS,
        _ => false,
    };
    if !strong {
        let kind = match key.id() {
            Id::RSA => "RSA".to_string(),
            Id::EC => "EC".to_string(),
            Id::DSA => "DSA".to_string(),
            Id::ED25519 => "Ed25519 (not used by grid middleware)".to_string(),
            other => format!("key type {}", other.as_raw()),
        };
        return Err(DelegationError::WeakKey { kind, bits });
    }
    Ok(key)
}

/// A credential that can sign proxies: its certificates (newest proxy first, down to the
/// end-entity certificate) and the private key of the first.
pub struct Credential {
    certs: Vec<Cert>,
    key: PKey<Private>,
}

/// A proxy signed by [`Credential::sign_proxy`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// The new proxy, then the signing credential's certificates (PEM).
    pub chain_pem: String,
    pub not_after: DateTime<Utc>,
    /// The new proxy's serial (lower-case hex, no leading zeros) and subject (grid form).
    pub serial: String,
    pub subject: String,
    /// Whether the new proxy is limited.
    pub limited: bool,
}

/// What to sign.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOrder {
    /// Requested validity from now; cut to the credential's own not-after.
    pub lifetime: Duration,
    /// A limited proxy even when the credential is not.
    pub limited: bool,
}

impl Credential {
    /// A proxy file as grid tools write it (`X509_USER_PROXY`): the proxy certificate, its
    /// private key, then the certificates it was delegated from.
    pub fn from_proxy_pem(pem: &[u8]) -> Result<Self, DelegationError> {
        let key = PKey::private_key_from_pem(pem).map_err(|e| {
            DelegationError::Credential(format!("no private key in it ({e}); a proxy file holds the proxy certificate, its key, then the chain"))
        })?;
        Self::new(pem, key)
    }

    /// `chain_pem` (proxy first) with the private key of its first certificate.
    pub fn new(chain_pem: &[u8], key: PKey<Private>) -> Result<Self, DelegationError> {
        let certs = read_chain(chain_pem)?;
        let first_key = certs[0]
            .x509
            .public_key()
            .map_err(ossl("read the proxy's key"))?;
        if !first_key.public_eq(&key) {
            return Err(DelegationError::Credential(format!(
                "the private key is not the key of {}",
                certs[0].dn()
            )));
        }
        Ok(Credential { certs, key })
    }

    /// The end-entity certificate's subject (the owner).
    pub fn owner_dn(&self) -> String {
        self.certs
            .iter()
            .find(|c| c.extension(&OID_PROXY_CERT_INFO).is_none())
            .map(Cert::dn)
            .unwrap_or_default()
    }

    /// The earliest notAfter of the chain: nothing signed with it is valid past it.
    pub fn not_after(&self) -> DateTime<Utc> {
        self.certs
            .iter()
            .map(|c| to_utc(c.x509.not_after()))
            .min()
            .unwrap_or_default()
    }

    /// Signs an RFC 3820 proxy for the key in `csr_pem` at `now`: subject this credential's
    /// plus `CN=<serial>`, a random 64-bit serial, ProxyCertInfo critical (inherit-all, or
    /// limited when asked or when this credential is), keyUsage critical, notAfter the
    /// earlier of `now + order.lifetime` and this credential's. Refused when this credential
    /// is expired or not an RFC 3820 proxy chain, when a path length in it leaves no room for
    /// another proxy, and for a request with a weak key or without proof of possession.
    pub fn sign_proxy(
        &self,
        csr_pem: &[u8],
        order: &ProxyOrder,
        now: DateTime<Utc>,
    ) -> Result<Issued, DelegationError> {
        let subject_key = request_key(csr_pem)?;
        // The credential's own proxy rules and validity at `now` (limits are the receiver's).
        let shape = proxy::check(&self.certs, &permissive(), now)?;
        let own_path_len = room_for_one_more(&self.certs[..shape.proxies])?;
        let limited = order.limited || shape.limited;
        let issuer = &self.certs[0].x509;

        let mut serial = BigNum::new().map_err(ossl("make a serial"))?;
        serial
            .rand(64, MsbOption::MAYBE_ZERO, false)
            .map_err(ossl("draw a serial"))?;
        serial.set_negative(false);
        let serial_dec = serial.to_dec_str().map_err(ossl("print the serial"))?;
        let mut name = X509Name::builder().map_err(ossl("start a name"))?;
        for e in issuer.subject_name().entries() {
            name.append_entry(e)
                .map_err(ossl("copy the issuer's name"))?;
        }
        name.append_entry_by_text("CN", &serial_dec)
            .map_err(ossl("name the proxy"))?;
        let name = name.build();

        let not_after = (now + order.lifetime).min(self.not_after());
        let mut b = X509::builder().map_err(ossl("start a certificate"))?;
        b.set_version(2).map_err(ossl("set the version"))?;
        let serial_asn1 = serial.to_asn1_integer().map_err(ossl("set the serial"))?;
        b.set_serial_number(&serial_asn1)
            .map_err(ossl("set the serial"))?;
        b.set_subject_name(&name).map_err(ossl("set the subject"))?;
        b.set_issuer_name(issuer.subject_name())
            .map_err(ossl("set the issuer"))?;
        b.set_pubkey(&subject_key).map_err(ossl("set the key"))?;
        let from = Asn1Time::from_unix((now - Duration::seconds(SKEW_SECONDS)).timestamp())
            .map_err(ossl("set notBefore"))?;
        let to = Asn1Time::from_unix(not_after.timestamp()).map_err(ossl("set notAfter"))?;
        b.set_not_before(&from).map_err(ossl("set notBefore"))?;
        b.set_not_after(&to).map_err(ossl("set notAfter"))?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .map_err(ossl("make keyUsage"))?,
        )
        .map_err(ossl("add keyUsage"))?;
        b.append_extension(proxy_cert_info(own_path_len, limited)?)
            .map_err(ossl("add ProxyCertInfo"))?;
        b.sign(&self.key, MessageDigest::sha256())
            .map_err(ossl("sign the proxy"))?;
        let cert = b.build();

        let mut chain_pem = pem(&cert)?;
        for c in &self.certs {
            chain_pem.push_str(&pem(&c.x509)?);
        }
        Ok(Issued {
            chain_pem,
            not_after,
            serial: super::verify::serial_hex(&serial).map_err(ossl("print the serial"))?,
            subject: grid_dn(&name),
            limited,
        })
    }
}

/// Whether the path lengths of `proxies` (newest first) allow one more proxy below the first,
/// and if so the tightest allowance left, which that new proxy carries as its own. A
/// constraint on proxy i counts the proxies below it, which become i + 1.
fn room_for_one_more(proxies: &[Cert]) -> Result<Option<u64>, DelegationError> {
    let mut left_min: Option<u64> = None;
    for (i, c) in proxies.iter().enumerate() {
        if let Some(allowed) = ProxyCertInfo::of(c)?.and_then(|p| p.path_len) {
            let below = i as u64 + 1;
            if below > allowed {
                return Err(DelegationError::PathLength {
                    dn: c.dn(),
                    allowed,
                    below,
                });
            }
            let left = allowed - below;
            left_min = Some(left_min.map_or(left, |l| l.min(left)));
        }
    }
    Ok(left_min)
}

/// The chain's proxy rules without the site limits, which the verifying side applies.
fn permissive() -> GridConfig {
    GridConfig {
        limited_proxies: LimitedProxies::Accept,
        max_proxy_lifetime_seconds: u64::MAX,
        max_chain_length: usize::MAX,
        ..GridConfig::default()
    }
}

fn pem(c: &X509) -> Result<String, DelegationError> {
    c.to_pem()
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .map_err(ossl("write a certificate"))
}

fn read_chain(chain_pem: &[u8]) -> Result<Vec<Cert>, DelegationError> {
    let x509s = X509::stack_from_pem(chain_pem)
        .map_err(|e| DelegationError::Credential(format!("not PEM certificates: {e}")))?;
    if x509s.is_empty() {
        return Err(DelegationError::Credential("no certificate in it".into()));
    }
    Ok(x509s
        .into_iter()
        .map(Cert::new)
        .collect::<Result<Vec<_>, _>>()?)
}

fn proxy_cert_info(path_len: Option<u64>, limited: bool) -> Result<X509Extension, DelegationError> {
    let der = pci_der(path_len, limited)?;
    let oid = Asn1Object::from_str(&OID_PROXY_CERT_INFO.to_string())
        .map_err(ossl("name ProxyCertInfo"))?;
    let value = Asn1OctetString::new_from_bytes(&der).map_err(ossl("wrap ProxyCertInfo"))?;
    X509Extension::new_from_der(&oid, true, &value).map_err(ossl("make ProxyCertInfo"))
}

/// The DER of a ProxyCertInfo.
fn pci_der(path_len: Option<u64>, limited: bool) -> Result<Vec<u8>, DelegationError> {
    let language: ObjectIdentifier = if limited {
        OID_PPL_LIMITED
    } else {
        OID_PPL_INHERIT_ALL
    };
    ProxyCertInfo {
        path_len,
        policy: ProxyPolicy {
            language,
            _policy: None,
        },
    }
    .to_der()
    .map_err(|e| DelegationError::Credential(format!("encoding ProxyCertInfo: {e}")))
}

/// What the receiver of a delegation learns from a chain it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegated {
    pub owner_dn: String,
    /// The delegated proxy's serial (lower-case hex, no leading zeros) and subject.
    pub serial: String,
    pub subject: String,
    /// The earliest notAfter of the chain.
    pub not_after: DateTime<Utc>,
    pub limited: bool,
}

/// Checks a chain delegated to the holder of `key` by `caller` at `now`: the first
/// certificate is a proxy for `key`, each certificate is signed by the next, the RFC 3820
/// rules hold and the chain is valid now, the end-entity certificate is the caller's, the
/// chain is valid at most [`MAX_STORED_SECONDS`] from now, and it leaves room for one more
/// proxy (the worker node's). The CA behind the end-entity certificate is the verifying
/// site's to check (`super::Verifier`), with its own CA directory.
pub fn check_delegated<T: openssl::pkey::HasPublic>(
    chain_pem: &[u8],
    key: &PKeyRef<T>,
    caller: &str,
    now: DateTime<Utc>,
) -> Result<Delegated, DelegationError> {
    let certs = read_chain(chain_pem)?;
    let first = &certs[0];
    let first_key = first
        .x509
        .public_key()
        .map_err(ossl("read the proxy's key"))?;
    if !first_key.public_eq(key) {
        return Err(DelegationError::WrongKey { dn: first.dn() });
    }
    let shape = proxy::check(&certs, &permissive(), now)?;
    for pair in certs.windows(2) {
        let signer = pair[1]
            .x509
            .public_key()
            .map_err(ossl("read an issuer's key"))?;
        if !pair[0].x509.verify(&signer).unwrap_or(false) {
            return Err(DelegationError::Signature {
                dn: pair[0].dn(),
                issuer: pair[1].dn(),
            });
        }
    }
    let owner_dn = certs[shape.proxies].dn();
    if owner_dn != caller {
        return Err(DelegationError::NotTheCaller {
            found: owner_dn,
            expected: caller.to_string(),
        });
    }
    let seconds = (shape.not_after - now).num_seconds();
    if seconds > MAX_STORED_SECONDS {
        return Err(DelegationError::TooLong {
            not_after: shape.not_after,
            seconds,
        });
    }
    // The worker node's proxy will sit below every proxy here.
    room_for_one_more(&certs[..shape.proxies])?;
    let serial = first
        .x509
        .serial_number()
        .to_bn()
        .and_then(|b| super::verify::serial_hex(&b))
        .map_err(ossl("read the serial"))?;
    Ok(Delegated {
        owner_dn,
        serial,
        subject: first.dn(),
        not_after: shape.not_after,
        limited: shape.limited,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_proves_its_key_and_a_weak_one_is_refused() {
        let kr = new_key_request().unwrap();
        let key = request_key(kr.csr_pem.as_bytes()).unwrap();
        assert!(key.public_eq(&kr.key));
        assert_eq!(key.bits(), KEY_BITS);

        let weak = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
        let mut b = X509Req::builder().unwrap();
        b.set_pubkey(&weak).unwrap();
        b.sign(&weak, MessageDigest::sha256()).unwrap();
        let pem = b.build().to_pem().unwrap();
        let e = request_key(&pem).unwrap_err().to_string();
        assert!(e.contains("RSA of 1024 bits") && e.contains("2048"), "{e}");

        // A request signed by another key than the one it carries proves nothing.
        let other = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut b = X509Req::builder().unwrap();
        b.set_pubkey(&kr.key).unwrap();
        b.sign(&other, MessageDigest::sha256()).unwrap();
        let pem = b.build().to_pem().unwrap();
        assert!(matches!(
            request_key(&pem),
            Err(DelegationError::RequestSignature)
        ));
        assert!(matches!(
            request_key(b"not pem"),
            Err(DelegationError::Request(_))
        ));
    }

    #[test]
    fn proxy_cert_info_round_trips() {
        for (len, limited) in [(None, false), (Some(3), true)] {
            proxy_cert_info(len, limited).unwrap();
            let der = pci_der(len, limited).unwrap();
            let p = <ProxyCertInfo as der::Decode>::from_der(&der).unwrap();
            assert_eq!(p.path_len, len);
            let want = if limited {
                OID_PPL_LIMITED
            } else {
                OID_PPL_INHERIT_ALL
            };
            assert_eq!(p.policy.language, want);
        }
    }
}
