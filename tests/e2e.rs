//! End to end, as root: VO server (mTLS, SQLite) -> pilot (an unprivileged account) ->
//! mupilot-switch (root) -> payloads under their owners' accounts -> records.

mod support;

use support::{find_file, processes_of, Accounts, Stack, SERIAL};

const RES: &[&str] = &["--cores", "1", "--memory", "128M", "--walltime", "60"];

fn submit(stack: &Stack, user: &str, extra: &[&str], argv: &[&str]) -> String {
    let mut args: Vec<&str> = RES.to_vec();
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(argv);
    stack.submit(user, &args)
}

#[test]
fn owners_run_as_their_own_accounts_and_unmapped_owner_is_denied() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2e-pilot", "mpt-e2e-a", "mpt-e2e-b"]);
    let stack = Stack::start(
        "mpt-e2e-pilot",
        &[("alice", "mpt-e2e-a"), ("bob", "mpt-e2e-b")],
    );
    let a = submit(
        &stack,
        "alice",
        &["--output", "uid.txt"],
        &["sh", "-c", "id -u > uid.txt; id -u"],
    );
    let b = submit(
        &stack,
        "bob",
        &["--output", "uid.txt"],
        &["sh", "-c", "id -u > uid.txt; id -u"],
    );
    let c = submit(
        &stack,
        "carol",
        &[],
        &["sh", "-c", "echo carol ran > /tmp/mupilot-e2e-carol-ran"],
    );

    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());

    for (user, id, account) in [("alice", &a, "mpt-e2e-a"), ("bob", &b, "mpt-e2e-b")] {
        let st = stack.status(user, id);
        assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
        assert_eq!(st["account"], account);
        let uid = Accounts::uid(account);
        assert_eq!(st["uid"], uid);
        let outdir = stack.output(user, id);
        let reported = find_file(&outdir, "uid.txt").expect("uid.txt in the output archive");
        assert_eq!(
            std::fs::read_to_string(reported).unwrap().trim(),
            uid.to_string()
        );
        let stdout = find_file(&outdir, "stdout").expect("stdout in the output archive");
        assert_eq!(
            std::fs::read_to_string(stdout).unwrap().trim(),
            uid.to_string()
        );
    }

    // carol: denied, never run, with the reason in the server status, the trace and the audit log.
    let st = stack.status("carol", &c);
    assert_eq!(st["state"], "denied", "{st}");
    assert_eq!(st["denial_class"], "authorization");
    let reason = st["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("mapping"), "{reason}");
    assert!(!std::path::Path::new("/tmp/mupilot-e2e-carol-ran").exists());
    let audit = Stack::records(&stack.audit_log());
    assert!(audit
        .iter()
        .any(|r| r["payload_id"] == c.as_str() && r["decision"] == "deny"));
    assert!(!audit
        .iter()
        .any(|r| r["payload_id"] == c.as_str() && r["event"] == "start"));
    let trace = Stack::records(&stack.trace_log());
    assert!(trace
        .iter()
        .any(|r| r["payload_id"] == c.as_str() && r["decision"] == "deny"));

    // Both logs are intact hash chains.
    for log in [stack.audit_log(), stack.trace_log()] {
        let r = mupilot::records::verify_file(&log).unwrap();
        assert!(r.first_break.is_none(), "{log:?}: {:?}", r.first_break);
    }
}

#[test]
fn payloads_cannot_see_each_other_and_daemons_die_with_their_payload() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2e-pilot", "mpt-e2e-a", "mpt-e2e-b"]);
    let stack = Stack::start(
        "mpt-e2e-pilot",
        &[("alice", "mpt-e2e-a"), ("bob", "mpt-e2e-b")],
    );
    // B runs for a while with a secret in its scratch and leaves a daemon behind.
    let b = submit(
        &stack,
        "bob",
        &[],
        &[
            "sh",
            "-c",
            "echo secret > secret.txt; (setsid sh -c 'echo $$ > /tmp/daemon.pid; exec sleep 1000' &); \
             sleep 4; cat /tmp/daemon.pid",
        ],
    );
    // A looks for B's scratch directory, B's files and B's processes.
    let probe = format!(
        "sleep 1; ls -d ../{b} 2>&1; cat ../{b}/secret.txt 2>&1; ls .. 2>&1; \
         ps -e -o user= 2>/dev/null | sort -u; ls /proc | grep -c '^[0-9]'"
    );
    let a = submit(&stack, "alice", &[], &["sh", "-c", &probe]);
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());

    let st_a = stack.status("alice", &a);
    assert_eq!(st_a["state"], "done", "{st_a}\n{}", stack.logs());
    let out_a = stack.output("alice", &a);
    let text = std::fs::read_to_string(find_file(&out_a, "stdout").unwrap()).unwrap();
    assert!(
        !text.lines().any(|l| l.trim() == "secret"),
        "A read B's secret:\n{text}"
    );
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(!text.contains("mpt-e2e-b"), "A saw B's processes:\n{text}");
    assert!(
        text.contains(&format!("cannot access '../{b}'")),
        "A saw B's scratch:\n{text}"
    );
    assert!(
        text.contains("cannot open directory '..'"),
        "A listed the scratch root:\n{text}"
    );

    let st_b = stack.status("bob", &b);
    assert_eq!(st_b["state"], "done", "{st_b}");
    // The daemon B left behind is gone: no process of B's account remains.
    let uid_b = Accounts::uid("mpt-e2e-b");
    assert!(
        processes_of(uid_b).is_empty(),
        "processes of B's account survived: {:?}",
        processes_of(uid_b)
    );
}

/// VO-wide job management through the whole stack: the owner cancels and signals running
/// payloads through the VO server; the commands reach the helper signed by the VO and are
/// carried out there; another member may not touch them.
#[test]
fn owner_cancels_and_signals_running_payloads_through_the_vo_server() {
    use std::time::Duration;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2e-pilot", "mpt-e2e-a", "mpt-e2e-b"]);
    let stack = Stack::start(
        "mpt-e2e-pilot",
        &[("alice", "mpt-e2e-a"), ("bob", "mpt-e2e-b")],
    );
    stack.pilot_option("heartbeat_seconds = 1");
    stack.pilot_option("grace_seconds = 2");
    let sleeper = submit(&stack, "alice", &[], &["sleep", "50"]);
    let trapper = submit(
        &stack,
        "alice",
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo got USR1; exit 7' USR1; while :; do sleep 0.2; done",
        ],
    );
    let _pilot = stack.spawn_pilot(&["--idle-timeout", "3"]);
    stack.wait_state("alice", &sleeper, "running", Duration::from_secs(30));
    stack.wait_state("alice", &trapper, "running", Duration::from_secs(30));

    // bob is a member, but not the owner: the server refuses.
    let out = stack.client("bob", "cancel", &[&sleeper]);
    assert!(!out.status.success(), "bob cancelled alice's payload");
    // alice signals one and cancels the other.
    let out = stack.client("alice", "signal", &[&trapper, "--signal", "10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = stack.client("alice", "cancel", &[&sleeper]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let st = stack.wait_state("alice", &trapper, "failed", Duration::from_secs(30));
    assert_eq!(st["exit_code"], 7, "{st}");
    let st = stack.wait_state("alice", &sleeper, "cancelled", Duration::from_secs(30));
    assert!(
        st["reason"].as_str().unwrap_or("").contains("alice"),
        "{st}"
    );
    // The helper authorized both as operator commands naming alice.
    for id in [&sleeper, &trapper] {
        assert!(
            stack.helper_permitted(id, "operator command"),
            "no operator command record for {id}"
        );
    }
}

/// A payload attacks output collection: a declared directory holding a symlink to
/// /etc/shadow, a symlink loop, a symlink to /, a FIFO and a 1 TiB sparse file, plus a
/// declared symlink and a declared output that does not exist. The directory's files arrive;
/// nothing a symlink points to does; every skipped entry is shown with its reason by
/// `mupilot-server status` (text and JSON).
#[test]
fn output_directories_arrive_and_skipped_outputs_are_shown_with_the_reason() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-e2o-pilot", "mpt-e2o-a"]);
    let stack = Stack::start("mpt-e2o-pilot", &[("alice", "mpt-e2o-a")]);
    let script = "mkdir -p res/sub/deep && echo a > res/a.txt && echo b > res/sub/deep/b.txt \
         && ln -s /etc/shadow res/shadow && ln -s loop res/loop && ln -s / res/sub/root \
         && mkfifo res/fifo && truncate -s 1T res/sparse \
         && echo top > top.txt && ln -s /etc/shadow shadow-top";
    let id = submit(
        &stack,
        "alice",
        &[
            "--output",
            "res",
            "--output",
            "top.txt",
            "--output",
            "shadow-top",
            "--output",
            "missing.txt",
        ],
        &["sh", "-c", script],
    );
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());
    let st = stack.status("alice", &id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());

    let outdir = stack.output("alice", &id);
    let got = |rel: &str| std::fs::read_to_string(outdir.join("outputs").join(rel)).ok();
    assert_eq!(
        got("res/a.txt").as_deref(),
        Some("a\n"),
        "{}",
        outdir.display()
    );
    assert_eq!(got("res/sub/deep/b.txt").as_deref(), Some("b\n"));
    assert_eq!(got("top.txt").as_deref(), Some("top\n"));
    for absent in [
        "res/shadow",
        "res/loop",
        "res/sub/root",
        "res/fifo",
        "res/sparse",
        "shadow-top",
    ] {
        assert!(
            std::fs::symlink_metadata(outdir.join("outputs").join(absent)).is_err(),
            "{absent} must not be in the archive"
        );
    }

    let skipped: Vec<String> = st["outputs_skipped"]
        .as_array()
        .unwrap_or_else(|| panic!("{st}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    for want in [
        "res/shadow: symbolic link, not followed",
        "res/loop: symbolic link, not followed",
        "res/sub/root: symbolic link, not followed",
        "res/fifo: a FIFO, not copied",
        "res/sparse: 1099511627776 bytes would exceed the output limit",
        "shadow-top: symbolic link, not followed",
        "missing.txt: missing",
    ] {
        assert!(
            skipped.iter().any(|s| s.starts_with(want)),
            "{want:?} not in {skipped:?}"
        );
    }
    assert_eq!(skipped.len(), 7, "{skipped:?}");
    let text = stack.client("alice", "status", &[&id]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("output skipped: res/fifo: a FIFO, not copied"),
        "{text}"
    );
    assert!(
        text.contains("output skipped: missing.txt: missing"),
        "{text}"
    );
}
