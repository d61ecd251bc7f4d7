//! The server's Prometheus endpoint against the real binary: `metrics_listen` in server.toml,
//! a plain-HTTP scrape, the OpenMetrics text parsed, and the numbers checked to move after a
//! submit, a refused submit, matches with and without work, and a second pilot.

mod server_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use mupilot::protocol::api::{MatchResponse, SubmitRequest};
use mupilot::protocol::Resources;
use server_support::{match_req, text, Demo, BIN};

fn submit_req() -> SubmitRequest {
    SubmitRequest {
        argv: vec!["/bin/true".into()],
        env: Default::default(),
        jobtag: None,
        resources: Resources {
            cores: 1,
            memory_bytes: 256 << 20,
            walltime_seconds: 600,
        },
        outputs: vec![],
        bundle: None,
        delegation: None,
    }
}

/// A loopback port free right now (the server binds it a moment later).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn add_metrics_listen(demo: &Demo, addr: &str) {
    let cfg = demo.config();
    let t = std::fs::read_to_string(&cfg).unwrap();
    // A top-level key: before the first [table] of the generated file.
    std::fs::write(&cfg, format!("metrics_listen = \"{addr}\"\n{t}")).unwrap();
}

/// One plain HTTP/1.1 GET; returns (status line, headers, body).
fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP answer");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Parses the text format: `name{labels} value` lines into a map keyed by the series as
/// written (`name{a="b",c="d"}`), checking the comment lines and the closing `# EOF`.
fn parse(body: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end:\n{body}");
    for line in &lines {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || *line == "# EOF",
                "unexpected comment {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        assert!(
            series.starts_with("mupilot_server_"),
            "unprefixed series {series}"
        );
        assert!(
            out.insert(series.to_string(), v).is_none(),
            "series {series} twice"
        );
    }
    out
}

fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    parse(&body)
}

fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series}; have {:?}", m.keys()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_moves_after_submit_and_match() {
    let demo = Demo::new();
    let maddr = free_port();
    add_metrics_listen(&demo, &maddr.to_string());
    let srv = demo.serve();

    let m0 = scrape(maddr);
    // Nothing submitted yet: no per-VO rows, counters absent or zero, pilots 0.
    assert_eq!(val(&m0, "mupilot_server_pilots_seen"), 0.0);
    assert_eq!(
        val(&m0, "mupilot_server_submit_duration_seconds_count"),
        0.0
    );
    assert!(!m0.keys().any(|k| k.contains("state=")), "{m0:?}");

    let alice = demo.client("alice");
    let r = alice
        .post(srv.url("/v1/payloads"))
        .json(&submit_req())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The pilot is not a member: its submit is refused, and counted as such.
    let pilot = demo.client("pilot");
    let r = pilot
        .post(srv.url("/v1/payloads"))
        .json(&submit_req())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let m1 = scrape(maddr);
    assert_eq!(
        val(&m1, "mupilot_server_payloads{vo=\"demo\",state=\"queued\"}"),
        1.0
    );
    assert_eq!(
        val(
            &m1,
            "mupilot_server_payloads{vo=\"demo\",state=\"matched\"}"
        ),
        0.0
    );
    assert_eq!(
        val(&m1, "mupilot_server_submits_total{result=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        val(&m1, "mupilot_server_submits_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(
        val(&m1, "mupilot_server_submit_duration_seconds_count"),
        2.0
    );
    let inf = val(
        &m1,
        "mupilot_server_submit_duration_seconds_bucket{le=\"+Inf\"}",
    );
    assert_eq!(inf, 2.0);
    assert!(val(&m1, "mupilot_server_submit_duration_seconds_sum") > 0.0);

    // A match hands out the payload; a second finds none; a second pilot id is seen too.
    let r: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("pilot-a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r.work.is_some());
    for id in ["pilot-a", "pilot-b"] {
        let r: MatchResponse = pilot
            .post(srv.url("/v1/match"))
            .json(&match_req(id))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(r.work.is_none());
    }
    // A caller not in pilot_dns is refused before it is counted or remembered.
    let r = alice
        .post(srv.url("/v1/match"))
        .json(&match_req("intruder"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let m2 = scrape(maddr);
    assert_eq!(val(&m2, "mupilot_server_matches_total{vo=\"demo\"}"), 1.0);
    assert_eq!(
        val(&m2, "mupilot_server_match_requests_total{result=\"work\"}"),
        1.0
    );
    assert_eq!(
        val(&m2, "mupilot_server_match_requests_total{result=\"none\"}"),
        2.0
    );
    assert_eq!(val(&m2, "mupilot_server_match_duration_seconds_count"), 3.0);
    assert_eq!(
        val(&m2, "mupilot_server_payloads{vo=\"demo\",state=\"queued\"}"),
        0.0
    );
    assert_eq!(
        val(
            &m2,
            "mupilot_server_payloads{vo=\"demo\",state=\"matched\"}"
        ),
        1.0
    );
    assert_eq!(val(&m2, "mupilot_server_pilots_seen"), 2.0);

    // Only /metrics is served, and nothing on it names a person or a payload.
    let (status, _, _) = get(maddr, "/v1/payloads");
    assert!(status.contains(" 404 "), "{status}");
    let (_, _, body) = get(maddr, "/metrics");
    assert!(!body.contains("CN="), "a DN leaked into metrics:\n{body}");
    assert!(!body.contains("pilot-a"), "a pilot id leaked:\n{body}");
}

#[test]
fn bad_or_busy_metrics_listen_is_refused_naming_the_key() {
    let demo = Demo::new();
    add_metrics_listen(&demo, "localhost:9464");
    let out = Command::new(BIN)
        .args(["serve", "--config", demo.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen")
            && err.contains("localhost:9464")
            && err.contains("127.0.0.1:9464"),
        "{err}"
    );

    // A port someone else holds: serve fails at start, naming the key, not later.
    let demo = Demo::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    add_metrics_listen(&demo, &held.local_addr().unwrap().to_string());
    let out = Command::new(BIN)
        .args(["serve", "--config", demo.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen") && err.contains("for metrics"),
        "{err}"
    );
    drop(held);
}
