//! Match throughput of a running mupilot-server for scripts/bench.sh (a benchmark, not a test).
//!
//! `match_bench URL VO_DIR N_ONE N_MANY`: submits N_ONE + N_MANY `true` payloads as alice, then
//! matches N_ONE of them from one pilot in sequence over one keep-alive mTLS connection, and
//! N_MANY from 16 pilots at once (each its own client and connection). Prints
//! `one MATCHES_PER_S` and `many MATCHES_PER_S`, and fails if any match came back empty or a
//! payload was handed out twice. VO_DIR is the directory `mupilot-server init` wrote.
//!
//! `match_bench fill URL VO_DIR N [WALLTIME_SECONDS] -- ARGV...`: only submits N payloads
//! running ARGV (one core, 64 MiB, 60 s of wall time unless given), as alice.
//!
//! `match_bench spread VO_DIR N PILOTS URL...`: N matches of already queued payloads from
//! PILOTS pilots at once, pilot i on URL i mod (number of URLs) (several server instances on
//! one database), each request timed. Prints `rate MATCHES_PER_S`, `p50 MS` and `p99 MS`;
//! fails if a match came back empty or a payload was handed out twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mupilot::protocol::api::{MatchRequest, MatchResponse, SubmitRequest};
use mupilot::protocol::Resources;

fn req(pilot: &str) -> MatchRequest {
    MatchRequest {
        pilot_id: pilot.into(),
        batch_system: None,
        batch_job_id: None,
        host: "bench".into(),
        free_cores: 8,
        free_memory_bytes: 16 << 30,
        seconds_left: 86400,
    }
}

fn client(dir: &Path, name: &str) -> reqwest::Client {
    mupilot::tls::https_client(
        &dir.join(format!("{name}.crt")),
        &dir.join(format!("{name}.key")),
        &dir.join("certificates"),
    )
    .unwrap_or_else(|e| panic!("client for {name}: {e}"))
}

async fn fill(dir: &Path, url: &str, n: usize, walltime_seconds: u64, argv: &[String]) {
    let alice = client(dir, "alice");
    let sub = SubmitRequest {
        argv: argv.to_vec(),
        env: Default::default(),
        jobtag: None,
        resources: Resources {
            cores: 1,
            memory_bytes: 64 << 20,
            walltime_seconds,
        },
        outputs: vec![],
        bundle: None,
        delegation: None,
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, url, sub, sem) = (alice.clone(), url.to_string(), sub.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = c.post(&url).json(&sub).send().await.expect("submit");
            assert_eq!(r.status(), 201, "submit failed");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn one_match(c: &reqwest::Client, url: &str, pilot: &str) -> String {
    let m: MatchResponse = c
        .post(url)
        .json(&req(pilot))
        .send()
        .await
        .expect("match request")
        .json()
        .await
        .expect("match response");
    m.work.expect("work left to match").payload_id
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("fill") {
        let dash = args.iter().position(|a| a == "--");
        let (Some(dash), true) = (dash, args.len() > 4) else {
            eprintln!("usage: match_bench fill URL VO_DIR N [WALLTIME_SECONDS] -- ARGV...");
            std::process::exit(2);
        };
        let n: usize = args[3].parse().expect("N");
        let walltime = match &args[4..dash] {
            [] => 60,
            [w] => w.parse().expect("WALLTIME_SECONDS"),
            _ => panic!("one WALLTIME_SECONDS at most before --"),
        };
        let base = args[1].trim_end_matches('/');
        fill(
            Path::new(&args[2]),
            &format!("{base}/v1/payloads"),
            n,
            walltime,
            &args[dash + 1..],
        )
        .await;
        return;
    }
    if args.first().map(String::as_str) == Some("spread") {
        let [_, dir, n, pilots, urls @ ..] = args.as_slice() else {
            eprintln!("usage: match_bench spread VO_DIR N PILOTS URL...");
            std::process::exit(2);
        };
        assert!(!urls.is_empty(), "at least one URL");
        spread(
            Path::new(dir),
            n.parse().expect("N"),
            pilots.parse().expect("PILOTS"),
            urls,
        )
        .await;
        return;
    }
    if args.len() != 4 {
        eprintln!("usage: match_bench URL VO_DIR N_ONE N_MANY | fill URL VO_DIR N [WALLTIME_SECONDS] -- ARGV... | spread VO_DIR N PILOTS URL...");
        std::process::exit(2);
    }
    let base = args[0].trim_end_matches('/').to_string();
    let dir = PathBuf::from(&args[1]);
    let n_one: usize = args[2].parse().expect("N_ONE");
    let n_many: usize = args[3].parse().expect("N_MANY");
    // One more for the warm-up match of the sequential pilot.
    let argv = vec!["/bin/true".to_string()];
    fill(
        &dir,
        &format!("{base}/v1/payloads"),
        n_one + n_many + 1,
        60,
        &argv,
    )
    .await;

    let url = format!("{base}/v1/match");
    let pilot = client(&dir, "pilot");
    let mut ids = vec![one_match(&pilot, &url, "warm").await];
    let t = Instant::now();
    for _ in 0..n_one {
        ids.push(one_match(&pilot, &url, "one").await);
    }
    let one = n_one as f64 / t.elapsed().as_secs_f64();

    let per = n_many / 16;
    // Clients are built before the clock starts; each TLS handshake is measured, as a new
    // pilot would pay it.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(client(&dir, "pilot"));
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per);
            for _ in 0..per {
                got.push(one_match(&c, &url, &format!("many-{i}")).await);
            }
            got
        }));
    }
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let many = (per * 16) as f64 / t.elapsed().as_secs_f64();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    if unique.len() != ids.len() {
        eprintln!("a payload was matched twice");
        std::process::exit(1);
    }
    println!("one {one:.0}");
    println!("many {many:.0}");
}

/// `spread`: see the module comment.
async fn spread(dir: &Path, n: usize, pilots: usize, urls: &[String]) {
    let per = n / pilots;
    let mut clients = Vec::new();
    for i in 0..pilots {
        let c = client(dir, "pilot");
        let url = format!("{}/v1/match", urls[i % urls.len()].trim_end_matches('/'));
        // Warm the connection: the handshake is not a match.
        let _ = c.post(&url).json(&req("warm")).send().await;
        clients.push((c, url));
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, (c, url)) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let id = one_match(&c, &url, &format!("spread-{i}")).await;
                got.push((id, t.elapsed().as_secs_f64() * 1000.0));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / t.elapsed().as_secs_f64();
    let unique: std::collections::HashSet<_> = all.iter().map(|(id, _)| id).collect();
    if unique.len() != all.len() {
        eprintln!("a payload was matched twice");
        std::process::exit(1);
    }
    let mut ms: Vec<f64> = all.iter().map(|(_, m)| *m).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    println!("rate {rate:.0}");
    println!("p50 {:.2}", pct(0.50));
    println!("p99 {:.2}", pct(0.99));
}
