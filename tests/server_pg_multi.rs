//! Past one machine: 3 `mupilot-server` instances (the real binary, TLS, one shared data
//! directory) against one PostgreSQL database, 64 concurrent pilots, 10,000 payloads. The
//! pilots are lightweight HTTP/TLS loops with the pilot's certificate (match, report
//! running, report done; no helper, no envelope verification: the full pilot is tested in
//! e2e). Each payload is handed to a pilot exactly once; one instance is killed with SIGKILL
//! mid-run and nothing is lost: its pilots go on with the other instances, and a match it
//! had committed but never answered is requeued by the sweep (driven here with the clock
//! advanced past the envelope lifetime, as a surviving instance's sweeper would) and then
//! finished.

use server_support::pg_support;
mod server_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mupilot::protocol::api::{MatchResponse, PayloadState, StatusReport};
use mupilot::server::store::{Store, SweepRules};
use pg_support::PgCluster;
use server_support::{match_req_8, small_job, Demo, Server};

const PAYLOADS: usize = 10_000;
const PILOTS: usize = 64;
const INSTANCES: usize = 3;

fn report(pilot: &str, state: PayloadState) -> StatusReport {
    StatusReport {
        pilot_id: pilot.into(),
        state: Some(state),
        exit_code: (state == PayloadState::Done).then_some(0),
        ..Default::default()
    }
}

/// The instances' URLs; a dead one is taken out so pilots move on.
struct Instances {
    urls: Mutex<Vec<Option<String>>>,
}

impl Instances {
    /// The next live instance after `i` (round robin).
    fn pick(&self, i: usize) -> (usize, String) {
        let urls = self.urls.lock().unwrap();
        for k in 0..urls.len() {
            let j = (i + k) % urls.len();
            if let Some(u) = &urls[j] {
                return (j, u.clone());
            }
        }
        panic!("no live instance");
    }
}

/// POSTs `body` to `path` on a live instance, moving to the next one while the connection
/// fails (the instance was killed); returns the answer's status and body.
async fn post<T: serde::Serialize>(
    client: &reqwest::Client,
    inst: &Instances,
    start: &mut usize,
    path: &str,
    body: &T,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (i, url) = inst.pick(*start);
        match client.post(format!("{url}{path}")).json(body).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.text().await {
                    Ok(t) => return (status, t),
                    Err(_) => *start = i + 1,
                }
            }
            Err(_) => *start = i + 1,
        }
        assert!(Instant::now() < deadline, "no instance answered {path}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs blocking work (the sync PostgreSQL client, process waits) off the async workers.
fn sync<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_64_pilots_10000_payloads_one_killed() {
    let t_start = Instant::now();
    // fsync off: this is about instances and row locks, not power loss (scripts/bench.sh
    // measures with fsync on).
    let cluster = sync(|| PgCluster::start_with(&["fsync=off"]));
    let db = sync(|| cluster.create_db());
    let demo = Demo::new();
    let mut toml = std::fs::read_to_string(demo.config()).unwrap();
    toml.push_str(&cluster.toml(&db, true));
    std::fs::write(demo.config(), toml).unwrap();
    let mut servers: Vec<Server> = (0..INSTANCES)
        .map(|i| {
            Server::start(
                &demo.config(),
                &demo.tmp.path().join(format!("server-{i}.log")),
            )
        })
        .collect();
    let inst = Arc::new(Instances {
        urls: Mutex::new(servers.iter().map(|s| Some(s.url.clone())).collect()),
    });

    // 10,000 submissions over HTTPS, spread over the instances.
    let alice = demo.client("alice");
    let sub = small_job(&["/bin/true"], None);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (c, inst, sub, next) = (alice.clone(), inst.clone(), sub.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut start = w;
            while next.fetch_add(1, Ordering::Relaxed) < PAYLOADS {
                let (st, body) = post(&c, &inst, &mut start, "/v1/payloads", &sub).await;
                assert_eq!(st, 201, "{body}");
                start += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let t_submitted = t_start.elapsed();

    // 64 pilots: match, running, done, until every payload is done.
    let done = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let t_match = Instant::now();
    let mut pilots = Vec::new();
    for p in 0..PILOTS {
        let c = demo.client("pilot");
        let (inst, done, received) = (inst.clone(), done.clone(), received.clone());
        pilots.push(tokio::spawn(async move {
            let id = format!("pilot-{p}");
            let mut start = p;
            let deadline = Instant::now() + Duration::from_secs(170);
            while done.load(Ordering::Relaxed) < PAYLOADS {
                assert!(Instant::now() < deadline, "pilots did not finish");
                let (st, body) = post(&c, &inst, &mut start, "/v1/match", &match_req_8(&id)).await;
                assert_eq!(st, 200, "{body}");
                let m: MatchResponse = serde_json::from_str(&body).unwrap();
                let Some(work) = m.work else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                received.lock().unwrap().push(work.payload_id.clone());
                for state in [PayloadState::Running, PayloadState::Done] {
                    let path = format!("/v1/payloads/{}/status", work.payload_id);
                    let (st, body) = post(&c, &inst, &mut start, &path, &report(&id, state)).await;
                    assert_eq!(st, 200, "{state} for {}: {body}", work.payload_id);
                }
                done.fetch_add(1, Ordering::Relaxed);
                start += 1;
            }
        }));
    }

    // Kill instance 1 with SIGKILL once a third of the payloads are done.
    while done.load(Ordering::Relaxed) < PAYLOADS / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_pid = servers[1].pid().unwrap();
    servers[1].kill();
    inst.urls.lock().unwrap()[1] = None;
    let done_at_kill = done.load(Ordering::Relaxed);

    // A match instance 1 committed but never answered stays `matched`; once the queue is
    // empty and progress stops, sweep as a surviving instance does after the envelope
    // lifetime (the clock advanced rather than waited for).
    let store =
        sync(|| Store::open_with(&demo.path("server-data"), &cluster.database(&db))).unwrap();
    let mut swept_requeued = 0;
    let mut last = (usize::MAX, Instant::now());
    while done.load(Ordering::Relaxed) < PAYLOADS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = done.load(Ordering::Relaxed);
        if d != last.0 {
            last = (d, Instant::now());
            continue;
        }
        if last.1.elapsed() < Duration::from_secs(2) {
            continue;
        }
        let queued = sync(|| store.list(None, Some(PayloadState::Queued)))
            .unwrap()
            .len();
        if queued == 0 {
            let after = chrono::Utc::now() + chrono::Duration::seconds(601);
            let rules = SweepRules {
                matched_before: after - chrono::Duration::seconds(600),
                silent_before: chrono::Utc::now() - chrono::Duration::seconds(3600),
                silence: "test".into(),
            };
            let swept = sync(|| store.sweep(&rules, chrono::Utc::now())).unwrap();
            swept_requeued += swept.requeued;
            assert_eq!((swept.failed, swept.lost), (0, 0));
            last.1 = Instant::now();
        }
    }
    for p in pilots {
        p.await.unwrap();
    }
    let t_matching = t_match.elapsed();

    // Every payload done; every one received by exactly one pilot.
    let received = received.lock().unwrap().clone();
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "a payload was handed out twice"
    );
    assert_eq!(received.len(), PAYLOADS);
    let all = sync(|| store.list(None, None)).unwrap();
    assert_eq!(all.len(), PAYLOADS);
    let mut states: HashMap<PayloadState, usize> = HashMap::new();
    for v in &all {
        *states.entry(v.state).or_default() += 1;
    }
    assert_eq!(
        states.get(&PayloadState::Done),
        Some(&PAYLOADS),
        "{states:?}"
    );
    let requeued = all
        .iter()
        .filter(|v| v.reason.as_deref().is_some_and(|r| r.contains("requeued")))
        .count();
    assert_eq!(requeued, swept_requeued);
    // The survivors still serve.
    for (i, s) in servers.iter_mut().enumerate() {
        if i != 1 {
            assert_eq!(sync(|| s.stop()), Some(0), "instance {i} stops cleanly");
        }
    }
    drop(store);
    sync(move || drop(cluster));
    println!(
        "pg multi: {PAYLOADS} payloads submitted in {:.1} s; {INSTANCES} instances, {PILOTS} pilots: all done in {:.1} s ({:.0} payloads/s, 3 requests each); instance 1 (pid {killed_pid}) SIGKILLed after {done_at_kill} done; {swept_requeued} committed-but-unanswered matches requeued by the sweep and finished; total {:.1} s",
        t_submitted.as_secs_f64(),
        t_matching.as_secs_f64(),
        PAYLOADS as f64 / t_matching.as_secs_f64(),
        t_start.elapsed().as_secs_f64()
    );
}
