//! The policy language: the paper's example evaluated as the paper describes it, the semantics
//! of NULL, SELF, value lists, numbers and requirements, and one precise error per kind of
//! malformed policy. Pure logic: runs as any user.

use std::path::{Path, PathBuf};

use mupilot::policy::{Action, Attr, Decision, Policy, PolicyError, Request};

const BO: &str = "/O=Grid/O=Globus/OU=mcs.anl.gov/CN= Bo Liu";
/// As printed in the paper (no '/' before OU).
const KATE: &str = "/O=Grid/O=GlobusOU=mcs.anl.gov/CN= KateKeahey";

fn paper_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/paper-example.policy")
}

fn paper() -> Policy {
    Policy::load(&paper_path()).expect("the paper's example policy parses")
}

fn start(who: &str, exe: &str, dir: &str, tag: Option<&str>, count: u32) -> Request {
    let mut r = Request::new(who, Action::Start)
        .with(Attr::Executable, exe)
        .with(Attr::Directory, dir)
        .with(Attr::Count, count);
    if let Some(t) = tag {
        r = r.with(Attr::Jobtag, t);
    }
    r
}

fn loc(line: u32) -> String {
    format!("{}:{}", paper_path().display(), line)
}

#[test]
fn paper_member_may_start_test1_with_ads_and_count_3() {
    let d = paper().decide(&start(BO, "test1", "/sandbox/test", Some("ADS"), 3));
    assert!(d.is_permit(), "{d:?}");
    // The granting set (line 8) and the satisfied requirement (line 5).
    assert_eq!(d.matched, vec![loc(8), loc(5)]);
}

#[test]
fn paper_member_may_start_test2_only_with_nfc() {
    let p = paper();
    assert!(p
        .decide(&start(BO, "test2", "/sandbox/test", Some("NFC"), 1))
        .is_permit());
    assert!(!p
        .decide(&start(BO, "test2", "/sandbox/test", Some("ADS"), 1))
        .is_permit());
    assert!(!p
        .decide(&start(BO, "test1", "/sandbox/test", Some("NFC"), 1))
        .is_permit());
}

#[test]
fn paper_member_may_not_use_count_4() {
    let d = paper().decide(&start(BO, "test1", "/sandbox/test", Some("ADS"), 4));
    assert!(!d.is_permit());
    assert!(
        d.reason.contains("(count < 4) fails (count = 4)"),
        "{}",
        d.reason
    );
    assert_eq!(d.matched, vec![loc(8), loc(9)]);
}

#[test]
fn paper_member_may_not_start_another_executable_or_directory() {
    let p = paper();
    let d = p.decide(&start(BO, "rm", "/sandbox/test", Some("ADS"), 1));
    assert!(!d.is_permit());
    assert!(
        d.reason
            .contains("(executable = test1) fails (executable = rm)"),
        "{}",
        d.reason
    );
    assert!(!p
        .decide(&start(BO, "test1", "/usr/bin", Some("ADS"), 1))
        .is_permit());
}

#[test]
fn paper_start_without_jobtag_fails_the_group_requirement() {
    let d = paper().decide(&start(BO, "test1", "/sandbox/test", None, 3));
    assert!(!d.is_permit());
    assert!(
        d.reason
            .starts_with("requirement for '/O=Grid/O=Globus/OU=mcs.anl.gov'"),
        "{}",
        d.reason
    );
    assert!(
        d.reason
            .contains("(jobtag != NULL) fails (jobtag is absent)"),
        "{}",
        d.reason
    );
    assert_eq!(d.matched, vec![loc(5)]);
    // An empty jobtag is no jobtag.
    assert!(!paper()
        .decide(&start(BO, "test1", "/sandbox/test", Some(""), 3))
        .is_permit());
}

#[test]
fn paper_requirement_applies_only_to_start() {
    // Bo Liu has no cancel grant: denied by default, not by the start-only requirement.
    let d = paper().decide(
        &Request::new(BO, Action::Cancel)
            .owned_by(BO)
            .with(Attr::Jobtag, "ADS"),
    );
    assert!(!d.is_permit());
    assert!(d.reason.contains("no grant set"), "{}", d.reason);
}

#[test]
fn paper_manager_may_cancel_nfc_jobs_of_others_but_not_ads() {
    let p = paper();
    let nfc = Request::new(KATE, Action::Cancel)
        .owned_by(BO)
        .with(Attr::Jobtag, "NFC");
    let d = p.decide(&nfc);
    assert!(d.is_permit(), "{d:?}");
    assert_eq!(d.matched, vec![loc(13)]);
    let ads = Request::new(KATE, Action::Cancel)
        .owned_by(BO)
        .with(Attr::Jobtag, "ADS");
    let d = p.decide(&ads);
    assert!(!d.is_permit());
    assert!(
        d.reason.contains("(jobtag = NFC) fails (jobtag = ADS)"),
        "{}",
        d.reason
    );
    // Cancelling is not signalling.
    let sig = Request::new(KATE, Action::Signal)
        .owned_by(BO)
        .with(Attr::Jobtag, "NFC");
    assert!(!p.decide(&sig).is_permit());
}

#[test]
fn paper_manager_may_start_transp() {
    let p = paper();
    assert!(p
        .decide(&start(KATE, "TRANSP", "/sandbox/test", Some("NFC"), 64))
        .is_permit());
    assert!(!p
        .decide(&start(KATE, "test1", "/sandbox/test", Some("NFC"), 1))
        .is_permit());
}

#[test]
fn paper_identities_are_prefixes_at_component_boundaries() {
    let p = paper();
    // Another member of the group: covered by the requirement, granted nothing.
    let other = "/O=Grid/O=Globus/OU=mcs.anl.gov/CN=Somebody Else";
    let d = p.decide(&start(other, "test1", "/sandbox/test", Some("ADS"), 1));
    assert!(!d.is_permit());
    assert!(d.reason.contains("default deny"), "{}", d.reason);
    // A longer CN is another person; a proxy of Bo Liu (/CN=...) is Bo Liu.
    assert!(!p
        .decide(&start(
            &format!("{BO}2"),
            "test1",
            "/sandbox/test",
            Some("ADS"),
            1
        ))
        .is_permit());
    assert!(p
        .decide(&start(
            &format!("{BO}/CN=123456"),
            "test1",
            "/sandbox/test",
            Some("ADS"),
            1
        ))
        .is_permit());
    // A look-alike organisation is not under the requirement's prefix.
    let p2 = Policy::parse(
        "t",
        "&/O=Grid/OU=mcs.anl.gov:\n(action = start)(jobtag != NULL)\n/:\n&(action = start)\n",
    )
    .unwrap();
    assert!(p2
        .decide(&Request::new(
            "/O=Grid/OU=mcs.anl.gov.evil/CN=x",
            Action::Start
        ))
        .is_permit());
    assert!(!p2
        .decide(&Request::new("/O=Grid/OU=mcs.anl.gov/CN=x", Action::Start))
        .is_permit());
}

fn decide(policy: &str, r: &Request) -> Decision {
    Policy::parse("t.policy", policy)
        .unwrap_or_else(|e| panic!("{e}"))
        .decide(r)
}

#[test]
fn null_self_lists_numbers_and_multivalued_attributes() {
    let p = "/DC=org:\n\
             &(action = start)(queue = NULL)(executable = sim reco)(memory <= 2G)(walltime < 1h)(fqan = /vo/prod)\n\
             &(action = cancel signal)(jobowner = SELF)\n\
             &(action = information)(jobowner != SELF)(queue != express)\n";
    let me = "/DC=org/CN=me";
    let ok = Request::new(me, Action::Start)
        .with(Attr::Executable, "reco")
        .with(Attr::Memory, 2u64 << 30)
        .with(Attr::Walltime, 3599)
        .add(Attr::Fqan, "/vo")
        .add(Attr::Fqan, "/vo/prod");
    assert!(decide(p, &ok).is_permit());
    assert!(
        !decide(p, &ok.clone().with(Attr::Queue, "long")).is_permit(),
        "(queue = NULL) means absent"
    );
    assert!(!decide(p, &ok.clone().with(Attr::Executable, "bash")).is_permit());
    assert!(!decide(p, &ok.clone().with(Attr::Memory, (2u64 << 30) + 1)).is_permit());
    assert!(!decide(p, &ok.clone().with(Attr::Walltime, 3600)).is_permit());
    assert!(!decide(p, &ok.clone().with(Attr::Fqan, "/vo")).is_permit());
    // SELF: the owner may cancel, somebody else may not.
    let mine = Request::new(me, Action::Cancel).owned_by(me);
    assert!(decide(p, &mine).is_permit());
    assert!(!decide(
        p,
        &Request::new(me, Action::Cancel).owned_by("/DC=org/CN=other")
    )
    .is_permit());
    // A management request without a known owner does not satisfy SELF.
    assert!(!decide(p, &Request::new(me, Action::Signal)).is_permit());
    // != SELF, != value on an absent attribute holds.
    let info = Request::new(me, Action::Information).owned_by("/DC=org/CN=other");
    assert!(decide(p, &info).is_permit());
    assert!(!decide(p, &info.clone().with(Attr::Queue, "express")).is_permit());
}

#[test]
fn requirement_sets_are_alternatives_for_the_action_they_name() {
    let p = "&/DC=org:\n\
             &(action = start)(jobtag != prod)\n\
             &(action = start)(jobtag = prod)(fqan = /vo/prod)\n\
             /DC=org:\n\
             &(count >= 1)\n";
    let r = Request::new("/DC=org/CN=a", Action::Start).with(Attr::Count, 2);
    assert!(decide(p, &r).is_permit(), "no jobtag: first alternative");
    assert!(!decide(p, &r.clone().with(Attr::Jobtag, "prod")).is_permit());
    assert!(decide(
        p,
        &r.clone()
            .with(Attr::Jobtag, "prod")
            .add(Attr::Fqan, "/vo/prod")
    )
    .is_permit());
    // The requirement does not apply to cancel; the grant (no action assertion) covers it.
    let c = Request::new("/DC=org/CN=a", Action::Cancel)
        .with(Attr::Count, 1)
        .with(Attr::Jobtag, "prod");
    assert!(decide(p, &c).is_permit());
}

#[test]
fn syntax_variants_are_accepted() {
    let p = "# comment\n\
             \"/DC=org/CN=host:8443\": # quoted identity holding ':'\n\
             &(ACTION = start) # a set spanning lines\n\
             \x20  (Executable = \"my prog\")(group = /vo)\n\
             /DC=org/CN=b: &(action=start)(count=1 2) &(action = cancel)\n";
    let pol = Policy::parse("v.policy", p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pol.statements().len(), 2);
    assert_eq!(pol.statements()[0].sets.len(), 1);
    assert_eq!(pol.statements()[0].sets[0].assertions.len(), 3);
    assert_eq!(pol.statements()[1].sets.len(), 2);
    let r = Request::new("/DC=org/CN=host:8443", Action::Start)
        .with(Attr::Executable, "my prog")
        .add(Attr::Fqan, "/vo");
    assert!(pol.decide(&r).is_permit());
    let b = Request::new("/DC=org/CN=b", Action::Start).with(Attr::Count, 2);
    assert!(pol.decide(&b).is_permit());
    assert!(!pol.decide(&b.clone().with(Attr::Count, 3)).is_permit());
}

/// One malformed policy per error kind: (text, kind code, line, column).
const MALFORMED: &[(&str, &str, u32, u32)] = &[
    (
        "/CN=a:\n&(action = start)(count < 4\n",
        "unterminated-assertion",
        2,
        18,
    ),
    (
        "/CN=a:\n&(executable = \"a b)\n",
        "unterminated-quote",
        2,
        16,
    ),
    ("/CN=a:\n&(count == 4)\n", "unknown-operator", 2, 9),
    ("/CN=a:\n&(count 4)\n", "missing-operator", 2, 9),
    ("/CN=a:\n&(jobtag = )\n", "missing-value", 2, 12),
    ("/CN=a:\n&(colour = red)\n", "unknown-attribute", 2, 3),
    ("/CN=a:\n&(= 4)\n", "missing-attribute", 2, 3),
    ("/CN=a:\n&(action = stop)\n", "unknown-action", 2, 12),
    ("/CN=a:\n&(count < four)\n", "bad-number", 2, 11),
    ("/CN=a:\n&(memory <= 4X)\n", "bad-number", 2, 13),
    (
        "# c\n  &(action = start)\n",
        "statement-without-identity",
        2,
        3,
    ),
    ("/CN=a\n&(action = start)\n", "missing-colon", 1, 6),
    (
        "/CN=a:\n&(action = start)\n&\n/CN=b:\n&(action = start)\n",
        "empty-assertion-set",
        3,
        1,
    ),
    ("/CN=a:\n&()\n", "empty-assertion", 2, 2),
    (
        "/CN=a:\n&(executable < x)\n",
        "ordering-on-non-numeric",
        2,
        14,
    ),
    (
        "/CN=a:\n&(count < 1 2)\n",
        "ordering-with-several-values",
        2,
        9,
    ),
    ("/CN=a:\n&(jobtag = SELF)\n", "self-outside-jobowner", 2, 12),
    (
        "/CN=a:\n&(jobtag = NULL x)\n",
        "special-value-in-list",
        2,
        12,
    ),
    (":\n&(action = start)\n", "empty-identity", 1, 1),
    (
        "/CN=a:\n/CN=b:\n&(action = start)\n",
        "statement-without-sets",
        1,
        1,
    ),
    ("/CN=a:\n&(action = start) foo\n", "unexpected-text", 2, 19),
];

#[test]
fn each_malformed_policy_gives_its_own_precise_error() {
    for (text, code, line, column) in MALFORMED {
        let errors = match Policy::parse("bad.policy", text) {
            Ok(_) => panic!("accepted malformed policy {text:?}"),
            Err(PolicyError::Parse(errors)) => errors,
            Err(e) => panic!("unexpected {e}"),
        };
        let first = &errors[0];
        assert_eq!(
            (first.kind.code(), first.line, first.column),
            (*code, *line, *column),
            "for {text:?}: {first}"
        );
        let shown = first.to_string();
        assert!(
            shown.starts_with(&format!("bad.policy:{line}:{column}: ")),
            "{shown}"
        );
        assert!(shown.contains("(hint: "), "{shown}");
    }
}

#[test]
fn every_error_in_a_file_is_reported() {
    let text = "/CN=a:\n&(colour = red)\n&(count == 1)\n(action = stop)\n";
    let Err(PolicyError::Parse(errors)) = Policy::parse("many.policy", text) else {
        panic!("accepted")
    };
    let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.kind.code(), e.line)).collect();
    assert_eq!(
        got,
        vec![
            ("unknown-attribute", 2),
            ("unknown-operator", 3),
            ("unknown-action", 4)
        ]
    );
}

#[test]
fn the_shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    for name in ["paper-example.policy", "site.policy", "vo-demo.policy"] {
        Policy::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
    }
}
