//! Rotation keeps one chain across files, retention deletes only old rotated files, and the
//! batched fsync policy keeps every record.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mupilot::records::rotate::{
    self, apply_retention, chain_files, rotated_files, DEFAULT_RETENTION,
};
use mupilot::records::{
    verify_file, verify_files, BatchLimits, ChainWriter, FsyncPolicy, RotatePolicy, GENESIS,
};
use serde_json::json;
use sha2::Digest;

fn rec(i: u64, time: &str) -> serde_json::Value {
    json!({"time": time, "event": "start", "payload_id": format!("p{i}"), "uid": 51000 + i % 7})
}

fn first_and_last_lines(p: &Path) -> (String, String) {
    let s = std::fs::read_to_string(p).unwrap();
    let l: Vec<&str> = s.lines().collect();
    (l[0].to_string(), l[l.len() - 1].to_string())
}

fn assert_chained_across(files: &[PathBuf]) {
    for pair in files.windows(2) {
        let (_, last) = first_and_last_lines(&pair[0]);
        let (first, _) = first_and_last_lines(&pair[1]);
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(
            v["prev"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(last.as_bytes())),
            "{} does not continue {}",
            pair[1].display(),
            pair[0].display()
        );
    }
}

#[test]
fn size_rotation_keeps_one_chain_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let policy = RotatePolicy {
        max_bytes: Some(4096),
        max_age: None,
        retention: None,
    };
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(policy);
    for i in 0..150 {
        w.append(&rec(i, "2026-11-23T00:00:00.000000Z")).unwrap();
    }
    // Rotate explicitly, then reopen with an empty current file: the chain continues from the
    // newest rotated file.
    assert!(w.rotate().unwrap().is_some());
    drop(w);
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(policy);
    assert_eq!(w.head().0, 150);
    for i in 150..200 {
        w.append(&rec(i, "2026-11-23T00:00:00.000000Z")).unwrap();
    }
    drop(w);

    let files = chain_files(&log).unwrap();
    assert!(files.len() > 5, "{files:?}");
    assert_eq!(files.last().unwrap(), &log);
    for f in &files[..files.len() - 1] {
        assert!(std::fs::metadata(f).unwrap().len() <= 4096 + 200);
        assert!(rotate::rotated_at(&log, f).is_some());
    }
    assert_chained_across(&files);
    let r = verify_files(&files, &[], true).unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!((r.records, r.first_seq, r.last_seq), (200, 1, 200));
    // A single rotated-away file does not verify from genesis on its own, but the set does.
    assert!(verify_file(&files[1]).unwrap().first_break.is_some());

    // Deleting a middle file breaks the chain at the first line of the next one.
    std::fs::remove_file(&files[2]).unwrap();
    let rest: Vec<PathBuf> = chain_files(&log).unwrap();
    let r = verify_files(&rest, &[], true).unwrap();
    let (path, b) = r.first_break.unwrap();
    assert_eq!(path, files[3]);
    assert_eq!(b.line, 1);
}

#[test]
fn age_rotation_uses_record_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let policy = RotatePolicy {
        max_bytes: None,
        max_age: Some(Duration::from_secs(86400)),
        retention: None,
    };
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(policy);
    // Five days, one record every 6 hours: a new file roughly every day.
    for i in 0..20u64 {
        let t = format!("2026-11-{:02}T{:02}:00:00.000000Z", 1 + i / 4, (i % 4) * 6);
        w.append(&rec(i, &t)).unwrap();
    }
    drop(w);
    let files = chain_files(&log).unwrap();
    assert_eq!(files.len(), 5, "{files:?}");
    assert_chained_across(&files);
    assert!(verify_files(&files, &[], true).unwrap().intact());
}

fn touch(p: &Path) {
    std::fs::write(p, "").unwrap();
}

#[test]
fn retention_deletes_only_old_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let now = chrono::Utc::now();
    let old = rotate::rotated_name(&log, now - chrono::Duration::days(200));
    let edge = rotate::rotated_name(&log, now - chrono::Duration::days(179));
    let recent = rotate::rotated_name(&log, now - chrono::Duration::days(3));
    for p in [&old, &edge, &recent, &log] {
        touch(p);
    }
    let unrelated = [
        dir.path().join("audit.jsonl.bak"),
        dir.path().join("other.jsonl.20200101T000000.000000Z"),
        dir.path().join("audit.jsonl.1"),
    ];
    for p in &unrelated {
        touch(p);
    }
    assert_eq!(DEFAULT_RETENTION, Duration::from_secs(180 * 86400));
    let deleted = apply_retention(&log, DEFAULT_RETENTION, now).unwrap();
    assert_eq!(deleted, vec![old.clone()]);
    assert!(!old.exists());
    for p in [&edge, &recent, &log] {
        assert!(p.exists(), "{} must stay", p.display());
    }
    for p in &unrelated {
        assert!(p.exists(), "{} must stay", p.display());
    }
    assert_eq!(rotated_files(&log).unwrap(), vec![edge, recent]);
}

#[test]
fn retention_during_rotation_and_verification_of_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
    for i in 0..10 {
        w.append(&rec(i, "2026-01-01T00:00:00Z")).unwrap();
    }
    drop(w);
    // Pretend this file was rotated 200 days ago.
    let aged = rotate::rotated_name(&log, chrono::Utc::now() - chrono::Duration::days(200));
    std::fs::rename(&log, &aged).unwrap();
    let policy = RotatePolicy {
        max_bytes: Some(1),
        max_age: None,
        retention: Some(DEFAULT_RETENTION),
    };
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(policy);
    assert_eq!(w.head().0, 10);
    for i in 10..13 {
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    drop(w);
    assert!(!aged.exists(), "the 200-day-old file is past retention");
    let files = chain_files(&log).unwrap();
    // Rotated: [11], [12: the retention record, 13]; current: [14].
    assert_eq!(files.len(), 3, "{files:?}");
    let retention: serde_json::Value =
        serde_json::from_str(&first_and_last_lines(&files[1]).0).unwrap();
    assert_eq!(retention["event"], "retention");
    assert_eq!(retention["first_seq"], 11);
    assert_eq!(
        retention["deleted"][0].as_str().unwrap(),
        aged.file_name().unwrap().to_str().unwrap()
    );
    // From genesis the set is incomplete; from its first retained record it is intact,
    // because the retention record accounts for the missing records.
    assert!(!verify_files(&files, &[], true).unwrap().intact());
    let r = verify_files(&files, &[], false).unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!((r.first_seq, r.last_seq, r.records), (11, 14, 4));
    let first: serde_json::Value =
        serde_json::from_str(&first_and_last_lines(&files[0]).0).unwrap();
    assert_ne!(first["prev"], GENESIS);

    // Deleting the oldest retained file is not retention: verification says so.
    std::fs::remove_file(&files[0]).unwrap();
    let r = verify_files(&files[1..], &[], false).unwrap();
    let (path, b) = r
        .first_break
        .expect("deletion of the oldest file must be found");
    assert_eq!((path, b.line), (files[1].clone(), 1));
    assert!(b.reason.contains("no retention record"), "{}", b.reason);
}

#[test]
fn deleting_the_first_records_of_a_log_is_found_without_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
    for i in 0..10 {
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    drop(w);
    let s = std::fs::read_to_string(&log).unwrap();
    let rest: Vec<&str> = s.lines().skip(3).collect();
    std::fs::write(&log, rest.join("\n") + "\n").unwrap();
    let files = chain_files(&log).unwrap();
    for from_genesis in [true, false] {
        let r = verify_files(&files, &[], from_genesis).unwrap();
        assert_eq!(
            r.first_break.map(|(_, b)| b.line),
            Some(1),
            "from_genesis {from_genesis}"
        );
    }
}

#[test]
fn batch_fsync_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Batch)
        .unwrap()
        .with_batch_limits(BatchLimits {
            max_records: 500,
            max_delay: Duration::from_millis(50),
        });
    w.start_background_sync(Duration::from_millis(20)).unwrap();
    for i in 0..5000 {
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(60));
    w.sync().unwrap();
    drop(w);
    let r = verify_file(&log).unwrap();
    assert_eq!((r.records, r.first_break), (5000, None));
    let meta = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&log).unwrap());
    assert_eq!(meta & 0o777, 0o600);
}

fn verify_cli(log: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mupilot-switch"))
        .args(["audit", "verify", "--log"])
        .arg(log)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

const RETENTION_NOTE: &str = "deleted by retention";

#[test]
fn deleting_line_one_gives_no_retention_note_and_retention_does() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
    for i in 0..5 {
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    drop(w);
    let s = std::fs::read_to_string(&log).unwrap();
    let rest: Vec<&str> = s.lines().skip(1).collect();
    std::fs::write(&log, rest.join("\n") + "\n").unwrap();
    let (code, text) = verify_cli(&log);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("BROKEN at line 1"), "{text}");
    assert!(text.contains("no retention record"), "{text}");
    assert!(!text.contains(RETENTION_NOTE), "{text}");
    let r = verify_files(&chain_files(&log).unwrap(), &[], false).unwrap();
    assert!(!r.starts_after_retention);

    // A set cut by retention: the note, and only then.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never).unwrap();
    for i in 0..5 {
        w.append(&rec(i, "2026-01-01T00:00:00Z")).unwrap();
    }
    drop(w);
    let aged = rotate::rotated_name(&log, chrono::Utc::now() - chrono::Duration::days(200));
    std::fs::rename(&log, &aged).unwrap();
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(RotatePolicy {
            max_bytes: Some(1),
            max_age: None,
            retention: Some(DEFAULT_RETENTION),
        });
    for i in 5..8 {
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    drop(w);
    let (code, text) = verify_cli(&log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(RETENTION_NOTE), "{text}");
}

/// A rotated set of three files (rotated, rotated, current), 10 records each.
fn rotated_set(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let log = dir.join("audit.jsonl");
    let mut w = ChainWriter::open(&log, 0o600, FsyncPolicy::Never)
        .unwrap()
        .with_rotation(RotatePolicy {
            max_bytes: None,
            max_age: None,
            retention: None,
        });
    for i in 0..30 {
        if i > 0 && i % 10 == 0 {
            w.rotate().unwrap();
        }
        w.append(&rec(i, "2026-11-23T00:00:00Z")).unwrap();
    }
    drop(w);
    let files = chain_files(&log).unwrap();
    assert_eq!(files.len(), 3);
    assert!(verify_files(&files, &[], true).unwrap().intact());
    (log, files)
}

fn insert_line(p: &Path, at: usize, line: &str) {
    let s = std::fs::read_to_string(p).unwrap();
    let mut l: Vec<&str> = s.lines().collect();
    l.insert(at, line);
    std::fs::write(p, l.join("\n") + "\n").unwrap();
}

#[test]
fn only_the_current_files_last_line_may_be_torn_in_a_rotated_set() {
    let dir = tempfile::tempdir().unwrap();
    let (log, files) = rotated_set(dir.path());
    let orig: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let restore = || {
        for (f, b) in files.iter().zip(&orig) {
            std::fs::write(f, b).unwrap();
        }
    };
    let fragment = "{\"seq\":11,\"prev\":\"0a1b";

    // Torn last line of the current file: intact, reported as torn.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, fragment.as_bytes()).unwrap();
    drop(f);
    let r = verify_files(&files, &[], false).unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!(r.files[2].torn_tail, Some(11));
    let (code, text) = verify_cli(&log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("the last line (11) is torn"), "{text}");
    restore();

    // Torn last line of a rotated file: a rotated file always ends complete: broken.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&files[0])
        .unwrap();
    std::io::Write::write_all(&mut f, fragment.as_bytes()).unwrap();
    drop(f);
    let r = verify_files(&files, &[], false).unwrap();
    let (path, b) = r.first_break.expect("a torn rotated file is broken");
    assert_eq!((path, b.line), (files[0].clone(), 11));
    assert!(b.reason.contains("rotated file"), "{}", b.reason);
    restore();

    // Junk in the middle of a rotated file, and at the end of one: broken at its line.
    for (file, at) in [(0usize, 4usize), (1, 10), (2, 0)] {
        insert_line(&files[file], at, fragment);
        let r = verify_files(&files, &[], false).unwrap();
        let (path, b) = r.first_break.expect("junk is a break");
        assert_eq!((path, b.line), (files[file].clone(), at as u64 + 1));
        let (code, text) = verify_cli(&log);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(&format!("BROKEN at line {}", at + 1)),
            "{text}"
        );
        assert!(!text.contains("is torn"), "{text}");
        restore();
    }
    assert!(verify_files(&files, &[], false).unwrap().intact());
}
