//! TLS between the server and PostgreSQL (`[database] sslmode`): what the site configured
//! ([`PgTls`]) and the OpenSSL connector built from it. Only the configured root certificate
//! is trusted (not the system's CA bundle), as libpq does with `sslrootcert`; `verify-full`
//! also checks the server's name or address against its certificate. A client certificate,
//! when given, lets pg_hba.conf's `cert` method authenticate the server's role.
//!
//! Must not: fall back to plaintext when TLS was asked for (the connection demands it, so a
//! server without TLS is an error), or offer a mode that encrypts without checking who answers.

use std::path::{Path, PathBuf};

use openssl::error::ErrorStack;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::MakeTlsConnector;

use super::StoreError;

/// How the server's connections to PostgreSQL are protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// No TLS (`sslmode = "disable"`): a Unix socket, loopback, or a network the VO trusts.
    Disable,
    /// TLS required; the server's certificate must chain to `root_cert` and, with
    /// `check_host` (`verify-full`), name the host connected to (`verify-ca` does not check).
    Verify {
        root_cert: PathBuf,
        check_host: bool,
        client: Option<ClientCert>,
    },
}

/// A client certificate (PEM, with its chain) and its private key, for `cert` authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The connector for `Verify`; None for `Disable`.
pub fn connector(tls: &PgTls) -> Result<Option<MakeTlsConnector>, StoreError> {
    let PgTls::Verify {
        root_cert,
        check_host,
        client,
    } = tls
    else {
        return Ok(None);
    };
    let fail = |key: &'static str, path: &Path, why: String| StoreError::PgTls {
        key,
        path: path.to_path_buf(),
        why,
    };
    let mut b = SslConnector::builder(SslMethod::tls_client())
        .map_err(ossl("database.sslmode", Path::new("(OpenSSL)")))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(ossl("database.sslmode", Path::new("(OpenSSL)")))?;

    // Only the configured roots: SslConnector starts from the system's default paths, which
    // would let any public CA vouch for "the database".
    let pem = std::fs::read(root_cert).map_err(|e| {
        fail(
            "database.sslrootcert",
            root_cert,
            format!("{e}; name the PEM file of the CA that signed PostgreSQL's certificate"),
        )
    })?;
    let roots = X509::stack_from_pem(&pem).map_err(|e| {
        fail(
            "database.sslrootcert",
            root_cert,
            format!("not PEM certificates: {e}"),
        )
    })?;
    if roots.is_empty() {
        return Err(fail(
            "database.sslrootcert",
            root_cert,
            "holds no certificate".into(),
        ));
    }
    let mut store = X509StoreBuilder::new().map_err(ossl("database.sslrootcert", root_cert))?;
    for c in roots {
        store
            .add_cert(c)
            .map_err(ossl("database.sslrootcert", root_cert))?;
    }
    b.set_verify_cert_store(store.build())
        .map_err(ossl("database.sslrootcert", root_cert))?;

    if let Some(c) = client {
        private_key_file(&c.key)?;
        b.set_certificate_chain_file(&c.cert)
            .map_err(ossl("database.sslcert", &c.cert))?;
        b.set_private_key_file(&c.key, SslFiletype::PEM)
            .map_err(ossl("database.sslkey", &c.key))?;
        b.check_private_key().map_err(|e| {
            fail(
                "database.sslkey",
                &c.key,
                format!("is not the key of {}: {e}", c.cert.display()),
            )
        })?;
    }
    let mut connector = MakeTlsConnector::new(b.build());
    if !check_host {
        connector.set_callback(|config, _host| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(Some(connector))
}

/// An OpenSSL failure about the file named by `key`.
fn ossl<'p>(key: &'static str, path: &'p Path) -> impl Fn(ErrorStack) -> StoreError + 'p {
    move |e| StoreError::PgTls {
        key,
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// The client key must be readable by the server's account only (as libpq asks).
fn private_key_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |why: String| StoreError::PgTls {
        key: "database.sslkey",
        path: path.to_path_buf(),
        why,
    };
    let mode = std::fs::metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "other users may read it (mode {mode:04o}); run `chmod 0600 {}`",
            path.display()
        )));
    }
    Ok(())
}
