//! Live usage and `information` end to end, as root: VO server (mTLS, SQLite) -> pilot (an
//! unprivileged account) -> mupilot-switch (root) -> a payload burning CPU with memory held.
//! `mupilot-server status` shows its CPU and memory rising while it runs and the last values
//! after it ends; `mupilot-server info` brings the helper's view back to the owner, is refused
//! to another member, and says so when the pilot is gone. cgroup v1 here; the helper's v2
//! reading is tests/switch_usage.rs in the VM.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use support::{pilot_pid, Accounts, Stack, SERIAL};

/// 40 MB held in a shell variable, then a busy loop for `secs` seconds.
fn burner(secs: u32) -> String {
    format!(
        "a=$(head -c 40000000 /dev/zero | tr '\\0' x); end=$(( $(date +%s) + {secs} )); \
         while [ $(date +%s) -lt $end ]; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; done"
    )
}

fn submit(stack: &Stack, user: &str, script: &str) -> String {
    stack.submit(
        user,
        &[
            "--cores",
            "1",
            "--memory",
            "512M",
            "--walltime",
            "120",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the payload's status shows `ok` of its JSON.
fn wait_for(
    stack: &Stack,
    id: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = stack.status("alice", id);
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}\n{}", stack.logs());
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

#[test]
fn status_shows_rising_usage_and_info_reaches_the_helper_for_the_owner_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2u-pilot", "mpt-e2u-a", "mpt-e2u-b"]);
    let stack = Stack::start(
        "mpt-e2u-pilot",
        &[("alice", "mpt-e2u-a"), ("bob", "mpt-e2u-b")],
    );
    stack.pilot_option("heartbeat_seconds = 1");
    let id = submit(&stack, "alice", &burner(14));
    let _pilot = stack.spawn_pilot(&["--idle-timeout", "3"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(30));

    // Rising numbers while it runs, from its cgroup through helper, pilot and server.
    let first = wait_for(&stack, &id, "40 MB and CPU in the heartbeats", |st| {
        num(&st["memory_bytes_now"]) >= 40e6 && num(&st["cpu_seconds"]) > 0.3
    });
    assert!(num(&first["peak_memory_bytes"]) >= num(&first["memory_bytes_now"]));
    let second = wait_for(&stack, &id, "CPU rising", |st| {
        num(&st["cpu_seconds"]) >= num(&first["cpu_seconds"]) + 1.0
    });
    assert!(
        second["usage_at"].as_str() > first["usage_at"].as_str(),
        "{first}\n{second}"
    );
    // The text line shows them too.
    let out = stack.client("alice", "status", &[&id]);
    let line = text(&out);
    for key in ["\tcpu=", "\tmem=", "\tpeak=", "\tusage_at="] {
        assert!(line.contains(key), "{key} missing: {line}");
    }

    // bob is a member but neither the owner nor an operator: the server refuses.
    let out = stack.client("bob", "info", &[&id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("may not ask about"), "{}", text(&out));
    // alice asks; the answer comes back from the site's helper with her next heartbeat.
    let out = stack.client("alice", "info", &[&id, "--json"]);
    assert!(out.status.success(), "{}\n{}", text(&out), stack.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &v["answer"];
    assert_eq!(a["ok"], true, "{v}");
    let p = &a["payload"];
    assert_eq!(p["account"], "mpt-e2u-a");
    assert_eq!(p["uid"], Accounts::uid("mpt-e2u-a"));
    assert!(p["cgroup"].as_str().unwrap().ends_with(&id), "{p}");
    assert!(p["started_at"].is_string(), "{p}");
    assert!(p["processes"].as_u64().unwrap() >= 1, "{p}");
    assert!(
        num(&p["usage"]["cpu_seconds"]) >= num(&second["cpu_seconds"]),
        "{p}"
    );
    assert_eq!(v["requester"], "/DC=org/DC=mupilot-demo/CN=alice");
    // The text form names what an operator looks for.
    let out = stack.client("alice", "info", &[&id]);
    assert!(out.status.success(), "{}", text(&out));
    for key in [
        "account: mpt-e2u-a",
        "started: ",
        "cpu: ",
        "memory: ",
        "cgroup: ",
    ] {
        assert!(text(&out).contains(key), "{key}: {}", text(&out));
    }
    // The helper authorized it as an operator command naming alice.
    assert!(stack.helper_permitted(&id, "operator command information"));

    // After the end: the final CPU and peak, and the last memory heard, stay.
    let done = stack.wait_state("alice", &id, "done", Duration::from_secs(60));
    assert!(
        num(&done["cpu_seconds"]) >= num(&second["cpu_seconds"]),
        "{done}"
    );
    assert!(num(&done["peak_memory_bytes"]) >= 40e6, "{done}");
    // The last heartbeat may have been read as the payload was exiting (its memory already
    // given back): what stays is a value, not the 40 MB (seen once in a full run).
    assert!(num(&done["memory_bytes_now"]) > 0.0, "{done}");
    assert!(
        done["usage_at"].as_str() >= second["usage_at"].as_str(),
        "{done}"
    );
    let out = stack.client("alice", "info", &[&id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no pilot holds it"), "{}", text(&out));
}

/// The pilot is killed while an information request waits: the CLI says the pilot is gone
/// (its payload lost after the missed heartbeats) rather than wait out its time.
#[test]
fn info_says_so_when_the_pilot_is_gone() {
    use nix::sys::signal::{kill, Signal};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2u-pilot", "mpt-e2u-a"]);
    let mut stack = Stack::start("mpt-e2u-pilot", &[("alice", "mpt-e2u-a")]);
    stack.server_option("heartbeat_seconds = 1");
    stack.reconfigure_server();
    stack.pilot_option("heartbeat_seconds = 1");
    let id = submit(&stack, "alice", "sleep 60");
    let pilot = stack.spawn_pilot(&["--idle-timeout", "3"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(30));
    kill(pilot_pid(&pilot), Signal::SIGKILL).unwrap();
    let t = Instant::now();
    let out = stack.client("alice", "info", &[&id, "--wait", "60"]);
    let took = t.elapsed();
    assert!(!out.status.success());
    let msg = text(&out);
    // Asked before the server noticed (the usual case): the wait ends when it marks the
    // payload lost; asked after: refused at once.
    assert!(
        (msg.contains("is now lost") && msg.contains("is gone"))
            || (msg.contains("is lost") && msg.contains("no pilot holds it")),
        "{msg}\n{}",
        stack.logs()
    );
    assert!(took < Duration::from_secs(30), "{took:?}: {msg}");
}
