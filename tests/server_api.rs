//! The VO server's HTTPS API against the real binary: real TLS (generated demo CA), real
//! SQLite, reqwest clients with the demo certificates.

mod server_support;

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::Utc;
use mupilot::protocol::api::{
    MatchResponse, OperatorCommand, PayloadState, PayloadView, StatusAck, StatusReport,
    SubmitRequest, SubmitResponse,
};
use mupilot::protocol::envelope::{sha256_hex, Expect};
use mupilot::protocol::{Resources, VoVerifyingKey};
use server_support::{dn, match_req, tar_gz, Demo};

fn submit_req(argv: &[&str]) -> SubmitRequest {
    SubmitRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        jobtag: Some("srv-test".into()),
        resources: Resources {
            cores: 1,
            memory_bytes: 256 << 20,
            walltime_seconds: 600,
        },
        outputs: vec!["out.txt".into()],
        bundle: None,
        delegation: None,
    }
}

async fn submit(c: &reqwest::Client, url: &str, req: &SubmitRequest) -> String {
    let r = c.post(url).json(req).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<SubmitResponse>().await.unwrap().payload_id
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let demo = Demo::new();
    let srv = demo.serve();
    mupilot::tls::install_crypto_provider();
    let roots = mupilot::tls::load_ca(&demo.path("certificates")).unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let anon = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let r = anon.get(srv.url("/v1/payloads")).send().await;
    assert!(r.is_err(), "a client without a certificate got {r:?}");
    // The same server answers a client with a certificate.
    let ok = demo
        .client("alice")
        .get(srv.url("/v1/payloads"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn only_pilot_dns_may_match_and_only_members_submit() {
    let demo = Demo::new();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let r = alice
        .post(srv.url("/v1/match"))
        .json(&match_req("p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains(&dn("alice")));

    // The pilot is not a VO member: it may not submit, and the message names its DN.
    let pilot = demo.client("pilot");
    let r = pilot
        .post(srv.url("/v1/payloads"))
        .json(&submit_req(&["/bin/true"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: mupilot::protocol::api::ApiError = r.json().await.unwrap();
    assert_eq!(body.error, "not_authorized");
    assert!(body.message.contains(&dn("pilot")), "{}", body.message);

    // A suspended member may not submit, and their queued payload is cancelled (reference
    // 002: a suspension stops the member's work), so it is never matched.
    let bob = demo.client("bob");
    let queued = submit(&bob, &srv.url("/v1/payloads"), &submit_req(&["/bin/true"])).await;
    let cfg = demo.config();
    let out = demo.run(&[
        "member",
        "suspend",
        "--config",
        cfg.to_str().unwrap(),
        &dn("bob"),
    ]);
    assert!(out.status.success(), "{}", server_support::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("payload {queued} cancelled")),
        "{}",
        server_support::text(&out)
    );
    let r = bob
        .post(srv.url("/v1/payloads"))
        .json(&submit_req(&["/bin/true"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("p1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(m.work.is_none(), "suspended member's payload was matched");
    // Reinstated: a new payload is matched.
    let out = demo.run(&[
        "member",
        "reinstate",
        "--config",
        cfg.to_str().unwrap(),
        &dn("bob"),
        "--verification",
        "cleared by the security officer",
    ]);
    assert!(out.status.success(), "{}", server_support::text(&out));
    let again = submit(&bob, &srv.url("/v1/payloads"), &submit_req(&["/bin/true"])).await;
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("p1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m.work.unwrap().payload_id, again);
}

#[tokio::test]
async fn submit_match_verify_report_output() {
    let demo = Demo::new();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let pilot = demo.client("pilot");
    let bundle = tar_gz("input.txt", b"some input");
    let mut req = submit_req(&["/bin/sh", "-c", "cat input.txt > out.txt"]);
    req.env.insert("MODE".into(), "test".into());
    req.bundle = Some(B64.encode(&bundle));
    let id = submit(&alice, &srv.url("/v1/payloads"), &req).await;

    // Too big for the pilot: no work.
    let mut small = match_req("pilot-a");
    small.free_memory_bytes = 128 << 20;
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&small)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(m.work.is_none());

    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("pilot-a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let work = m.work.expect("work for the pilot");
    assert_eq!(work.payload_id, id);
    let key = VoVerifyingKey::from_pem_file(&demo.path("vo.pub")).unwrap();
    let expect = Expect {
        now: Utc::now(),
        node: "wn01",
        pilot_id: "pilot-a",
        max_validity: chrono::Duration::seconds(600),
    };
    let env = work.envelope.verify(&key, &expect).unwrap();
    let b = env.body();
    assert_eq!(b.payload_id, id);
    // Bound to the node and pilot of the match; valid for the default ten minutes.
    assert_eq!((b.node.as_str(), b.pilot_id.as_str()), ("wn01", "pilot-a"));
    assert_eq!((b.not_after - b.not_before).num_seconds(), 600);
    let elsewhere = work.envelope.verify(
        &key,
        &Expect {
            node: "wn02",
            ..expect
        },
    );
    assert!(elsewhere.unwrap_err().to_string().contains("'wn01'"));
    assert_eq!(b.owner.dn, dn("alice"));
    assert_eq!(b.owner.vo, "demo");
    assert_eq!(b.owner.fqans, vec!["/demo".to_string()]);
    assert!(b.owner.membership_valid_until > Utc::now() + chrono::Duration::days(300));
    assert_eq!(b.argv, req.argv);
    assert_eq!(b.env.get("MODE").map(String::as_str), Some("test"));
    assert_eq!(b.outputs, vec!["out.txt".to_string()]);
    assert_eq!(b.jobtag.as_deref(), Some("srv-test"));
    let got_bundle = B64.decode(work.bundle.unwrap()).unwrap();
    assert_eq!(got_bundle, bundle);
    assert_eq!(
        b.bundle_sha256.as_deref(),
        Some(sha256_hex(&bundle).as_str())
    );
    assert!(b.not_after > Utc::now() + chrono::Duration::seconds(500));
    assert_eq!(b.nonce.len(), 32);

    // Nothing left for a second match.
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("pilot-b"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(m.work.is_none());

    let status_url = srv.url(&format!("/v1/payloads/{id}/status"));
    // Another pilot id may not report on it.
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pilot-b".into(),
            state: Some(PayloadState::Running),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let ack: StatusAck = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pilot-a".into(),
            state: Some(PayloadState::Running),
            account: Some("mpu-alice".into()),
            uid: Some(51001),
            ..Default::default()
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ack.commands.is_empty());
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pilot-a".into(),
            state: Some(PayloadState::Done),
            exit_code: Some(0),
            cpu_seconds: Some(0.25),
            peak_memory_bytes: Some(3 << 20),
            wall_seconds: Some(1.5),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let archive = tar_gz("out.txt", b"some input");
    let out_url = srv.url(&format!("/v1/payloads/{id}/output"));
    // Only the holding pilot may upload.
    let r = alice
        .put(&out_url)
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = pilot
        .put(&out_url)
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());

    // The pilot resends from its outbox (it never saw the answers): the same final state is
    // accepted and changes nothing, the same upload replaces the archive with the same bytes.
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pilot-a".into(),
            state: Some(PayloadState::Done),
            exit_code: Some(0),
            cpu_seconds: Some(9.0),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = pilot
        .put(&out_url)
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());

    // A late report does not reopen a final state.
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pilot-a".into(),
            state: Some(PayloadState::Failed),
            exit_code: Some(1),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let view: PayloadView = alice
        .get(srv.url(&format!("/v1/payloads/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.state, PayloadState::Done);
    assert_eq!(view.exit_code, Some(0));
    assert_eq!(
        view.cpu_seconds,
        Some(0.25),
        "the first final report stands"
    );
    assert_eq!(view.account.as_deref(), Some("mpu-alice"));
    assert_eq!(view.uid, Some(51001));
    assert_eq!(view.pilot_id.as_deref(), Some("pilot-a"));
    assert_eq!(view.host.as_deref(), Some("wn01"));
    assert!(view.has_output);
    let got = alice.get(&out_url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), archive);

    // Another user may neither read it nor its output.
    let bob = demo.client("bob");
    let r = bob
        .get(srv.url(&format!("/v1/payloads/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(bob.get(&out_url).send().await.unwrap().status(), 403);
    // Lists show own payloads only.
    let mine: Vec<PayloadView> = alice
        .get(srv.url("/v1/payloads?state=done"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    let theirs: Vec<PayloadView> = bob
        .get(srv.url("/v1/payloads"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(theirs.is_empty());

    // One log line per request, with method, path, DN and status.
    drop(srv);
    let log = std::fs::read_to_string(demo.tmp.path().join("server.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("method=POST")
            && l.contains("path=/v1/match")
            && l.contains(&dn("pilot"))
            && l.contains("status=200")),
        "{log}"
    );
}

#[tokio::test]
async fn bad_submissions_are_refused_with_the_field_named() {
    let demo = Demo::new();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let url = srv.url("/v1/payloads");
    let mut r = submit_req(&["/bin/true"]);
    r.outputs = vec!["../../etc/passwd".into()];
    let resp = alice.post(&url).json(&r).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("outputs"));
    let mut r = submit_req(&[]);
    r.outputs.clear();
    let resp = alice.post(&url).json(&r).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("argv"));
    let mut r = submit_req(&["/bin/true"]);
    r.bundle = Some("not base64!!".into());
    let resp = alice.post(&url).json(&r).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("bundle"));
    let resp = alice
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"argv":["/bin/true"],"resources":{"cores":1,"memory_bytes":8388608,"walltime_seconds":5},"colour":"red"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("colour"));
}

#[tokio::test]
async fn sixteen_concurrent_matches_one_payload_one_winner() {
    let demo = Demo::new();
    let srv = Arc::new(demo.serve());
    let alice = demo.client("alice");
    let id = submit(
        &alice,
        &srv.url("/v1/payloads"),
        &submit_req(&["/bin/true"]),
    )
    .await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        // One client (one connection) per pilot.
        let c = demo.client("pilot");
        let url = srv.url("/v1/match");
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r: MatchResponse = c
                .post(&url)
                .json(&match_req(&format!("pilot-{i}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r.work.map(|w| w.payload_id)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(w) = t.await.unwrap() {
            winners.push(w);
        }
    }
    assert_eq!(winners, vec![id]);
}

#[tokio::test]
async fn cancel_queued_and_running_and_hand_back() {
    let demo = Demo::new();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let bob = demo.client("bob");
    let pilot = demo.client("pilot");
    let purl = srv.url("/v1/payloads");

    // Queued: cancelled at once; only the owner may.
    let q = submit(&alice, &purl, &submit_req(&["/bin/true"])).await;
    let r = bob
        .post(srv.url(&format!("/v1/payloads/{q}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: PayloadView = alice
        .post(srv.url(&format!("/v1/payloads/{q}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.state, PayloadState::Cancelled);

    // Matched, then handed back because it does not fit: queued again, matched by another pilot.
    let id = submit(&alice, &purl, &submit_req(&["/bin/sleep", "100"])).await;
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("pa"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m.work.unwrap().payload_id, id);
    let status_url = srv.url(&format!("/v1/payloads/{id}/status"));
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pa".into(),
            state: Some(PayloadState::Queued),
            reason: Some("slot shrank".into()),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: MatchResponse = pilot
        .post(srv.url("/v1/match"))
        .json(&match_req("pb"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m.work.unwrap().payload_id, id);
    let status_url = srv.url(&format!("/v1/payloads/{id}/status"));
    let running = StatusReport {
        pilot_id: "pb".into(),
        state: Some(PayloadState::Running),
        ..Default::default()
    };
    pilot.post(&status_url).json(&running).send().await.unwrap();

    // Running: the cancel becomes a command, delivered once with the next status answer.
    let v: PayloadView = alice
        .post(srv.url(&format!("/v1/payloads/{id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.state, PayloadState::Running);
    let ack: StatusAck = pilot
        .post(&status_url)
        .json(&running)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ack.commands.len(), 1);
    // Delivered signed by the VO key, naming the requester, for the helper to authorize.
    let OperatorCommand::Cancel {
        requester,
        signed: Some(signed),
    } = &ack.commands[0]
    else {
        panic!("{:?}", ack.commands[0]);
    };
    assert_eq!(*requester, dn("alice"));
    let vo_pub = VoVerifyingKey::from_pem_file(&demo.path("vo.pub")).unwrap();
    let body = signed.verify(&vo_pub, chrono::Utc::now()).unwrap();
    assert_eq!(body.requester_dn, dn("alice"));
    assert_eq!(
        body.action,
        mupilot::protocol::command::CommandAction::Cancel
    );
    let ack: StatusAck = pilot
        .post(&status_url)
        .json(&running)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ack.commands.is_empty(), "command delivered twice");
    let r = pilot
        .post(&status_url)
        .json(&StatusReport {
            pilot_id: "pb".into(),
            state: Some(PayloadState::Cancelled),
            signal: Some(15),
            reason: Some(format!("cancelled by {}", dn("alice"))),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = alice
        .post(srv.url(&format!("/v1/payloads/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let demo = Demo::new();
    let mut srv = demo.serve();
    let alice = demo.client("alice");
    assert_eq!(
        alice
            .get(srv.url("/v1/payloads"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(srv.stop(), Some(0));
}

// Multi-threaded: the h2 client must answer the server's shutdown PING while the test thread
// waits for the server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_and_http2_works() {
    let demo = Demo::new();
    let other = Demo::new();
    let srv = demo.serve();
    // alice of another demo CA: same DN, untrusted issuer.
    let stranger = mupilot::tls::https_client(
        &other.path("alice.crt"),
        &other.path("alice.key"),
        &demo.path("certificates"),
    )
    .unwrap();
    assert!(stranger.get(srv.url("/v1/payloads")).send().await.is_err());

    let mut tls = mupilot::tls::client_config(
        &demo.path("alice.crt"),
        &demo.path("alice.key"),
        &demo.path("certificates"),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let h2 = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let r = h2.get(srv.url("/v1/payloads")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
}

#[tokio::test]
async fn operators_read_and_cancel_any_payload() {
    let demo = Demo::new();
    let cfg = demo.config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "operator_dns = []",
        &format!("operator_dns = [\"{}\"]", dn("carol")),
    );
    std::fs::write(&cfg, text).unwrap();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let carol = demo.client("carol");
    let bob = demo.client("bob");
    let id = submit(
        &alice,
        &srv.url("/v1/payloads"),
        &submit_req(&["/bin/true"]),
    )
    .await;
    submit(&bob, &srv.url("/v1/payloads"), &submit_req(&["/bin/true"])).await;
    let all: Vec<PayloadView> = carol
        .get(srv.url("/v1/payloads?state=queued"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let r = carol
        .get(srv.url(&format!("/v1/payloads/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: PayloadView = carol
        .post(srv.url(&format!("/v1/payloads/{id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.state, PayloadState::Cancelled);
    assert!(v.reason.unwrap().contains(&dn("carol")));
    let r = alice
        .get(srv.url("/v1/payloads?state=bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// Submissions that could never run are refused at submit with 422 naming the limit: the
/// default VO limits, limits set in server.toml, and the envelope's size. Nothing is queued.
#[tokio::test]
async fn submissions_that_can_never_run_are_refused_with_the_limit_named() {
    let demo = Demo::new();
    let srv = demo.serve();
    let alice = demo.client("alice");
    let url = srv.url("/v1/payloads");
    let refused = |mutate: &dyn Fn(&mut SubmitRequest)| {
        let mut req = submit_req(&["/bin/true"]);
        mutate(&mut req);
        let (alice, url) = (alice.clone(), url.clone());
        async move {
            let r = alice.post(&url).json(&req).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body["message"].as_str().unwrap_or("").to_string())
        }
    };
    for (mutate, needle) in [
        (
            Box::new(|r: &mut SubmitRequest| r.resources.cores = 1_000_000)
                as Box<dyn Fn(&mut SubmitRequest)>,
            "max_cores = 1024",
        ),
        (
            Box::new(|r: &mut SubmitRequest| r.resources.memory_bytes = 10_000_000_000_000),
            "max_memory_bytes = 4398046511104",
        ),
        (
            Box::new(|r: &mut SubmitRequest| r.resources.memory_bytes = u64::MAX),
            "max_memory_bytes",
        ),
        (
            Box::new(|r: &mut SubmitRequest| r.resources.walltime_seconds = u64::MAX),
            "max_walltime_seconds = 2592000",
        ),
        (
            Box::new(|r: &mut SubmitRequest| r.argv.push("x".repeat(1 << 20))),
            "envelope limit is 1048576 bytes",
        ),
        (
            Box::new(|r: &mut SubmitRequest| {
                r.env.insert("BIG".into(), "y".repeat(800 << 10));
            }),
            "envelope limit",
        ),
    ] {
        let (status, message) = refused(&*mutate).await;
        assert_eq!(status, 422, "{message}");
        assert!(message.contains(needle), "{message}");
    }
    // None of them was queued.
    let list = alice.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(!list.contains("\"p-"), "{list}");
    // Just below the envelope limit is accepted and can be matched and signed.
    let mut big = submit_req(&["/bin/true"]);
    big.argv.push("z".repeat(700 << 10));
    let id = submit(&alice, &url, &big).await;
    let m: MatchResponse = demo
        .client("pilot")
        .post(srv.url("/v1/match"))
        .json(&match_req("srv-lim"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let w = m.work.expect("the big payload is matched");
    assert_eq!(w.payload_id, id);
    let key = VoVerifyingKey::from_pem_file(&demo.path("vo.pub")).unwrap();
    w.envelope
        .verify(
            &key,
            &Expect {
                now: Utc::now(),
                node: "wn01",
                pilot_id: "srv-lim",
                max_validity: chrono::Duration::seconds(600),
            },
        )
        .unwrap();
    drop(srv);

    // Limits from server.toml are the ones applied and named.
    let cfg = demo.config();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[limits]\nmax_cores = 8\nmax_walltime_seconds = 3600\n");
    std::fs::write(&cfg, text).unwrap();
    let srv = demo.serve();
    let url = srv.url("/v1/payloads");
    let mut req = submit_req(&["/bin/true"]);
    req.resources.cores = 9;
    let r = alice.post(&url).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("max_cores = 8"));
    req.resources.cores = 8;
    req.resources.walltime_seconds = 3601;
    let r = alice.post(&url).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("max_walltime_seconds = 3600"));
    req.resources.walltime_seconds = 3600;
    submit(&alice, &url, &req).await;
    // A limit of 0 is a configuration error naming the key.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("max_cores = 8", "max_cores = 0");
    std::fs::write(&cfg, text).unwrap();
    let err = mupilot::server::config::ServerConfig::load(&cfg).unwrap_err();
    assert!(err.to_string().contains("limits.max_cores"), "{err}");
}
