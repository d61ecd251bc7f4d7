//! Agent loop tests against in-memory fakes of the VO server and the helper, on paused tokio
//! time (`start_paused`): the runtime advances its clock to the next timer whenever every task
//! waits, so the agent's ticks, grace times, timeouts and the fakes' payload run times take no
//! real time, bounds on them are exact, and a loaded machine cannot make a test late. Two tests
//! stay on the real clock because their subject is a Unix time (the slot's deadline, the
//! server's `requeue_after`), which tokio's clock does not move.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use chrono::Utc;

use super::*;
use crate::pilot::helper_client::HelperError;
use crate::protocol::api::OperatorCommand;
use crate::protocol::api::StatusAck;
use crate::protocol::envelope::{
    EnvelopeBody, Owner, Resources, SignedEnvelope, VoSigningKey, ENVELOPE_VERSION,
};
use crate::protocol::switch_wire::{
    DenialClass, ExitReport, PayloadUsage, RunningPayload, SwitchEvent,
};

fn work(key: &VoSigningKey, id: &str, cores: u32, wall: u64) -> Work {
    let now = Utc::now();
    let body = EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: id.into(),
        owner: Owner {
            dn: "/DC=org/DC=mupilot-demo/CN=alice".into(),
            vo: "demo".into(),
            fqans: vec!["/demo".into()],
            membership_valid_until: now + chrono::Duration::days(1),
        },
        jobtag: Some("plt".into()),
        argv: vec!["/bin/true".into()],
        env: Default::default(),
        bundle_sha256: None,
        resources: Resources {
            cores,
            memory_bytes: 64 << 20,
            walltime_seconds: wall,
        },
        outputs: vec![],
        not_before: now,
        not_after: now + chrono::Duration::minutes(10),
        node: "node1".into(),
        pilot_id: "pilot-1".into(),
        nonce: format!("nonce-{id}-0123456789"),
        issuer: "test".into(),
        credential: None,
    };
    Work {
        payload_id: id.into(),
        envelope: key.sign(&body),
        bundle: None,
        heartbeat_seconds: None,
        requeue_after: None,
        live_usage: false,
    }
}

#[derive(Default)]
struct FakeServer {
    queue: Mutex<VecDeque<Work>>,
    matches: Mutex<Vec<MatchRequest>>,
    reports: Mutex<Vec<(String, StatusReport)>>,
    uploads: Mutex<Vec<(String, Vec<u8>)>>,
    /// Commands answered once on the next report for that payload.
    commands: Mutex<HashMap<String, Vec<OperatorCommand>>>,
    /// Reports and uploads fail as with a server that is down (matches still work).
    down: std::sync::atomic::AtomicBool,
    /// Final reports for these payloads are refused with this HTTP status.
    refuse_final: Mutex<HashMap<String, u16>>,
    /// CSRs the pilot relayed, by payload.
    csrs: Mutex<Vec<(String, String)>>,
    /// Proxies for these payloads are refused (403).
    refuse_proxy: Mutex<HashSet<String>>,
    /// For these payloads the server cannot be reached when their proxy is asked for.
    unreachable_proxy: Mutex<HashSet<String>>,
}

impl FakeServer {
    fn states(&self, id: &str) -> Vec<PayloadState> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == id)
            .filter_map(|(_, r)| r.state)
            .collect()
    }
    fn final_report(&self, id: &str) -> StatusReport {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(p, _)| p == id)
            .map(|(_, r)| r.clone())
            .expect("a report")
    }
}

impl FakeServer {
    fn check_up(&self) -> Result<(), ClientError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ClientError::Unreachable {
                url: "https://127.0.0.1:1".into(),
                attempts: 1,
                why: "connection refused".into(),
            });
        }
        Ok(())
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ServerApi for FakeServer {
    async fn match_work(&self, req: MatchRequest) -> Result<Option<Work>, ClientError> {
        self.matches.lock().unwrap().push(req);
        Ok(self.queue.lock().unwrap().pop_front())
    }
    async fn report(&self, id: String, r: StatusReport) -> Result<StatusAck, ClientError> {
        self.check_up()?;
        if r.state.is_some_and(PayloadState::is_final) {
            if let Some(&status) = self.refuse_final.lock().unwrap().get(&id) {
                return Err(ClientError::Refused {
                    url: format!("https://127.0.0.1:1/v1/payloads/{id}/status"),
                    status,
                    code: "refused".into(),
                    message: "refused by the test".into(),
                });
            }
        }
        self.reports.lock().unwrap().push((id.clone(), r));
        let commands = self
            .commands
            .lock()
            .unwrap()
            .remove(&id)
            .unwrap_or_default();
        Ok(StatusAck { commands })
    }
    async fn upload(&self, id: String, archive: Vec<u8>) -> Result<(), ClientError> {
        self.check_up()?;
        self.uploads.lock().unwrap().push((id, archive));
        Ok(())
    }
    async fn issue_proxy(
        &self,
        id: String,
        csr: crate::protocol::delegation::ProxyCsr,
    ) -> Result<crate::protocol::delegation::IssuedProxy, ClientError> {
        self.csrs
            .lock()
            .unwrap()
            .push((id.clone(), csr.csr_pem.clone()));
        if self.unreachable_proxy.lock().unwrap().contains(&id) {
            return Err(ClientError::Unreachable {
                url: format!("https://127.0.0.1:1/v1/payloads/{id}/proxy"),
                attempts: 5,
                why: "connection refused".into(),
            });
        }
        if self.refuse_proxy.lock().unwrap().contains(&id) {
            return Err(ClientError::Refused {
                url: format!("https://127.0.0.1:1/v1/payloads/{id}/proxy"),
                status: 403,
                code: "no_credential".into(),
                message: "the owner's delegated credential expired".into(),
            });
        }
        // Expiring now: the pilot renews it at its next tick.
        Ok(crate::protocol::delegation::IssuedProxy {
            chain_pem: format!("chain for {}", csr.csr_pem),
            not_after: Utc::now(),
        })
    }
}

/// A helper that starts payloads (or denies listed ones), ends them after `run_for`, and
/// obeys SIGTERM unless told to ignore it.
struct FakeHelper {
    tx: mpsc::UnboundedSender<HelperMsg>,
    deny: HashSet<String>,
    run_for: Duration,
    ignore_term: bool,
    /// Never answer launches.
    silent: bool,
    /// Deny with an empty payload id (an envelope the helper could not read).
    deny_anonymous: bool,
    /// Launch writes fail (the connection broke before the frame went out).
    fail_launch: bool,
    launches: Mutex<Vec<String>>,
    signals: Mutex<Vec<(String, i32, Instant)>>,
    running: Arc<Mutex<HashSet<String>>>,
    max_running: Arc<Mutex<usize>>,
    /// `status` requests so far.
    usage_requests: std::sync::atomic::AtomicU64,
    /// Never answer `status` (a helper too busy to report usage).
    mute_status: bool,
    /// Proxy requests in order: ("request"|"launch"|"renew"|"renewed", payload, chain).
    proxy_calls: Mutex<Vec<(&'static str, String, String)>>,
}

impl FakeHelper {
    fn new(tx: mpsc::UnboundedSender<HelperMsg>, run_for: Duration) -> Self {
        FakeHelper {
            tx,
            deny: HashSet::new(),
            run_for,
            ignore_term: false,
            silent: false,
            deny_anonymous: false,
            fail_launch: false,
            launches: Mutex::new(Vec::new()),
            signals: Mutex::new(Vec::new()),
            running: Default::default(),
            max_running: Default::default(),
            usage_requests: Default::default(),
            mute_status: false,
            proxy_calls: Default::default(),
        }
    }

    fn exit(
        tx: &mpsc::UnboundedSender<HelperMsg>,
        running: &Mutex<HashSet<String>>,
        id: &str,
        code: Option<i32>,
        signal: Option<i32>,
    ) {
        if running.lock().unwrap().remove(id) {
            let _ = tx.send(HelperMsg::Event(SwitchEvent::Exited {
                payload_id: id.into(),
                report: ExitReport {
                    exit_code: code,
                    signal,
                    cpu_seconds: 0.01,
                    peak_memory_bytes: Some(1 << 20),
                    wall_seconds: 0.1,
                    ..Default::default()
                },
            }));
        }
    }
}

impl HelperApi for FakeHelper {
    fn launch(
        &self,
        envelope: &SignedEnvelope,
        _bundle: Option<&str>,
        stdout: &File,
        _stderr: &File,
    ) -> Result<(), HelperError> {
        use std::io::Write;
        let id = peek_body(envelope).unwrap().payload_id;
        self.launches.lock().unwrap().push(id.clone());
        if self.fail_launch {
            return Err(HelperError::Send(
                crate::protocol::switch_wire::WireError::Closed,
            ));
        }
        if self.silent {
            return Ok(());
        }
        if self.deny_anonymous {
            let _ = self.tx.send(HelperMsg::Event(SwitchEvent::Denied {
                payload_id: String::new(),
                class: DenialClass::Caller,
                reason: "envelope body is not valid base64".into(),
            }));
            return Ok(());
        }
        if self.deny.contains(&id) {
            let _ = self.tx.send(HelperMsg::Event(SwitchEvent::Denied {
                payload_id: id,
                class: DenialClass::Authorization,
                reason: "no mapping for /DC=org/DC=mupilot-demo/CN=alice".into(),
            }));
            return Ok(());
        }
        (&*stdout).write_all(b"hello from payload\n").unwrap();
        {
            let mut r = self.running.lock().unwrap();
            r.insert(id.clone());
            let mut m = self.max_running.lock().unwrap();
            *m = (*m).max(r.len());
        }
        let _ = self.tx.send(HelperMsg::Event(SwitchEvent::Started {
            payload_id: id.clone(),
            account: "mpu-alice".into(),
            uid: 51000,
            gid: 51000,
            pid: 4242,
            cgroup: "/mupilot-test-plt/payload".into(),
            scratch: "/tmp/x".into(),
        }));
        // On the test's (paused) clock, like the agent's own waits.
        let (tx, running, d) = (self.tx.clone(), self.running.clone(), self.run_for);
        tokio::runtime::Handle::current().spawn(async move {
            tokio::time::sleep(d).await;
            FakeHelper::exit(&tx, &running, &id, Some(0), None);
        });
        Ok(())
    }

    fn command(
        &self,
        _command: &crate::protocol::command::SignedCommand,
    ) -> Result<(), HelperError> {
        Ok(())
    }

    /// Answers with every running payload, its CPU seconds rising by one per request.
    fn status(&self) -> Result<(), HelperError> {
        let n = self
            .usage_requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let mut ids: Vec<String> = self.running.lock().unwrap().iter().cloned().collect();
        ids.sort();
        let payloads = ids
            .into_iter()
            .map(|id| RunningPayload {
                payload_id: id,
                account: "mpu-alice".into(),
                uid: 51000,
                pid: 4242,
                cgroup: "/mupilot-test-plt/payload".into(),
                started_at: None,
                usage: Some(PayloadUsage {
                    cpu_seconds: n as f64,
                    memory_bytes: n << 20,
                    peak_memory_bytes: Some((n + 1) << 20),
                }),
                cores: Some(1),
                memory_limit_bytes: Some(1 << 30),
                processes: None,
            })
            .collect();
        if !self.mute_status {
            let _ = self
                .tx
                .send(HelperMsg::Event(SwitchEvent::Running { payloads }));
        }
        Ok(())
    }

    fn proxy_request(&self, envelope: &SignedEnvelope) -> Result<(), HelperError> {
        let id = peek_body(envelope).unwrap().payload_id;
        self.proxy_calls
            .lock()
            .unwrap()
            .push(("request", id.clone(), String::new()));
        let _ = self.tx.send(HelperMsg::Event(SwitchEvent::ProxyCsr {
            csr_pem: format!("csr-{id}-1"),
            payload_id: id,
        }));
        Ok(())
    }

    fn launch_with_proxy(
        &self,
        envelope: &SignedEnvelope,
        bundle: Option<&str>,
        stdout: &File,
        stderr: &File,
        chain_pem: &str,
    ) -> Result<(), HelperError> {
        let id = peek_body(envelope).unwrap().payload_id;
        self.proxy_calls
            .lock()
            .unwrap()
            .push(("launch", id, chain_pem.into()));
        self.launch(envelope, bundle, stdout, stderr)
    }

    fn proxy_renew(&self, id: &str) -> Result<(), HelperError> {
        self.proxy_calls
            .lock()
            .unwrap()
            .push(("renew", id.into(), String::new()));
        let _ = self.tx.send(HelperMsg::Event(SwitchEvent::ProxyCsr {
            payload_id: id.into(),
            csr_pem: format!("csr-{id}-2"),
        }));
        Ok(())
    }

    fn proxy_renewed(&self, id: &str, chain_pem: &str) -> Result<(), HelperError> {
        self.proxy_calls
            .lock()
            .unwrap()
            .push(("renewed", id.into(), chain_pem.into()));
        let _ = self.tx.send(HelperMsg::Event(SwitchEvent::ProxyDelivered {
            payload_id: id.into(),
            serial: "5b02".into(),
            not_after: (Utc::now() + chrono::Duration::hours(12)).to_rfc3339(),
        }));
        Ok(())
    }

    fn signal(&self, id: &str, signal: i32, _reason: &str) -> Result<(), HelperError> {
        self.signals
            .lock()
            .unwrap()
            .push((id.into(), signal, Instant::now()));
        if signal == SIGKILL || (signal == SIGTERM && !self.ignore_term) {
            FakeHelper::exit(&self.tx, &self.running, id, None, Some(signal));
        }
        Ok(())
    }
}

struct Harness {
    server: Arc<FakeServer>,
    helper: Arc<FakeHelper>,
    control: mpsc::UnboundedSender<Control>,
    dir: tempfile::TempDir,
}

fn settings(dir: &std::path::Path) -> AgentSettings {
    AgentSettings {
        pilot_id: "plt-pilot".into(),
        host: "node1".into(),
        server_url: "https://127.0.0.1:1".into(),
        work_dir: dir.join("work"),
        poll_interval: Duration::from_millis(20),
        idle_timeout: Duration::from_millis(300),
        shutdown_margin: Duration::from_secs(0),
        grace: Duration::from_millis(300),
        heartbeat: Duration::from_millis(50),
        launch_timeout: Duration::from_secs(5),
        tick: Duration::from_millis(10),
        max_payloads: None,
        drain_file: None,
        upload_reserve: Duration::from_secs(0),
        outbox_wait: Duration::from_secs(5),
        proxy_renew_margin: Duration::from_secs(3600),
        patience: crate::pilot::reporter::Patience {
            first: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
    }
}

fn slot(cores: u32) -> Slot {
    Slot {
        batch_system: Some("slurm".into()),
        batch_job_id: Some("123".into()),
        cores,
        memory_bytes: 1 << 30,
        deadline_unix: None,
    }
}

/// Builds fakes; `setup` adjusts the helper and settings before the run starts.
fn start(
    works: Vec<Work>,
    run_for: Duration,
    tweak: impl FnOnce(&mut FakeHelper, &mut AgentSettings),
    cores: u32,
) -> (Harness, impl std::future::Future<Output = Outcome>) {
    start_slot(works, run_for, tweak, slot(cores))
}

fn start_slot(
    works: Vec<Work>,
    run_for: Duration,
    tweak: impl FnOnce(&mut FakeHelper, &mut AgentSettings),
    slot: Slot,
) -> (Harness, impl std::future::Future<Output = Outcome>) {
    let dir = tempfile::tempdir().unwrap();
    let (htx, hrx) = mpsc::unbounded_channel();
    let (ctx, crx) = mpsc::unbounded_channel();
    let mut helper = FakeHelper::new(htx, run_for);
    let mut cfg = settings(dir.path());
    tweak(&mut helper, &mut cfg);
    let helper = Arc::new(helper);
    let server = Arc::new(FakeServer::default());
    server.queue.lock().unwrap().extend(works);
    std::fs::create_dir_all(&cfg.work_dir).unwrap();
    let trace = TraceLog::open(&cfg.work_dir.join("trace.jsonl")).unwrap();
    let outbox = Outbox::open(&cfg.work_dir, &cfg.pilot_id).unwrap();
    let fut = run(
        cfg,
        slot,
        server.clone(),
        helper.clone(),
        hrx,
        crx,
        Ledger { trace, outbox },
    );
    (
        Harness {
            server,
            helper,
            control: ctx,
            dir,
        },
        fut,
    )
}

fn trace_records(h: &Harness) -> Vec<serde_json::Value> {
    let p = h.dir.path().join("work/trace.jsonl");
    let r = crate::records::verify_file(&p).unwrap();
    assert!(r.first_break.is_none(), "{:?}", r.first_break);
    crate::records::read_records(&p).unwrap()
}

#[tokio::test(start_paused = true)]
async fn runs_payloads_side_by_side_then_idles_out() {
    let key = VoSigningKey::generate();
    let works = (1..=3)
        .map(|i| work(&key, &format!("p{i}"), 1, 60))
        .collect();
    let (h, fut) = start(works, Duration::from_millis(200), |_, _| {}, 4);
    let out = fut.await;
    assert_eq!(out.exit_code, 0, "{:?}", out.summary);
    assert_eq!(out.summary.end_reason, "idle timeout");
    assert_eq!(out.summary.launched, 3);
    assert_eq!(out.summary.done, 3);
    assert_eq!(*h.helper.max_running.lock().unwrap(), 3);
    for id in ["p1", "p2", "p3"] {
        let states = h.server.states(id);
        assert_eq!(states.first(), Some(&PayloadState::Running), "{states:?}");
        assert_eq!(states.last(), Some(&PayloadState::Done), "{states:?}");
        let f = h.server.final_report(id);
        assert_eq!(f.exit_code, Some(0));
        assert_eq!(f.account.as_deref(), Some("mpu-alice"));
    }
    assert_eq!(h.server.uploads.lock().unwrap().len(), 3);
    // The free capacity shrinks as payloads hold cores.
    let m = h.server.matches.lock().unwrap();
    assert_eq!(m[0].free_cores, 4);
    assert_eq!(m[1].free_cores, 3);
    assert_eq!(m[0].batch_job_id.as_deref(), Some("123"));
    let recs = trace_records(&h);
    assert_eq!(recs.len(), 6);
    let ends: Vec<_> = recs.iter().filter(|r| r["event"] == "end").collect();
    assert_eq!(ends.len(), 3);
    for e in ends {
        assert_eq!(e["decision"], "permit");
        assert_eq!(e["upload"], "ok");
        assert_eq!(e["account"], "mpu-alice");
        assert_eq!(e["owner_dn"], "/DC=org/DC=mupilot-demo/CN=alice");
        assert_eq!(e["exit_code"], 0);
        assert_eq!(e["slot"]["cores"], 4);
    }
    // Work directories are removed after a successful upload.
    assert!(!h.dir.path().join("work/p1").exists());
}

#[tokio::test(start_paused = true)]
async fn payload_that_does_not_fit_is_handed_back() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "big", 2, 60)];
    let (h, fut) = start(works, Duration::from_millis(50), |_, _| {}, 1);
    let out = fut.await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.summary.handed_back, 1);
    assert!(h.helper.launches.lock().unwrap().is_empty());
    let r = h.server.final_report("big");
    assert_eq!(r.state, Some(PayloadState::Queued));
    assert!(r.reason.unwrap().contains("cores"));
    let recs = trace_records(&h);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["decision"], "not_launched");
}

#[tokio::test(start_paused = true)]
async fn walltime_beyond_the_deadline_is_handed_back() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "long", 1, 3600)];
    // The slot ends in 10 minutes: a one-hour payload cannot fit.
    let mut s = slot(1);
    s.deadline_unix = Some(Utc::now().timestamp() + 600);
    let (h, fut) = start_slot(works, Duration::from_millis(50), |_, _| {}, s);
    let out = fut.await;
    assert_eq!(out.summary.handed_back, 1);
    let r = h.server.final_report("long");
    assert_eq!(r.state, Some(PayloadState::Queued));
    assert!(r.reason.unwrap().contains("wall time"));
    assert!(h.server.matches.lock().unwrap()[0].seconds_left <= 600);
    assert!(h.helper.launches.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn denial_is_reported_final_and_never_retried() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "carol1", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_millis(50),
        |hp, _| {
            hp.deny.insert("carol1".into());
        },
        2,
    );
    let out = fut.await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.summary.denied, 1);
    assert_eq!(
        *h.helper.launches.lock().unwrap(),
        vec!["carol1".to_string()]
    );
    assert_eq!(h.server.states("carol1"), vec![PayloadState::Denied]);
    let r = h.server.final_report("carol1");
    assert_eq!(r.denial_class.as_deref(), Some("authorization"));
    assert!(r.reason.unwrap().contains("no mapping"));
    assert!(h.server.uploads.lock().unwrap().is_empty());
    let recs = trace_records(&h);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["decision"], "deny");
    assert_eq!(recs[1]["denial_class"], "authorization");
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_ends_the_pilot() {
    let (h, fut) = start(vec![], Duration::from_millis(50), |_, _| {}, 1);
    let t0 = Instant::now();
    let out = fut.await;
    // Paused time: the idle timeout (300 ms) to the tick (10 ms) that notices it.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took <= Duration::from_millis(320),
        "{took:?}"
    );
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.summary.end_reason, "idle timeout");
    // It polled repeatedly in the meantime.
    assert!(h.server.matches.lock().unwrap().len() >= 3);
}

#[tokio::test(start_paused = true)]
async fn max_payloads_stops_fetching() {
    let key = VoSigningKey::generate();
    let works = (1..=3)
        .map(|i| work(&key, &format!("m{i}"), 1, 60))
        .collect();
    let (h, fut) = start(
        works,
        Duration::from_millis(100),
        |_, cfg| cfg.max_payloads = Some(2),
        4,
    );
    let out = fut.await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.summary.launched, 2);
    assert_eq!(out.summary.end_reason, "max payloads reached");
    assert_eq!(h.server.queue.lock().unwrap().len(), 1);
    assert_eq!(h.server.matches.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn graceful_stop_sends_term_then_kill() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "stubborn", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_secs(60),
        |hp, _| hp.ignore_term = true,
        1,
    );
    let control = h.control.clone();
    let helper = h.helper.clone();
    tokio::spawn(async move {
        while helper.running.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        control.send(Control::Stop("SIGTERM".into())).unwrap();
    });
    let out = fut.await;
    assert_eq!(out.exit_code, 0);
    assert!(out.summary.end_reason.contains("SIGTERM"));
    let sigs = h.helper.signals.lock().unwrap().clone();
    let nums: Vec<i32> = sigs.iter().map(|s| s.1).collect();
    assert_eq!(nums, vec![SIGTERM, SIGKILL]);
    // The grace time (300 ms) to the tick (10 ms) that notices it.
    let grace = sigs[1].2 - sigs[0].2;
    assert!(
        grace >= Duration::from_millis(300) && grace <= Duration::from_millis(320),
        "{grace:?}"
    );
    let r = h.server.final_report("stubborn");
    assert_eq!(r.state, Some(PayloadState::Failed));
    assert_eq!(r.signal, Some(SIGKILL));
    assert_eq!(h.server.queue.lock().unwrap().len(), 0);
    let recs = trace_records(&h);
    assert_eq!(recs[1]["signal"], SIGKILL);
}

#[tokio::test(start_paused = true)]
async fn drain_file_finishes_running_work_and_fetches_no_more() {
    let key = VoSigningKey::generate();
    let works = (1..=3)
        .map(|i| work(&key, &format!("d{i}"), 1, 60))
        .collect();
    let (h, fut) = start(
        works,
        Duration::from_millis(300),
        |_, cfg| {
            cfg.drain_file = Some(cfg.work_dir.join("DRAIN"));
            cfg.idle_timeout = Duration::from_secs(30);
        },
        1,
    );
    let helper = h.helper.clone();
    let drain = h.dir.path().join("work/DRAIN");
    tokio::spawn(async move {
        while helper.launches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::write(drain, b"").unwrap();
    });
    let t0 = Instant::now();
    let out = fut.await;
    // The running payload's 300 ms, then the tick that sees the drain file: no more.
    let took = t0.elapsed();
    assert!(took <= Duration::from_millis(350), "{took:?}");
    assert_eq!(out.exit_code, 0);
    assert!(
        out.summary.end_reason.contains("drain"),
        "{:?}",
        out.summary
    );
    assert_eq!(out.summary.launched, 1);
    assert_eq!(out.summary.done, 1);
    assert!(h.helper.signals.lock().unwrap().is_empty());
    assert_eq!(h.server.queue.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn operator_cancel_is_relayed_and_reported() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "c1", 1, 60)];
    let (h, fut) = start(works, Duration::from_secs(60), |_, _| {}, 1);
    h.server.commands.lock().unwrap().insert(
        "c1".into(),
        vec![OperatorCommand::Cancel {
            requester: "/DC=org/DC=mupilot-demo/CN=alice".into(),
            signed: None,
        }],
    );
    let out = fut.await;
    assert_eq!(out.summary.cancelled, 1);
    let sigs: Vec<i32> = h
        .helper
        .signals
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.1)
        .collect();
    assert_eq!(sigs, vec![SIGTERM]);
    let r = h.server.final_report("c1");
    assert_eq!(r.state, Some(PayloadState::Cancelled));
    assert!(r.reason.unwrap().contains("alice"));
}

#[tokio::test(start_paused = true)]
async fn helper_loss_reports_payloads_lost_and_fails() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "l1", 1, 60)];
    let (h, fut) = start(works, Duration::from_secs(60), |_, _| {}, 1);
    let helper = h.helper.clone();
    tokio::spawn(async move {
        while helper.running.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        helper
            .tx
            .send(HelperMsg::Closed("connection closed".into()))
            .unwrap();
    });
    let out = fut.await;
    assert_eq!(out.exit_code, 1);
    assert_eq!(out.summary.lost, 1);
    assert_eq!(h.server.final_report("l1").state, Some(PayloadState::Lost));
    let recs = trace_records(&h);
    assert_eq!(recs[1]["kill_reason"], "helper_gone");
    // Nothing was fetched after the loss.
    assert_eq!(h.server.matches.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_report_running() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "hb", 1, 60)];
    let (h, fut) = start(works, Duration::from_millis(400), |_, _| {}, 1);
    let out = fut.await;
    assert_eq!(out.summary.done, 1);
    let running = h
        .server
        .states("hb")
        .iter()
        .filter(|s| **s == PayloadState::Running)
        .count();
    assert!(running >= 3, "{running} running reports");
}

/// Heartbeats carry the usage the helper reported, asked once per round for all payloads;
/// the current memory only for a server that announced `live_usage`.
#[tokio::test(start_paused = true)]
async fn heartbeats_carry_the_helpers_usage_asked_once_per_round() {
    let key = VoSigningKey::generate();
    let mut a = work(&key, "u1", 1, 60);
    a.live_usage = true;
    let b = work(&key, "u2", 1, 60);
    let (h, fut) = start(vec![a, b], Duration::from_millis(600), |_, _| {}, 2);
    let out = fut.await;
    assert_eq!(out.summary.done, 2);
    let reports = h.server.reports.lock().unwrap().clone();
    let beats = |id: &str| -> Vec<StatusReport> {
        reports
            .iter()
            .filter(|(p, r)| p == id && r.state == Some(PayloadState::Running))
            .filter(|(_, r)| r.cpu_seconds.is_some())
            .map(|(_, r)| r.clone())
            .collect()
    };
    let (u1, u2) = (beats("u1"), beats("u2"));
    assert!(u1.len() >= 3 && u2.len() >= 3, "{u1:?}\n{u2:?}");
    let cpu: Vec<f64> = u1.iter().map(|r| r.cpu_seconds.unwrap()).collect();
    assert!(cpu.windows(2).all(|w| w[0] < w[1]), "rising: {cpu:?}");
    assert!(u1
        .iter()
        .all(|r| r.memory_bytes.is_some() && r.peak_memory_bytes.is_some()));
    // An older server refuses fields it does not know: no current memory for it.
    assert!(u2
        .iter()
        .all(|r| r.memory_bytes.is_none() && r.peak_memory_bytes.is_some()));
    // One request per round serves both payloads' heartbeats.
    let asked = h
        .helper
        .usage_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        asked as usize <= u1.len().max(u2.len()) + 1,
        "{asked} usage requests for {} + {} heartbeats",
        u1.len(),
        u2.len()
    );
}

/// A helper that does not answer `status` delays no heartbeat beyond [`USAGE_WAIT`]: they go
/// without usage.
#[tokio::test(start_paused = true)]
async fn heartbeats_go_without_usage_when_the_helper_does_not_report_it() {
    let key = VoSigningKey::generate();
    let mut w = work(&key, "u3", 1, 60);
    w.live_usage = true;
    let (h, fut) = start(vec![w], USAGE_WAIT * 4, |hp, _| hp.mute_status = true, 1);
    let out = fut.await;
    assert_eq!(out.summary.done, 1);
    let reports = h.server.reports.lock().unwrap().clone();
    let beats: Vec<&StatusReport> = reports
        .iter()
        .filter(|(p, r)| p == "u3" && r.state == Some(PayloadState::Running))
        .map(|(_, r)| r)
        .collect();
    assert!(beats.len() >= 3, "{} running reports", beats.len());
    assert!(beats.iter().all(|r| r.cpu_seconds.is_none()));
}

#[tokio::test(start_paused = true)]
async fn second_stop_kills_at_once() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "s2", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_secs(60),
        |hp, cfg| {
            hp.ignore_term = true;
            cfg.grace = Duration::from_secs(30);
        },
        1,
    );
    let control = h.control.clone();
    let helper = h.helper.clone();
    tokio::spawn(async move {
        while helper.running.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        control.send(Control::Stop("SIGTERM".into())).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        control.send(Control::Stop("SIGINT".into())).unwrap();
    });
    let t0 = Instant::now();
    let out = fut.await;
    // Killed at the second stop (50 ms after the first), not after the 30 s grace.
    let took = t0.elapsed();
    assert!(took <= Duration::from_millis(100), "{took:?}");
    assert_eq!(out.exit_code, 0);
    let nums: Vec<i32> = h
        .helper
        .signals
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.1)
        .collect();
    assert_eq!(nums, vec![SIGTERM, SIGKILL]);
}

#[tokio::test(start_paused = true)]
async fn unanswered_launch_times_out_as_failed() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "t1", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_secs(60),
        |hp, cfg| {
            hp.silent = true;
            cfg.launch_timeout = Duration::from_millis(200);
            cfg.max_payloads = Some(1);
        },
        1,
    );
    let out = fut.await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.summary.failed, 1);
    let r = h.server.final_report("t1");
    assert_eq!(r.state, Some(PayloadState::Failed));
    assert!(r.reason.unwrap().contains("did not answer"));
    let recs = trace_records(&h);
    assert_eq!(recs[1]["decision"], "not_launched");
}

#[tokio::test(start_paused = true)]
async fn anonymous_denial_goes_to_the_waiting_launch() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "a1", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_secs(60),
        |hp, _| hp.deny_anonymous = true,
        1,
    );
    let out = fut.await;
    // A caller refusal (an unreadable envelope) is `failed`, not `denied`.
    assert_eq!(out.summary.failed, 1);
    let r = h.server.final_report("a1");
    assert_eq!(r.state, Some(PayloadState::Failed));
    assert_eq!(r.denial_class.as_deref(), Some("caller"));
    let recs = trace_records(&h);
    assert_eq!(recs[1]["state"], "failed");
    assert_eq!(recs[1]["denial_class"], "caller");
    assert_eq!(recs[1]["decision"], "deny");
}

// Real time: the deadline is a Unix time (see the module's comment).
#[tokio::test]
async fn slot_deadline_stops_the_pilot() {
    let mut s = slot(1);
    s.deadline_unix = Some(Utc::now().timestamp() + 1);
    let (h, fut) = start_slot(
        vec![],
        Duration::from_millis(50),
        |_, cfg| cfg.idle_timeout = Duration::from_secs(30),
        s,
    );
    let t0 = Instant::now();
    let out = fut.await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(out.exit_code, 0);
    assert!(
        out.summary.end_reason.contains("deadline"),
        "{:?}",
        out.summary
    );
    // It asked with the time it had left, never more.
    for m in h.server.matches.lock().unwrap().iter() {
        assert!(m.seconds_left <= 1);
    }
}

/// Files (not the lock) in every pilot's outbox below `work`.
fn outbox_files(work: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(crate::pilot::outbox::root(work)) else {
        return out;
    };
    for d in rd.filter_map(Result::ok) {
        for f in std::fs::read_dir(d.path()).unwrap().filter_map(Result::ok) {
            let name = f.file_name().to_string_lossy().into_owned();
            if name != "lock" {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(start_paused = true)]
async fn final_states_wait_in_the_outbox_while_the_server_is_down() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "o1", 1, 60), work(&key, "o2", 1, 60)];
    let (h, fut) = start(works, Duration::from_millis(100), |_, _| {}, 2);
    h.server.set_down(true);
    let server = h.server.clone();
    let work_dir = h.dir.path().join("work");
    let watcher = tokio::spawn(async move {
        // Both final states and archives reach the disk while the server is down.
        let want = ["o1.json", "o1.tar.gz", "o2.json", "o2.tar.gz"];
        let deadline = Instant::now() + Duration::from_secs(10);
        while outbox_files(&work_dir) != want {
            assert!(Instant::now() < deadline, "{:?}", outbox_files(&work_dir));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.set_down(false);
    });
    let out = fut.await;
    watcher.await.unwrap();
    assert_eq!(out.exit_code, 0, "{:?}", out.summary);
    assert_eq!((out.summary.done, out.summary.unsent), (2, 0));
    for id in ["o1", "o2"] {
        assert_eq!(h.server.final_report(id).state, Some(PayloadState::Done));
        assert!(h
            .server
            .uploads
            .lock()
            .unwrap()
            .iter()
            .any(|(p, _)| p == id));
        assert!(!h.dir.path().join("work").join(id).exists());
    }
    assert!(outbox_files(&h.dir.path().join("work")).is_empty());
    let recs = trace_records(&h);
    assert!(recs
        .iter()
        .filter(|r| r["event"] == "end")
        .all(|r| r["upload"] == "ok"));
}

#[tokio::test(start_paused = true)]
async fn a_pilot_leaves_unsent_reports_and_the_next_one_delivers_them() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "u1", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_millis(50),
        |_, c| c.outbox_wait = Duration::from_millis(300),
        1,
    );
    h.server.set_down(true);
    let out = fut.await;
    assert_eq!(out.exit_code, 1, "{:?}", out.summary);
    assert_eq!(out.summary.unsent, 1);
    let end = trace_records(&h)
        .into_iter()
        .find(|r| r["event"] == "end")
        .unwrap();
    assert!(
        end["upload"].as_str().unwrap().starts_with("unsent:"),
        "{end}"
    );
    let work_dir = h.dir.path().join("work");
    assert_eq!(outbox_files(&work_dir), ["u1.json", "u1.tar.gz"]);
    assert!(h.server.reports.lock().unwrap().is_empty());

    // A new pilot in the same work dir, with the server back and no work for it. (The first
    // pilot's aborted reporter lets go of its outbox once the runtime drops it; a real pilot
    // is a process that has exited.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.server.set_down(false);
    let (htx, hrx) = mpsc::unbounded_channel();
    let (_ctx, crx) = mpsc::unbounded_channel();
    let helper = Arc::new(FakeHelper::new(htx, Duration::from_millis(50)));
    let mut cfg = settings(h.dir.path());
    cfg.pilot_id = "plt-pilot-2".into();
    let trace = TraceLog::open(&work_dir.join("trace.jsonl")).unwrap();
    let outbox = Outbox::open(&work_dir, &cfg.pilot_id).unwrap();
    let out = run(
        cfg,
        slot(1),
        h.server.clone(),
        helper,
        hrx,
        crx,
        Ledger { trace, outbox },
    )
    .await;
    assert_eq!(out.exit_code, 0, "{:?}", out.summary);
    assert_eq!(out.summary.adopted, 1);
    // Sent on behalf of the pilot the payload was matched to.
    let rep = h.server.final_report("u1");
    assert_eq!(rep.state, Some(PayloadState::Done));
    assert_eq!(rep.pilot_id, "plt-pilot");
    assert_eq!(h.server.uploads.lock().unwrap().len(), 1);
    assert!(outbox_files(&work_dir).is_empty());
    assert!(!work_dir.join("u1").exists());
    let delivered = trace_records(&h)
        .into_iter()
        .find(|r| r["event"] == "delivered")
        .expect("a delivered record");
    assert_eq!(delivered["pilot_id"], "plt-pilot-2");
    assert_eq!(delivered["upload"], "ok");
    assert!(delivered["reason"].as_str().unwrap().contains("plt-pilot"));
}

#[tokio::test(start_paused = true)]
async fn a_launch_that_never_reached_the_helper_is_handed_back_not_lost() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "n1", 1, 60)];
    let (h, fut) = start(
        works,
        Duration::from_secs(60),
        |hp, _| hp.fail_launch = true,
        1,
    );
    let out = fut.await;
    assert_eq!(out.exit_code, 1);
    assert_eq!((out.summary.lost, out.summary.handed_back), (0, 1));
    let rep = h.server.final_report("n1");
    assert_eq!(rep.state, Some(PayloadState::Queued));
    assert!(rep.reason.unwrap().contains("not started"));
    let end = trace_records(&h)
        .into_iter()
        .find(|r| r["event"] == "end")
        .unwrap();
    assert_eq!(end["decision"], "not_launched");
    assert_eq!(end["state"], "queued");
}

// Real time: the deadline is a Unix time (see the module's comment).
#[tokio::test]
async fn a_payload_the_server_does_not_know_started_is_stopped_before_requeue_after() {
    let key = VoSigningKey::generate();
    let mut w = work(&key, "f1", 1, 60);
    // The server queues it again in 61 s: the pilot must stop it 60 s (+ grace) before.
    w.requeue_after = Some(Utc::now() + chrono::Duration::milliseconds(61_000));
    w.heartbeat_seconds = Some(1);
    let (h, fut) = start(vec![w], Duration::from_secs(60), |_, _| {}, 1);
    h.server.set_down(true);
    let server = h.server.clone();
    let helper = h.helper.clone();
    tokio::spawn(async move {
        while helper.signals.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.set_down(false);
    });
    let out = fut.await;
    assert_eq!(out.summary.failed, 1, "{:?}", out.summary);
    let sig = h.helper.signals.lock().unwrap()[0].clone();
    assert_eq!((sig.0.as_str(), sig.1), ("f1", SIGTERM));
    let rep = h.server.final_report("f1");
    assert_eq!(rep.state, Some(PayloadState::Failed));
    assert!(rep.reason.unwrap().contains("requeue_after"));
}

#[tokio::test(start_paused = true)]
async fn refused_final_reports_keep_the_outputs_on_the_node_and_a_409_still_uploads() {
    let key = VoSigningKey::generate();
    let works = vec![work(&key, "r403", 1, 60), work(&key, "r409", 1, 60)];
    let (h, fut) = start(works, Duration::from_millis(50), |_, _| {}, 2);
    {
        let mut refuse = h.server.refuse_final.lock().unwrap();
        refuse.insert("r403".into(), 403);
        refuse.insert("r409".into(), 409);
    }
    let out = fut.await;
    assert_eq!(out.exit_code, 0, "{:?}", out.summary);
    assert_eq!(out.summary.upload_errors, 1);
    let work_dir = h.dir.path().join("work");
    // 403: the server will never take it: the entry goes, the archive and the payload's
    // directory stay for the operator; nothing was uploaded.
    assert_eq!(outbox_files(&work_dir), ["r403.tar.gz"]);
    assert!(work_dir.join("r403").join("stdout").exists());
    let uploads: Vec<String> = h
        .server
        .uploads
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    // 409: a final state is already there; the outputs still belong to the payload.
    assert_eq!(uploads, ["r409"]);
    assert!(!work_dir.join("r409").exists());
}

fn delegated_work(key: &VoSigningKey, id: &str) -> Work {
    let mut w = work(key, id, 1, 60);
    let mut body = peek_body(&w.envelope).unwrap();
    body.credential = Some(crate::protocol::delegation::DelegatedCredential {
        kind: crate::protocol::delegation::CredentialKind::X509Proxy,
        not_after: Utc::now() + chrono::Duration::days(1),
    });
    w.envelope = key.sign(&body);
    w
}

#[tokio::test(start_paused = true)]
async fn a_delegated_payload_launches_with_the_servers_chain_and_is_renewed() {
    let key = VoSigningKey::generate();
    let (h, fut) = start(
        vec![delegated_work(&key, "d1"), work(&key, "p1", 1, 60)],
        Duration::from_millis(500),
        |_, _| {},
        2,
    );
    let out = fut.await;
    assert_eq!(out.summary.done, 2, "{:?}", out.summary);
    let calls = h.helper.proxy_calls.lock().unwrap().clone();
    let calls: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|(k, id, c)| (*k, id.as_str(), c.as_str()))
        .collect();
    // CSR -> server -> chain with the launch; then, the proxy expiring, the same for a
    // renewal, once (the renewed proxy is good for hours). The plain payload needs none.
    assert_eq!(
        calls,
        [
            ("request", "d1", ""),
            ("launch", "d1", "chain for csr-d1-1"),
            ("renew", "d1", ""),
            ("renewed", "d1", "chain for csr-d1-2"),
        ]
    );
    let csrs = h.server.csrs.lock().unwrap().clone();
    assert_eq!(
        csrs,
        [
            ("d1".to_string(), "csr-d1-1".to_string()),
            ("d1".to_string(), "csr-d1-2".to_string())
        ]
    );
    assert_eq!(h.server.states("d1").last(), Some(&PayloadState::Done));
}

#[tokio::test(start_paused = true)]
async fn a_payload_whose_proxy_the_server_refuses_fails_without_a_launch() {
    let key = VoSigningKey::generate();
    let (h, fut) = start(
        vec![delegated_work(&key, "d2")],
        Duration::from_millis(100),
        |_, _| {},
        1,
    );
    h.server.refuse_proxy.lock().unwrap().insert("d2".into());
    let out = fut.await;
    assert_eq!(out.summary.failed, 1, "{:?}", out.summary);
    assert!(
        h.helper.launches.lock().unwrap().is_empty(),
        "launched without its proxy"
    );
    let f = h.server.final_report("d2");
    assert_eq!(f.state, Some(PayloadState::Failed));
    let reason = f.reason.unwrap();
    assert!(
        reason.contains("issued no proxy") && reason.contains("delegated credential expired"),
        "{reason}"
    );
    let recs = trace_records(&h);
    let end = recs.iter().find(|r| r["event"] == "end").unwrap();
    assert_eq!(end["decision"], "not_launched");
}

#[tokio::test(start_paused = true)]
async fn a_payload_whose_proxy_the_server_cannot_be_asked_for_is_handed_back() {
    let key = VoSigningKey::generate();
    let (h, fut) = start(
        vec![delegated_work(&key, "d3")],
        Duration::from_millis(100),
        |_, _| {},
        1,
    );
    h.server
        .unreachable_proxy
        .lock()
        .unwrap()
        .insert("d3".into());
    let out = fut.await;
    assert_eq!(
        (out.summary.handed_back, out.summary.failed),
        (1, 0),
        "{:?}",
        out.summary
    );
    assert!(
        h.helper.launches.lock().unwrap().is_empty(),
        "launched without its proxy"
    );
    // Back to the queue for a later match, not failed for an outage.
    let f = h.server.final_report("d3");
    assert_eq!(f.state, Some(PayloadState::Queued));
    let reason = f.reason.unwrap();
    assert!(
        reason.contains("handed back") && reason.contains("could not be reached"),
        "{reason}"
    );
    let recs = trace_records(&h);
    let end = recs.iter().find(|r| r["event"] == "end").unwrap();
    assert_eq!(
        (&end["decision"], &end["state"]),
        (
            &serde_json::json!("not_launched"),
            &serde_json::json!("queued")
        )
    );
}
