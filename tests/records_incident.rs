//! docs/incident-response.md is executable: this test builds the audit log and the pilot trace
//! the walkthrough describes, runs every `$ mupilot-switch audit ...` and `$ mupilot trace ...`
//! command shown in its ```console blocks, and asserts the output the document shows (paths
//! mapped from the temporary directory to the documented ones). `audit kill` talks to a
//! stand-in for the helper's admin side on a temporary socket (the daemon side is tested with
//! the daemon). Set RECORDS_DOC_PRINT=1 to print the actual outputs instead of failing.
//!
//! The records are not written by hand: every one is a record of a real run, the one
//! scripts/vm-test-systemd.sh makes (the .deb installed under systemd on Debian 12, a pilot in a
//! Slurm job's environment, real payloads as real accounts), kept in tests/data/incident/. Each
//! walkthrough record is the real record of the same kind with the story's values (times, ids,
//! host, pilot, accounts, usage, digests) put in the fields the real record has; every other
//! field keeps what the real helper or pilot wrote, the real payload id inside it replaced by the
//! story's. A field the product adds, drops or renames thus reaches the document (and fails this
//! test until the document shows it); scripts/vm-test-systemd.sh fails when a new real run's
//! records no longer have the shape of the ones kept here (UPDATE_RECORDS=1 replaces them).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use clap::Parser;
use mupilot::pilot::trace_query as trace;
use mupilot::protocol::switch_wire::{read_frame, write_frame, SwitchEvent, SwitchRequest};
use mupilot::records::cli::Out;
use mupilot::records::{anchor, Anchor, ChainWriter, FsyncPolicy};
use mupilot::switch::audit_query as audit;
use serde_json::{json, Map, Value};

const DOC: &str = "docs/incident-response.md";
const REAL_AUDIT: &str = "tests/data/incident/audit.jsonl";
const REAL_TRACE: &str = "tests/data/incident/trace.jsonl";
const AUDIT_LOG: &str = "/var/log/mupilot/audit.jsonl";
const TRACE_LOG: &str = "/tmp/mupilot-wn17-4711/trace.jsonl";
const SOCKET: &str = "/run/mupilot/switch.sock";
const ALICE: &str = "/DC=org/DC=mupilot-demo/CN=alice";
const BOB: &str = "/DC=org/DC=mupilot-demo/CN=bob";
const CAROL: &str = "/DC=org/DC=mupilot-demo/CN=carol";
const PILOT_DN: &str = "/DC=org/DC=mupilot-demo/CN=pilot";
const HOST: &str = "wn17.example.org";
/// The story's pilot: Slurm job 4711's cgroup (Slurm's cgroup v2 layout), where the helper puts
/// payload cgroups.
const PILOT_CGROUP: &str = "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_4711/step_batch/user";

fn sha(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

struct P {
    id: &'static str,
    owner: &'static str,
    account: &'static str,
    uid: u32,
    start: &'static str,
    end: Option<&'static str>,
    cpu: f64,
}

const PAYLOADS: &[P] = &[
    P {
        id: "p-0099",
        owner: BOB,
        account: "mpu-bob",
        uid: 51024,
        start: "2026-11-23T02:58:00.000000Z",
        end: Some("2026-11-23T03:30:00.000000Z"),
        cpu: 1890.5,
    },
    P {
        id: "p-0101",
        owner: ALICE,
        account: "mpu-alice",
        uid: 51023,
        start: "2026-11-23T03:05:12.000000Z",
        end: Some("2026-11-23T03:20:41.000000Z"),
        cpu: 912.4,
    },
    P {
        id: "p-0102",
        owner: ALICE,
        account: "mpu-alice",
        uid: 51023,
        start: "2026-11-23T03:25:03.000000Z",
        end: None,
        cpu: 0.0,
    },
];

const CAROL_P: P = P {
    id: "p-0100",
    owner: CAROL,
    account: "",
    uid: 0,
    start: "2026-11-23T03:07:30.000000Z",
    end: None,
    cpu: 0.0,
};

/// The records of the real run, in order.
fn real(path: &str) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e} (scripts/vm-test-systemd.sh writes it)"));
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => m,
            _ => panic!("{path}: not a JSON object: {l}"),
        })
        .collect()
}

/// The first real record for which `pick` holds.
fn template(
    records: &[Map<String, Value>],
    what: &str,
    pick: impl Fn(&Map<String, Value>) -> bool,
) -> Map<String, Value> {
    records
        .iter()
        .find(|r| pick(r))
        .unwrap_or_else(|| panic!("the real run has no {what} record"))
        .clone()
}

fn is(r: &Map<String, Value>, key: &str, v: &str) -> bool {
    r.get(key).and_then(Value::as_str) == Some(v)
}

/// The real record `t` told as the story's: `story` values in the fields `t` has (and has a
/// value in), every other field as the real run wrote it with its payload id (and the pilot's
/// cgroup) replaced.
fn restage(t: &Map<String, Value>, story: &Value) -> Value {
    let story = story.as_object().unwrap();
    let real_id = t
        .get("payload_id")
        .and_then(Value::as_str)
        .unwrap_or("\u{0}");
    let story_id = story["payload_id"].as_str().unwrap();
    let mut out = Map::new();
    for (k, v) in t {
        if k == "seq" || k == "prev" {
            continue; // the writer chains them anew
        }
        let v = match (story.get(k), v) {
            // A field the real record leaves empty (the pilot's start record, written before
            // the helper answered, has no account yet) stays empty.
            (Some(_), Value::Null) => Value::Null,
            (Some(s), _) => s.clone(),
            (None, Value::String(s)) => {
                let s = s.replace(real_id, story_id);
                Value::String(match (k.as_str(), s.rfind('/')) {
                    ("cgroup", Some(i)) => format!("{PILOT_CGROUP}{}", &s[i..]),
                    _ => s,
                })
            }
            (None, v) => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// The story's values of one payload, for both logs.
fn story(p: &P, time: &str) -> Value {
    let mut v = json!({
        "time": time, "host": HOST, "helper_pid": 812, "pilot_uid": 990, "pilot_pid": 20417,
        "pilot_id": "wn17-4711", "batch_job_id": "4711", "pilot_dn": PILOT_DN, "batch_system": "slurm",
        "server_url": "https://vo.example.org:8443",
        "slot": {"cores": 8, "memory_bytes": 17179869184u64, "deadline_unix": 1795415400},
        "payload_id": p.id, "owner_dn": p.owner, "vo": "demo", "fqans": ["/demo"], "jobtag": "analysis",
        "argv_sha256": sha(&format!("argv {}", p.id)), "bundle_sha256": sha(&format!("bundle {}", p.id)),
        "envelope_sha256": sha(&format!("envelope {}", p.id)), "match_time": p.start,
    });
    let m = v.as_object_mut().unwrap();
    if !p.account.is_empty() {
        m.insert("account".into(), p.account.into());
        m.insert("uid".into(), p.uid.into());
        m.insert("gid".into(), p.uid.into());
        m.insert("start".into(), p.start.into());
    }
    if let Some(end) = p.end {
        m.insert("end".into(), end.into());
        m.insert("cpu_seconds".into(), p.cpu.into());
        m.insert("peak_memory_bytes".into(), 1073741824u64.into());
        let wall = (mupilot::records::parse_record_time(end).unwrap()
            - mupilot::records::parse_record_time(p.start).unwrap())
        .num_seconds() as f64;
        m.insert("wall_seconds".into(), wall.into());
    }
    v
}

/// The helper's audit log of the walkthrough; returns the anchor the helper sent to syslog.
fn build_audit(path: &Path) -> Anchor {
    let real = real(REAL_AUDIT);
    let start = |owner: &str| {
        template(&real, &format!("audit start of {owner}"), |r| {
            is(r, "event", "start") && is(r, "owner_dn", owner)
        })
    };
    let end = |owner: &str| {
        template(&real, &format!("audit end (exit code 0) of {owner}"), |r| {
            is(r, "event", "end")
                && is(r, "owner_dn", owner)
                && r.get("exit_code") == Some(&json!(0))
        })
    };
    let denied = template(&real, "audit denied (authorization) of carol", |r| {
        is(r, "event", "denied")
            && is(r, "owner_dn", CAROL)
            && is(r, "denial_class", "authorization")
    });
    let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Always).unwrap();
    let [bob, a1, a2] = [&PAYLOADS[0], &PAYLOADS[1], &PAYLOADS[2]];
    let mut put = |t: &Map<String, Value>, p: &P, time: &str| {
        w.append(&restage(t, &story(p, time))).unwrap();
    };
    put(&start(BOB), bob, bob.start);
    put(&start(ALICE), a1, a1.start);
    put(&denied, &CAROL_P, CAROL_P.start);
    put(&end(ALICE), a1, a1.end.unwrap());
    put(&start(ALICE), a2, a2.start);
    put(&end(BOB), bob, bob.end.unwrap());
    anchor::anchor_at(&mut w, HOST, "2026-11-23T04:00:00.000000Z")
        .unwrap()
        .unwrap()
}

/// The pilot's trace log of the walkthrough: a start record when the pilot matched a payload,
/// an end record when the helper reported its end or refusal.
fn build_trace(path: &Path) {
    let real = real(REAL_TRACE);
    let start = |owner: &str| {
        template(&real, &format!("trace start of {owner}"), |r| {
            is(r, "event", "start") && is(r, "owner_dn", owner)
        })
    };
    let end = |owner: &str| {
        template(&real, &format!("trace end (done) of {owner}"), |r| {
            is(r, "event", "end") && is(r, "owner_dn", owner) && is(r, "state", "done")
        })
    };
    let denied = template(&real, "trace end (denied) of carol", |r| {
        is(r, "event", "end") && is(r, "owner_dn", CAROL) && is(r, "decision", "deny")
    });
    let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Always).unwrap();
    let [bob, a1, a2] = [&PAYLOADS[0], &PAYLOADS[1], &PAYLOADS[2]];
    let mut put = |t: &Map<String, Value>, p: &P, time: &str| {
        w.append(&restage(t, &story(p, time))).unwrap();
    };
    put(&start(BOB), bob, bob.start);
    put(&start(ALICE), a1, a1.start);
    put(&start(CAROL), &CAROL_P, CAROL_P.start);
    put(&denied, &CAROL_P, CAROL_P.start);
    put(&end(ALICE), a1, a1.end.unwrap());
    put(&start(ALICE), a2, a2.start);
    put(&end(BOB), bob, bob.end.unwrap());
}

/// Splits a shell command line: words separated by spaces, double quotes group.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// (command, expected output) pairs from the ```console blocks of the document.
fn examples(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut cur: Option<(String, String)> = None;
    for line in doc.lines() {
        if !in_block {
            in_block = line.trim() == "```console";
            continue;
        }
        if line.trim() == "```" {
            in_block = false;
            out.extend(cur.take());
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            out.extend(cur.take());
            cur = Some((cmd.to_string(), String::new()));
        } else if let Some((_, o)) = cur.as_mut() {
            o.push_str(line);
            o.push('\n');
        }
    }
    out
}

#[derive(Parser)]
#[command(name = "mupilot-switch")]
enum Switch {
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

#[derive(Parser)]
#[command(name = "mupilot")]
enum Pilot {
    #[command(subcommand)]
    Trace(trace::TraceCommand),
}

fn fake_helper(sock: &Path) -> std::thread::JoinHandle<SwitchRequest> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (req, _): (SwitchRequest, _) = read_frame(&mut s).unwrap();
        let killed = SwitchEvent::Killed {
            payloads: vec!["p-0102".into()],
        };
        write_frame(&mut s, &killed, &[]).unwrap();
        req
    })
}

#[test]
fn incident_response_walkthrough_runs_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let audit_log = dir.path().join("audit.jsonl");
    let trace_log = dir.path().join("trace.jsonl");
    let sock: PathBuf = dir.path().join("rec-switch.sock");
    let anchor = build_audit(&audit_log);
    build_trace(&trace_log);
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC);
    let mut doc = std::fs::read_to_string(&doc_path).unwrap();
    let print = std::env::var_os("RECORDS_DOC_PRINT").is_some();
    let write = std::env::var_os("RECORDS_DOC_WRITE").is_some();
    let anchor_msg = anchor::anchor_message(Path::new(AUDIT_LOG), &anchor);
    if write {
        // The document's anchor becomes this chain's, in the journal line and in the commands.
        if let Some(old) = doc.lines().find_map(anchor::parse_anchor_line) {
            doc = doc.replace(
                &format!("--anchor {}:{}", old.seq, old.hash),
                &format!("--anchor {}:{}", anchor.seq, anchor.hash),
            );
        }
        doc = doc
            .lines()
            .map(|l| match l.find("mupilot log anchor ") {
                Some(i) => format!("{}{anchor_msg}\n", &l[..i]),
                None => format!("{l}\n"),
            })
            .collect();
    }
    let examples = examples(&doc);
    assert!(examples.len() >= 8, "the walkthrough lost its examples");
    let map = |s: &str| {
        s.replace(&audit_log.display().to_string(), AUDIT_LOG)
            .replace(&trace_log.display().to_string(), TRACE_LOG)
            .replace(&sock.display().to_string(), SOCKET)
    };
    let mut ran = 0;
    let mut outputs = Vec::new();
    for (cmd, want) in &examples {
        let words = shell_words(cmd);
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let mut io = Out {
            out: &mut o,
            err: &mut e,
        };
        let code = match words[0].as_str() {
            "mupilot-switch" => {
                let Switch::Audit(c) =
                    Switch::try_parse_from(&words).unwrap_or_else(|e| panic!("{cmd}: {e}"));
                let helper = matches!(c, audit::AuditCommand::Kill(_)).then(|| fake_helper(&sock));
                let code = audit::audit_main(&c, &audit_log, &sock, &mut io);
                if let Some(h) = helper {
                    assert_eq!(
                        h.join().unwrap(),
                        SwitchRequest::AdminKill {
                            owner_dn: ALICE.into(),
                            ban: true
                        }
                    );
                    std::fs::remove_file(&sock).unwrap();
                }
                code
            }
            "mupilot" => {
                let Pilot::Trace(c) =
                    Pilot::try_parse_from(&words).unwrap_or_else(|e| panic!("{cmd}: {e}"));
                trace::trace_main(&c, &trace_log, &mut io)
            }
            "journalctl" => {
                // What the helper sent to syslog when it anchored the chain.
                outputs.push(want.clone());
                if !print {
                    assert!(
                        want.trim_end().ends_with(&anchor_msg),
                        "{cmd}: expected {anchor_msg}"
                    );
                    assert_eq!(anchor::parse_anchor_line(want), Some(anchor.clone()));
                }
                continue;
            }
            other => panic!("the walkthrough shows a command the test cannot run: {other}"),
        };
        ran += 1;
        let got = map(&String::from_utf8(o).unwrap()) + &map(&String::from_utf8(e).unwrap());
        let want_code = if want.starts_with("nobody") || want.contains("NOT intact") {
            1
        } else {
            0
        };
        if print {
            println!("$ {cmd}\n{got}[exit {code}]\n");
        } else if !write {
            assert_eq!(
                &got, want,
                "output of `{cmd}` differs from {DOC} (RECORDS_DOC_WRITE=1 rewrites its examples)"
            );
        }
        assert_eq!(code, want_code, "exit code of `{cmd}`");
        outputs.push(got);
    }
    assert!(ran >= 8);
    if write {
        std::fs::write(&doc_path, with_outputs(&doc, &outputs)).unwrap();
        return;
    }
    // The anchor the walkthrough verifies against is the one in the document.
    assert!(doc.contains(&format!("--anchor {}:{}", anchor.seq, anchor.hash)) || print);
}

/// The document with each example's output replaced by `outputs` (in the order of [`examples`]).
fn with_outputs(doc: &str, outputs: &[String]) -> String {
    let mut out = String::new();
    let mut next = outputs.iter();
    let (mut in_block, mut skipping) = (false, false);
    for line in doc.lines() {
        if !in_block {
            in_block = line.trim() == "```console";
        } else if line.trim() == "```" {
            in_block = false;
            skipping = false;
        } else if line.starts_with("$ ") {
            out.push_str(line);
            out.push('\n');
            out.push_str(next.next().expect("an output per example"));
            skipping = true;
            continue;
        }
        if !skipping || !in_block {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
