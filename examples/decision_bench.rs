//! The helper's whole launch decision (ban lists, site and VO policies, grid-mapfile mapping),
//! through the helper's own `Authorizer`, with a 10,000-line site policy, 10,000 banned DNs and
//! a 10,000-line grid-mapfile (a benchmark for scripts/bench.sh, not a test).
//!
//! `decision_bench [POLICY_LINES BANS MAP_LINES DECISIONS]`: prints `decide n p50 p99` (µs) for
//! the whole decision, and the policy-only numbers of `mupilot::policy::bench` on the same files.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use mupilot::policy::bans::Bans;
use mupilot::policy::stack::PolicyStack;
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources, ENVELOPE_VERSION};
use mupilot::switch::authorize::{Authorizer, AuthzRequest, AuthzSources};
use mupilot::switch::leases::Quarantine;

/// No pool accounts are configured, so nothing is ever quarantined.
struct NoPool;
impl Quarantine for NoPool {
    fn clean(&self, account: &str) -> Result<(), String> {
        Err(format!("no pool accounts in this benchmark ({account})"))
    }
}

/// The DNs `mupilot::policy::bench` writes its per-user rules for.
fn user(i: usize) -> String {
    format!("/DC=org/DC=bench/OU=group{}/CN=user{}", i % 50, i)
}

fn body(dn: String, cores: u32, n: usize) -> EnvelopeBody {
    let now = chrono::Utc::now();
    EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: format!("decide-{n}"),
        owner: Owner {
            dn,
            vo: "bench".into(),
            fqans: vec!["/bench".into()],
            membership_valid_until: now + chrono::Duration::days(30),
        },
        jobtag: Some("prod".into()),
        argv: vec!["sim".into(), "--events".into(), "1000".into()],
        env: BTreeMap::new(),
        bundle_sha256: None,
        resources: Resources {
            cores,
            memory_bytes: 4 << 30,
            walltime_seconds: 3600,
        },
        outputs: vec![],
        not_before: now,
        not_after: now + chrono::Duration::seconds(600),
        node: "wn01".into(),
        pilot_id: "bench".into(),
        nonce: format!("{n:032x}"),
        issuer: "bench".into(),
        credential: None,
    }
}

fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let lines = args.first().copied().unwrap_or(10_000);
    let bans = args.get(1).copied().unwrap_or(10_000);
    let map_lines = args.get(2).copied().unwrap_or(10_000);
    let decisions = args.get(3).copied().unwrap_or(10_000);
    let tmp = tempfile::Builder::new()
        .prefix("decision-bench")
        .tempdir()
        .expect("temporary directory");
    let dir = tmp.path();
    // Writes site.policy, vo.policy and ban_users.db, and measures the policy alone.
    let policy_only =
        mupilot::policy::bench::run(dir, lines, bans, decisions).expect("policy bench");
    let users = (lines - 3) / 4;
    let mut map = String::from("# generated grid-mapfile\n");
    for i in 0..map_lines {
        let _ = writeln!(map, "\"{}\" mpu-bench{:05}", user(i), i);
    }
    std::fs::write(dir.join("grid-mapfile"), map).unwrap();

    let stack = PolicyStack::new()
        .with_file("site policy", dir.join("site.policy"))
        .unwrap()
        .with_file("VO bench policy", dir.join("vo.policy"))
        .unwrap();
    let authz = Authorizer::new(
        AuthzSources {
            vos: BTreeSet::from(["bench".to_string()]),
            bans: Bans::new().with_dn_file(dir.join("ban_users.db")).unwrap(),
            policies: BTreeMap::from([("bench".to_string(), stack)]),
            gridmap: dir.join("grid-mapfile"),
            groupmap: None,
            pool: None,
        },
        Box::new(NoPool),
    )
    .expect("authorizer");

    // A helper's files are old: let the freshly written ones leave the reloader's "racy" window
    // (it re-reads a file changed in the last 50 ms on every decision), then warm up once.
    std::thread::sleep(Duration::from_millis(200));
    let warm = body(user(0), 1, decisions);
    let _ = authz.decide(
        &AuthzRequest {
            body: &warm,
            pilot_uid: 999,
            pilot_dn: None,
        },
        &|_| false,
    );
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut times = Vec::with_capacity(decisions);
    let mut permits = 0;
    for n in 0..decisions {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (seed >> 33) as usize % users.min(map_lines).max(1);
        let b = body(user(i), 1 + (seed >> 20) as u32 % 8, n);
        let req = AuthzRequest {
            body: &b,
            pilot_uid: 999,
            pilot_dn: None,
        };
        let t = Instant::now();
        let d = authz.decide(&req, &|_| false);
        times.push(t.elapsed());
        permits += d.is_ok() as usize;
    }
    if permits == 0 {
        eprintln!("no decision permitted: the generated files do not match");
        std::process::exit(1);
    }
    let p50 = quantile(&mut times, 0.5);
    let p99 = quantile(&mut times, 0.99);
    println!("decide {decisions} {permits} {p50:.1} {p99:.1}");
    println!(
        "policy {} {:.1} {:.1} {:.1} {:.1}",
        policy_only.decisions,
        policy_only.p50.as_secs_f64() * 1e6,
        policy_only.p99.as_secs_f64() * 1e6,
        policy_only.fixed_p50.as_secs_f64() * 1e6,
        policy_only.fixed_p99.as_secs_f64() * 1e6
    );
}
