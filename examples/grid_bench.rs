//! The cost of verifying an owner's grid credential (src/grid) as the helper will per launch
//! (a benchmark for scripts/bench.sh part 50-grid, not a test).
//!
//! `grid_bench PKI [N]`: PKI is a directory made by tests/grid_support/make-fixtures.sh; the
//! good proxy (one proxy, VOMS AC, Test CA with a CRL) is verified N times (default 2000):
//! cold (cache cleared before each: chain, CRL, AC signature, .lsc), cached (what a launch
//! whose credential was seen before adds: SHA-256 of the file, stat of the CA directory and
//! vomsdir, a lookup), and a fresh verifier's first call. Prints `grid cold_p50 cold_p99 cached_p50
//! cached_p99 first_p50` in µs (first: a fresh verifier, the CA directory loaded, then cold).
//! Then `keys p50 p99` in µs: making a payload's proxy key and CSR (RSA-2048, as the helper's
//! key pool and the VO server's delegation do), 40 times.

use std::path::PathBuf;
use std::time::Instant;

use mupilot::grid::{Claim, GridConfig, Verifier};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().expect("usage: grid_bench PKI [N]"));
    let n: usize = args
        .next()
        .map_or(2000, |s| s.parse().expect("N is a number"));
    let cfg = GridConfig {
        cert_dir: root.join("certificates"),
        vomsdir: root.join("vomsdir"),
        ..GridConfig::default()
    };
    let pem = std::fs::read(root.join("proxies/good.pem")).expect("PKI/proxies/good.pem");
    let claim = Claim::owner("/DC=org/DC=mupilot-test/CN=Alice", "atlas");
    let now = chrono::Utc::now();

    let mut load = Vec::with_capacity(50);
    for _ in 0..50 {
        let v = Verifier::new(cfg.clone());
        let t = Instant::now();
        v.verify(&pem, &claim, now)
            .expect("the good proxy verifies");
        load.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let v = Verifier::new(cfg);
    let mut cold = Vec::with_capacity(n);
    for _ in 0..n {
        v.clear_cache();
        let t = Instant::now();
        v.verify(&pem, &claim, now)
            .expect("the good proxy verifies");
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut cached = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        v.verify(&pem, &claim, now)
            .expect("the good proxy verifies");
        cached.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "grid {:.0} {:.0} {:.1} {:.1} {:.0}",
        pct(&mut cold, 0.5),
        pct(&mut cold, 0.99),
        pct(&mut cached, 0.5),
        pct(&mut cached, 0.99),
        pct(&mut load, 0.5)
    );
    let mut keys = Vec::with_capacity(40);
    for _ in 0..40 {
        let t = Instant::now();
        mupilot::grid::delegation::new_key_request().expect("a key and request");
        keys.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "keys {:.0} {:.0}",
        pct(&mut keys, 0.5),
        pct(&mut keys, 0.99)
    );
}
