//! Envelopes are bound to the node and the pilot they were matched for (issue 14.2), against
//! the real stack: the real VO server signs (mTLS match as the VO's pilot), two real helpers
//! with their own state directories, replay caches and node names (A: the kernel's host name,
//! detected; B: `node_name = "mpt-node-b"`), and the test as the pilot account's process,
//! which is the adversary here: it holds every envelope it was given and may take it to
//! another helper. Root, real accounts (`mpt-nb-a`).

mod server_support;
mod switch_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{Duration, Utc};
use mupilot::protocol::api::{MatchRequest, MatchResponse, SubmitResponse, Work};
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources, ENVELOPE_VERSION};
use mupilot::protocol::switch_wire::{DenialClass, PilotHello, SwitchEvent};
use mupilot::protocol::VoSigningKey;
use server_support::{dn, small_job, Demo};
use switch_support::{denied, hostname, Client, Daemon};

const ACCT: &str = "mpt-nb-a";
const PILOT_ID: &str = "nb-pilot";
const NODE_B: &str = "mpt-node-b";

/// The tests share the account: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The payload account, removed on drop.
struct Account;

impl Account {
    fn create() -> Account {
        switch_support::common::create_account(ACCT);
        Account
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        switch_support::common::delete_account(ACCT);
    }
}

/// One site helper: its own socket, audit log, state directory (replay cache) and scratch.
struct Helper {
    socket: PathBuf,
    audit: PathBuf,
    _daemon: Daemon,
}

fn helper(site: &Path, vo: &Path, name: &str, extra: &str) -> Helper {
    let dir = site.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switch.toml");
    std::fs::write(
        &config,
        format!(
            r#"{extra}socket = "switch.sock"
allowed_pilots = ["root"]
gridmap = "{gridmap}"
audit_log = "audit.jsonl"
state_dir = "state"
min_uid = 1000
[[vo]]
name = "demo"
public_key = "{vo_pub}"
[sandbox]
scratch_root = "{scratch}"
"#,
            gridmap = site.join("grid-mapfile").display(),
            vo_pub = vo.join("vo.pub").display(),
            scratch = dir.join("scratch").display(),
        ),
    )
    .unwrap();
    let socket = dir.join("switch.sock");
    let log = dir.join("daemon.log");
    let child = Command::new(switch_support::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon = Daemon { child, log };
    daemon.wait_for_socket(&socket);
    Helper {
        socket,
        audit: dir.join("audit.jsonl"),
        _daemon: daemon,
    }
}

impl Helper {
    fn connect(&self) -> Client {
        Client::hello(
            &self.socket,
            PilotHello {
                pilot_id: PILOT_ID.into(),
                batch_job_id: Some("nb-job-1".into()),
                ..Default::default()
            },
        )
    }

    fn records_of(&self, payload_id: &str) -> Vec<serde_json::Value> {
        mupilot::records::read_records(&self.audit)
            .unwrap()
            .into_iter()
            .filter(|r| r["payload_id"] == payload_id)
            .collect()
    }
}

/// The VO server and what the test needs to talk to it as a member and as the pilot.
struct Vo {
    demo: Demo,
    server: server_support::Server,
    rt: tokio::runtime::Runtime,
}

impl Vo {
    fn start() -> Vo {
        mupilot::tls::install_crypto_provider();
        let demo = Demo::new();
        let server = demo.serve();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Vo { demo, server, rt }
    }

    fn submit(&self) -> String {
        let alice = self.demo.client("alice");
        let req = small_job(&["/bin/sh", "-c", "id -u"], None);
        let url = self.server.url("/v1/payloads");
        self.rt.block_on(async {
            let r = alice.post(url).json(&req).send().await.unwrap();
            assert!(
                r.status().is_success(),
                "submit: {}",
                r.text().await.unwrap()
            );
            r.json::<SubmitResponse>().await.unwrap().payload_id
        })
    }

    /// Matches as the VO's pilot from node `host`.
    fn match_for(&self, host: &str) -> Work {
        let pilot = self.demo.client("pilot");
        let req = MatchRequest {
            pilot_id: PILOT_ID.into(),
            batch_system: Some("none".into()),
            batch_job_id: Some("nb-job-1".into()),
            host: host.into(),
            free_cores: 1,
            free_memory_bytes: 1 << 30,
            seconds_left: 3600,
        };
        let url = self.server.url("/v1/match");
        self.rt.block_on(async {
            let r = pilot.post(url).json(&req).send().await.unwrap();
            assert!(
                r.status().is_success(),
                "match: {}",
                r.text().await.unwrap()
            );
            r.json::<MatchResponse>().await.unwrap().work.expect("work")
        })
    }

    fn view(&self, id: &str) -> serde_json::Value {
        let alice = self.demo.client("alice");
        let url = self.server.url(&format!("/v1/payloads/{id}"));
        self.rt
            .block_on(async { alice.get(url).send().await.unwrap().json().await.unwrap() })
    }

    /// A body as the VO server signs it (with its real key), bound to `node` and our pilot.
    fn body(&self, node: &str) -> EnvelopeBody {
        let now = Utc::now();
        EnvelopeBody {
            version: ENVELOPE_VERSION,
            payload_id: format!("nb-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            owner: Owner {
                dn: dn("alice"),
                vo: "demo".into(),
                fqans: vec!["/demo".into()],
                membership_valid_until: now + Duration::days(1),
            },
            jobtag: None,
            argv: vec!["/bin/true".into()],
            env: Default::default(),
            bundle_sha256: None,
            resources: Resources {
                cores: 1,
                memory_bytes: 64 << 20,
                walltime_seconds: 60,
            },
            outputs: vec![],
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::minutes(9),
            node: node.into(),
            pilot_id: PILOT_ID.into(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            issuer: "nb-test".into(),
            credential: None,
        }
    }

    fn key(&self) -> VoSigningKey {
        VoSigningKey::from_pem_file(&self.demo.path("vo.key")).unwrap()
    }
}

/// Launches and expects the payload to start and exit 0.
fn runs(c: &mut Client, w: &Work) {
    match c.launch(&w.envelope, bundle_bytes(w).as_deref()) {
        SwitchEvent::Started { payload_id, .. } => assert_eq!(payload_id, w.payload_id),
        other => panic!("expected started, got {other:?}"),
    }
    match c.recv() {
        SwitchEvent::Exited { payload_id, report } => {
            assert_eq!(payload_id, w.payload_id);
            assert_eq!(report.exit_code, Some(0), "{report:?}");
        }
        other => panic!("expected exited, got {other:?}"),
    }
}

/// The site: the grid-mapfile shared by both helpers, under /var/lib (scratch must not be
/// below /tmp, which payloads get privately).
fn site_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("mupilot-test-nb-")
        .tempdir_in("/var/lib")
        .unwrap();
    std::fs::write(
        d.path().join("grid-mapfile"),
        format!("\"{}\" {ACCT}\n", dn("alice")),
    )
    .unwrap();
    d
}

#[test]
fn an_envelope_runs_only_on_the_node_it_was_matched_for() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _acct = Account::create();
    let vo = Vo::start();
    let site = site_dir();
    let node_a = hostname();
    let a = helper(site.path(), &vo.demo.dir, "a", "");
    let b = helper(
        site.path(),
        &vo.demo.dir,
        "b",
        &format!("node_name = \"{NODE_B}\"\n"),
    );
    let mut on_a = a.connect();
    let mut on_b = b.connect();

    // Matched for node A (whose helper detected its name): runs there (the control) ...
    let id = vo.submit();
    let w = vo.match_for(&node_a);
    assert_eq!(w.payload_id, id);
    runs(&mut on_a, &w);
    // ... and node B, whose replay cache never saw the nonce, refuses it, naming both nodes.
    let (pid, class, reason) = denied(on_b.launch(&w.envelope, bundle_bytes(&w).as_deref()));
    assert_eq!(pid, id);
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains(&format!("bound to node '{node_a}'"))
            && reason.contains(&format!("this helper is node '{NODE_B}'")),
        "{reason}"
    );
    let recs = b.records_of(&id);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["event"], "denied");
    assert_eq!(recs[0]["denial_class"], "caller");
    assert_eq!(recs[0]["host"], NODE_B);
    assert!(!recs.iter().any(|r| r["event"] == "start"));
    // The server recorded which pilot, batch job and node got it.
    let v = vo.view(&id);
    assert_eq!(v["pilot_id"], PILOT_ID);
    assert_eq!(v["batch_job_id"], "nb-job-1");
    assert_eq!(v["host"], node_a.as_str());

    // The other way round: matched for B, refused on A, runs on B.
    let id = vo.submit();
    let w = vo.match_for(NODE_B);
    assert_eq!(w.payload_id, id);
    let (_, class, reason) = denied(on_a.launch(&w.envelope, bundle_bytes(&w).as_deref()));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains(&format!("'{NODE_B}'")) && reason.contains(&format!("'{node_a}'")),
        "{reason}"
    );
    runs(&mut on_b, &w);
    let start = b
        .records_of(&id)
        .into_iter()
        .find(|r| r["event"] == "start")
        .expect("a start record on B");
    assert_eq!(start["host"], NODE_B);
    assert_eq!(start["account"], ACCT);

    // Bound to another pilot of the same node: refused, naming both pilots.
    let mut body = vo.body(&node_a);
    body.pilot_id = "nb-other-pilot".into();
    let (_, class, reason) = denied(on_a.launch(&vo.key().sign(&body), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("'nb-other-pilot'") && reason.contains(&format!("'{PILOT_ID}'")),
        "{reason}"
    );
}

#[test]
fn stale_and_overlong_envelopes_are_refused_with_their_numbers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _acct = Account::create();
    let vo = Vo::start();
    let site = site_dir();
    let node_a = hostname();
    let a = helper(
        site.path(),
        &vo.demo.dir,
        "a",
        "max_envelope_validity_seconds = 1800\n",
    );
    let mut on_a = a.connect();
    let key = vo.key();

    // The control: a fresh ten-minute envelope of the VO runs.
    let body = vo.body(&node_a);
    runs(
        &mut on_a,
        &Work {
            payload_id: body.payload_id.clone(),
            envelope: key.sign(&body),
            bundle: None,
            heartbeat_seconds: None,
            requeue_after: None,
            live_usage: false,
        },
    );

    // Stale: a ten-minute window that ended 20 minutes ago; the message gives its age.
    let mut body = vo.body(&node_a);
    body.not_before = Utc::now() - Duration::minutes(30);
    body.not_after = body.not_before + Duration::minutes(10);
    let (_, class, reason) = denied(on_a.launch(&key.sign(&body), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("stale: it is 1800 s old"), "{reason}");
    assert!(reason.contains("expired 1200 s ago"), "{reason}");

    // A window longer than this site's maximum (1800 s here): refused, naming both numbers,
    // although it is current.
    let mut body = vo.body(&node_a);
    body.not_after = body.not_before + Duration::seconds(3600);
    let (_, class, reason) = denied(on_a.launch(&key.sign(&body), None));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("valid for 3600 s") && reason.contains("maximum of 1800 s"),
        "{reason}"
    );
    // Exactly the maximum is accepted.
    let mut body = vo.body(&node_a);
    body.not_after = body.not_before + Duration::seconds(1800);
    runs(
        &mut on_a,
        &Work {
            payload_id: body.payload_id.clone(),
            envelope: key.sign(&body),
            bundle: None,
            heartbeat_seconds: None,
            requeue_after: None,
            live_usage: false,
        },
    );

    // The server's own envelopes (ten minutes by default) fit the site's maximum.
    let id = vo.submit();
    let w = vo.match_for(&node_a);
    assert_eq!(w.payload_id, id);
    runs(&mut on_a, &w);
}

/// The bundle of a match answer as the bytes a pilot passes to the helper (a sealed memfd).
fn bundle_bytes(w: &Work) -> Option<Vec<u8>> {
    use base64::Engine;
    w.bundle.as_ref().map(|b| {
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .expect("the server's bundle is base64")
    })
}
