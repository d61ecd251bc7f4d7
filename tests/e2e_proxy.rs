//! A member's delegated X.509 proxy end to end, as a VO member and a site run it (issue 17
//! item 5), as root: the member delegates a voms-proxy-fake proxy with `mupilot-server submit
//! --proxy` (real mTLS, SQLite); the pilot (an unprivileged account) fetches the payload,
//! relays the helper's CSR to the VO server and the chain back; `mupilot-switch` (root, real
//! accounts, gridmap, cgroups) verifies it against the site's CA directory and vomsdir and
//! writes it into the payload's scratch; the payload reads it with `voms-proxy-info`. Then
//! renewal through the server while the payload runs, and the faults of that path: the
//! server down at renewal time and at launch, the delegation expired or the member removed
//! before the pilot asks, the member suspended while the payload runs. Needs Debian's
//! voms-clients.

#![cfg(feature = "grid")]

mod grid_support;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use grid_support::{ALICE, BOB};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{bin, find_file, pilot_pid, processes_of, Accounts, Stack, SERIAL};

const PILOT: &str = "mpt-e2p-pilot";
const ACCT: &str = "mpt-e2p-a";
/// The demo VO's bob (a demo certificate) manages memberships here.
const MANAGER: &str = "/DC=org/DC=mupilot-demo/CN=bob";
/// `worker_proxy_seconds` and `proxy_renew_margin_seconds` can be no shorter (server.toml,
/// pilot.toml): the pilot renews at half the proxy's life, 30 s after each delivery.
const SHORTEST_PROXY: u64 = 60;

/// The grid PKI of make-fixtures.sh (CA directory with CRL, vomsdir, voms-proxy-fake proxies
/// with path length 10), readable by the payload's account for `voms-proxy-info`.
fn pki() -> &'static Path {
    grid_support::payload_pki("e2e-proxy-pki")
}

fn proxy(name: &str) -> String {
    pki()
        .join(format!("proxies/{name}.pem"))
        .display()
        .to_string()
}

/// A test's stack and accounts (the stack stops first).
struct Grid {
    stack: Stack,
    _accounts: Accounts,
}

/// VO `atlas` (the fixtures' ACs) whose server trusts the grid test CA and has Alice and Bob
/// of the grid PKI as members (`grid-alice`, `grid-bob` as client names), the demo bob as
/// membership manager and the demo carol as operator, worker proxies of `worker_proxy` seconds; a site that maps both to
/// the payload account and verifies proxies with the PKI's CA directory and vomsdir; a pilot
/// with 1 s heartbeats and polls and the shortest renewal margin.
fn grid(worker_proxy: u64) -> Grid {
    let accounts = Accounts::create(&[PILOT, ACCT]);
    let root = pki();
    let stack = Stack::start_with(
        PILOT,
        &[(ALICE, ACCT), (BOB, ACCT)],
        &["--vo", "atlas"],
        |vo| {
            std::fs::copy(
                root.join("pki/testca.pem"),
                vo.join("certificates/grid-test-ca.pem"),
            )
            .unwrap();
            for user in ["alice", "bob"] {
                std::fs::copy(
                    root.join(format!("pki/{user}.pem")),
                    vo.join(format!("grid-{user}.crt")),
                )
                .unwrap();
                std::fs::copy(
                    root.join(format!("pki/{user}.key")),
                    vo.join(format!("grid-{user}.key")),
                )
                .unwrap();
            }
            let server = vo.join("server.toml");
            let toml = std::fs::read_to_string(&server).unwrap();
            // The demo carol operates the VO (sees every payload's status).
            let toml = toml.replace(
                "operator_dns = []",
                "operator_dns = [\"/DC=org/DC=mupilot-demo/CN=carol\"]",
            );
            std::fs::write(&server, toml).unwrap();
            support::add_top_level_key(&server, &format!("worker_proxy_seconds = {worker_proxy}"));
            append(
                &vo.join("server.toml"),
                &format!(
                    "\n[[member]]\ndn = \"{ALICE}\"\nfqans = [\"/atlas\"]\n\n\
                     [[member]]\ndn = \"{BOB}\"\nfqans = [\"/atlas\"]\n\n\
                     [membership]\nmanager_dns = [\"{MANAGER}\"]\n"
                ),
            );
            append(
                &vo.join("switch.toml"),
                &format!(
                    "\n[grid]\ncert_dir = \"{}\"\nvomsdir = \"{}\"\n",
                    root.join("certificates").display(),
                    root.join("vomsdir").display()
                ),
            );
            for line in [
                "heartbeat_seconds = 1",
                "poll_interval_seconds = 1",
                "grace_seconds = 2",
                &format!("proxy_renew_margin_seconds = {SHORTEST_PROXY}"),
            ] {
                support::add_top_level_key(&vo.join("pilot.toml"), line);
            }
        },
    );
    Grid {
        stack,
        _accounts: accounts,
    }
}

fn append(p: &Path, text: &str) {
    let mut s = std::fs::read_to_string(p).unwrap();
    s.push_str(text);
    std::fs::write(p, s).unwrap();
}

/// Submits `script` as the grid user `who` (`grid-alice`) with `cred` (`--proxy FILE` or
/// `--delegation ID`).
fn submit(stack: &Stack, who: &str, cred: &[&str], script: &str) -> String {
    let mut args = vec!["--cores", "1", "--memory", "128M", "--walltime", "300"];
    args.extend_from_slice(cred);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    stack.submit(who, &args)
}

/// The payload's stdout as it reached the VO server (the output archive).
fn stdout_of(stack: &Stack, user: &str, id: &str) -> String {
    let out = stack.output(user, id);
    std::fs::read_to_string(find_file(&out, "stdout").expect("stdout in the output archive"))
        .unwrap()
}

fn audit_of(stack: &Stack, id: &str) -> Vec<serde_json::Value> {
    Stack::records(&stack.audit_log())
        .into_iter()
        .filter(|r| r["payload_id"] == id)
        .collect()
}

/// The value of voms-proxy-info's `key : value` line (the first of them).
fn info_field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            (k.trim() == key).then(|| v.trim())
        })
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

/// The holder of the VOMS AC voms-proxy-info found (its `subject` in the VO section).
fn ac_holder(text: &str) -> &str {
    let vo = text
        .split_once("=== VO atlas extension information ===")
        .unwrap_or_else(|| panic!("no VO atlas AC in:\n{text}"))
        .1;
    info_field(vo, "subject")
}

/// `serial=0A1B` (openssl x509 -serial) as the audit log writes serials: lower-case hex
/// without leading zeros.
fn audit_serial(openssl: &str) -> String {
    let hex = openssl.trim().trim_start_matches("serial=");
    let hex = hex.trim_start_matches('0').to_ascii_lowercase();
    if hex.is_empty() {
        "0".into()
    } else {
        hex
    }
}

/// The line of `text` after `prefix`.
fn line_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}"))
}

fn pilot_log(stack: &Stack) -> String {
    std::fs::read_to_string(stack.dir.path().join("pilot.log")).unwrap_or_default()
}

/// The payload's first proxy serial, then (within 70 s) the first other serial at
/// `$X509_USER_PROXY` and what voms-proxy-info says of that proxy.
const WAIT_FOR_RENEWAL: &str = "p=\"$X509_USER_PROXY\"; \
     s1=$(openssl x509 -noout -serial -in \"$p\"); echo \"first $s1\"; i=0; \
     while [ $i -lt 700 ]; do \
       s2=$(openssl x509 -noout -serial -in \"$p\" 2>/dev/null); \
       if [ -n \"$s2\" ] && [ \"$s2\" != \"$s1\" ]; then echo \"second $s2\"; \
         voms-proxy-info -all; exit 0; fi; \
       sleep 0.1; i=$((i+1)); done; echo 'no renewal'; exit 9";

/// The renewal a [`WAIT_FOR_RENEWAL`] payload saw: its two serials are the start record's and
/// the `proxy_renewed` record's, with the member's FQANs both times; the new proxy is still
/// the member's, with their FQANs, as voms-proxy-info reads it.
fn assert_renewed(stack: &Stack, id: &str) {
    let st = stack.status("grid-alice", id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
    assert_eq!(st["exit_code"], 0, "{st}");
    let text = stdout_of(stack, "grid-alice", id);
    let (first, second) = (line_after(&text, "first "), line_after(&text, "second "));
    assert_ne!(first, second, "{text}");
    assert_eq!(ac_holder(&text), ALICE, "{text}");
    assert_eq!(
        grid_support::fqans(&text),
        ["/atlas", "/atlas/prod/Role=production"],
        "{text}"
    );
    let recs = audit_of(stack, id);
    let start = recs.iter().find(|r| r["event"] == "start").unwrap();
    assert_eq!(start["proxy_serial"], audit_serial(first), "{start}");
    let renewed: Vec<_> = recs
        .iter()
        .filter(|r| r["event"] == "proxy_renewed")
        .collect();
    assert_eq!(renewed.len(), 1, "{recs:#?}");
    assert_eq!(renewed[0]["proxy_serial"], audit_serial(second));
    assert_eq!(renewed[0]["account"], ACCT);
    assert_eq!(
        renewed[0]["fqans"],
        serde_json::json!(["/atlas", "/atlas/prod/Role=production"])
    );
    let not_after = |r: &serde_json::Value| {
        DateTime::parse_from_rfc3339(r["proxy_not_after"].as_str().unwrap()).unwrap()
    };
    assert!(not_after(renewed[0]) > not_after(start), "{recs:#?}");
}

/// The proxy's not-after in the payload's start record, once it is there.
fn delivered_not_after(stack: &Stack, id: &str) -> DateTime<Utc> {
    let mut at = None;
    stack.wait_until("the start record", Duration::from_secs(30), || {
        at = audit_of(stack, id)
            .iter()
            .find(|r| r["event"] == "start")
            .and_then(|r| r["proxy_not_after"].as_str().map(str::to_string));
        at.is_some()
    });
    DateTime::parse_from_rfc3339(&at.unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn sleep_until(t: DateTime<Utc>) {
    if let Ok(d) = (t - Utc::now()).to_std() {
        std::thread::sleep(d);
    }
}

#[test]
fn a_members_proxy_reaches_the_payload_verified_with_their_fqans() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = grid(12 * 3600);
    let stack = &g.stack;
    let script = "p=\"$X509_USER_PROXY\"; echo \"proxy at $p\"; \
         stat -c 'file %a %u %g' \"$p\"; openssl x509 -noout -serial -in \"$p\"; \
         awk '/-BEGIN CERTIFICATE-/{n++; f=1} f{print > (\"cert\" n \".pem\")} /-END CERTIFICATE-/{f=0}' \"$p\"; \
         for c in cert?.pem; do openssl x509 -noout -subject -issuer -nameopt compat -in $c; done; \
         voms-proxy-info -all";
    let id = submit(
        stack,
        "grid-alice",
        &["--proxy", &proxy("delegable")],
        script,
    );
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());

    let st = stack.status("grid-alice", &id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
    assert_eq!(st["account"], ACCT);
    let text = stdout_of(stack, "grid-alice", &id);
    // The file X509_USER_PROXY names is in the payload's scratch, 0600, the account's.
    let user = nix::unistd::User::from_name(ACCT).unwrap().unwrap();
    let path = line_after(&text, "proxy at ");
    assert!(path.ends_with(&format!("/{id}/x509up")), "{text}");
    assert_eq!(
        line_after(&text, "file "),
        format!("600 {} {}", user.uid, user.gid),
        "{text}"
    );
    // voms-proxy-info, the ecosystem's own reader: the member's FQANs in VO atlas's AC,
    // whose holder is the member.
    assert_eq!(
        grid_support::fqans(&text),
        ["/atlas", "/atlas/prod/Role=production"],
        "{text}"
    );
    assert_eq!(info_field(&text, "VO"), "atlas", "{text}");
    assert_eq!(ac_holder(&text), ALICE, "{text}");
    // The file's chain, certificate by certificate, ends at the member: three proxies (the
    // worker node's, the VO server's, the member's own), each issued by the next, then
    // Alice's certificate from the test CA.
    let subjects: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("subject="))
        .collect();
    let issuers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("issuer="))
        .collect();
    assert_eq!(subjects.len(), 4, "{text}");
    assert_eq!(subjects[0], info_field(&text, "subject"), "{text}");
    for i in 0..3 {
        assert_eq!(issuers[i], subjects[i + 1], "{text}");
        assert!(subjects[i].starts_with(&format!("{ALICE}/CN=")), "{text}");
        assert_eq!(subjects[i].matches("/CN=").count(), 4 - i, "{text}");
    }
    assert_eq!(subjects[3], ALICE, "{text}");
    assert_eq!(issuers[3], "/DC=org/DC=mupilot-test/CN=Test CA", "{text}");

    // The helper's start record is the delivery record: the serial the payload read, the
    // proxy's not-after (12 h of worker_proxy_seconds), the verified FQANs.
    let recs = audit_of(stack, &id);
    let start = recs.iter().find(|r| r["event"] == "start").unwrap();
    assert_eq!(start["owner_dn"], ALICE, "{start}");
    assert_eq!(start["account"], ACCT);
    assert_eq!(
        start["proxy_serial"],
        audit_serial(line_after(&text, "serial=")),
        "{start}\n{text}"
    );
    let not_after = DateTime::parse_from_rfc3339(start["proxy_not_after"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let left = not_after - Utc::now();
    assert!(
        left > chrono::Duration::hours(11) && left <= chrono::Duration::hours(12),
        "{start}"
    );
    assert_eq!(
        start["fqans"],
        serde_json::json!(["/atlas", "/atlas/prod/Role=production"])
    );
    // The pilot account relayed a CSR and a chain: no private key in anything it wrote.
    let work = stack.vo.join("pilot-work");
    let found = Command::new("grep")
        .args(["-rl", "PRIVATE KEY"])
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "a private key in the pilot's files: {}",
        String::from_utf8_lossy(&found.stdout)
    );
    assert!(!pilot_log(stack).contains("PRIVATE KEY"));
}

#[test]
fn the_proxy_is_renewed_through_the_server_while_the_payload_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = grid(SHORTEST_PROXY);
    let stack = &g.stack;
    let id = submit(
        stack,
        "grid-alice",
        &["--proxy", &proxy("delegable")],
        WAIT_FOR_RENEWAL,
    );
    let t = Instant::now();
    let out = stack.run_pilot(&["--idle-timeout", "2"]);
    assert!(out.status.success(), "pilot failed:\n{}", stack.logs());
    // Renewed at half the proxy's life, not sooner, and not much later.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(SHORTEST_PROXY / 2 - 2) && took < Duration::from_secs(50),
        "{took:?}\n{}",
        stack.logs()
    );
    assert_renewed(stack, &id);
    assert!(pilot_log(stack).contains("payload's proxy renewed"));
}

#[test]
fn with_the_server_down_at_renewal_time_the_payload_keeps_its_proxy_and_the_pilot_retries() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = grid(SHORTEST_PROXY);
    let id = submit(
        &g.stack,
        "grid-alice",
        &["--proxy", &proxy("delegable")],
        WAIT_FOR_RENEWAL,
    );
    let mut pilot = g.stack.spawn_pilot(&["--idle-timeout", "2"]);
    let not_after = delivered_not_after(&g.stack, &id);
    // The pilot renews at not_after - 30 s: the server goes shortly before.
    sleep_until(not_after - chrono::Duration::seconds(35));
    g.stack.kill_server();
    let stack = &g.stack;
    stack.wait_until(
        "a renewal failing at the VO server",
        Duration::from_secs(30),
        || pilot_log(stack).contains("renewing the payload's proxy failed at the VO server"),
    );
    // The payload runs on with the proxy it has; nothing was replaced.
    assert!(
        !processes_of(Accounts::uid(ACCT)).is_empty(),
        "{}",
        stack.logs()
    );
    assert!(
        audit_of(stack, &id)
            .iter()
            .all(|r| r["event"] != "proxy_renewed" && r["event"] != "end"),
        "{}",
        stack.logs()
    );
    assert!(Utc::now() < not_after);
    g.stack.restart_server();
    let stack = &g.stack;
    // The retry (a quarter of the remaining life later) reaches the server, the payload sees
    // the new proxy and ends; its final state and outputs arrive.
    let st = support::wait_exit(stack, &mut pilot, Duration::from_secs(40));
    assert!(st.success(), "pilot: {st:?}\n{}", stack.logs());
    assert!(
        pilot_log(stack).contains("will be tried again"),
        "{}",
        stack.logs()
    );
    assert_renewed(stack, &id);
}

/// The VO server is down when the pilot asks for a matched payload's first proxy (the helper
/// SIGSTOPped until the server is killed): the payload was never launched, so the pilot hands
/// it back to the queue instead of failing it for an outage; once the server is back the
/// hand-back arrives, the payload is matched again and runs with its proxy. Nothing lost,
/// nothing run twice.
#[test]
fn with_the_server_down_at_launch_the_payload_is_handed_back_and_runs_later() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = grid(12 * 3600);
    let mut pilot = g.stack.spawn_pilot(&["--idle-timeout", "3"]);
    let stack = &g.stack;
    stack.wait_until("the pilot's hello", Duration::from_secs(20), || {
        pilot_log(stack).contains("helper connected")
    });
    let helper = Pid::from_raw(stack.switch.as_ref().unwrap().child.id() as i32);
    let stopped = Stopped::stop(helper, None);
    let id = submit(
        stack,
        "grid-alice",
        &["--proxy", &proxy("delegable")],
        "voms-proxy-info -all",
    );
    stack.wait_state("grid-alice", &id, "matched", Duration::from_secs(10));
    g.stack.kill_server();
    drop(stopped);
    let stack = &g.stack;
    stack.wait_until("the hand-back", Duration::from_secs(30), || {
        pilot_log(stack).contains("could not be reached for the payload's proxy")
    });
    assert!(audit_of(stack, &id).iter().all(|r| r["event"] != "start"));
    g.stack.restart_server();
    let stack = &g.stack;
    let st = support::wait_exit(stack, &mut pilot, Duration::from_secs(60));
    assert!(st.success(), "pilot: {st:?}\n{}", stack.logs());

    let st = stack.status("grid-alice", &id);
    assert_eq!(st["state"], "done", "{st}\n{}", stack.logs());
    let text = stdout_of(stack, "grid-alice", &id);
    assert_eq!(ac_holder(&text), ALICE, "{text}");
    // Once handed back (not launched, queued), once run: one start in the audit log.
    let trace: Vec<_> = Stack::records(&stack.trace_log())
        .into_iter()
        .filter(|r| r["payload_id"] == id.as_str() && r["event"] == "end")
        .collect();
    assert_eq!(trace.len(), 2, "{trace:#?}");
    assert_eq!(
        (&trace[0]["decision"], &trace[0]["state"]),
        (
            &serde_json::json!("not_launched"),
            &serde_json::json!("queued")
        ),
        "{trace:#?}"
    );
    assert_eq!(trace[1]["state"], "done", "{trace:#?}");
    let starts = audit_of(stack, &id)
        .iter()
        .filter(|r| r["event"] == "start")
        .count();
    assert_eq!(starts, 1);
}

/// While the helper is stopped (SIGSTOP by pid) the pilot has matched the payload and waits
/// for the helper's CSR; meanwhile the delegation expires (or its owner is removed). The pilot
/// then asks the server, which signs nothing, and the payload ends `failed` with the server's
/// reason: never launched, no start record, no process of the account.
#[test]
fn a_delegation_expired_or_an_owner_removed_before_the_pilot_asks_is_never_launched() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = grid(12 * 3600);
    let stack = &g.stack;
    let _pilot = stack.spawn_pilot(&["--idle-timeout", "60"]);
    stack.wait_until("the pilot's hello", Duration::from_secs(20), || {
        pilot_log(stack).contains("helper connected")
    });
    let helper = Pid::from_raw(stack.switch.as_ref().unwrap().child.id() as i32);
    let marker = stack.dir.path().join("ran");
    let script = format!("touch {}", marker.display());

    // Expired: a delegation of 8 s, matched at once, asked for after its end.
    let stopped = Stopped::stop(helper, None);
    let expires = Utc::now() + chrono::Duration::seconds(8);
    let a = submit(
        stack,
        "grid-alice",
        &["--proxy", &proxy("delegable"), "--lifetime", "8"],
        &script,
    );
    stack.wait_state("grid-alice", &a, "matched", Duration::from_secs(10));
    sleep_until(expires + chrono::Duration::seconds(1));
    drop(stopped);
    let st = stack.wait_state("grid-alice", &a, "failed", Duration::from_secs(20));
    let reason = st["reason"].as_str().unwrap();
    assert!(
        reason.contains("issued no proxy")
            && reason.contains("has expired")
            && reason.contains("mupilot-server delegate"),
        "{reason}"
    );

    // Removed: Bob is removed from the VO while his matched payload waits.
    let stopped = Stopped::stop(helper, None);
    let b = submit(
        stack,
        "grid-bob",
        &["--proxy", &proxy("delegable-bob")],
        &script,
    );
    stack.wait_state("grid-bob", &b, "matched", Duration::from_secs(10));
    let out = Command::new(bin("mupilot-server"))
        .args(["member", "remove", "--config"])
        .arg(stack.vo.join("server.toml"))
        .arg(BOB)
        .output()
        .unwrap();
    drop(stopped);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ended = None;
    stack.wait_until(
        "the pilot's end record for Bob's payload",
        Duration::from_secs(20),
        || {
            ended = Stack::records(&stack.trace_log())
                .into_iter()
                .find(|r| r["payload_id"] == b.as_str() && r["event"] == "end");
            ended.is_some()
        },
    );
    let end = ended.unwrap();
    assert_eq!(end["decision"], "not_launched", "{end}");
    // The VO's operator sees the final state and reason at the server.
    let st = stack.wait_state("carol", &b, "failed", Duration::from_secs(20));
    assert_eq!(st["reason"], end["reason"], "{st}");
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.contains("issued no proxy") && reason.contains("not an active member"),
        "{reason}"
    );

    // Neither was launched under any credential: the helper never started them.
    for id in [&a, &b] {
        let recs = audit_of(stack, id);
        assert!(recs.iter().all(|r| r["event"] != "start"), "{recs:#?}");
    }
    assert!(!marker.exists());
    assert!(processes_of(Accounts::uid(ACCT)).is_empty());
}

/// A VO manager suspends the member while their delegated payload runs. The server signs no
/// further proxy for it (asked while the pilot is stopped, so before the cancel reaches the
/// node), and the cancel ends the payload through the helper.
#[test]
fn a_member_suspended_while_the_payload_runs_gets_no_new_proxy_and_is_cancelled() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = grid(12 * 3600);
    let stack = &g.stack;
    let id = submit(
        stack,
        "grid-alice",
        &["--proxy", &proxy("delegable")],
        "sleep 300",
    );
    let mut pilot = stack.spawn_pilot(&["--idle-timeout", "2"]);
    stack.wait_state("grid-alice", &id, "running", Duration::from_secs(30));
    let uid = Accounts::uid(ACCT);
    assert!(!processes_of(uid).is_empty());

    let runuser = Pid::from_raw(pilot.child.id() as i32);
    let stopped = Stopped::stop(pilot_pid(&pilot), Some(runuser));
    let out = stack.client_in(
        "bob",
        &["membership", "suspend"],
        &[
            ALICE,
            "--reason",
            "credential reported compromised",
            "--verification",
            "reviewed with the security officer",
        ],
    );
    // A renewal as the pilot would ask for it: refused, naming why.
    let (status, body) = ask_proxy(stack, &id);
    drop(stopped);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(ALICE) && body.contains("not an active member"),
        "{body}"
    );

    let st = stack.wait_state("grid-alice", &id, "cancelled", Duration::from_secs(30));
    assert!(st["reason"].as_str().unwrap_or("").contains("bob"), "{st}");
    stack.wait_until(
        "the payload's processes gone",
        Duration::from_secs(10),
        || processes_of(uid).is_empty(),
    );
    let recs = audit_of(stack, &id);
    let start = recs.iter().find(|r| r["event"] == "start").unwrap();
    assert!(start["proxy_serial"].is_string(), "{start}");
    assert!(recs.iter().any(|r| r["event"] == "end"), "{recs:#?}");
    assert!(
        recs.iter().all(|r| r["event"] != "proxy_renewed"),
        "{recs:#?}"
    );
    // The pilot reported it and left, idle.
    let st = support::wait_exit(stack, &mut pilot, Duration::from_secs(20));
    assert!(st.success(), "pilot: {st:?}\n{}", stack.logs());
}

/// A process of the test's stopped with SIGSTOP (by pid) until dropped: a failing assertion
/// never leaves the helper or the pilot stopped behind it. `also` are continued with it: the
/// `runuser` above the pilot stops itself when its child stops (as su does) and stays so.
struct Stopped {
    pid: Pid,
    also: Option<Pid>,
}

impl Stopped {
    fn stop(pid: Pid, also: Option<Pid>) -> Stopped {
        kill(pid, Signal::SIGSTOP).unwrap();
        Stopped { pid, also }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for p in self.also.iter().chain([&self.pid]) {
            let _ = kill(*p, Signal::SIGCONT);
        }
    }
}

/// `POST /v1/payloads/{id}/proxy` as the stack's pilot, for a fresh key: status and body.
fn ask_proxy(stack: &Stack, id: &str) -> (u16, String) {
    let vo = &stack.vo;
    let client = mupilot::tls::https_client(
        &vo.join("pilot.crt"),
        &vo.join("pilot.key"),
        &vo.join("certificates"),
    )
    .unwrap();
    let csr = mupilot::grid::delegation::new_key_request()
        .unwrap()
        .csr_pem;
    let url = format!("{}/v1/payloads/{id}/proxy", stack.url());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let r = client
                .post(url)
                .json(&mupilot::protocol::delegation::ProxyCsr { csr_pem: csr })
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
}
