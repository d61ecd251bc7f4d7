//! Decision latency with a 10,000-line policy and 10,000 banned DNs:
//! `cargo run --example policy_bench [--release] [-- POLICY_LINES BANS DECISIONS]`.

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let lines = args.first().copied().unwrap_or(10_000);
    let bans = args.get(1).copied().unwrap_or(10_000);
    let decisions = args.get(2).copied().unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("mupilot-pol-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        std::process::exit(2);
    }
    let result = mupilot::policy::bench::run(&dir, lines, bans, decisions);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("policy bench failed: {e}");
            std::process::exit(2);
        }
    }
}
