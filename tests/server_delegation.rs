//! Delegation to the VO server and from it to the worker node, over the real `mupilot-server`
//! with real mTLS and SQLite: members authenticate with the grid test PKI of
//! tests/grid_support/make-fixtures.sh (its CA added to the demo VO's CA directory), delegate
//! voms-proxy-fake proxies with the real client (`delegate`, `submit --proxy`), and the pilot
//! obtains a proxy for a worker-node key (`POST /v1/payloads/{id}/proxy`) that
//! `openssl verify -allow_proxy_certs`, `voms-proxy-info -all` and src/grid's Verifier accept.
//! Then every refusal, expiry and removal. No root.

#![cfg(feature = "grid")]

#[path = "grid_support/mod.rs"]
mod grid_support;
mod server_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use chrono::Utc;
use grid_support::{config, fqans, openssl_verify, pki, proxy_file, voms_proxy_info, ALICE, BOB};
use mupilot::grid::delegation::{new_key_request, Credential, ProxyOrder};
use mupilot::grid::{Claim, Verifier};
use mupilot::protocol::api::{MatchResponse, PayloadState, StatusReport};
use mupilot::protocol::delegation::{
    CredentialKind, DelegationCreated, DelegationUpload, IssuedProxy, ProxyCsr,
};
use mupilot::server::store::Store;
use server_support::{dn, match_req, text, Demo, Server, BIN};

fn root() -> &'static Path {
    pki("grid-pki-server-delegation")
}

/// The demo VO named `atlas` (the VO of the fixtures' ACs), trusting the grid test CA, with
/// Alice and Bob of the grid PKI as members, carol's demo certificate as a second pilot,
/// worker proxies of 2 h, and retention every second. SQLite, or PostgreSQL with
/// `MUPILOT_TEST_ENGINE=postgresql`.
struct Vo {
    demo: Demo,
    srv: Server,
}

impl Vo {
    fn new() -> Vo {
        let root = root();
        // MUPILOT_TEST_ENGINE=postgresql runs it on a private PostgreSQL cluster.
        let demo = Demo::with_init_args(&["--vo", "atlas"]);
        std::fs::copy(
            root.join("pki/testca.pem"),
            demo.path("certificates/grid-test-ca.pem"),
        )
        .unwrap();
        let cfg = demo.config();
        let toml = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                &format!("pilot_dns = [\"{}\"]", dn("pilot")),
                &format!("pilot_dns = [\"{}\", \"{}\"]", dn("pilot"), dn("carol")),
            )
            .replace(
                "retention_seconds = 2592000",
                "retention_seconds = 2\nworker_proxy_seconds = 7200",
            );
        assert!(toml.contains(&dn("carol")) && toml.contains("worker_proxy_seconds"));
        let toml = format!(
            "{toml}\n[[member]]\ndn = \"{ALICE}\"\nfqans = [\"/atlas\"]\n\n[[member]]\ndn = \"{BOB}\"\nfqans = [\"/atlas\"]\n"
        );
        std::fs::write(&cfg, toml).unwrap();
        let srv = demo.serve();
        Vo { demo, srv }
    }

    /// An mTLS client with a grid PKI user's certificate (`alice`, `bob`).
    fn grid_client(&self, user: &str) -> reqwest::Client {
        mupilot::tls::https_client(
            &root().join(format!("pki/{user}.pem")),
            &root().join(format!("pki/{user}.key")),
            &self.demo.path("certificates"),
        )
        .unwrap()
    }

    /// `mupilot-server ARGS` as the grid user `user`, against this server.
    fn cli(&self, user: &str, cmd: &str, args: &[&str]) -> std::process::Output {
        let cert = root().join(format!("pki/{user}.pem"));
        let key = root().join(format!("pki/{user}.key"));
        let mut all = vec![
            cmd.to_string(),
            "--server".into(),
            self.srv.url.clone(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--ca".into(),
            self.demo.path("certificates").display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        std::process::Command::new(BIN)
            .args(&all)
            .env_remove("X509_USER_PROXY")
            .output()
            .unwrap()
    }

    fn proxy_path(&self, name: &str) -> String {
        root()
            .join(format!("proxies/{name}.pem"))
            .display()
            .to_string()
    }

    fn data(&self) -> PathBuf {
        self.demo.path("server-data")
    }

    /// Runs `f` on the server's store, opened beside the running server (SQLite in WAL mode,
    /// or the same PostgreSQL database), on a plain thread: the sync PostgreSQL client cannot
    /// run inside the test's runtime.
    fn store<T: Send>(&self, f: impl FnOnce(&Store) -> T + Send) -> T {
        let cfg = mupilot::server::config::ServerConfig::load(&self.demo.config()).unwrap();
        let data = self.data();
        std::thread::scope(|sc| {
            sc.spawn(move || f(&Store::open_with(&data, &cfg.database).unwrap()))
                .join()
                .unwrap()
        })
    }

    /// The verified body of a match's envelope.
    fn envelope(&self, w: &mupilot::protocol::api::Work) -> mupilot::protocol::EnvelopeBody {
        let key =
            mupilot::protocol::VoVerifyingKey::from_pem_file(&self.demo.path("vo.pub")).unwrap();
        let expect = mupilot::protocol::envelope::Expect {
            now: Utc::now(),
            node: "wn01",
            pilot_id: "pilot-a",
            max_validity: chrono::Duration::seconds(600),
        };
        w.envelope.verify(&key, &expect).unwrap().body().clone()
    }

    async fn matched(&self, pilot: &reqwest::Client) -> mupilot::protocol::api::Work {
        let m: MatchResponse = pilot
            .post(self.srv.url("/v1/match"))
            .json(&match_req("pilot-a"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        m.work.expect("work for the pilot")
    }

    async fn ask_proxy(&self, pilot: &reqwest::Client, id: &str, csr_pem: &str) -> (u16, String) {
        let r = pilot
            .post(self.srv.url(&format!("/v1/payloads/{id}/proxy")))
            .json(&ProxyCsr {
                csr_pem: csr_pem.to_string(),
            })
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn ok_stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_delegated_payload_gets_a_worker_proxy_every_judge_accepts() {
    let vo = Vo::new();
    let id = ok_stdout(&vo.cli(
        "alice",
        "submit",
        &["--proxy", &vo.proxy_path("delegable"), "--", "/bin/true"],
    ));
    let (did, d, key) = vo.store(|s| {
        let did = s.proxy_holder(&id).unwrap().delegation_id.unwrap();
        let d = s.delegation(&did).unwrap().unwrap();
        let key = s.delegation_key_path(&did);
        (did, d, key)
    });
    assert_eq!(d.owner_dn, ALICE);
    // The key is a private file beside the database, not in it.
    assert_eq!((mode(&key), mode(key.parent().unwrap())), (0o600, 0o700));
    assert!(!d.chain_pem.as_deref().unwrap().contains("PRIVATE KEY"));

    let pilot = vo.demo.client("pilot");
    let work = vo.matched(&pilot).await;
    assert_eq!(work.payload_id, id);
    let cred = vo.envelope(&work).credential.expect("a credential");
    assert_eq!(cred.kind, CredentialKind::X509Proxy);
    assert_eq!(cred.not_after, d.not_after);

    // The worker node makes its key; the pilot relays only the request.
    let wn = new_key_request().unwrap();
    let (status, body) = vo.ask_proxy(&pilot, &id, &wn.csr_pem).await;
    assert_eq!(status, 200, "{body}");
    let issued: IssuedProxy = serde_json::from_str(&body).unwrap();
    let left = issued.not_after - Utc::now();
    assert!(
        left <= chrono::Duration::hours(2) && left > chrono::Duration::minutes(115),
        "worker_proxy_seconds = 7200: {left}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = proxy_file(tmp.path(), &issued.chain_pem, &wn.key_pem().unwrap());
    openssl_verify(root(), &file).unwrap();
    let info = voms_proxy_info(root(), &file);
    assert_eq!(
        fqans(&info),
        ["/atlas", "/atlas/prod/Role=production"],
        "{info}"
    );
    let v = Verifier::new(config(root()))
        .verify(
            issued.chain_pem.as_bytes(),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(v.proxy_serials.len(), 3);

    // Both signings are on record: the member's and the server's.
    let s = vo.store(|s| s.signings(&did).unwrap());
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(
        (s[0].payload_id.as_deref(), s[0].signer_dn.as_str()),
        (None, ALICE)
    );
    assert_eq!(s[1].payload_id.as_deref(), Some(id.as_str()));
    assert_eq!(s[1].serial, v.proxy_serials[0]);
    assert_eq!(s[1].not_after.timestamp(), issued.not_after.timestamp());

    // Another pilot of the VO may not ask for it.
    let (status, body) = vo
        .ask_proxy(&vo.demo.client("carol"), &id, &wn.csr_pem)
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("only the pilot it was matched to"), "{body}");
    // Nor a member.
    let (status, _) = vo
        .ask_proxy(&vo.grid_client("alice"), &id, &wn.csr_pem)
        .await;
    assert_eq!(status, 403);

    // A request for a weak key.
    let weak = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(1024).unwrap()).unwrap();
    let mut b = openssl::x509::X509Req::builder().unwrap();
    b.set_pubkey(&weak).unwrap();
    b.sign(&weak, openssl::hash::MessageDigest::sha256())
        .unwrap();
    let csr = String::from_utf8(b.build().to_pem().unwrap()).unwrap();
    let (status, body) = vo.ask_proxy(&pilot, &id, &csr).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("1024 bits"), "{body}");

    // Once the payload is done: 409.
    let rep = StatusReport {
        pilot_id: "pilot-a".into(),
        state: Some(PayloadState::Done),
        exit_code: Some(0),
        ..Default::default()
    };
    let r = pilot
        .post(vo.srv.url(&format!("/v1/payloads/{id}/status")))
        .json(&rep)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let (status, body) = vo.ask_proxy(&pilot, &id, &wn.csr_pem).await;
    assert_eq!(status, 409, "{body}");

    // A payload submitted without a delegation: no proxy (404), and no credential.
    let plain = ok_stdout(&vo.cli("alice", "submit", &["--", "/bin/true"]));
    let work = vo.matched(&pilot).await;
    assert_eq!(work.payload_id, plain);
    assert!(vo.envelope(&work).credential.is_none());
    let (status, body) = vo.ask_proxy(&pilot, &plain, &wn.csr_pem).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("without a delegated credential"), "{body}");
}

#[tokio::test]
async fn delegations_are_refused_for_another_dn_another_key_too_long_or_no_room() {
    let vo = Vo::new();
    let alice = vo.grid_client("alice");
    let bob = vo.grid_client("bob");
    let create = |c: reqwest::Client| {
        let url = vo.srv.url("/v1/delegations");
        async move {
            let r = c.post(url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 201);
            r.json::<DelegationCreated>().await.unwrap()
        }
    };
    let upload = |c: reqwest::Client, id: String, chain: String| {
        let url = vo.srv.url(&format!("/v1/delegations/{id}"));
        async move {
            let r = c
                .put(url)
                .json(&DelegationUpload { chain_pem: chain })
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let sign = |user_proxy: &str, csr: &str| {
        Credential::from_proxy_pem(&grid_support::proxy(root(), user_proxy))
            .unwrap()
            .sign_proxy(
                csr.as_bytes(),
                &ProxyOrder {
                    lifetime: chrono::Duration::hours(1),
                    limited: false,
                },
                Utc::now(),
            )
            .unwrap()
            .chain_pem
    };

    // Bob uploads a chain of Alice's to his own delegation: not his DN.
    let d = create(bob.clone()).await;
    let (status, body) = upload(
        bob.clone(),
        d.delegation_id.clone(),
        sign("delegable", &d.csr_pem),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(ALICE) && body.contains(BOB), "{body}");
    // Alice may not complete Bob's delegation either.
    let (status, body) = upload(
        alice.clone(),
        d.delegation_id.clone(),
        sign("delegable", &d.csr_pem),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // A chain for another delegation's key.
    let a = create(alice.clone()).await;
    let b = create(alice.clone()).await;
    let (status, body) = upload(
        alice.clone(),
        b.delegation_id.clone(),
        sign("delegable", &a.csr_pem),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("not for the key this delegation made"),
        "{body}"
    );
    // The right one is accepted once.
    let (status, body) = upload(
        alice.clone(),
        a.delegation_id.clone(),
        sign("delegable", &a.csr_pem),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = upload(
        alice.clone(),
        a.delegation_id.clone(),
        sign("delegable", &a.csr_pem),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // Bob cannot run a payload with Alice's delegation.
    let o = vo.cli(
        "bob",
        "submit",
        &["--delegation", &a.delegation_id, "--", "/bin/true"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not"), "{}", text(&o));

    // Longer than a stored credential may be: the message names the limit and the fix.
    let o = vo.cli(
        "alice",
        "delegate",
        &[
            "--proxy",
            &vo.proxy_path("delegable-long"),
            "--lifetime",
            "2000000",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("1000000") && t.contains("--lifetime"), "{t}");
    // ... and within it, the same 300 h proxy is accepted.
    let o = vo.cli(
        "alice",
        "delegate",
        &[
            "--proxy",
            &vo.proxy_path("delegable-long"),
            "--lifetime",
            "900000",
        ],
    );
    ok_stdout(&o);

    // voms-proxy-fake's default path length leaves no room for the worker node's proxy.
    let o = vo.cli("alice", "delegate", &["--proxy", &vo.proxy_path("good")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("-path-length"), "{}", text(&o));

    // Bob's first request still waits; seven more may, the ninth is refused.
    for _ in 0..7 {
        create(bob.clone()).await;
    }
    let r = bob
        .post(vo.srv.url("/v1/delegations"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    assert!(body.contains("at most 8"), "{body}");

    // X509_USER_PROXY is the default proxy file.
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "delegate",
        "--server",
        &vo.srv.url,
        "--cert",
        root().join("pki/alice.pem").to_str().unwrap(),
        "--key",
        root().join("pki/alice.key").to_str().unwrap(),
        "--ca",
        vo.demo.path("certificates").to_str().unwrap(),
    ])
    .env("X509_USER_PROXY", vo.proxy_path("delegable"));
    let out = cmd.output().unwrap();
    let id = ok_stdout(&out);
    assert!(id.starts_with("d-"), "{id}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("delegated {ALICE}/CN=")),
        "{stderr}"
    );
}

#[tokio::test]
async fn expired_and_removed_members_delegations_are_deleted() {
    let vo = Vo::new();
    let pilot = vo.demo.client("pilot");
    // A delegation valid a few seconds: usable for a submission and a match, then gone.
    let did = ok_stdout(&vo.cli(
        "alice",
        "delegate",
        &["--proxy", &vo.proxy_path("delegable"), "--lifetime", "8"],
    ));
    let id = ok_stdout(&vo.cli(
        "alice",
        "submit",
        &["--delegation", &did, "--", "/bin/true"],
    ));
    let work = vo.matched(&pilot).await;
    assert_eq!(work.payload_id, id);
    let key = vo.store(|s| s.delegation_key_path(&did));
    assert!(key.exists());
    let not_after = vo.store(|s| s.delegation(&did).unwrap().unwrap().not_after);
    let wait = (not_after - Utc::now()).num_milliseconds().max(0) as u64 + 1500;
    tokio::time::sleep(StdDuration::from_millis(wait)).await;

    let wn = new_key_request().unwrap();
    let (status, body) = vo.ask_proxy(&pilot, &id, &wn.csr_pem).await;
    assert_eq!(status, 410, "{body}");
    assert!(
        body.contains("expired") && body.contains("mupilot-server delegate"),
        "{body}"
    );
    // Retention (every second here) deletes it with its key.
    let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
    while key.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(StdDuration::from_millis(200)).await;
    }
    assert!(!key.exists(), "retention left {}", key.display());
    assert!(vo.store(|s| s.delegation(&did).unwrap().is_none()));
    let o = vo.cli(
        "alice",
        "submit",
        &["--delegation", &did, "--", "/bin/true"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));

    // Removing the member deletes theirs at once.
    let did = ok_stdout(&vo.cli(
        "alice",
        "delegate",
        &["--proxy", &vo.proxy_path("delegable")],
    ));
    let key = vo.store(|s| s.delegation_key_path(&did));
    assert!(key.exists());
    let o = vo.demo.run(&[
        "member",
        "remove",
        "--config",
        vo.demo.config().to_str().unwrap(),
        ALICE,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!key.exists());
    assert!(vo.store(|s| s.delegation(&did).unwrap().is_none()));
}
