//! The payload's environment (run as root). Its own test binary: it sets variables in this
//! process's environment, which must not race with other threads reading it.

mod sandbox_support;

use sandbox_support::{plan, run, settings, ScratchRoot, TestUser};

#[test]
fn environment_is_clean() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("env");
    let s = settings(&root.0);
    std::env::set_var("MUPILOT_TEST_SBX_SECRET", "leak");
    std::env::set_var("LANG", "C.UTF-8");
    let mut p = plan("env", &u.account, &["/usr/bin/env"]);
    p.env.insert("MY_JOB_VAR".into(), "42".into());
    p.cores = 2;
    let id = p.payload_id.clone();
    let scratch = root.0.join(&id);
    let (o, out) = run(&s, p);
    assert_eq!(o.exit_code, Some(0), "{out}");
    let env: std::collections::BTreeMap<&str, &str> =
        out.lines().filter_map(|l| l.split_once('=')).collect();
    let mut want = std::collections::BTreeMap::new();
    let sc = scratch.display().to_string();
    for (k, v) in [
        ("LANG", "C.UTF-8"),
        ("MY_JOB_VAR", "42"),
        ("HOME", sc.as_str()),
        ("TMPDIR", "/tmp"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("USER", "mpt-sbx-a"),
        ("LOGNAME", "mpt-sbx-a"),
        ("MUPILOT_PAYLOAD_ID", id.as_str()),
        ("OMP_NUM_THREADS", "2"),
        ("MKL_NUM_THREADS", "2"),
        ("OPENBLAS_NUM_THREADS", "2"),
        ("NUMEXPR_NUM_THREADS", "2"),
        ("GOMAXPROCS", "2"),
    ] {
        want.insert(k, v);
    }
    assert_eq!(env, want);
}
