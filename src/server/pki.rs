//! The demo certificate authority `mupilot-server init` creates: a CA, a server certificate,
//! a pilot certificate and user certificates with grid-style DNs (`/DC=org/DC=mupilot-demo/CN=x`).
//!
//! For demos and tests only; a production VO uses its real grid CA. Holds no file I/O.
//!
//! Why the byte patching: grid DNs repeat the domainComponent attribute, but rcgen 0.13 keeps
//! one value per attribute type. The second DC is therefore written under a stand-in OID of the
//! same encoded length and swapped for the DC OID in the to-be-signed bytes; the CA key (an
//! Ed25519 key driven through rcgen's remote-key hook) signs the swapped bytes, so the
//! certificate as stored is exactly what was signed.

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signer, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, RemoteKeyPair,
};

/// domainComponent, 0.9.2342.19200300.100.1.25.
const DC_OID: [u64; 7] = [0, 9, 2342, 19200300, 100, 1, 25];
/// Stand-in of equal DER length (…100.1.26) for a repeated DC; never left in a certificate.
const STAND_IN_OID: [u64; 7] = [0, 9, 2342, 19200300, 100, 1, 26];
const DC_DER: [u8; 12] = [
    0x06, 0x0a, 0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19,
];
const STAND_IN_DER: [u8; 12] = [
    0x06, 0x0a, 0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x1a,
];

/// Certificate generation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate certificate for {name}: {why}")]
    Generate { name: String, why: String },
}

/// A certificate (PEM) and its private key (PKCS#8 PEM).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER (the tests read the subject from it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub der: Vec<u8>,
}

/// The demo CA: can issue certificates.
pub struct DemoCa {
    rcgen_key: KeyPair,
    cert: rcgen::Certificate,
    /// The CA certificate as stored (patched DER).
    pub cert_pem: String,
    /// The CA's private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// Signs the stand-in-swapped bytes with the CA's Ed25519 key.
struct PatchingSigner {
    key: SigningKey,
    public: [u8; 32],
}

impl RemoteKeyPair for PatchingSigner {
    fn public_key(&self) -> &[u8] {
        &self.public
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.key.sign(&swap_stand_in(msg)).to_bytes().to_vec())
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

fn swap_stand_in(der: &[u8]) -> Vec<u8> {
    let mut out = der.to_vec();
    let n = STAND_IN_DER.len();
    let mut i = 0;
    while i + n <= out.len() {
        if out[i..i + n] == STAND_IN_DER {
            out[i..i + n].copy_from_slice(&DC_DER);
            i += n;
        } else {
            i += 1;
        }
    }
    out
}

/// A grid DN: the DC components in order, then CN.
fn grid_name(dcs: &[&str], cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (i, dc) in dcs.iter().enumerate() {
        let oid = match i {
            0 => DC_OID.to_vec(),
            1 => STAND_IN_OID.to_vec(),
            _ => panic!("demo DNs carry at most two DC components"),
        };
        dn.push(DnType::CustomDnType(oid), *dc);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams) {
    let now = chrono::Utc::now();
    use chrono::Datelike;
    params.not_before = rcgen::date_time_ymd(now.year() - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(now.year() + 10, 1, 1);
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

impl DemoCa {
    /// Creates a CA named `/DC=org/DC=<domain>/CN=<domain> CA`.
    pub fn new(dcs: &[&str], cn: &str) -> Result<Self, PkiError> {
        let err = |why: String| PkiError::Generate {
            name: cn.to_string(),
            why,
        };
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let key_pem = key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| err(e.to_string()))?
            .to_string();
        let signer = PatchingSigner {
            key: key.clone(),
            public: key.verifying_key().to_bytes(),
        };
        let rcgen_key = KeyPair::from_remote(Box::new(signer)).map_err(|e| err(e.to_string()))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| err(e.to_string()))?;
        params.distinguished_name = grid_name(dcs, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params
            .self_signed(&rcgen_key)
            .map_err(|e| err(e.to_string()))?;
        let der = swap_stand_in(cert.der());
        Ok(DemoCa {
            rcgen_key,
            cert,
            cert_pem: to_pem(&der),
            key_pem,
        })
    }

    /// Issues an end-entity certificate. `sans` are DNS names or IP addresses; `server`
    /// selects serverAuth in addition to clientAuth.
    pub fn issue(
        &self,
        dcs: &[&str],
        cn: &str,
        sans: &[&str],
        server: bool,
    ) -> Result<Issued, PkiError> {
        let err = |why: String| PkiError::Generate {
            name: cn.to_string(),
            why,
        };
        let leaf_key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(|e| err(e.to_string()))?;
        params.distinguished_name = grid_name(dcs, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params
            .signed_by(&leaf_key, &self.cert, &self.rcgen_key)
            .map_err(|e| err(e.to_string()))?;
        let der = swap_stand_in(cert.der());
        Ok(Issued {
            cert_pem: to_pem(&der),
            key_pem: leaf_key.serialize_pem(),
            der,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_dn_order_and_repeated_dc() {
        let ca = DemoCa::new(&["org", "mupilot-demo"], "mupilot-demo CA").unwrap();
        let alice = ca
            .issue(&["org", "mupilot-demo"], "alice", &[], false)
            .unwrap();
        assert_eq!(
            crate::tls::subject_dn(&alice.der).unwrap(),
            "/DC=org/DC=mupilot-demo/CN=alice"
        );
        let (_, c) = x509_parser::parse_x509_certificate(&alice.der).unwrap();
        assert_eq!(
            crate::tls::grid_dn(c.issuer()),
            "/DC=org/DC=mupilot-demo/CN=mupilot-demo CA"
        );
    }
}
