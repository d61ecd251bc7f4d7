//! The stage without its helper (run as root): when the helper's end of the socket closes
//! (the helper died), the stage kills the payload and removes its scratch and cgroup; when the
//! stage itself is killed, the payload dies with it.

mod sandbox_support;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mupilot::switch::sandbox::cgroup::{Cgroup, Limits};
use sandbox_support::{ScratchRoot, TestUser, Tun};

fn alive(pid: i32, cmdline: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c == cmdline)
        .unwrap_or(false)
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Plays the helper by hand: scratch, stage with a raw plan, the payload cgroup created while
/// the stage waits at the cgroup gate.
/// Returns the socket, the stage child, the payload's host pid, the cgroup and the scratch dir.
fn start(
    tag: &str,
    u: &TestUser,
    root: &ScratchRoot,
    network: &str,
) -> (
    UnixStream,
    std::process::Child,
    i32,
    Cgroup,
    std::path::PathBuf,
) {
    let name = format!("mupilot-test-sbx-{tag}-{}", std::process::id());
    let pilot =
        mupilot::switch::sandbox::cgroup::PilotCgroups::read(std::process::id() as i32).unwrap();
    let located = Cgroup::locate(&pilot, &name).unwrap();
    let cg = located.cgroup().clone();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&root.0)
        .unwrap();
    std::fs::set_permissions(&root.0, std::fs::Permissions::from_mode(0o711)).unwrap();
    let scratch = root.0.join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .unwrap();
    std::os::unix::fs::chown(&scratch, Some(u.account.uid), Some(u.account.gid)).unwrap();
    let plan = serde_json::json!({
        "msg": "plan",
        "payload_id": name,
        "account": u.account,
        "argv": ["sleep", "77"],
        "env": [["PATH", "/usr/bin:/bin"]],
        "cgroup": located,
        "scratch_root": root.0,
        "scratch": scratch,
        "nofile": 64,
        "core_bytes": 0,
        "allow_user_namespaces": true,
        "bundle": false,
    });
    let (ours, theirs) = UnixStream::pair().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mupilot-switch"))
        .args([
            "stage",
            "--network",
            network,
            "--landlock",
            "no",
            "--tmp-size-bytes",
            "1048576",
        ])
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The plan with the exec and cgroup gates; the cgroup gate opens once the cgroup is made,
    // the exec gate at once (there is no start record to wait for).
    let (exec_wait, exec_open) = nix::unistd::pipe().unwrap();
    let (cgroup_wait, cgroup_open) = nix::unistd::pipe().unwrap();
    let mut channel = ours.try_clone().unwrap();
    // A wake-up first, as the helper sends one when a launch request arrives.
    mupilot::protocol::switch_wire::write_frame(
        &mut channel,
        &serde_json::json!({"msg": "wake"}),
        &[],
    )
    .unwrap();
    mupilot::protocol::switch_wire::write_frame(
        &mut channel,
        &plan,
        &[exec_wait.as_raw_fd(), cgroup_wait.as_raw_fd()],
    )
    .unwrap();
    located
        .clone()
        .create(Limits {
            memory_bytes: 128 << 20,
            cores: 1,
            pids_max: 64,
        })
        .unwrap();
    std::fs::File::from(cgroup_open).write_all(b"g").unwrap();
    std::fs::File::from(exec_open).write_all(b"g").unwrap();
    // The stage answers in the same framing (src/switch/sandbox/wire.rs).
    let (ev, _) =
        mupilot::protocol::switch_wire::read_frame::<serde_json::Value>(&mut channel).unwrap();
    assert_eq!(ev["msg"], "started", "{ev}");
    let pid = ev["pid"].as_i64().unwrap() as i32;
    // `started` may come while the exec is still setting up the new image's arguments.
    assert!(
        wait_until(|| alive(pid, b"sleep\x0077\x00")),
        "payload runs"
    );
    (ours, child, pid, cg, scratch)
}

#[test]
fn helper_gone_kills_and_cleans_up() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("orphan");
    let (sock, mut child, pid, cg, scratch) = start("orphan", &u, &root, "host");
    drop(sock);
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!alive(pid, b"sleep\x0077\x00"), "payload killed");
    assert!(!scratch.exists(), "scratch removed");
    assert!(
        wait_until(|| cg.procs_files().iter().all(|f| !f.exists())),
        "cgroup removed"
    );
}

#[test]
fn stage_killed_takes_the_payload_along() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("stagekill");
    let (_sock, mut child, pid, cg, scratch) = start("stagekill", &u, &root, "host");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(|| !alive(pid, b"sleep\x0077\x00")),
        "payload died with the stage"
    );
    assert!(wait_until(|| cg.pids().is_empty()));
    // The helper would clean up after a lost stage; here the test does.
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(cg.remove());
}

/// Processes (host pids) whose real uid is `uid`, with their names.
fn processes_of(uid: u32) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let real: u32 = st
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let name = st.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
            (real == uid).then(|| (pid, name.to_owned()))
        })
        .collect()
}

#[test]
fn helper_gone_takes_the_payloads_pasta_along() {
    // network = "pasta": pasta runs in the payload's cgroup and pid namespace as its account;
    // when the helper dies the stage's kill(-1) ends it with the payload, and nothing of the
    // account is left on the node (pasta would otherwise keep the namespace alive).
    let _tun = Tun::get();
    let u = TestUser::get("mpt-sbx-net-orphan");
    let root = ScratchRoot::new("orphan-pasta");
    let (sock, mut child, pid, cg, scratch) = start("orphan-pasta", &u, &root, "pasta");
    let before = processes_of(u.account.uid);
    assert!(
        before
            .iter()
            .any(|(_, n)| n.starts_with("pasta") || n.starts_with("passt")),
        "pasta runs as the account: {before:?}"
    );
    drop(sock);
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!alive(pid, b"sleep\x0077\x00"), "payload killed");
    assert!(
        wait_until(|| processes_of(u.account.uid).is_empty()),
        "left behind: {:?}",
        processes_of(u.account.uid)
    );
    assert!(!scratch.exists(), "scratch removed");
    assert!(
        wait_until(|| cg.procs_files().iter().all(|f| !f.exists())),
        "cgroup removed"
    );
}
