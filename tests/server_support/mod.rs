//! Shared helpers for the server integration tests: a demo VO from the real `init`, the real
//! `serve` binary on 127.0.0.1:0, and mTLS reqwest clients with the generated certificates.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../pg_support/mod.rs"]
pub mod pg_support;

pub const BIN: &str = env!("CARGO_BIN_EXE_mupilot-server");

/// A pilot's match request for 4 cores, 8 GiB and a day, from node `wn01`.
pub fn match_req(pilot_id: &str) -> mupilot::protocol::api::MatchRequest {
    mupilot::protocol::api::MatchRequest {
        pilot_id: pilot_id.into(),
        batch_system: Some("none".into()),
        batch_job_id: None,
        host: "wn01".into(),
        free_cores: 4,
        free_memory_bytes: 8 << 30,
        seconds_left: 86400,
    }
}

/// A pilot's match request for 8 cores, 16 GiB and a day, from node `wn`: room for many
/// small payloads (the matching and multi-instance tests).
pub fn match_req_8(pilot_id: &str) -> mupilot::protocol::api::MatchRequest {
    mupilot::protocol::api::MatchRequest {
        pilot_id: pilot_id.into(),
        batch_system: None,
        batch_job_id: None,
        host: "wn".into(),
        free_cores: 8,
        free_memory_bytes: 16 << 30,
        seconds_left: 86400,
    }
}

/// A small payload: `argv` with 1 core, 64 MiB and a minute, no outputs, no bundle.
pub fn small_job(argv: &[&str], jobtag: Option<&str>) -> mupilot::protocol::api::SubmitRequest {
    mupilot::protocol::api::SubmitRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Default::default(),
        jobtag: jobtag.map(str::to_string),
        resources: mupilot::protocol::Resources {
            cores: 1,
            memory_bytes: 64 << 20,
            walltime_seconds: 60,
        },
        outputs: vec![],
        bundle: None,
        delegation: None,
    }
}

/// A tar.gz holding one file `name` (mode 0644) with `content`: an input bundle or an
/// output archive.
pub fn tar_gz(name: &str, content: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut t = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, name, content).unwrap();
    t.into_inner().unwrap().finish().unwrap()
}

pub fn dn(cn: &str) -> String {
    format!("/DC=org/DC=mupilot-demo/CN={cn}")
}

/// A demo VO written by `mupilot-server init` into a fresh temporary directory. With
/// `MUPILOT_TEST_ENGINE=postgresql` its server.toml gets a `[database]` on a private
/// PostgreSQL cluster of its own (scripts/test.sh runs the API tests that way too).
pub struct Demo {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub pg: Option<pg_support::PgCluster>,
}

impl Demo {
    pub fn new() -> Demo {
        Demo::with_init_args(&[])
    }

    /// As [`Demo::new`], with more arguments for `init` (e.g. `--vo atlas`).
    pub fn with_init_args(extra: &[&str]) -> Demo {
        let tmp = tempfile::Builder::new()
            .prefix("srv-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("vo");
        let out = Command::new(BIN)
            .args(["init", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", text(&out));
        let pg = match std::env::var("MUPILOT_TEST_ENGINE").as_deref() {
            Ok("postgresql") => {
                // On a plain thread: the sync client cannot run inside a test's runtime.
                let (c, db) = std::thread::spawn(|| {
                    let c = pg_support::PgCluster::start_with(&["fsync=off"]);
                    let db = c.create_db();
                    (c, db)
                })
                .join()
                .unwrap();
                let config = dir.join("server.toml");
                let mut toml = std::fs::read_to_string(&config).unwrap();
                toml.push_str(&c.toml(&db, true));
                std::fs::write(&config, toml).unwrap();
                Some(c)
            }
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("MUPILOT_TEST_ENGINE={other:?}: use sqlite or postgresql"),
        };
        Demo { tmp, dir, pg }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn config(&self) -> PathBuf {
        self.path("server.toml")
    }

    /// Starts `serve` on this VO's server.toml.
    pub fn serve(&self) -> Server {
        Server::start(&self.config(), &self.tmp.path().join("server.log"))
    }

    /// An mTLS client presenting `<name>.crt`.
    pub fn client(&self, name: &str) -> reqwest::Client {
        mupilot::tls::https_client(
            &self.path(&format!("{name}.crt")),
            &self.path(&format!("{name}.key")),
            &self.path("certificates"),
        )
        .unwrap()
    }

    /// Runs the binary with arguments; returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN).args(args).output().unwrap()
    }

    /// Appends tables to the demo's server.toml.
    pub fn configure(&self, tables: &str) {
        let p = self.config();
        let mut s = std::fs::read_to_string(&p).unwrap();
        s.push_str(tables);
        std::fs::write(&p, s).unwrap();
    }

    /// The `[database]` dbname of a PostgreSQL demo.
    fn pg_dbname(&self) -> String {
        let t: toml::Value = std::fs::read_to_string(self.config())
            .unwrap()
            .parse()
            .unwrap();
        t["database"]["dbname"].as_str().unwrap().to_string()
    }

    /// Runs one SQL statement on the demo's database (SQLite file or PostgreSQL), returning
    /// the first column of each row as text.
    pub fn sql(&self, stmt: &str) -> Vec<String> {
        match &self.pg {
            None => {
                let c = rusqlite::Connection::open(self.path("server-data").join("mupilot.db"))
                    .unwrap();
                let mut st = c.prepare(stmt).unwrap();
                let n = st.column_count();
                let rows = st
                    .query_map([], |r| {
                        if n == 0 {
                            return Ok(String::new());
                        }
                        let v: rusqlite::types::Value = r.get(0)?;
                        Ok(format!("{v:?}"))
                    })
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                rows
            }
            Some(pg) => {
                let db = self.pg_dbname();
                let stmt = stmt.to_string();
                // The sync client cannot run inside the test's runtime: a plain thread.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let mut c = pg.admin(&db).unwrap();
                        c.simple_query(&stmt)
                            .unwrap()
                            .into_iter()
                            .filter_map(|m| match m {
                                postgres::SimpleQueryMessage::Row(r) => {
                                    Some(r.get(0).unwrap_or("NULL").to_string())
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .join()
                    .unwrap()
                })
            }
        }
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running `mupilot-server serve`; stopped with SIGTERM (by pid) when dropped.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(config: &Path, log: &Path) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", config.to_str().unwrap()]);
        Server::start_command(cmd, log)
    }

    /// Starts `serve` under the given umask (through sh, which sets it before the exec).
    pub fn start_with_umask(config: &Path, log: &Path, umask: u32) -> Server {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                "umask {umask:03o}; exec \"$0\" serve --config \"$1\""
            ))
            .arg(BIN)
            .arg(config);
        Server::start_command(cmd, log)
    }

    fn start_command(mut cmd: Command, log: &Path) -> Server {
        let logf = std::fs::File::create(log).unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(logf).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server did not start: {line:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        Server {
            url: url.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The server process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL by pid (a crash: no shutdown), then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the file at `path` holds the bytes of `needle` anywhere (false when it is absent):
/// deleted personal data must be in no file of the database, not only in no row.
pub fn file_holds(path: &std::path::Path, needle: &str) -> bool {
    match std::fs::read(path) {
        Ok(b) => b.windows(needle.len()).any(|w| w == needle.as_bytes()),
        Err(_) => false,
    }
}
