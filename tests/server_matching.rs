//! Many matches against the real server (TLS, SQLite, keep-alive connections), from one pilot
//! in sequence and from 16 pilots at once: every match gets work and no payload is handed out
//! twice. Rates are printed for information only; scripts/bench.sh measures them (release).

mod server_support;

use std::sync::Arc;
use std::time::Instant;

use mupilot::protocol::api::MatchResponse;
use server_support::{match_req_8, small_job, Demo};

async fn fill(demo: &Demo, url: &str, n: usize) {
    let alice = demo.client("alice");
    let sub = small_job(&["/bin/true"], None);
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, url, sub, sem) = (alice.clone(), url.to_string(), sub.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = c.post(&url).json(&sub).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_and_concurrent_matches_never_hand_out_a_payload_twice() {
    let demo = Demo::new();
    let srv = demo.serve();
    let n_one = 500;
    let n_many = 1600;
    fill(&demo, &srv.url("/v1/payloads"), n_one + n_many).await;

    let pilot = demo.client("pilot");
    let url = srv.url("/v1/match");
    // Warm the connection so the handshake is not counted.
    let _ = pilot
        .post(&url)
        .json(&match_req_8("warm"))
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..n_one - 1 {
        let m: MatchResponse = pilot
            .post(&url)
            .json(&match_req_8("one"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(m.work.is_some());
    }
    let one = (n_one - 1) as f64 / t.elapsed().as_secs_f64();

    let per = n_many / 16;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = demo.client("pilot");
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per);
            for _ in 0..per {
                let m: MatchResponse = c
                    .post(&url)
                    .json(&match_req_8(&format!("many-{i}")))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                got.push(m.work.expect("work left").payload_id);
            }
            got
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let many = n_many as f64 / t.elapsed().as_secs_f64();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a payload was matched twice");
    println!("srv match throughput (debug build): 1 pilot {one:.0}/s, 16 pilots {many:.0}/s");
    drop(srv);
    // Server-side time per match, from the request log lines.
    let log = std::fs::read_to_string(demo.tmp.path().join("server.log")).unwrap();
    let micros: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("path=/v1/match") && l.contains("status=200"))
        .filter_map(|l| l.split("micros=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    if !micros.is_empty() {
        let mean = micros.iter().sum::<u64>() as f64 / micros.len() as f64;
        println!(
            "srv server-side time per match: mean {mean:.0} us over {} requests",
            micros.len()
        );
    }
}
