//! docs/incident-response.md is executable: this test builds the audit log and the pilot trace
//! the walkthrough describes, runs every `$ mupilot-switch audit ...` and `$ mupilot trace ...`
//! command shown in its ```console blocks, and asserts the output the document shows (paths
//! mapped from the temporary directory to the documented ones). `audit kill` talks to a
//! stand-in for the helper's admin side on a temporary socket (the daemon side is tested with
//! the daemon). Set RECORDS_DOC_PRINT=1 to print the actual outputs instead of failing.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use clap::Parser;
use mupilot::protocol::switch_wire::{read_frame, write_frame, SwitchEvent, SwitchRequest};
use mupilot::records::cli::{self, Out};
use mupilot::records::{anchor, Anchor, ChainWriter, FsyncPolicy};
use serde_json::{json, Value};

const DOC: &str = "docs/incident-response.md";
const AUDIT_LOG: &str = "/var/log/mupilot/audit.jsonl";
const TRACE_LOG: &str = "/tmp/mupilot-wn17-4711/trace.jsonl";
const SOCKET: &str = "/run/mupilot/switch.sock";
const ALICE: &str = "/DC=org/DC=mupilot-demo/CN=alice";
const BOB: &str = "/DC=org/DC=mupilot-demo/CN=bob";
const CAROL: &str = "/DC=org/DC=mupilot-demo/CN=carol";
const PILOT_DN: &str = "/DC=org/DC=mupilot-demo/CN=pilot";
const HOST: &str = "wn17.example.org";

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

fn cgroup(p: &P) -> String {
    format!(
        "/sys/fs/cgroup/memory/slurm/uid_990/job_4711/payload-{}",
        p.id
    )
}

fn audit_start(p: &P) -> Value {
    json!({
        "time": p.start, "event": "start", "host": HOST, "helper_pid": 812, "pilot_uid": 990,
        "pilot_pid": 20417, "pilot_id": "wn17-4711", "batch_job_id": "4711", "pilot_dn": PILOT_DN,
        "payload_id": p.id, "owner_dn": p.owner, "vo": "demo", "fqans": ["/demo"],
        "jobtag": "analysis", "decision": "permit", "account": p.account, "uid": p.uid, "gid": p.uid,
        "cgroup": cgroup(p), "scratch": format!("/var/lib/mupilot/scratch/{}", p.id),
        "argv_sha256": sha(&format!("argv {}", p.id)), "bundle_sha256": sha(&format!("bundle {}", p.id)),
        "envelope_sha256": sha(&format!("envelope {}", p.id)), "start": p.start,
    })
}

fn audit_end(p: &P) -> Value {
    json!({
        "time": p.end.unwrap(), "event": "end", "host": HOST, "helper_pid": 812, "pilot_id": "wn17-4711",
        "batch_job_id": "4711", "payload_id": p.id, "owner_dn": p.owner, "vo": "demo",
        "account": p.account, "uid": p.uid, "gid": p.uid, "start": p.start, "end": p.end.unwrap(),
        "exit_code": 0, "signal": null, "cpu_seconds": p.cpu, "peak_memory_bytes": 1073741824u64,
        "kill_reason": null,
    })
}

fn carol_denied() -> Value {
    json!({
        "time": "2026-11-23T03:07:30.000000Z", "event": "denied", "host": HOST, "helper_pid": 812,
        "pilot_uid": 990, "pilot_pid": 20417, "pilot_id": "wn17-4711", "batch_job_id": "4711",
        "pilot_dn": PILOT_DN, "payload_id": "p-0100", "owner_dn": CAROL, "vo": "demo", "fqans": ["/demo"],
        "jobtag": "analysis", "decision": "deny", "denial_class": "authorization",
        "reason": "no grid-mapfile entry for the owner",
        "envelope_sha256": sha("envelope p-0100"),
    })
}

/// The helper's audit log of the walkthrough; returns the anchor the helper sent to syslog.
fn build_audit(path: &Path) -> Anchor {
    let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Always).unwrap();
    let [bob, a1, a2] = [&PAYLOADS[0], &PAYLOADS[1], &PAYLOADS[2]];
    w.append(&audit_start(bob)).unwrap();
    w.append(&audit_start(a1)).unwrap();
    w.append(&carol_denied()).unwrap();
    w.append(&audit_end(a1)).unwrap();
    w.append(&audit_start(a2)).unwrap();
    w.append(&audit_end(bob)).unwrap();
    anchor::anchor_at(&mut w, HOST, "2026-11-23T04:00:00.000000Z")
        .unwrap()
        .unwrap()
}

fn trace_common(p: &P) -> serde_json::Map<String, Value> {
    let v = json!({
        "pilot_id": "wn17-4711", "host": HOST, "server_url": "https://vo.example.org:8443",
        "batch_system": "slurm", "batch_job_id": "4711",
        "slot": {"cores": 8, "memory_bytes": 17179869184u64, "deadline_unix": 1795415400},
        "payload_id": p.id, "owner_dn": p.owner, "vo": "demo", "fqans": ["/demo"], "jobtag": "analysis",
        "envelope_sha256": sha(&format!("envelope {}", p.id)), "bundle_sha256": sha(&format!("bundle {}", p.id)),
    });
    v.as_object().unwrap().clone()
}

/// The pilot's trace log of the walkthrough.
fn build_trace(path: &Path) {
    let mut w = ChainWriter::open(path, 0o600, FsyncPolicy::Always).unwrap();
    let start = |p: &P| {
        let mut m = trace_common(p);
        m.insert("time".into(), p.start.into());
        m.insert("event".into(), "start".into());
        m.insert("match_time".into(), p.start.into());
        m.insert("decision".into(), "permit".into());
        m.insert("account".into(), p.account.into());
        m.insert("uid".into(), p.uid.into());
        m.insert("cgroup".into(), cgroup(p).into());
        Value::Object(m)
    };
    let end = |p: &P| {
        let mut m = trace_common(p);
        m.insert("time".into(), p.end.unwrap().into());
        m.insert("event".into(), "end".into());
        m.insert("account".into(), p.account.into());
        m.insert("uid".into(), p.uid.into());
        m.insert("exit_code".into(), 0.into());
        m.insert("cpu_seconds".into(), p.cpu.into());
        m.insert("peak_memory_bytes".into(), 1073741824u64.into());
        let wall = (mupilot::records::parse_record_time(p.end.unwrap()).unwrap()
            - mupilot::records::parse_record_time(p.start).unwrap())
        .num_seconds() as f64;
        m.insert("wall_seconds".into(), wall.into());
        m.insert("upload".into(), "ok".into());
        Value::Object(m)
    };
    let [bob, a1, a2] = [&PAYLOADS[0], &PAYLOADS[1], &PAYLOADS[2]];
    w.append(&start(bob)).unwrap();
    w.append(&start(a1)).unwrap();
    let carol = P {
        id: "p-0100",
        owner: CAROL,
        account: "",
        uid: 0,
        start: "",
        end: None,
        cpu: 0.0,
    };
    let mut m = trace_common(&carol);
    m.insert("time".into(), "2026-11-23T03:07:30.000000Z".into());
    m.insert("event".into(), "end".into());
    m.insert("decision".into(), "deny".into());
    m.insert("denial_class".into(), "authorization".into());
    m.insert(
        "reason".into(),
        "no grid-mapfile entry for the owner".into(),
    );
    w.append(&Value::Object(m)).unwrap();
    w.append(&end(a1)).unwrap();
    w.append(&start(a2)).unwrap();
    w.append(&end(bob)).unwrap();
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
    Audit(cli::AuditCommand),
}

#[derive(Parser)]
#[command(name = "mupilot")]
enum Pilot {
    #[command(subcommand)]
    Trace(cli::TraceCommand),
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
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC)).unwrap();
    let examples = examples(&doc);
    assert!(examples.len() >= 8, "the walkthrough lost its examples");
    let print = std::env::var_os("RECORDS_DOC_PRINT").is_some();
    let map = |s: &str| {
        s.replace(&audit_log.display().to_string(), AUDIT_LOG)
            .replace(&trace_log.display().to_string(), TRACE_LOG)
            .replace(&sock.display().to_string(), SOCKET)
    };
    let mut ran = 0;
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
                let helper = matches!(c, cli::AuditCommand::Kill(_)).then(|| fake_helper(&sock));
                let code = cli::audit_main(&c, &audit_log, &sock, &mut io);
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
                cli::trace_main(&c, &trace_log, &mut io)
            }
            "journalctl" if print => continue,
            "journalctl" => {
                // What the helper sent to syslog when it anchored the chain.
                let msg = anchor::anchor_message(Path::new(AUDIT_LOG), &anchor);
                assert!(want.trim_end().ends_with(&msg), "{cmd}: expected {msg}");
                assert_eq!(anchor::parse_anchor_line(want), Some(anchor.clone()));
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
            continue;
        }
        assert_eq!(&got, want, "output of `{cmd}` differs from {DOC}");
        assert_eq!(code, want_code, "exit code of `{cmd}`");
    }
    assert!(ran >= 8);
    // The anchor the walkthrough verifies against is the one in the document.
    assert!(doc.contains(&format!("--anchor {}:{}", anchor.seq, anchor.hash)) || print);
}
