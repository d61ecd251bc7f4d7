//! The lease directory's rules on temporary gridmapdirs (no real accounts: the quarantine is
//! recorded and pool groups are injected).

use super::*;
use std::path::Path;
use std::sync::Mutex;

struct Recorder(Mutex<Vec<String>>);
impl Quarantine for Recorder {
    fn clean(&self, account: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(account.to_string());
        Ok(())
    }
}

fn pool(n: usize, ttl: Duration) -> (tempfile::TempDir, Gridmapdir) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("gridmapdir");
    fs::create_dir(&dir).unwrap();
    for i in 1..=n {
        File::create(dir.join(format!("pool{i:03}"))).unwrap();
    }
    let g = Gridmapdir::new(&dir, &t.path().join("state"), ttl).unwrap();
    (t, g)
}

#[test]
fn same_owner_keeps_its_account_others_get_others() {
    let (_t, g) = pool(2, Duration::from_secs(3600));
    let q = Recorder(Mutex::new(vec![]));
    let a1 = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
    let a2 = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    let err = g.acquire("/CN=c", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(
        matches!(err, LeaseError::Exhausted { size: 2, .. }),
        "{err}"
    );
    let listed = g.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|l| l.state == LeaseState::Leased));
    assert_eq!(listed[0].owner.as_deref(), Some("/cn=a"));
}

#[test]
fn expired_lease_is_quarantined_and_reused() {
    let (_t, g) = pool(1, Duration::from_millis(50));
    let q = Recorder(Mutex::new(vec![]));
    let a = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    // In use: never reclaimed under a running payload.
    assert!(g.acquire("/CN=b", &[], "pool", &|_| true, &q).is_err());
    let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
    assert_eq!(a, b);
    assert_eq!(q.0.lock().unwrap().as_slice(), std::slice::from_ref(&a));
}

#[test]
fn failed_cleanup_keeps_account_out_of_circulation() {
    struct Fails;
    impl Quarantine for Fails {
        fn clean(&self, _: &str) -> Result<(), String> {
            Err("cannot".into())
        }
    }
    let (_t, g) = pool(1, Duration::from_millis(10));
    let q = Recorder(Mutex::new(vec![]));
    g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert!(matches!(
        g.acquire("/CN=b", &[], "pool", &|_| false, &Fails),
        Err(LeaseError::Cleanup { .. })
    ));
    // Still quarantined: a later acquire retries cleanup before handing it out.
    let b = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
    assert_eq!(b, "pool001");
}

fn grouped(n: usize) -> (tempfile::TempDir, Gridmapdir) {
    let (t, g) = pool(n, Duration::from_secs(3600));
    (t, g.with_group_lookup(Box::new(|_| Ok("lcmdemo".into()))))
}

fn links(g: &Gridmapdir, account: &str) -> u64 {
    g.dir.join(account).symlink_metadata().unwrap().nlink()
}

#[test]
fn fqan_pool_leases_carry_the_pools_group() {
    let (_t, g) = grouped(2);
    let q = Recorder(Mutex::new(vec![]));
    let fq = vec!["/demo/Role=prod".to_string()];
    let a = g.acquire(
        "/DC=org/DC=mupilot-demo/CN=dave",
        &fq,
        "pool",
        &|_| false,
        &q,
    );
    assert_eq!(a.unwrap(), "pool001");
    let name = g
        .dir
        .join("%2fdc%3dorg%2fdc%3dmupilot%2ddemo%2fcn%3ddave:lcmdemo");
    assert_eq!(name.symlink_metadata().unwrap().nlink(), 2);
    // By DN the same owner holds another lease, as LCMAPS's poolaccount would.
    let b = g.acquire(
        "/DC=org/DC=mupilot-demo/CN=dave",
        &[],
        "pool",
        &|_| false,
        &q,
    );
    assert_eq!(b.unwrap(), "pool002");
}

#[test]
fn unknown_pool_group_is_a_clear_error() {
    let (_t, g) = pool(1, Duration::from_secs(60));
    let q = Recorder(Mutex::new(vec![]));
    let e = g
        .acquire("/CN=a", &["/demo".into()], "pool", &|_| false, &q)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("primary group of pool account pool001"),
        "{e}"
    );
}

#[test]
fn former_lease_is_honoured_and_renamed() {
    let (_t, g) = grouped(3);
    let q = Recorder(Mutex::new(vec![]));
    let fq = vec!["/demo/Role=prod".to_string()];
    let former = g.dir.join(former_lease_name("/CN=a-b", &fq));
    fs::hard_link(g.dir.join("pool002"), &former).unwrap();
    let a = g.acquire("/CN=a-b", &fq, "pool", &|_| false, &q).unwrap();
    assert_eq!(a, "pool002");
    assert!(!former.exists());
    assert_eq!(links(&g, "pool002"), 2);
    assert!(g.dir.join("%2fcn%3da%2db:lcmdemo").exists());
    // A DN-mapped former lease too.
    let former = g.dir.join(former_lease_name("/CN=x.y", &[]));
    fs::hard_link(g.dir.join("pool003"), &former).unwrap();
    assert_eq!(
        g.acquire("/CN=x.y", &[], "pool", &|_| false, &q).unwrap(),
        "pool003"
    );
    assert!(g.dir.join("%2fcn%3dx%2ey").exists() && !former.exists());
}

#[test]
fn accounts_leased_under_other_names_are_never_taken() {
    let (_t, g) = grouped(3);
    let q = Recorder(Mutex::new(vec![]));
    // LCMAPS leased pool001 to someone else; a former-style lease holds pool002.
    fs::hard_link(g.dir.join("pool001"), g.dir.join("%2fcn%3dother:lcmdemo")).unwrap();
    fs::hard_link(g.dir.join("pool002"), g.dir.join("%2fcn%3dold-style")).unwrap();
    let a = g.acquire("/CN=a", &["/demo".into()], "pool", &|_| false, &q);
    assert_eq!(a.unwrap(), "pool003");
    let e = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { size: 3, .. }), "{e}");
    assert!(q.0.lock().unwrap().is_empty());
}

#[test]
fn pool_prefix_is_strict_and_solitary_leases_go() {
    let (_t, g) = pool(1, Duration::from_secs(60));
    for f in ["poolsgm001", "pool", "pool002~", "root"] {
        File::create(g.dir.join(f)).unwrap();
    }
    // A lease whose account file went away (one link) is removed, as LCMAPS does.
    File::create(g.dir.join("%2fcn%3da")).unwrap();
    let q = Recorder(Mutex::new(vec![]));
    assert_eq!(
        g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap(),
        "pool001"
    );
    assert_eq!(links(&g, "pool001"), 2);
    let e = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { size: 1, .. }), "{e}");
    assert_eq!(links(&g, "poolsgm001"), 1);
}

#[test]
fn a_lease_in_another_pool_is_quarantined_before_the_owner_moves() {
    let (_t, g) = pool(1, Duration::from_secs(60));
    File::create(g.dir.join("other001")).unwrap();
    let q = Recorder(Mutex::new(vec![]));
    g.acquire("/CN=a", &[], "other", &|_| false, &q).unwrap();
    let e = g.acquire("/CN=a", &[], "pool", &|a| a == "other001", &q);
    assert!(matches!(e, Err(LeaseError::Moving { .. })), "{e:?}");
    assert_eq!(links(&g, "other001"), 2);
    let a = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    assert_eq!(a, "pool001");
    assert_eq!(links(&g, "other001"), 1);
    assert_eq!(q.0.lock().unwrap().as_slice(), ["other001".to_string()]);
}

#[test]
fn a_lease_with_three_links_is_refused() {
    let (_t, g) = pool(1, Duration::from_secs(60));
    let q = Recorder(Mutex::new(vec![]));
    g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    fs::hard_link(g.dir.join("pool001"), g.dir.join("%2fcn%3db")).unwrap();
    let e = g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(e.to_string().contains("has 3 links"), "{e}");
}

/// Sets a lease's time of last use `secs` seconds into the past.
fn age(path: &Path, secs: u64) {
    set_last_use(path, SystemTime::now() - Duration::from_secs(secs)).unwrap();
}

fn busy_when(
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    account: &'static str,
) -> Box<BusyOf> {
    Box::new(move |accounts: &[String]| {
        Ok(accounts
            .iter()
            .filter(|a| flag.load(std::sync::atomic::Ordering::SeqCst) && a.as_str() == account)
            .cloned()
            .collect())
    })
}

#[test]
fn an_expired_lease_with_processes_is_kept_touched_and_recycled_when_they_end() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let running = std::sync::Arc::new(AtomicBool::new(false));
    let (_t, g) = pool(1, Duration::from_secs(60));
    let g = g.with_busy_lookup(busy_when(running.clone(), "pool001"));
    let q = Recorder(Mutex::new(vec![]));
    assert_eq!(
        g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap(),
        "pool001"
    );
    running.store(true, Ordering::SeqCst);
    let lease = g.dir.join("%2fcn%3da");
    age(&lease, 3600);
    // Processes of pool001 run (another service's job): its lease outlives the TTL.
    let e = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { size: 1, .. }), "{e}");
    assert!(q.0.lock().unwrap().is_empty(), "nothing was killed");
    assert_eq!(links(&g, "pool001"), 2);
    assert!(!g.dir.join(hold_name("pool001")).exists());
    let used = lease.symlink_metadata().unwrap().modified().unwrap();
    assert!(SystemTime::now().duration_since(used).unwrap_or_default() < Duration::from_secs(60));
    assert_eq!(g.list().unwrap()[0].state, LeaseState::Leased);
    // Its owner still has it.
    assert_eq!(
        g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap(),
        "pool001"
    );
    // The processes end: a TTL after the last check the lease expires and is recycled.
    running.store(false, Ordering::SeqCst);
    age(&lease, 3600);
    assert_eq!(
        g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap(),
        "pool001"
    );
    assert_eq!(q.0.lock().unwrap().as_slice(), ["pool001".to_string()]);
    assert!(!lease.exists() && g.dir.join("%2fcn%3db").exists());
}

#[test]
fn a_free_account_with_processes_is_not_handed_out() {
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (_t, g) = pool(2, Duration::from_secs(60));
    let g = g.with_busy_lookup(busy_when(running, "pool001"));
    let q = Recorder(Mutex::new(vec![]));
    // Someone removed pool001's lease while its job runs: it is skipped, not cleaned.
    assert_eq!(
        g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap(),
        "pool002"
    );
    let e = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(
        matches!(
            e,
            LeaseError::Exhausted {
                size: 2,
                busy: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("1 of them without a lease but with processes"),
        "{e}"
    );
    assert!(q.0.lock().unwrap().is_empty());
}

#[test]
fn the_lease_is_held_while_the_account_is_cleaned() {
    // During the cleanup the account file keeps two links (LCMAPS sees it leased) and the
    // owner's lease name is gone (nobody reuses it).
    struct Check(PathBuf, Mutex<Vec<(u64, bool, bool)>>);
    impl Quarantine for Check {
        fn clean(&self, account: &str) -> Result<(), String> {
            let nlink = self.0.join(account).symlink_metadata().unwrap().nlink();
            let held = self.0.join(hold_name(account)).exists();
            let named = self.0.join("%2fcn%3da").exists();
            self.1.lock().unwrap().push((nlink, held, named));
            Ok(())
        }
    }
    let (_t, g) = pool(1, Duration::from_secs(60));
    let q = Check(g.dir.clone(), Mutex::new(vec![]));
    g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    age(&g.dir.join("%2fcn%3da"), 3600);
    g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap();
    assert_eq!(q.1.lock().unwrap().as_slice(), [(2, true, false)]);
    assert!(!g.dir.join(hold_name("pool001")).exists());
    assert_eq!(links(&g, "pool001"), 2);
}

#[test]
fn a_failed_cleanup_keeps_the_hold_and_a_blind_scan_expires_nothing() {
    struct Fails;
    impl Quarantine for Fails {
        fn clean(&self, _: &str) -> Result<(), String> {
            Err("cannot".into())
        }
    }
    let (_t, g) = pool(1, Duration::from_secs(60));
    let q = Recorder(Mutex::new(vec![]));
    g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap();
    age(&g.dir.join("%2fcn%3da"), 3600);
    assert!(matches!(
        g.acquire("/CN=b", &[], "pool", &|_| false, &Fails),
        Err(LeaseError::Cleanup { .. })
    ));
    // LCMAPS, counting links, does not hand the account out either.
    assert_eq!(links(&g, "pool001"), 2);
    assert!(g.dir.join(hold_name("pool001")).exists());
    assert_eq!(
        g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap(),
        "pool001"
    );
    assert!(!g.dir.join(hold_name("pool001")).exists());

    // When /proc cannot be read, nothing expires and the lease keeps its name.
    let (_t, g) = pool(1, Duration::from_secs(60));
    let g = g.with_busy_lookup(Box::new(|_| Err("no /proc".into())));
    g.acquire("/CN=a", &[], "pool", &|_| false, &q).unwrap_err();
    fs::hard_link(g.dir.join("pool001"), g.dir.join("%2fcn%3da")).unwrap();
    age(&g.dir.join("%2fcn%3da"), 3600);
    let e = g.acquire("/CN=b", &[], "pool", &|_| false, &q).unwrap_err();
    assert!(matches!(e, LeaseError::ProcessScan { .. }), "{e}");
    assert!(e.to_string().contains("no /proc"), "{e}");
    assert!(g.dir.join("%2fcn%3da").exists());
    assert!(!g.dir.join(hold_name("pool001")).exists());
}
