//! The `mupilot-server` command line: init output, config errors, member administration, and
//! the submit/status/output/cancel client round trip against a served demo VO (the pilot's side
//! is played with reqwest and the demo pilot certificate).

mod server_support;

use std::os::unix::fs::PermissionsExt;

use mupilot::protocol::api::{MatchRequest, MatchResponse, PayloadState, StatusReport};
use server_support::{dn, tar_gz, text, Demo};

#[test]
fn init_writes_a_loadable_demo_vo() {
    let demo = Demo::new();
    for f in [
        "ca.key",
        "server.key",
        "pilot.key",
        "alice.key",
        "bob.key",
        "carol.key",
        "vo.key",
    ] {
        let mode = std::fs::metadata(demo.path(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    for (name, want) in [
        ("alice", dn("alice")),
        ("bob", dn("bob")),
        ("carol", dn("carol")),
        ("pilot", dn("pilot")),
        ("server", dn("localhost")),
    ] {
        let certs = mupilot::tls::load_certs(&demo.path(&format!("{name}.crt"))).unwrap();
        assert_eq!(mupilot::tls::subject_dn(&certs[0]).unwrap(), want);
    }
    mupilot::tls::load_ca(&demo.path("certificates")).unwrap();
    mupilot::tls::load_ca(&demo.path("ca.pem")).unwrap();
    mupilot::tls::server_config(
        &demo.path("server.crt"),
        &demo.path("server.key"),
        &demo.path("certificates"),
    )
    .unwrap();
    mupilot::protocol::VoSigningKey::from_pem_file(&demo.path("vo.key")).unwrap();
    mupilot::protocol::VoVerifyingKey::from_pem_file(&demo.path("vo.pub")).unwrap();

    let cfg = mupilot::server::config::ServerConfig::load(&demo.config()).unwrap();
    cfg.check_files().unwrap();
    assert_eq!(cfg.vo, "demo");
    assert_eq!(cfg.pilot_dns, vec![dn("pilot")]);
    assert_eq!(cfg.members.len(), 3);
    assert_eq!(cfg.data_dir, demo.path("server-data"));

    let gridmap = std::fs::read_to_string(demo.path("grid-mapfile")).unwrap();
    assert!(gridmap.contains(&format!("\"{}\" mpu-alice", dn("alice"))));
    assert!(gridmap.contains(&format!("\"{}\" mpu-bob", dn("bob"))));
    assert!(!gridmap.contains("carol"));

    let pilot: toml::Table = std::fs::read_to_string(demo.path("pilot.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pilot["server_url"].as_str(), Some("https://127.0.0.1:0"));
    assert_eq!(
        pilot["switch_socket"].as_str(),
        demo.path("switch.sock").to_str()
    );
    assert_eq!(pilot["ca"].as_str(), demo.path("certificates").to_str());
    let switch: toml::Table = std::fs::read_to_string(demo.path("switch.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(switch["allowed_pilots"].as_array().unwrap().len(), 1);
    assert_eq!(
        switch["audit_log"].as_str(),
        demo.path("audit.jsonl").to_str()
    );
    assert_eq!(
        switch["state_dir"].as_str(),
        demo.path("switch-state").to_str()
    );
    assert_eq!(switch["vo"][0]["name"].as_str(), Some("demo"));
    assert_eq!(
        switch["sandbox"]["scratch_root"].as_str(),
        demo.path("scratch").to_str()
    );

    // A non-empty directory is refused without --force and overwritten with it.
    let dir = demo.dir.to_str().unwrap();
    let out = demo.run(&["init", dir]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let before = std::fs::read(demo.path("vo.pub")).unwrap();
    let out = demo.run(&["init", dir, "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(std::fs::read(demo.path("vo.pub")).unwrap(), before);
}

#[test]
fn bad_config_names_key_and_file() {
    let demo = Demo::new();
    let cfg = demo.config();
    let orig = std::fs::read_to_string(&cfg).unwrap();

    std::fs::write(
        &cfg,
        orig.replacen("vo = \"demo\"", "vo = \"demo\"\ncolour = \"red\"", 1),
    )
    .unwrap();
    let out = demo.run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("colour") && err.contains("server.toml") && err.contains("line"),
        "{err}"
    );

    std::fs::write(&cfg, orig.replace("server.crt", "missing.crt")).unwrap();
    let out = demo.run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.crt") && err.contains("`cert`"),
        "{err}"
    );

    let out = demo.run(&["serve", "--config", "/nonexistent/srv-server.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/srv-server.toml"));

    let out = demo.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2), "usage error exits 2");
}

/// The registration data and AUP versions `member add` records for a person.
const DAVE: [&str; 12] = [
    "--family-name",
    "Example",
    "--given-name",
    "Dave",
    "--institute",
    "Example University",
    "--email",
    "dave@example.edu",
    "--accept-grid-aup",
    "1",
    "--accept-vo-aup",
    "1",
];

#[test]
fn member_subcommands_edit_the_registry() {
    let demo = Demo::new();
    let cfg = demo.config();
    let c = cfg.to_str().unwrap();
    let dave = dn("dave");
    let add = |extra: &[&str]| {
        let mut args = vec!["member", "add", "--config", c, &dave];
        args.extend_from_slice(extra);
        demo.run(&args)
    };
    // Without the registration data, the accepted AUPs or what was verified: refused, and
    // nothing is written.
    let out = add(&["--fqan", "/demo/prod"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--family-name"));
    let out = add(&DAVE);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--verification"));
    let mut old_aup = DAVE.to_vec();
    old_aup[11] = "0.9";
    old_aup.extend(["--verification", "checked"]);
    let out = add(&old_aup);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--accept-vo-aup")
            && err.contains("\"0.9\"")
            && err.contains("vo_aup_version"),
        "{err}"
    );
    let mut robot = DAVE.to_vec();
    robot.extend(["--kind", "robot", "--verification", "checked"]);
    let out = add(&robot);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--responsible"));
    let out = demo.run(&["member", "list", "--config", c, "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&dave));

    let mut ok = DAVE.to_vec();
    ok.extend([
        "--fqan",
        "/demo/prod",
        "--verification",
        "identity checked in person; institute representative consulted",
    ]);
    let out = add(&ok);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("registered"));
    // Added again while registered: refused (renew instead).
    let out = add(&ok);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = demo.run(&["member", "suspend", "--config", c, &dave]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("suspended"));
    // A suspended member is reinstated (its suspension's requesters notified), not re-added.
    let out = add(&ok);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("member reinstate"));
    let out = demo.run(&[
        "member",
        "reinstate",
        "--config",
        c,
        &dave,
        "--verification",
        "security officer cleared the account",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Renewal (reference 002 4.4): the data re-confirmed and the current AUPs accepted again,
    // decided by the operator; without them, refused.
    let renew = |extra: &[&str]| {
        let mut args = vec!["member", "renew", "--config", c, &dave];
        args.extend_from_slice(extra);
        demo.run(&args)
    };
    let out = renew(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = renew(&old_aup);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--accept-vo-aup"));
    let mut again = DAVE.to_vec();
    again.extend(["--verification", "continued membership confirmed"]);
    let out = renew(&again);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("approved"));
    let out = demo.run(&["member", "suspend", "--config", c, &dave]);
    assert!(out.status.success(), "{}", text(&out));
    let out = renew(&again);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a suspended member renews after reinstatement: {}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("member reinstate"));
    let out = demo.run(&["member", "remove", "--config", c, &dave]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    let out = renew(&again);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = demo.run(&["member", "suspend", "--config", c, &dn("nobody")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("member add"));
    let out = demo.run(&["member", "list", "--config", c, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dn"] == dave.as_str())
        .unwrap();
    assert_eq!(d["status"], "removed");
    assert_eq!(d["fqans"][0], "/demo/prod");
    // What the registry requires was recorded: the data, the AUP versions accepted, and the
    // registration as a request the operator approved naming what was verified.
    assert_eq!(d["registration"]["person"]["email"], "dave@example.edu");
    assert_eq!(
        (d["grid_aup_version"].as_str(), d["vo_aup_version"].as_str()),
        (Some("1"), Some("1"))
    );
    let cfg = mupilot::server::config::ServerConfig::load(&cfg).unwrap();
    let store = mupilot::server::store::Store::open_with(&cfg.data_dir, &cfg.database).unwrap();
    let reqs = store.membership_requests(Some(&dave), None).unwrap();
    let reg = reqs
        .iter()
        .find(|r| r.kind.as_str() == "membership")
        .unwrap();
    assert_eq!(reg.state, "approved");
    let by = reg.decided_by.as_deref().unwrap();
    assert!(by.starts_with("mupilot-server member (uid "), "{by}");
    assert!(reg
        .verification
        .as_deref()
        .unwrap()
        .contains("institute representative consulted"));
    drop(store);
    let out = demo.run(&["membership", "audit", "--config", c, "--dn", &dave]);
    assert!(out.status.success(), "{}", text(&out));
    let audit = String::from_utf8_lossy(&out.stdout);
    for action in [
        "register",
        "approve",
        "request",
        "suspend",
        "reinstate",
        "remove",
    ] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\"")),
            "{action} missing in the audit log:\n{audit}"
        );
    }
    assert!(
        audit.contains("institute representative consulted"),
        "{audit}"
    );
    assert!(
        !audit.contains("dave@example.edu"),
        "no personal data in the audit log: {audit}"
    );
}

/// Plays the pilot: match one payload, report `final_state`, upload an archive.
async fn play_pilot(demo: &Demo, url: &str, final_state: PayloadState, exit: i32) -> String {
    let pilot = demo.client("pilot");
    let m: MatchResponse = pilot
        .post(format!("{url}/v1/match"))
        .json(&MatchRequest {
            pilot_id: "srv-cli".into(),
            batch_system: None,
            batch_job_id: None,
            host: "wn".into(),
            free_cores: 1,
            free_memory_bytes: 1 << 30,
            seconds_left: 3600,
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let work = m.work.expect("work");
    let id = work.payload_id;
    let r = pilot
        .post(format!("{url}/v1/payloads/{id}/status"))
        .json(&StatusReport {
            pilot_id: "srv-cli".into(),
            state: Some(final_state),
            exit_code: Some(exit),
            account: Some("mpu-alice".into()),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = pilot
        .put(format!("{url}/v1/payloads/{id}/output"))
        .body(tar_gz("result.txt", b"42\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    id
}

#[tokio::test]
async fn submit_status_output_cli_round_trip() {
    let demo = Demo::new();
    let srv = demo.serve();
    let client_toml = demo.path("client-alice.toml");
    let conn_flags = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--server".into(),
            srv.url.clone(),
            "--cert".into(),
            demo.path("alice.crt").display().to_string(),
            "--key".into(),
            demo.path("alice.key").display().to_string(),
            "--ca".into(),
            demo.path("certificates").display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        demo.run(&refs)
    };

    let bundle = demo.tmp.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    std::fs::write(bundle.join("in.txt"), "input").unwrap();
    let mut args = vec!["submit".to_string()];
    args.extend(conn_flags(&[
        "--jobtag",
        "cli",
        "--memory",
        "64M",
        "--walltime",
        "60",
        "--bundle",
        bundle.to_str().unwrap(),
        "--output",
        "result.txt",
        "--env",
        "A=b",
        "--",
        "/bin/cat",
        "in.txt",
    ]));
    let out = run(args);
    assert!(out.status.success(), "{}", text(&out));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("p-"), "{id}");

    // Not final yet: --wait times out with exit 1.
    let mut args = vec!["status".to_string()];
    args.extend(conn_flags(&[&id, "--wait", "1"]));
    let out = run(args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    let pid = play_pilot(&demo, &srv.url, PayloadState::Done, 0).await;
    assert_eq!(pid, id);
    let out = demo.run(&[
        "status",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        &id,
        "--wait",
        "10",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "done");
    assert_eq!(v["resources"]["memory_bytes"], 64u64 << 20);

    let to = demo.tmp.path().join("out");
    let out = demo.run(&[
        "output",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        &id,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(to.join("result.txt")).unwrap(),
        "42\n"
    );

    // A payload that fails: status --wait exits 3.
    let out = demo.run(&[
        "submit",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        "--",
        "/bin/false",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let id2 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    play_pilot(&demo, &srv.url, PayloadState::Failed, 1).await;
    let out = demo.run(&[
        "status",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        &id2,
        "--wait",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exit=1"));

    // Cancel of a queued payload; usage errors exit 2; server refusals exit 1.
    let out = demo.run(&[
        "submit",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        "--",
        "/bin/true",
    ]);
    let id3 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = demo.run(&[
        "cancel",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        &id3,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    let out = demo.run(&["submit", "--server", &srv.url, "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = demo.run(&[
        "submit",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        "--memory",
        "lots",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let carol_toml = demo.path("client-carol.toml");
    let out = demo.run(&[
        "status",
        "--config",
        carol_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        &id,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
}

/// Runs `bin args` with stdout a pipe whose reading end is already closed (`| head -0`) and
/// a non-UTF-8 variable in its environment; returns its exit status and stderr.
fn run_into_closed_pipe(bin: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::os::unix::ffi::OsStringExt;
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let out = std::process::Command::new(bin)
        .args(args)
        .env(
            "SRV_NOT_UTF8",
            std::ffi::OsString::from_vec(b"\xff\xfe".to_vec()),
        )
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A closed stdout ends each program quietly, by SIGPIPE as it ends `cat`, never with a panic
/// and a backtrace; the submission itself was made.
#[tokio::test]
async fn closed_stdout_ends_every_program_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let demo = Demo::new();
    let srv = demo.serve();
    let quiet = |what: &str, (status, stderr): (std::process::ExitStatus, String)| {
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{what}: {status:?}\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{what}: {stderr}");
    };
    let client_toml = demo.path("client-alice.toml");
    let submit = [
        "submit",
        "--config",
        client_toml.to_str().unwrap(),
        "--server",
        &srv.url,
        "--",
        "/bin/true",
    ];
    let server = env!("CARGO_BIN_EXE_mupilot-server");
    let (status, stderr) = run_into_closed_pipe(server, &submit);
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{stderr}");
    quiet("mupilot-server submit", (status, stderr));
    let list = demo
        .client("alice")
        .get(srv.url("/v1/payloads"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains("\"p-"), "the submission was made: {list}");
    quiet(
        "mupilot limits",
        run_into_closed_pipe(env!("CARGO_BIN_EXE_mupilot"), &["limits"]),
    );
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy/site.policy");
    quiet(
        "mupilot-switch policy check",
        run_into_closed_pipe(
            env!("CARGO_BIN_EXE_mupilot-switch"),
            &["policy", "check", policy],
        ),
    );
}
