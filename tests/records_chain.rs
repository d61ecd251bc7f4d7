//! Tamper evidence of the hash-chained log: every kind of change is found at the right line,
//! a torn tail is reported, and anchors reveal a truncated or rewritten tail.

mod records_support;

use std::io::Write;
use std::path::{Path, PathBuf};

use mupilot::records::{
    anchor, verify_file, verify_files, Anchor, ChainWriter, FsyncPolicy, GENESIS,
};
use records_support::write_audit_log;
use sha2::Digest;

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put(p: &Path, ls: &[String]) {
    std::fs::write(p, ls.join("\n") + "\n").unwrap();
}

fn hash(line: &str) -> String {
    hex::encode(sha2::Sha256::digest(line.as_bytes()))
}

fn log(dir: &Path, n: u64) -> (PathBuf, Vec<String>) {
    let p = dir.join("audit.jsonl");
    write_audit_log(&p, n, FsyncPolicy::Never);
    let l = lines(&p);
    assert_eq!(verify_file(&p).unwrap().first_break, None);
    (p, l)
}

fn break_line(p: &Path) -> u64 {
    verify_file(p)
        .unwrap()
        .first_break
        .expect("tampering must be found")
        .line
}

#[test]
fn changed_byte_anywhere_is_found_at_the_next_line() {
    let dir = tempfile::tempdir().unwrap();
    let (p, orig) = log(dir.path(), 200);
    for i in [0usize, 1, 57, 198] {
        let mut l = orig.clone();
        // Flip one byte inside the record body (a digit of the uid or a letter of a field).
        let mut bytes = l[i].clone().into_bytes();
        let pos = bytes.len() - 10;
        bytes[pos] = if bytes[pos] == b'1' { b'2' } else { b'1' };
        l[i] = String::from_utf8(bytes).unwrap();
        put(&p, &l);
        assert_eq!(break_line(&p), i as u64 + 2, "edit of line {}", i + 1);
    }
}

#[test]
fn deleted_swapped_and_inserted_lines_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let (p, orig) = log(dir.path(), 100);
    // Deleted: the line after the hole does not chain to the one before it.
    for i in [0usize, 10, 98] {
        let mut l = orig.clone();
        l.remove(i);
        put(&p, &l);
        assert_eq!(break_line(&p), i as u64 + 1, "deleting line {}", i + 1);
    }
    // Two lines swapped.
    for i in [0usize, 40, 98] {
        let mut l = orig.clone();
        l.swap(i, i + 1);
        put(&p, &l);
        assert_eq!(
            break_line(&p),
            i as u64 + 1,
            "swapping lines {} and {}",
            i + 1,
            i + 2
        );
    }
    // A forged line inserted, chained correctly to its predecessor: the line after it breaks.
    for i in [1usize, 50, 99] {
        let mut l = orig.clone();
        let forged = format!(
            "{{\"seq\":{},\"prev\":\"{}\",\"event\":\"end\",\"payload_id\":\"p0000003\"}}",
            i + 1,
            hash(&l[i - 1])
        );
        l.insert(i, forged);
        put(&p, &l);
        assert_eq!(break_line(&p), i as u64 + 2, "forged line at {}", i + 1);
    }
    // A forged line with a wrong prev is found on the spot.
    let mut l = orig.clone();
    l.insert(
        5,
        format!("{{\"seq\":6,\"prev\":\"{GENESIS}\",\"event\":\"start\"}}"),
    );
    put(&p, &l);
    assert_eq!(break_line(&p), 6);
    // A line that is not a record at all, with the chain continuing after it, still breaks
    // when it replaced a record.
    let mut l = orig.clone();
    l[20] = "garbage".into();
    put(&p, &l);
    assert_eq!(break_line(&p), 22);
}

#[test]
fn torn_tail_is_reported_and_the_chain_continues_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p, orig) = log(dir.path(), 30);
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(&orig[5].as_bytes()[..40]).unwrap();
    drop(f);
    let r = verify_file(&p).unwrap();
    let b = r.first_break.unwrap();
    assert_eq!(b.line, 31);
    assert!(b.reason.contains("torn"), "{}", b.reason);
    // The writer terminates the torn line and continues the chain after it; the torn line is
    // then reported as a crash artefact, not a break.
    let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Always).unwrap();
    assert_eq!(w.torn_tail(), Some(31));
    assert_eq!(w.head().0, 30);
    w.append(&serde_json::json!({"time": "2026-11-23T00:00:00Z", "event": "lost"}))
        .unwrap();
    drop(w);
    let r = verify_file(&p).unwrap();
    assert_eq!(r.first_break, None);
    assert_eq!(r.torn_lines, vec![31]);
    assert_eq!(r.last_seq, 31);
}

#[test]
fn anchors_reveal_truncated_and_rewritten_tails() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    write_audit_log(&p, 50, FsyncPolicy::Never);
    let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Always).unwrap();
    let a = anchor::anchor(&mut w, "wn01.example.org").unwrap().unwrap();
    assert_eq!(a.seq, 50);
    drop(w);
    let all = lines(&p);
    assert_eq!(all.len(), 51);
    let rec: serde_json::Value = serde_json::from_str(&all[50]).unwrap();
    assert_eq!(rec["event"], "anchor");
    assert_eq!(rec["anchor_seq"], 50);
    assert_eq!(rec["anchor_hash"], a.hash.as_str());
    let files = vec![p.clone()];

    // Intact: the anchor matches.
    let r = verify_files(&files, std::slice::from_ref(&a), true).unwrap();
    assert!(r.intact(), "{r:?}");

    // The syslog line parses back to the same anchor.
    let msg = anchor::anchor_message(&p, &a);
    let line = format!("Nov 23 03:12:00 wn01 mupilot-switch[812]: {msg}");
    assert_eq!(anchor::parse_anchor_line(&line), Some(a.clone()));

    // Truncated tail: the chain alone looks fine, the anchor does not.
    put(&p, &all[..40]);
    assert_eq!(verify_file(&p).unwrap().first_break, None);
    let r = verify_files(&files, std::slice::from_ref(&a), true).unwrap();
    assert!(!r.intact());
    assert!(r.anchors[0].detail.contains("truncated"), "{:?}", r.anchors);

    // Tail rewritten consistently (the attacker recomputes the chain): only the anchor shows it.
    let mut forged = all[..45].to_vec();
    for seq in 46..=50u64 {
        let prev = hash(forged.last().unwrap());
        forged.push(format!(
            "{{\"seq\":{seq},\"prev\":\"{prev}\",\"time\":\"2026-11-01T00:00:00Z\",\"event\":\"end\"}}"
        ));
    }
    put(&p, &forged);
    assert_eq!(verify_file(&p).unwrap().first_break, None);
    let r = verify_files(&files, std::slice::from_ref(&a), true).unwrap();
    assert!(!r.intact());
    assert!(r.anchors[0].detail.contains("rewritten"), "{:?}", r.anchors);

    // Editing the very last record is invisible to the chain but not to an anchor on it.
    let mut edited = all.clone();
    edited[49] = edited[49].replacen("2026-11", "2026-12", 1);
    assert_ne!(edited[49], all[49]);
    put(&p, &edited[..50]);
    assert_eq!(verify_file(&p).unwrap().first_break, None);
    assert!(!verify_files(&files, &[a], true).unwrap().intact());
}

#[test]
fn anchor_argument_parses_and_rejects_bad_values() {
    let h = "ab".repeat(32);
    assert_eq!(
        format!("12:{h}").parse::<Anchor>().unwrap(),
        Anchor {
            seq: 12,
            hash: h.clone()
        }
    );
    assert!("12".parse::<Anchor>().is_err());
    assert!("x:ab".parse::<Anchor>().is_err());
    assert!(format!("12:{}", &h[..10]).parse::<Anchor>().is_err());
}
