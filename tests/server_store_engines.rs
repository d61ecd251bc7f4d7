//! The store's behaviour on both engines: every scenario runs on SQLite and on a private
//! PostgreSQL cluster (tests/pg_support), each on a fresh database, through the public `Store`
//! API the server uses. The concurrent scenarios open two stores on one database (two
//! instances) and race them: matches, sweeps and retention from both at once, and every
//! payload is claimed, requeued or expired exactly once.

mod pg_support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Duration, Utc};
use mupilot::protocol::api::{MatchRequest, OperatorCommand, PayloadState, StatusReport};
use mupilot::protocol::Resources;
use mupilot::server::config::MemberSeed;
use mupilot::server::membership::types::{EntityKind, Person, Registration, RequestKind};
use mupilot::server::store::{
    Database, Engine, FiledRequest, Member, MemberStatus, NewPayload, NewRegistration, Signing,
    Store, StoreError, SweepRules,
};
use pg_support::PgCluster;

/// One scenario's database and data directory.
struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    db: Database,
}

impl Env {
    fn new(cluster: Option<&PgCluster>) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let db = match cluster {
            None => Database::Sqlite,
            Some(c) => c.database(&c.create_db()),
        };
        Env {
            _tmp: tmp,
            data,
            db,
        }
    }

    /// A store as one server instance opens it (members seeded).
    fn open(&self) -> Store {
        let s = Store::open_with(&self.data, &self.db).unwrap();
        s.seed_members(
            "demo",
            &[MemberSeed {
                dn: "/CN=a".into(),
                fqans: vec!["/demo".into()],
            }],
            Utc::now(),
        )
        .unwrap();
        s
    }
}

fn new_payload() -> NewPayload {
    NewPayload {
        owner_dn: "/CN=a".into(),
        vo: "demo".into(),
        argv: vec!["/bin/true".into()],
        env: [("K".to_string(), "v".to_string())].into(),
        jobtag: Some("tag".into()),
        resources: Resources {
            cores: 1,
            memory_bytes: 64 << 20,
            walltime_seconds: 60,
        },
        outputs: vec!["out.txt".into()],
        bundle_sha256: None,
        delegation_id: None,
    }
}

fn mreq(pilot: &str) -> MatchRequest {
    MatchRequest {
        pilot_id: pilot.into(),
        batch_system: None,
        batch_job_id: Some("42".into()),
        host: "wn".into(),
        free_cores: 1,
        free_memory_bytes: 1 << 30,
        seconds_left: 3600,
    }
}

fn report(pilot: &str, state: PayloadState) -> StatusReport {
    StatusReport {
        pilot_id: pilot.into(),
        state: Some(state),
        ..Default::default()
    }
}

fn rules(before: chrono::DateTime<Utc>) -> SweepRules {
    SweepRules {
        matched_before: before,
        silent_before: before,
        silence: "90 s (3 missed heartbeats of 30 s)".into(),
    }
}

/// Submit, match, run, finish: every field a report carries comes back from view and list.
fn lifecycle(env: &Env) {
    let s = env.open();
    let t0 = Utc::now();
    let a = s.submit(&new_payload(), None, t0).unwrap();
    let b = s.submit(&new_payload(), None, t0).unwrap();
    // Does not fit: waits.
    let mut big = new_payload();
    big.resources.cores = 64;
    let c = s.submit(&big, None, t0).unwrap();
    let m = s.match_one("/CN=p", &mreq("p1"), t0).unwrap().unwrap();
    assert_eq!(m.id, a, "oldest first");
    assert_eq!(m.fqans, vec!["/demo".to_string()]);
    assert_eq!(m.env.get("K").map(String::as_str), Some("v"));
    assert_eq!(m.jobtag.as_deref(), Some("tag"));
    assert_eq!(s.holder(&a).unwrap().as_deref(), Some("/CN=p"));
    let mut run = report("p1", PayloadState::Running);
    run.account = Some("demo001".into());
    run.uid = Some(5001);
    s.apply_status(&a, "/CN=p", &run, t0).unwrap();
    assert_eq!(s.busy_pilots().unwrap(), vec!["p1".to_string()]);
    let mut done = report("p1", PayloadState::Done);
    done.exit_code = Some(3);
    done.signal = Some(9);
    done.cpu_seconds = Some(1.5);
    done.peak_memory_bytes = Some(1 << 40);
    done.wall_seconds = Some(2.25);
    done.outputs_skipped = vec!["big.dat: too large".into()];
    s.apply_status(&a, "/CN=p", &done, t0).unwrap();
    let v = s.view(&a).unwrap();
    assert_eq!(v.state, PayloadState::Done);
    assert_eq!(v.account.as_deref(), Some("demo001"));
    assert_eq!(v.uid, Some(5001));
    assert_eq!((v.exit_code, v.signal), (Some(3), Some(9)));
    assert_eq!(v.cpu_seconds, Some(1.5));
    assert_eq!(v.peak_memory_bytes, Some(1 << 40));
    assert_eq!(v.outputs_skipped, vec!["big.dat: too large".to_string()]);
    assert_eq!(v.batch_job_id.as_deref(), Some("42"));
    assert!(!v.has_output);
    s.set_has_output(&a, t0).unwrap();
    assert!(s.view(&a).unwrap().has_output);
    let queued = s.list(Some("/CN=a"), Some(PayloadState::Queued)).unwrap();
    let ids: Vec<_> = queued.iter().map(|v| v.payload_id.clone()).collect();
    assert_eq!(ids, vec![b.clone(), c.clone()]);
    assert_eq!(s.list(None, None).unwrap().len(), 3);
    assert!(s.list(Some("/CN=nobody"), None).unwrap().is_empty());
    let mut counts = s.count_by_state().unwrap();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("demo".into(), "done".into(), 1),
            ("demo".into(), "queued".into(), 2)
        ]
    );
    assert!(matches!(s.view("p-none"), Err(StoreError::NotFound(_))));
    // Someone else's pilot may not report on it.
    assert!(matches!(
        s.apply_status(&a, "/CN=other", &done, t0),
        Err(StoreError::Forbidden(_))
    ));
}

/// Unstarted matches are requeued, silent running payloads lost, the limit fails them; a late
/// final report replaces the server's `lost`.
fn sweeps_and_requeues(env: &Env) {
    let mut s = env.open();
    s.set_requeue_limit(1);
    let t0 = Utc::now();
    let a = s.submit(&new_payload(), None, t0).unwrap();
    let b = s.submit(&new_payload(), None, t0).unwrap();
    s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    s.apply_status(&b, "/CN=p", &report("p", PayloadState::Running), t0)
        .unwrap();
    let later = t0 + Duration::seconds(100);
    let swept = s.sweep(&rules(t0 + Duration::seconds(1)), later).unwrap();
    assert_eq!((swept.requeued, swept.failed, swept.lost), (1, 0, 1));
    assert_eq!(s.view(&a).unwrap().state, PayloadState::Queued);
    let vb = s.view(&b).unwrap();
    assert_eq!(vb.state, PayloadState::Lost);
    assert!(vb.reason.unwrap().contains("3 missed heartbeats"));
    let mut done = report("p", PayloadState::Done);
    done.exit_code = Some(0);
    s.apply_status(&b, "/CN=p", &done, later).unwrap();
    let vb = s.view(&b).unwrap();
    assert_eq!(vb.state, PayloadState::Done);
    assert!(vb.reason.unwrap().contains("reported late"));
    assert!(matches!(
        s.apply_status(&b, "/CN=p", &report("p", PayloadState::Failed), later),
        Err(StoreError::Conflict(_))
    ));
    // Second unstarted hand-off of `a` is over the limit of 1: failed.
    s.match_one("/CN=p", &mreq("p"), later).unwrap().unwrap();
    let mut back = report("p", PayloadState::Queued);
    back.reason = Some("helper connection lost".into());
    s.apply_status(&a, "/CN=p", &back, later).unwrap();
    let va = s.view(&a).unwrap();
    assert_eq!(va.state, PayloadState::Failed);
    assert!(va.reason.unwrap().contains("not started after 2 hand-offs"));
}

/// Cancel and signal: queued at once, matched through commands delivered once; a hand-back
/// with a pending cancel ends cancelled.
fn commands(env: &Env) {
    let s = env.open();
    let t0 = Utc::now();
    let q = s.submit(&new_payload(), None, t0).unwrap();
    assert!(matches!(
        s.cancel(&q, "/CN=mallory", false, t0),
        Err(StoreError::Forbidden(_))
    ));
    assert_eq!(
        s.cancel(&q, "/CN=a", false, t0).unwrap(),
        PayloadState::Cancelled
    );
    assert!(matches!(
        s.cancel(&q, "/CN=a", false, t0),
        Err(StoreError::Conflict(_))
    ));
    let m = s.submit(&new_payload(), None, t0).unwrap();
    s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    assert_eq!(
        s.queue_signal(&m, "/CN=op", true, 15).unwrap(),
        PayloadState::Matched
    );
    assert!(matches!(
        s.queue_signal(&m, "/CN=a", false, 99),
        Err(StoreError::Invalid(_))
    ));
    let cmds = s
        .apply_status(&m, "/CN=p", &report("p", PayloadState::Running), t0)
        .unwrap();
    assert!(matches!(
        cmds.as_slice(),
        [OperatorCommand::Signal { signal: 15, .. }]
    ));
    let cmds = s
        .apply_status(&m, "/CN=p", &report("p", PayloadState::Running), t0)
        .unwrap();
    assert!(cmds.is_empty(), "delivered once");
    let h = s.submit(&new_payload(), None, t0).unwrap();
    s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    assert_eq!(
        s.cancel(&h, "/CN=a", false, t0).unwrap(),
        PayloadState::Matched
    );
    s.apply_status(&h, "/CN=p", &report("p", PayloadState::Queued), t0)
        .unwrap();
    let v = s.view(&h).unwrap();
    assert_eq!(v.state, PayloadState::Cancelled);
    assert_eq!(v.reason.as_deref(), Some("cancelled by /CN=a"));
}

/// Live usage and information requests: heartbeats keep the usage, a request becomes a
/// command for the pilot, its answer is kept once and read by the requester, owner, operators.
fn usage_and_information(env: &Env) {
    use mupilot::protocol::api::InformationAnswer;
    let s = env.open();
    let t0 = Utc::now();
    let id = s.submit(&new_payload(), None, t0).unwrap();
    s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    assert!(matches!(
        s.request_information(&id, "/CN=a", false, t0),
        Err(StoreError::Conflict(_))
    ));
    let mut beat = report("p", PayloadState::Running);
    beat.cpu_seconds = Some(3.25);
    beat.memory_bytes = Some(7 << 20);
    beat.peak_memory_bytes = Some(9 << 20);
    s.apply_status(&id, "/CN=p", &beat, t0).unwrap();
    let v = s.view(&id).unwrap();
    assert_eq!(
        (v.cpu_seconds, v.memory_bytes_now, v.peak_memory_bytes),
        (Some(3.25), Some(7 << 20), Some(9 << 20))
    );
    assert!(v.usage_at.is_some());
    assert!(matches!(
        s.request_information(&id, "/CN=mallory", false, t0),
        Err(StoreError::Forbidden(_))
    ));
    let rid = s.request_information(&id, "/CN=a", false, t0).unwrap();
    let cmds = s.apply_status(&id, "/CN=p", &beat, t0).unwrap();
    assert!(
        matches!(cmds.as_slice(), [OperatorCommand::Information { request_id, .. }] if *request_id == rid)
    );
    let answer = InformationAnswer {
        request_id: rid.clone(),
        ok: true,
        reason: "information".into(),
        payload: None,
    };
    let mut rep = report("p", PayloadState::Running);
    rep.information = Some(answer.clone());
    s.apply_status(&id, "/CN=p", &rep, t0).unwrap();
    let got = s.information(&id, &rid, "/CN=op", true, 30).unwrap();
    assert_eq!(got.answer, Some(answer));
    assert_eq!(got.state, PayloadState::Running);
    assert!(matches!(
        s.information(&id, &rid, "/CN=mallory", false, 30),
        Err(StoreError::Forbidden(_))
    ));
}

/// The operator's `member add`: a registration with its data and AUP versions, approved at
/// once by the operator (two request records, as a member's registration and a manager's
/// approval make them).
fn register_and_approve(s: &Store, dn: &str, fqans: &[&str], now: chrono::DateTime<Utc>) -> Member {
    let r = NewRegistration {
        dn: dn.into(),
        vo: "demo".into(),
        kind: EntityKind::Person,
        registration: Registration {
            person: Person {
                family_name: "Doe".into(),
                given_name: "Bea".into(),
                institute: "Example University".into(),
                email: "bea@example.edu".into(),
                phone: None,
            },
            responsible: None,
        },
        grid_aup_version: "1".into(),
        vo_aup_version: "1".into(),
        fqans: fqans.iter().map(|f| f.to_string()).collect(),
    };
    let req = s.register(&r, now).unwrap();
    let (req, effect) = s
        .decide(&req.id, "/CN=operator", true, "identity checked", None, now)
        .unwrap();
    assert_eq!(req.state, "approved");
    effect.member.unwrap()
}

/// The registry: seeds once, add/suspend/renew/remove, and only active members are matched.
fn members(env: &Env) {
    let s = env.open();
    let now = Utc::now();
    assert_eq!(
        s.seed_members(
            "demo",
            &[MemberSeed {
                dn: "/CN=a".into(),
                fqans: vec![]
            }],
            now
        )
        .unwrap(),
        0,
        "already seeded"
    );
    let b = register_and_approve(&s, "/CN=B", &["/demo/role=x"], now);
    assert_eq!(b.fqans, vec!["/demo/role=x".to_string()]);
    assert!(b.is_active(now) && b.registration.is_some() && b.vo_aup_version.is_some());
    let dns: Vec<_> = s.members().unwrap().into_iter().map(|m| m.dn).collect();
    assert_eq!(
        dns,
        vec!["/CN=B".to_string(), "/CN=a".to_string()],
        "byte order"
    );
    s.submit(&new_payload(), None, now).unwrap();
    s.set_member_status("/CN=a", MemberStatus::Suspended)
        .unwrap();
    assert!(s.match_one("/CN=p", &mreq("p"), now).unwrap().is_none());
    s.set_member_status("/CN=a", MemberStatus::Registered)
        .unwrap();
    assert!(s.match_one("/CN=p", &mreq("p"), now).unwrap().is_some());
    let far = now + Duration::days(800);
    let renewal = FiledRequest {
        kind: RequestKind::Renewal,
        subject_dn: "/CN=B".into(),
        requester_dn: "/CN=B".into(),
        details: serde_json::json!({
            "registration": b.registration,
            "grid_aup": "1",
            "vo_aup": "1",
        }),
    };
    let filed = s.file_request(&renewal, far).unwrap();
    let (_, effect) = s
        .decide(&filed.id, "/CN=operator", true, "data confirmed", None, far)
        .unwrap();
    let renewed = effect.member.unwrap();
    assert!(renewed.renewal_due > far);
    s.set_member_status("/CN=B", MemberStatus::Removed).unwrap();
    assert!(matches!(
        s.file_request(&renewal, now),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.set_member_status("/CN=nobody", MemberStatus::Suspended),
        Err(StoreError::NoMember(_))
    ));
}

/// Retention of records: a finished payload past the period goes with its commands and
/// `information` requests; a recent one, one whose files are still kept, a running and a queued
/// one stay whatever their age. Issued proxies' records go by notAfter. The registry's decided
/// requests and notifications of a member who stays go by age; a pending request stays.
fn record_retention(env: &Env) {
    let s = env.open();
    let t0 = Utc::now();
    let day = Duration::days(1);
    let finish = |at: chrono::DateTime<Utc>| {
        let id = s.submit(&new_payload(), Some(b"bundle"), at).unwrap();
        s.match_one("/CN=p", &mreq("p"), at).unwrap().unwrap();
        s.apply_status(&id, "/CN=p", &report("p", PayloadState::Running), at)
            .unwrap();
        id
    };
    // Old: ran with a signal and an information request (each a command), then ended.
    let old = finish(t0);
    s.queue_signal(&old, "/CN=a", false, 10).unwrap();
    s.request_information(&old, "/CN=a", false, t0).unwrap();
    s.apply_status(&old, "/CN=p", &report("p", PayloadState::Running), t0)
        .unwrap();
    s.apply_status(&old, "/CN=p", &report("p", PayloadState::Done), t0)
        .unwrap();
    let files_kept = finish(t0);
    s.apply_status(
        &files_kept,
        "/CN=p",
        &report("p", PayloadState::Failed),
        t0 + Duration::seconds(10),
    )
    .unwrap();
    let running = finish(t0);
    let recent = finish(t0);
    s.apply_status(
        &recent,
        "/CN=p",
        &report("p", PayloadState::Done),
        t0 + day * 100,
    )
    .unwrap();
    let queued = s.submit(&new_payload(), None, t0).unwrap();
    // Files of payloads final before t0 + 5 s go (old's); files_kept keeps its files.
    let cut = t0 + Duration::seconds(5);
    assert_eq!(s.expire_files(cut, cut).unwrap(), 1);
    let signing = |id: &str, not_after| Signing {
        delegation_id: id.into(),
        payload_id: None,
        signer_dn: "/CN=a".into(),
        serial: "1".into(),
        subject: "/CN=a/CN=123".into(),
        not_after,
        signed_at: t0,
    };
    s.record_signing(&signing("d-old", t0 + day)).unwrap();
    s.record_signing(&signing("d-new", t0 + day * 60)).unwrap();

    // 30 days on: only old goes (files_kept is as old, but its files are still kept).
    let r = s.expire_records(t0 + day * 30).unwrap();
    assert_eq!(
        (r.payloads, r.commands, r.information, r.proxy_signings),
        (1, 2, 1, 1),
        "{r:?}"
    );
    assert!(matches!(s.view(&old), Err(StoreError::NotFound(_))));
    for kept in [&files_kept, &running, &queued, &recent] {
        s.view(kept).unwrap();
    }
    assert!(s.signings("d-old").unwrap().is_empty());
    assert_eq!(s.signings("d-new").unwrap().len(), 1);
    assert_eq!(
        s.expire_records(t0 + day * 30).unwrap(),
        Default::default(),
        "a second run finds nothing"
    );
    // Much later, files expired: files_kept and recent go too; running and queued never do.
    let later = t0 + day * 100 + Duration::seconds(1);
    assert_eq!(s.expire_files(later, later).unwrap(), 2);
    let r = s.expire_records(t0 + day * 400).unwrap();
    assert_eq!((r.payloads, r.proxy_signings), (2, 1), "{r:?}");
    for gone in [&files_kept, &recent] {
        assert!(matches!(s.view(gone), Err(StoreError::NotFound(_))));
    }
    s.view(&running).unwrap();
    s.view(&queued).unwrap();

    // The registry: a member who stays keeps a pending request; decided ones and
    // notifications go once older than the cutoff.
    register_and_approve(&s, "/CN=stays", &["/demo"], t0);
    let suspend = FiledRequest {
        kind: RequestKind::Suspension,
        subject_dn: "/CN=stays".into(),
        requester_dn: "/CN=officer".into(),
        details: serde_json::json!({ "reason": "incident" }),
    };
    s.file_and_decide(&suspend, "/CN=manager", "officer confirmed", t0)
        .unwrap();
    let reinstate = FiledRequest {
        kind: RequestKind::Reinstatement,
        subject_dn: "/CN=stays".into(),
        requester_dn: "/CN=manager".into(),
        details: serde_json::json!({}),
    };
    let (_, effect) = s
        .file_and_decide(&reinstate, "/CN=manager", "cleared", t0)
        .unwrap();
    assert_eq!(effect.notifications.len(), 1);
    let change = FiledRequest {
        kind: RequestKind::Attributes,
        subject_dn: "/CN=stays".into(),
        requester_dn: "/CN=stays".into(),
        details: serde_json::json!({ "fqans": ["/demo", "/demo/prod"] }),
    };
    let pending = s.file_request(&change, t0).unwrap();
    let p = s.purge_membership(t0 - day).unwrap();
    assert_eq!((p.members, p.requests, p.notifications), (0, 0, 0), "{p:?}");
    let p = s.purge_membership(t0 + day).unwrap();
    assert_eq!(
        (p.members, p.requests, p.notifications),
        (0, 3, 1),
        "membership, suspension, reinstatement; one notification: {p:?}"
    );
    assert!(s.membership_notifications().unwrap().is_empty());
    let left = s.membership_requests(Some("/CN=stays"), None).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, pending.id);
    assert!(s.member("/CN=stays").unwrap().unwrap().is_active(t0 + day));
}

/// Runs `f(store, i)` on `threads` threads, half of them on each of two stores (two
/// instances on one database); returns what they returned.
fn on_two_instances<T: Send + 'static>(
    env: &Env,
    threads: usize,
    f: impl Fn(&Store, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let stores = [Arc::new(env.open()), Arc::new(env.open())];
    let f = Arc::new(f);
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (s, f, barrier) = (stores[i % 2].clone(), f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(&s, i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// 8 threads on two instances match 400 payloads: each exactly once, none left.
fn concurrent_matches(env: &Env) {
    let s = env.open();
    let n = 400;
    let t0 = Utc::now();
    let mut submitted = HashSet::new();
    for _ in 0..n {
        submitted.insert(s.submit(&new_payload(), None, t0).unwrap());
    }
    let got = on_two_instances(env, 8, |s, i| {
        let mut mine = Vec::new();
        while let Some(m) = s
            .match_one("/CN=p", &mreq(&format!("p{i}")), Utc::now())
            .unwrap()
        {
            mine.push(m.id);
        }
        mine
    });
    let all: Vec<String> = got.into_iter().flatten().collect();
    let unique: HashSet<String> = all.iter().cloned().collect();
    assert_eq!(all.len(), n, "every payload matched once, none twice");
    assert_eq!(unique, submitted);
}

/// Sweeps and retention from two instances at once: each stale payload is requeued once,
/// each expired payload's files counted once.
fn concurrent_sweeps_and_retention(env: &Env) {
    let s = env.open();
    let n = 200;
    let t0 = Utc::now();
    for _ in 0..n {
        s.submit(&new_payload(), Some(b"bundle"), t0).unwrap();
        s.match_one("/CN=p", &mreq("p"), t0).unwrap().unwrap();
    }
    let later = t0 + Duration::seconds(100);
    let swept = on_two_instances(env, 4, move |s, _| {
        s.sweep(&rules(t0 + Duration::seconds(1)), later).unwrap()
    });
    let requeued: usize = swept.iter().map(|w| w.requeued).sum();
    assert_eq!(requeued, n);
    let queued = s.list(None, Some(PayloadState::Queued)).unwrap();
    assert_eq!(queued.len(), n);
    assert!(queued
        .iter()
        .all(|v| v.reason.as_deref().unwrap().contains("requeued (1 of")));
    // Finish them all, then expire from both instances at once.
    for v in &queued {
        let m = s.match_one("/CN=p", &mreq("q"), later).unwrap().unwrap();
        assert_eq!(m.id, v.payload_id);
        s.apply_status(&m.id, "/CN=p", &report("q", PayloadState::Failed), later)
            .unwrap();
    }
    let end = later + Duration::seconds(10);
    let expired = on_two_instances(env, 4, move |s, _| {
        let mut total = 0;
        loop {
            let k = s.expire_files(end, end).unwrap();
            if k == 0 {
                break total;
            }
            total += k;
        }
    });
    assert_eq!(expired.iter().sum::<usize>(), n);
    assert!(queued
        .iter()
        .all(|v| !s.bundle_path(&v.payload_id).exists()));
}

/// A named scenario.
type Scenario = (&'static str, fn(&Env));

fn every_scenario(cluster: Option<&PgCluster>, engine: Engine) {
    let scenarios: [Scenario; 8] = [
        ("lifecycle", lifecycle),
        ("sweeps_and_requeues", sweeps_and_requeues),
        ("commands", commands),
        ("usage_and_information", usage_and_information),
        ("members", members),
        ("record_retention", record_retention),
        ("concurrent_matches", concurrent_matches),
        (
            "concurrent_sweeps_and_retention",
            concurrent_sweeps_and_retention,
        ),
    ];
    for (name, f) in scenarios {
        let env = Env::new(cluster);
        assert_eq!(env.open().engine(), engine);
        eprintln!("scenario {name} on {engine:?}");
        f(&env);
    }
}

#[test]
fn every_scenario_on_sqlite() {
    every_scenario(None, Engine::Sqlite);
}

#[test]
fn every_scenario_on_postgresql() {
    let cluster = PgCluster::start();
    every_scenario(Some(&cluster), Engine::Postgres);
}

/// Two instances starting on an empty database at once both come up (one migrates, the other
/// waits on the advisory lock and finds the schema current); the schema history has one row
/// per version; a wrong password and an unreachable server are named errors.
#[test]
fn instances_migrate_once_and_errors_name_the_database() {
    let cluster = PgCluster::start();
    let db = cluster.create_db();
    let database = Arc::new(cluster.database(&db));
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let database = database.clone();
            std::thread::spawn(move || {
                let d = tempfile::tempdir().unwrap();
                Store::open_with(&d.path().join("data"), &database).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let versions: Vec<i32> = cluster
        .admin(&db)
        .unwrap()
        .query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // One history row per migration there is (each run once, by one instance).
    let mut all: Vec<i32> = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/server/store/migrations/postgres"
    ))
    .unwrap()
    .filter_map(|e| {
        let name = e.unwrap().file_name().into_string().unwrap();
        name.strip_prefix('V')?.split("__").next()?.parse().ok()
    })
    .collect();
    all.sort_unstable();
    assert_eq!(versions, all);

    let d = tempfile::tempdir().unwrap();
    let bad_pw = d.path().join("wrong");
    std::fs::write(&bad_pw, "not-the-password\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad_pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut settings = cluster.settings(&db);
    settings.password_file = Some(bad_pw.clone());
    let e = Store::open_with(
        &d.path().join("data"),
        &Database::Postgres(settings.clone()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("127.0.0.1") && e.contains(&db) && e.contains("authentication"),
        "{e}"
    );
    std::fs::set_permissions(&bad_pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Store::open_with(
        &d.path().join("data"),
        &Database::Postgres(settings.clone()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("chmod 0600") && e.contains("wrong"), "{e}");
    settings.password_file = Some(cluster.password_file.clone());
    settings.port = 1;
    let e = Store::open_with(&d.path().join("data"), &Database::Postgres(settings))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("cannot connect to PostgreSQL") && e.contains(":1/"),
        "{e}"
    );
}

/// Connections PostgreSQL closes (a restart, an operator's pg_terminate_backend) fail one
/// call each at most, are dropped from the pool, and the store goes on with new ones.
#[test]
fn connections_the_database_closed_are_replaced() {
    let cluster = PgCluster::start();
    let env = Env::new(Some(&cluster));
    let s = env.open();
    let id = s.submit(&new_payload(), None, Utc::now()).unwrap();
    let killed: i64 = {
        let mut admin = cluster.admin("postgres").unwrap();
        let rows = admin
            .query(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                &[&pg_support::ROLE],
            )
            .unwrap();
        rows[0].get(0)
    };
    assert!(killed >= 1, "the store's connections were open");
    let mut failures = 0;
    loop {
        match s.view(&id) {
            Ok(v) => {
                assert_eq!(v.state, PayloadState::Queued);
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(
                    failures <= killed,
                    "more failures than closed connections: {e}"
                );
            }
        }
    }
    assert!(s
        .match_one("/CN=p", &mreq("p"), Utc::now())
        .unwrap()
        .is_some());
}

/// A match reads the head of the queue, not the table's history. The statistics are taken
/// while every row is queued (as after a burst of submissions, when the bench and a busy VO
/// match), then 2,000 payloads are matched; the plans of 20 further matches on one connection
/// (the 6th and later run PostgreSQL's cached generic plan), logged by auto_explain with
/// ANALYZE and BUFFERS, must touch a few pages and filter out no matched row. Without the
/// partial index `payloads_queued` (migration V5) the generic plan walked payloads_pkey and
/// filtered every matched row: 2,000 rows and 381 pages per match here.
#[test]
fn a_match_does_not_read_the_matched_history() {
    let cluster = PgCluster::start();
    let env = Env::new(Some(&cluster));
    let Database::Postgres(settings) = &env.db else {
        unreachable!("a PostgreSQL environment")
    };
    let db = settings.dbname.clone();
    let s = env.open();
    s.submit(&new_payload(), None, Utc::now()).unwrap();
    let mut admin = cluster.admin(&db).unwrap();
    let cols = "owner_dn, vo, state, argv, env, jobtag, cores, memory_bytes, walltime_seconds, \
        outputs, bundle_sha256, submitted_at, updated_at";
    admin
        .batch_execute(&format!(
            "INSERT INTO payloads (id, {cols})
                SELECT 'p-history-' || i, {cols}
                FROM generate_series(1, 2099) AS i, (SELECT * FROM payloads LIMIT 1) AS t;
             ANALYZE payloads"
        ))
        .unwrap();
    for i in 0..2000 {
        assert!(
            s.match_one("/CN=p", &mreq("p"), Utc::now())
                .unwrap()
                .is_some(),
            "match {i}"
        );
    }
    drop(s);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET session_preload_libraries = 'auto_explain';
             ALTER DATABASE {db} SET auto_explain.log_min_duration = 0;
             ALTER DATABASE {db} SET auto_explain.log_analyze = on;
             ALTER DATABASE {db} SET auto_explain.log_buffers = on;
             ALTER DATABASE {db} SET auto_explain.log_format = 'json'"
        ))
        .unwrap();
    let mut one = settings.clone();
    one.pool_size = 1;
    let s = Store::open_with(&env.data, &Database::Postgres(one)).unwrap();
    for _ in 0..20 {
        assert!(s
            .match_one("/CN=p", &mreq("p"), Utc::now())
            .unwrap()
            .is_some());
    }
    drop(s);

    // auto_explain's entries: "LOG:  duration: … ms  plan:" and the plan as JSON after it.
    let log = cluster.log();
    let plans: Vec<serde_json::Value> = log
        .split("plan:")
        .skip(1)
        .filter_map(|rest| {
            serde_json::Deserializer::from_str(rest)
                .into_iter::<serde_json::Value>()
                .next()?
                .ok()
        })
        .filter(|p| {
            p["Query Text"]
                .as_str()
                .is_some_and(|q| q.contains("WITH candidate AS"))
        })
        .collect();
    assert_eq!(plans.len(), 20, "20 match plans logged; log:\n{log}");
    fn most_filtered(node: &serde_json::Value) -> u64 {
        let own = node["Rows Removed by Filter"].as_u64().unwrap_or(0);
        node["Plans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(most_filtered)
            .fold(own, u64::max)
    }
    for p in &plans {
        let plan = &p["Plan"];
        let pages = plan["Shared Hit Blocks"].as_u64().unwrap()
            + plan["Shared Read Blocks"].as_u64().unwrap();
        let filtered = most_filtered(plan);
        assert!(
            pages <= 100 && filtered <= 20,
            "a match read {pages} pages and filtered out {filtered} rows:\n{p:#}"
        );
    }
}

/// A serving instance opens its whole pool before it answers anything (no connection, each a
/// backend and a SCRAM exchange, is made inside a request), and keeps it; a one-shot command
/// (`member`, `membership purge`) opens one connection.
#[test]
fn an_instance_opens_its_pool_at_start_and_a_command_one_connection() {
    let cluster = PgCluster::start();
    let env = Env::new(Some(&cluster));
    let Database::Postgres(settings) = &env.db else {
        unreachable!("a PostgreSQL environment")
    };
    let db = settings.dbname.clone();
    let mut admin = cluster.admin(&db).unwrap();
    let mut connections = || -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                &[&db, &pg_support::ROLE],
            )
            .unwrap()
            .get(0)
    };
    let serving = Store::open_with(&env.data, &env.db).unwrap();
    assert_eq!(connections(), i64::from(settings.pool_size));
    for _ in 0..50 {
        serving.submit(&new_payload(), None, Utc::now()).unwrap();
    }
    assert_eq!(
        connections(),
        i64::from(settings.pool_size),
        "kept, not grown"
    );
    drop(serving);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while connections() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool's connections closed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let command = Store::open_with(&env.data, &env.db.for_command()).unwrap();
    assert_eq!(connections(), 1);
    assert_eq!(command.engine(), Engine::Postgres);
    drop(command);
}
