//! The VO server's data is private (issue 14.6): the data directory, database, WAL/SHM,
//! bundles and output archives are 0700/0600 whatever the umask; a data directory other
//! users can enter is refused; a payload's files are deleted a configured time after its
//! final state and its status says so. The real `mupilot-server serve` with mTLS clients.

mod server_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use mupilot::protocol::api::{MatchRequest, MatchResponse, PayloadView, StatusReport};
use server_support::{file_holds, text, Demo, Server};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn rt() -> tokio::runtime::Runtime {
    mupilot::tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Submits as alice with a bundle, matches and finishes it as the pilot (done), uploads an
/// output archive. Returns the payload id.
fn run_one(demo: &Demo, srv: &Server, rt: &tokio::runtime::Runtime) -> String {
    let alice = demo.client("alice");
    let pilot = demo.client("pilot");
    rt.block_on(async {
        let body = serde_json::json!({
            "argv": ["/bin/true"],
            "resources": {"cores": 1, "memory_bytes": 64 << 20, "walltime_seconds": 60},
            "bundle": base64::engine::general_purpose::STANDARD.encode(b"members' inputs"),
        });
        let r = alice
            .post(srv.url("/v1/payloads"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let id = r.json::<serde_json::Value>().await.unwrap()["payload_id"]
            .as_str()
            .unwrap()
            .to_string();
        let req = MatchRequest {
            pilot_id: "data-pilot".into(),
            batch_system: None,
            batch_job_id: None,
            host: "wn01".into(),
            free_cores: 1,
            free_memory_bytes: 1 << 30,
            seconds_left: 3600,
        };
        let m: MatchResponse = pilot
            .post(srv.url("/v1/match"))
            .json(&req)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(m.work.unwrap().payload_id, id);
        let rep = StatusReport {
            pilot_id: "data-pilot".into(),
            state: Some(mupilot::protocol::api::PayloadState::Done),
            exit_code: Some(0),
            ..Default::default()
        };
        let r = pilot
            .post(srv.url(&format!("/v1/payloads/{id}/status")))
            .json(&rep)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"outputs").unwrap();
        let r = pilot
            .put(srv.url(&format!("/v1/payloads/{id}/output")))
            .body(gz.finish().unwrap())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        id
    })
}

/// Alice submits a payload no pilot of these tests fits (64 cores): it stays queued.
fn submit_unmatchable(
    demo: &Demo,
    srv: &Server,
    rt: &tokio::runtime::Runtime,
    bundle: Option<&[u8]>,
) -> String {
    let mut body = serde_json::json!({
        "argv": ["/bin/true"],
        "resources": {"cores": 64, "memory_bytes": 64 << 20, "walltime_seconds": 60},
    });
    if let Some(b) = bundle {
        body["bundle"] = base64::engine::general_purpose::STANDARD.encode(b).into();
    }
    let alice = demo.client("alice");
    rt.block_on(async {
        let r = alice
            .post(srv.url("/v1/payloads"))
            .json(&body)
            .send()
            .await
            .unwrap();
        r.json::<serde_json::Value>().await.unwrap()["payload_id"]
            .as_str()
            .unwrap()
            .to_string()
    })
}

#[test]
fn files_are_private_under_umask_000() {
    let demo = Demo::new();
    let log = demo.tmp.path().join("server.log");
    let srv = Server::start_with_umask(&demo.config(), &log, 0o000);
    let rt = rt();
    let id = run_one(&demo, &srv, &rt);
    let data = demo.path("server-data");
    assert_eq!(mode(&data), 0o700);
    for d in ["bundles", "outputs"] {
        assert_eq!(mode(&data.join(d)), 0o700, "{d}");
    }
    for f in ["mupilot.db", "mupilot.db-wal", "mupilot.db-shm"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    for f in [
        data.join("bundles").join(format!("{id}.tar.gz")),
        data.join("outputs").join(format!("{id}.tar.gz")),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // The control: what sh's umask 000 gives a file the server does not make itself.
    let probe = demo.tmp.path().join("probe");
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("umask 000; : > {}", probe.display()))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(mode(&probe), 0o666);
}

#[test]
fn a_data_directory_others_can_enter_is_refused() {
    let demo = Demo::new();
    let data = demo.path("server-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(server_support::BIN)
        .args(["serve", "--config", demo.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("data directory {}", data.display()))
            && err.contains("mode 0755")
            && err.contains(&format!("chmod 0700 {}", data.display())),
        "{err}"
    );
    assert!(!data.join("mupilot.db").exists());
    // Fixed as the message says, it starts.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let _srv = demo.serve();
}

#[test]
fn retention_deletes_bundle_and_outputs_and_status_says_when() {
    let demo = Demo::new();
    let cfg = demo.config();
    let text_cfg = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text_cfg.contains("retention_seconds = 2592000\n"),
        "{text_cfg}"
    );
    std::fs::write(
        &cfg,
        text_cfg.replace("retention_seconds = 2592000\n", "retention_seconds = 2\n"),
    )
    .unwrap();
    let srv = demo.serve();
    let rt = rt();
    let id = run_one(&demo, &srv, &rt);
    let data = demo.path("server-data");
    let bundle = data.join("bundles").join(format!("{id}.tar.gz"));
    let output = data.join("outputs").join(format!("{id}.tar.gz"));
    // A payload still queued keeps its bundle.
    let alice = demo.client("alice");
    let queued = submit_unmatchable(&demo, &srv, &rt, Some(b"queued input"));
    let view = |id: &str| -> PayloadView {
        rt.block_on(async {
            alice
                .get(srv.url(&format!("/v1/payloads/{id}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    };
    assert!(bundle.exists() && output.exists());
    assert!(view(&id).files_deleted_at.is_none());
    let t0 = chrono::Utc::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while bundle.exists() || output.exists() {
        assert!(Instant::now() < deadline, "files not deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = view(&id);
    let when = v
        .files_deleted_at
        .expect("status says the files were deleted");
    assert!(when >= t0 - chrono::Duration::seconds(3), "{when}");
    assert_eq!(v.state, mupilot::protocol::api::PayloadState::Done);
    assert!(data
        .join("bundles")
        .join(format!("{queued}.tar.gz"))
        .exists());
    // Downloading says it is gone and when.
    let (status, body) = rt.block_on(async {
        let r = alice
            .get(srv.url(&format!("/v1/payloads/{id}/output")))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(status, 410, "{body}");
    assert!(
        body.contains("deleted at") && body.contains("retention"),
        "{body}"
    );
    // And the CLI's status line.
    let out = demo.run(&[
        "status",
        "--config",
        demo.path("client-alice.toml").to_str().unwrap(),
        "--server",
        &srv.url,
        &id,
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("\tdone"), "{}", text(&out));
    assert!(line.contains("files=deleted 20"), "{}", text(&out));
}

/// Record retention through the real server: a finished payload whose record is older than
/// `record_retention_days` is deleted by `serve`'s periodic job at start, another by
/// `membership purge`; a queued payload as old, and a finished one within the period, stay.
#[test]
fn records_past_record_retention_days_are_deleted_and_the_rest_stay() {
    let demo = Demo::new();
    let cfg = demo.config();
    let text_cfg = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text_cfg.replace("retention_seconds = 2592000\n", "retention_seconds = 1\n"),
    )
    .unwrap();
    let rt = rt();
    let alice = demo.client("alice");
    let (old, cli_old, recent, queued) = {
        let srv = demo.serve();
        let old = run_one(&demo, &srv, &rt);
        let cli_old = run_one(&demo, &srv, &rt);
        let recent = run_one(&demo, &srv, &rt);
        let queued = submit_unmatchable(&demo, &srv, &rt, None);
        // Records go only once their files are gone: wait for the file retention.
        let outputs = demo.path("server-data").join("outputs");
        let deadline = Instant::now() + Duration::from_secs(15);
        while [&old, &cli_old, &recent]
            .iter()
            .any(|id| outputs.join(format!("{id}.tar.gz")).exists())
        {
            assert!(Instant::now() < deadline, "files not deleted");
            std::thread::sleep(Duration::from_millis(200));
        }
        (old, cli_old, recent, queued)
    };
    // 181 days ago, past the default 180.
    let aged = mupilot::server::store::ts_text(chrono::Utc::now() - chrono::Duration::days(181));
    demo.sql(&format!(
        "UPDATE payloads SET updated_at = '{aged}', submitted_at = '{aged}'
         WHERE id IN ('{old}', '{queued}')"
    ));
    let srv = demo.serve();
    let status = |id: &str| -> u16 {
        rt.block_on(async {
            alice
                .get(srv.url(&format!("/v1/payloads/{id}")))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&old) != 404 {
        assert!(
            Instant::now() < deadline,
            "serve did not delete {old}'s record"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for kept in [&cli_old, &recent, &queued] {
        assert_eq!(status(kept), 200, "{kept}");
    }
    if demo.pg.is_none() {
        // The row held the owner's DN, argv and environment: erased from every byte of the
        // database files, not only deleted (secure_delete, WAL truncated).
        for f in ["mupilot.db", "mupilot.db-wal"] {
            let p = demo.path("server-data").join(f);
            assert!(!file_holds(&p, &old), "{} still holds {old}", p.display());
        }
    }
    demo.sql(&format!(
        "UPDATE payloads SET updated_at = '{aged}' WHERE id = '{cli_old}'"
    ));
    let out = demo.run(&["membership", "purge", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("deleted the records of 1 payloads finished more than 180 days ago"),
        "{}",
        text(&out)
    );
    assert_eq!(status(&cli_old), 404);
    for kept in [&recent, &queued] {
        assert_eq!(status(kept), 200, "{kept}");
    }
}
