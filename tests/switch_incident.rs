//! The site's incident-response tools against the real daemon (root): the emergency stop
//! `audit kill --owner DN --ban`, and `lost` records after the helper was killed outright (P10,
//! P11).

mod switch_support;

use std::process::Command;
use std::time::{Duration, Instant};

use mupilot::protocol::switch_wire::{DenialClass, SwitchEvent};
use switch_support::{denied, Client, Daemon, Site, Users, BIN, DN_ALICE};

fn site_with_ban_list() -> Site {
    let site = Site::new();
    std::fs::write(site.path("ban_users.db"), "# site bans\n").unwrap();
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str("[authz]\nban_users = [\"ban_users.db\"]\n");
    std::fs::write(&site.config, cfg).unwrap();
    site
}

#[test]
fn audit_kill_stops_every_payload_of_the_owner_and_bans_the_dn() {
    let _u = Users::acquire();
    let site = site_with_ban_list();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["sleep", "300"]);
    let id = body.payload_id.clone();
    assert!(matches!(
        c.launch(&site.sign(&body), None),
        SwitchEvent::Started { .. }
    ));

    let out = Command::new(BIN)
        .args(["audit", "kill", "--owner", DN_ALICE, "--ban", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&id), "{text}");

    // The payload ends, killed by the site admin.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "payload did not end");
        if let SwitchEvent::Exited { report, .. } = c.recv() {
            assert_eq!(
                report.kill_reason.as_deref(),
                Some("site_admin"),
                "{report:?}"
            );
            break;
        }
    }
    // The DN is banned from now on, without a restart.
    let bans = std::fs::read_to_string(site.path("ban_users.db")).unwrap();
    assert!(bans.contains(&format!("\"{DN_ALICE}\"")), "{bans}");
    let (_, class, reason) = denied(c.launch(&site.sign(&site.body(DN_ALICE, &["true"])), None));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("banned"), "{reason}");
    // Audited: the admin's kill, and the payload's end with its reason.
    let recs = site.records_of(&id);
    assert!(recs
        .iter()
        .any(|r| r["event"] == "end" && r["kill_reason"] == "site_admin"));
    assert!(site.records().iter().any(|r| r["event"] == "kill"
        && r["kill_reason"] == "site_admin"
        && r["owner_dn"] == DN_ALICE));
}

#[test]
fn helper_killed_outright_leaves_lost_records_after_restart() {
    let _u = Users::acquire();
    let site = Site::new();
    let mut d = Daemon::start(&site);
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let body = site.body(DN_ALICE, &["sleep", "300"]);
    let id = body.payload_id.clone();
    let pid = match c.launch(&site.sign(&body), None) {
        SwitchEvent::Started { pid, .. } => pid,
        ev => panic!("{ev:?}"),
    };
    // SIGKILL: no end record can be written.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    drop(c);
    // The payload's stage saw the helper go and tore the payload down.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "payload {pid} survived the helper"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!site
        .records_of(&id)
        .iter()
        .any(|r| r["event"] == "end" || r["event"] == "lost"));
    // The next helper closes the gap with a `lost` record; the chain stays intact.
    let _d2 = Daemon::start(&site);
    // (The socket is bound before the log is read, so give the startup scan a moment.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while !site.records_of(&id).iter().any(|r| r["event"] == "lost") {
        assert!(Instant::now() < deadline, "{:?}", site.records_of(&id));
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = mupilot::records::verify_file(&site.audit).unwrap();
    assert!(r.first_break.is_none(), "{:?}", r.first_break);
    drop(d);
}
