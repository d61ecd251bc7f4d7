//! The real `mupilot-switch` daemon, as root, with a real VO key, grid-mapfile, accounts
//! (`mpt-swd-a`, `mpt-swd-p`) and callers of other uids: every refusal on the launch path, the
//! audit trail of each, and the end-to-end launch (a `system` denial until the sandbox exists).

mod switch_support;

use std::os::fd::AsRawFd;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{Duration, Utc};
use mupilot::protocol::switch_wire::{DenialClass, PilotHello, SwitchEvent, SwitchRequest};
use mupilot::protocol::SignedEnvelope;
use switch_support::*;

#[test]
fn hello_welcome_status_and_bad_frames() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::connect(&site.socket);
    // First frame must be hello.
    match c.call(&SwitchRequest::Status, &[]) {
        SwitchEvent::Error { reason } => assert!(reason.contains("must be hello"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut c = Client::connect(&site.socket);
    match c.call(&SwitchRequest::Hello(Client::default_hello()), &[]) {
        SwitchEvent::Welcome {
            host,
            helper_version,
        } => {
            assert!(!host.is_empty());
            assert_eq!(helper_version, env!("CARGO_PKG_VERSION"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call(&SwitchRequest::Status, &[]),
        SwitchEvent::Running { payloads: vec![] }
    );
    match c.call(&SwitchRequest::Hello(Client::default_hello()), &[]) {
        SwitchEvent::Error { reason } => assert!(reason.contains("already"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A frame that is not a request keeps the connection usable.
    c.send(&serde_json::json!({"type": "launch", "nonsense": 1}), &[]);
    assert!(matches!(c.recv(), SwitchEvent::Error { .. }));
    match c.call(
        &SwitchRequest::Signal {
            payload_id: "swd-none".into(),
            signal: 15,
            reason: None,
        },
        &[],
    ) {
        SwitchEvent::Signalled { ok, reason, .. } => {
            assert!(!ok);
            assert!(reason.unwrap().contains("not running for this pilot"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn caller_not_allowed_is_refused_at_the_socket() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let hello = serde_json::json!({"type": "hello", "pilot_id": "intruder"});
    let events = python_client(&site, 65534, 65534, &[hello]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "error");
    let reason = events[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("uid 65534 is not an allowed pilot"),
        "{reason}"
    );
    let recs = site.records();
    let r = recs
        .iter()
        .find(|r| r["event"] == "refused_caller")
        .expect("refused_caller record");
    assert_eq!(r["pilot_uid"], 65534);
    assert_eq!(r["decision"], "deny");
    assert!(r["pilot_pid"].as_i64().unwrap() > 0);
}

/// Flips one byte of the argv inside the signed body.
fn tamper(env: &SignedEnvelope) -> SignedEnvelope {
    let mut bytes = B64.decode(&env.body).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let pos = text.find("swd-argv").unwrap();
    bytes[pos] = b'S';
    SignedEnvelope {
        body: B64.encode(&bytes),
        signature: env.signature.clone(),
    }
}

#[test]
fn bad_envelopes_are_refused_as_caller_errors() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());

    // One byte of argv changed.
    let body = site.body(DN_ALICE, &["/bin/echo", "swd-argv"]);
    let (id, class, reason) = denied(c.launch(&tamper(&site.sign(&body)), None));
    assert_eq!(class, DenialClass::Caller);
    assert_eq!(id, body.payload_id);
    assert!(reason.contains("signature does not verify"), "{reason}");

    // Expired.
    let mut b = site.body(DN_ALICE, &["/bin/true"]);
    b.not_before = Utc::now() - Duration::hours(2);
    b.not_after = Utc::now() - Duration::hours(1);
    let (_, class, reason) = denied(c.launch(&site.sign(&b), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("expired"), "{reason}");

    // Signed by another key.
    let other = mupilot::protocol::VoSigningKey::generate();
    let (_, class, _) = denied(c.launch(&other.sign(&site.body(DN_ALICE, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::Caller);

    // A VO the site does not know.
    let mut b = site.body(DN_ALICE, &["/bin/true"]);
    b.owner.vo = "swd-unknown-vo".into();
    let (_, class, reason) = denied(c.launch(&site.sign(&b), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("VO 'swd-unknown-vo' is not configured"),
        "{reason}"
    );

    // Bundle: wrong digest, missing, unexpected.
    let mut b = site.body(DN_ALICE, &["/bin/true"]);
    b.bundle_sha256 = Some(mupilot::protocol::envelope::sha256_hex(b"the real bundle"));
    let (_, class, reason) = denied(c.launch(&site.sign(&b), Some(b"another bundle")));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("does not match the envelope's bundle_sha256"),
        "{reason}"
    );
    b.nonce = uuid::Uuid::new_v4().simple().to_string();
    let (_, class, reason) = denied(c.launch(&site.sign(&b), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("no bundle came with the launch"),
        "{reason}"
    );
    let b = site.body(DN_ALICE, &["/bin/true"]);
    let (_, class, reason) = denied(c.launch(&site.sign(&b), Some(b"x")));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("envelope names none"), "{reason}");

    // Membership expired: an authorization decision.
    let mut b = site.body(DN_ALICE, &["/bin/true"]);
    b.owner.membership_valid_until = Utc::now() - Duration::hours(1);
    let (_, class, reason) = denied(c.launch(&site.sign(&b), None));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("membership"), "{reason}");

    // Output descriptors that are not files or pipes.
    let (sock_a, _sock_b) = std::os::unix::net::UnixStream::pair().unwrap();
    let f = tempfile::tempfile().unwrap();
    let b = site.body(DN_ALICE, &["/bin/true"]);
    let ev = c.call(
        &SwitchRequest::Launch {
            envelope: site.sign(&b),
            bundle_fd: None,
        },
        &[f.as_raw_fd(), sock_a.as_raw_fd()],
    );
    let (_, class, reason) = denied(ev);
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("stderr descriptor is a socket"), "{reason}");

    // Every denial is in the audit log with its class and reason.
    let recs = site.records();
    let denials: Vec<_> = recs.iter().filter(|r| r["event"] == "denied").collect();
    assert_eq!(denials.len(), 9, "{denials:#?}");
    let first = &denials[0];
    assert_eq!(first["denial_class"], "caller");
    assert_eq!(first["pilot_id"], "swd-pilot");
    assert_eq!(first["batch_job_id"], "swd-job-1");
    assert!(first["envelope_sha256"].as_str().unwrap().len() == 64);
    drop(c);
    d.stop();
}

#[test]
fn replayed_nonce_is_refused_also_after_restart() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let body = site.body(DN_UNMAPPED, &["/bin/true"]);
    let env = site.sign(&body);
    let mut c = Client::hello(&site.socket, Client::default_hello());
    // First use reaches the authorization step (then is denied for lack of a mapping).
    let (_, class, _) = denied(c.launch(&env, None));
    assert_eq!(class, DenialClass::Authorization);
    let (_, class, reason) = denied(c.launch(&env, None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("replayed"), "{reason}");
    drop(c);
    d.stop();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let (_, class, reason) = denied(c.launch(&env, None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("replayed"), "{reason}");
    drop(c);
    d.stop();
    // The second daemon continued the first one's chain.
    let (code, out) = cli(&["audit", "verify", "--log", site.audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    // Start, denial, and a chain-head anchor at each of the two shutdowns.
    assert!(out.contains("chain intact: 5 records"), "{out}");
}

#[test]
fn unmapped_owner_is_denied_with_the_reason_in_event_and_audit() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_UNMAPPED, &["/bin/true"]);
    let (id, class, reason) = denied(c.launch(&site.sign(&body), None));
    assert_eq!(id, body.payload_id);
    assert_eq!(class, DenialClass::Authorization);
    let expected = format!(
        "no mapping for DN \"{DN_UNMAPPED}\" in {}",
        site.gridmap.display()
    );
    assert_eq!(reason, expected);
    let recs = site.records_of(&body.payload_id);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r["event"], "denied");
    assert_eq!(r["decision"], "deny");
    assert_eq!(r["denial_class"], "authorization");
    assert_eq!(r["reason"], expected.as_str());
    assert_eq!(r["owner_dn"], DN_UNMAPPED);
    assert_eq!(r["vo"], VO);
    assert_eq!(r["fqans"][0], format!("/{VO}"));
    assert_eq!(r["jobtag"], "swd-test");
    assert_eq!(
        r["argv_sha256"],
        mupilot::protocol::envelope::sha256_hex(b"/bin/true")
    );
    assert_eq!(r["pilot_uid"], 0);
    assert!(r.get("uid").is_none());
}

#[test]
fn mapping_to_root_or_to_the_pilot_itself_is_refused() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ROOT, &["/bin/true"]);
    let (_, class, reason) = denied(c.launch(&site.sign(&body), None));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("uid 0 (root)"), "{reason}");

    // A non-root pilot whose payload owner maps to the pilot's own account.
    let pilot_uid = uid_of(PILOT).unwrap();
    let pilot_gid = gid_of(PILOT).unwrap();
    let body = site.body(DN_PILOTSELF, &["/bin/true"]);
    let frames = vec![
        // The pilot id the envelope is bound to (Site::body).
        serde_json::json!({"type": "hello", "pilot_id": "swd-pilot"}),
        serde_json::to_value(SwitchRequest::Launch {
            envelope: site.sign(&body),
            bundle_fd: None,
        })
        .unwrap(),
    ];
    let events = python_client(&site, pilot_uid, pilot_gid, &frames);
    assert_eq!(events[0]["type"], "welcome", "{events:?}");
    assert_eq!(events[1]["type"], "denied", "{events:?}");
    assert_eq!(events[1]["class"], "authorization");
    let reason = events[1]["reason"].as_str().unwrap();
    assert!(reason.contains("the calling pilot's own uid"), "{reason}");
    let recs = site.records_of(&body.payload_id);
    assert_eq!(recs[0]["pilot_uid"], pilot_uid);
    assert_eq!(recs[0]["account"], PILOT);
}

#[test]
fn slot_is_checked_against_the_hello() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let hello = PilotHello {
        slot_cores: Some(1),
        slot_memory_bytes: Some(1 << 30),
        ..Client::default_hello()
    };
    let mut c = Client::hello(&site.socket, hello);
    let mut b = site.body(DN_ALICE, &["/bin/true"]);
    b.resources.cores = 2;
    let (_, class, reason) = denied(c.launch(&site.sign(&b), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("asks for 2 cores"), "{reason}");
}

/// The whole path with a mapped account: the payload runs as the mapped account and the audit
/// log holds its start and end.
#[test]
fn mapped_owner_reaches_the_sandbox_as_the_mapped_account() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["/bin/sh", "-c", "id -u"]);
    let (ev, out) = launch_capturing(&site, &mut c, &body);
    let acct_uid = uid_of(ACCT).unwrap();
    match ev {
        SwitchEvent::Started {
            payload_id,
            account,
            uid,
            ..
        } => {
            assert_eq!(payload_id, body.payload_id);
            assert_eq!(account, ACCT);
            assert_eq!(uid, acct_uid);
            match c.recv() {
                SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
                other => panic!("{other:?}"),
            }
            let printed = std::fs::read_to_string(out.path()).unwrap();
            assert_eq!(printed.trim(), acct_uid.to_string());
            let recs = site.records_of(&body.payload_id);
            let events: Vec<_> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
            assert_eq!(events, ["start", "end"]);
            assert_eq!(recs[0]["decision"], "permit");
            assert_eq!(recs[1]["exit_code"], 0);
        }
        other => panic!("{other:?}"),
    }
}

/// The start record is written while the sandbox is built, before the payload may exec: a
/// payload whose exec fails is a `system` denial for the pilot, and the audit log closes its
/// start with an end record (`setup_failed`), not a `denied` one. Its share of the slot and
/// its account are free again afterwards.
#[test]
fn failed_exec_is_recorded_as_start_and_end() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, one_core_hello());
    let body = site.body(DN_ALICE, &["/nonexistent/swd-program"]);
    let (_, class, reason) = denied(c.launch(&site.sign(&body), None));
    assert_eq!(class, DenialClass::System);
    assert!(
        reason.contains("exec failed") && reason.contains("/nonexistent/swd-program"),
        "{reason}"
    );
    let recs = site.records_of(&body.payload_id);
    let events: Vec<_> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["start", "end"], "{recs:?}");
    assert_eq!(recs[1]["kill_reason"], "setup_failed");
    assert!(recs[1].get("exit_code").is_none());
    assert!(recs[1]["reason"].as_str().unwrap().contains("exec failed"));
    run_true(&site, &mut c);
}

/// A pilot that launches its next payload the moment it hears `exited` finds the slot free:
/// the helper releases the payload's share before it reports, even though the scratch
/// directory and cgroup are removed after the report.
#[test]
fn a_full_slot_is_free_again_when_exited_is_reported() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, one_core_hello());
    for _ in 0..20 {
        run_true(&site, &mut c);
    }
}

/// A payload that ends before `started` is out (its exit comes in the same write, and the
/// connection thread reports it without starting a supervisor first) is recorded, reported
/// and removed like any other, and the connection serves the next request meanwhile.
#[test]
fn a_payload_that_ended_before_started_is_recorded_reported_and_removed() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let mut ids = Vec::new();
    for _ in 0..10 {
        let body = site.body(DN_ALICE, &["/bin/true"]);
        let (started, exited) = match c.launch(&site.sign(&body), None) {
            SwitchEvent::Started {
                payload_id,
                scratch,
                cgroup,
                ..
            } => {
                let exited = c.recv();
                ((payload_id, scratch, cgroup), exited)
            }
            other => panic!("{other:?}"),
        };
        match exited {
            SwitchEvent::Exited { payload_id, report } => {
                assert_eq!(payload_id, started.0);
                assert_eq!(report.exit_code, Some(0));
            }
            other => panic!("{other:?}"),
        }
        ids.push(started);
    }
    // Removal follows the report, on a thread of its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for (id, scratch, cgroup) in &ids {
        while (Path::new(scratch).exists() || Path::new(cgroup).exists())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!Path::new(scratch).exists(), "scratch {scratch} removed");
        assert!(!Path::new(cgroup).exists(), "cgroup {cgroup} removed");
        let events: Vec<String> = site
            .records_of(id)
            .iter()
            .map(|r| r["event"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(events, ["start", "end"], "records of {id}");
    }
}

/// Launches `body` with stdout going to the returned file (stderr to another).
fn launch_capturing(
    site: &Site,
    c: &mut Client,
    body: &mupilot::protocol::EnvelopeBody,
) -> (SwitchEvent, tempfile::NamedTempFile) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let ev = c.call(
        &SwitchRequest::Launch {
            envelope: site.sign(body),
            bundle_fd: None,
        },
        &[out.as_file().as_raw_fd(), err.as_file().as_raw_fd()],
    );
    (ev, out)
}

/// A pilot whose slot is one core and 1 GiB.
fn one_core_hello() -> PilotHello {
    PilotHello {
        slot_cores: Some(1),
        slot_memory_bytes: Some(1 << 30),
        ..Client::default_hello()
    }
}

/// Runs `/bin/true` for alice to its end.
fn run_true(site: &Site, c: &mut Client) {
    let body = site.body(DN_ALICE, &["/bin/true"]);
    match c.launch(&site.sign(&body), None) {
        SwitchEvent::Started { .. } => {}
        other => panic!("{other:?}"),
    }
    match c.recv() {
        SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
}

/// P10: when the pilot's connection closes, its payloads are killed and that is recorded.
#[test]
fn payloads_die_with_their_pilot_connection() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["/bin/sleep", "300"]);
    match c.launch(&site.sign(&body), None) {
        SwitchEvent::Started { .. } => {
            match c.call(&SwitchRequest::Status, &[]) {
                SwitchEvent::Running { payloads } => {
                    assert_eq!(payloads.len(), 1);
                    assert_eq!(payloads[0].payload_id, body.payload_id);
                }
                other => panic!("{other:?}"),
            }
            drop(c);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let events: Vec<String> = site
                    .records_of(&body.payload_id)
                    .iter()
                    .map(|r| r["event"].as_str().unwrap().to_string())
                    .collect();
                if events == ["start", "kill", "end"] {
                    let recs = site.records_of(&body.payload_id);
                    assert_eq!(recs[1]["kill_reason"], "pilot_gone");
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{events:?}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        other => panic!("{other:?}"),
    }
}

/// The grid-mapfile is re-read when it changes; an invalid one or a pool entry is a `system`
/// denial, never a fallback to an older mapping.
#[test]
fn gridmap_edits_apply_without_restart() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let (_, class, _) = denied(c.launch(&site.sign(&site.body(DN_UNMAPPED, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::Authorization);

    let orig = std::fs::read_to_string(&site.gridmap).unwrap();
    std::fs::write(&site.gridmap, format!("{orig}\"{DN_UNMAPPED}\" .swdpool\n")).unwrap();
    let (_, class, reason) =
        denied(c.launch(&site.sign(&site.body(DN_UNMAPPED, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::System);
    assert!(
        reason.contains("no gridmapdir is configured") && reason.contains("line 5"),
        "{reason}"
    );

    std::fs::write(
        &site.gridmap,
        format!("{orig}\"{DN_UNMAPPED} broken line\n"),
    )
    .unwrap();
    let (_, class, reason) =
        denied(c.launch(&site.sign(&site.body(DN_ALICE, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::System);
    assert!(
        reason.contains("line 5") && reason.contains("closing quote"),
        "{reason}"
    );

    std::fs::write(
        &site.gridmap,
        format!("{orig}\"{DN_UNMAPPED}\" mpt-swd-nosuch\n"),
    )
    .unwrap();
    let (_, class, reason) =
        denied(c.launch(&site.sign(&site.body(DN_UNMAPPED, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::System);
    assert!(
        reason.contains("'mpt-swd-nosuch' (from the grid-mapfile) does not exist"),
        "{reason}"
    );
    drop(c);
    // SIGTERM stops the helper cleanly and removes its socket.
    let status = d.stop().expect("the helper stops on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(!site.socket.exists());
}

/// Starts `sleep 300` for alice and returns its payload id.
fn start_sleeper(site: &Site, c: &mut Client) -> String {
    let body = site.body(DN_ALICE, &["/bin/sleep", "300"]);
    match c.launch(&site.sign(&body), None) {
        SwitchEvent::Started { payload_id, .. } => payload_id,
        other => panic!("{other:?}"),
    }
}

/// `signal` reaches the payload, is answered and audited; another connection cannot signal it.
#[test]
fn signal_acts_on_own_payloads_only_and_is_audited() {
    let _u = Users::acquire();
    let site = Site::new();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let id = start_sleeper(&site, &mut c);
    let mut other = Client::hello(&site.socket, Client::default_hello());
    let sig = |payload_id: &str| SwitchRequest::Signal {
        payload_id: payload_id.into(),
        signal: 15,
        reason: Some("swd test".into()),
    };
    match other.call(&sig(&id), &[]) {
        SwitchEvent::Signalled { ok, .. } => assert!(!ok),
        e => panic!("{e:?}"),
    }
    // The answer and the payload's exit may arrive in either order.
    c.send(&sig(&id), &[]);
    let (mut answered, mut exited) = (false, false);
    while !(answered && exited) {
        match c.recv() {
            SwitchEvent::Signalled { ok, reason, .. } => {
                assert!(ok, "{reason:?}");
                answered = true;
            }
            SwitchEvent::Exited { payload_id, report } => {
                assert_eq!(payload_id, id);
                assert_eq!(report.signal, Some(15), "{report:?}");
                exited = true;
            }
            e => panic!("{e:?}"),
        }
    }
    let recs = site.records_of(&id);
    let events: Vec<_> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["start", "signal", "end"]);
    assert_eq!(recs[1]["signal"], 15);
    assert_eq!(recs[1]["reason"], "swd test");
}

/// SIGTERM to the helper kills every payload, records kill and end, and exits 0.
#[test]
fn stopping_the_helper_kills_and_records_every_payload() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let id = start_sleeper(&site, &mut c);
    let status = d.stop().expect("the helper stops on SIGTERM");
    assert_eq!(status.code(), Some(0));
    let recs = site.records_of(&id);
    let events: Vec<_> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["start", "kill", "end"]);
    assert_eq!(recs[1]["kill_reason"], "helper_stopping");
    assert!(recs[2]["end"].is_string());
}

/// The helper's children that are idle stages: `mupilot-switch stage` processes.
fn idle_stages(helper_pid: u32) -> Vec<i32> {
    let children = |pid: i32| -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        out
    };
    let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let has = |c: &[u8], arg: &[u8]| c.windows(arg.len()).any(|w| w == arg);
    // Idle stages are the stage factory's children (or, without a factory, exec'd
    // `mupilot-switch stage` children of the helper) that hold no payload yet: their init,
    // forked ahead of time, has no child.
    let idle = |stage: &i32| {
        children(*stage)
            .iter()
            .all(|init| children(*init).is_empty())
    };
    let mut out = Vec::new();
    for pid in children(helper_pid as i32) {
        let c = cmdline(pid);
        if has(&c, b"\0stage-factory\0") {
            out.extend(children(pid).into_iter().filter(idle));
        } else if has(&c, b"\0stage\0") && idle(&pid) {
            out.push(pid);
        }
    }
    out
}

/// Scheduling policy of `pid` (field 41 of /proc/PID/stat).
fn sched_policy(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split_whitespace().nth(38)?.parse().ok()
}

/// Idle stages wait exec'd, under SCHED_IDLE, with nothing of a payload: empty environment,
/// /dev/null on stdout and stderr. A launch uses one and a new one takes its place; the
/// payload runs under SCHED_OTHER; the idle stages end with the helper.
#[test]
fn idle_stages_are_ready_hold_nothing_and_end_with_the_helper() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let helper = d.child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut idle = idle_stages(helper);
    while idle.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle stages: {idle:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        idle = idle_stages(helper);
    }
    assert_eq!(idle.len(), 2, "warm_stages defaults to 2");
    for pid in &idle {
        assert_eq!(sched_policy(*pid), Some(libc::SCHED_IDLE), "stage {pid}");
        assert!(std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap()
            .is_empty());
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert_eq!(
                target,
                std::path::Path::new("/dev/null"),
                "stage {pid} fd {fd}"
            );
        }
    }
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["/bin/sh", "-c", "chrt -p $$"]);
    let (ev, out) = launch_capturing(&site, &mut c, &body);
    assert!(matches!(ev, SwitchEvent::Started { .. }), "{ev:?}");
    match c.recv() {
        SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
    let policy = std::fs::read_to_string(out.path()).unwrap();
    assert!(policy.contains("SCHED_OTHER"), "{policy}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = idle_stages(helper);
        if now.len() == 2 && now.iter().any(|p| !idle.contains(p)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refill: {now:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let last = idle_stages(helper);
    drop(c);
    d.stop().expect("the helper stops");
    for pid in last {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Gone, or a zombie waiting for whoever inherited it.
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
                .is_some_and(|zombie| !zombie)
        };
        while running() {
            assert!(
                std::time::Instant::now() < deadline,
                "idle stage {pid} outlived the helper"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
