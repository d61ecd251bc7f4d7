//! Generated audit logs for the records tests and the records benchmark: realistic helper
//! audit records (every field of the schema), in time order, with the ground truth kept so
//! queries can be checked against it.
#![allow(dead_code)]

use std::collections::BinaryHeap;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use mupilot::records::{ChainWriter, FsyncPolicy};
use serde_json::{json, Value};

/// One generated payload (ground truth).
#[derive(Debug, Clone)]
pub struct Payload {
    pub id: String,
    pub owner_dn: String,
    pub account: String,
    pub uid: u32,
    pub host: String,
    pub pilot_id: String,
    pub batch_job_id: String,
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
}

pub fn t(s: &str) -> DateTime<Utc> {
    mupilot::records::parse_user_time(s).unwrap()
}

pub fn fmt(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn sha(seed: u64, tag: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("{tag}{seed}").as_bytes()))
}

pub fn owner_dn(i: u32) -> String {
    format!("/DC=org/DC=mupilot-demo/CN=user{i:03}")
}

/// The `start` record the helper writes.
pub fn start_record(p: &Payload, seq_hint: u64) -> Value {
    json!({
        "time": fmt(p.start), "event": "start", "host": p.host, "helper_pid": 812,
        "pilot_uid": 990, "pilot_pid": 4000 + (seq_hint % 1000), "pilot_id": p.pilot_id,
        "batch_job_id": p.batch_job_id, "pilot_dn": "/DC=org/DC=mupilot-demo/CN=pilot",
        "payload_id": p.id, "owner_dn": p.owner_dn, "vo": "demo", "fqans": ["/demo", "/demo/analysis"],
        "jobtag": "analysis-v2", "decision": "permit", "account": p.account, "uid": p.uid,
        "gid": p.uid, "cgroup": format!("/sys/fs/cgroup/memory/slurm/job_{}/payload-{}", p.batch_job_id, p.id),
        "scratch": format!("/var/lib/mupilot/scratch/{}", p.id),
        "argv_sha256": sha(seq_hint, "argv"), "bundle_sha256": sha(seq_hint, "bundle"),
        "envelope_sha256": sha(seq_hint, "env"), "start": fmt(p.start),
    })
}

/// The `end` record the helper writes.
pub fn end_record(p: &Payload, seq_hint: u64) -> Value {
    let end = p.end.expect("ended");
    json!({
        "time": fmt(end), "event": "end", "host": p.host, "helper_pid": 812,
        "pilot_id": p.pilot_id, "batch_job_id": p.batch_job_id, "payload_id": p.id,
        "owner_dn": p.owner_dn, "vo": "demo", "account": p.account, "uid": p.uid, "gid": p.uid,
        "start": fmt(p.start), "end": fmt(end), "exit_code": (seq_hint % 3) as i32, "signal": null,
        "cpu_seconds": (end - p.start).num_seconds() as f64 * 0.93, "peak_memory_bytes": 1_500_000_000u64 + seq_hint % 1000,
        "kill_reason": null,
    })
}

/// Writes a realistic audit log of about `records` records: payloads start every 2 s on 50
/// hosts, owned by 200 users (static accounts mpu-user000.. uid 51000..), last 1-60 minutes;
/// every 50th request is denied. Payloads still running when the log stops have no end
/// record. Returns the truth.
pub fn write_audit_log(path: &Path, records: u64, fsync: FsyncPolicy) -> Vec<Payload> {
    let mut w = ChainWriter::open(path, 0o600, fsync).unwrap();
    let base = t("2026-11-01T00:00:00Z");
    let mut payloads = Vec::new();
    // (Reverse(end time), payload index) of running payloads.
    let mut running: BinaryHeap<std::cmp::Reverse<(DateTime<Utc>, usize)>> = BinaryHeap::new();
    let mut written = 0u64;
    let mut k = 0u64;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while written < records {
        let now = base + Duration::seconds(2 * k as i64);
        while let Some(std::cmp::Reverse((end, i))) = running.peek().copied() {
            if end > now {
                break;
            }
            running.pop();
            w.append(&end_record(&payloads[i], written)).unwrap();
            written += 1;
        }
        let owner = (next() % 200) as u32;
        let host = format!("wn{:02}.example.org", next() % 50);
        if k % 50 == 49 {
            w.append(&json!({
                "time": fmt(now), "event": "denied", "host": host, "pilot_id": format!("{host}-p"),
                "payload_id": format!("p{k:07}"), "owner_dn": owner_dn(owner), "vo": "demo",
                "decision": "deny", "denial_class": "authorization", "reason": "DN is on the site ban list",
            }))
            .unwrap();
            written += 1;
        } else {
            let p = Payload {
                id: format!("p{k:07}"),
                owner_dn: owner_dn(owner),
                account: format!("mpu-user{owner:03}"),
                uid: 51000 + owner,
                pilot_id: format!("{host}-{}", k / 100),
                batch_job_id: format!("{}", 700000 + k / 100),
                host,
                start: now,
                end: Some(now + Duration::seconds(60 + (next() % 3540) as i64)),
            };
            w.append(&start_record(&p, written)).unwrap();
            written += 1;
            running.push(std::cmp::Reverse((p.end.unwrap(), payloads.len())));
            payloads.push(p);
        }
        k += 1;
    }
    // Whatever still runs has no end record.
    for std::cmp::Reverse((_, i)) in running {
        payloads[i].end = None;
    }
    w.sync().unwrap();
    payloads
}

/// The payload ids holding `uid` at `at`, from the ground truth.
pub fn truth_who(payloads: &[Payload], uid: u32, at: DateTime<Utc>) -> Vec<String> {
    let mut v: Vec<String> = payloads
        .iter()
        .filter(|p| p.uid == uid && p.start <= at && p.end.is_none_or(|e| e >= at))
        .map(|p| p.id.clone())
        .collect();
    v.sort();
    v
}
