//! End to end, as root: a VO manager suspends a member whose payload runs under the member's
//! account on a worker node; the cancel travels the signed-command path (VO server -> pilot
//! -> mupilot-switch) and the payload's processes are gone. Real accounts, real helper, real
//! pilot, the VO server on SQLite.

mod support;

use std::time::{Duration, Instant};

use support::{processes_of, Accounts, Stack, SERIAL};

const DC: &str = "/DC=org/DC=mupilot-demo/CN=";

#[test]
fn suspension_cancels_a_running_payload_through_the_helper() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-ms-pilot", "mpt-ms-a"]);
    let mut stack = Stack::start("mpt-ms-pilot", &[("alice", "mpt-ms-a")]);
    let config = stack.vo.join("server.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!("\n[membership]\nmanager_dns = [\"{DC}bob\"]\n"));
    std::fs::write(&config, toml).unwrap();
    stack.reconfigure_server();
    stack.pilot_option("heartbeat_seconds = 1");
    stack.pilot_option("grace_seconds = 2");

    let id = stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "128M",
            "--walltime",
            "300",
            "--",
            "sleep",
            "300",
        ],
    );
    let _pilot = stack.spawn_pilot(&["--idle-timeout", "3"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(30));
    let uid = Accounts::uid("mpt-ms-a");
    assert!(
        !processes_of(uid).is_empty(),
        "the payload runs as mpt-ms-a"
    );

    let out = stack.client_in(
        "bob",
        &["membership", "suspend"],
        &[
            &format!("{DC}alice"),
            "--reason",
            "compromised credential reported by Grid security",
            "--verification",
            "evidence reviewed with the security officer",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("payload {id}: cancel sent")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let st = stack.wait_state("alice", &id, "cancelled", Duration::from_secs(30));
    assert!(st["reason"].as_str().unwrap_or("").contains("bob"), "{st}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_of(uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "payload processes left: {:?}\n{}",
            processes_of(uid),
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The helper authorized the cancel as an operator command from the manager.
    assert!(
        stack.helper_permitted(&id, "operator command"),
        "no operator command record for {id}: {:#?}",
        Stack::records(&stack.audit_log())
    );
    // A suspended member submits nothing more.
    let out = stack.client("alice", "submit", &["--", "/bin/true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an active member"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
