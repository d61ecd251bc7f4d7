//! The payload sandbox against the real kernel (run as root): identity, scratch, namespaces,
//! capabilities, cleanup of leftover processes, limits, outputs, bundle, environment, fds.

mod sandbox_support;

use sandbox_support::{run, settings, plan, ScratchRoot, TestUser};

#[test]
fn identity_and_scratch() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("ident");
    let s = settings(&root.0);
    let p = plan(
        "ident",
        &u.account,
        &["sh", "-c", "id -u; id -G; pwd; stat -c '%a %u %g' ."],
    );
    let scratch = root.0.join(&p.payload_id);
    let (o, out) = run(&s, p);
    assert_eq!(o.exit_code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], u.account.uid.to_string(), "{out}");
    let mut want: Vec<u32> = u.account.groups.clone();
    want.push(u.account.gid);
    let got: Vec<u32> = lines[1].split_whitespace().map(|g| g.parse().unwrap()).collect();
    assert_eq!(got[0], u.account.gid);
    let (mut a, mut b) = (got.clone(), want.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(lines[2], scratch.display().to_string());
    assert_eq!(lines[3], format!("700 {} {}", u.account.uid, u.account.gid));
    assert!(!scratch.exists(), "scratch removed after wait");
}
