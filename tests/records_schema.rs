//! The record schema is one place (`records::schema`): every record the helper, the pilot and
//! the chain writer write names only fields and events the schema knows, and carries what the
//! readers (`lost`, `audit who`, listings) look for. A writer that adds a field or an event
//! without adding it to the schema fails here, naming it. Real logs in a temporary directory;
//! runs as any user.

use std::collections::BTreeSet;

use mupilot::pilot::trace::TraceRecord;
use mupilot::records::schema::{Event, FIELDS, LOST_COPIES};
use mupilot::records::{anchor, read_records, ChainWriter, FsyncPolicy};
use mupilot::switch::audit::{AuditEvent, AuditRecord};
use serde_json::{json, Value};

/// The event of the schema each audit event is written as; a new `AuditEvent` does not
/// compile here until it has one.
fn schema_event(e: AuditEvent) -> Event {
    match e {
        AuditEvent::RefusedCaller => Event::RefusedCaller,
        AuditEvent::RefusedSummary => Event::RefusedSummary,
        AuditEvent::Denied => Event::Denied,
        AuditEvent::Start => Event::Start,
        AuditEvent::End => Event::End,
        AuditEvent::Kill => Event::Kill,
        AuditEvent::Signal => Event::Signal,
        AuditEvent::ProxyRenewed => Event::ProxyRenewed,
        AuditEvent::ProxyRefused => Event::ProxyRefused,
    }
}

const AUDIT_EVENTS: [AuditEvent; 9] = [
    AuditEvent::RefusedCaller,
    AuditEvent::RefusedSummary,
    AuditEvent::Denied,
    AuditEvent::Start,
    AuditEvent::End,
    AuditEvent::Kill,
    AuditEvent::Signal,
    AuditEvent::ProxyRenewed,
    AuditEvent::ProxyRefused,
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .expect("a record is an object")
        .keys()
        .cloned()
        .collect()
}

fn unknown(v: &Value) -> Vec<String> {
    keys(v)
        .into_iter()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .collect()
}

fn event_of(v: &Value) -> Event {
    let name = v["event"].as_str().expect("event is a string");
    Event::from_name(name).unwrap_or_else(|| panic!("event {name:?} is not in the schema"))
}

/// An audit start record with every field set.
fn full_audit_start() -> AuditRecord {
    AuditRecord {
        time: "2026-12-05T01:00:00.000000Z".into(),
        event: Some(AuditEvent::Start),
        host: "wn1".into(),
        helper_pid: 1,
        pilot_uid: Some(1000),
        pilot_pid: Some(2),
        pilot_id: Some("p".into()),
        batch_job_id: Some("42".into()),
        pilot_dn: Some("/CN=pilot".into()),
        payload_id: Some("x-1".into()),
        owner_dn: Some("/CN=alice".into()),
        vo: Some("demo".into()),
        fqans: Some(vec!["/demo".into()]),
        jobtag: Some("t".into()),
        decision: Some("permit"),
        denial_class: Some("authorization"),
        reason: Some("r".into()),
        account: Some("demo001".into()),
        uid: Some(51000),
        gid: Some(51000),
        cgroup: Some("/sys/fs/cgroup/x".into()),
        scratch: Some("/var/lib/mupilot/x".into()),
        argv_sha256: Some("a".into()),
        bundle_sha256: Some("b".into()),
        envelope_sha256: Some("e".into()),
        start: Some("2026-12-05T01:00:00.000000Z".into()),
        end: Some("2026-12-05T01:00:01.000000Z".into()),
        exit_code: Some(0),
        signal: Some(9),
        cpu_seconds: Some(0.5),
        peak_memory_bytes: Some(1),
        kill_reason: Some("site_admin".into()),
        refused_count: Some(3),
        proxy_serial: Some("1f".into()),
        proxy_not_after: Some("2026-12-05T13:00:00Z".into()),
        via: Some("glexec"),
        proxy_sha256: Some("c".into()),
    }
}

#[test]
fn audit_records_use_the_schema_and_carry_what_lost_copies() {
    let start = serde_json::to_value(full_audit_start()).unwrap();
    assert_eq!(
        unknown(&start),
        Vec::<String>::new(),
        "audit fields not in the schema"
    );
    let missing: Vec<&&str> = LOST_COPIES
        .iter()
        .filter(|k| !keys(&start).contains(**k))
        .collect();
    assert!(
        missing.is_empty(),
        "a lost record copies {missing:?}, which audit starts lack"
    );
    for e in AUDIT_EVENTS {
        let rec = full_audit_start().follow_up(e);
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(event_of(&v), schema_event(e));
        assert_eq!(unknown(&v), Vec::<String>::new());
    }
}

#[test]
fn trace_records_use_the_schema() {
    for event in ["start", "end", "delivered"] {
        let rec = TraceRecord {
            event,
            ..TraceRecord::default()
        };
        let v = serde_json::to_value(&rec).unwrap();
        // Trace records carry every field (null when unknown): all of them must be known.
        assert_eq!(
            unknown(&v),
            Vec::<String>::new(),
            "trace fields not in the schema"
        );
        event_of(&v);
    }
}

/// The chain writer's own records (torn, anchor) and `lost`, written to a real log.
#[test]
fn the_chain_writers_own_records_and_lost_use_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    {
        let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
        w.append(&serde_json::to_value(full_audit_start()).unwrap())
            .unwrap();
        anchor::anchor_at(&mut w, "wn1", "2026-12-05T01:00:02.000000Z").unwrap();
        let lost = mupilot::records::query::lost_record(
            &serde_json::to_value(full_audit_start()).unwrap(),
            "helper restarted",
        );
        w.append(&lost).unwrap();
    }
    // A torn last line: the next writer removes it and records a `torn` record.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(br#"{"time":"2026-12-05T01:00:03Z","event":"st"#)
            .unwrap();
    }
    drop(ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap());
    let recs = read_records(&log).unwrap();
    let events: Vec<Event> = recs.iter().map(event_of).collect();
    assert_eq!(
        events,
        [Event::Start, Event::Anchor, Event::Lost, Event::Torn],
        "{recs:#?}"
    );
    for r in &recs {
        assert_eq!(unknown(r), Vec::<String>::new(), "{r}");
    }
    assert_eq!(
        recs[2]["payload_id"],
        json!("x-1"),
        "lost copies the start's facts"
    );
}
