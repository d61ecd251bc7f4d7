//! A private PostgreSQL cluster for one test: `initdb` into a temporary directory (as the
//! `postgres` account when the tests run as root: initdb refuses root), the server started
//! directly as a child on a loopback port and a socket in that directory, password
//! (SCRAM) authentication only, stopped by its pid and removed when dropped. Needs Debian's
//! `postgresql` package (scripts/test.sh installs it) or `MUPILOT_PG_BINDIR`.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mupilot::server::store::{Database, PgSettings, PgTls};

/// The role the servers connect as, and its password (in `server-db-password`).
pub const ROLE: &str = "mupilot";
const ROLE_PASSWORD: &str = "test-role-password";
const ADMIN: &str = "pgadmin";
const ADMIN_PASSWORD: &str = "test-admin-password";

pub struct PgCluster {
    tmp: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    /// The role's password file, 0600 (what server.toml's `password_file` names).
    pub password_file: PathBuf,
}

/// The directory with initdb and postgres: `MUPILOT_PG_BINDIR`, else the newest
/// /usr/lib/postgresql/<major>/bin (Debian) or /usr/pgsql-<major>/bin (EL).
pub fn bindir() -> PathBuf {
    if let Some(d) = std::env::var_os("MUPILOT_PG_BINDIR") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for (parent, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(rd) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(v) = name.strip_prefix(prefix).and_then(|v| v.parse().ok()) else {
                continue;
            };
            let bin = e.path().join("bin");
            if bin.join("initdb").exists() {
                found.push((v, bin));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries (initdb, postgres) found under /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin: install them with `apt-get install postgresql` (scripts/test.sh does) or set MUPILOT_PG_BINDIR"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The account the cluster runs as: `postgres` when we are root, else ourselves.
fn cluster_owner() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    Some(
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres account exists (the postgresql package creates it)"),
    )
}

fn as_owner(cmd: &mut Command) -> &mut Command {
    if let Some(u) = cluster_owner() {
        // std drops the supplementary groups too when root sets the uid.
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    cmd
}

fn write_private(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl PgCluster {
    /// initdb + start; returns once the server accepts connections and the role exists.
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// As [`PgCluster::start`], with extra server settings (`name=value`).
    pub fn start_with(settings: &[&str]) -> PgCluster {
        let bin = bindir();
        let tmp = tempfile::Builder::new()
            .prefix("mupilot-pg-")
            .tempdir()
            .unwrap();
        let root = tmp.path();
        let owner = cluster_owner();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).unwrap();
        if let Some(u) = &owner {
            nix::unistd::chown(root, Some(u.uid), Some(u.gid)).unwrap();
        }
        let admin_pw = root.join("admin-password");
        write_private(&admin_pw, ADMIN_PASSWORD);
        if let Some(u) = &owner {
            nix::unistd::chown(&admin_pw, Some(u.uid), Some(u.gid)).unwrap();
        }
        let out = as_owner(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(root.join("data"))
                .args(["-U", ADMIN, "--auth=scram-sha-256", "-E", "UTF8"])
                .args(["--locale=C.UTF-8", "--no-sync"])
                .arg(format!("--pwfile={}", admin_pw.display())),
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(root.join("postgres.log")).unwrap();
        let child = as_owner(
            Command::new(bin.join("postgres"))
                .arg("-D")
                .arg(root.join("data"))
                .args(["-p", &port.to_string(), "-k"])
                .arg(root)
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "max_connections=200"])
                .args(settings.iter().flat_map(|kv| ["-c", kv])),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
        let password_file = root.join("server-db-password");
        write_private(&password_file, &format!("{ROLE_PASSWORD}\n"));
        let mut c = PgCluster {
            tmp,
            child: Some(child),
            port,
            password_file,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.admin("postgres") {
                Ok(mut client) => {
                    client
                        .batch_execute(&format!(
                            "CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'"
                        ))
                        .unwrap();
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    if let Some(st) = c.child.as_mut().unwrap().try_wait().unwrap() {
                        panic!("postgres exited ({st}): {e}; log:\n{}", c.log());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!(
                    "postgres did not accept connections: {e}; log:\n{}",
                    c.log()
                ),
            }
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("postgres.log")).unwrap_or_default()
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// A superuser connection to `dbname` over loopback TCP.
    pub fn admin(&self, dbname: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(ADMIN)
            .password(ADMIN_PASSWORD)
            .dbname(dbname)
            .connect(postgres::NoTls)
    }

    /// A fresh database owned by the servers' role.
    pub fn create_db(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        self.admin("postgres")
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {ROLE}"))
            .unwrap();
        name
    }

    /// The store's settings for `dbname`: the role, its password file, over loopback TCP.
    pub fn settings(&self, dbname: &str) -> PgSettings {
        PgSettings {
            host: "127.0.0.1".into(),
            port: self.port,
            dbname: dbname.into(),
            user: ROLE.into(),
            password_file: Some(self.password_file.clone()),
            pool_size: 16,
            tls: PgTls::Disable,
        }
    }

    pub fn database(&self, dbname: &str) -> Database {
        Database::Postgres(self.settings(dbname))
    }

    /// The `[database]` section of server.toml for `dbname` (over the Unix socket when
    /// `socket`, else loopback TCP).
    pub fn toml(&self, dbname: &str, socket: bool) -> String {
        let host = if socket {
            self.tmp.path().display().to_string()
        } else {
            "127.0.0.1".into()
        };
        format!(
            "\n[database]\nengine = \"postgresql\"\nhost = \"{host}\"\nport = {}\ndbname = \"{dbname}\"\nuser = \"{ROLE}\"\npassword_file = \"{}\"\n",
            self.port,
            self.password_file.display()
        )
    }

    /// Stops the server by its pid (SIGINT: fast shutdown) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        // The TempDir removes the cluster's files.
    }
}
