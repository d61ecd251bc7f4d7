//! The classes of a refusal, end to end (issue 14.7): VO server -> pilot (an unprivileged
//! account) -> mupilot-switch (root) -> the pilot's report -> the server's state and
//! `mupilot-server status`. Only a local authorization decision reads as `denied`; a
//! hostile bundle is the caller's fault and an exhausted pool account pool the site's
//! (system), both `failed` with their class and reason. Root, real accounts (`mpt-cls-*`).

mod support;

use std::io::Write;
use std::process::Command;

use base64::Engine;
use support::{Accounts, Proc, Stack, SERIAL};

const RES: &[&str] = &["--cores", "1", "--memory", "128M", "--walltime", "60"];
const POOL: &str = "mpt-cls-p";

fn submit(stack: &Stack, user: &str, argv: &[&str]) -> String {
    let mut args: Vec<&str> = RES.to_vec();
    args.push("--");
    args.extend_from_slice(argv);
    stack.submit(user, &args)
}

/// Submits through the API as a hostile member would: `bundle` is any bytes.
fn submit_with_bundle(stack: &Stack, user: &str, bundle: &[u8]) -> String {
    mupilot::tls::install_crypto_provider();
    let client = mupilot::tls::https_client(
        &stack.vo.join(format!("{user}.crt")),
        &stack.vo.join(format!("{user}.key")),
        &stack.vo.join("certificates"),
    )
    .unwrap();
    let body = serde_json::json!({
        "argv": ["/bin/true"],
        "resources": {"cores": 1, "memory_bytes": 128 << 20, "walltime_seconds": 60},
        "bundle": base64::engine::general_purpose::STANDARD.encode(bundle),
    });
    let url = format!("{}/v1/payloads", stack.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = client.post(url).json(&body).send().await.unwrap();
        assert!(
            r.status().is_success(),
            "submit: {}",
            r.text().await.unwrap()
        );
        let v: serde_json::Value = r.json().await.unwrap();
        v["payload_id"].as_str().unwrap().to_string()
    })
}

/// A gzip stream whose content is not a tar archive: the digest the VO signs matches, the
/// unpacking (as the account, in the payload's cgroup) fails.
fn not_a_tar() -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&[b'A'; 1024]).unwrap();
    gz.finish().unwrap()
}

/// The helper again, with a gridmapdir holding one pool account (`[authz]` is read at start).
fn restart_helper_with_pool(stack: &mut Stack) {
    stack.switch = None;
    let gmd = stack.vo.join("gridmapdir");
    std::fs::create_dir_all(&gmd).unwrap();
    std::fs::write(gmd.join(format!("{POOL}01")), b"").unwrap();
    let cfg = stack.vo.join("switch.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("\n[authz]\ngridmapdir = \"{}\"\n", gmd.display()));
    std::fs::write(&cfg, text).unwrap();
    let sock = stack.vo.join("switch.sock");
    let _ = std::fs::remove_file(&sock);
    let log = stack.dir.path().join("switch.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(support::bin("mupilot-switch"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    stack.switch = Some(Proc { child, log });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "helper did not restart:\n{}",
            stack.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn status_line(stack: &Stack, user: &str, id: &str) -> String {
    let out = stack.client(user, "status", &[id]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn each_refusal_class_reaches_the_server_as_its_own_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool_account = format!("{POOL}01");
    let _accounts = Accounts::create(&["mpt-cls-pilot", "mpt-cls-a", &pool_account]);
    // alice maps to her own account; bob to a pool of one; carol to nothing.
    let mut stack = Stack::start("mpt-cls-pilot", &[("alice", "mpt-cls-a")]);
    std::fs::write(
        stack.vo.join("grid-mapfile"),
        format!(
            "\"/DC=org/DC=mupilot-demo/CN=alice\" mpt-cls-a\n\"/DC=org/DC=mupilot-demo/CN=bob\" .{POOL}\n"
        ),
    )
    .unwrap();
    restart_helper_with_pool(&mut stack);
    // The pool's one account is leased to another owner (gridmapdir format: a hard link
    // named by the owner's URL-encoded DN).
    let gmd = stack.vo.join("gridmapdir");
    std::fs::hard_link(
        gmd.join(&pool_account),
        gmd.join("%2fdc%3dorg%2fdc%3dmupilot-demo%2fcn%3dsomeone%20else"),
    )
    .unwrap();

    let ok = submit(&stack, "alice", &["/bin/true"]);
    let hostile = submit_with_bundle(&stack, "alice", &not_a_tar());
    let exhausted = submit(&stack, "bob", &["/bin/true"]);
    let unmapped = submit(&stack, "carol", &["/bin/true"]);

    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("1 denied"), "{summary}");

    // The control: the same owner, mapping and pilot run a payload.
    assert_eq!(
        stack.status("alice", &ok)["state"],
        "done",
        "{}",
        stack.logs()
    );

    // caller: the bundle the VO signed is not a tar.gz.
    let st = stack.status("alice", &hostile);
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["denial_class"], "caller", "{st}");
    let reason = st["reason"].as_str().unwrap();
    assert!(reason.contains("not a usable tar.gz"), "{reason}");

    // system: the pool has no free account.
    let st = stack.status("bob", &exhausted);
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["denial_class"], "system", "{st}");
    assert!(st["reason"].as_str().unwrap().contains("exhausted"), "{st}");

    // authorization: no mapping. The only `denied`.
    let st = stack.status("carol", &unmapped);
    assert_eq!(st["state"], "denied", "{st}");
    assert_eq!(st["denial_class"], "authorization", "{st}");

    // `mupilot-server status` shows state, class and reason.
    let line = status_line(&stack, "bob", &exhausted);
    assert!(
        line.contains("\tfailed\t") && line.contains("class=system") && line.contains("exhausted"),
        "{line}"
    );
    let line = status_line(&stack, "alice", &hostile);
    assert!(
        line.contains("\tfailed\t") && line.contains("class=caller"),
        "{line}"
    );
    let line = status_line(&stack, "carol", &unmapped);
    assert!(
        line.contains("\tdenied\t") && line.contains("class=authorization"),
        "{line}"
    );

    // The pilot's trace and the helper's audit log carry the same classes.
    let trace = Stack::records(&stack.trace_log());
    for (id, state, class) in [
        (&hostile, "failed", "caller"),
        (&exhausted, "failed", "system"),
        (&unmapped, "denied", "authorization"),
    ] {
        let end = trace
            .iter()
            .rev()
            .find(|r| r["payload_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no trace record of {id}"));
        assert_eq!(end["state"], state, "{end}");
        assert_eq!(end["denial_class"], class, "{end}");
    }
    let audit = Stack::records(&stack.audit_log());
    let of = |id: &str| -> Vec<&serde_json::Value> {
        audit.iter().filter(|r| r["payload_id"] == id).collect()
    };
    // The hostile bundle was unpacked as the account after the start record: an end record
    // closes it, and no payload ran.
    let h = of(&hostile);
    assert!(h.iter().any(|r| r["event"] == "start"), "{h:#?}");
    assert!(
        h.iter()
            .any(|r| r["event"] == "end" && r["kill_reason"] == "setup_failed"),
        "{h:#?}"
    );
    for (id, class) in [(&exhausted, "system"), (&unmapped, "authorization")] {
        let d = of(id);
        assert!(
            d.iter()
                .any(|r| r["event"] == "denied" && r["denial_class"] == class),
            "{d:#?}"
        );
        assert!(!d.iter().any(|r| r["event"] == "start"), "{d:#?}");
    }
}
