//! The membership registry (reference 002) against the real server: real mTLS with the demo
//! VO's certificates, the real `serve` binary, the real database (SQLite; PostgreSQL with
//! MUPILOT_TEST_ENGINE=postgresql, as scripts/test.sh runs the API tests), the audit log
//! read back with `mupilot-server membership audit`, and the database read after the purge.
//! Attacks: approving one's own request, a non-manager approving, forged requester fields,
//! hostile registration fields, a suspended member submitting.

mod server_support;

use mupilot::protocol::api::{
    MatchResponse, OperatorCommand, PayloadState, PayloadView, StatusAck, StatusReport,
};
use serde_json::{json, Value};
use server_support::{dn, file_holds, match_req, small_job, text, Demo, Server};

/// Drops carol's `[[member]]` seed: she registers herself.
fn unseed_carol(demo: &Demo) {
    let p = demo.config();
    let s = std::fs::read_to_string(&p).unwrap();
    let seed = format!(
        "\n[[member]]\ndn = \"{}\"\nfqans = [\"/demo\"]\n",
        dn("carol")
    );
    assert!(s.contains(&seed), "{s}");
    std::fs::write(&p, s.replace(&seed, "\n")).unwrap();
}

fn person(family: &str) -> Value {
    json!({
        "family_name": family,
        "given_name": "Carol",
        "institute": "Institute of Testing",
        "email": "carol.unique-mail@testing.example",
        "phone": "+41 22 555 0199",
    })
}

fn registration(family: &str) -> Value {
    json!({ "person": person(family) })
}

fn aup() -> Value {
    json!({ "grid_aup": "3.1", "vo_aup": "7" })
}

async fn post(c: &reqwest::Client, server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = c.post(server.url(path)).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(c: &reqwest::Client, server: &Server, path: &str) -> (u16, Value) {
    let r = c.get(server.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The path that decides the request a change answer (`{"request": {"id": ...}}`) filed:
/// `outcome` is `approve` or `reject`.
fn decide_path(filed: &Value, outcome: &str) -> String {
    format!(
        "/v1/membership/requests/{}/{outcome}",
        filed["request"]["id"].as_str().unwrap()
    )
}

fn job(tag: &str) -> Value {
    serde_json::to_value(small_job(&["/bin/sleep", "60"], Some(tag))).unwrap()
}

fn audit(demo: &Demo, args: &[&str]) -> (std::process::Output, Vec<Value>) {
    let config = demo.config();
    let mut a = vec!["membership", "audit", "--config", config.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = demo.run(&a);
    let recs = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (out, recs)
}

/// Registration, approval, a role change, renewal, self-removal and the purge, with the
/// attacks on each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_approval_renewal_removal_and_purge() {
    let demo = Demo::new();
    unseed_carol(&demo);
    demo.configure(&format!(
            "\n[membership]\ngrid_aup_version = \"3.1\"\nvo_aup_version = \"7\"\nmanager_dns = [\"{}\"]\nmanager_fqans = [\"/demo/Role=VO-Admin\"]\npersonal_data_retention_days = 1\n",
            dn("bob")
        ),
    );
    let server = demo.serve();
    let carol = demo.client("carol");
    let alice = demo.client("alice");
    let bob = demo.client("bob");
    let pilot = demo.client("pilot");

    let (st, me) = get(&carol, &server, "/v1/membership/me").await;
    assert_eq!(st, 200, "{me}");
    assert!(me["member"].is_null(), "{me}");

    // An old AUP version: refused, naming the field and the current version.
    let reg = |family: &str, accept: Value| json!({ "kind": "person", "registration": registration(family), "accept": accept });
    let (st, e) = post(
        &carol,
        &server,
        "/v1/membership/register",
        &reg("Smith", json!({ "grid_aup": "3.0", "vo_aup": "7" })),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("accept.grid_aup") && m.contains("\"3.1\""),
        "{m}"
    );
    // Hostile fields: a terminal escape in a name, a megabyte of institute, a robot
    // without its responsible person, a requester field.
    let (st, e) = post(
        &carol,
        &server,
        "/v1/membership/register",
        &reg("Smith\u{1b}]0;pwned\u{7}", aup()),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("registration.person.family_name"),
        "{e}"
    );
    let mut huge = reg("Smith", aup());
    huge["registration"]["person"]["institute"] = json!("x".repeat(1 << 20));
    // The server answers 413 from the length alone and closes the connection without reading
    // the body; a client still writing the megabyte then sees its write cut (broken pipe)
    // instead of the answer. Refused either way, and the connection after it is a new one.
    let sent = carol
        .post(server.url("/v1/membership/register"))
        .json(&huge)
        .send()
        .await;
    match sent {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(e) => assert!(e.is_request() && !e.is_connect(), "{e:?}"),
    }
    let mut long = reg("Smith", aup());
    long["registration"]["person"]["institute"] = json!("x".repeat(300));
    let (st, e) = post(&carol, &server, "/v1/membership/register", &long).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("institute"), "{e}");
    let mut robot = reg("Smith", aup());
    robot["kind"] = json!("robot");
    let (st, e) = post(&carol, &server, "/v1/membership/register", &robot).await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("responsible"),
        "{e}"
    );
    let mut forged = reg("Smith", aup());
    forged["dn"] = json!(dn("alice"));
    let (st, _) = post(&carol, &server, "/v1/membership/register", &forged).await;
    assert_eq!(
        st, 422,
        "an unknown field (a DN other than the certificate's) is refused"
    );
    // The pilot's certificate is not a member.
    let (st, _) = post(&pilot, &server, "/v1/membership/register", &reg("P", aup())).await;
    assert_eq!(st, 403);

    let (st, filed) = post(
        &carol,
        &server,
        "/v1/membership/register",
        &reg("Smith", aup()),
    )
    .await;
    assert_eq!(st, 201, "{filed}");
    let req_id = filed["request"]["id"].as_str().unwrap().to_string();
    assert_eq!(filed["request"]["subject_dn"], dn("carol"));
    assert_eq!(filed["request"]["requester_dn"], dn("carol"));
    let (st, _) = post(
        &carol,
        &server,
        "/v1/membership/register",
        &reg("Smith", aup()),
    )
    .await;
    assert_eq!(st, 409, "a second registration while pending");

    // Pending is not active: no submission.
    let (st, e) = post(&carol, &server, "/v1/payloads", &job("pending")).await;
    assert_eq!(st, 403, "{e}");

    // Carol approves her own registration; alice (a member, no manager) approves it.
    let approve = json!({ "verification": "institute representative consulted" });
    let path = format!("/v1/membership/requests/{req_id}/approve");
    let (st, e) = post(&carol, &server, &path, &approve).await;
    assert_eq!(st, 403, "{e}");
    let (st, e) = post(&alice, &server, &path, &approve).await;
    assert_eq!(st, 403, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("manager_dns"),
        "{e}"
    );
    let (st, e) = post(&bob, &server, &path, &json!({ "verification": "" })).await;
    assert_eq!(st, 400, "an approval says what was verified: {e}");
    let (st, done) = post(&bob, &server, &path, &approve).await;
    assert_eq!(st, 200, "{done}");
    assert_eq!(done["request"]["state"], "approved");
    assert_eq!(done["request"]["decided_by"], dn("bob"));
    assert_eq!(done["member"]["state"], "active");
    let (st, _) = post(&bob, &server, &path, &approve).await;
    assert_eq!(st, 409, "decided once");

    let (st, sub) = post(&carol, &server, "/v1/payloads", &job("member")).await;
    assert_eq!(st, 201, "{sub}");
    let queued = sub["payload_id"].as_str().unwrap().to_string();

    // A role change makes carol a manager (by FQAN); she still may not approve her own
    // renewal.
    let (st, ch) = post(
        &carol,
        &server,
        "/v1/membership/requests",
        &json!({ "kind": "attributes", "fqans": ["/demo", "/demo/Role=VO-Admin"] }),
    )
    .await;
    assert_eq!(st, 201, "{ch}");
    let (st, e) = post(
        &carol,
        &server,
        "/v1/membership/requests",
        &json!({ "kind": "attributes", "fqans": ["/other/Role=VO-Admin"] }),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    let path = decide_path(&ch, "approve");
    let (st, d) = post(&bob, &server, &path, &approve).await;
    assert_eq!(st, 200, "{d}");
    let (st, list) = get(&carol, &server, "/v1/membership/members").await;
    assert_eq!(st, 200, "carol manages by FQAN now: {list}");
    let (st, _) = get(&alice, &server, "/v1/membership/members").await;
    assert_eq!(st, 403);

    let before = done["member"]["renewal_due"].as_str().unwrap().to_string();
    let (st, e) = post(
        &carol,
        &server,
        "/v1/membership/requests",
        &json!({ "kind": "renewal", "registration": registration("Smith-Jones"),
                 "accept": { "grid_aup": "3.0", "vo_aup": "7" } }),
    )
    .await;
    assert_eq!(st, 400, "renewal re-accepts the current AUP: {e}");
    let (st, ren) = post(
        &carol,
        &server,
        "/v1/membership/requests",
        &json!({ "kind": "renewal", "registration": registration("Smith-Jones"), "accept": aup() }),
    )
    .await;
    assert_eq!(st, 201, "{ren}");
    let path = decide_path(&ren, "approve");
    let (st, e) = post(&carol, &server, &path, &approve).await;
    assert_eq!(st, 403, "{e}");
    assert!(e["message"].as_str().unwrap().contains("themself"), "{e}");
    let (st, d) = post(&bob, &server, &path, &approve).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(
        d["member"]["registration"]["person"]["family_name"],
        "Smith-Jones"
    );
    assert!(d["member"]["renewal_due"].as_str().unwrap() >= before.as_str());

    // Managers read the registry with the data; the member reads their own.
    let out = demo.run(&[
        "membership",
        "list",
        "--config",
        demo.path("client-bob.toml").to_str().unwrap(),
        "--server",
        &server.url,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains(&dn("carol")) && l.contains("active")),
        "{listing}"
    );
    let (st, me) = get(&carol, &server, "/v1/membership/me").await;
    assert_eq!(st, 200);
    assert_eq!(me["requests"].as_array().unwrap().len(), 3, "{me}");

    // Carol leaves; her queued payload is cancelled; she can no longer submit.
    let out = demo.run(&[
        "membership",
        "remove",
        "--config",
        demo.path("client-carol.toml").to_str().unwrap(),
        "--server",
        &server.url,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: PayloadView = carol
        .get(server.url(&format!("/v1/payloads/{queued}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.state, PayloadState::Cancelled);
    let (st, _) = post(&carol, &server, "/v1/payloads", &job("gone")).await;
    assert_eq!(st, 403);

    // The audit log has every transaction, no registration data, and an intact chain.
    let (out, recs) = audit(&demo, &["--dn", &dn("carol")]);
    assert!(out.status.success(), "{}", text(&out));
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["register", "approve", "request", "approve", "request", "approve", "remove"],
        "{recs:#?}"
    );
    assert_eq!(
        recs[1]["verification"],
        "institute representative consulted"
    );
    assert_eq!(recs[1]["actor_dn"], dn("bob"));
    let log = demo.path("server-data").join("membership-audit.jsonl");
    assert!(
        !file_holds(&log, "carol.unique-mail"),
        "no personal data in the audit log"
    );
    let (out, _) = audit(&demo, &["--verify"]);
    assert!(out.status.success(), "{}", text(&out));

    // The purge: nothing while the membership ended less than the retention period ago.
    let purge = || {
        demo.run(&[
            "membership",
            "purge",
            "--config",
            demo.config().to_str().unwrap(),
        ])
    };
    let out = purge();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("of 0 memberships"));
    let carol_rows = format!(
        "SELECT count(*) FROM members WHERE dn = '{0}' UNION ALL \
         SELECT count(*) FROM membership_requests WHERE subject_dn = '{0}'",
        dn("carol")
    );
    assert!(demo
        .sql(&carol_rows)
        .iter()
        .all(|n| n != "0" && n != "Integer(0)"));
    // Ended two days ago (retention: one day): purged, and read back from the database.
    demo.sql(&format!(
        "UPDATE members SET ended_at = '2000-01-01T00:00:00.000000Z' WHERE dn = '{}'",
        dn("carol")
    ));
    let out = purge();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("of 1 memberships"),
        "{}",
        text(&out)
    );
    for n in demo.sql(&carol_rows) {
        assert!(n == "0" || n == "Integer(0)", "{n}");
    }
    let left = demo.sql(
        "SELECT count(*) FROM membership_requests WHERE details LIKE '%unique-mail%' \
         UNION ALL SELECT count(*) FROM members WHERE registration LIKE '%unique-mail%'",
    );
    for n in left {
        assert!(n == "0" || n == "Integer(0)", "{n}");
    }
    if demo.pg.is_none() {
        // Not in any byte of the database files either (secure_delete, WAL truncated).
        for f in ["mupilot.db", "mupilot.db-wal"] {
            let p = demo.path("server-data").join(f);
            assert!(
                !file_holds(&p, "unique-mail"),
                "{} still holds it",
                p.display()
            );
        }
    }
    let (_, recs) = audit(&demo, &[]);
    let purges: Vec<&Value> = recs.iter().filter(|r| r["action"] == "purge").collect();
    assert!(
        purges.iter().any(|r| r["details"]["members_purged"] == 1),
        "{purges:?}"
    );
    drop(server);
}

/// Suspension at the request of the security officer: queued payloads cancelled, a
/// running one cancelled through the signed command its pilot fetches; the suspended
/// member can neither submit nor be matched; reinstatement notifies the officer through the
/// hook, recorded on the notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_stops_payloads_and_reinstatement_notifies_the_requester() {
    let demo = Demo::new();
    let hook_out = demo.tmp.path().join("notified.json");
    let hook = demo.tmp.path().join("notify.sh");
    std::fs::write(&hook, format!("#!/bin/sh\ncat > {}\n", hook_out.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    demo.configure(&format!(
            "\n[membership]\nmanager_dns = [\"{}\"]\nsecurity_officer_dns = [\"{}\"]\nnotify_command = [\"{}\"]\n",
            dn("bob"),
            dn("alice"),
            hook.display()
        ),
    );
    let server = demo.serve();
    let carol = demo.client("carol");
    let alice = demo.client("alice");
    let bob = demo.client("bob");
    let pilot = demo.client("pilot");

    let mut ids = Vec::new();
    for tag in ["run", "wait"] {
        let (st, s) = post(&carol, &server, "/v1/payloads", &job(tag)).await;
        assert_eq!(st, 201, "{s}");
        ids.push(s["payload_id"].as_str().unwrap().to_string());
    }
    let m: MatchResponse = pilot
        .post(server.url("/v1/match"))
        .json(&match_req("pilot-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let running = m.work.unwrap().payload_id;
    assert_eq!(running, ids[0]);
    let status_url = server.url(&format!("/v1/payloads/{running}/status"));
    let report = StatusReport {
        pilot_id: "pilot-1".into(),
        state: Some(PayloadState::Running),
        account: Some("mpu-carol".into()),
        uid: Some(51003),
        ..Default::default()
    };
    let r = pilot.post(&status_url).json(&report).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Only the security officer, operations or a manager may ask; the requester is the
    // certificate, never a field.
    let ask = json!({ "kind": "suspension", "dn": dn("carol"), "reason": "credential leak" });
    let (st, e) = post(&carol, &server, "/v1/membership/requests", &ask).await;
    assert_eq!(st, 403, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("security_officer_dns"),
        "{e}"
    );
    let mut forged = ask.clone();
    forged["requester_dn"] = json!(dn("alice"));
    let (st, _) = post(&carol, &server, "/v1/membership/requests", &forged).await;
    assert_eq!(st, 422);
    let (st, filed) = post(&alice, &server, "/v1/membership/requests", &ask).await;
    assert_eq!(st, 201, "{filed}");
    assert_eq!(filed["request"]["requester_dn"], dn("alice"));
    let (st, e) = post(
        &alice,
        &server,
        &decide_path(&filed, "approve"),
        &json!({ "verification": "self-approved" }),
    )
    .await;
    assert_eq!(st, 403, "the officer asks, a manager decides: {e}");

    let (st, d) = post(
        &bob,
        &server,
        &decide_path(&filed, "approve"),
        &json!({ "verification": "evidence from Grid security operations reviewed" }),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["member"]["state"], "suspended");
    assert_eq!(d["payloads_cancelled"], json!([ids[1]]));
    assert_eq!(d["payloads_cancel_sent"], json!([running]));
    let v: PayloadView = carol
        .get(server.url(&format!("/v1/payloads/{}", ids[1])))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.state, PayloadState::Cancelled);
    assert!(v.reason.unwrap().contains("suspended"));
    // The running payload's pilot gets the cancel, signed by the VO, naming the manager.
    let ack: StatusAck = pilot
        .post(&status_url)
        .json(&StatusReport {
            state: None,
            ..report.clone()
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    match ack.commands.as_slice() {
        [OperatorCommand::Cancel {
            requester,
            signed: Some(_),
        }] => assert_eq!(requester, &dn("bob")),
        other => panic!("expected one signed cancel, got {other:?}"),
    }
    // Suspended: no submission, nothing matched.
    let (st, e) = post(&carol, &server, "/v1/payloads", &job("again")).await;
    assert_eq!(st, 403, "{e}");
    assert!(e["message"].as_str().unwrap().contains("suspended"), "{e}");
    let (st, e) = post(
        &bob,
        &server,
        "/v1/membership/suspend",
        &json!({ "dn": dn("bob"), "reason": "x", "verification": "y" }),
    )
    .await;
    assert_eq!(st, 403, "a manager does not suspend themself: {e}");

    // Reinstatement: the officer is told through the hook, and the record says so.
    let out = demo.run(&[
        "membership",
        "reinstate",
        &dn("carol"),
        "--verification",
        "incident closed by security operations",
        "--config",
        demo.path("client-bob.toml").to_str().unwrap(),
        "--server",
        &server.url,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let told: Value = serde_json::from_slice(&std::fs::read(&hook_out).unwrap()).unwrap();
    assert_eq!(told["recipient_dn"], dn("alice"));
    assert_eq!(told["subject_dn"], dn("carol"));
    assert!(told["message"]
        .as_str()
        .unwrap()
        .contains("credential leak"));
    let (st, list) = get(&bob, &server, "/v1/membership/notifications").await;
    assert_eq!(st, 200);
    assert!(
        list[0]["delivery"]
            .as_str()
            .unwrap()
            .starts_with("delivered"),
        "{list}"
    );
    let (st, _) = get(&alice, &server, "/v1/membership/notifications").await;
    assert_eq!(st, 403);
    let (st, s) = post(&carol, &server, "/v1/payloads", &job("back")).await;
    assert_eq!(st, 201, "{s}");

    let (out, recs) = audit(&demo, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    for a in ["request", "approve", "reinstate", "notify"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
    let approve = recs.iter().find(|r| r["action"] == "approve").unwrap();
    assert_eq!(approve["details"]["payloads_cancelled"], json!([ids[1]]));
    let (out, _) = audit(&demo, &["--verify"]);
    assert!(out.status.success(), "{}", text(&out));
}
