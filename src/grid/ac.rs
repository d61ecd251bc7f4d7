//! VOMS attribute certificates read from DER (RFC 5755 ACs as VOMS writes them, inside proxy
//! extension 1.3.6.1.4.1.8005.100.100.5): the structures, and [`parse`] into a [`ParsedAc`]
//! whose every field is still the AC's unverified word — [`super::voms`] decides whether to
//! believe it. No file access, no trust decisions here.

use chrono::{DateTime, Utc};
use der::asn1::{Any, BitString, GeneralizedTime, Int, ObjectIdentifier};
use der::{Decode, Encode, Sequence, Tag, Tagged};
use openssl::bn::BigNum;
use openssl::x509::{X509Name, X509};
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::name::{GeneralName, GeneralNames};
use x509_cert::ext::Extensions;
use x509_cert::spki::AlgorithmIdentifierOwned;

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

/// An AC as read, not yet verified.
pub struct ParsedAc {
    /// The VO and the VOMS server's `host:port` and host, from the policy authority
    /// (`atlas://voms.example:15000`).
    pub vo: String,
    pub uri: String,
    pub host: String,
    /// The FQANs as written (`/atlas/Role=NULL/Capability=NULL`).
    pub fqans: Vec<String>,
    /// The AC's issuer (the VOMS server's subject).
    pub issuer: X509Name,
    /// The certificates the AC carries (extension 1.3.6.1.4.1.8005.100.100.10), signer first.
    pub carried: Vec<X509>,
    /// The holder: a certificate's issuer (or subject, as VOMS writes it) and serial.
    pub holder_name: X509Name,
    pub holder_serial: BigNum,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// The AC's serial (hex).
    pub serial: String,
    /// The signed bytes (AttributeCertificateInfo, exactly as encoded), the signature and its
    /// algorithm.
    pub tbs: Vec<u8>,
    pub signature: Vec<u8>,
    pub signature_algorithm: ObjectIdentifier,
}

pub(crate) fn bad(what: impl std::fmt::Display) -> CredentialRefusal {
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

pub(crate) fn same(a: &openssl::x509::X509NameRef, b: &openssl::x509::X509NameRef) -> bool {
    a.try_cmp(b).ok() == Some(std::cmp::Ordering::Equal)
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

/// Reads the first AC of the VOMS extension's value `ext`.
pub fn parse(ext: &[u8]) -> Result<ParsedAc, CredentialRefusal> {
    let ac = first_ac(ext)?;
    let info: AcInfo = ac.acinfo.decode_as().map_err(bad)?;
    if info.version.as_bytes() != [1] {
        return Err(bad(format!(
            "version {:?}, expected v2",
            info.version.as_bytes()
        )));
    }
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
    let id = info
        .holder
        .base_certificate_id
        .as_ref()
        .ok_or_else(|| bad("holder has no baseCertificateID"))?;
    Ok(ParsedAc {
        vo: vo.to_string(),
        uri: uri.to_string(),
        host: uri.split(':').next().unwrap_or(uri).to_string(),
        fqans,
        issuer,
        carried: carried_certs(info.extensions.as_ref())?,
        holder_name: directory_name(&id.issuer)
            .ok_or_else(|| bad("holder has no directory name"))?,
        holder_serial: BigNum::from_slice(id.serial.as_bytes()).map_err(bad)?,
        not_before: utc(&info.validity.not_before),
        not_after: utc(&info.validity.not_after),
        serial: hex::encode(info.serial.as_bytes()),
        tbs: ac.acinfo.to_der().map_err(bad)?,
        signature: ac
            .signature
            .as_bytes()
            .ok_or_else(|| bad("signature has unused bits"))?
            .to_vec(),
        signature_algorithm: ac.signature_algorithm.oid,
    })
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
