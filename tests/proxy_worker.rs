//! The worker-node side of delegated proxies (issue 17 item 3) against the real helper: the
//! helper makes the payload's key and answers a CSR, a proxy signed for it (by the openssl CLI,
//! under a voms-proxy-fake proxy, as the VO server would) is verified and delivered into the
//! payload's scratch, the payload reads it with `voms-proxy-info`, and a renewal while it runs
//! replaces the file. Then each refusal, attacked as the pilot would. Runs as root with real
//! accounts; needs Debian's voms-clients (tests/grid_support/make-fixtures.sh).

#![cfg(feature = "grid")]

#[path = "grid_support/mod.rs"]
mod grid_support;
#[path = "switch_support/mod.rs"]
mod switch_support;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{Duration as CDuration, Utc};
use mupilot::protocol::delegation::{CredentialKind, DelegatedCredential};
use mupilot::protocol::envelope::EnvelopeBody;
use mupilot::protocol::switch_wire::{DenialClass, SwitchEvent, SwitchRequest};
use mupilot::protocol::SignedEnvelope;
use switch_support::*;

use grid_support::{ALICE, BOB};

/// The grid PKI (CA directory with CRL, vomsdir, voms-proxy-fake proxies), made once per run
/// under cargo's target tmpdir, readable by the payload's account (not under the private /tmp).
fn pki() -> &'static Path {
    grid_support::payload_pki("proxy-worker-pki")
}

/// A site whose switch.toml has a `[grid]` table (unless `grid` is false), maps Alice and Bob
/// to the test account and knows VO atlas.
fn grid_site(grid: bool) -> Site {
    let site = Site::new();
    let mut map = std::fs::read_to_string(&site.gridmap).unwrap();
    map.push_str(&format!("\"{ALICE}\" {ACCT}\n\"{BOB}\" {ACCT}\n"));
    std::fs::write(&site.gridmap, map).unwrap();
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str("[[vo]]\nname = \"atlas\"\npublic_key = \"vo.pub\"\n");
    if grid {
        cfg.push_str(&format!(
            "[grid]\ncert_dir = \"{}\"\nvomsdir = \"{}\"\n",
            pki().join("certificates").display(),
            pki().join("vomsdir").display()
        ));
    }
    std::fs::write(&site.config, cfg).unwrap();
    site
}

/// An envelope of `dn` in VO atlas that carries a delegated credential.
fn delegated(site: &Site, dn: &str, argv: &[&str]) -> (EnvelopeBody, SignedEnvelope) {
    let mut body = site.body(dn, argv);
    body.owner.vo = "atlas".into();
    body.owner.fqans = vec![];
    body.credential = Some(DelegatedCredential {
        kind: CredentialKind::X509Proxy,
        not_after: Utc::now() + CDuration::days(1),
    });
    let env = site.sign(&body);
    (body, env)
}

/// Signs `csr_pem` as the VO server would: a proxy below the voms-proxy-fake proxy `parent`
/// (its subject plus one CN), with serial `serial`; returns the chain, new proxy first.
fn sign(csr_pem: &str, parent: &str, serial: u32) -> String {
    let d = tempfile::tempdir().unwrap();
    let parent = pki().join("proxies").join(format!("{parent}.pem"));
    let csr = d.path().join("req.csr");
    std::fs::write(&csr, csr_pem).unwrap();
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "compat", "-in"])
        .arg(&parent)
        .output()
        .unwrap();
    let subject = String::from_utf8(subject.stdout).unwrap();
    let subject = subject.trim().trim_start_matches("subject=");
    let out = d.path().join("new.pem");
    let st = Command::new("openssl")
        .args(["x509", "-req", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&parent)
        .arg("-CAkey")
        .arg(&parent)
        .arg("-set_serial")
        .arg(format!("0x{serial:x}"))
        .args(["-days", "1", "-extfile"])
        .arg(pki().join("pki/proxy.ext"))
        .arg("-subj")
        .arg(format!("{subject}/CN={serial}"))
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut chain = std::fs::read_to_string(&out).unwrap();
    // The parent's certificates (its key skipped): the delegated chain up to Alice's own.
    let text = std::fs::read_to_string(&parent).unwrap();
    for block in text.split_inclusive("-----END CERTIFICATE-----\n") {
        if let Some(at) = block.find("-----BEGIN CERTIFICATE-----") {
            chain.push_str(&block[at..]);
        }
    }
    chain
}

fn csr_of(ev: SwitchEvent) -> String {
    match ev {
        SwitchEvent::ProxyCsr { csr_pem, .. } => csr_pem,
        other => panic!("expected proxy_csr, got {other:?}"),
    }
}

/// Output files for a payload, in a directory its account cannot reach (the pilot's).
struct Outputs {
    dir: tempfile::TempDir,
    out: std::fs::File,
    err: std::fs::File,
}

impl Outputs {
    fn new() -> Outputs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let err = std::fs::File::create(dir.path().join("err")).unwrap();
        Outputs { dir, out, err }
    }
    fn fds(&self) -> [i32; 2] {
        [self.out.as_raw_fd(), self.err.as_raw_fd()]
    }
    fn text(&self) -> String {
        let o = std::fs::read_to_string(self.dir.path().join("out")).unwrap();
        let e = std::fs::read_to_string(self.dir.path().join("err")).unwrap();
        format!("{o}\n--- stderr ---\n{e}")
    }
}

fn launch_with_proxy(
    c: &mut Client,
    env: &SignedEnvelope,
    chain_pem: &str,
    outs: Option<&Outputs>,
) -> SwitchEvent {
    let fds = outs.map(|o| o.fds().to_vec()).unwrap_or_default();
    c.call(
        &SwitchRequest::LaunchWithProxy {
            envelope: env.clone(),
            bundle_fd: None,
            chain_pem: chain_pem.to_string(),
        },
        &fds,
    )
}

fn wait_exit(c: &mut Client, payload_id: &str) -> Option<i32> {
    loop {
        match c.recv() {
            SwitchEvent::Exited {
                payload_id: p,
                report,
            } if p == payload_id => return report.exit_code,
            SwitchEvent::Exited { .. } => {}
            other => panic!("expected exited, got {other:?}"),
        }
    }
}

#[test]
fn payload_reads_its_delivered_proxy_with_voms_proxy_info() {
    let _u = Users::acquire();
    let site = grid_site(true);
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let script =
        "ls -ln \"$X509_USER_PROXY\"; echo \"dir=$X509_CERT_DIR vomsdir=$X509_VOMS_DIR\"; \
                  voms-proxy-info -all -file \"$X509_USER_PROXY\"";
    let (body, env) = delegated(&site, ALICE, &["/bin/sh", "-c", script]);

    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST"), "{csr}");
    // Asking again costs no new key: the same request.
    let again = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    assert_eq!(again, csr);

    let chain = sign(&csr, "good", 0x5a01);
    let outs = Outputs::new();
    match launch_with_proxy(&mut c, &env, &chain, Some(&outs)) {
        SwitchEvent::Started { payload_id, .. } => assert_eq!(payload_id, body.payload_id),
        other => panic!("expected started, got {other:?}\n{}", site.records().len()),
    }
    let code = wait_exit(&mut c, &body.payload_id);
    let text = outs.text();
    assert_eq!(code, Some(0), "{text}");
    let uid = uid_of(ACCT).unwrap();
    // 0600, the account's, where X509_USER_PROXY says; the site's CA dir and vomsdir named.
    assert!(
        text.contains(&format!("-rw------- 1 {uid} ")),
        "proxy file mode/owner: {text}"
    );
    assert!(text.contains(&format!(
        "dir={} vomsdir={}",
        pki().join("certificates").display(),
        pki().join("vomsdir").display()
    )));
    let attrs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("attribute : "))
        .collect();
    assert_eq!(attrs, ["/atlas", "/atlas/prod/Role=production"], "{text}");
    assert!(text.contains(&format!("identity  : {ALICE}")), "{text}");
    assert!(
        text.contains("/CN=23041"),
        "the delivered proxy is the new one: {text}"
    );

    // The start record is the delivery record: serial, not-after, the verified FQANs.
    let recs = site.records_of(&body.payload_id);
    let start = recs.iter().find(|r| r["event"] == "start").unwrap();
    assert_eq!(start["proxy_serial"], "5a01", "{start}");
    assert!(start["proxy_not_after"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        start["fqans"],
        serde_json::json!(["/atlas", "/atlas/prod/Role=production"])
    );

    // The envelope ran once: asking for a key for it again is a replay.
    let (_, class, reason) = denied(c.call(&SwitchRequest::ProxyRequest { envelope: env }, &[]));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("replayed"), "{reason}");
}

#[test]
fn proxy_renewed_while_the_payload_runs_and_a_planted_link_is_not_followed() {
    let _u = Users::acquire();
    let site = grid_site(true);
    let _d = site.start();
    let victim = site.scratch.path().join("victim");
    std::fs::write(&victim, "root's file\n").unwrap();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    // The payload notes its proxy's serial, plants a link to a root file at the proxy's path,
    // says so, and waits (at most 30 s) for a proxy file with another serial.
    let script = format!(
        "p=\"$X509_USER_PROXY\"; s1=$(openssl x509 -noout -serial -in \"$p\"); echo first $s1; \
         rm -f \"$p\"; ln -s {} \"$p\"; touch \"$HOME/planted\"; i=0; \
         while [ $i -lt 300 ]; do \
           if [ -f \"$p\" ] && [ ! -L \"$p\" ]; then s2=$(openssl x509 -noout -serial -in \"$p\" 2>/dev/null); \
             if [ -n \"$s2\" ] && [ \"$s2\" != \"$s1\" ]; then echo second $s2; exit 0; fi; fi; \
           sleep 0.1; i=$((i+1)); done; exit 9",
        victim.display()
    );
    let (body, env) = delegated(&site, ALICE, &["/bin/sh", "-c", &script]);
    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    let first_chain = sign(&csr, "good", 0x5b01);
    let outs = Outputs::new();
    let scratch = match launch_with_proxy(&mut c, &env, &first_chain, Some(&outs)) {
        SwitchEvent::Started { scratch, .. } => PathBuf::from(scratch),
        other => panic!("expected started, got {other:?}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scratch.join("planted").exists() {
        assert!(Instant::now() < deadline, "payload never planted its link");
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = body.payload_id.as_str();

    // Another pilot (connection) cannot renew this payload.
    let mut other = Client::hello(&site.socket, Client::default_hello());
    match other.call(
        &SwitchRequest::ProxyRenew {
            payload_id: id.into(),
        },
        &[],
    ) {
        SwitchEvent::ProxyRefused { reason, .. } => {
            assert!(reason.contains("not running for this pilot"), "{reason}")
        }
        ev => panic!("another pilot renewed: {ev:?}"),
    }
    // Replaying the launch's chain as the renewal: there is no renewal key yet ...
    match c.call(
        &SwitchRequest::ProxyRenewed {
            payload_id: id.into(),
            chain_pem: first_chain.clone(),
        },
        &[],
    ) {
        SwitchEvent::ProxyRefused { reason, .. } => {
            assert!(reason.contains("send proxy_request first"), "{reason}")
        }
        ev => panic!("{ev:?}"),
    }
    // ... and with one, the old chain is not for it.
    csr_of(c.call(
        &SwitchRequest::ProxyRenew {
            payload_id: id.into(),
        },
        &[],
    ));
    match c.call(
        &SwitchRequest::ProxyRenewed {
            payload_id: id.into(),
            chain_pem: first_chain.clone(),
        },
        &[],
    ) {
        SwitchEvent::ProxyRefused { reason, .. } => {
            assert!(reason.contains("not for the key"), "{reason}")
        }
        ev => panic!("{ev:?}"),
    }

    // The real renewal.
    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRenew {
            payload_id: id.into(),
        },
        &[],
    ));
    let chain = sign(&csr, "good", 0x5b02);
    match c.call(
        &SwitchRequest::ProxyRenewed {
            payload_id: id.into(),
            chain_pem: chain,
        },
        &[],
    ) {
        SwitchEvent::ProxyDelivered { serial, .. } => assert_eq!(serial, "5b02"),
        ev => panic!("expected proxy_delivered, got {ev:?}"),
    }
    let code = wait_exit(&mut c, id);
    let text = outs.text();
    assert_eq!(code, Some(0), "the payload saw no new serial: {text}");
    assert!(text.contains("first serial=5B01"), "{text}");
    assert!(text.contains("second serial=5B02"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "root's file\n",
        "the renewal wrote through the payload's link"
    );

    let recs = site.records_of(id);
    let renewed: Vec<_> = recs
        .iter()
        .filter(|r| r["event"] == "proxy_renewed")
        .collect();
    assert_eq!(renewed.len(), 1, "{recs:?}");
    assert_eq!(renewed[0]["proxy_serial"], "5b02");
    assert_eq!(
        renewed[0]["fqans"],
        serde_json::json!(["/atlas", "/atlas/prod/Role=production"])
    );
    let refused = recs
        .iter()
        .filter(|r| r["event"] == "proxy_refused")
        .count();
    assert_eq!(refused, 3, "{recs:?}");
}

#[test]
fn each_refusal_is_a_denial_naming_what_failed() {
    let _u = Users::acquire();
    let site = grid_site(true);
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let argv = ["/bin/true"];

    // An envelope with a credential launched without a proxy.
    let (_, env) = delegated(&site, ALICE, &argv);
    let (_, class, reason) = denied(c.launch(&env, None));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("launch carried none"), "{reason}");

    // A chain without a key made for the envelope.
    let (_, env) = delegated(&site, ALICE, &argv);
    let chain = sign(
        &csr_of(c.call(&SwitchRequest::ProxyRequest { envelope: env }, &[])),
        "good",
        0x5c01,
    );
    let (_, env2) = delegated(&site, ALICE, &argv);
    let (_, class, reason) = denied(launch_with_proxy(&mut c, &env2, &chain, None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("send proxy_request first"), "{reason}");

    // A chain issued for another envelope's key (a CSR swapped or an old chain replayed).
    let (_, env3) = delegated(&site, ALICE, &argv);
    csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env3.clone(),
        },
        &[],
    ));
    let (_, class, reason) = denied(launch_with_proxy(&mut c, &env3, &chain, None));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("not for the key"), "{reason}");

    // A proxy of someone else than the envelope's owner.
    let (_, env) = delegated(&site, BOB, &argv);
    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    let (_, class, reason) = denied(launch_with_proxy(
        &mut c,
        &env,
        &sign(&csr, "good", 0x5c02),
        None,
    ));
    assert_eq!(class, DenialClass::Authorization);
    assert!(
        reason.contains("owner mismatch") && reason.contains(BOB),
        "{reason}"
    );

    // A proxy below a revoked certificate, and one of another VO: the verifier's refusals.
    let (_, env) = delegated(&site, "/DC=org/DC=mupilot-test/CN=Mallory", &argv);
    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    let (_, class, reason) = denied(launch_with_proxy(
        &mut c,
        &env,
        &sign(&csr, "revoked", 0x5c03),
        None,
    ));
    assert_eq!(class, DenialClass::Authorization);
    assert!(reason.contains("revoked"), "{reason}");
    let (_, env) = delegated(&site, ALICE, &argv);
    let csr = csr_of(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    let (_, _, reason) = denied(launch_with_proxy(
        &mut c,
        &env,
        &sign(&csr, "other-vo", 0x5c04),
        None,
    ));
    assert!(reason.contains("AC is for VO cms"), "{reason}");

    // A chain for an envelope without a credential; a key for one.
    let plain = site.sign(&site.body(ALICE, &argv));
    let (_, class, reason) = denied(launch_with_proxy(&mut c, &plain, &chain, None));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("carries no credential"), "{reason}");
    let plain = site.sign(&site.body(ALICE, &argv));
    let (_, _, reason) = denied(c.call(&SwitchRequest::ProxyRequest { envelope: plain }, &[]));
    assert!(
        reason.contains("without a delegated credential"),
        "{reason}"
    );

    // Every denial is in the audit log with its reason; no payload started.
    let recs = site.records();
    assert!(recs.iter().all(|r| r["event"] != "start"), "{recs:?}");
    let denials = recs.iter().filter(|r| r["event"] == "denied").count();
    assert_eq!(denials, 8, "{recs:?}");

    // A CSR flood: keys are bounded per connection, and dropped with it.
    let mut made = 0;
    let reason = loop {
        let (_, env) = delegated(&site, ALICE, &argv);
        match c.call(&SwitchRequest::ProxyRequest { envelope: env }, &[]) {
            SwitchEvent::ProxyCsr { .. } => made += 1,
            ev => break denied(ev).2,
        }
        assert!(made <= 64, "no bound on pending keys");
    };
    assert!(reason.contains("at most 64"), "{reason}");
    drop(c);
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let (_, env) = delegated(&site, ALICE, &argv);
    csr_of(c.call(&SwitchRequest::ProxyRequest { envelope: env }, &[]));
}

#[test]
fn a_site_without_grid_refuses_delegated_envelopes_as_a_system_denial() {
    let _u = Users::acquire();
    let site = grid_site(false);
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let (_, env) = delegated(&site, ALICE, &["/bin/true"]);
    let (_, class, reason) = denied(c.call(
        &SwitchRequest::ProxyRequest {
            envelope: env.clone(),
        },
        &[],
    ));
    assert_eq!(class, DenialClass::System);
    assert!(reason.contains("add a [grid] table"), "{reason}");
    let (_, class, reason) = denied(c.launch(&env, None));
    assert_eq!(class, DenialClass::System);
    assert!(reason.contains("add a [grid] table"), "{reason}");
    // Payloads without credentials are not affected.
    let plain = site.sign(&site.body(DN_ALICE, &["/bin/true"]));
    match c.launch(&plain, None) {
        SwitchEvent::Started { payload_id, .. } => {
            assert_eq!(wait_exit(&mut c, &payload_id), Some(0))
        }
        ev => panic!("{ev:?}"),
    }
}
