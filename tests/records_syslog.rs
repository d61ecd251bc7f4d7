//! The anchor really reaches syslog: run as root, the test re-runs itself in a private mount
//! namespace (`unshare --mount --propagation private`), mounts a tmpfs on /dev there, listens
//! on /dev/log as a syslog daemon would, anchors a log and checks the datagram: facility
//! authpriv, severity info, and the head that `verify --anchor` accepts. Nothing outside the
//! child's namespace changes.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use mupilot::records::{anchor, verify_files, ChainWriter, FsyncPolicy};

const CHILD_ENV: &str = "MUPILOT_REC_SYSLOG_CHILD";

#[test]
fn anchor_reaches_syslog_as_authpriv_info() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child();
    }
    assert!(nix::unistd::geteuid().is_root(), "this test runs as root");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(&exe)
        .args([
            "--exact",
            "anchor_reaches_syslog_as_authpriv_info",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("syslog anchor ok"),
        "child did not run:\n{text}"
    );
}

fn child() {
    use nix::mount::{mount, MsFlags};
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=1m,mode=755"),
    )
    .expect("tmpfs on /dev in the private mount namespace");
    let daemon = UnixDatagram::bind("/dev/log").unwrap();
    daemon
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Always).unwrap();
    for i in 0..3 {
        w.append(&serde_json::json!({"time": "2026-11-23T03:00:00Z", "event": "start", "i": i}))
            .unwrap();
    }
    let a = anchor::anchor(&mut w, "wn01").unwrap().unwrap();
    drop(w);

    let mut buf = [0u8; 2048];
    let n = daemon
        .recv(&mut buf)
        .expect("syslog(3) sent a datagram to /dev/log");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // <PRI> = facility * 8 + severity = LOG_AUTHPRIV (10 << 3) | LOG_INFO (6) = 86.
    assert!(msg.starts_with("<86>"), "{msg}");
    assert!(msg.contains(&anchor::anchor_message(&log, &a)), "{msg}");
    let parsed = anchor::parse_anchor_line(&msg).unwrap();
    assert_eq!(parsed, a);
    let r = verify_files(&[log], &[parsed], true).unwrap();
    assert!(r.intact(), "{r:?}");
    println!("syslog anchor ok: {msg}");
}
