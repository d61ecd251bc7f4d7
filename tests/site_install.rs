//! docs/site-admin.md's "Installing" block is executable: this test runs it line by line as a
//! site admin would, with the DEFAULT layout (/etc/mupilot, /etc/grid-security, /usr/sbin,
//! /var/log/mupilot, /var/lib/mupilot, /var/spool/mupilot, /run/mupilot: no path overridden),
//! then has the real helper run payloads as their owners (a static mapping and a pool account).
//!
//! The host is left as it was found: the test thread enters a private mount namespace and puts
//! a tmpfs-backed overlay over /etc, /home, /usr, /var and /run, so every file, directory and
//! account the guide creates lives in that overlay and vanishes with the namespace. Only the
//! payload cgroups are real host objects, and the helper removes them.
//!
//! Stand-ins: `$EDITOR` is a script making the guide's edits (name the VO, its key, the pilot
//! account; enable the [authz] lines); `systemctl enable --now mupilot-switch.socket` runs the
//! installed unit's `ExecStartPre=` and `ExecStart=` with its `UMask=` (this host has no
//! systemd as PID 1; socket activation itself is tested elsewhere).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{Duration as CDuration, Utc};
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources, ENVELOPE_VERSION};
use mupilot::protocol::switch_wire::{PilotHello, SwitchRequest};
use mupilot::protocol::VoSigningKey;

#[path = "../examples/gen-docs/generate.rs"]
mod generate;

const DOC: &str = "docs/site-admin.md";
const ALICE: &str = "/DC=org/DC=mupilot-demo/CN=alice";
const DAVE: &str = "/DC=org/DC=mupilot-demo/CN=dave";
/// Accounts the guide creates; removed from the overlay first if the host has them.
const ACCOUNTS: &[&str] = &[
    "mupilot",
    "mpu-alice",
    "mpu-bob",
    "mpdemo001",
    "mpdemo002",
    "mpprod001",
];
/// Host directories an overlay covers: everything the guide writes is below one of them.
const OVERLAID: &[&str] = &["/etc", "/home", "/usr", "/var", "/run"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shell lines of the ```sh block under "## Installing".
fn installing_block() -> Vec<String> {
    let doc = std::fs::read_to_string(repo().join(DOC)).unwrap();
    let section = doc
        .split("\n## Installing\n")
        .nth(1)
        .expect("docs/site-admin.md has an Installing section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the Installing section has a ```sh block");
    block
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Enters a private mount namespace (this thread only) with overlays over [`OVERLAID`].
fn private_root(upper: &Path) {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    mount(
        Some("mupilot-test"),
        upper,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .unwrap();
    for (i, d) in OVERLAID.iter().enumerate() {
        let (u, w) = (upper.join(format!("u{i}")), upper.join(format!("w{i}")));
        std::fs::create_dir(&u).unwrap();
        std::fs::create_dir(&w).unwrap();
        let opts = format!(
            "lowerdir={d},upperdir={},workdir={}",
            u.display(),
            w.display()
        );
        mount(
            Some("overlay"),
            *d,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .unwrap_or_else(|e| panic!("overlay over {d}: {e}"));
    }
}

/// Detaches the overlays and their tmpfs before the temporary directory under it is removed.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        for d in OVERLAID {
            let _ = umount2(*d, MntFlags::MNT_DETACH);
        }
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn envelope(key: &VoSigningKey, id: &str, dn: &str, fqan: &str, check: &str) -> serde_json::Value {
    let now = Utc::now();
    let body = EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: id.into(),
        owner: Owner {
            dn: dn.into(),
            vo: "demo".into(),
            fqans: vec![fqan.into()],
            membership_valid_until: now + CDuration::days(1),
        },
        jobtag: Some("analysis".into()),
        argv: vec!["/bin/sh".into(), "-c".into(), check.into()],
        env: Default::default(),
        bundle_sha256: None,
        resources: Resources {
            cores: 1,
            memory_bytes: 64 << 20,
            walltime_seconds: 60,
        },
        outputs: vec![],
        not_before: now - CDuration::minutes(1),
        not_after: now + CDuration::minutes(10),
        // The guide sets no node_name: the helper is the kernel's host name.
        node: nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        pilot_id: "site-install".into(),
        nonce: uuid::Uuid::new_v4().simple().to_string(),
        issuer: "site-install-test".into(),
        credential: None,
    };
    serde_json::to_value(SwitchRequest::Launch {
        envelope: key.sign(&body),
        bundle_fd: None,
    })
    .unwrap()
}

/// A pilot speaking the wire protocol: hello, then each launch until its exit or refusal.
const CLIENT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect("/run/mupilot/switch.sock")
def recv():
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    n = struct.unpack(">I", head)[0]
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    print(body.decode(), flush=True)
    return json.loads(body)
def send(frame):
    body = json.dumps(frame).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
frames = json.load(open(sys.argv[1]))
send(frames[0]); recv()
for f in frames[1:]:
    send(f)
    while recv()["type"] not in ("exited", "denied", "error"):
        pass
"#;

fn sh(script: &str, cwd: &Path, env: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new("bash");
    c.args(["-c", script]).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn run_guide() {
    let upper = tempfile::tempdir().unwrap();
    private_root(upper.path());
    let _detach = Detach(upper.path().to_owned());

    // What the admin has at hand: the source tree after the build, and the VO's key.
    let stage = tempfile::tempdir().unwrap();
    let s = stage.path();
    std::fs::create_dir_all(s.join("target/release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_mupilot-switch"),
        s.join("target/release/mupilot-switch"),
    )
    .unwrap();
    for d in ["systemd", "etc", "policy"] {
        std::os::unix::fs::symlink(repo().join(d), s.join(d)).unwrap();
    }
    generate::write_all(&s.join("target/assets")).unwrap();
    let key = VoSigningKey::generate();
    let vo_key = s.join("vo.pub");
    std::fs::write(&vo_key, key.verifying_key().to_pem()).unwrap();
    let editor = s.join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nfor f in \"$@\"; do case \"$f\" in\n\
         */switch.toml) sed -i -e 's/^# *\\(policy\\|site_policy\\|ban_users\\|ban_fqans\\|ban_vos\\|groupmap\\|gridmapdir\\) =/\\1 =/' \"$f\" ;;\n\
         esac; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The guide's lines, with this test's stand-ins for systemd and the editor.
    let pidfile = s.join("helper.pid");
    let mut script = format!(
        "set -euo pipefail\n\
         for u in {accounts}; do if id -u \"$u\" >/dev/null 2>&1; then userdel \"$u\"; fi; done\n\
         systemctl() {{\n\
           case \"$*\" in\n\
             daemon-reload) ;;\n\
             'enable --now mupilot-switch.socket')\n\
               unit=/etc/systemd/system/mupilot-switch.service\n\
               pre=$(sed -n 's/^ExecStartPre=//p' $unit); start=$(sed -n 's/^ExecStart=//p' $unit)\n\
               umask $(sed -n 's/^UMask=//p' $unit)\n\
               $pre\n\
               setsid $start </dev/null >{log} 2>&1 & echo $! >{pid}\n\
               for i in $(seq 200); do [ -S /run/mupilot/switch.sock ] && return 0; sleep 0.05; done\n\
               cat {log} >&2; return 1 ;;\n\
             *) echo \"unexpected: systemctl $*\" >&2; return 1 ;;\n\
           esac\n\
         }}\n",
        accounts = ACCOUNTS.join(" "),
        log = s.join("helper.log").display(),
        pid = pidfile.display(),
    );
    for line in installing_block() {
        script.push_str(&format!("echo '+ step:' {}\n", shell_quote(&line)));
        script.push_str(&line);
        script.push('\n');
    }
    let out = sh(
        &script,
        s,
        &[("VO_PUBLIC_KEY", &vo_key), ("EDITOR", &editor)],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let helper = Helper::from_pidfile(&pidfile);
    assert!(out.status.success(), "the guide's steps failed:\n{text}");
    assert!(
        text.contains("/etc/mupilot/switch.toml: ok")
            && text.contains("scratch_root   /var/spool/mupilot"),
        "{text}"
    );

    // A pilot (the guide's pilot account) launches two payloads: alice (grid-mapfile) and dave
    // (group map -> pool). Each payload proves who and where it is by its exit code.
    let check = |account: &str, id: &str| {
        format!("test \"$(id -un)\" = {account} && test \"$PWD\" = /var/spool/mupilot/{id} && touch here")
    };
    let hello = serde_json::to_value(SwitchRequest::Hello(PilotHello {
        pilot_id: "site-install".into(),
        batch_system: Some("none".into()),
        ..Default::default()
    }))
    .unwrap();
    let frames = serde_json::json!([
        hello,
        envelope(
            &key,
            "si-alice-1",
            ALICE,
            "/demo",
            &check("mpu-alice", "si-alice-1")
        ),
        envelope(
            &key,
            "si-dave-1",
            DAVE,
            "/demo",
            &check("mpdemo001", "si-dave-1")
        ),
    ]);
    std::fs::write(s.join("frames.json"), frames.to_string()).unwrap();
    std::fs::write(s.join("client.py"), CLIENT).unwrap();
    std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["frames.json", "client.py"] {
        std::fs::set_permissions(s.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=mupilot",
            "--regid=mupilot",
            "--init-groups",
            "/usr/bin/python3",
        ])
        .arg(s.join("client.py"))
        .arg(s.join("frames.json"))
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "pilot failed: {}\n{events:?}\n{}",
        String::from_utf8_lossy(&out.stderr),
        helper.log()
    );
    for (id, account) in [("si-alice-1", "mpu-alice"), ("si-dave-1", "mpdemo001")] {
        let started = events
            .iter()
            .find(|e| e["type"] == "started" && e["payload_id"] == id)
            .unwrap_or_else(|| panic!("{id} did not start: {events:?}\n{}", helper.log()));
        assert_eq!(started["account"], account, "{started}");
        let exited = events
            .iter()
            .find(|e| e["type"] == "exited" && e["payload_id"] == id)
            .unwrap_or_else(|| panic!("{id} did not exit: {events:?}"));
        assert_eq!(
            exited["exit_code"], 0,
            "{id} ran as the wrong account or elsewhere: {exited}"
        );
    }

    // The records and the layout the defaults made.
    let audit = mupilot::records::read_records(Path::new("/var/log/mupilot/audit.jsonl")).unwrap();
    let start = audit
        .iter()
        .find(|r| r["event"] == "start" && r["payload_id"] == "si-alice-1")
        .expect("start record");
    assert_eq!(start["account"], "mpu-alice");
    assert_eq!(start["owner_dn"], ALICE);
    for (p, mode) in [
        ("/var/spool/mupilot", 0o711),
        ("/var/lib/mupilot", 0o700),
        ("/var/log/mupilot", 0o700),
    ] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (mode, 0), "{p}");
    }
    // The helper reports `exited` first and removes the scratch directory right after
    // (src/switch/connection.rs: report, then sync and remove), so wait for the removal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = std::fs::read_dir("/var/spool/mupilot").unwrap().count();
    while left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = std::fs::read_dir("/var/spool/mupilot").unwrap().count();
    }
    assert_eq!(left, 0, "scratch directories are removed");
    // The installed page is found by name (man-db: scripts/test.sh installs it).
    let man = Command::new("man")
        .args(["-w", "mupilot-switch-check-config"])
        .output()
        .expect("man (man-db) is installed");
    assert!(
        String::from_utf8_lossy(&man.stdout)
            .contains("/usr/share/man/man8/mupilot-switch-check-config.8"),
        "{man:?}"
    );
    let log = helper.log();
    assert!(helper.stop(), "the helper did not stop on SIGTERM:\n{log}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The helper the stand-in `systemctl` started (a grandchild: found by its pid file).
struct Helper {
    pid: Option<nix::unistd::Pid>,
    log: PathBuf,
}

impl Helper {
    fn from_pidfile(p: &Path) -> Helper {
        let pid = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(nix::unistd::Pid::from_raw);
        Helper {
            pid,
            log: p.with_file_name("helper.log"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 15 s; whether it stopped on SIGTERM.
    fn stop(mut self) -> bool {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> bool {
        let Some(pid) = self.pid.take() else {
            return true;
        };
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            // The test process is a child subreaper, so the orphaned helper is its child.
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                Ok(WaitStatus::Exited(_, code)) => return code == 0,
                _ => return false,
            }
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
        false
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[test]
fn installing_as_documented_runs_payloads_as_their_owners() {
    // The helper is started by the guide's shell and outlives it: as a child subreaper the
    // test reaps it.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    // Its own thread: the mount namespace is per thread, and ends with it.
    let r = std::thread::spawn(run_guide).join();
    let _ = std::io::stderr().flush();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
