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
    // The default network = "host" with ipc_fallback = "refuse": usable where the kernel scopes
    // payloads with Landlock (ABI >= 6), refused with the reason elsewhere.
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
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains("key 'sandbox.ipc_fallback'") && out.contains("Landlock ABI"),
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
