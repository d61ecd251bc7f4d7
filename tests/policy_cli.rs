//! `policy check` and `policy eval` run in-process on real files (the binary wiring is the
//! helper CLI's), and the site + VO combination with the shipped example policies. Runs as any
//! user.

use std::path::{Path, PathBuf};

use chrono::Utc;
use mupilot::policy::cli::{check, check_main, eval, eval_main};
use mupilot::policy::{
    combine, Action, Attr, Decision, DenyClass, Policy, PolicyStack, Request, Verdict,
};
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mupilot-test-pol-")
        .tempdir()
        .expect("temp dir")
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policy")
        .join(name)
}

fn run_check(files: &[PathBuf]) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = check(files, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn run_eval(policies: &[PathBuf], request: &Path, stdin: &str) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = eval(policies, request, &mut stdin.as_bytes(), &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn check_accepts_valid_files_and_prints_every_error_with_position_and_hint() {
    let dir = tempdir();
    let bad = dir.path().join("bad.policy");
    std::fs::write(&bad, "/CN=a:\n&(count == 4)\n&(colour = red)\n").unwrap();
    let good = vec![
        shipped("paper-example.policy"),
        shipped("site.policy"),
        shipped("vo-demo.policy"),
    ];
    let (code, out, err) = run_check(&good);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("paper-example.policy: ok (3 statements, 5 assertion sets)"),
        "{out}"
    );
    assert_eq!(check_main(&good), 0);

    let (code, _, err) = run_check(&[good[0].clone(), bad.clone()]);
    assert_eq!(code, 2);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:2:9: unknown operator '==' (hint: ",
            bad.display()
        )),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{}:3:3: unknown attribute 'colour' (hint: ",
            bad.display()
        )),
        "{err}"
    );
    assert_eq!(check_main(&[bad]), 2);
    let (code, _, err) = run_check(&[dir.path().join("missing.policy")]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read policy file"), "{err}");
}

#[test]
fn eval_prints_the_decision_and_exits_by_it() {
    let dir = tempdir();
    let paper = shipped("paper-example.policy");
    let req = dir.path().join("req.json");
    std::fs::write(
        &req,
        r#"{"identity": "/O=Grid/O=Globus/OU=mcs.anl.gov/CN= Bo Liu", "action": "start",
            "attributes": {"executable": "test1", "directory": "/sandbox/test", "jobtag": "ADS", "count": 3}}"#,
    )
    .unwrap();
    let (code, out, err) = run_eval(std::slice::from_ref(&paper), &req, "");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(r#"{"decision":"permit","reason":"start granted by "#),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["matched"][0], format!("{}:8", paper.display()));
    assert_eq!(eval_main(std::slice::from_ref(&paper), &req), 0);

    // From stdin; count 4 is denied.
    let deny = r#"{"identity": "/O=Grid/O=Globus/OU=mcs.anl.gov/CN= Bo Liu", "action": "start",
        "attributes": {"executable": "test1", "directory": "/sandbox/test", "jobtag": "ADS", "count": "4"}}"#;
    let (code, out, _) = run_eval(std::slice::from_ref(&paper), Path::new("-"), deny);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["decision"], "deny");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("(count < 4) fails (count = 4)"),
        "{out}"
    );

    // The manager cancels Bo Liu's NFC job.
    let cancel = r#"{"identity": "/O=Grid/O=GlobusOU=mcs.anl.gov/CN= KateKeahey", "action": "cancel",
        "jobowner": "/O=Grid/O=Globus/OU=mcs.anl.gov/CN= Bo Liu", "attributes": {"jobtag": "NFC"}}"#;
    assert_eq!(
        run_eval(std::slice::from_ref(&paper), Path::new("-"), cancel).0,
        0
    );
}

#[test]
fn eval_rejects_bad_requests_and_bad_policies_with_exit_2() {
    let paper = shipped("paper-example.policy");
    for (request, expect) in [
        ("not json", "not valid JSON"),
        (
            r#"{"identity": "/CN=a", "action": "stop"}"#,
            "action 'stop' is unknown",
        ),
        (
            r#"{"identity": "/CN=a", "action": "start", "attributes": {"colour": "red"}}"#,
            "'colour' is unknown",
        ),
        (
            r#"{"identity": "/CN=a", "action": "start", "attributes": {"count": "many"}}"#,
            "count = 'many' is not a number",
        ),
        (
            r#"{"identity": "/CN=a", "action": "start", "attributes": {"action": "start"}}"#,
            "own field",
        ),
        (
            r#"{"identity": "", "action": "start"}"#,
            "identity is empty",
        ),
    ] {
        let (code, out, err) = run_eval(std::slice::from_ref(&paper), Path::new("-"), request);
        assert_eq!(code, 2, "{request}: {out}{err}");
        assert!(err.contains(expect), "{request}: {err}");
    }
    let dir = tempdir();
    let bad = dir.path().join("bad.policy");
    std::fs::write(&bad, "/CN=a:\n&(action = begin)\n").unwrap();
    let ok = r#"{"identity": "/CN=a", "action": "start"}"#;
    let (code, _, err) = run_eval(&[paper, bad.clone()], Path::new("-"), ok);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{}:2:12: unknown action 'begin'", bad.display())),
        "{err}"
    );
    assert_eq!(eval_main(&[bad], &dir.path().join("missing.json")), 2);
}

#[test]
fn eval_with_site_and_vo_policies_needs_both() {
    let (site, vo) = (shipped("site.policy"), shipped("vo-demo.policy"));
    let req = |cores: u32| {
        format!(
            r#"{{"identity": "/DC=org/DC=mupilot-demo/CN=bob", "action": "start",
               "attributes": {{"executable": "sim", "vo": "demo", "fqan": ["/demo"], "cores": {cores},
               "count": {cores}, "memory": "2G", "walltime": 3600}}}}"#
        )
    };
    assert_eq!(
        run_eval(&[site.clone(), vo.clone()], Path::new("-"), &req(4)).0,
        0
    );
    // 6 cores: the site allows 8, the VO only 4.
    let (code, out, _) = run_eval(&[site.clone(), vo.clone()], Path::new("-"), &req(6));
    assert_eq!(code, 3);
    assert!(out.contains("denied by"), "{out}");
    assert!(out.contains("vo-demo.policy"), "{out}");
    assert_eq!(run_eval(&[site], Path::new("-"), &req(6)).0, 0);
}

fn envelope(dn: &str, fqans: &[&str], jobtag: Option<&str>, cores: u32) -> EnvelopeBody {
    EnvelopeBody {
        version: mupilot::protocol::envelope::ENVELOPE_VERSION,
        payload_id: "p1".into(),
        owner: Owner {
            dn: dn.into(),
            vo: "demo".into(),
            fqans: fqans.iter().map(|s| s.to_string()).collect(),
            membership_valid_until: Utc::now(),
        },
        jobtag: jobtag.map(str::to_string),
        argv: vec!["/cvmfs/demo/bin/sim".into(), "--fast".into()],
        env: Default::default(),
        bundle_sha256: None,
        resources: Resources {
            cores,
            memory_bytes: 2 << 30,
            walltime_seconds: 3600,
        },
        outputs: vec![],
        not_before: Utc::now(),
        not_after: Utc::now(),
        node: "wn01".into(),
        pilot_id: "pilot-1".into(),
        nonce: "n".into(),
        issuer: String::new(),
        credential: None,
    }
}

#[test]
fn site_and_vo_stack_with_envelope_requests() {
    let stack = PolicyStack::new()
        .with_file("site", shipped("site.policy"))
        .unwrap()
        .with_file("vo demo", shipped("vo-demo.policy"))
        .unwrap();
    let bob = "/DC=org/DC=mupilot-demo/CN=bob";
    let alice = "/DC=org/DC=mupilot-demo/CN=alice";
    let r = Request::for_launch(&envelope(bob, &["/demo"], None, 2));
    assert_eq!(r.attributes[&Attr::Executable], vec!["sim".to_string()]);
    assert_eq!(
        r.attributes[&Attr::Directory],
        vec!["/cvmfs/demo/bin".to_string()]
    );
    let d = stack.decide(&r);
    assert!(d.is_permit(), "{d:?}");
    assert_eq!(
        d.matched.len(),
        4,
        "grant + requirement from each source: {:?}",
        d.matched
    );

    // The VO requires the production group for jobtag prod; the site does not care.
    let prod = Request::for_launch(&envelope(bob, &["/demo"], Some("prod"), 2));
    let d = stack.decide(&prod);
    assert!(!d.is_permit());
    assert!(
        d.reason
            .starts_with("denied by vo demo policy: requirement"),
        "{}",
        d.reason
    );
    assert!(stack
        .decide(&Request::for_launch(&envelope(
            bob,
            &["/demo", "/demo/prod"],
            Some("prod"),
            2
        )))
        .is_permit());

    // The site reserves the express queue.
    let d = stack.decide(&r.clone().with(Attr::Queue, "express"));
    assert!(
        !d.is_permit() && d.reason.starts_with("denied by site policy"),
        "{}",
        d.reason
    );

    // Management: alice may cancel bob's prod payload, not his untagged one; bob his own.
    let cancel = |who: &str, tag: Option<&str>| {
        let mut r = Request::new(who, Action::Cancel).owned_by(bob);
        if let Some(t) = tag {
            r = r.with(Attr::Jobtag, t);
        }
        r
    };
    // The site only lets owners manage their payloads; the VO's delegation alone is not enough.
    assert!(!stack.decide(&cancel(alice, Some("prod"))).is_permit());
    assert!(stack.decide(&cancel(bob, None)).is_permit());
    let site_with_ops = Policy::parse(
        "site-ops.policy",
        "/DC=org/DC=mupilot-demo:\n&(action = cancel signal information)\n",
    )
    .unwrap();
    let vo = Policy::load(&shipped("vo-demo.policy")).unwrap();
    let delegated = PolicyStack::new()
        .with_policy("site", site_with_ops)
        .with_policy("vo demo", vo);
    assert!(delegated.decide(&cancel(alice, Some("prod"))).is_permit());
    assert!(!delegated.decide(&cancel(alice, None)).is_permit());

    // An empty stack never permits.
    assert!(!PolicyStack::new().decide(&r).is_permit());
}

#[test]
fn combine_requires_every_source() {
    let permit = Decision::permit("ok", vec!["a:1".into()]);
    let deny = Decision::deny("no");
    assert!(combine(&[("site", permit.clone()), ("vo", permit.clone())]).is_permit());
    let d = combine(&[("site", permit.clone()), ("vo", deny)]);
    assert!(!d.is_permit());
    assert_eq!(d.reason, "denied by vo policy: no");
    assert!(!combine(&[]).is_permit());
    let broken = combine(&[
        ("site", Decision::unusable("site.policy broken")),
        ("vo", permit),
    ]);
    assert_eq!(broken.verdict, Verdict::Deny(DenyClass::Unusable));
    assert_eq!(d.verdict, Verdict::Deny(DenyClass::Policy));
}
