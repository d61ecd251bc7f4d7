//! TLS between mupilot-server and PostgreSQL (`[database] sslmode`), against a real cluster
//! with `ssl = on` whose pg_hba.conf accepts the servers' roles over TLS only: the pool's
//! connections are all encrypted, plaintext is refused by the database, the database's
//! certificate is checked (another CA, a name not in it), a client certificate authenticates
//! a role (`cert`), a readable client key is refused, and `mupilot-server serve` runs on it.

use server_support::pg_support;
mod server_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mupilot::server::store::{ClientCert, Database, PgSettings, PgTls, Store};
use pg_support::PgCluster;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use server_support::{small_job, Demo};

/// The role authenticated by its client certificate (pg_hba `cert`: CN = role).
const CERT_ROLE: &str = "mupilot_cert";

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A certificate for `cn` with DNS names `sans`: (cert PEM, key PEM).
    fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A cluster with TLS on: its certificate names `localhost` only (not 127.0.0.1), signed by
/// `ca`, which also signs client certificates. The admin connects in plaintext (pg_support's
/// own use); every other role needs TLS, and `CERT_ROLE` its certificate.
struct TlsCluster {
    pg: PgCluster,
    ca: Ca,
    files: tempfile::TempDir,
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl TlsCluster {
    fn start() -> TlsCluster {
        let ca = Ca::new("mupilot test database CA");
        let files = tempfile::Builder::new()
            .prefix("mupilot-pg-tls-")
            .tempdir()
            .unwrap();
        let d = files.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (cert, key) = ca.issue("localhost", &["localhost"]);
        write(&d.join("server.crt"), &cert, 0o644);
        write(&d.join("server.key"), &key, 0o600);
        write(&d.join("ca.pem"), &ca.cert.pem(), 0o644);
        write(
            &d.join("pg_hba.conf"),
            &format!(
                "local all all scram-sha-256\n\
                 hostnossl all pgadmin 127.0.0.1/32 scram-sha-256\n\
                 hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n"
            ),
            0o644,
        );
        // The server reads its key as the cluster's account (postgres when we are root).
        if let Some(u) = nix::unistd::User::from_name("postgres")
            .unwrap()
            .filter(|_| nix::unistd::geteuid().is_root())
        {
            nix::unistd::chown(&d.join("server.key"), Some(u.uid), Some(u.gid)).unwrap();
        }
        let setting = |k: &str, f: &str| format!("{k}={}", d.join(f).display());
        let pg = PgCluster::start_with(&[
            "fsync=off",
            "ssl=on",
            &setting("ssl_cert_file", "server.crt"),
            &setting("ssl_key_file", "server.key"),
            &setting("ssl_ca_file", "ca.pem"),
            &setting("hba_file", "pg_hba.conf"),
        ]);
        TlsCluster { pg, ca, files }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    /// The store's settings for `dbname` at `host`, pool of 2.
    fn settings(&self, dbname: &str, host: &str, tls: PgTls) -> PgSettings {
        PgSettings {
            host: host.into(),
            pool_size: 2,
            tls,
            ..self.pg.settings(dbname)
        }
    }

    fn verify(&self, check_host: bool) -> PgTls {
        PgTls::Verify {
            root_cert: self.path("ca.pem"),
            check_host,
            client: None,
        }
    }

    /// Sessions of `user` on `dbname` and how many of them are encrypted.
    fn sessions(&self, user: &str, dbname: &str) -> (i64, i64) {
        let row = self
            .pg
            .admin("postgres")
            .unwrap()
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.usename = $1 AND a.datname = $2",
                &[&user, &dbname],
            )
            .unwrap();
        (row.get(0), row.get(1))
    }
}

/// Opens the store on `pg` with its files in `data/files` (made 0700 by the store).
fn open(data: &Path, pg: PgSettings) -> Result<Store, String> {
    Store::open_with(&data.join("files"), &Database::Postgres(pg)).map_err(|e| e.to_string())
}

fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mupilot-pg-tls-data-")
        .tempdir()
        .unwrap()
}

#[test]
fn the_pool_is_encrypted_and_plaintext_is_refused_by_the_database() {
    let t = TlsCluster::start();
    let db = t.pg.create_db();
    let data = data_dir();
    let e = open(data.path(), t.settings(&db, "127.0.0.1", PgTls::Disable))
        .err()
        .expect("plaintext refused");
    assert!(e.contains("no encryption"), "{e}");

    let store = open(data.path(), t.settings(&db, "localhost", t.verify(true))).unwrap();
    assert_eq!(
        t.sessions(pg_support::ROLE, &db),
        (2, 2),
        "both pool connections, both over TLS"
    );
    drop(store);
}

/// Why opening `dbname` at localhost with verify-full and the root file `root` fails.
fn refusal(t: &TlsCluster, dbname: &str, data: &Path, root: &str) -> String {
    let tls = PgTls::Verify {
        root_cert: t.path(root),
        check_host: true,
        client: None,
    };
    open(data, t.settings(dbname, "localhost", tls))
        .err()
        .unwrap_or_else(|| panic!("root file {root} accepted"))
}

#[test]
fn the_databases_certificate_is_checked() {
    let t = TlsCluster::start();
    let db = t.pg.create_db();
    let data = data_dir();

    // A CA that did not sign the database's certificate.
    let other = Ca::new("another CA");
    write(&t.path("other-ca.pem"), &other.cert.pem(), 0o644);
    let e = refusal(&t, &db, data.path(), "other-ca.pem");
    assert!(e.contains("certificate verify failed"), "{e}");

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca (the
    // chain only) accepts.
    let e = open(data.path(), t.settings(&db, "127.0.0.1", t.verify(true)))
        .err()
        .expect("a name not in the certificate refused");
    assert!(e.contains("certificate verify failed"), "{e}");
    assert!(e.contains("(TLS, verify-full)"), "the target says TLS: {e}");
    open(data.path(), t.settings(&db, "127.0.0.1", t.verify(false))).unwrap();

    // A root file that is not there, or holds no certificate: named.
    let e = refusal(&t, &db, data.path(), "missing.pem");
    assert!(
        e.contains("database.sslrootcert") && e.contains("missing.pem"),
        "{e}"
    );
    write(&t.path("empty.pem"), "", 0o644);
    let e = refusal(&t, &db, data.path(), "empty.pem");
    assert!(e.contains("database.sslrootcert"), "{e}");
}

#[test]
fn a_client_certificate_authenticates_the_role_and_its_key_must_be_private() {
    let t = TlsCluster::start();
    let mut admin = t.pg.admin("postgres").unwrap();
    admin
        .batch_execute(&format!("CREATE ROLE {CERT_ROLE} LOGIN"))
        .unwrap();
    let db = format!("t_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {db} OWNER {CERT_ROLE}"))
        .unwrap();
    let (cert, key) = t.ca.issue(CERT_ROLE, &[]);
    write(&t.path("client.crt"), &cert, 0o644);
    write(&t.path("client.key"), &key, 0o600);
    let data = data_dir();
    let settings = |client: Option<ClientCert>| PgSettings {
        user: CERT_ROLE.into(),
        password_file: None,
        ..t.settings(
            &db,
            "localhost",
            PgTls::Verify {
                root_cert: t.path("ca.pem"),
                check_host: true,
                client,
            },
        )
    };
    let client = ClientCert {
        cert: t.path("client.crt"),
        key: t.path("client.key"),
    };
    let store = open(data.path(), settings(Some(client.clone()))).unwrap();
    assert_eq!(t.sessions(CERT_ROLE, &db), (2, 2));
    drop(store);

    // Without the certificate the `cert` method has nothing to check.
    let e = open(data.path(), settings(None)).err().unwrap();
    assert!(e.contains("certificate"), "{e}");

    // A key other users may read is refused before any connection.
    std::fs::set_permissions(t.path("client.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = open(data.path(), settings(Some(client))).err().unwrap();
    assert!(
        e.contains("database.sslkey") && e.contains("chmod 0600"),
        "{e}"
    );
}

/// `mupilot-server serve` with the `[database]` a guide reader would write for a database on
/// another machine (here: localhost by name, verify-full) starts, answers a submission, and
/// holds only encrypted sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_a_database_reached_over_tls() {
    let (t, db) = tokio::task::block_in_place(|| {
        let t = TlsCluster::start();
        let db = t.pg.create_db();
        (t, db)
    });
    let demo = Demo::new();
    assert!(
        demo.pg.is_none(),
        "this test brings its own PostgreSQL; run it without MUPILOT_TEST_ENGINE"
    );
    demo.configure(&format!(
        "\n[database]\nengine = \"postgresql\"\nhost = \"localhost\"\nport = {}\n\
         dbname = \"{db}\"\nuser = \"{}\"\npassword_file = \"{}\"\npool_size = 3\n\
         sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
        t.pg.port,
        pg_support::ROLE,
        t.pg.password_file.display(),
        t.path("ca.pem").display()
    ));
    let server = demo.serve();
    let alice = demo.client("alice");
    let r = alice
        .post(server.url("/v1/payloads"))
        .json(&small_job(&["/bin/true"], None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let (all, tls) = tokio::task::block_in_place(|| t.sessions(pg_support::ROLE, &db));
    assert_eq!((all, tls), (3, 3), "the instance's pool, all over TLS");
    drop(server);
}
