//! VOMS attribute certificates (RFC 5755 ACs in proxy extension 1.3.6.1.4.1.8005.100.100.5):
//! the DER structures, and the checks that make one trusted — the signature by the VOMS
//! server's certificate (carried in the AC, or a `.pem` in the vomsdir), that certificate's
//! chain matching `vomsdir/<VO>/<host>.lsc` and verifying against the CA directory, the
//! validity window, the holder (the proxy's end-entity certificate) and the VO. The FQANs come
//! out only after all of them pass.

use chrono::{DateTime, Utc};
use der::asn1::{Any, BitString, GeneralizedTime, Int, ObjectIdentifier};
use der::{Decode, Encode, Sequence, Tag, Tagged};
use openssl::asn1::Asn1Object;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::sign::Verifier as SigVerifier;
use openssl::x509::{X509Name, X509Ref, X509};
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::name::{GeneralName, GeneralNames};
use x509_cert::ext::Extensions;
use x509_cert::spki::AlgorithmIdentifierOwned;

use super::dn::grid_dn;
use super::lsc;
use super::trust::TrustStore;
use super::CredentialRefusal;

/// The proxy extension holding the ACs.
pub const OID_VOMS_ACS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.8005.100.100.5");
/// The AC attribute holding the FQANs (IetfAttrSyntax).
pub const OID_VOMS_FQANS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.8005.100.100.4");
/// The AC extension carrying the VOMS server's certificate chain.
pub const OID_VOMS_AC_CERTS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.8005.100.100.10");

/// RFC 5755 AttributeCertificate; the signed part kept as encoded so the signature is checked
/// over the exact bytes.
#[derive(Sequence)]
struct AttributeCertificate {
    acinfo: Any,
    signature_algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

#[derive(Sequence)]
struct AcInfo {
    version: Int,
    holder: Holder,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    issuer: V2Form,
    _signature: AlgorithmIdentifierOwned,
    serial: Int,
    validity: AcValidity,
    attributes: Vec<Attribute>,
    #[asn1(optional = "true")]
    _issuer_uid: Option<BitString>,
    #[asn1(optional = "true")]
    extensions: Option<Extensions>,
}

#[derive(Sequence)]
struct Holder {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    base_certificate_id: Option<IssuerSerial>,
}

#[derive(Sequence)]
struct IssuerSerial {
    issuer: GeneralNames,
    serial: Int,
}

#[derive(Sequence)]
struct V2Form {
    #[asn1(optional = "true")]
    issuer_name: Option<GeneralNames>,
}

#[derive(Sequence)]
struct AcValidity {
    not_before: GeneralizedTime,
    not_after: GeneralizedTime,
}

#[derive(Sequence)]
struct IetfAttrSyntax {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    policy_authority: Option<GeneralNames>,
    values: Vec<Any>,
}

/// What a verified AC says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAc {
    pub vo: String,
    /// The VOMS server (`host:port` of the policy authority).
    pub uri: String,
    pub fqans: Vec<String>,
    pub signer: String,
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

fn bad(what: impl std::fmt::Display) -> CredentialRefusal {
    CredentialRefusal::AcMalformed(what.to_string())
}

fn directory_name(names: &GeneralNames) -> Option<X509Name> {
    names.iter().find_map(|n| match n {
        GeneralName::DirectoryName(name) => {
            name.to_der().ok().and_then(|d| X509Name::from_der(&d).ok())
        }
        _ => None,
    })
}

fn utc(t: &GeneralizedTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.to_unix_duration().as_secs() as i64, 0).unwrap_or_default()
}

fn same(a: &openssl::x509::X509NameRef, b: &openssl::x509::X509NameRef) -> bool {
    a.try_cmp(b).ok() == Some(std::cmp::Ordering::Equal)
}

/// `/atlas/Role=NULL/Capability=NULL` as `/atlas`: the long form VOMS servers write, shortened
/// to the form the envelope, policies and the group map use.
pub fn short_fqan(f: &str) -> String {
    let f = f.strip_suffix("/Capability=NULL").unwrap_or(f);
    f.strip_suffix("/Role=NULL").unwrap_or(f).to_string()
}

/// The ACs in the value of the proxy's VOMS extension: `SEQUENCE OF SEQUENCE OF AC`, the
/// first being the one VOMS clients read.
fn first_ac(ext: &[u8]) -> Result<AttributeCertificate, CredentialRefusal> {
    let seqs: Vec<Vec<Any>> = Vec::from_der(ext).map_err(bad)?;
    let ac = seqs
        .into_iter()
        .flatten()
        .next()
        .ok_or(CredentialRefusal::NoAc)?;
    ac.decode_as::<AttributeCertificate>().map_err(bad)
}

/// Verifies the AC in `ext` (the VOMS extension's value) for the holder `ee` at `now`.
pub fn verify(
    ext: &[u8],
    ee: &X509Ref,
    vomsdir: &std::path::Path,
    trust: &TrustStore,
    now: DateTime<Utc>,
) -> Result<VerifiedAc, CredentialRefusal> {
    let ac = first_ac(ext)?;
    let info: AcInfo = ac.acinfo.decode_as().map_err(bad)?;
    if info.version.as_bytes() != [1] {
        return Err(bad(format!(
            "version {:?}, expected v2",
            info.version.as_bytes()
        )));
    }
    // The VO and server from the policy authority (`atlas://voms.example:15000`), the FQANs
    // from the values: both inside the attribute, read now but trusted only at the end.
    let attr = info
        .attributes
        .iter()
        .find(|a| a.oid == OID_VOMS_FQANS)
        .ok_or_else(|| bad("no FQAN attribute (1.3.6.1.4.1.8005.100.100.4)"))?;
    let value = attr
        .values
        .iter()
        .next()
        .ok_or_else(|| bad("empty FQAN attribute"))?;
    let ietf: IetfAttrSyntax = value.decode_as().map_err(bad)?;
    let authority = ietf
        .policy_authority
        .iter()
        .flatten()
        .find_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
            _ => None,
        })
        .ok_or_else(|| bad("no policy authority (vo://host:port)"))?;
    let (vo, uri) = authority.split_once("://").ok_or_else(|| {
        bad(format!(
            "policy authority {authority:?} is not vo://host:port"
        ))
    })?;
    let host = uri.split(':').next().unwrap_or(uri);
    let mut fqans = Vec::new();
    for v in &ietf.values {
        if v.tag() != Tag::OctetString && v.tag() != Tag::Utf8String {
            return Err(bad(format!("FQAN value of type {}", v.tag())));
        }
        let f = std::str::from_utf8(v.value()).map_err(|_| bad("FQAN not UTF-8"))?;
        fqans.push(f.to_string());
    }
    let issuer = info
        .issuer
        .issuer_name
        .as_ref()
        .and_then(directory_name)
        .ok_or_else(|| bad("issuer has no directory name"))?;
    let issuer_dn = grid_dn(&issuer);

    // The signer: the certificates the AC carries, else a .pem in the vomsdir.
    let carried = carried_certs(info.extensions.as_ref())?;
    let signer_chain = if carried.is_empty() {
        vomsdir_cert(vomsdir, vo, &issuer).into_iter().collect()
    } else {
        carried
    };
    let signer = signer_chain
        .first()
        .ok_or_else(|| CredentialRefusal::AcSignerNotInVomsdir {
            signer: issuer_dn.clone(),
            vo: vo.to_string(),
            detail: "the AC carries no certificate and the vomsdir has none for it".into(),
        })?;
    let signer_dn = grid_dn(signer.subject_name());
    if !same(signer.subject_name(), &issuer) {
        return Err(bad(format!(
            "issuer {issuer_dn} is not the subject of the certificate it carries ({signer_dn})"
        )));
    }

    // The .lsc: the signer's chain by name, as the site listed it for this VO and host.
    let not_listed = |detail: String| CredentialRefusal::AcSignerNotInVomsdir {
        signer: signer_dn.clone(),
        vo: vo.to_string(),
        detail,
    };
    let path = lsc::path_for(vomsdir, vo, host)
        .ok_or_else(|| not_listed(format!("VO {vo:?} or host {host:?} is not a file name")))?;
    let listed = lsc::load(&path).map_err(|e| not_listed(e.to_string()))?;
    let names: Vec<(String, String)> = signer_chain
        .iter()
        .map(|c| (grid_dn(c.subject_name()), grid_dn(c.issuer_name())))
        .collect();
    if !listed.matches(&names) {
        return Err(not_listed(format!(
            "{} lists {}",
            path.display(),
            listed
                .chains
                .iter()
                .map(|c| c
                    .iter()
                    .map(|(s, i)| format!("{s} issued by {i}"))
                    .collect::<Vec<_>>()
                    .join(", "))
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    trust
        .verify(signer, &signer_chain[1..])
        .map_err(|f| CredentialRefusal::AcSignerUntrusted {
            signer: signer_dn.clone(),
            reason: f.refusal(trust.dir()).to_string(),
        })?;

    // The signature over the exact AcInfo bytes.
    let md = digest_for(&ac.signature_algorithm.oid)?;
    let key = signer.public_key().map_err(bad)?;
    let tbs = ac.acinfo.to_der().map_err(bad)?;
    let sig = ac
        .signature
        .as_bytes()
        .ok_or_else(|| bad("signature has unused bits"))?;
    let ok = SigVerifier::new(md, &key)
        .and_then(|mut v| {
            v.update(&tbs)?;
            v.verify(sig)
        })
        .unwrap_or(false);
    if !ok {
        return Err(CredentialRefusal::AcSignature { signer: signer_dn });
    }

    // Validity, holder, FQANs within the VO.
    let (from, to) = (
        utc(&info.validity.not_before),
        utc(&info.validity.not_after),
    );
    if now < from {
        return Err(CredentialRefusal::AcNotYetValid {
            vo: vo.into(),
            from,
        });
    }
    if now > to {
        return Err(CredentialRefusal::AcExpired {
            vo: vo.into(),
            at: to,
        });
    }
    check_holder(&info.holder, ee)?;
    for f in &fqans {
        let inside = f
            .strip_prefix('/')
            .and_then(|r| r.strip_prefix(vo))
            .is_some_and(|r| r.is_empty() || r.starts_with('/'));
        if !inside {
            return Err(CredentialRefusal::FqanOutsideVo {
                fqan: f.clone(),
                vo: vo.into(),
            });
        }
    }
    Ok(VerifiedAc {
        vo: vo.to_string(),
        uri: uri.to_string(),
        fqans,
        signer: signer_dn,
        serial: hex::encode(info.serial.as_bytes()),
        not_after: to,
    })
}

/// The holder is the end-entity certificate by issuer and serial (RFC 5755 4.2.2). VOMS
/// writes the certificate's subject where RFC 5755 has its issuer, and accepts both; so do we.
fn check_holder(holder: &Holder, ee: &X509Ref) -> Result<(), CredentialRefusal> {
    let ee_dn = grid_dn(ee.subject_name());
    let id = holder
        .base_certificate_id
        .as_ref()
        .ok_or_else(|| bad("holder has no baseCertificateID"))?;
    let name = directory_name(&id.issuer).ok_or_else(|| bad("holder has no directory name"))?;
    let serial = BigNum::from_slice(id.serial.as_bytes()).map_err(bad)?;
    let ee_serial = ee.serial_number().to_bn().map_err(bad)?;
    let named = same(&name, ee.issuer_name()) || same(&name, ee.subject_name());
    if !named || serial != ee_serial {
        return Err(CredentialRefusal::AcHolder {
            holder: format!(
                "{} serial {}",
                grid_dn(&name),
                serial
                    .to_hex_str()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
            ee: format!(
                "{ee_dn} serial {}",
                ee_serial
                    .to_hex_str()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        });
    }
    Ok(())
}

/// The certificates in the AC's 1.3.6.1.4.1.8005.100.100.10 extension, signer first.
fn carried_certs(exts: Option<&Extensions>) -> Result<Vec<X509>, CredentialRefusal> {
    let Some(ext) = exts
        .into_iter()
        .flatten()
        .find(|e| e.extn_id == OID_VOMS_AC_CERTS)
    else {
        return Ok(Vec::new());
    };
    let seqs: Vec<Vec<Any>> = Vec::from_der(ext.extn_value.as_bytes()).map_err(bad)?;
    seqs.into_iter()
        .flatten()
        .map(|c| {
            c.to_der()
                .map_err(bad)
                .and_then(|d| X509::from_der(&d).map_err(bad))
        })
        .collect()
}

/// The old way: the VOMS server's certificate itself as a file in `vomsdir/<VO>/` or the
/// vomsdir, found by subject.
fn vomsdir_cert(vomsdir: &std::path::Path, vo: &str, issuer: &X509Name) -> Option<X509> {
    let dirs = [lsc::vo_dir(vomsdir, vo), Some(vomsdir.to_path_buf())];
    for dir in dirs.into_iter().flatten() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("lsc") || !p.is_file() {
                continue;
            }
            let Ok(pem) = std::fs::read(&p) else { continue };
            if let Ok(c) = X509::from_pem(&pem) {
                if same(c.subject_name(), issuer) {
                    return Some(c);
                }
            }
        }
    }
    None
}

fn digest_for(oid: &ObjectIdentifier) -> Result<MessageDigest, CredentialRefusal> {
    let unsupported = || bad(format!("signature algorithm {oid} not supported"));
    let nid = Asn1Object::from_str(&oid.to_string())
        .map_err(|_| unsupported())?
        .nid();
    let algs = nid.signature_algorithms().ok_or_else(unsupported)?;
    if algs.digest == openssl::nid::Nid::MD5 || algs.digest == openssl::nid::Nid::MD2 {
        return Err(unsupported());
    }
    MessageDigest::from_nid(algs.digest).ok_or_else(unsupported)
}

#[cfg(test)]
mod tests {
    use super::short_fqan;

    #[test]
    fn long_fqans_shorten() {
        assert_eq!(short_fqan("/atlas/Role=NULL/Capability=NULL"), "/atlas");
        assert_eq!(
            short_fqan("/atlas/prod/Role=production/Capability=NULL"),
            "/atlas/prod/Role=production"
        );
        assert_eq!(short_fqan("/atlas/prod"), "/atlas/prod");
        assert_eq!(short_fqan("/atlas/Role=NULL"), "/atlas");
    }
}
