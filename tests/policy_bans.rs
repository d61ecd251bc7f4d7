//! Ban lists and live reloading: the formats, reasons naming file and line, a changed file
//! taking effect without a restart, and fail-closed behaviour when a changed file is broken.
//! Uses real files in a temporary directory; runs as any user.

use std::path::Path;

use mupilot::policy::bans::append_dn;
use mupilot::policy::{
    Action, Attr, BanDenial, BanWriteError, Bans, DenyClass, DnBans, FqanBans, PolicyStack,
    Request, Verdict, VoBans,
};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mupilot-test-pol-")
        .tempdir()
        .expect("temp dir")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write test file");
}

#[test]
fn dn_list_is_the_lcas_format() {
    let list = DnBans::parse(
        "ban_users.db",
        "# banned\n\n\"/DC=org/CN=Mallory\"\n  \"/DC=org/CN=Eve Smith\"  # with a comment\n",
    )
    .unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list.find("/DC=org/CN=Mallory"),
        Some(("/DC=org/CN=Mallory", 3))
    );
    assert_eq!(
        list.find("/DC=org/CN=Eve Smith"),
        Some(("/DC=org/CN=Eve Smith", 4))
    );
    assert_eq!(
        list.find("/DC=org/CN=Mallory2"),
        None,
        "DNs compare exactly"
    );

    let e = DnBans::parse("ban_users.db", "\"/DC=org/CN=a\"\n/DC=org/CN=b\n").unwrap_err();
    assert_eq!((e.line, e.column), (2, 1));
    assert!(
        e.to_string()
            .starts_with("ban_users.db:2:1: DN is not in double quotes (hint: "),
        "{e}"
    );
    let e = DnBans::parse("ban_users.db", "  \"/DC=org/CN=a\n").unwrap_err();
    assert_eq!((e.line, e.column), (1, 3));
    let e = DnBans::parse("ban_users.db", "\"/DC=org/CN=a\" trailing\n").unwrap_err();
    assert_eq!((e.line, e.column), (1, 16));
    let e = DnBans::parse("ban_users.db", "\"CN=a\"\n").unwrap_err();
    assert!(e.to_string().contains("not a valid DN"), "{e}");
}

#[test]
fn fqan_and_vo_lists() {
    let fq = FqanBans::parse("fq.db", "/demo/bad\n\"/demo/Role=pilot\"\n").unwrap();
    assert_eq!(fq.find("/demo/bad"), Some(("/demo/bad", 1)));
    assert_eq!(
        fq.find("/demo/bad/Role=NULL/Capability=NULL"),
        Some(("/demo/bad", 1))
    );
    assert_eq!(
        fq.find("/demo/Role=pilot/Capability=NULL"),
        Some(("/demo/Role=pilot", 2))
    );
    assert_eq!(fq.find("/demo/badger"), None);
    assert_eq!(fq.find("/demo"), None);
    let e = FqanBans::parse("fq.db", "demo/bad\n").unwrap_err();
    assert_eq!((e.line, e.column), (1, 1));

    let vo = VoBans::parse("vo.db", "# vos\nretired\n\"/old-vo\"\n").unwrap();
    assert_eq!(vo.find("retired"), Some(("retired", 2)));
    assert_eq!(vo.find("/old-vo"), Some(("old-vo", 3)));
    assert_eq!(vo.find("demo"), None);
    assert!(VoBans::parse("vo.db", "bad vo name\n").is_err());
}

#[test]
fn check_names_the_file_and_line() {
    let dir = tempdir();
    let (dn, fq, vo) = (
        dir.path().join("ban_users.db"),
        dir.path().join("fq.db"),
        dir.path().join("vo.db"),
    );
    write(&dn, "# list\n\"/DC=org/CN=mallory\"\n");
    write(&fq, "/demo/suspended\n");
    write(&vo, "retired\n");
    let bans = Bans::new()
        .with_dn_file(&dn)
        .unwrap()
        .with_fqan_file(&fq)
        .unwrap()
        .with_vo_file(&vo)
        .unwrap();
    let none: Vec<String> = Vec::new();
    assert_eq!(
        bans.check("/DC=org/CN=alice", &["/demo".to_string()], "demo"),
        None
    );

    let d = bans
        .check("/DC=org/CN=mallory", &none, "demo")
        .expect("banned DN");
    assert!(matches!(d, BanDenial::Banned { .. }), "{d:?}");
    assert_eq!(
        d.reason(),
        format!("DN '/DC=org/CN=mallory' is banned at {}:2", dn.display())
    );
    let d = bans
        .check(
            "/DC=org/CN=alice",
            &["/demo".into(), "/demo/suspended/Role=NULL".into()],
            "demo",
        )
        .expect("banned group");
    assert_eq!(
        d.reason(),
        format!(
            "FQAN '/demo/suspended/Role=NULL' is banned by '/demo/suspended' at {}:1",
            fq.display()
        )
    );
    let d = bans
        .check("/DC=org/CN=alice", &none, "retired")
        .expect("banned VO");
    assert_eq!(
        d.reason(),
        format!("VO 'retired' is banned at {}:1", vo.display())
    );
}

#[test]
fn a_changed_ban_list_takes_effect_without_restart() {
    let dir = tempdir();
    let dn = dir.path().join("ban_users.db");
    write(&dn, "\"/DC=org/CN=aaaaa\"\n");
    let bans = Bans::new().with_dn_file(&dn).unwrap();
    assert!(bans.check("/DC=org/CN=bbbbb", &[], "demo").is_none());
    // Rewritten in place with the same size, within the same second: still seen.
    write(&dn, "\"/DC=org/CN=bbbbb\"\n");
    let d = bans
        .check("/DC=org/CN=bbbbb", &[], "demo")
        .expect("new ban seen at once");
    assert!(d.reason().ends_with("ban_users.db:1"), "{}", d.reason());
    assert!(
        bans.check("/DC=org/CN=aaaaa", &[], "demo").is_none(),
        "old ban lifted"
    );
    // Replaced by rename (a new inode), as editors and config management do.
    let tmp = dir.path().join("ban_users.db.new");
    write(&tmp, "# lifted\n");
    std::fs::rename(&tmp, &dn).unwrap();
    assert!(bans.check("/DC=org/CN=bbbbb", &[], "demo").is_none());
}

/// The writer `audit kill --ban` uses writes what the parser reads back, into a list the
/// helper follows; a DN it could not write as one entry is refused and the file left as it was.
#[test]
fn an_appended_dn_is_read_back_by_the_parser_and_banned_at_once() {
    let dir = tempdir();
    let dn = dir.path().join("ban_users.db");
    write(&dn, "# site bans\n\"/DC=org/CN=Mallory\"\n");
    let bans = Bans::new().with_dn_file(&dn).unwrap();
    let eve = "/DC=org/DC=example/CN=Eve Smith/CN=12345";
    assert!(bans.check(eve, &[], "demo").is_none());
    append_dn(&dn, eve).unwrap();
    let d = bans.check(eve, &[], "demo").expect("banned at once");
    assert!(d.reason().ends_with("ban_users.db:3"), "{}", d.reason());
    let text = std::fs::read_to_string(&dn).unwrap();
    let list = DnBans::parse("ban_users.db", &text).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list.find(eve), Some((eve, 3)));

    for bad in ["/CN=a\"b", "/CN=a\n\"/CN=b"] {
        let e = append_dn(&dn, bad).unwrap_err();
        assert!(matches!(e, BanWriteError::Unquotable { .. }), "{e}");
        assert!(e.to_string().contains("quotes and newlines"), "{e}");
    }
    assert_eq!(
        std::fs::read_to_string(&dn).unwrap(),
        text,
        "file untouched"
    );

    // A list an editor left without a final newline: the entry gets a line of its own.
    write(&dn, "\"/DC=org/CN=Mallory\"");
    append_dn(&dn, eve).unwrap();
    let text = std::fs::read_to_string(&dn).unwrap();
    assert_eq!(text, format!("\"/DC=org/CN=Mallory\"\n\"{eve}\"\n"));
    let d = bans.check(eve, &[], "demo").expect("still a valid list");
    assert!(d.reason().ends_with("ban_users.db:2"), "{}", d.reason());
    // An empty list takes the entry as its first line.
    write(&dn, "");
    append_dn(&dn, eve).unwrap();
    assert_eq!(
        std::fs::read_to_string(&dn).unwrap(),
        format!("\"{eve}\"\n")
    );

    let missing = dir.path().join("none.db");
    let e = append_dn(&missing, eve).unwrap_err();
    assert!(e.to_string().contains("none.db"), "{e}");
    assert!(!missing.exists(), "the writer never creates a list");
}

#[test]
fn a_broken_or_missing_ban_list_refuses_everything_until_fixed() {
    let dir = tempdir();
    let dn = dir.path().join("ban_users.db");
    write(&dn, "\"/DC=org/CN=mallory\"\n");
    let bans = Bans::new().with_dn_file(&dn).unwrap();
    assert!(bans.check("/DC=org/CN=alice", &[], "demo").is_none());

    write(&dn, "\"/DC=org/CN=mallory\"\n/DC=org/CN=unquoted\n");
    for _ in 0..2 {
        let d = bans
            .check("/DC=org/CN=alice", &[], "demo")
            .expect("fail closed");
        assert!(matches!(d, BanDenial::Unusable { .. }), "{d:?}");
        assert!(
            d.reason().contains("does not load after its last change"),
            "{}",
            d.reason()
        );
        assert!(
            d.reason()
                .contains("ban_users.db:2:1: DN is not in double quotes"),
            "{}",
            d.reason()
        );
    }
    write(&dn, "\"/DC=org/CN=mallory\"\n\"/DC=org/CN=quoted\"\n");
    assert!(
        bans.check("/DC=org/CN=alice", &[], "demo").is_none(),
        "fixed file is used again"
    );

    std::fs::remove_file(&dn).unwrap();
    let d = bans
        .check("/DC=org/CN=alice", &[], "demo")
        .expect("missing file refuses");
    assert!(
        matches!(d, BanDenial::Unusable { .. }) && d.reason().contains("cannot read"),
        "{d}"
    );
    // A list that does not load at startup is a configuration error.
    assert!(Bans::new().with_dn_file(&dn).is_err());
}

#[test]
fn a_changed_policy_file_takes_effect_and_a_broken_one_denies() {
    let dir = tempdir();
    let site = dir.path().join("site.policy");
    write(&site, "/DC=org:\n&(action = start)(count <= 4)\n");
    let stack = PolicyStack::new().with_file("site", &site).unwrap();
    let r = Request::new("/DC=org/CN=alice", Action::Start).with(Attr::Count, 8);
    assert!(!stack.decide(&r).is_permit());
    write(&site, "/DC=org:\n&(action = start)(count <= 8)\n");
    let d = stack.decide(&r);
    assert!(d.is_permit(), "{d:?}");
    write(&site, "/DC=org:\n&(action = start)(count <= eight)\n");
    let d = stack.decide(&r);
    assert_eq!(d.verdict, Verdict::Deny(DenyClass::Unusable), "{d:?}");
    assert!(d.reason.contains("site.policy:2:"), "{}", d.reason);
    write(&site, "/DC=org:\n&(action = start)(count <= 16)\n");
    assert!(stack.decide(&r).is_permit());
}
