//! Faults between the pilot and the VO server, injected for real (issue 16, items 2 and 3):
//! the real server killed by pid and restarted on the same port and data dir while payloads
//! end (30 s and 120 s down); a pilot that must leave before the server is back, and the next
//! pilot in its work dir delivering what it left (also after a SIGKILL); a pilot silenced with
//! SIGSTOP or killed with SIGKILL, whose payloads the server marks lost after the missed
//! heartbeats.
//! Runs as root: real accounts, the real helper, real TLS, real SQLite.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use support::{find_file, pilot_pid, processes_of, wait_exit, Accounts, Stack, SERIAL};

const PILOT: &str = "mpt-fs-pilot";
const USER: &str = "mpt-fs-a";

fn start() -> (Accounts, Stack) {
    let accounts = Accounts::create(&[PILOT, USER]);
    let stack = Stack::start(PILOT, &[("alice", USER)]);
    (accounts, stack)
}

/// A payload that runs `secs` seconds, then writes an output file and a line of stdout.
fn submit_short(stack: &Stack, secs: u32, tag: &str) -> String {
    let script = format!("sleep {secs}; echo {tag} > result.txt; echo stdout-{tag}");
    stack.submit(
        "alice",
        &[
            "--cores",
            "1",
            "--memory",
            "64M",
            "--walltime",
            "300",
            "--output",
            "result.txt",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
}

/// Every file below the pilot work dir's outbox (lock files left out).
fn outbox_files(stack: &Stack) -> Vec<String> {
    fn walk(d: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n != "lock") {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(&stack.vo.join("pilot-work").join("outbox"), &mut out);
    out.sort();
    out
}

/// The payload is done, and its output archive holds the file it wrote and its stdout.
fn assert_delivered(stack: &Stack, id: &str, tag: &str) {
    let st = stack.status("alice", id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
    assert_eq!(st["has_output"], true, "{st}");
    let out = stack.output("alice", id);
    let result = find_file(&out, "result.txt").expect("result.txt in the archive");
    assert_eq!(std::fs::read_to_string(result).unwrap().trim(), tag);
    let stdout = find_file(&out, "stdout").expect("stdout in the archive");
    assert_eq!(
        std::fs::read_to_string(stdout).unwrap().trim(),
        format!("stdout-{tag}")
    );
}

/// One outage: payloads run, the server is killed, they end while it is down (their final
/// states and archives wait in the outbox), the server comes back, everything arrives.
fn outage(stack: &mut Stack, down: Duration, tag: &str) {
    let ids: Vec<String> = (0..2)
        .map(|i| submit_short(stack, 5, &format!("{tag}{i}")))
        .collect();
    for id in &ids {
        stack.wait_state("alice", id, "running", Duration::from_secs(60));
    }
    let t0 = Instant::now();
    stack.kill_server();
    // The payloads end while the server is down: their entries reach the outbox.
    let want: Vec<String> = {
        let mut w: Vec<String> = ids
            .iter()
            .flat_map(|id| [format!("{id}.json"), format!("{id}.tar.gz")])
            .collect();
        w.sort();
        w
    };
    stack.wait_until("final states in the outbox", down, || {
        outbox_files(stack) == want
    });
    std::thread::sleep(down.saturating_sub(t0.elapsed()));
    stack.restart_server();
    let back = Instant::now();
    for id in &ids {
        stack.wait_state("alice", id, "done", Duration::from_secs(60));
    }
    eprintln!(
        "outage of {down:?}: every final state arrived {:.1} s after the server came back",
        back.elapsed().as_secs_f64()
    );
    for (i, id) in ids.iter().enumerate() {
        assert_delivered(stack, id, &format!("{tag}{i}"));
    }
    stack.wait_until("an empty outbox", Duration::from_secs(30), || {
        outbox_files(stack).is_empty()
    });
}

#[test]
fn final_states_and_outputs_survive_server_outages_of_30_and_120_s() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, mut stack) = start();
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "20"]);
    outage(&mut stack, Duration::from_secs(30), "a");
    outage(&mut stack, Duration::from_secs(120), "b");
    let st = wait_exit(&stack, &mut pilot, Duration::from_secs(120));
    assert!(st.success(), "pilot: {st}\n{}", stack.logs());
    let log = std::fs::read_to_string(&pilot.log).unwrap();
    assert!(log.contains("0 unsent"), "{log}");
    // The trace has an end record with upload ok for each of the four.
    let trace = Stack::records(&stack.trace_log());
    let ends: Vec<_> = trace.iter().filter(|r| r["event"] == "end").collect();
    assert_eq!(ends.len(), 4, "{trace:?}");
    assert!(ends.iter().all(|r| r["upload"] == "ok"), "{ends:?}");
}

#[test]
fn a_pilot_that_must_leave_hands_its_outbox_to_the_next_pilot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, mut stack) = start();
    stack.pilot_option("outbox_wait_seconds = 3");
    let id = submit_short(&stack, 2, "left");
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "2"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(60));
    stack.kill_server();
    // It ends, the pilot waits outbox_wait_seconds, then leaves saying what it left.
    let st = wait_exit(&stack, &mut pilot, Duration::from_secs(60));
    assert_eq!(st.code(), Some(1), "{}", stack.logs());
    let log = std::fs::read_to_string(&pilot.log).unwrap();
    assert!(log.contains("1 unsent"), "{log}");
    assert!(
        log.contains("leaving with final states the VO server has not taken"),
        "{log}"
    );
    let trace = Stack::records(&stack.trace_log());
    let end = trace
        .iter()
        .find(|r| r["event"] == "end" && r["payload_id"] == id.as_str())
        .expect("an end record");
    assert!(
        end["upload"].as_str().unwrap().starts_with("unsent:"),
        "{end}"
    );
    assert_eq!(end["state"], "done");
    assert_eq!(
        outbox_files(&stack),
        [format!("{id}.json"), format!("{id}.tar.gz")]
    );

    // The server comes back; the next pilot in the same work dir has no work of its own.
    stack.restart_server();
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "{}", stack.logs());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 adopted"), "{text}");
    assert_delivered(&stack, &id, "left");
    assert!(outbox_files(&stack).is_empty());
    let trace = Stack::records(&stack.trace_log());
    let delivered = trace
        .iter()
        .find(|r| r["event"] == "delivered" && r["payload_id"] == id.as_str())
        .expect("a delivered record");
    assert_eq!(delivered["upload"], "ok");
    assert_ne!(delivered["pilot_id"], end["pilot_id"]);
    let r = mupilot::records::verify_file(&stack.trace_log()).unwrap();
    assert!(r.first_break.is_none(), "{:?}", r.first_break);
}

fn silent_pilot_stack() -> (Accounts, Stack) {
    let (accounts, mut stack) = start();
    stack.server_option("heartbeat_seconds = 1");
    stack.server_option("missed_heartbeats = 3");
    stack.reconfigure_server();
    (accounts, stack)
}

#[test]
fn a_stopped_pilots_payload_is_lost_after_three_missed_heartbeats_then_its_late_report_wins() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, stack) = silent_pilot_stack();
    let id = submit_short(&stack, 12, "late");
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "2"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(60));
    let pid = pilot_pid(&pilot);
    kill(pid, Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let st = stack.wait_state("alice", &id, "lost", Duration::from_secs(30));
    let took = t0.elapsed();
    kill(pid, Signal::SIGCONT).unwrap();
    // runuser stops itself when its child stops (job control, like su): let it go on too.
    let runuser = nix::unistd::Pid::from_raw(pilot.child.id() as i32);
    kill(runuser, Signal::SIGCONT).unwrap();
    eprintln!("silent pilot: lost after {:.1} s", took.as_secs_f64());
    // 3 heartbeats of 1 s, swept every second (plus the last heartbeat's age).
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let reason = st["reason"].as_str().unwrap();
    assert!(reason.contains("3 missed heartbeats of 1 s"), "{reason}");
    // The pilot is alive after all: the payload ran on; its final report replaces the
    // server's verdict (the payload was never requeued, so it ran once).
    let st = stack.wait_state("alice", &id, "done", Duration::from_secs(60));
    assert!(
        st["reason"].as_str().unwrap().contains("reported late"),
        "{st}"
    );
    assert_delivered(&stack, &id, "late");
    assert!(wait_exit(&stack, &mut pilot, Duration::from_secs(60)).success());
}

#[test]
fn a_killed_pilots_payload_is_lost_and_stopped_never_requeued() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, stack) = silent_pilot_stack();
    let id = submit_short(&stack, 30, "killed");
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "2"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(60));
    kill(pilot_pid(&pilot), Signal::SIGKILL).unwrap();
    let _ = wait_exit(&stack, &mut pilot, Duration::from_secs(10));
    let st = stack.wait_state("alice", &id, "lost", Duration::from_secs(30));
    assert!(
        st["reason"].as_str().unwrap().contains("missed heartbeats"),
        "{st}"
    );
    // The helper stopped it with its pilot's connection: nothing of it runs anywhere.
    let uid = Accounts::uid(USER);
    stack.wait_until(
        "no process of the payload's account",
        Duration::from_secs(10),
        || processes_of(uid).is_empty(),
    );
    // Lost is final: it is not handed to the next pilot.
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "{}", stack.logs());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 launched"));
    assert_eq!(stack.status("alice", &id)["state"], "lost");
}

#[test]
fn a_crashed_pilots_outbox_is_delivered_by_the_next_pilot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_accounts, mut stack) = start();
    let id = submit_short(&stack, 2, "crash");
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "2"]);
    stack.wait_state("alice", &id, "running", Duration::from_secs(60));
    stack.kill_server();
    let want = [format!("{id}.json"), format!("{id}.tar.gz")];
    stack.wait_until(
        "the final state in the outbox",
        Duration::from_secs(30),
        || outbox_files(&stack) == want,
    );
    // The pilot dies with its final state undelivered: no goodbye, no end record.
    kill(pilot_pid(&pilot), Signal::SIGKILL).unwrap();
    let _ = wait_exit(&stack, &mut pilot, Duration::from_secs(10));
    stack.restart_server();
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "{}", stack.logs());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 adopted"));
    assert_delivered(&stack, &id, "crash");
    assert!(outbox_files(&stack).is_empty());
}
