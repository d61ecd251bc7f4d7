//! Portal controls against the real server: real TLS, certificates issued by the demo CA with
//! openssl (a robot certificate carrying the IGTF robot policy OID in its certificate-policies
//! extension, a listed robot without it, a portal's host certificate), the real SQLite
//! registry, and the request log read back with `mupilot-server requests`.

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mupilot::protocol::api::{ApiError, PayloadView, SubmitRequest, SubmitResponse};
use serde_json::Value;
use server_support::{dn, small_job, text, Demo, Server};

const ROBOT_OID: &str = "1.2.840.113612.5.2.3.3.1";
const ON_BEHALF: &str = "Mupilot-On-Behalf-Of";

/// Issues `<name>.crt`/`<name>.key` for `/DC=org/DC=mupilot-demo/CN=<cn>` with the demo CA,
/// through openssl as a grid CA would; `policy` adds a certificate-policies extension.
fn issue(demo: &Demo, name: &str, cn: &str, policy: Option<&str>) {
    let d = &demo.dir;
    openssl_ca_key(d);
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    };
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let ext = format!("{name}.ext");
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key,
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        &format!("/DC=org/DC=mupilot-demo/CN={cn}"),
        "-out",
        &csr,
    ]);
    let mut e = String::from(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    );
    if let Some(p) = policy {
        e.push_str(&format!("certificatePolicies={p}\n"));
    }
    std::fs::write(d.join(&ext), e).unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-v1.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &ext,
        "-out",
        &format!("{name}.crt"),
    ]);
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", &format!("{name}.crt")])
        .current_dir(d)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    if let Some(p) = policy {
        assert!(dump.contains(&format!("Policy: {p}")), "{dump}");
    } else {
        assert!(!dump.contains("Certificate Policies"), "{dump}");
    }
}

/// The demo CA's Ed25519 key as PKCS#8 version 1 (`ca-v1.key`): `init` writes version 2
/// (with the public key), which OpenSSL 3.0 does not read.
fn openssl_ca_key(dir: &Path) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = b64.decode(body).unwrap();
    // SEQUENCE { INTEGER 1, AlgorithmIdentifier { Ed25519 }, OCTET STRING { OCTET STRING seed } ... }
    assert_eq!(
        &der[2..16],
        &[2, 1, 1, 0x30, 5, 6, 3, 0x2b, 0x65, 0x70, 4, 0x22, 4, 0x20]
    );
    let mut v1 = vec![
        0x30, 0x2e, 2, 1, 0, 0x30, 5, 6, 3, 0x2b, 0x65, 0x70, 4, 0x22, 4, 0x20,
    ];
    v1.extend_from_slice(&der[16..48]);
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64.encode(v1)
    );
    std::fs::write(dir.join("ca-v1.key"), pem).unwrap();
}

fn member(name: &str) -> String {
    format!("\n[[member]]\ndn = \"{}\"\nfqans = [\"/demo\"]\n", dn(name))
}

fn req(tag: &str) -> SubmitRequest {
    small_job(&["/bin/true"], Some(tag))
}

/// POST /v1/payloads, optionally on behalf of `member`: status, body, Retry-After.
async fn submit(
    c: &reqwest::Client,
    srv: &Server,
    member: Option<&str>,
    tag: &str,
) -> (u16, Value, Option<String>) {
    let mut r = c.post(srv.url("/v1/payloads")).json(&req(tag));
    if let Some(m) = member {
        r = r.header(ON_BEHALF, m);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, resp.json().await.unwrap(), retry)
}

fn id_of(v: &Value) -> String {
    v["payload_id"].as_str().expect("a payload id").to_string()
}

/// `mupilot-server requests ARGS --config server.toml --json`: the records, or none.
fn requests(demo: &Demo, args: &[&str]) -> Vec<Value> {
    let cfg = demo.config();
    let mut all = vec!["requests", "--config", cfg.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = demo.run(&all);
    match out.status.code() {
        Some(0) => String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        Some(1) => Vec::new(),
        _ => panic!("requests {args:?}: {}", text(&out)),
    }
}

fn request_log(demo: &Demo) -> PathBuf {
    demo.path("server-data").join("requests.jsonl")
}

#[tokio::test]
async fn robots_are_known_by_the_policy_oid_or_the_list_and_answer_to_their_responsible_person() {
    let demo = Demo::new();
    issue(
        &demo,
        "robot-oid",
        "Robot - nightly build - alice",
        Some(ROBOT_OID),
    );
    issue(&demo, "robot-listed", "Robot - monitoring - bob", None);
    issue(&demo, "robot-stray", "Robot - unknown", Some(ROBOT_OID));
    let (oid_dn, listed_dn, stray_dn) = (
        dn("Robot - nightly build - alice"),
        dn("Robot - monitoring - bob"),
        dn("Robot - unknown"),
    );
    demo.configure(&format!(
            "{}{}{}\n[[robot]]\ndn = \"{oid_dn}\"\nresponsible = \"{}\"\n\n[[robot]]\ndn = \"{listed_dn}\"\nresponsible = \"{}\"\n",
            member("Robot - nightly build - alice"),
            member("Robot - monitoring - bob"),
            member("Robot - unknown"),
            dn("alice"),
            dn("bob"),
        ),
    );
    let srv = demo.serve();
    let robot = demo.client("robot-oid");
    let (st, body, _) = submit(&robot, &srv, None, "robot").await;
    assert_eq!(st, 201, "{body}");
    let by_oid = id_of(&body);
    // The robot owns what it submits.
    let v: PayloadView = robot
        .get(srv.url(&format!("/v1/payloads/{by_oid}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.owner_dn, oid_dn);

    // A certificate with the robot OID but no [[robot]] entry is refused, member or not,
    // for every member request, with the OID and the fix named.
    let stray = demo.client("robot-stray");
    let (st, body, _) = submit(&stray, &srv, None, "stray").await;
    assert_eq!(st, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(ROBOT_OID) && msg.contains("[[robot]]") && msg.contains(&stray_dn),
        "{msg}"
    );
    let r = stray.get(srv.url("/v1/payloads")).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // A robot listed by DN (no OID) is a robot too; it stops when its responsible person is
    // no longer an active member.
    let listed = demo.client("robot-listed");
    let (st, body, _) = submit(&listed, &srv, None, "listed").await;
    assert_eq!(st, 201, "{body}");
    let by_list = id_of(&body);
    let cfg = demo.config();
    let out = demo.run(&[
        "member",
        "suspend",
        "--config",
        cfg.to_str().unwrap(),
        &dn("bob"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (st, body, _) = submit(&listed, &srv, None, "listed").await;
    assert_eq!(st, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("robot {listed_dn} answers to {}", dn("bob"))),
        "{msg}"
    );

    // Robot submissions are attributed to the robot and its responsible person.
    let rec = requests(&demo, &["--payload", &by_oid, "--action", "submit"]);
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(
        (
            rec[0]["kind"].as_str(),
            rec[0]["dn"].as_str(),
            rec[0]["responsible"].as_str()
        ),
        (
            Some("robot"),
            Some(oid_dn.as_str()),
            Some(dn("alice").as_str())
        )
    );
    let rec = requests(&demo, &["--payload", &by_list]);
    assert_eq!(rec[0]["responsible"], dn("bob"));
    // By the responsible person's DN: both of bob's robot's submissions, the refused one too.
    let rec = requests(&demo, &["--dn", &dn("bob"), "--action", "submit"]);
    let statuses: Vec<u64> = rec.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![201, 403]);
    let rec = requests(&demo, &["--dn", &stray_dn]);
    assert!(rec
        .iter()
        .all(|r| r["kind"] == "unregistered_robot" && r["status"] == 403));
    assert_eq!(rec.len(), 2);
}

#[tokio::test]
async fn portals_act_only_for_active_members_they_name_and_only_as_configured() {
    let demo = Demo::new();
    issue(&demo, "portal", "portal.example.org", None);
    let portal_dn = dn("portal.example.org");
    let manager = dn("Portal Manager");
    demo.configure(&format!(
            "\n[[portal]]\ndn = \"{portal_dn}\"\nresponsible = \"{manager}\"\ncontact = \"portal-admin@example.org\"\nrate = {{ per_minute = 600, burst = 100 }}\n"
        ),
    );
    let srv = demo.serve();
    let portal = demo.client("portal");
    let (st, body, _) = submit(&portal, &srv, Some(&dn("alice")), "portal").await;
    assert_eq!(st, 201, "{body}");
    let for_alice = id_of(&body);
    // The payload is alice's: she reads it; so does the portal, for her.
    let alice = demo.client("alice");
    let v: PayloadView = alice
        .get(srv.url(&format!("/v1/payloads/{for_alice}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.owner_dn, dn("alice"));
    let r = portal
        .get(srv.url(&format!("/v1/payloads/{for_alice}")))
        .header(ON_BEHALF, dn("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // ... but not for bob, who does not own it.
    let r = portal
        .get(srv.url(&format!("/v1/payloads/{for_alice}")))
        .header(ON_BEHALF, dn("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Not a member; a suspended member: refused, the message naming the portal and member.
    let (st, body, _) = submit(&portal, &srv, Some(&dn("mallory")), "portal").await;
    assert_eq!(st, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("portal {portal_dn} acts for {}", dn("mallory"))),
        "{msg}"
    );
    let cfg = demo.config();
    let out = demo.run(&[
        "member",
        "suspend",
        "--config",
        cfg.to_str().unwrap(),
        &dn("bob"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (st, body, _) = submit(&portal, &srv, Some(&dn("bob")), "portal").await;
    assert_eq!(st, 403, "{body}");

    // Without naming a member; an action it was not given; a member pretending to be a portal.
    let (st, body, _) = submit(&portal, &srv, None, "portal").await;
    assert_eq!(st, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains(ON_BEHALF));
    let r = portal
        .post(srv.url(&format!("/v1/payloads/{for_alice}/cancel")))
        .header(ON_BEHALF, dn("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e: ApiError = r.json().await.unwrap();
    assert!(e.message.contains("may not cancel"), "{}", e.message);
    let (st, _, _) = submit(&alice, &srv, Some(&dn("carol")), "spoof").await;
    assert_eq!(st, 403);

    // The command line's --on-behalf-of.
    let out = demo.run(&[
        "submit",
        "--server",
        &srv.url,
        "--cert",
        demo.path("portal.crt").to_str().unwrap(),
        "--key",
        demo.path("portal.key").to_str().unwrap(),
        "--ca",
        demo.path("certificates").to_str().unwrap(),
        "--on-behalf-of",
        &dn("carol"),
        "--",
        "/bin/true",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let for_carol = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let v: PayloadView = demo
        .client("carol")
        .get(srv.url(&format!("/v1/payloads/{for_carol}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.owner_dn, dn("carol"));

    // Each request is in the log: the portal, the member it named, the person responsible.
    let rec = requests(&demo, &["--payload", &for_alice, "--action", "submit"]);
    assert_eq!(rec.len(), 1);
    let r = &rec[0];
    assert_eq!(r["kind"], "portal");
    assert_eq!(r["dn"], portal_dn.as_str());
    assert_eq!(r["on_behalf_of"], dn("alice"));
    assert_eq!(r["responsible"], manager.as_str());
    assert_eq!(r["status"], 201);
    let refused = requests(&demo, &["--dn", &dn("mallory")]);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["error"], "not_authorized");
    assert!(refused[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not an active member"));
    // Everything done for alice, through the portal or by herself.
    let for_her = requests(&demo, &["--dn", &dn("alice")]);
    let actions: Vec<&str> = for_her
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["submit", "view", "view", "cancel", "submit"],
        "{for_her:?}"
    );
}

#[tokio::test]
async fn submissions_over_the_rate_get_429_with_retry_after_and_pass_again_after_it() {
    let demo = Demo::new();
    issue(&demo, "portal", "portal.example.org", None);
    issue(&demo, "robot", "Robot - bulk - alice", Some(ROBOT_OID));
    demo.configure(&format!(
            "{}\n[rate_limits]\nuser = {{ per_minute = 60, burst = 2 }}\n\n[[portal]]\ndn = \"{}\"\nresponsible = \"{}\"\nrate = {{ per_minute = 60, burst = 3 }}\n\n[[robot]]\ndn = \"{}\"\nresponsible = \"{}\"\nrate = {{ per_minute = 6, burst = 1 }}\n",
            member("Robot - bulk - alice"),
            dn("portal.example.org"),
            dn("Portal Manager"),
            dn("Robot - bulk - alice"),
            dn("alice"),
        ),
    );
    // Metrics on, to see the refusals counted.
    let maddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        format!("metrics_listen = \"{maddr}\"\n{toml}"),
    )
    .unwrap();
    let srv = demo.serve();
    let alice = demo.client("alice");
    for _ in 0..2 {
        assert_eq!(submit(&alice, &srv, None, "burst").await.0, 201);
    }
    let (st, body, retry) = submit(&alice, &srv, None, "over").await;
    assert_eq!(st, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert_eq!(retry, 1, "one token a second");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains(&format!("user {}", dn("alice"))));
    // After Retry-After the submission goes through.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(submit(&alice, &srv, None, "again").await.0, 201);

    // A portal's submissions count against the portal and against the member it names; a
    // refusal by one takes nothing from the other.
    let portal = demo.client("portal");
    for _ in 0..2 {
        assert_eq!(submit(&portal, &srv, Some(&dn("bob")), "p").await.0, 201);
    }
    let (st, body, _) = submit(&portal, &srv, Some(&dn("bob")), "p").await;
    assert_eq!(st, 429);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("user {}", dn("bob"))),
        "{body}"
    );
    assert_eq!(submit(&portal, &srv, Some(&dn("carol")), "p").await.0, 201);
    let (st, body, retry) = submit(&portal, &srv, Some(&dn("carol")), "p").await;
    assert_eq!(st, 429);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("portal {}", dn("portal.example.org"))),
        "{body}"
    );
    assert!(retry.is_some());

    // A robot's own rate (6 a minute: 10 s for the next token).
    let robot = demo.client("robot");
    assert_eq!(submit(&robot, &srv, None, "r").await.0, 201);
    let (st, body, retry) = submit(&robot, &srv, None, "r").await;
    assert_eq!(st, 429, "{body}");
    let wait: u64 = retry.unwrap().parse().unwrap();
    assert!((9..=10).contains(&wait), "{wait}");

    // The refusals are in the request log with their Retry-After.
    let limited: Vec<Value> = requests(&demo, &["--action", "submit"])
        .into_iter()
        .filter(|r| r["status"] == 429)
        .collect();
    assert_eq!(limited.len(), 4);
    assert!(limited
        .iter()
        .all(|r| r["error"] == "rate_limited" && r["retry_after"].as_u64().is_some()));
    let scrape = reqwest::get(format!("http://{maddr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("mupilot_server_gate_refusals_total{result=\"rate_limited\"} 4"),
        "{scrape}"
    );
}

/// `curl` with a client certificate: it reports the local (client) port it used.
fn curl_submit(demo: &Demo, srv: &Server, cert: &str, member: &str) -> (String, u16) {
    let body = serde_json::to_string(&req("curl")).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--cert"])
        .arg(demo.path(&format!("{cert}.crt")))
        .arg("--key")
        .arg(demo.path(&format!("{cert}.key")))
        .arg("--cacert")
        .arg(demo.path("ca.pem"))
        .args(["-H", "Content-Type: application/json", "-H"])
        .arg(format!("{ON_BEHALF}: {member}"))
        .args([
            "-d",
            &body,
            "-w",
            "\n%{local_ip} %{local_port} %{http_code}\n",
        ])
        .arg(srv.url("/v1/payloads"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8(out.stdout).unwrap();
    let mut lines = s.lines();
    let resp: SubmitResponse = serde_json::from_str(lines.next().unwrap()).unwrap();
    let tail: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(tail[2], "201", "{s}");
    assert_eq!(tail[0], "127.0.0.1");
    (resp.payload_id, tail[1].parse().unwrap())
}

#[tokio::test]
async fn the_request_log_names_the_address_and_port_a_payload_came_from_and_shows_tampering() {
    let demo = Demo::new();
    issue(&demo, "portal", "portal.example.org", None);
    demo.configure(&format!(
            "\n[[portal]]\ndn = \"{}\"\nresponsible = \"{}\"\nrate = {{ per_minute = 600, burst = 100 }}\n",
            dn("portal.example.org"),
            dn("Portal Manager")
        ),
    );
    let srv = demo.serve();
    let before = chrono::Utc::now();
    let (id, port) = curl_submit(&demo, &srv, "portal", &dn("alice"));
    let (other, other_port) = curl_submit(&demo, &srv, "portal", &dn("bob"));
    assert_ne!(port, other_port);
    let after = chrono::Utc::now();

    // The question, as an operator asks it, in text.
    let cfg = demo.config();
    let out = demo.run(&[
        "requests",
        "--config",
        cfg.to_str().unwrap(),
        "--payload",
        &id,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8(out.stdout).unwrap();
    let line = listing
        .lines()
        .find(|l| l.contains(" submit 201 "))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(
        line.contains(&format!(
            " 127.0.0.1:{port} submit 201 portal {}",
            dn("portal.example.org")
        )),
        "{line}"
    );
    assert!(
        line.contains(&format!("for={}", dn("alice"))) && line.contains(&format!("payload={id}")),
        "{line}"
    );

    // By address:port, and by time window.
    let rec = requests(&demo, &["--client", &format!("127.0.0.1:{other_port}")]);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["payload_id"], other.as_str());
    let since = before.to_rfc3339();
    let until = after.to_rfc3339();
    let rec = requests(
        &demo,
        &["--since", &since, "--until", &until, "--action", "submit"],
    );
    assert_eq!(rec.len(), 2);
    assert!(requests(&demo, &["--until", &since]).is_empty());
    assert!(requests(&demo, &["--payload", "p-none"]).is_empty());

    // The chain verifies, running or stopped; an edited port is found at its line.
    let verify = |log: &Path| demo.run(&["requests", "verify", "--log", log.to_str().unwrap()]);
    let log = request_log(&demo);
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(srv);
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let content = std::fs::read_to_string(&log).unwrap();
    let n = content
        .lines()
        .position(|l| l.contains(&format!("\"client_port\":{port},")))
        .unwrap();
    let edited: Vec<String> = content
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == n {
                l.replace(&format!("\"client_port\":{port},"), "\"client_port\":1,")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&log, edited.join("\n") + "\n").unwrap();
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = String::from_utf8(out.stdout).unwrap();
    // The line after the edited one no longer chains to it (the shutdown's anchor record
    // follows the last request, so even the last request record has a successor).
    assert!(
        report.contains(&format!("BROKEN at line {}", n + 2)),
        "{report}"
    );
    assert!(report.contains("chain NOT intact"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_right_after_submitting_is_still_recorded() {
    use tokio::io::AsyncWriteExt;
    let demo = Demo::new();
    let srv = demo.serve();
    let cfg = mupilot::tls::client_config(
        &demo.path("alice.crt"),
        &demo.path("alice.key"),
        &demo.path("certificates"),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let addr: std::net::SocketAddr = srv.url.trim_start_matches("https://").parse().unwrap();
    let body = serde_json::to_string(&req("hang-up")).unwrap();
    let request = format!(
        "POST /v1/payloads HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Thirty clients send a submission and close at once, never reading the answer.
    for _ in 0..30 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        drop(tls);
    }
    // Whatever the server queued has its submit record, with the id it got.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let queued: Vec<PayloadView> = demo
        .client("alice")
        .get(srv.url("/v1/payloads"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let recorded: std::collections::HashSet<String> = requests(&demo, &["--action", "submit"])
        .iter()
        .filter(|r| r["status"] == 201)
        .map(|r| r["payload_id"].as_str().unwrap().to_string())
        .collect();
    let ids: std::collections::HashSet<String> =
        queued.iter().map(|v| v.payload_id.clone()).collect();
    assert_eq!(ids, recorded, "every queued payload has its submit record");
    println!(
        "srv hang-up: {} of 30 submissions queued, each recorded",
        ids.len()
    );
}
