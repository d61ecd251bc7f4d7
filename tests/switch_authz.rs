//! The helper's local decisions against the real daemon (root, real accounts and cgroups):
//! ban lists and policies that change without a restart, and pool-account leases under
//! concurrency, with expiry, quarantine and cleanup (P3, P5, P6).

mod switch_support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use mupilot::protocol::switch_wire::{DenialClass, SwitchEvent};
use switch_support::{denied, Client, Site, Users, DN_ALICE};

const POOL: &str = "mpt-swp";
const POOL_SIZE: usize = 16;

/// The 16 pool accounts, removed again at the end. Tests using them run one at a time.
struct PoolAccounts(
    Vec<String>,
    #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
);

static POOL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl PoolAccounts {
    fn create() -> PoolAccounts {
        let guard = POOL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = (1..=POOL_SIZE).map(|i| format!("{POOL}{i:02}")).collect();
        for n in &names {
            let _ = Command::new("userdel")
                .arg(n)
                .stderr(Stdio::null())
                .status();
            let ok = Command::new("useradd")
                .args(["--no-create-home", "--shell", "/usr/sbin/nologin", n])
                .status()
                .unwrap()
                .success();
            assert!(ok, "useradd {n}");
        }
        PoolAccounts(names, guard)
    }
}

impl Drop for PoolAccounts {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("userdel").arg(n).status();
        }
    }
}

fn owner_dn(i: usize) -> String {
    format!("/DC=org/DC=mupilot-test/CN=swd pool user {i:02}")
}

/// A site whose grid-mapfile sends 32 owners to the pool, with a gridmapdir and `extra`
/// lines in [authz].
fn pool_site(extra: &str) -> Site {
    let site = Site::new();
    let mut map = std::fs::read_to_string(&site.gridmap).unwrap();
    for i in 0..32 {
        map.push_str(&format!("\"{}\" .{POOL}\n", owner_dn(i)));
    }
    std::fs::write(&site.gridmap, map).unwrap();
    let gmd = site.path("gridmapdir");
    std::fs::create_dir(&gmd).unwrap();
    for i in 1..=POOL_SIZE {
        std::fs::write(gmd.join(format!("{POOL}{i:02}")), b"").unwrap();
    }
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str(&format!("[authz]\ngridmapdir = \"gridmapdir\"\n{extra}"));
    std::fs::write(&site.config, cfg).unwrap();
    site
}

fn launch_as(site: &Site, dn: &str, argv: &[&str]) -> SwitchEvent {
    let mut c = Client::hello(&site.socket, Client::default_hello());
    c.launch(&site.sign(&site.body(dn, argv)), None)
}

#[test]
fn thirty_two_owners_over_sixteen_pool_accounts() {
    let _u = Users::acquire();
    let _pool = PoolAccounts::create();
    let site = pool_site("");
    let _d = site.start();

    // 32 pilots connect at once; each launches one payload that holds its account 3 s.
    let results: Vec<(usize, SwitchEvent, Option<Client>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let site = &site;
                s.spawn(move || {
                    let mut c = Client::hello(&site.socket, Client::default_hello());
                    let ev = c.launch(&site.sign(&site.body(&owner_dn(i), &["sleep", "3"])), None);
                    (i, ev, Some(c))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut accounts = BTreeSet::new();
    let mut started = Vec::new();
    let mut refused = 0;
    for (i, ev, client) in results {
        match ev {
            SwitchEvent::Started { account, .. } => {
                assert!(account.starts_with(POOL), "{account}");
                assert!(accounts.insert(account.clone()), "account {account} shared");
                started.push((i, account, client.unwrap()));
            }
            SwitchEvent::Denied { class, reason, .. } => {
                // The site's capacity, not a verdict on the owner.
                assert_eq!(class, DenialClass::System, "{reason}");
                assert!(reason.contains("exhausted"), "{reason}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((started.len(), refused), (16, 16));

    // Each payload ends; the same owner then gets its own account back.
    for (_, _, c) in started.iter_mut() {
        loop {
            if let SwitchEvent::Exited { report, .. } = c.recv() {
                assert_eq!(report.exit_code, Some(0));
                break;
            }
        }
    }
    let (i, account, _) = &started[0];
    match launch_as(&site, &owner_dn(*i), &["true"]) {
        SwitchEvent::Started { account: again, .. } => assert_eq!(&again, account),
        other => panic!("{other:?}"),
    }

    // `mupilot-switch leases` lists 16 leased accounts with their owners.
    let out = Command::new(switch_support::BIN)
        .args(["leases", "--json", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(leases.len(), POOL_SIZE);
    assert!(leases.iter().all(|l| l["state"] == "leased"), "{leases:?}");
}

#[test]
fn expired_lease_is_quarantined_and_cleaned_before_reuse() {
    let _u = Users::acquire();
    let _pool = PoolAccounts::create();
    // A pool of one: the second owner only gets the account after the first lease expired.
    let site = pool_site("lease_ttl_seconds = 1\n");
    let gmd = site.path("gridmapdir");
    for i in 2..=POOL_SIZE {
        std::fs::remove_file(gmd.join(format!("{POOL}{i:02}"))).unwrap();
    }
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let first = match c.launch(&site.sign(&site.body(&owner_dn(0), &["true"])), None) {
        SwitchEvent::Started { account, uid, .. } => (account, uid),
        other => panic!("{other:?}"),
    };
    while !matches!(c.recv(), SwitchEvent::Exited { .. }) {}
    // Something the account left on the host, outside any sandbox.
    let leftover = std::path::PathBuf::from(format!("/tmp/{POOL}-leftover"));
    std::fs::write(&leftover, b"x").unwrap();
    nix::unistd::chown(&leftover, Some(first.1.into()), None).unwrap();

    let (_, class, reason) = denied(launch_as(&site, &owner_dn(1), &["true"]));
    assert_eq!(class, DenialClass::System, "{reason}");
    std::thread::sleep(Duration::from_millis(2100));
    match launch_as(&site, &owner_dn(1), &["true"]) {
        SwitchEvent::Started { account, .. } => assert_eq!(account, first.0),
        other => panic!("{other:?}"),
    }
    assert!(
        !leftover.exists(),
        "quarantine left the account's file behind"
    );
}

#[test]
fn ban_and_policy_changes_apply_without_restart() {
    let _u = Users::acquire();
    let site = Site::new();
    std::fs::write(site.path("ban_users.db"), "# nobody banned yet\n").unwrap();
    std::fs::write(
        site.path("site.policy"),
        "/DC=org/DC=mupilot-test:\n&(action = start)(executable = true sleep)\n",
    )
    .unwrap();
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str("[authz]\nban_users = [\"ban_users.db\"]\nsite_policy = \"site.policy\"\n");
    std::fs::write(&site.config, cfg).unwrap();
    let _d = site.start();

    assert!(matches!(
        launch_as(&site, DN_ALICE, &["true"]),
        SwitchEvent::Started { .. }
    ));
    // The policy grants `true` and `sleep` only.
    let (_, class, reason) = denied(launch_as(&site, DN_ALICE, &["/bin/ls"]));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("site policy"), "{reason}");

    std::fs::write(site.path("ban_users.db"), format!("\"{DN_ALICE}\"\n")).unwrap();
    let (id, class, reason) = denied(launch_as(&site, DN_ALICE, &["true"]));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("ban_users.db:1"), "{reason}");
    let recs = site.records_of(&id);
    assert!(recs.iter().any(|r| r["decision"] == "deny"), "{recs:?}");

    // A ban list broken by an edit refuses everyone (fail closed) as a system denial.
    std::fs::write(site.path("ban_users.db"), "\"unterminated\n").unwrap();
    let (_, class, _) = denied(launch_as(&site, DN_ALICE, &["true"]));
    assert_eq!(class, DenialClass::System);
}

/// VO-wide job management: a cancel signed by the VO server is carried out only when the
/// site's policy permits the requester it names (here: the owner, SELF), and audited.
#[test]
fn operator_commands_are_authorized_with_the_policy() {
    use mupilot::protocol::command::{CommandAction, CommandBody, SignedCommand};
    use mupilot::protocol::switch_wire::SwitchRequest;
    let _u = Users::acquire();
    let site = Site::new();
    std::fs::write(
        site.path("site.policy"),
        "/DC=org/DC=mupilot-test:\n&(action = start)\n&(action = cancel information)(jobowner = SELF)\n",
    )
    .unwrap();
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str("[authz]\nsite_policy = \"site.policy\"\n");
    std::fs::write(&site.config, cfg).unwrap();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["sleep", "30"]);
    let id = body.payload_id.clone();
    assert!(matches!(
        c.launch(&site.sign(&body), None),
        SwitchEvent::Started { .. }
    ));
    let command = |requester: &str, action: CommandAction| {
        let b = CommandBody {
            version: 1,
            payload_id: id.clone(),
            action,
            requester_dn: requester.into(),
            requester_fqans: vec![],
            signal: None,
            not_after: chrono::Utc::now() + chrono::Duration::minutes(5),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        };
        SignedCommand::sign(&site.key, switch_support::VO, &b)
    };
    // Someone else may not cancel alice's payload.
    let other = command(
        "/DC=org/DC=mupilot-test/CN=swd mallory",
        CommandAction::Cancel,
    );
    match c.call(
        &SwitchRequest::Command {
            command: other.clone(),
        },
        &[],
    ) {
        SwitchEvent::CommandDone { ok, reason, .. } => {
            assert!(!ok);
            assert!(reason.contains("denied"), "{reason}");
        }
        ev => panic!("{ev:?}"),
    }
    // The same signed command again is a replay.
    assert!(matches!(
        c.call(&SwitchRequest::Command { command: other }, &[]),
        SwitchEvent::Error { .. }
    ));
    // The owner may ask for information and cancel.
    match c.call(
        &SwitchRequest::Command {
            command: command(DN_ALICE, CommandAction::Information),
        },
        &[],
    ) {
        SwitchEvent::CommandDone {
            ok, information, ..
        } => {
            assert!(ok);
            assert_eq!(information.unwrap().payload_id, id);
        }
        ev => panic!("{ev:?}"),
    }
    // The answer and the payload's exit may arrive in either order.
    c.send(
        &SwitchRequest::Command {
            command: command(DN_ALICE, CommandAction::Cancel),
        },
        &[],
    );
    let (mut answered, mut exited) = (false, false);
    while !(answered && exited) {
        match c.recv() {
            SwitchEvent::CommandDone { ok, .. } => {
                assert!(ok);
                answered = true;
            }
            SwitchEvent::Exited { report, .. } => {
                assert_eq!(report.signal, Some(15), "{report:?}");
                exited = true;
            }
            ev => panic!("{ev:?}"),
        }
    }
    let recs = site.records_of(&id);
    assert!(recs
        .iter()
        .any(|r| r["decision"] == "deny" && r["reason"].as_str().unwrap().contains("mallory")));
    assert!(recs
        .iter()
        .any(|r| r["event"] == "kill" && r["decision"] == "permit"));
}
