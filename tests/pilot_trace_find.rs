//! `mupilot trace ...` finds the trace log without flags when run as the pilot account:
//! `$MUPILOT_WORK/trace.jsonl`, else the account's default work directories
//! (`$TMPDIR/mupilot-<pilot_id>/trace.jsonl`); `show ID` searches every one of them, other
//! commands refuse to guess between several. Runs the real binary as an unprivileged account
//! (`nobody`), with logs written by the records' chain writer.

mod pilot_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use mupilot::records::{ChainWriter, FsyncPolicy};
use serde_json::json;

const NOBODY: u32 = 65534;

/// A trace log of one payload in `dir/trace.jsonl`, owned by `uid`.
fn trace_log(dir: &Path, payload: &str, uid: u32) {
    std::fs::create_dir(dir).unwrap();
    let log = dir.join("trace.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
    for event in ["fetched", "started", "exited"] {
        w.append(
            &json!({"time": "2026-11-23T03:05:12.000000Z", "event": event, "payload_id": payload}),
        )
        .unwrap();
    }
    drop(w);
    for p in [dir, log.as_path()] {
        std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    }
}

/// `mupilot trace ARGS` as nobody with TMPDIR=`tmp` and the given MUPILOT_WORK.
fn trace(tmp: &Path, work: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ])
    .arg(env!("CARGO_BIN_EXE_mupilot"))
    .arg("trace")
    .args(args)
    .env("TMPDIR", tmp)
    .env_remove("MUPILOT_WORK")
    .current_dir("/");
    if let Some(w) = work {
        c.env("MUPILOT_WORK", w);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn trace_commands_find_the_pilot_accounts_logs() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let t = tmp.path();

    let (code, _, err) = trace(t, None, &["show", "p-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no trace log of this account") && err.contains("MUPILOT_WORK"),
        "{err}"
    );

    // One pilot ran with the default work_dir: every command finds its log.
    trace_log(&t.join("mupilot-wn17-4711"), "p-1", NOBODY);
    let (code, out, err) = trace(t, None, &["show", "p-1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("\"payload_id\": \"p-1\"").count(), 3, "{out}");
    let (code, out, err) = trace(t, None, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");

    // A second pilot of the account, and one of another account (root) that must be ignored.
    trace_log(&t.join("mupilot-wn17-4712"), "p-2", NOBODY);
    trace_log(&t.join("mupilot-wn17-9999"), "p-root", 0);
    let (code, out, err) = trace(t, None, &["show", "p-2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"payload_id\": \"p-2\"") && !out.contains("p-1"),
        "{out}"
    );
    let (code, out, _) = trace(t, None, &["show", "p-root"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no records of payload p-root in") && !out.contains("9999"),
        "{out}"
    );
    let (code, _, err) = trace(t, None, &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("several pilots' trace logs")
            && err.contains("mupilot-wn17-4711/trace.jsonl")
            && err.contains("mupilot-wn17-4712/trace.jsonl")
            && err.contains("--log FILE"),
        "{err}"
    );

    // MUPILOT_WORK names the work directory: its log, and only it.
    let (code, out, err) = trace(t, Some(&t.join("mupilot-wn17-4712")), &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("p-2") && !out.contains("p-1"), "{out}");
    let (code, out, _) = trace(t, Some(&t.join("mupilot-wn17-4712")), &["show", "p-1"]);
    assert_eq!(code, 1, "{out}");
    // --log still wins.
    let log = t.join("mupilot-wn17-4711/trace.jsonl");
    let (code, out, err) = trace(
        t,
        Some(&t.join("mupilot-wn17-4712")),
        &["show", "p-1", "--log", log.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn mupilot_work_is_the_pilots_default_work_dir() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pilot_support::pki(dir.path());
    let missing = dir.path().join("no-helper.sock");
    let cfg = pilot_support::pilot_toml(dir.path(), &pki, "https://127.0.0.1:9", &missing, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("work_dir = \"work\"\n", "")).unwrap();
    let work = dir.path().join("from-env");
    let out = Command::new(env!("CARGO_BIN_EXE_mupilot"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("MUPILOT_WORK", &work)
        .output()
        .unwrap();
    // No helper on this socket: the pilot stops (exit 4) after opening its trace log.
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(work.join("trace.jsonl").is_file(), "{out:?}");
    assert!(!dir.path().join("work").exists());
}
