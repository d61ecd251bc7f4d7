//! Proof that whoever presents a proxy file holds the proxy's private key: the file carries a
//! private key, and it is the key the newest proxy certificate was issued for. A chain alone
//! proves nothing about the presenter (certificates are public: every TLS peer of the owner saw
//! them); the key is what a delegation hands over. Reads the file's bytes only; the key is
//! parsed to compare it and dropped.

use openssl::pkey::PKey;
use openssl::x509::X509;

/// Why the presenter did not show possession of the proxy's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PossessionError {
    #[error("holds no private key; pass the proxy file as delegated (certificate, its key, the chain), as voms-proxy-init writes it")]
    NoKey,
    #[error("its private key cannot be read ({0}); an encrypted key is not a proxy's")]
    BadKey(String),
    #[error("its private key does not belong to the proxy certificate {0}; the file was put together from different credentials")]
    Mismatch(String),
    #[error("holds no certificate")]
    NoCertificate,
}

/// Checks that `pem` holds a private key matching its first certificate's public key.
pub fn check(pem: &[u8]) -> Result<(), PossessionError> {
    let key_block = pem_block(pem, "PRIVATE KEY").ok_or(PossessionError::NoKey)?;
    let key = PKey::private_key_from_pem(key_block)
        .map_err(|e| PossessionError::BadKey(first_reason(&e)))?;
    let cert = X509::stack_from_pem(pem)
        .ok()
        .and_then(|v| v.into_iter().next())
        .ok_or(PossessionError::NoCertificate)?;
    let public = cert
        .public_key()
        .map_err(|e| PossessionError::BadKey(first_reason(&e)))?;
    if public.public_eq(&key) {
        Ok(())
    } else {
        Err(PossessionError::Mismatch(super::dn::grid_dn(
            cert.subject_name(),
        )))
    }
}

/// The first PEM block whose label ends with `label` ("RSA PRIVATE KEY", "PRIVATE KEY", "EC
/// PRIVATE KEY"), begin to end line.
fn pem_block<'a>(pem: &'a [u8], label: &str) -> Option<&'a [u8]> {
    let text = std::str::from_utf8(pem).ok()?;
    let mut at = 0;
    while let Some(i) = text[at..].find("-----BEGIN ") {
        let begin = at + i;
        let line_end = text[begin..].find('\n').map_or(text.len(), |n| begin + n);
        let head = text[begin..line_end].trim_end();
        let name = head
            .strip_prefix("-----BEGIN ")
            .and_then(|h| h.strip_suffix("-----"))
            .unwrap_or("");
        if name.ends_with(label) {
            let end_marker = format!("-----END {name}-----");
            let end = text[begin..].find(&end_marker)? + begin + end_marker.len();
            return Some(&pem[begin..end]);
        }
        at = line_end;
    }
    None
}

fn first_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|x| x.reason().map(str::to_string))
        .unwrap_or_else(|| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::rsa::Rsa;
    use openssl::x509::X509Builder;

    fn cert_for(key: &PKey<openssl::pkey::Private>) -> String {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "possession test").unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.set_pubkey(key).unwrap();
        b.sign(key, openssl::hash::MessageDigest::sha256()).unwrap();
        String::from_utf8(b.build().to_pem().unwrap()).unwrap()
    }

    fn key() -> PKey<openssl::pkey::Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    #[test]
    fn the_key_must_be_there_and_the_proxys() {
        let (k, other) = (key(), key());
        let key_pem = String::from_utf8(k.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let rsa_pem = String::from_utf8(k.rsa().unwrap().private_key_to_pem().unwrap()).unwrap();
        let cert = cert_for(&k);
        assert_eq!(check(format!("{cert}{key_pem}").as_bytes()), Ok(()));
        assert_eq!(check(format!("{cert}{rsa_pem}").as_bytes()), Ok(()));
        assert_eq!(check(cert.as_bytes()), Err(PossessionError::NoKey));
        let wrong = cert_for(&other);
        assert!(matches!(
            check(format!("{wrong}{key_pem}").as_bytes()),
            Err(PossessionError::Mismatch(_))
        ));
        assert_eq!(
            check(key_pem.as_bytes()),
            Err(PossessionError::NoCertificate)
        );
    }
}
