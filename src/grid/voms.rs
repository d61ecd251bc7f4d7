//! Whether to believe a VOMS attribute certificate ([`super::ac`] reads it): the signature by
//! the VOMS server's certificate (carried in the AC, or a `.pem` in the vomsdir), that
//! certificate's chain matching `vomsdir/<VO>/<host>.lsc` and verifying against the CA
//! directory, the validity window, the holder (the proxy's end-entity certificate) and the VO.
//! The FQANs come out only after all of them pass.

use chrono::{DateTime, Utc};
use der::asn1::ObjectIdentifier;
use openssl::asn1::Asn1Object;
use openssl::hash::MessageDigest;
use openssl::sign::Verifier as SigVerifier;
use openssl::x509::{X509Name, X509Ref, X509};

use super::ac::{self, bad, same, ParsedAc};
use super::dn::grid_dn;
use super::lsc;
use super::trust::TrustStore;
use super::CredentialRefusal;

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

/// `/atlas/Role=NULL/Capability=NULL` as `/atlas`: the long form VOMS servers write, shortened
/// to the form the envelope, policies and the group map use.
pub fn short_fqan(f: &str) -> String {
    let f = f.strip_suffix("/Capability=NULL").unwrap_or(f);
    f.strip_suffix("/Role=NULL").unwrap_or(f).to_string()
}

/// Verifies the AC in `ext` (the VOMS extension's value) for the holder `ee` at `now`.
pub fn verify(
    ext: &[u8],
    ee: &X509Ref,
    vomsdir: &std::path::Path,
    trust: &TrustStore,
    now: DateTime<Utc>,
) -> Result<VerifiedAc, CredentialRefusal> {
    let ac = ac::parse(ext)?;
    let vo = ac.vo.as_str();
    let signer_chain = signer_chain(&ac, vomsdir)?;
    let signer = &signer_chain[0];
    let signer_dn = grid_dn(signer.subject_name());
    check_listed(&ac, &signer_chain, vomsdir)?;
    trust
        .verify(signer, &signer_chain[1..])
        .map_err(|f| CredentialRefusal::AcSignerUntrusted {
            signer: signer_dn.clone(),
            reason: f.refusal(trust.dir()).to_string(),
        })?;

    // The signature over the exact AcInfo bytes.
    let md = digest_for(&ac.signature_algorithm)?;
    let key = signer.public_key().map_err(bad)?;
    let ok = SigVerifier::new(md, &key)
        .and_then(|mut v| {
            v.update(&ac.tbs)?;
            v.verify(&ac.signature)
        })
        .unwrap_or(false);
    if !ok {
        return Err(CredentialRefusal::AcSignature { signer: signer_dn });
    }

    // Validity, holder, FQANs within the VO.
    if now < ac.not_before {
        return Err(CredentialRefusal::AcNotYetValid {
            vo: vo.into(),
            from: ac.not_before,
        });
    }
    if now > ac.not_after {
        return Err(CredentialRefusal::AcExpired {
            vo: vo.into(),
            at: ac.not_after,
        });
    }
    check_holder(&ac, ee)?;
    for f in &ac.fqans {
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
        vo: ac.vo.clone(),
        uri: ac.uri.clone(),
        fqans: ac.fqans.clone(),
        signer: signer_dn,
        serial: ac.serial.clone(),
        not_after: ac.not_after,
    })
}

/// The signer's certificate chain: the certificates the AC carries, else a `.pem` in the
/// vomsdir; its first certificate's subject must be the AC's issuer.
fn signer_chain(ac: &ParsedAc, vomsdir: &std::path::Path) -> Result<Vec<X509>, CredentialRefusal> {
    let issuer_dn = grid_dn(&ac.issuer);
    let chain: Vec<X509> = if ac.carried.is_empty() {
        vomsdir_cert(vomsdir, &ac.vo, &ac.issuer)
            .into_iter()
            .collect()
    } else {
        ac.carried.clone()
    };
    let Some(signer) = chain.first() else {
        return Err(CredentialRefusal::AcSignerNotInVomsdir {
            signer: issuer_dn,
            vo: ac.vo.clone(),
            detail: "the AC carries no certificate and the vomsdir has none for it".into(),
        });
    };
    if !same(signer.subject_name(), &ac.issuer) {
        return Err(bad(format!(
            "issuer {issuer_dn} is not the subject of the certificate it carries ({})",
            grid_dn(signer.subject_name())
        )));
    }
    Ok(chain)
}

/// The signer's chain by name, as the site listed it in `vomsdir/<VO>/<host>.lsc`.
fn check_listed(
    ac: &ParsedAc,
    chain: &[X509],
    vomsdir: &std::path::Path,
) -> Result<(), CredentialRefusal> {
    let not_listed = |detail: String| CredentialRefusal::AcSignerNotInVomsdir {
        signer: grid_dn(chain[0].subject_name()),
        vo: ac.vo.clone(),
        detail,
    };
    let (vo, host) = (&ac.vo, &ac.host);
    let path = lsc::path_for(vomsdir, vo, host)
        .ok_or_else(|| not_listed(format!("VO {vo:?} or host {host:?} is not a file name")))?;
    let listed = lsc::load(&path).map_err(|e| not_listed(e.to_string()))?;
    let names: Vec<(String, String)> = chain
        .iter()
        .map(|c| (grid_dn(c.subject_name()), grid_dn(c.issuer_name())))
        .collect();
    if listed.matches(&names) {
        return Ok(());
    }
    Err(not_listed(format!(
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
    )))
}

/// The holder is the end-entity certificate by issuer and serial (RFC 5755 4.2.2). VOMS
/// writes the certificate's subject where RFC 5755 has its issuer, and accepts both; so do we.
fn check_holder(ac: &ParsedAc, ee: &X509Ref) -> Result<(), CredentialRefusal> {
    let ee_serial = ee.serial_number().to_bn().map_err(bad)?;
    let named = same(&ac.holder_name, ee.issuer_name()) || same(&ac.holder_name, ee.subject_name());
    if named && ac.holder_serial == ee_serial {
        return Ok(());
    }
    let hex =
        |b: &openssl::bn::BigNumRef| b.to_hex_str().map(|s| s.to_string()).unwrap_or_default();
    Err(CredentialRefusal::AcHolder {
        holder: format!(
            "{} serial {}",
            grid_dn(&ac.holder_name),
            hex(&ac.holder_serial)
        ),
        ee: format!("{} serial {}", grid_dn(ee.subject_name()), hex(&ee_serial)),
    })
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
