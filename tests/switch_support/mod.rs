//! Shared fixtures of the helper's integration tests: a site in a temp dir (VO key, grid-mapfile,
//! switch.toml), the real `mupilot-switch` daemon, a small wire client, test accounts
//! (`mpt-swd-*`, created with useradd and removed when the last test using them ends), and a
//! python client run as another uid.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;
#[allow(unused_imports)]
pub use common::uid_of;

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{Duration as CDuration, Utc};
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources, ENVELOPE_VERSION};
use mupilot::protocol::switch_wire::{
    read_frame, write_frame, PilotHello, SwitchEvent, SwitchRequest,
};
use mupilot::protocol::{SignedEnvelope, VoSigningKey};

pub const BIN: &str = env!("CARGO_BIN_EXE_mupilot-switch");
pub const VO: &str = "swdvo";
pub const DN_ALICE: &str = "/DC=org/DC=mupilot-test/CN=swd alice";
pub const DN_ROOT: &str = "/DC=org/DC=mupilot-test/CN=swd root";
pub const DN_PILOTSELF: &str = "/DC=org/DC=mupilot-test/CN=swd pilotself";
pub const DN_UNMAPPED: &str = "/DC=org/DC=mupilot-test/CN=swd carol";
/// The account payloads map to, and the (non-root) pilot account.
pub const ACCT: &str = "mpt-swd-a";
pub const PILOT: &str = "mpt-swd-p";

static USERS: Mutex<usize> = Mutex::new(0);

/// Holds the test accounts; the last holder removes them.
pub struct Users;

impl Users {
    pub fn acquire() -> Users {
        let mut n = USERS.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            for u in [ACCT, PILOT] {
                common::ensure_account(u);
            }
        }
        *n += 1;
        Users
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let mut n = USERS.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            for u in [ACCT, PILOT] {
                common::delete_account(u);
            }
        }
    }
}

pub fn gid_of(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
}

/// A site configuration in a temp dir.
pub struct Site {
    pub dir: tempfile::TempDir,
    /// Scratch must live outside /tmp (payloads get a private /tmp).
    pub scratch: tempfile::TempDir,
    pub key: VoSigningKey,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub socket: PathBuf,
    pub gridmap: PathBuf,
    /// The helper's node name: envelopes from [`Site::body`] are bound to it.
    pub node: String,
}

/// The kernel's host name: the helper's node name when switch.toml sets none.
pub fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

impl Site {
    /// A site whose helper detects its node name (the kernel's host name).
    pub fn new() -> Site {
        Site::build(None)
    }

    /// A site whose switch.toml sets `node_name = "{node}"`.
    pub fn with_node(node: &str) -> Site {
        Site::build(Some(node))
    }

    fn build(node: Option<&str>) -> Site {
        let dir = tempfile::Builder::new().prefix("swd-").tempdir().unwrap();
        // Other uids (the refused caller, the non-root pilot) must reach the socket and scripts.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = VoSigningKey::generate();
        std::fs::write(dir.path().join("vo.pub"), key.verifying_key().to_pem()).unwrap();
        let gridmap = dir.path().join("grid-mapfile");
        std::fs::write(
            &gridmap,
            format!(
                "# test map\n\"{DN_ALICE}\" {ACCT}\n\"{DN_ROOT}\" root\n\"{DN_PILOTSELF}\" {PILOT}\n"
            ),
        )
        .unwrap();
        let scratch = tempfile::Builder::new()
            .prefix("mupilot-test-swd-")
            .tempdir_in("/var/lib")
            .unwrap();
        let config = dir.path().join("switch.toml");
        let node_line = node
            .map(|n| format!("node_name = \"{n}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                r#"{node_line}socket = "run/switch.sock"
allowed_pilots = ["root", "{PILOT}"]
gridmap = "grid-mapfile"
audit_log = "log/audit.jsonl"
state_dir = "state"
min_uid = 1000
[[vo]]
name = "{VO}"
public_key = "vo.pub"
[sandbox]
scratch_root = "{}"
"#,
                scratch.path().join("scratch").display()
            ),
        )
        .unwrap();
        Site {
            audit: dir.path().join("log/audit.jsonl"),
            socket: dir.path().join("run/switch.sock"),
            dir,
            scratch,
            key,
            config,
            gridmap,
            node: node.map(str::to_string).unwrap_or_else(hostname),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A valid envelope body for `dn`.
    pub fn body(&self, dn: &str, argv: &[&str]) -> EnvelopeBody {
        let now = Utc::now();
        EnvelopeBody {
            version: ENVELOPE_VERSION,
            payload_id: format!("swd-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            owner: Owner {
                dn: dn.into(),
                vo: VO.into(),
                fqans: vec![format!("/{VO}")],
                membership_valid_until: now + CDuration::days(1),
            },
            jobtag: Some("swd-test".into()),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            bundle_sha256: None,
            resources: Resources {
                cores: 1,
                memory_bytes: 64 << 20,
                walltime_seconds: 60,
            },
            outputs: vec![],
            not_before: now - CDuration::minutes(1),
            not_after: now + CDuration::minutes(9),
            node: self.node.clone(),
            pilot_id: "swd-pilot".into(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            issuer: "swd-test".into(),
            credential: None,
        }
    }

    pub fn sign(&self, body: &EnvelopeBody) -> SignedEnvelope {
        self.key.sign(body)
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        mupilot::records::read_records(&self.audit).unwrap()
    }

    /// The audit records about `payload_id`.
    pub fn records_of(&self, payload_id: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["payload_id"] == payload_id)
            .collect()
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self)
    }
}

/// The real daemon, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(site: &Site) -> Daemon {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = site.path(&format!("daemon-{n}.log"));
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&site.config)
            .env("MUPILOT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, log };
        d.wait_for_socket(&site.socket);
        d
    }

    pub fn wait_for_socket(&self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon did not listen on {}: {}",
            socket.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn stop(mut self) -> Option<std::process::ExitStatus> {
        self.stop_inner()
    }

    /// SIGTERM, then SIGKILL after 15 s; the exit status when it stopped on SIGTERM.
    fn stop_inner(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop_inner();
        }
    }
}

/// A pilot-side connection speaking the wire protocol.
pub struct Client {
    pub stream: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client { stream }
    }

    /// Connects and completes hello/welcome.
    pub fn hello(socket: &Path, hello: PilotHello) -> Client {
        let mut c = Client::connect(socket);
        match c.call(&SwitchRequest::Hello(hello), &[]) {
            SwitchEvent::Welcome { .. } => c,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub fn default_hello() -> PilotHello {
        PilotHello {
            pilot_id: "swd-pilot".into(),
            pilot_dn: Some("/DC=org/DC=mupilot-test/CN=swd pilot".into()),
            batch_system: Some("none".into()),
            batch_job_id: Some("swd-job-1".into()),
            ..Default::default()
        }
    }

    pub fn send<T: serde::Serialize>(&mut self, req: &T, fds: &[RawFd]) {
        write_frame(&mut self.stream, req, fds).unwrap();
    }

    pub fn recv(&mut self) -> SwitchEvent {
        read_frame::<SwitchEvent>(&mut self.stream).unwrap().0
    }

    pub fn call(&mut self, req: &SwitchRequest, fds: &[RawFd]) -> SwitchEvent {
        self.send(req, fds);
        self.recv()
    }

    /// Launches without output descriptors; a bundle goes as a sealed memfd.
    pub fn launch(&mut self, env: &SignedEnvelope, bundle: Option<&[u8]>) -> SwitchEvent {
        use std::os::fd::AsRawFd;
        let memfd =
            bundle.map(|b| mupilot::protocol::switch_wire::sealed_memfd("test-bundle", b).unwrap());
        let fds: Vec<RawFd> = memfd.iter().map(|f| f.as_raw_fd()).collect();
        self.call(
            &SwitchRequest::Launch {
                envelope: env.clone(),
                bundle_fd: memfd.as_ref().map(|_| 0),
            },
            &fds,
        )
    }
}

/// Runs `frames` (JSON requests) through a python client as `uid:gid`; returns the events.
pub fn python_client(
    site: &Site,
    uid: u32,
    gid: u32,
    frames: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
for frame in json.load(open(sys.argv[2])):
    body = json.dumps(frame).encode()
    try:
        s.sendall(struct.pack(">I", len(body)) + body)
    except OSError:
        pass  # a refusing helper may close first; its answer is still there to read
    head = recv_exact(4)
    if head is None:
        break
    print(recv_exact(struct.unpack(">I", head)[0]).decode(), flush=True)
"#;
    let script = site.path(&format!("client-{uid}.py"));
    std::fs::write(&script, SCRIPT).unwrap();
    let frames_path = site.path(&format!("frames-{uid}.json"));
    std::fs::write(&frames_path, serde_json::to_vec(frames).unwrap()).unwrap();
    for p in [&script, &frames_path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("/usr/bin/python3")
        .arg(&script)
        .arg(&site.socket)
        .arg(&frames_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The helper's CLI, with its exit code and combined output.
pub fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Unwraps a denial.
pub fn denied(ev: SwitchEvent) -> (String, mupilot::protocol::switch_wire::DenialClass, String) {
    match ev {
        SwitchEvent::Denied {
            payload_id,
            class,
            reason,
        } => (payload_id, class, reason),
        other => panic!("expected a denial, got {other:?}"),
    }
}
