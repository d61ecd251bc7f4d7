//! Measures the record layer against its targets: append rate with fsync per record and with
//! batched fsync (target >= 50,000 records/s), and queries over a realistic 1,000,000-record
//! audit log (target: `audit who` < 1 s). Run: `cargo run --release --example records_bench`.
//! `RECORDS_BENCH_N` changes the size of the query log (default 1000000).

#[path = "../tests/records_support/mod.rs"]
mod records_support;

use std::time::{Duration, Instant};

use mupilot::records::query::{self, Filter, Subject};
use mupilot::records::{verify_files, ChainWriter, FsyncPolicy};
use records_support::{start_record, t, write_audit_log, Payload};

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn append_rate(dir: &std::path::Path, policy: FsyncPolicy, n: u64) -> f64 {
    let path = dir.join(format!("append-{policy:?}.jsonl"));
    let mut w = ChainWriter::open(&path, 0o600, policy).unwrap();
    if policy == FsyncPolicy::Batch {
        w.start_background_sync(Duration::from_millis(100)).unwrap();
    }
    let p = Payload {
        id: "p0000001".into(),
        owner_dn: records_support::owner_dn(7),
        account: "mpu-user007".into(),
        uid: 51007,
        host: "wn01.example.org".into(),
        pilot_id: "wn01-1".into(),
        batch_job_id: "700001".into(),
        start: t("2026-11-23T03:00:00Z"),
        end: None,
    };
    let records: Vec<_> = (0..1000).map(|i| start_record(&p, i)).collect();
    let t0 = Instant::now();
    for i in 0..n {
        w.append(&records[(i % 1000) as usize]).unwrap();
    }
    w.sync().unwrap();
    let r = rate(n, t0.elapsed());
    drop(w);
    std::fs::remove_file(&path).unwrap();
    r
}

fn main() {
    let n: u64 = std::env::var("RECORDS_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::Builder::new()
        .prefix("rec-bench")
        .tempdir()
        .unwrap();

    let always = append_rate(dir.path(), FsyncPolicy::Always, 2_000);
    println!("append, fsync every record (Always): {always:>10.0} records/s");
    let batch = append_rate(dir.path(), FsyncPolicy::Batch, 300_000);
    println!("append, batched fsync (Batch):       {batch:>10.0} records/s (target >= 50000)");

    let log = dir.path().join("audit.jsonl");
    let t0 = Instant::now();
    let truth = write_audit_log(&log, n, FsyncPolicy::Batch);
    let bytes = std::fs::metadata(&log).unwrap().len();
    let files = vec![log.clone()];
    let lines = std::fs::read(&log)
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    println!(
        "generated audit log: {lines} records, {} MB, {} payloads, in {:.1} s",
        bytes >> 20,
        truth.len(),
        t0.elapsed().as_secs_f64()
    );

    // Warm the page cache as a repeated incident query would find it.
    let _ = query::who(&files, &Subject::Uid(51000), t("2026-11-01 00:00")).unwrap();
    let mut worst = Duration::ZERO;
    for (i, p) in truth.iter().enumerate().step_by(truth.len() / 5 + 1) {
        let at = p.start + chrono::Duration::seconds(30);
        let t0 = Instant::now();
        let held = query::who(&files, &Subject::Uid(p.uid), at).unwrap();
        let d = t0.elapsed();
        worst = worst.max(d);
        assert!(held.iter().any(|h| h.payload_id == p.id), "payload {i}");
        println!(
            "audit who --uid {} --at {}: {} holder(s) in {:.3} s",
            p.uid,
            at.format("%Y-%m-%dT%H:%M:%SZ"),
            held.len(),
            d.as_secs_f64()
        );
    }
    // Near the end of the log, where payloads still run (no end record): the second pass
    // looks for their ends from the earliest such start on.
    let last = truth.last().unwrap();
    let t0 = Instant::now();
    let held = query::who(&files, &Subject::Uid(last.uid), last.start).unwrap();
    let d = t0.elapsed();
    worst = worst.max(d);
    println!(
        "audit who --uid {} at the log's end (running payloads): {} holder(s) in {:.3} s",
        last.uid,
        held.len(),
        d.as_secs_f64()
    );
    let t0 = Instant::now();
    let held = query::who(
        &files,
        &Subject::Account("mpu-user042".into()),
        t("2026-11-05 12:00"),
    )
    .unwrap();
    let d = t0.elapsed();
    worst = worst.max(d);
    println!(
        "audit who --account mpu-user042: {} holder(s) in {:.3} s",
        held.len(),
        d.as_secs_f64()
    );
    println!(
        "audit who worst: {:.3} s (target < 1 s)",
        worst.as_secs_f64()
    );

    let t0 = Instant::now();
    let l = query::list_lines(
        &files,
        &Filter {
            owner_dn: Some(records_support::owner_dn(42)),
            ..Filter::default()
        },
    )
    .unwrap();
    println!(
        "audit list --owner: {} records in {:.3} s",
        l.len(),
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let open = query::open_starts(&files).unwrap();
    println!(
        "open starts: {} in {:.3} s",
        open.len(),
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let r = verify_files(&files, &[], true).unwrap();
    assert!(r.intact());
    println!(
        "audit verify: {} records in {:.3} s ({:.0} MB/s)",
        r.records,
        t0.elapsed().as_secs_f64(),
        (bytes >> 20) as f64 / t0.elapsed().as_secs_f64()
    );
}
