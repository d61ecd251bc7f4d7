//! The payload's own proxy key, made on the worker node by the helper: the key pair, the
//! certificate request the VO server signs a proxy for, the check that an issued chain is for
//! this key, and the proxy file (proxy, key, chain) a payload reads through `X509_USER_PROXY`.
//!
//! Holds a private key only in memory, for one pending request; writes no file and opens no
//! socket (delivery is `switch::proxy`'s work). The key and request are made as the server's
//! delegation makes its own ([`super::delegation::new_key_request`]).

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use super::delegation::new_key_request;
use super::CredentialRefusal;

/// A key pair made for one proxy, and the request for it.
pub struct WorkerKey {
    key: PKey<Private>,
    csr_pem: String,
}

/// Why a key or request could not be made (an OpenSSL failure: the node's, not the caller's).
#[derive(Debug, thiserror::Error)]
#[error("cannot make the payload's proxy key: {0}")]
pub struct KeyError(String);

impl WorkerKey {
    /// A fresh RSA key and a PKCS#10 request for it. The request's subject is a placeholder:
    /// the signer names the proxy after its own subject (RFC 3820 3.4), not after the request.
    pub fn generate() -> Result<WorkerKey, KeyError> {
        let made = new_key_request().map_err(|e| KeyError(e.to_string()))?;
        Ok(WorkerKey {
            key: made.key,
            csr_pem: made.csr_pem,
        })
    }

    /// The same key again (tests that need many pending keys without making each).
    #[cfg(test)]
    pub(crate) fn same_key(&self) -> WorkerKey {
        WorkerKey {
            key: self.key.clone(),
            csr_pem: self.csr_pem.clone(),
        }
    }

    /// The PEM `CERTIFICATE REQUEST` the pilot relays to the VO server.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Checks that the first certificate of `chain_pem` (the new proxy) is for this key, and
    /// returns the proxy file: that certificate, this key, then the rest of the chain, the
    /// order `voms-proxy-init` writes and grid clients read.
    pub fn proxy_file(&self, chain_pem: &[u8]) -> Result<Vec<u8>, CredentialRefusal> {
        let certs = X509::stack_from_pem(chain_pem)
            .map_err(|e| CredentialRefusal::Unreadable(format!("not PEM certificates: {e}")))?;
        let Some(first) = certs.first() else {
            return Err(CredentialRefusal::Unreadable("no certificate in it".into()));
        };
        let ours = first
            .public_key()
            .map(|k| k.public_eq(&self.key))
            .unwrap_or(false);
        if !ours {
            return Err(CredentialRefusal::NotOurKey {
                dn: super::dn::grid_dn(first.subject_name()),
            });
        }
        let pems = certs
            .iter()
            .map(|c| c.to_pem())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialRefusal::Unreadable(e.to_string()))?;
        let mut key_pem = self
            .key
            .rsa()
            .and_then(|r| r.private_key_to_pem())
            .map_err(|e| CredentialRefusal::Site(format!("cannot encode the proxy key: {e}")))?;
        // Sized exactly, so no copy of the key is left behind by a reallocation; the key's
        // own encoding is zeroed once copied (the caller zeroes the file it got).
        let len = key_pem.len() + pems.iter().map(Vec::len).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        for (i, pem) in pems.iter().enumerate() {
            out.extend_from_slice(pem);
            if i == 0 {
                out.extend_from_slice(&key_pem);
            }
        }
        key_pem.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&key_pem);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::hash::MessageDigest;
    use openssl::x509::{X509NameBuilder, X509Req};

    #[test]
    fn request_is_for_the_key_and_a_chain_for_another_key_is_refused() {
        let k = WorkerKey::generate().unwrap();
        let req = X509Req::from_pem(k.csr_pem().as_bytes()).unwrap();
        assert!(req.public_key().unwrap().public_eq(&k.key));
        assert!(req.verify(&req.public_key().unwrap()).unwrap());

        // A certificate for the key (self-signed here; the VO server signs the real one).
        let cert = |key: &PKey<Private>| {
            let mut b = X509::builder().unwrap();
            b.set_pubkey(key).unwrap();
            let mut n = X509NameBuilder::new().unwrap();
            n.append_entry_by_text("CN", "t").unwrap();
            let n = n.build();
            b.set_subject_name(&n).unwrap();
            b.set_issuer_name(&n).unwrap();
            let now = openssl::asn1::Asn1Time::days_from_now(0).unwrap();
            let later = openssl::asn1::Asn1Time::days_from_now(1).unwrap();
            b.set_not_before(&now).unwrap();
            b.set_not_after(&later).unwrap();
            b.sign(key, MessageDigest::sha256()).unwrap();
            b.build().to_pem().unwrap()
        };
        let file = k.proxy_file(&cert(&k.key)).unwrap();
        let text = String::from_utf8(file).unwrap();
        let cert_at = text.find("BEGIN CERTIFICATE").unwrap();
        let key_at = text.find("BEGIN RSA PRIVATE KEY").unwrap();
        assert!(cert_at < key_at, "proxy first, then its key");

        let other = WorkerKey::generate().unwrap();
        let e = k.proxy_file(&cert(&other.key)).unwrap_err();
        assert!(matches!(e, CredentialRefusal::NotOurKey { .. }), "{e}");
        assert!(e.to_string().contains("not for the key"), "{e}");
    }
}
