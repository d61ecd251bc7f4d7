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

/// `mupilot-switch audit verify --log P`: exit code and output.
fn verify_cli(p: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mupilot-switch"))
        .args(["audit", "verify", "--log"])
        .arg(p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
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
    // A line that is not a record at all breaks the chain where it stands.
    let mut l = orig.clone();
    l[20] = "garbage".into();
    put(&p, &l);
    assert_eq!(break_line(&p), 21);
}

#[test]
fn junk_between_intact_records_is_a_break_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (p, orig) = log(dir.path(), 40);
    // Every record is still there and chains to the one before it; the extra line is junk,
    // whatever it looks like: only the last line of a log may be torn.
    let junk = [
        "garbage".to_string(),
        orig[5][..40].to_string(), // looks like a record torn by a crash
        String::new(),             // an empty line
        "{\"event\":\"start\"}".to_string(),
    ];
    for (i, j) in [1usize, 17, 39, 40].iter().zip(junk.iter().cycle()) {
        for junk in [j, &junk[3]] {
            let mut l = orig.clone();
            l.insert(*i, junk.clone());
            put(&p, &l);
            let b = verify_file(&p)
                .unwrap()
                .first_break
                .expect("junk must break");
            assert_eq!(b.line, *i as u64 + 1, "junk {junk:?} at line {}", i + 1);
            assert!(
                b.reason.contains("not a chained") || b.reason.contains("empty line"),
                "{}",
                b.reason
            );
        }
    }
    // The command names it as broken, with its line, and never as torn.
    let mut l = orig.clone();
    l.insert(17, orig[5][..40].to_string());
    put(&p, &l);
    let (code, text) = verify_cli(&p);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("BROKEN at line 18"), "{text}");
    assert!(!text.contains("is torn"), "{text}");
}

#[test]
fn torn_tail_is_reported_and_the_writer_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p, orig) = log(dir.path(), 30);
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(&orig[5].as_bytes()[..40]).unwrap();
    drop(f);
    // A torn last line is a write cut short (crash, full disk), not a break.
    let r = verify_file(&p).unwrap();
    assert_eq!(
        (r.first_break, r.torn_tail, r.records),
        (None, Some(31), 30)
    );
    let (code, text) = verify_cli(&p);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("the last line (31) is torn"), "{text}");
    // The writer cuts it off and records that it did; the chain goes on from record 30.
    let mut w = ChainWriter::open(&p, 0o600, FsyncPolicy::Always).unwrap();
    assert_eq!(w.torn_tail(), Some(31));
    assert_eq!(w.head().0, 31);
    w.append(&serde_json::json!({"time": "2026-11-23T00:00:00Z", "event": "lost"}))
        .unwrap();
    drop(w);
    let l = lines(&p);
    assert_eq!(l.len(), 32);
    let torn: serde_json::Value = serde_json::from_str(&l[30]).unwrap();
    assert_eq!(torn["event"], "torn");
    assert_eq!(torn["removed_bytes"], 40);
    assert_eq!(torn["removed_sha256"], hash(&orig[5][..40]));
    let r = verify_file(&p).unwrap();
    assert_eq!((r.first_break, r.torn_tail, r.last_seq), (None, None, 32));
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
