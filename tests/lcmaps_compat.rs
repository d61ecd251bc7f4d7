//! One lease per person, whoever maps (issue 17 item 6): the helper's pool leases against
//! LCMAPS itself (Debian's liblcmaps0 and plugins, through `lcmaps_return_account_from_pem`)
//! in one gridmapdir, with real pool accounts and real VOMS proxies. The same owner gets the
//! same account from either, in both orders; neither takes an account the other leased; a
//! lease of the helper's former naming keeps its account. Runs as root.

mod lcmaps_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use lcmaps_support::{Lcmaps, PoolAccounts, DN_BASE};
use mupilot::switch::leases::{
    former_lease_name, lcmaps_encode, lease_name, Gridmapdir, KillAndClean, LeaseError,
};

/// The tests create accounts with fixed names.
static SERIAL: Mutex<()> = Mutex::new(());

const FQANS: [&str; 2] = ["/demo/Role=prod", "/demo"];

fn dn(cn: &str) -> String {
    format!("{DN_BASE}/CN={cn}")
}

/// The helper's lease code on the same gridmapdir, with its real quarantine and NSS lookups.
fn helper(lc: &Lcmaps, state: &Path) -> Gridmapdir {
    Gridmapdir::new(&lc.gridmapdir(), state, Duration::from_secs(3600)).unwrap()
}

fn acquire(g: &Gridmapdir, cn: &str, fqans: &[&str], pool: &str) -> Result<String, LeaseError> {
    let fqans: Vec<String> = fqans.iter().map(|f| f.to_string()).collect();
    let quarantine = KillAndClean { roots: Vec::new() };
    g.acquire(&dn(cn), &fqans, pool, &|_| false, &quarantine)
}

fn links(lc: &Lcmaps, name: &str) -> u64 {
    lc.gridmapdir()
        .join(name)
        .symlink_metadata()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .nlink()
}

/// Every lease in the directory, as (name, account).
fn leases(lc: &Lcmaps) -> Vec<(String, String)> {
    let mut by_ino = std::collections::HashMap::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(lc.gridmapdir()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let ino = e.metadata().unwrap().ino();
        if name.starts_with('%') {
            names.push((name, ino));
        } else if !name.starts_with('.') {
            by_ino.insert(ino, name);
        }
    }
    let mut v: Vec<(String, String)> = names
        .into_iter()
        .map(|(n, ino)| (n, by_ino.get(&ino).cloned().unwrap_or_default()))
        .collect();
    v.sort();
    v
}

/// The first account of `pool` no lease holds.
fn free_account(lc: &Lcmaps, pool: &PoolAccounts) -> String {
    pool.names
        .iter()
        .find(|a| links(lc, a) == 1)
        .expect("a free account")
        .clone()
}

#[test]
fn voms_pool_accounts_one_lease_per_owner_with_lcmaps() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pool = PoolAccounts::create("mpt-lcv", "mpt-lcv-g", 4);
    let lc = Lcmaps::new(
        "\"/demo/Role=prod\" .mpt-lcv\n",
        // The first FQAN's group is the primary group, the pool accounts' own; the second's
        // is a secondary group, which -do_not_use_secondary_gids leaves out of the lease.
        "\"/demo/Role=prod\" mpt-lcv-g\n\"/demo\" users\n",
        "",
    );
    lc.add_pool(&pool);
    let state = tempfile::tempdir().unwrap();
    let g = helper(&lc, state.path());
    let prod = &FQANS[..1];

    // LCMAPS first: the helper finds LCMAPS's lease, by LCMAPS's name.
    let dave = lc.proxy("dave", &FQANS);
    let (a, lease) = lc.map("voms", &dave).unwrap();
    assert_eq!(
        lease,
        "%2fdc%3dorg%2fdc%3dmupilot%2ddemo%2fcn%3ddave:mpt-lcv-g"
    );
    assert_eq!(lease, lease_name(&dn("dave"), &["mpt-lcv-g".to_string()]));
    assert_eq!(acquire(&g, "dave", prod, "mpt-lcv").unwrap(), a);
    assert_eq!(lc.map("voms", &dave).unwrap().0, a);

    // The helper first: LCMAPS finds the helper's lease.
    let b = acquire(&g, "erin", prod, "mpt-lcv").unwrap();
    assert_ne!(b, a);
    let erin = lc.proxy("erin", &FQANS);
    assert_eq!(
        lc.map("voms", &erin).unwrap(),
        (b.clone(), lease_name(&dn("erin"), &["mpt-lcv-g".into()]))
    );

    // A lease of the helper's former naming keeps its account for its owner, under
    // LCMAPS's name from then on, and LCMAPS then finds it too.
    let c = free_account(&lc, &pool);
    let former = former_lease_name(&dn("frank"), &[FQANS[0].to_string()]);
    assert_eq!(
        former,
        "%2fdc%3dorg%2fdc%3dmupilot-demo%2fcn%3dfrank:%2fdemo%2frole%3dprod"
    );
    std::fs::hard_link(lc.gridmapdir().join(&c), lc.gridmapdir().join(&former)).unwrap();
    assert_eq!(acquire(&g, "frank", prod, "mpt-lcv").unwrap(), c);
    assert!(!lc.gridmapdir().join(&former).exists());
    let frank = lc.proxy("frank", &FQANS);
    assert_eq!(lc.map("voms", &frank).unwrap().0, c);

    // The last account is held by a former-style lease: LCMAPS does not take it for a new
    // owner, nor does the helper; both say the pool is full.
    let d = free_account(&lc, &pool);
    let gina_former = former_lease_name(&dn("gina"), &[FQANS[0].to_string()]);
    std::fs::hard_link(lc.gridmapdir().join(&d), lc.gridmapdir().join(&gina_former)).unwrap();
    let before = leases(&lc);
    let hank = lc.proxy("hank", &FQANS);
    let refused = lc.map("voms", &hank).unwrap_err();
    assert!(
        refused.contains("no pool-entry available for pool-name mpt-lcv"),
        "{refused}"
    );
    let e = acquire(&g, "ivan", prod, "mpt-lcv").unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { size: 4, .. }), "{e}");
    assert_eq!(leases(&lc), before);
    // Four owners, four accounts, each with exactly its one lease.
    let held: std::collections::BTreeSet<String> = before.iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(held.len(), 4, "{before:?}");
    for account in &pool.names {
        assert_eq!(links(&lc, account), 2, "{account}: {before:?}");
    }
    // Its owner still gets it from the helper.
    assert_eq!(acquire(&g, "gina", prod, "mpt-lcv").unwrap(), d);
    assert_eq!(
        leases(&lc).len(),
        4,
        "the former lease was renamed, not doubled"
    );
}

#[test]
fn dn_pool_accounts_one_lease_per_owner_with_lcmaps() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pool = PoolAccounts::create("mpt-lcd", "mpt-lcd-g", 2);
    let lc = Lcmaps::new(
        "",
        "",
        &format!(
            "\"{}\" .mpt-lcd\n\"{}\" .mpt-lcd\n\"{}\" .mpt-lcd\n",
            dn("dave"),
            dn("erin"),
            dn("frank")
        ),
    );
    lc.add_pool(&pool);
    let state = tempfile::tempdir().unwrap();
    let g = helper(&lc, state.path());

    // LCMAPS first (poolaccount: the lease is the encoded DN alone).
    let dave = lc.proxy("dave", &[]);
    let (a, lease) = lc.map("dn", &dave).unwrap();
    assert_eq!(lease, "%2fdc%3dorg%2fdc%3dmupilot%2ddemo%2fcn%3ddave");
    assert_eq!(lease, lcmaps_encode(&dn("dave")));
    assert_eq!(acquire(&g, "dave", &[], "mpt-lcd").unwrap(), a);

    // The helper first.
    let b = acquire(&g, "erin", &[], "mpt-lcd").unwrap();
    assert_ne!(a, b);
    let erin = lc.proxy("erin", &[]);
    assert_eq!(lc.map("dn", &erin).unwrap().0, b);

    // Full: LCMAPS refuses a third owner rather than take either account.
    let frank = lc.proxy("frank", &[]);
    let refused = lc.map("dn", &frank).unwrap_err();
    assert!(refused.contains("no pool-entry available"), "{refused}");
    assert_eq!(leases(&lc).len(), 2);
    for account in &pool.names {
        assert_eq!(links(&lc, account), 2);
    }
}

/// Sets a lease's time of last use an hour into the past (beyond the helper's TTL here).
fn age(lc: &Lcmaps, lease: &str) {
    let then = nix::sys::time::TimeSpec::from(
        (std::time::SystemTime::now() - Duration::from_secs(3600))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    nix::sys::stat::utimensat(
        None,
        &lc.gridmapdir().join(lease),
        &then,
        &then,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn ids_of(account: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(account).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// A long job another service started under `account`: `sleep` whose real uid is root and whose
/// effective uid is the account's (`setpriv --euid`), or with all three uids the account's.
/// Killed and reaped on drop, so a failing test leaves no process behind.
struct Job(std::process::Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job(account: &str, effective_only: bool) -> Job {
    let (uid, gid) = ids_of(account);
    let mut cmd = std::process::Command::new("setpriv");
    if effective_only {
        cmd.arg(format!("--euid={uid}"));
    } else {
        cmd.args([format!("--reuid={uid}"), format!("--regid={gid}")]);
        cmd.arg("--clear-groups");
    }
    Job(cmd.args(["sleep", "600"]).spawn().unwrap())
}

fn running(job: &mut Job) -> bool {
    job.0.try_wait().unwrap().is_none()
}

#[test]
fn an_account_with_a_live_process_keeps_its_lease_past_the_ttl() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pool = PoolAccounts::create("mpt-lcx", "mpt-lcx-g", 2);
    let lc = Lcmaps::new(
        "\"/demo/Role=prod\" .mpt-lcx\n",
        "\"/demo/Role=prod\" mpt-lcx-g\n\"/demo\" users\n",
        "",
    );
    lc.add_pool(&pool);
    let state = tempfile::tempdir().unwrap();
    let g = Gridmapdir::new(&lc.gridmapdir(), state.path(), Duration::from_secs(60)).unwrap();
    let prod = &FQANS[..1];

    // LCMAPS maps dave (a CE); the CE's job runs under the account as its effective uid only.
    let dave = lc.proxy("dave", &FQANS);
    let (a, dave_lease) = lc.map("voms", &dave).unwrap();
    let mut dave_job = job(&a, true);
    // The helper leases erin the other account directly; a process of it stays behind.
    let b = acquire(&g, "erin", prod, "mpt-lcx").unwrap();
    assert_ne!(a, b);
    let erin_lease = lease_name(&dn("erin"), &["mpt-lcx-g".to_string()]);
    let mut erin_job = job(&b, false);
    std::thread::sleep(Duration::from_millis(200));
    age(&lc, &dave_lease);
    age(&lc, &erin_lease);

    // Both leases are past the TTL, but their accounts run processes: a new owner is refused,
    // no process is killed, no lease is lost, and both owners keep their accounts.
    let e = acquire(&g, "frank", prod, "mpt-lcx").unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { size: 2, .. }), "{e}");
    assert!(running(&mut dave_job) && running(&mut erin_job));
    assert_eq!(links(&lc, &dave_lease), 2);
    assert_eq!(links(&lc, &erin_lease), 2);
    assert_eq!(
        lc.map("voms", &dave).unwrap(),
        (a.clone(), dave_lease.clone())
    );
    assert_eq!(acquire(&g, "erin", prod, "mpt-lcx").unwrap(), b);

    // A lease removed by hand while the job runs does not free the account to a new owner.
    std::fs::remove_file(lc.gridmapdir().join(&erin_lease)).unwrap();
    let e = acquire(&g, "frank", prod, "mpt-lcx").unwrap_err();
    assert!(matches!(e, LeaseError::Exhausted { busy: 1, .. }), "{e}");
    assert!(running(&mut erin_job));

    // The jobs end: past the TTL, dave's lease is recycled (quarantined: nothing left to kill).
    drop(dave_job);
    drop(erin_job);
    age(&lc, &dave_lease);
    let mut accounts = vec![
        acquire(&g, "frank", prod, "mpt-lcx").unwrap(),
        acquire(&g, "gina", prod, "mpt-lcx").unwrap(),
    ];
    accounts.sort();
    assert_eq!(accounts, pool.names);
    assert!(!lc.gridmapdir().join(&dave_lease).exists());
    assert!(!lc.gridmapdir().join(&erin_lease).exists());
    // LCMAPS agrees: dave is a new owner now and the pool is full.
    let refused = lc.map("voms", &dave).unwrap_err();
    assert!(refused.contains("no pool-entry available"), "{refused}");
}

/// Unix groups removed on drop.
struct Groups(Vec<String>);

impl Groups {
    fn create(names: &[&str]) -> Groups {
        for g in names {
            let _ = std::process::Command::new("groupdel").arg(g).output();
            let st = std::process::Command::new("groupadd")
                .arg(g)
                .status()
                .unwrap();
            assert!(st.success(), "groupadd {g}");
        }
        Groups(names.iter().map(|g| g.to_string()).collect())
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for g in &self.0 {
            let _ = std::process::Command::new("groupdel").arg(g).status();
        }
    }
}

#[test]
fn secondary_groups_name_leases_as_lcmaps_default_does() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Created in this order, so mpt-lcs-z has the lower gid: LCMAPS sorts secondaries by gid.
    let _groups = Groups::create(&["mpt-lcs-z", "mpt-lcs-a"]);
    let pool = PoolAccounts::create("mpt-lcs", "mpt-lcs-g", 3);
    let groupmap = "\"/demo/Role=prod\" mpt-lcs-g\n\"/demo/sub\" mpt-lcs-a\n\"/demo\" mpt-lcs-z\n";
    let lc = Lcmaps::new("\"/demo/Role=prod\" .mpt-lcs\n", groupmap, "").with_secondary_gids();
    lc.add_pool(&pool);
    let state = tempfile::tempdir().unwrap();
    let g = Gridmapdir::new(&lc.gridmapdir(), state.path(), Duration::from_secs(3600))
        .unwrap()
        .with_groupmapfile(&lc.path("groupmapfile"));
    let owner: Vec<String> = ["/demo/Role=prod", "/demo/sub", "/demo"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let acquire_all = |cn: &str| {
        let q = KillAndClean { roots: Vec::new() };
        g.acquire_for(&dn(cn), &owner[..1], &owner, "mpt-lcs", &|_| false, &q)
    };
    let fqans: Vec<&str> = owner.iter().map(|s| s.as_str()).collect();

    // LCMAPS first: primary group, then the secondaries by gid.
    let dave = lc.proxy("dave", &fqans);
    let (a, lease) = lc.map("voms", &dave).unwrap();
    assert_eq!(
        lease,
        format!(
            "{}:mpt-lcs-g:mpt-lcs-z:mpt-lcs-a",
            lcmaps_encode(&dn("dave"))
        )
    );
    assert_eq!(acquire_all("dave").unwrap(), a);
    assert_eq!(leases(&lc).len(), 1);

    // The helper first: LCMAPS finds the helper's lease.
    let b = acquire_all("erin").unwrap();
    assert_ne!(a, b);
    let erin = lc.proxy("erin", &fqans);
    assert_eq!(lc.map("voms", &erin).unwrap().0, b);
    assert_eq!(leases(&lc).len(), 2);

    // Without the groupmapfile the helper would name the lease by the pool's group alone,
    // and so take a second account for dave: the setting is what makes them agree.
    let plain = helper(&lc, state.path());
    let c = acquire(&plain, "dave", &FQANS[..1], "mpt-lcs").unwrap();
    assert_ne!(c, a);
}

#[test]
fn non_ascii_dns_get_the_lease_lcmaps_gives_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pool = PoolAccounts::create("mpt-lcu", "mpt-lcu-g", 2);
    // LCMAPS sees OpenSSL's one-line DN: the UTF-8 bytes as \xHH; its grid-mapfile says so.
    let lc = Lcmaps::new(
        "",
        "",
        &format!(
            "\"{DN_BASE}/CN=Jos\\xC3\\xA9 M\\xC3\\xBCller\" .mpt-lcu\n\"{DN_BASE}/CN=Zo\\xC3\\xAB\" .mpt-lcu\n"
        ),
    );
    lc.add_pool(&pool);
    let state = tempfile::tempdir().unwrap();
    let g = helper(&lc, state.path());

    // LCMAPS first; the helper, given the DN in UTF-8, finds the same lease.
    let jose = lc.proxy("José Müller", &[]);
    let (a, lease) = lc.map("dn", &jose).unwrap();
    assert_eq!(
        lease,
        "%2fdc%3dorg%2fdc%3dmupilot%2ddemo%2fcn%3djos%5cxc3%5cxa9%20m%5cxc3%5cxbcller"
    );
    assert_eq!(acquire(&g, "José Müller", &[], "mpt-lcu").unwrap(), a);
    // The helper first, for a UTF-8 DN; LCMAPS finds the helper's lease.
    let b = acquire(&g, "Zoë", &[], "mpt-lcu").unwrap();
    assert_ne!(a, b);
    let zoe = lc.proxy("Zoë", &[]);
    assert_eq!(lc.map("dn", &zoe).unwrap().0, b);
    assert_eq!(leases(&lc).len(), 2);
}
