//! Queries over generated audit logs, checked against the generator's ground truth: who held
//! a uid at a time, listing by owner/time/payload, open starts after a crash, the admin kill
//! client against a stand-in helper socket, and the command functions' outputs and exit codes.

mod records_support;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use chrono::Duration;
use mupilot::protocol::switch_wire::{read_frame, write_frame, SwitchEvent, SwitchRequest};
use mupilot::records::cli::Out;
use mupilot::records::query::{self, Filter, Subject};
use mupilot::records::{ChainWriter, FsyncPolicy};
use mupilot::switch::admin_client as admin;
use mupilot::switch::audit_query as audit;
use records_support::{fmt, t, truth_who, write_audit_log, Payload};
use serde_json::json;

fn generated(dir: &Path, n: u64) -> (Vec<PathBuf>, Vec<Payload>) {
    let p = dir.join("audit.jsonl");
    let truth = write_audit_log(&p, n, FsyncPolicy::Never);
    (vec![p], truth)
}

fn ids(h: &[query::Holding]) -> Vec<String> {
    let mut v: Vec<String> = h.iter().map(|h| h.payload_id.clone()).collect();
    v.sort();
    v
}

#[test]
fn who_matches_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let (files, truth) = generated(dir.path(), 10_000);
    let running = truth.iter().filter(|p| p.end.is_none()).count();
    assert!(running > 0, "the log must end with running payloads");
    let mut found = 0;
    for (i, p) in truth.iter().enumerate().step_by(317) {
        // At its start, in its middle, at its end, and just before its start.
        let mut times = vec![p.start, p.start - Duration::seconds(1)];
        if let Some(e) = p.end {
            times.push(e);
            times.push(p.start + (e - p.start) / 2);
        }
        for at in times {
            let got = query::who(&files, &Subject::Uid(p.uid), at).unwrap();
            assert_eq!(
                ids(&got),
                truth_who(&truth, p.uid, at),
                "payload {i} uid {} at {at}",
                p.uid
            );
            found += got.len();
        }
    }
    assert!(found > 20);
    // By account name, and a running payload (no end record): held "until now".
    let last = truth.iter().rev().find(|p| p.end.is_none()).unwrap();
    let at = last.start + Duration::hours(5);
    let got = query::who(&files, &Subject::Account(last.account.clone()), at).unwrap();
    assert_eq!(ids(&got), truth_who(&truth, last.uid, at));
    let h = got.iter().find(|h| h.payload_id == last.id).unwrap();
    assert_eq!(h.end, None);
    assert_eq!(h.owner_dn.as_deref(), Some(last.owner_dn.as_str()));
    assert_eq!(h.host.as_deref(), Some(last.host.as_str()));
    assert_eq!(h.batch_job_id.as_deref(), Some(last.batch_job_id.as_str()));
    // Before the log begins: nobody.
    let got = query::who(&files, &Subject::Uid(51001), t("2020-01-01 00:00")).unwrap();
    assert!(got.is_empty());
}

#[test]
fn who_finds_ends_that_do_not_repeat_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Never).unwrap();
    w.append(
        &json!({"time": "2026-11-23T03:00:00.000000Z", "event": "start", "payload_id": "a",
        "owner_dn": "/CN=a", "account": "pool01", "uid": 52001}),
    )
    .unwrap();
    w.append(&json!({"time": "2026-11-23T03:10:00.000000Z", "event": "end", "payload_id": "a"}))
        .unwrap();
    w.append(
        &json!({"time": "2026-11-23T03:20:00.000000Z", "event": "start", "payload_id": "b",
        "owner_dn": "/CN=b", "account": "pool01", "uid": 52001}),
    )
    .unwrap();
    drop(w);
    let files = vec![p];
    let who = |at: &str| ids(&query::who(&files, &Subject::Uid(52001), t(at)).unwrap());
    assert_eq!(who("2026-11-23 03:05"), vec!["a"]);
    assert_eq!(who("2026-11-23 03:10"), vec!["a"]);
    assert!(who("2026-11-23 03:15").is_empty());
    assert_eq!(who("2026-11-23 04:00"), vec!["b"]);
    // A pool account reused: the same uid, two owners, never at the same time.
    let owners: Vec<_> = query::who(
        &files,
        &Subject::Account("pool01".into()),
        t("2026-11-23 03:25"),
    )
    .unwrap()
    .into_iter()
    .map(|h| h.owner_dn.unwrap())
    .collect();
    assert_eq!(owners, vec!["/CN=b"]);
}

#[test]
fn who_follows_a_payload_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Never).unwrap();
    for i in 0..50 {
        w.append(
            &json!({"time": "2026-11-23T02:00:00.000000Z", "event": "denied",
            "payload_id": format!("d{i}"), "owner_dn": "/CN=z"}),
        )
        .unwrap();
    }
    w.append(
        &json!({"time": "2026-11-23T03:00:00.000000Z", "event": "start", "payload_id": "a",
        "owner_dn": "/CN=a", "account": "pool07", "uid": 52007}),
    )
    .unwrap();
    w.rotate().unwrap();
    w.append(&json!({"time": "2026-11-23T03:30:00.000000Z", "event": "end", "payload_id": "a"}))
        .unwrap();
    drop(w);
    let files = mupilot::records::rotate::chain_files(&p).unwrap();
    assert_eq!(files.len(), 2);
    let h = query::who(&files, &Subject::Uid(52007), t("2026-11-23 03:10")).unwrap();
    assert_eq!(ids(&h), vec!["a"]);
    assert_eq!(h[0].end.as_deref(), Some("2026-11-23T03:30:00.000000Z"));
    assert!(
        query::who(&files, &Subject::Uid(52007), t("2026-11-23 03:31"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn list_filters_by_owner_time_and_payload() {
    let dir = tempfile::tempdir().unwrap();
    let (files, truth) = generated(dir.path(), 5_000);
    let owner = truth[10].owner_dn.clone();
    // Records that lack the DN but belong to the owner's payloads are listed too.
    let mut w = ChainWriter::open(&files[0], 0o600, FsyncPolicy::Never).unwrap();
    w.append(
        &json!({"time": "2026-12-01T00:00:00.000000Z", "event": "kill",
        "payload_id": truth[10].id, "kill_reason": "site_admin"}),
    )
    .unwrap();
    drop(w);
    let f = Filter {
        owner_dn: Some(owner.clone()),
        ..Filter::default()
    };
    let got = query::list(&files, &f).unwrap();
    let starts = truth.iter().filter(|p| p.owner_dn == owner).count();
    let ends = truth
        .iter()
        .filter(|p| p.owner_dn == owner && p.end.is_some())
        .count();
    let denied = got.iter().filter(|v| v["event"] == "denied").count();
    assert_eq!(got.len(), starts + ends + denied + 1);
    assert!(got
        .iter()
        .all(|v| v["owner_dn"] == owner.as_str() || v["event"] == "kill"));

    let f = Filter {
        payload_id: Some(truth[10].id.clone()),
        ..Filter::default()
    };
    let got = query::list(&files, &f).unwrap();
    let events: Vec<_> = got.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(events, vec!["start", "end", "kill"]);

    let since = truth[100].start;
    let until = truth[200].start;
    let f = Filter {
        since: Some(since),
        until: Some(until),
        ..Filter::default()
    };
    let got = query::list(&files, &f).unwrap();
    let starts = got.iter().filter(|v| v["event"] == "start").count();
    assert_eq!(starts, 101);
    for v in &got {
        let tv = t(v["time"].as_str().unwrap());
        assert!(tv >= since && tv <= until);
    }
}

#[test]
fn open_starts_finds_payloads_without_an_end_and_lost_records_close_them() {
    let dir = tempfile::tempdir().unwrap();
    let (files, truth) = generated(dir.path(), 3_000);
    let mut want: Vec<String> = truth
        .iter()
        .filter(|p| p.end.is_none())
        .map(|p| p.id.clone())
        .collect();
    want.sort();
    let open = query::open_starts(&files).unwrap();
    let mut got: Vec<String> = open
        .iter()
        .map(|v| v["payload_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want);
    assert!(!got.is_empty());
    for s in &open {
        let lost = query::lost_record(s, "helper restarted; the payload's end was not recorded");
        assert_eq!(lost["event"], "lost");
        assert_eq!(lost["payload_id"], s["payload_id"]);
        assert_eq!(lost["owner_dn"], s["owner_dn"]);
        assert_eq!(lost["uid"], s["uid"]);
        assert_eq!(lost["start"], s["start"]);
        assert_eq!(lost["kill_reason"], "lost");
    }
    // What the helper does at startup: one lost record per open start.
    let mut w = ChainWriter::open(&files[0], 0o600, FsyncPolicy::Always).unwrap();
    let mut closed = mupilot::records::lost::close_open_starts(&mut w, "helper restarted").unwrap();
    drop(w);
    closed.sort();
    assert_eq!(closed, want);
    assert!(query::open_starts(&files).unwrap().is_empty());
    let mut w = ChainWriter::open(&files[0], 0o600, FsyncPolicy::Always).unwrap();
    assert!(mupilot::records::lost::close_open_starts(&mut w, "again")
        .unwrap()
        .is_empty());
    drop(w);
    // who reports the lost end as the end of the hold.
    let p = truth.iter().find(|p| p.end.is_none()).unwrap();
    let h = query::who(&files, &Subject::Uid(p.uid), p.start).unwrap();
    let h = h.iter().find(|h| h.payload_id == p.id).unwrap();
    assert_eq!(h.end_event.as_deref(), Some("lost"));
    assert!(mupilot::records::verify_file(&files[0])
        .unwrap()
        .first_break
        .is_none());
}

#[test]
fn times_parse_in_both_formats() {
    let want = t("2026-11-23T03:12:00Z");
    for s in [
        "2026-11-23 03:12",
        "2026-11-23 03:12:00",
        "2026-11-23T03:12",
        "2026-11-23T04:12:00+01:00",
    ] {
        assert_eq!(mupilot::records::parse_user_time(s).unwrap(), want, "{s}");
    }
    let e = mupilot::records::parse_user_time("03:12 yesterday").unwrap_err();
    assert!(e.contains("YYYY-MM-DD HH:MM"), "{e}");
    assert_eq!(fmt(want), "2026-11-23T03:12:00.000000Z");
}

/// A stand-in for the helper's admin side: answers one request with `answer`.
fn fake_helper(sock: &Path, answer: SwitchEvent) -> std::thread::JoinHandle<SwitchRequest> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (req, _): (SwitchRequest, _) = read_frame(&mut s).unwrap();
        write_frame(&mut s, &answer, &[]).unwrap();
        req
    })
}

#[test]
fn admin_kill_client_sends_the_request_and_reads_the_answer() {
    // The wire shape docs/records.md documents.
    let req = SwitchRequest::AdminKill {
        owner_dn: "/CN=x".into(),
        ban: true,
    };
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"type":"admin_kill","owner_dn":"/CN=x","ban":true}"#
    );
    let ev = SwitchEvent::Killed {
        payloads: vec!["p1".into()],
    };
    assert_eq!(
        serde_json::to_string(&ev).unwrap(),
        r#"{"type":"killed","payloads":["p1"]}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rec-switch.sock");
    let h = fake_helper(
        &sock,
        SwitchEvent::Killed {
            payloads: vec!["p1".into(), "p2".into()],
        },
    );
    let got = admin::admin_kill(&sock, "/CN=x", true, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(got, vec!["p1", "p2"]);
    assert_eq!(
        h.join().unwrap(),
        SwitchRequest::AdminKill {
            owner_dn: "/CN=x".into(),
            ban: true
        }
    );
    std::fs::remove_file(&sock).unwrap();

    let h = fake_helper(
        &sock,
        SwitchEvent::Error {
            reason: "admin requests need uid 0".into(),
        },
    );
    let e =
        admin::admin_kill(&sock, "/CN=x", false, std::time::Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("uid 0"), "{e}");
    h.join().unwrap();
    std::fs::remove_file(&sock).unwrap();

    let e =
        admin::admin_kill(&sock, "/CN=x", false, std::time::Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("is mupilot-switch running"), "{e}");
}

fn run(f: impl FnOnce(&mut Out) -> i32) -> (i32, String, String) {
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = f(&mut Out {
        out: &mut o,
        err: &mut e,
    });
    (
        code,
        String::from_utf8(o).unwrap(),
        String::from_utf8(e).unwrap(),
    )
}

#[test]
fn command_functions_print_and_exit_as_documented() {
    use clap::Parser;
    #[derive(Parser)]
    struct Audit {
        #[command(subcommand)]
        cmd: audit::AuditCommand,
    }
    let dir = tempfile::tempdir().unwrap();
    let (files, truth) = generated(dir.path(), 2_000);
    let log = &files[0];
    let sock = dir.path().join("none.sock");
    let audit = |args: &[&str]| {
        let a =
            Audit::try_parse_from(std::iter::once("audit").chain(args.iter().copied())).unwrap();
        run(|io| audit::audit_main(&a.cmd, log, &sock, io))
    };
    let p = &truth[5];
    let at = fmt(p.start + Duration::seconds(1));
    let (code, out, _) = audit(&["who", "--uid", &p.uid.to_string(), "--at", &at]);
    assert_eq!(code, 0);
    assert!(out.contains(&p.owner_dn) && out.contains(&p.id), "{out}");
    let (code, out, _) = audit(&["who", "--account", &p.account, "--at", &at, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["holders"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["payload_id"] == p.id.as_str()));
    let (code, out, _) = audit(&["who", "--uid", "1", "--at", "2026-11-01 00:00"]);
    assert_eq!(
        (code, out.as_str()),
        (1, "nobody held uid 1 at 2026-11-01T00:00:00Z\n")
    );
    let (code, _, err) = audit(&["who", "--uid", "1", "--at", "soon"]);
    assert_eq!(code, 2);
    assert!(err.contains("--at") && err.contains("soon"), "{err}");
    assert!(Audit::try_parse_from(["audit", "who", "--at", "2026-11-01 00:00"]).is_err());

    let (code, out, _) = audit(&["list", "--payload", &p.id, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2);
    let raw = std::fs::read_to_string(log).unwrap();
    assert!(
        out.lines().all(|l| raw.contains(l)),
        "--json prints records exactly as stored"
    );

    let (code, out, _) = audit(&["verify"]);
    assert_eq!(code, 0, "{out}");
    let n = std::fs::read_to_string(log).unwrap().lines().count();
    assert!(out.contains(&format!("chain intact: {n} records")), "{out}");
    let (code, _, err) = audit(&["verify", "--anchor", "12"]);
    assert_eq!(code, 2);
    assert!(err.contains("SEQ:HASH"), "{err}");
    let (code, out, _) = audit(&["verify", "--anchor", &format!("2500:{}", "0".repeat(64))]);
    assert_eq!(code, 1);
    assert!(out.contains("truncated"), "{out}");

    let (code, _, err) = audit(&["kill", "--owner", "/CN=x"]);
    assert_eq!(code, 2);
    assert!(err.contains("none.sock"), "{err}");

    let (code, _, err) = run(|io| {
        let a = Audit::try_parse_from(["audit", "list"]).unwrap();
        audit::audit_main(&a.cmd, &dir.path().join("missing.jsonl"), &sock, io)
    });
    assert_eq!(code, 2);
    assert!(
        err.contains("missing.jsonl") && err.contains("--log"),
        "{err}"
    );
}
