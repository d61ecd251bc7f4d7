//! A full disk under the audit log and the pilot's trace log, for real: each log on a 64 KiB
//! tmpfs mounted by the test (unmounted after), filled with dd, freed with rm. A failed write
//! never leaves a fragment a later record continues (cut back, or held back until it can be
//! cut), records that could not be written wait in memory and are written in order when space
//! returns, and verification stays intact: a full disk is never tampering.

mod server_support;
mod support;
mod switch_support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mupilot::protocol::switch_wire::SwitchEvent;
use mupilot::records::{
    read_records, verify_file, Appended, ChainWriter, FsyncPolicy, Keep, KeepLimits,
};
use serde_json::{json, Value};

/// A tmpfs of 64 KiB at `dir`, unmounted (and its files gone) on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, owner: Option<u32>) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let mut opts = "size=64k,mode=0755".to_string();
        if let Some(uid) = owner {
            opts.push_str(&format!(",uid={uid}"));
        }
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }

    /// Fills every free byte with dd (which stops at ENOSPC).
    fn fill(&self) {
        let out = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", self.dir.join("fill").display()))
            .arg("bs=4k")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No space left"), "dd: {err}");
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("fill")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let log = self.dir.join("audit.jsonl");
        if log.exists() {
            let _ = Command::new("chattr").arg("-a").arg(log).status();
        }
        let st = Command::new("umount").arg(&self.dir).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "umount {}",
            self.dir.display()
        );
    }
}

fn chattr(flag: &str, p: &Path) {
    let st = Command::new("chattr").arg(flag).arg(p).status().unwrap();
    assert!(st.success(), "chattr {flag} {}", p.display());
}

fn record(i: u64, event: &str) -> Value {
    // About as long as a real audit record.
    json!({"time": mupilot::records::now_rfc3339(), "event": event, "payload_id": format!("p{i:04}"),
           "owner_dn": "/DC=org/DC=mupilot-test/CN=full disk", "padding": "x".repeat(600)})
}

fn ends_with_newline(p: &Path) -> bool {
    std::fs::read(p).unwrap().last() == Some(&b'\n')
}

#[test]
fn writer_cuts_off_failed_writes_keeps_records_and_writes_them_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), None);
    let log = disk.dir.join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Always)
        .unwrap()
        .with_keep_limits(KeepLimits { max_bytes: 8 << 10 });
    for i in 0..5 {
        w.append(&record(i, "start")).unwrap();
    }
    disk.fill();
    // Records fit into the room left in the file's last page, until one does not: that write
    // is a short one (part of it fits), and the writer cuts it back.
    let mut i = 5;
    let (good, e) = loop {
        let before = std::fs::metadata(&log).unwrap().len();
        match w
            .append_or_keep(&record(i, "end"), Keep::Essential)
            .unwrap()
        {
            Appended::Written(_) => i += 1,
            Appended::Kept(e) => break (before, e),
            other => panic!("expected the record kept, got {other:?}"),
        }
    };
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_ne!(
        good % 4096,
        0,
        "the last page had room: the write was a short one"
    );
    let first_kept = i;
    assert_eq!(std::fs::metadata(&log).unwrap().len(), good);
    assert!(ends_with_newline(&log));
    // A start record (no keeping) fails and is not kept; later records queue behind the first.
    assert!(w.append(&record(100, "start")).is_err());
    for i in first_kept + 1..first_kept + 24 {
        let keep = if i % 2 == 0 {
            Keep::Essential
        } else {
            Keep::BestEffort
        };
        let _ = w.append_or_keep(&record(i, if i % 2 == 0 { "end" } else { "denied" }), keep);
    }
    let kept = w.kept();
    assert!(kept > 5 && kept < 24, "kept {kept} of 24 in 8 KiB");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), good);
    let r = verify_file(&log).unwrap();
    assert_eq!(
        (r.first_break, r.torn_tail, r.records),
        (None, None, first_kept)
    );

    disk.free();
    w.write_kept().unwrap();
    assert_eq!(w.kept(), 0);
    drop(w);
    let r = verify_file(&log).unwrap();
    assert_eq!((&r.first_break, r.torn_tail), (&None, None), "{r:?}");
    let recs = read_records(&log).unwrap();
    // The kept records, then the `write_failed` record that tells about them.
    assert_eq!(recs.len(), first_kept as usize + kept + 1);
    let note = recs.last().unwrap();
    assert_eq!(note["event"], "write_failed");
    assert_eq!(note["kept"], kept);
    let dropped = note["dropped"].as_u64().unwrap();
    assert_eq!(kept as u64 + dropped, 24, "{note}");
    assert!(
        note["dropped_events"]["denied"].as_u64().unwrap() > 0,
        "{note}"
    );
    assert!(note["error"].as_str().unwrap().contains("No space left"));
    // The kept records follow, in the order they were made, the first failed one first.
    let ids: Vec<u64> = recs[first_kept as usize..recs.len() - 1]
        .iter()
        .map(|r| r["payload_id"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    assert_eq!(ids[0], first_kept);
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "{ids:?}");
    // Best-effort records (denials) use only half of the backlog: ends were kept after
    // denials no longer were.
    let kept_ends = ids.iter().filter(|i| *i % 2 == 0).count();
    let kept_denials = ids.len() - kept_ends;
    assert!(kept_denials <= 5, "{ids:?}");
    assert!(kept_ends >= kept_denials + 4, "{ids:?}");
}

#[test]
fn a_fragment_that_cannot_be_cut_off_holds_back_every_write_until_it_can() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), None);
    let log = disk.dir.join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Always).unwrap();
    for i in 0..3 {
        w.append(&record(i, "start")).unwrap();
    }
    disk.fill();
    // Append-only: the short write's fragment stays, the truncate fails (EPERM).
    chattr("+a", &log);
    let mut i = 3;
    let good = loop {
        let before = std::fs::metadata(&log).unwrap().len();
        match w
            .append_or_keep(&record(i, "end"), Keep::Essential)
            .unwrap()
        {
            Appended::Written(_) => i += 1,
            Appended::Kept(_) => break before,
            other => panic!("expected the record kept, got {other:?}"),
        }
    };
    let torn_line = i + 1;
    let torn_size = std::fs::metadata(&log).unwrap().len();
    assert!(torn_size > good && !ends_with_newline(&log));
    // Verify calls it a torn last line, not tampering.
    let r = verify_file(&log).unwrap();
    assert_eq!(
        (r.first_break, r.torn_tail, r.records),
        (None, Some(torn_line), i)
    );
    // Space returns, but the fragment still cannot be cut: nothing is written after it.
    disk.free();
    assert!(w.write_kept().is_err());
    assert!(matches!(
        w.append_or_keep(&record(99, "end"), Keep::Essential)
            .unwrap(),
        Appended::Kept(_)
    ));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), torn_size);
    // The writer goes away with the records unwritten (they are logged whole), and a new one
    // opens the log while the fragment still cannot be removed: it holds back too.
    assert_eq!(w.finish(), 2);
    drop(w);
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Always).unwrap();
    assert_eq!(w.torn_tail(), Some(torn_line));
    assert!(w.append(&record(98, "start")).is_err());
    assert_eq!(std::fs::metadata(&log).unwrap().len(), torn_size);
    chattr("-a", &log);
    w.append(&record(97, "start")).unwrap();
    drop(w);
    let r = verify_file(&log).unwrap();
    assert_eq!((&r.first_break, r.torn_tail), (&None, None), "{r:?}");
    let events: Vec<String> = read_records(&log)
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    // The fragment is replaced by a `torn` record, then what failed is told, then the chain
    // goes on (the records the first writer logged as unwritten are in its log only).
    assert_eq!(
        &events[i as usize..],
        ["torn", "write_failed", "start"],
        "{events:?}"
    );
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every payload has at least one start record, and each start is followed by its end before
/// the next start (a payload handed back and run again has two of each).
fn assert_every_start_has_its_end(recs: &[Value], ids: &[String]) {
    for id in ids {
        let of: Vec<&str> = recs
            .iter()
            .filter(|r| r["payload_id"] == id.as_str())
            .map(|r| r["event"].as_str().unwrap())
            .filter(|e| *e == "start" || *e == "end")
            .collect();
        assert!(!of.is_empty(), "{id}: no records");
        assert_eq!(of.len() % 2, 0, "{id}: {of:?}");
        for pair in of.chunks(2) {
            assert_eq!(pair, ["start", "end"], "{id}: {of:?}");
        }
    }
}

/// Every start has its end, and a `write_failed` record tells that at least `kept` records
/// were written late; returns it.
fn assert_complete_after_a_failure<'a>(recs: &'a [Value], ids: &[String], kept: u64) -> &'a Value {
    assert_every_start_has_its_end(recs, ids);
    let note = recs
        .iter()
        .find(|r| r["event"] == "write_failed")
        .expect("a write_failed record");
    assert!(note["kept"].as_u64().unwrap() >= kept, "{note}");
    note
}

/// On a full disk, start records still fit into the room left in the log's last page until
/// one does not: launches `sleep 2` (adding the started ones to `ids`) until one is refused
/// because its start record cannot be written; returns the refused one, which never ran.
fn launch_until_refused(
    site: &switch_support::Site,
    c: &mut switch_support::Client,
    ids: &mut Vec<String>,
) -> mupilot::protocol::envelope::EnvelopeBody {
    loop {
        let body = site.body(switch_support::DN_ALICE, &["/bin/sleep", "2"]);
        match c.launch(&site.sign(&body), None) {
            SwitchEvent::Started { .. } => ids.push(body.payload_id.clone()),
            SwitchEvent::Denied { class, reason, .. } => {
                assert_eq!(class, mupilot::protocol::switch_wire::DenialClass::System);
                assert!(reason.contains("No space left"), "{reason}");
                return body;
            }
            other => panic!("expected started or denied, got {other:?}"),
        }
        assert!(ids.len() < 10, "the disk never filled");
    }
}

#[test]
fn helper_on_a_full_audit_disk_refuses_launches_and_writes_kept_records_when_space_returns() {
    use switch_support::*;
    let _users = Users::acquire();
    let site = Site::new();
    let disk = SmallDisk::mount(&site.path("log"), None);
    let daemon = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());

    // Two payloads start while there is space; the disk fills while they run.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = site.body(DN_ALICE, &["/bin/sleep", "2"]);
        ids.push(body.payload_id.clone());
        match c.launch(&site.sign(&body), None) {
            SwitchEvent::Started { .. } => {}
            other => panic!("expected started, got {other:?}"),
        }
    }
    let during = chrono::Utc::now();
    disk.fill();
    let refused = launch_until_refused(&site, &mut c, &mut ids);
    let size_full = std::fs::metadata(&site.audit).unwrap().len();
    // Both end; their end records wait in memory.
    let mut exited = 0;
    while exited < ids.len() {
        if let SwitchEvent::Exited { .. } = c.recv() {
            exited += 1;
        }
    }
    assert_eq!(std::fs::metadata(&site.audit).unwrap().len(), size_full);
    assert!(ends_with_newline(&site.audit));
    let (code, text) = cli(&["audit", "verify", "--log", site.audit.to_str().unwrap()]);
    assert_eq!(code, 0, "a full disk is not tampering: {text}");

    // Space returns: the retry thread writes them, in order, without another launch.
    disk.free();
    let freed = Instant::now();
    wait_until("the kept end records", Duration::from_secs(10), || {
        ids.iter()
            .all(|id| site.records_of(id).iter().any(|r| r["event"] == "end"))
    });
    eprintln!(
        "kept audit records written {:?} after space returned",
        freed.elapsed()
    );
    // And launches work again.
    for _ in 0..2 {
        let body = site.body(DN_ALICE, &["/bin/true"]);
        ids.push(body.payload_id.clone());
        match c.launch(&site.sign(&body), None) {
            SwitchEvent::Started { .. } => {}
            other => panic!("expected started, got {other:?}"),
        }
        loop {
            if let SwitchEvent::Exited { .. } = c.recv() {
                break;
            }
        }
    }
    drop(c);
    daemon.stop();

    let recs = site.records();
    let note = assert_complete_after_a_failure(&recs, &ids, 2);
    assert_eq!(note["dropped"], 0);
    let denial: Vec<&Value> = recs
        .iter()
        .filter(|r| r["payload_id"] == refused.payload_id.as_str())
        .collect();
    assert_eq!(denial.len(), 1, "{denial:?}");
    assert_eq!(denial[0]["event"], "denied");
    let (code, text) = cli(&["audit", "verify", "--log", site.audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("torn"), "{text}");
    // `who`: the first two sleepers held the account while the disk was full; nobody now.
    let at = during.to_rfc3339();
    let log = site.audit.to_str().unwrap().to_string();
    let (code, text) = cli(&[
        "audit",
        "who",
        "--account",
        ACCT,
        "--at",
        &at,
        "--log",
        &log,
    ]);
    assert_eq!(code, 0, "{text}");
    for id in &ids[..2] {
        assert!(text.contains(id.as_str()), "{id} in {text}");
    }
    let now = chrono::Utc::now().to_rfc3339();
    let (code, text) = cli(&[
        "audit",
        "who",
        "--account",
        ACCT,
        "--at",
        &now,
        "--log",
        &log,
    ]);
    assert_eq!(code, 1, "nobody holds it now: {text}");
    drop(disk);
}

#[test]
fn pilot_on_a_full_trace_disk_keeps_its_records_and_resumes_when_space_returns() {
    use support::{Accounts, Stack, SERIAL};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _accounts = Accounts::create(&["mpt-rfd-pilot", "mpt-rfd-a"]);
    let stack = Stack::start("mpt-rfd-pilot", &[("alice", "mpt-rfd-a")]);
    let pilot_uid = Accounts::uid("mpt-rfd-pilot");
    let disk = SmallDisk::mount(&stack.dir.path().join("trace-disk"), Some(pilot_uid));
    let trace = disk.dir.join("trace.jsonl");
    stack.pilot_option(&format!("trace_log = \"{}\"", trace.display()));
    let res = ["--cores", "1", "--memory", "64M", "--walltime", "60", "--"];
    let submit = |argv: &[&str]| {
        let mut a: Vec<&str> = res.to_vec();
        a.extend_from_slice(argv);
        stack.submit("alice", &a)
    };
    let ids: Vec<String> = (0..8).map(|_| submit(&["sleep", "1"])).collect();
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "12"]);
    stack.wait_state("alice", &ids[0], "running", Duration::from_secs(20));
    disk.fill();
    // Records fit into the room left in the log's last page until one does not; then the
    // pilot keeps its records and fetches nothing.
    wait_until(
        "the pilot to find its trace log full",
        Duration::from_secs(40),
        || {
            std::fs::read_to_string(&pilot.log)
                .unwrap_or_default()
                .contains("cannot write the trace log")
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let size_full = std::fs::metadata(&trace).unwrap().len();
    let states = |ids: &[String]| -> Vec<String> {
        ids.iter()
            .map(|id| {
                stack.status("alice", id)["state"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let queued: Vec<String> = ids
        .iter()
        .zip(states(&ids))
        .filter(|(_, s)| s == "queued")
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        !queued.is_empty(),
        "the disk filled only after the last payload"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        states(&queued).iter().all(|s| s == "queued"),
        "fetched while the trace log was full"
    );
    assert_eq!(std::fs::metadata(&trace).unwrap().len(), size_full);
    assert!(ends_with_newline(&trace));
    assert_eq!(verify_file(&trace).unwrap().first_break, None);

    disk.free();
    let freed = Instant::now();
    wait_until("the kept trace records", Duration::from_secs(10), || {
        read_records(&trace)
            .unwrap()
            .iter()
            .any(|r| r["event"] == "write_failed")
    });
    eprintln!(
        "kept trace records written {:?} after space returned",
        freed.elapsed()
    );
    for id in &ids {
        stack.wait_state("alice", id, "done", Duration::from_secs(60));
    }
    // The pilot ends at its idle timeout, with everything written.
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = pilot.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "pilot did not end\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(&pilot.log).unwrap_or_default();
    assert!(status.success(), "pilot failed: {log}");
    assert!(!log.contains("unwritten record"), "{log}");

    let recs = read_records(&trace).unwrap();
    assert_complete_after_a_failure(&recs, &ids, 1);
    let out = Command::new(support::bin("mupilot"))
        .args(["trace", "verify", "--log"])
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(std::fs::metadata(&trace).unwrap().uid(), pilot_uid);
    drop(pilot);
    drop(disk);
}

#[test]
fn helper_stopped_while_the_disk_is_full_logs_its_records_and_the_next_one_closes_the_starts() {
    use switch_support::*;
    let _users = Users::acquire();
    let site = Site::new();
    let disk = SmallDisk::mount(&site.path("log"), None);
    let daemon = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let mut ids = Vec::new();
    let body = site.body(DN_ALICE, &["/bin/sleep", "2"]);
    ids.push(body.payload_id.clone());
    assert!(matches!(
        c.launch(&site.sign(&body), None),
        SwitchEvent::Started { .. }
    ));
    disk.fill();
    launch_until_refused(&site, &mut c, &mut ids);
    let mut exited = 0;
    while exited < ids.len() {
        if let SwitchEvent::Exited { .. } = c.recv() {
            exited += 1;
        }
    }
    // The helper stops while its end records still wait: they go whole to its log.
    drop(c);
    let log = daemon.log.clone();
    assert!(daemon.stop().is_some_and(|s| s.success()));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("unwritten record"), "{text}");
    for id in &ids {
        assert!(text.contains(id.as_str()), "{id} in the helper's log");
        assert!(!site.records_of(id).iter().any(|r| r["event"] == "end"));
    }
    // Space returns; the next helper closes every start without an end as `lost`.
    disk.free();
    let daemon = site.start();
    wait_until("lost records", Duration::from_secs(10), || {
        ids.iter()
            .all(|id| site.records_of(id).iter().any(|r| r["event"] == "lost"))
    });
    daemon.stop();
    for id in &ids {
        let events: Vec<Value> = site
            .records_of(id)
            .iter()
            .map(|r| r["event"].clone())
            .collect();
        assert_eq!(events, [json!("start"), json!("lost")], "{id}");
    }
    let (code, text) = cli(&["audit", "verify", "--log", site.audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    drop(disk);
}

/// One request to the server: its status (also pushed to `sent`), Retry-After and body.
async fn server_request(
    sent: &mut Vec<u64>,
    r: reqwest::RequestBuilder,
) -> (u16, Option<String>, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    sent.push(u64::from(status));
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, retry, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_on_a_full_request_log_disk_refuses_new_work_serves_reports_and_loses_no_record() {
    use mupilot::protocol::api::{PayloadState, StatusReport};
    let demo = server_support::Demo::new();
    let disk = SmallDisk::mount(&demo.tmp.path().join("disk"), None);
    let log = disk.dir.join("requests.jsonl");
    let cfg = demo.config();
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str(&format!("\n[request_log]\npath = \"{}\"\n", log.display()));
    std::fs::write(&cfg, toml).unwrap();
    let mut srv = demo.serve();
    let (alice, pilot) = (demo.client("alice"), demo.client("pilot"));
    let submit_url = srv.url("/v1/payloads");
    let sub = json!({"argv": ["/bin/true"], "resources": {"cores": 1, "memory_bytes": 67108864, "walltime_seconds": 60}});
    let mut sent = Vec::new();
    // A payload out at a pilot, running, before the disk fills.
    let (st, _, body) = server_request(&mut sent, alice.post(&submit_url).json(&sub)).await;
    assert_eq!(st, 201, "{body}");
    let (st, _, work) = server_request(
        &mut sent,
        pilot
            .post(srv.url("/v1/match"))
            .json(&server_support::match_req("pl-1")),
    )
    .await;
    assert_eq!(st, 200);
    let running = work["work"]["payload_id"].as_str().unwrap().to_string();
    let report = |state| StatusReport {
        pilot_id: "pl-1".into(),
        state: Some(state),
        ..Default::default()
    };
    let status_url = srv.url(&format!("/v1/payloads/{running}/status"));
    let (st, _, _) = server_request(
        &mut sent,
        pilot.post(&status_url).json(&report(PayloadState::Running)),
    )
    .await;
    assert_eq!(st, 200);

    disk.fill();
    // Submissions go on while records still fit the file's last page; the one whose record
    // the file cannot take is accepted (it is queued: its record waits in memory), and from
    // then on new work is refused with 503 and Retry-After.
    let mut accepted = 0;
    let (retry, body) = loop {
        let (st, retry, body) = server_request(&mut sent, alice.post(&submit_url).json(&sub)).await;
        match st {
            201 => accepted += 1,
            503 => break (retry, body),
            other => panic!("submission answered {other}: {body}"),
        }
        assert!(accepted < 200, "the request log never filled the disk");
    };
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(body["error"], "unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("request log"),
        "{body}"
    );
    let (st, _, _) = server_request(
        &mut sent,
        pilot
            .post(srv.url("/v1/match"))
            .json(&server_support::match_req("pl-2")),
    )
    .await;
    assert_eq!(st, 503, "no work leaves while it cannot be recorded");
    // Reports on work already out and reads are served: refusing a heartbeat would turn a
    // running payload lost.
    for _ in 0..3 {
        let (st, _, _) = server_request(
            &mut sent,
            pilot.post(&status_url).json(&report(PayloadState::Running)),
        )
        .await;
        assert_eq!(st, 200);
    }
    let (st, _, _) = server_request(
        &mut sent,
        alice.get(srv.url(&format!("/v1/payloads/{running}"))),
    )
    .await;
    assert_eq!(st, 200);
    // No fragment in the file meanwhile, and the chain so far is intact.
    assert!(ends_with_newline(&log));
    let r = verify_file(&log).unwrap();
    assert_eq!((r.first_break, r.torn_tail), (None, None));
    let before = r.records;

    disk.free();
    // The retry thread writes the backlog within 0.5 s; then submissions are accepted again.
    let t = Instant::now();
    loop {
        let (st, _, body) = server_request(&mut sent, alice.post(&submit_url).json(&sub)).await;
        if st == 201 {
            break;
        }
        assert_eq!(st, 503, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not accepted 5 s after space returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered_ms = t.elapsed().as_millis();
    println!(
        "srv full disk: {accepted} submissions fitted after dd, accepted again {recovered_ms} ms after rm, {} requests",
        sent.len()
    );
    assert_eq!(srv.stop(), Some(0));

    // Every request made has exactly one record, in order, after a write_failed record
    // saying how many waited in memory; the chain is intact.
    let recs = read_records(&log).unwrap();
    let requests: Vec<&Value> = recs.iter().filter(|r| r["event"] == "request").collect();
    let statuses: Vec<u64> = requests
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses, sent,
        "one record per request, in order, with its status"
    );
    assert!(recs.len() as u64 > before);
    let wf: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "write_failed")
        .collect();
    assert_eq!(wf.len(), 1, "{recs:?}");
    // The submission whose record failed, the refused submission and match, three reports
    // and a read at least.
    assert!(wf[0]["kept"].as_u64().unwrap() >= 7, "{}", wf[0]);
    assert_eq!(wf[0]["dropped"], 0);
    let out = demo.run(&["requests", "verify", "--log", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", server_support::text(&out));
    drop(disk);
}
