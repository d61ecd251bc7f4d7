//! The grid PKI of make-fixtures.sh for tests that sign and verify proxies, and the
//! ecosystem's judges of a chain: `openssl verify -allow_proxy_certs` and `voms-proxy-info`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mupilot::grid::GridConfig;

pub const ALICE: &str = "/DC=org/DC=mupilot-test/CN=Alice";
pub const BOB: &str = "/DC=org/DC=mupilot-test/CN=Bob";

/// The PKI, made afresh once per test binary under cargo's target tmpdir (`name` keeps two
/// binaries running at once apart).
pub fn pki(name: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make(name))
}

/// Makes the PKI afresh in `<target tmpdir>/<name>` and returns its path (kept there for
/// inspection after a failure, replaced by the next run).
pub fn make(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grid_support/make-fixtures.sh");
    let out = Command::new("sh").arg(&script).arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "make-fixtures.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// As [`pki`], with the CA directory and vomsdir readable by every account, for payloads
/// that read them (`voms-proxy-info` as the payload's account; under cargo's target tmpdir,
/// not under the payloads' private /tmp).
pub fn payload_pki(name: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = make(name);
        let st = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(dir.join("certificates"))
            .arg(dir.join("vomsdir"))
            .status()
            .unwrap();
        assert!(st.success());
        dir
    })
}

pub fn proxy(root: &Path, name: &str) -> Vec<u8> {
    std::fs::read(root.join("proxies").join(format!("{name}.pem"))).unwrap()
}

/// The site's view of the PKI: its CA directory and vomsdir, limited proxies accepted.
pub fn config(root: &Path) -> GridConfig {
    GridConfig {
        cert_dir: root.join("certificates"),
        vomsdir: root.join("vomsdir"),
        limited_proxies: mupilot::grid::LimitedProxies::Accept,
        ..GridConfig::default()
    }
}

/// Writes a proxy file as grid tools do (first certificate, its key, the rest of the chain).
pub fn proxy_file(dir: &Path, chain_pem: &str, key_pem: &[u8]) -> PathBuf {
    let certs: Vec<&str> = chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    let mut out = certs[0].as_bytes().to_vec();
    out.extend_from_slice(key_pem);
    for c in &certs[1..] {
        out.extend_from_slice(c.as_bytes());
    }
    let p = dir.join(format!("proxy-{}.pem", rand_name()));
    std::fs::write(&p, out).unwrap();
    p
}

fn rand_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `openssl verify -allow_proxy_certs -crl_check_all` of the chain in `file`; its output on
/// failure.
pub fn openssl_verify(root: &Path, file: &Path) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(["verify", "-allow_proxy_certs", "-crl_check_all", "-CApath"])
        .arg(root.join("certificates"))
        .arg("-untrusted")
        .arg(file)
        .arg(file)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `voms-proxy-info -all -file FILE`: its output, or a panic with it.
pub fn voms_proxy_info(root: &Path, file: &Path) -> String {
    let out = Command::new("voms-proxy-info")
        .args(["-all", "-file"])
        .arg(file)
        .env("X509_CERT_DIR", root.join("certificates"))
        .env("X509_VOMS_DIR", root.join("vomsdir"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "voms-proxy-info failed: {text}");
    text
}

/// The `attribute :` lines of voms-proxy-info's output.
pub fn fqans(info: &str) -> Vec<String> {
    info.lines()
        .filter_map(|l| l.strip_prefix("attribute : "))
        .map(str::to_string)
        .collect()
}
