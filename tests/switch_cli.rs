//! The `mupilot-switch` command line: `check-config` explains a bad file or key, `audit
//! verify` passes on a log the daemon wrote and fails (exit 1, line named) after one edited
//! byte, usage errors exit 2.

mod switch_support;

use std::os::unix::fs::PermissionsExt;

use switch_support::*;

#[test]
fn check_config_accepts_a_good_file_and_names_bad_keys() {
    let _u = Users::acquire();
    let site = Site::new();
    let cfg = site.config.to_str().unwrap();
    let (code, out) = cli(&["check-config", "--config", cfg]);
    // The default network = "host" with ipc_fallback = "pasta": scoped where the kernel scopes
    // payloads with Landlock (ABI >= 6), a namespace per payload connected by pasta elsewhere.
    let scoped = mupilot::switch::sandbox::scope::kernel_abi() >= 6;
    if scoped {
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(": ok") && out.contains("mpt-swd-p (uid "),
            "{out}"
        );
        assert!(
            out.contains("ipc isolation  Landlock scope of abstract sockets and signals (ABI "),
            "{out}"
        );
    } else {
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("ipc isolation  network namespace per payload (pasta; Landlock ABI "),
            "{out}"
        );
    }
    // Audit and state directories are created 0700.
    let mode = std::fs::metadata(site.path("log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let text = std::fs::read_to_string(&site.config).unwrap();
    let bad = site.path("bad.toml");
    let badp = bad.to_str().unwrap();

    std::fs::write(
        &bad,
        text.replace("min_uid = 1000", "min_uid = 1000\nmax_uid = 5"),
    )
    .unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(badp) && out.contains("line 7") && out.contains("max_uid"),
        "{out}"
    );

    std::fs::write(&bad, text.replace("vo.pub", "missing.pub")).unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("key 'vo[0].public_key'") && out.contains("missing.pub"),
        "{out}"
    );

    std::fs::write(&bad, text.replace("\"root\"", "\"mpt-swd-nosuch\"")).unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("key 'allowed_pilots[0]'") && out.contains("useradd"),
        "{out}"
    );

    std::fs::write(site.path("bad-map"), "\"/CN=unterminated x\n").unwrap();
    std::fs::write(&bad, text.replace("\"grid-mapfile\"", "\"bad-map\"")).unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("key 'gridmap'") && out.contains("bad-map line 1"),
        "{out}"
    );

    std::fs::write(
        &bad,
        text.replace("[sandbox]", "[sandbox]\nnetwork = \"wifi\""),
    )
    .unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("wifi") && out.contains("line 11"), "{out}");

    std::fs::write(
        &bad,
        text.replace("[sandbox]", "[sandbox]\nipc_fallback = \"loopback\""),
    )
    .unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 0, "{out}");
    let fallback = match scoped {
        true => "ipc isolation  Landlock scope of abstract sockets and signals",
        false => "ipc isolation  network namespace per payload (loopback;",
    };
    assert!(out.contains(fallback), "{out}");
    std::fs::write(
        &bad,
        text.replace("[sandbox]", "[sandbox]\nipc_fallback = \"maybe\""),
    )
    .unwrap();
    let (code, out) = cli(&["check-config", "--config", badp]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("maybe") && out.contains("line 11"), "{out}");

    let (code, out) = cli(&["check-config", "--config", "/nonexistent/swd.toml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("/nonexistent/swd.toml: cannot read"), "{out}");
}

#[test]
fn audit_verify_passes_then_fails_after_one_edited_byte() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    for _ in 0..3 {
        let body = site.body(DN_UNMAPPED, &["/bin/true"]);
        denied(c.launch(&site.sign(&body), None));
    }
    drop(c);
    d.stop();
    let mode = std::fs::metadata(&site.audit).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let log = site.audit.to_str().unwrap();
    let (code, out) = cli(&["audit", "verify", "--log", log]);
    assert_eq!(code, 0, "{out}");
    // Three denials, and the chain head anchored at shutdown.
    assert!(out.contains("chain intact: 4 records"), "{out}");
    let (code, out) = cli(&["audit", "verify", "--config", site.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");

    let mut bytes = std::fs::read(&site.audit).unwrap();
    let second_line = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    let pos = second_line + 40;
    bytes[pos] ^= 0x01;
    std::fs::write(&site.audit, &bytes).unwrap();
    let (code, out) = cli(&["audit", "verify", "--log", log]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at line"), "{out}");
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let (code, _) = cli(&[]);
    assert_eq!(code, 2);
    let (code, out) = cli(&["serve", "--no-such-flag"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Exit codes"), "{out}");
    let (code, _) = cli(&["policy", "check"]);
    assert_eq!(code, 2);
    let (code, out) = cli(&["audit", "verify", "--log", "/nonexistent/swd-audit.jsonl"]);
    assert_eq!(code, 2, "{out}");
}

/// Runs check-config on `text` (written as bad.toml beside the site's files).
fn check(site: &Site, text: &str) -> (i32, String) {
    let bad = site.path("bad.toml");
    std::fs::write(&bad, text).unwrap();
    cli(&["check-config", "--config", bad.to_str().unwrap()])
}

#[test]
fn check_config_names_each_site_problem_with_its_fix() {
    let _u = Users::acquire();
    let site = Site::new();
    let text = std::fs::read_to_string(&site.config).unwrap();
    let (code, out) = check(&site, &text);
    assert_eq!(code, 0, "{out}");
    let scratch_parent = site.scratch.path();
    let scratch = scratch_parent.join("scratch");
    let scratch_line = format!("scratch_root = \"{}\"", scratch.display());
    assert!(text.contains(&scratch_line));

    // The layout the guide documented before: scratch below the 0700 state directory.
    let state = scratch_parent.join("state");
    let inside = text
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}\"", state.display()),
        )
        .replace(
            &scratch_line,
            &format!("scratch_root = \"{}/scratch\"", state.display()),
        );
    let (code, out) = check(&site, &inside);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("1 problem(s)"), "{out}");
    assert!(
        out.contains(&format!("bad.toml: key 'sandbox.scratch_root' = {}/scratch: is inside {}", state.display(), state.display()))
            && out.contains("fix: set sandbox.scratch_root to a directory outside every root-only directory, e.g. /var/spool/mupilot"),
        "{out}"
    );

    // A parent the payload accounts cannot search.
    std::fs::set_permissions(scratch_parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, out) = check(&site, &text);
    std::fs::set_permissions(scratch_parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("not searchable by the payload accounts")
            && out.contains(&format!("fix: chmod o+x {}", scratch_parent.display())),
        "{out}"
    );

    // A scratch root an account can write.
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, out) = check(&site, &text);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("can be written by an account other than root") && out.contains("chmod go-w"),
        "{out}"
    );
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o711)).unwrap();

    // An audit directory others can read.
    std::fs::set_permissions(site.path("log"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, out) = check(&site, &text);
    std::fs::set_permissions(site.path("log"), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("key 'audit_log'") && out.contains("mode 0755") && out.contains("chmod 0700"),
        "{out}"
    );

    // A pool without accounts: no gridmapdir, then an empty one.
    std::fs::write(
        site.path("pool-map"),
        "\"/CN=swd pooled\" .mpt-swd-nopool\n",
    )
    .unwrap();
    let pooled = text.replace("\"grid-mapfile\"", "\"pool-map\"");
    let (code, out) = check(&site, &pooled);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("pool-map line 1 maps \"/CN=swd pooled\" to pool '.mpt-swd-nopool', but no authz.gridmapdir is configured"), "{out}");
    std::fs::create_dir(site.path("gridmapdir")).unwrap();
    let with_dir = pooled.replace(
        "[sandbox]",
        "[authz]\ngridmapdir = \"gridmapdir\"\n[sandbox]",
    );
    let (code, out) = check(&site, &with_dir);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("holds 0 file(s) named mpt-swd-nopool and digits (as leasing counts them)")
            && out.contains("useradd mpt-swd-nopool001"),
        "{out}"
    );

    // A referenced file that is missing is named too (load's checks run first).
    let (code, out) = check(
        &site,
        &text.replace(
            "[sandbox]",
            "[authz]\nsite_policy = \"nope.policy\"\n[sandbox]",
        ),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("key 'authz.site_policy'") && out.contains("nope.policy"),
        "{out}"
    );

    let (code, out) = check(&site, &text);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn audit_who_at_now_and_at_a_fraction_of_a_second() {
    let _u = Users::acquire();
    let site = Site::new();
    let d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["/bin/sleep", "30"]);
    let id = body.payload_id.clone();
    match c.launch(&site.sign(&body), None) {
        mupilot::protocol::switch_wire::SwitchEvent::Started { .. } => {}
        other => panic!("expected started, got {other:?}"),
    }
    let cfg = site.config.to_str().unwrap();
    let who = |at: &str| {
        cli(&[
            "audit",
            "who",
            "--account",
            ACCT,
            "--at",
            at,
            "--config",
            cfg,
        ])
    };
    let (code, out) = who("now");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&id) && out.contains("still running"), "{out}");

    // One microsecond before the start nobody held it, at the start the payload did; the
    // answer repeats the moment to the microsecond.
    let start = site
        .records_of(&id)
        .into_iter()
        .find(|r| r["event"] == "start")
        .unwrap();
    let t = chrono::DateTime::parse_from_rfc3339(
        start["start"].as_str().or(start["time"].as_str()).unwrap(),
    )
    .unwrap()
    .with_timezone(&chrono::Utc);
    let fmt =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let before = fmt(t - chrono::Duration::microseconds(1));
    let (code, out) = who(&before);
    assert_eq!(
        (code, out.trim()),
        (
            1,
            format!("nobody held account {ACCT} at {}", before).as_str()
        )
    );
    let exact = fmt(t + chrono::Duration::microseconds(1));
    let (code, out) = who(&exact);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(&format!("account {ACCT} at {exact} was held by:")),
        "{out}"
    );
    drop(c);
    d.stop();
}
