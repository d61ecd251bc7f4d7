//! The grid credential verifier (src/grid) against a real PKI made by the ecosystem's tools
//! (tests/grid_support/make-fixtures.sh: openssl CA directory with hashed names and a CRL,
//! proxies with VOMS ACs from voms-proxy-fake), with `openssl verify -allow_proxy_certs` and
//! `voms-proxy-info` as independent judges. Needs Debian's voms-clients (scripts/test.sh
//! installs it). No root, no shared state: every test works in its own copy of the PKI.

#![cfg(feature = "grid")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use chrono::{Duration, Utc};
use mupilot::grid::{Claim, CredentialRefusal, GridConfig, LimitedProxies, Verifier};

mod grid_support;

const ALICE: &str = "/DC=org/DC=mupilot-test/CN=Alice";

/// The PKI, made afresh once per test run (tests/grid_support).
fn pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| grid_support::make("grid-pki"))
}

/// A private copy of the PKI, for tests that change the CA directory or vomsdir.
fn pki_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", pki().display()))
        .arg(d.path())
        .status()
        .unwrap();
    assert!(st.success());
    d
}

fn config(root: &Path) -> GridConfig {
    GridConfig {
        cert_dir: root.join("certificates"),
        vomsdir: root.join("vomsdir"),
        max_proxy_lifetime_seconds: 48 * 3600,
        ..GridConfig::default()
    }
}

fn proxy(root: &Path, name: &str) -> Vec<u8> {
    std::fs::read(root.join("proxies").join(format!("{name}.pem"))).unwrap()
}

fn refusal(cfg: GridConfig, name: &str) -> String {
    let v = Verifier::new(cfg);
    match v.verify(
        &proxy(pki(), name),
        &Claim::owner(ALICE, "atlas"),
        Utc::now(),
    ) {
        Ok(c) => panic!("{name} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn openssl_verify(root: &Path, name: &str) -> bool {
    let p = root.join("proxies").join(format!("{name}.pem"));
    Command::new("openssl")
        .args(["verify", "-allow_proxy_certs", "-crl_check_all", "-CApath"])
        .arg(root.join("certificates"))
        .arg("-untrusted")
        .arg(&p)
        .arg(&p)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn good_proxy_is_accepted_and_the_ecosystem_agrees() {
    let root = pki();
    let v = Verifier::new(config(root));
    let c = v
        .verify(
            &proxy(root, "good"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(c.owner_dn, ALICE);
    assert_eq!(c.issuer_dn, "/DC=org/DC=mupilot-test/CN=Test CA");
    assert_eq!(c.vo, "atlas");
    assert_eq!(c.fqans, ["/atlas", "/atlas/prod/Role=production"]);
    assert_eq!(c.ac_signer, "/DC=org/DC=mupilot-test/CN=voms.example");
    assert_eq!(c.voms_uri, "voms.example:15000");
    assert_eq!(c.proxy_serials.len(), 1);
    assert!(!c.limited);
    assert!(
        c.not_after > Utc::now() + Duration::hours(11)
            && c.not_after < Utc::now() + Duration::hours(13)
    );

    // openssl verify accepts the chain; voms-proxy-info reads the same VO and FQANs.
    assert!(openssl_verify(root, "good"));
    let out = Command::new("voms-proxy-info")
        .args(["-all", "-file"])
        .arg(root.join("proxies/good.pem"))
        .env("X509_CERT_DIR", root.join("certificates"))
        .env("X509_VOMS_DIR", root.join("vomsdir"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let attrs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("attribute : "))
        .collect();
    assert_eq!(attrs, c.fqans, "{text}");
    assert!(text.contains(&format!("identity  : {ALICE}")), "{text}");
    assert!(text.contains("VO        : atlas"), "{text}");
    let serial = text
        .lines()
        .find_map(|l| l.strip_prefix("subject   : "))
        .unwrap();
    assert!(
        serial.to_lowercase().ends_with(&format!(
            "/cn={}",
            u64::from_str_radix(&c.proxy_serials[0], 16).unwrap()
        )),
        "{serial} vs {:?}",
        c.proxy_serials
    );

    // The control for the tampered AC: the same AC re-wrapped by the fixture script verifies.
    let c = v
        .verify(
            &proxy(root, "rewrapped"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(c.fqans, ["/atlas", "/atlas/prod/Role=production"]);
}

/// Proxies refused by one check each: the refusal's start, and whether `openssl verify
/// -allow_proxy_certs` accepts the chain (true where only the AC or a site rule catches it).
#[test]
fn each_refusal_names_the_check_and_openssl_agrees_on_the_chain() {
    let cases: &[(&str, &str, bool)] = &[
        ("expired", "proxy expired at 20", false),
        (
            "unknown-ca",
            "issuer /DC=org/DC=elsewhere/CN=Other CA of /DC=org/DC=elsewhere/CN=Eve not in the CA directory",
            false,
        ),
        ("revoked", "certificate revoked: /DC=org/DC=mupilot-test/CN=Mallory", false),
        (
            "rogue-signer",
            "AC signer /DC=org/DC=mupilot-test/CN=voms-rogue.example not in vomsdir/atlas",
            true,
        ),
        (
            "tampered-ac",
            "AC signature does not verify with the key of /DC=org/DC=mupilot-test/CN=voms.example",
            true,
        ),
        ("ac-expired", "AC expired at 20", true),
        ("no-ac", "no VOMS attribute certificate", true),
    ];
    for (name, start, chain_ok) in cases {
        let e = refusal(config(pki()), name);
        assert!(e.starts_with(start), "{name}: {e}");
        assert_eq!(
            openssl_verify(pki(), name),
            *chain_ok,
            "openssl verify on {name}"
        );
    }
}

#[test]
fn ac_of_another_vo() {
    let e = refusal(config(pki()), "other-vo");
    assert_eq!(e, "AC is for VO cms, the envelope's VO is atlas");
    // Valid as a cms credential: the refusal is the VO, not the AC.
    let v = Verifier::new(config(pki()));
    let c = v
        .verify(
            &proxy(pki(), "other-vo"),
            &Claim::owner(ALICE, "cms"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(c.fqans, ["/cms", "/cms/prod/Role=production"]);
}

#[test]
fn ac_taken_from_another_users_proxy() {
    // Alice's genuine AC inside a proxy Bob signed: every signature holds, the holder does not.
    let v = Verifier::new(config(pki()));
    let e = v
        .verify(
            &proxy(pki(), "stolen-ac"),
            &Claim::owner("/DC=org/DC=mupilot-test/CN=Bob", "atlas"),
            Utc::now(),
        )
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "AC holder /DC=org/DC=mupilot-test/CN=Alice serial 1001 is not the proxy's end-entity \
         certificate /DC=org/DC=mupilot-test/CN=Bob serial 1003"
    );
    assert!(openssl_verify(pki(), "stolen-ac"));
}

#[test]
fn not_yet_valid_at_the_given_time() {
    let v = Verifier::new(config(pki()));
    let e = v
        .verify(
            &proxy(pki(), "good"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now() - Duration::days(1),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("certificate not valid before 20") && e.ends_with(ALICE),
        "{e}"
    );
}

#[test]
fn dn_mismatch_with_the_envelope() {
    let v = Verifier::new(config(pki()));
    let e = v
        .verify(
            &proxy(pki(), "good"),
            &Claim::owner("/DC=org/DC=mupilot-test/CN=Bob", "atlas"),
            Utc::now(),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("owner mismatch: the proxy is {ALICE}, the envelope names /DC=org/DC=mupilot-test/CN=Bob")
    );
}

#[test]
fn limited_proxy_per_site_policy() {
    let e = refusal(config(pki()), "limited");
    assert!(e.starts_with("limited proxy refused by site policy"), "{e}");
    let cfg = GridConfig {
        limited_proxies: LimitedProxies::Accept,
        ..config(pki())
    };
    let c = Verifier::new(cfg)
        .verify(
            &proxy(pki(), "limited"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert!(c.limited);
}

#[test]
fn chain_too_long_and_path_length() {
    let cfg = GridConfig {
        max_chain_length: 3,
        ..config(pki())
    };
    assert_eq!(refusal(cfg, "chain4"), "chain too long: 4 proxies > max 3");
    assert!(
        openssl_verify(pki(), "chain4"),
        "a site limit, not a broken chain"
    );
    let c = Verifier::new(config(pki()))
        .verify(
            &proxy(pki(), "chain4"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(c.proxy_serials.len(), 4);
    assert_eq!(&c.proxy_serials[..3], ["7d4", "7d3", "7d2"]);

    let e = refusal(config(pki()), "pathlen");
    assert!(
        e.starts_with("proxy path length exceeded:")
            && e.contains("allows 1 proxies below it, the chain has 2"),
        "{e}"
    );
    assert!(!openssl_verify(pki(), "pathlen"));
    let e = refusal(config(pki()), "badname");
    assert!(
        e.contains("is not its issuer") && e.contains("plus one CN"),
        "{e}"
    );
    assert!(!openssl_verify(pki(), "badname"));
}

#[test]
fn lifetime_above_the_site_maximum() {
    let e = refusal(config(pki()), "long-lived");
    assert!(
        e.starts_with("proxy lifetime ") && e.contains("above the site maximum 48 h"),
        "{e}"
    );
    let cfg = GridConfig {
        max_proxy_lifetime_seconds: 1_000_000,
        ..config(pki())
    };
    Verifier::new(cfg)
        .verify(
            &proxy(pki(), "long-lived"),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
}

#[test]
fn non_proxies_and_garbage() {
    let v = Verifier::new(config(pki()));
    let ee = std::fs::read(pki().join("pki/alice.pem")).unwrap();
    let e = v
        .verify(&ee, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err();
    assert!(matches!(e, CredentialRefusal::NotAProxy { .. }), "{e}");
    let e = v
        .verify(b"garbage", &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err();
    assert!(e.to_string().starts_with("credential unreadable"), "{e}");
}

#[test]
fn cache_keeps_checking_the_claim_and_expires_with_the_credential() {
    let v = Verifier::new(config(pki()));
    let good = proxy(pki(), "good");
    let now = Utc::now();
    v.verify(&good, &Claim::owner(ALICE, "atlas"), now).unwrap();
    // Cached, yet the claim is checked on every call.
    let e = v
        .verify(&good, &Claim::owner("/DC=org/CN=Bob", "atlas"), now)
        .unwrap_err();
    assert!(matches!(e, CredentialRefusal::OwnerMismatch { .. }));
    let e = v
        .verify(&good, &Claim::owner(ALICE, "cms"), now)
        .unwrap_err();
    assert!(matches!(e, CredentialRefusal::AcVo { .. }));
    // Past the credential's not-after the cached entry is gone and the proxy refused.
    let e = v
        .verify(
            &good,
            &Claim::owner(ALICE, "atlas"),
            now + Duration::hours(13),
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("proxy expired at"), "{e}");
}

#[test]
fn new_crl_and_removed_lsc_take_effect_despite_the_cache() {
    let d = pki_copy();
    let root = d.path();
    let v = Verifier::new(config(root));
    let good = proxy(root, "good");
    v.verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap();

    // The CA revokes Alice; a new CRL is renamed into place, as fetch-crl does.
    let pki = root.join("pki");
    let ca = |args: &[&str]| {
        let out = Command::new("openssl")
            .arg("ca")
            .args([
                "-config",
                "ca.cnf",
                "-keyfile",
                "testca.key",
                "-cert",
                "testca.pem",
            ])
            .args(args)
            .current_dir(&pki)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ca(&["-revoke", "alice.pem"]);
    ca(&["-gencrl", "-out", "new.crl"]);
    let crl = std::fs::read_dir(root.join("certificates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "r0"))
        .unwrap();
    std::fs::rename(pki.join("new.crl"), &crl).unwrap();
    let e = v
        .verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("certificate revoked: {ALICE}")),
        "{e}"
    );

    // A fresh copy: the site drops the VO's .lsc.
    let d = pki_copy();
    let root = d.path();
    let v = Verifier::new(config(root));
    let good = proxy(root, "good");
    v.verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap();
    std::fs::remove_file(root.join("vomsdir/atlas/voms.example.lsc")).unwrap();
    let e = v
        .verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err();
    assert!(e.to_string().contains("not in vomsdir/atlas (no "), "{e}");
}

#[test]
fn an_expired_or_missing_crl_refuses_every_chain_of_its_ca() {
    let d = pki_copy();
    let root = d.path();
    let crl = std::fs::read_dir(root.join("certificates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "r0"))
        .unwrap();
    let out = Command::new("openssl")
        .args([
            "ca",
            "-config",
            "ca.cnf",
            "-keyfile",
            "testca.key",
            "-cert",
            "testca.pem",
        ])
        .args([
            "-gencrl",
            "-crl_lastupdate",
            "20200101000000Z",
            "-crl_nextupdate",
            "20200102000000Z",
        ])
        .args(["-out", "old.crl"])
        .current_dir(root.join("pki"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(root.join("pki/old.crl"), &crl).unwrap();
    let good = proxy(root, "good");
    let v = Verifier::new(config(root));
    let e = v
        .verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "no usable CRL of /DC=org/DC=mupilot-test/CN=Test CA for {ALICE}: CRL has expired"
        )),
        "{e}"
    );
    assert!(!openssl_verify(root, "good"));
    std::fs::remove_file(&crl).unwrap();
    let e = v
        .verify(&good, &Claim::owner(ALICE, "atlas"), Utc::now())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unable to get certificate CRL") && e.contains("fetch-crl"),
        "{e}"
    );
}

#[test]
fn check_proxy_command() {
    let root = pki();
    let run = |name: &str, owner: &str| {
        Command::new(env!("CARGO_BIN_EXE_mupilot-switch"))
            .arg("check-proxy")
            .arg(root.join("proxies").join(format!("{name}.pem")))
            .args(["--owner", owner, "--vo", "atlas", "--cert-dir"])
            .arg(root.join("certificates"))
            .arg("--vomsdir")
            .arg(root.join("vomsdir"))
            .output()
            .unwrap()
    };
    let out = run("good", ALICE);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("verified")
            && text.contains("fqans       /atlas, /atlas/prod/Role=production"),
        "{text}"
    );
    let out = run("revoked", "/DC=org/DC=mupilot-test/CN=Mallory");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("refused: certificate revoked: /DC=org/DC=mupilot-test/CN=Mallory"),
        "{text}"
    );
    let dirs = |cmd: &mut Command| {
        cmd.arg("--cert-dir")
            .arg(root.join("certificates"))
            .arg("--vomsdir")
            .arg(root.join("vomsdir"));
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mupilot-switch"));
    cmd.args(["check-proxy", "/nonexistent/proxy.pem"]);
    dirs(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.pem"));
    // A site without a CA directory is told which key and what to install.
    let out = Command::new(env!("CARGO_BIN_EXE_mupilot-switch"))
        .arg("check-proxy")
        .arg(root.join("proxies/good.pem"))
        .args(["--cert-dir", "/nonexistent/certificates", "--vomsdir"])
        .arg(root.join("vomsdir"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("grid.cert_dir = /nonexistent/certificates") && err.contains("IGTF"),
        "{err}"
    );
}
