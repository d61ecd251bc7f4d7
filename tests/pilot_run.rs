//! The `mupilot` binary against a VO server double speaking real HTTPS with mutual TLS and a
//! helper double speaking the real switch protocol on a unix socket: a whole run, a graceful
//! stop by SIGTERM, a denial, a lost helper, a missing helper, configuration errors, trace
//! verification and `limits`.

mod pilot_support;

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mupilot::protocol::api::PayloadState;
use mupilot::protocol::envelope::VoSigningKey;
use pilot_support::{pilot_toml, pki, FakeHelper, FakeVo, HelperMode};

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mupilot")
}

/// Runs `mupilot` with `args`, calling `during(pid)` while it runs; kills it (by pid) if it
/// overruns `limit`.
fn run_pilot(dir: &Path, args: &[&str], limit: Duration, during: impl FnOnce(u32)) -> Ran {
    run_pilot_env(dir, args, &[], limit, during)
}

/// [`run_pilot`] with extra environment variables (any bytes).
fn run_pilot_env(
    dir: &Path,
    args: &[&str],
    env: &[(&str, OsString)],
    limit: Duration,
    during: impl FnOnce(u32),
) -> Ran {
    let out = dir.join("plt-stdout.txt");
    let err = dir.join("plt-stderr.txt");
    let mut child = Command::new(bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    during(child.id());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mupilot overran {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

fn config_arg(p: &Path) -> String {
    p.display().to_string()
}

fn states(vo: &FakeVo, id: &str) -> Vec<PayloadState> {
    vo.log
        .lock()
        .unwrap()
        .reports
        .iter()
        .filter(|(p, _)| p == id)
        .filter_map(|(_, r)| r.state)
        .collect()
}

fn trace(dir: &Path) -> Vec<serde_json::Value> {
    let p = dir.join("work/trace.jsonl");
    let r = mupilot::records::verify_file(&p).unwrap();
    assert!(r.first_break.is_none(), "{:?}", r.first_break);
    mupilot::records::read_records(&p).unwrap()
}

#[test]
fn whole_run_over_mtls_with_helper_double() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-p1", 1)]);
    let helper = FakeHelper::start(
        dir.path(),
        HelperMode::Run(Some(Duration::from_millis(200))),
    );
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &helper.socket, "");
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(
        ran.stdout.contains("1 launched, 1 done"),
        "stdout: {}",
        ran.stdout
    );
    assert_eq!(
        states(&vo, "plt-p1"),
        vec![PayloadState::Running, PayloadState::Done]
    );
    // The hello carried the DN of the pilot certificate.
    let hello = helper.log.lock().unwrap().hello.clone().unwrap();
    assert_eq!(hello.pilot_dn.as_deref(), Some("/O=mupilot-plt/CN=pilot"));
    assert_eq!(hello.pilot_id, "plt-pilot");
    // The upload is a tar.gz with the outputs and both logs.
    let log = vo.log.lock().unwrap();
    assert_eq!(log.uploads.len(), 1);
    let (id, ctype, body) = &log.uploads[0];
    assert_eq!(id, "plt-p1");
    assert_eq!(ctype, "application/gzip");
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(body.as_slice()));
    let mut files = std::collections::BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        files.insert(name, s);
    }
    assert_eq!(files["outputs/result.txt"], "result of payload\n");
    assert_eq!(files["stdout"], "stdout of plt-p1\n");
    assert_eq!(files["stderr"], "stderr line\n");
    let recs = trace(dir.path());
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["event"], "start");
    assert_eq!(recs[1]["event"], "end");
    assert_eq!(recs[1]["decision"], "permit");
    assert_eq!(recs[1]["account"], "mpt-plt-a");
    assert_eq!(recs[1]["upload"], "ok");
    assert_eq!(recs[1]["server_url"], vo.url());
    // `trace verify --config` finds the same log intact.
    let v = run_pilot(
        dir.path(),
        &["trace", "verify", "--config", &config_arg(&cfg)],
        Duration::from_secs(20),
        |_| {},
    );
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("chain intact: 2 records"), "{}", v.stdout);
}

#[test]
fn sigterm_stops_gracefully_through_the_helper() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-long", 1)]);
    let helper = FakeHelper::start(dir.path(), HelperMode::Run(None));
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &helper.socket, "");
    let log = helper.log.clone();
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(60),
        |pid| {
            let t0 = Instant::now();
            while log.lock().unwrap().launches.is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(30), "no launch");
                std::thread::sleep(Duration::from_millis(20));
            }
            // Let the pilot see `started` before the signal.
            std::thread::sleep(Duration::from_millis(300));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        },
    );
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(ran.stdout.contains("SIGTERM"), "{}", ran.stdout);
    assert_eq!(
        helper.log.lock().unwrap().signals,
        vec![("plt-long".to_string(), 15)]
    );
    assert_eq!(
        states(&vo, "plt-long"),
        vec![PayloadState::Running, PayloadState::Failed]
    );
    let recs = trace(dir.path());
    assert_eq!(recs[1]["signal"], 15);
    assert_eq!(recs[1]["kill_reason"], "pilot_request");
}

#[test]
fn denial_is_reported_and_not_run_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-carol", 1)]);
    let helper = FakeHelper::start(dir.path(), HelperMode::Deny);
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &helper.socket, "");
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(ran.stdout.contains("1 denied"), "{}", ran.stdout);
    assert_eq!(states(&vo, "plt-carol"), vec![PayloadState::Denied]);
    let log = vo.log.lock().unwrap();
    let r = &log.reports[0].1;
    assert_eq!(r.denial_class.as_deref(), Some("authorization"));
    assert!(r.reason.as_deref().unwrap().contains("grid-mapfile"));
    assert!(log.uploads.is_empty());
    assert_eq!(helper.log.lock().unwrap().launches.len(), 1);
}

#[test]
fn lost_helper_reports_lost_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-lost", 1)]);
    let helper = FakeHelper::start(dir.path(), HelperMode::DropAfterStart);
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &helper.socket, "");
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(ran.code, 1, "stderr:\n{}", ran.stderr);
    assert_eq!(states(&vo, "plt-lost").last(), Some(&PayloadState::Lost));
}

#[test]
fn missing_helper_exits_4_without_fetching() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-x", 1)]);
    let socket = dir.path().join("no-helper.sock");
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &socket, "");
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(30),
        |_| {},
    );
    assert_eq!(ran.code, 4, "stderr:\n{}", ran.stderr);
    assert!(ran.stderr.contains("no-helper.sock"), "{}", ran.stderr);
    assert_eq!(vo.log.lock().unwrap().matches, 0);
}

fn expect_usage_error(dir: &Path, cfg: &Path, needle: &str) {
    let ran = run_pilot(
        dir,
        &["run", "--config", &config_arg(cfg)],
        Duration::from_secs(30),
        |_| {},
    );
    assert_eq!(ran.code, 2, "stderr:\n{}", ran.stderr);
    assert!(
        ran.stderr.contains(needle),
        "stderr does not name {needle}:\n{}",
        ran.stderr
    );
}

#[test]
fn configuration_errors_exit_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let sock = dir.path().join("s.sock");
    let url = "https://127.0.0.1:1";

    let cfg = pilot_toml(dir.path(), &pki, url, &sock, "idle_timeout = 3\n");
    expect_usage_error(dir.path(), &cfg, "idle_timeout");

    expect_usage_error(dir.path(), &dir.path().join("absent.toml"), "absent.toml");

    let cfg = pilot_toml(dir.path(), &pki, url, &sock, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&pki.ca.display().to_string(), "/nonexistent/plt-ca");
    std::fs::write(&cfg, text).unwrap();
    expect_usage_error(dir.path(), &cfg, "/nonexistent/plt-ca");

    let cfg = pilot_toml(dir.path(), &pki, url, &sock, "");
    std::fs::write(&pki.pilot_key, "not a key\n").unwrap();
    expect_usage_error(dir.path(), &cfg, "pilot.key");

    let ran = run_pilot(dir.path(), &["run"], Duration::from_secs(30), |_| {});
    assert_eq!(ran.code, 2);
    assert!(ran.stderr.contains("--config"), "{}", ran.stderr);
}

#[test]
fn trace_verify_names_the_broken_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("trace.jsonl");
    let mut w =
        mupilot::records::ChainWriter::open(&p, 0o600, mupilot::records::FsyncPolicy::Never)
            .unwrap();
    for i in 0..3 {
        w.append(&serde_json::json!({"event": "start", "payload_id": format!("p{i}")}))
            .unwrap();
    }
    drop(w);
    let log = p.display().to_string();
    let ok = run_pilot(
        dir.path(),
        &["trace", "verify", "--log", &log],
        Duration::from_secs(20),
        |_| {},
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let text = std::fs::read_to_string(&p).unwrap().replace("p1", "pX");
    std::fs::write(&p, text).unwrap();
    let bad = run_pilot(
        dir.path(),
        &["trace", "verify", "--log", &log],
        Duration::from_secs(20),
        |_| {},
    );
    assert_eq!(bad.code, 1);
    assert!(bad.stdout.contains("line 3"), "{}", bad.stdout);
}

/// A batch environment holding values that are not UTF-8: one of ours (reported under
/// `problems`, the rest of the slot still discovered), one that is not (ignored).
fn non_utf8_env() -> Vec<(&'static str, OsString)> {
    vec![
        (
            "SLURM_MEM_PER_NODE",
            OsString::from_vec(b"40\xff96".to_vec()),
        ),
        (
            "PLT_SOMEONE_ELSES",
            OsString::from_vec(b"\xfe\xff".to_vec()),
        ),
    ]
}

#[test]
fn non_utf8_environment_is_reported_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_pilot_env(
        dir.path(),
        &["limits", "--json"],
        &non_utf8_env(),
        Duration::from_secs(20),
        |_| {},
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let v: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert!(v["cores"].as_u64().unwrap() >= 1);
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("SLURM_MEM_PER_NODE") && p.contains("not UTF-8")),
        "{problems:?}"
    );
    assert!(!problems.iter().any(|p| p.contains("PLT_SOMEONE_ELSES")));

    // A whole run in the same environment.
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-u8", 1)]);
    let helper = FakeHelper::start(
        dir.path(),
        HelperMode::Run(Some(Duration::from_millis(100))),
    );
    let cfg = pilot_toml(dir.path(), &pki, &vo.url(), &helper.socket, "");
    let ran = run_pilot_env(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        &non_utf8_env(),
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(ran.stdout.contains("1 launched, 1 done"), "{}", ran.stdout);
    assert!(ran.stderr.contains("SLURM_MEM_PER_NODE"), "{}", ran.stderr);
}

#[test]
fn limits_prints_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_pilot(
        dir.path(),
        &["limits", "--json"],
        Duration::from_secs(20),
        |_| {},
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let v: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert!(v["cores"].as_u64().unwrap() >= 1);
    let table = run_pilot(dir.path(), &["limits"], Duration::from_secs(20), |_| {});
    assert_eq!(table.code, 0);
    assert!(table.stdout.contains("cores"), "{}", table.stdout);
}

#[test]
fn sigusr1_drains_without_signalling_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let works = vec![
        pilot_support::work(&key, "plt-d1", 1),
        pilot_support::work(&key, "plt-d2", 1),
    ];
    let vo = FakeVo::start(&pki, works);
    let helper = FakeHelper::start(
        dir.path(),
        HelperMode::Run(Some(Duration::from_millis(800))),
    );
    // One core: the second payload waits for the first, and the drain comes first.
    let cfg = pilot_toml(
        dir.path(),
        &pki,
        &vo.url(),
        &helper.socket,
        "[slot]\ncores = 1\n",
    );
    let log = helper.log.clone();
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(60),
        |pid| {
            while log.lock().unwrap().launches.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGUSR1,
            )
            .unwrap();
        },
    );
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(ran.stdout.contains("drained: SIGUSR1"), "{}", ran.stdout);
    assert!(ran.stdout.contains("1 launched, 1 done"), "{}", ran.stdout);
    assert!(helper.log.lock().unwrap().signals.is_empty());
    assert_eq!(vo.log.lock().unwrap().queue.len(), 1);
}

#[test]
fn many_short_payloads_all_run_report_and_upload() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let n = 40;
    let works = (0..n)
        .map(|i| pilot_support::work(&key, &format!("plt-m{i}"), 1))
        .collect();
    let vo = FakeVo::start(&pki, works);
    let helper = FakeHelper::start(dir.path(), HelperMode::Run(Some(Duration::ZERO)));
    let cfg = pilot_toml(
        dir.path(),
        &pki,
        &vo.url(),
        &helper.socket,
        &format!("max_payloads = {n}\n"),
    );
    let t0 = Instant::now();
    let ran = run_pilot(
        dir.path(),
        &["run", "--config", &config_arg(&cfg)],
        Duration::from_secs(120),
        |_| {},
    );
    let took = t0.elapsed();
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(
        ran.stdout.contains(&format!("{n} launched, {n} done")),
        "{}",
        ran.stdout
    );
    assert_eq!(vo.log.lock().unwrap().uploads.len(), n);
    assert_eq!(trace(dir.path()).len(), 2 * n);
    eprintln!(
        "plt measurement: {n} payloads (match, launch, 2 status reports, upload, 2 trace records each) in {:.2} s, {:.1} ms per payload",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / n as f64
    );
}
