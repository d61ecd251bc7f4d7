//! Test support for the end-to-end tests: real accounts, a real VO server with real
//! certificates, the real helper as root, and the real pilot as an unprivileged account.
//! Everything created is removed when the guards drop; processes are stopped by pid.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The end-to-end tests share account names and must not overlap.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn bin(name: &str) -> PathBuf {
    match name {
        "mupilot" => PathBuf::from(env!("CARGO_BIN_EXE_mupilot")),
        "mupilot-switch" => PathBuf::from(env!("CARGO_BIN_EXE_mupilot-switch")),
        "mupilot-server" => PathBuf::from(env!("CARGO_BIN_EXE_mupilot-server")),
        other => panic!("unknown binary {other}"),
    }
}

/// Unix accounts created for one test and removed afterwards.
pub struct Accounts {
    names: Vec<String>,
}

impl Accounts {
    pub fn create(names: &[&str]) -> Accounts {
        for n in names {
            let _ = Command::new("userdel")
                .arg(n)
                .stderr(Stdio::null())
                .status();
            let st = Command::new("useradd")
                .args(["--no-create-home", "--shell", "/usr/sbin/nologin"])
                .args(["--home-dir", "/nonexistent", n])
                .status()
                .expect("useradd runs");
            assert!(st.success(), "useradd {n} failed");
        }
        Accounts {
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn uid(name: &str) -> u32 {
        nix::unistd::User::from_name(name)
            .unwrap()
            .unwrap_or_else(|| panic!("no account {name}"))
            .uid
            .as_raw()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("userdel").arg(n).status();
        }
    }
}

/// A child process stopped by pid when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the stack's own programs get to open their socket or port.
const STARTUP: Duration = Duration::from_secs(15);

/// A VO server and a site helper, configured by `mupilot-server init` and adjusted to the
/// test's accounts.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub vo: PathBuf,
    pub port: u16,
    pub server: Option<Proc>,
    pub switch: Option<Proc>,
    pub pilot_account: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Stack {
    /// `gridmap` lines replace the grid-mapfile init wrote (`("alice", "mpt-e2e-a")`).
    pub fn start(pilot_account: &str, gridmap: &[(&str, &str)]) -> Stack {
        let lines: Vec<(String, &str)> = gridmap
            .iter()
            .map(|(user, account)| (format!("/DC=org/DC=mupilot-demo/CN={user}"), *account))
            .collect();
        let lines: Vec<(&str, &str)> = lines.iter().map(|(d, a)| (d.as_str(), *a)).collect();
        Stack::start_with(pilot_account, &lines, &[], |_| {})
    }

    /// As [`Stack::start`] with whole DNs in `gridmap`, more arguments for `init` (e.g.
    /// `--vo atlas`), and `prepare` run on the VO directory before the server and the helper
    /// start (to edit server.toml, switch.toml, pilot.toml or add CA files).
    pub fn start_with(
        pilot_account: &str,
        gridmap: &[(&str, &str)],
        init_args: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("mupilot-e2e")
            // Not below /tmp: payloads get a private /tmp, so scratch must live elsewhere.
            .tempdir_in("/var/lib")
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let vo = dir.path().join("vo");
        let port = free_port();
        run_ok(
            Command::new(bin("mupilot-server"))
                .arg("init")
                .arg(&vo)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(init_args),
        );
        let mut map = String::new();
        for (dn, account) in gridmap {
            map.push_str(&format!("\"{dn}\" {account}\n"));
        }
        std::fs::write(vo.join("grid-mapfile"), map).unwrap();
        let switch_toml = std::fs::read_to_string(vo.join("switch.toml")).unwrap();
        std::fs::write(
            vo.join("switch.toml"),
            switch_toml.replace("\"mupilot\"", &format!("\"{pilot_account}\"")),
        )
        .unwrap();
        let uid = Accounts::uid(pilot_account);
        for f in ["pilot.crt", "pilot.key"] {
            nix::unistd::chown(&vo.join(f), Some(uid.into()), None).unwrap();
        }
        let work = vo.join("pilot-work");
        std::fs::create_dir_all(&work).unwrap();
        nix::unistd::chown(&work, Some(uid.into()), None).unwrap();
        prepare(&vo);

        let mut stack = Stack {
            dir,
            vo,
            port,
            server: None,
            switch: None,
            pilot_account: pilot_account.to_string(),
        };
        stack.server = Some(
            stack.spawn_logged(
                "server",
                Command::new(bin("mupilot-server"))
                    .arg("serve")
                    .arg("--config")
                    .arg(stack.vo.join("server.toml")),
            ),
        );
        stack.switch = Some(
            stack.spawn_logged(
                "switch",
                Command::new(bin("mupilot-switch"))
                    .arg("serve")
                    .arg("--config")
                    .arg(stack.vo.join("switch.toml")),
            ),
        );
        let sock = stack.vo.join("switch.sock");
        stack.wait_until("helper socket", STARTUP, || sock.exists());
        let addr = format!("127.0.0.1:{port}");
        stack.wait_until("server port", STARTUP, || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        stack
    }

    fn spawn_logged(&self, name: &str, cmd: &mut Command) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    /// Waits until `ok` holds (polling every 50 ms), or fails naming `what` with the logs.
    pub fn wait_until(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "{what} not within {limit:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["server", "switch", "pilot"] {
            let p = self.dir.path().join(format!("{name}.log"));
            if let Ok(t) = std::fs::read_to_string(&p) {
                s.push_str(&format!("--- {name}.log\n{t}\n"));
            }
        }
        s
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn user_args(&self, user: &str) -> Vec<String> {
        vec![
            "--server".into(),
            self.url(),
            "--cert".into(),
            self.vo.join(format!("{user}.crt")).display().to_string(),
            "--key".into(),
            self.vo.join(format!("{user}.key")).display().to_string(),
            "--ca".into(),
            self.vo.join("certificates").display().to_string(),
        ]
    }

    /// Submits as `user`; `args` are submit flags, then `--`, then argv. Returns the id.
    pub fn submit(&self, user: &str, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(bin("mupilot-server"))
                .arg("submit")
                .args(self.user_args(user))
                .args(args),
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The payload as its owner sees it (`GET /v1/payloads/{id}`).
    pub fn status(&self, user: &str, id: &str) -> serde_json::Value {
        let out = run_ok(
            Command::new(bin("mupilot-server"))
                .arg("status")
                .args(self.user_args(user))
                .args(["--json", id]),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Downloads and unpacks the payload's output archive; returns the directory.
    pub fn output(&self, user: &str, id: &str) -> PathBuf {
        let to = self.dir.path().join(format!("out-{id}"));
        run_ok(
            Command::new(bin("mupilot-server"))
                .arg("output")
                .args(self.user_args(user))
                .arg(id)
                .arg("--to")
                .arg(&to),
        );
        to
    }

    /// Runs the pilot as the pilot account until it exits.
    pub fn run_pilot(&self, extra: &[&str]) -> Output {
        let log = self.dir.path().join("pilot.log");
        let out = Command::new("runuser")
            .args(["-u", &self.pilot_account, "--"])
            .arg(bin("mupilot"))
            .arg("run")
            .arg("--config")
            .arg(self.vo.join("pilot.toml"))
            .args(extra)
            .output()
            .expect("pilot runs");
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        std::fs::write(&log, text).unwrap();
        out
    }

    pub fn audit_log(&self) -> PathBuf {
        self.vo.join("audit.jsonl")
    }

    pub fn trace_log(&self) -> PathBuf {
        self.vo.join("pilot-work").join("trace.jsonl")
    }

    pub fn records(path: &Path) -> Vec<serde_json::Value> {
        mupilot::records::read_records(path).unwrap()
    }

    /// Whether the helper's audit log has a `permit` for payload `id` whose reason contains
    /// `what` (e.g. "operator command", "operator command information"): an operator command
    /// the helper authorized.
    pub fn helper_permitted(&self, id: &str, what: &str) -> bool {
        Stack::records(&self.audit_log()).iter().any(|r| {
            r["payload_id"] == id
                && r["decision"] == "permit"
                && r["reason"].as_str().unwrap_or("").contains(what)
        })
    }
}

/// Pids of live processes owned by `uid` (zombies included: they are gone soon after).
pub fn processes_of(uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (e.metadata().ok()?.uid() == uid).then_some(pid)
        })
        .collect()
}

/// The first file named `name` below `dir`.
pub fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let p = entry.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().and_then(|n| n.to_str()) == Some(name) {
            return Some(p);
        }
    }
    None
}

impl Stack {
    /// Adds top-level keys to pilot.toml (before its first table).
    pub fn pilot_option(&self, line: &str) {
        add_top_level_key(&self.vo.join("pilot.toml"), line);
    }

    /// Starts the pilot as the pilot account in the background (stopped by pid on drop).
    pub fn spawn_pilot(&self, extra: &[&str]) -> Proc {
        let log = self.dir.path().join("pilot.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("runuser")
            .args(["-u", &self.pilot_account, "--"])
            .arg(bin("mupilot"))
            .arg("run")
            .arg("--config")
            .arg(self.vo.join("pilot.toml"))
            .args(extra)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("pilot starts");
        Proc { child, log }
    }

    /// Runs a client subcommand of mupilot-server as `user` (cancel, signal, ...).
    pub fn client(&self, user: &str, sub: &str, args: &[&str]) -> Output {
        self.client_in(user, &[sub], args)
    }

    /// As [`Stack::client`] for a nested subcommand, e.g. `["membership", "suspend"]`.
    pub fn client_in(&self, user: &str, sub: &[&str], args: &[&str]) -> Output {
        Command::new(bin("mupilot-server"))
            .args(sub)
            .args(self.user_args(user))
            .args(args)
            .output()
            .expect("client runs")
    }

    /// Waits until the payload reaches `state` as its owner sees it.
    pub fn wait_state(
        &self,
        user: &str,
        id: &str,
        state: &str,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.status(user, id);
            if st["state"] == state {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {st}, not {state}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Stack {
    /// Adds top-level keys to server.toml (before its first table); takes effect at the next
    /// (re)start of the server.
    pub fn server_option(&self, line: &str) {
        add_top_level_key(&self.vo.join("server.toml"), line);
    }

    /// Kills the VO server with SIGKILL (by its pid: no goodbye) and waits for it to be gone.
    pub fn kill_server(&mut self) {
        let mut p = self.server.take().expect("the server runs");
        let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        p.child.wait().unwrap();
    }

    /// Starts the VO server again on the same port and data directory.
    pub fn restart_server(&mut self) {
        let log = self.dir.path().join("server.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin("mupilot-server"))
            .arg("serve")
            .arg("--config")
            .arg(self.vo.join("server.toml"))
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn");
        self.server = Some(Proc { child, log });
        let addr = format!("127.0.0.1:{}", self.port);
        self.wait_until("server port", STARTUP, || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    /// Restarts the server so a changed server.toml takes effect.
    pub fn reconfigure_server(&mut self) {
        let mut p = self.server.take().expect("the server runs");
        let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        p.child.wait().unwrap();
        let addr = format!("127.0.0.1:{}", self.port);
        self.wait_until("server port closed", STARTUP, || {
            std::net::TcpStream::connect(&addr).is_err()
        });
        self.restart_server();
    }
}

/// The pid of the real `mupilot` below a `runuser` started by [`Stack::spawn_pilot`].
pub fn pilot_pid(p: &Proc) -> nix::unistd::Pid {
    let runuser = p.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{runuser}/task/{runuser}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return nix::unistd::Pid::from_raw(pid.parse().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "runuser {runuser} started no pilot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit; returns its status (panics after `limit`, with the logs).
pub fn wait_exit(stack: &Stack, p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "process {} did not exit in {limit:?}\n{}",
            p.child.id(),
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds a top-level `key = value` line to a TOML file, before its first table.
pub fn add_top_level_key(p: &Path, line: &str) {
    let text = std::fs::read_to_string(p).unwrap();
    let (head, tail) = match text.find("\n[") {
        Some(i) => text.split_at(i + 1),
        None => (text.as_str(), ""),
    };
    std::fs::write(p, format!("{head}{line}\n{tail}")).unwrap();
}
