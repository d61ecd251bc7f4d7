//! TLS material for the pilot and the server: PEM certificates and keys, CA files or hashed CA
//! directories (`/etc/grid-security/certificates`), and grid-style subject DNs.
//!
//! The helper never uses this module (it must link no TLS code).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// The default grid CA directory.
pub const DEFAULT_CA_DIR: &str = "/etc/grid-security/certificates";

/// Errors loading TLS material; each names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}; check the path in the config file")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey { path: PathBuf },
    #[error("CA {path} holds no usable CA certificate (files named HASH.0 or *.pem with -----BEGIN CERTIFICATE-----)")]
    NoCa { path: PathBuf },
    #[error("certificate and key do not form a usable pair ({cert} / {key}): {why}")]
    BadPair {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// Installs the ring crypto provider as the process default (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "certificate file",
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "private key file",
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_path_buf(),
        })
}

/// Loads trust anchors from a PEM file, or from a directory in the grid layout (`HASH.0`,
/// `HASH.1`, ... and `*.pem`; `.r0` CRLs, `.signing_policy` and `.namespaces` are skipped).
pub fn load_ca(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what: "CA file or directory",
        path: path.to_path_buf(),
        source,
    })?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|source| TlsError::Read {
            what: "CA directory",
            path: path.to_path_buf(),
            source,
        })?;
        let mut v: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_ca_file_name(p))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        let Ok(data) = std::fs::read(&f) else {
            continue;
        };
        for cert in rustls_pemfile::certs(&mut data.as_slice()).filter_map(Result::ok) {
            let _ = store.add(cert);
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoCa {
            path: path.to_path_buf(),
        });
    }
    Ok(store)
}

fn is_ca_file_name(p: &Path) -> bool {
    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.ends_with(".pem") || name.ends_with(".crt") {
        return true;
    }
    // OpenSSL hashed names: 8 hex digits, '.', a decimal index.
    match name.split_once('.') {
        Some((hash, idx)) => {
            hash.len() == 8
                && hash.bytes().all(|b| b.is_ascii_hexdigit())
                && !idx.is_empty()
                && idx.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// A server configuration that requires a client certificate issued by `ca`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    install_crypto_provider();
    let roots = Arc::new(load_ca(ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::BadPair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            why: e.to_string(),
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `cert`/`key` and trusting only `ca`.
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let roots = load_ca(ca)?;
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::BadPair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            why: e.to_string(),
        })
}

/// An HTTPS client for the VO server: presents `cert`/`key`, trusts only `ca`, keeps
/// connections alive. Used by the pilot and by the server's client subcommands.
pub fn https_client(cert: &Path, key: &Path, ca: &Path) -> Result<reqwest::Client, TlsError> {
    let tls = client_config(cert, key, ca)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// The subject of a DER certificate as a grid-style DN: `/DC=org/DC=example/CN=Alice`
/// (the OpenSSL one-line form grid-mapfiles and ban lists use).
pub fn subject_dn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(grid_dn(cert.subject()))
}

/// Formats an X.509 name in grid style, RDNs in certificate order.
pub fn grid_dn(name: &x509_parser::x509::X509Name<'_>) -> String {
    use x509_parser::oid_registry;
    let mut out = String::new();
    for rdn in name.iter() {
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let key = if *oid == oid_registry::OID_X509_COMMON_NAME {
                "CN".to_string()
            } else if *oid == oid_registry::OID_X509_ORGANIZATION_NAME {
                "O".into()
            } else if *oid == oid_registry::OID_X509_ORGANIZATIONAL_UNIT {
                "OU".into()
            } else if *oid == oid_registry::OID_X509_COUNTRY_NAME {
                "C".into()
            } else if *oid == oid_registry::OID_X509_LOCALITY_NAME {
                "L".into()
            } else if *oid == oid_registry::OID_X509_STATE_OR_PROVINCE_NAME {
                "ST".into()
            } else if *oid == oid_registry::OID_DOMAIN_COMPONENT {
                "DC".into()
            } else if *oid == oid_registry::OID_PKCS9_EMAIL_ADDRESS {
                "emailAddress".into()
            } else if *oid == oid_registry::OID_X509_SERIALNUMBER {
                "serialNumber".into()
            } else {
                oid.to_id_string()
            };
            let value = atv
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|_| hex::encode(atv.as_slice()));
            out.push('/');
            out.push_str(&key);
            out.push('=');
            out.push_str(&value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_names() {
        assert!(is_ca_file_name(Path::new("/x/1a2b3c4d.0")));
        assert!(is_ca_file_name(Path::new("/x/ca.pem")));
        assert!(!is_ca_file_name(Path::new("/x/1a2b3c4d.r0")));
        assert!(!is_ca_file_name(Path::new("/x/1a2b3c4d.signing_policy")));
        assert!(!is_ca_file_name(Path::new("/x/1a2b3c4d.namespaces")));
    }

    #[test]
    fn dn_of_generated_cert() {
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 25]),
            "org",
        );
        dn.push(rcgen::DnType::CommonName, "Alice Example");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_dn(cert.der()).unwrap(), "/DC=org/CN=Alice Example");
    }
}
