//! Launch latency of the sandbox: `true` through launch() + wait(), p50 over 50 runs
//! (run as root; prints the numbers with --nocapture).

mod sandbox_support;

use sandbox_support::{plan, settings, ScratchRoot, TestUser};

#[test]
fn launch_true_p50() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("latency");
    for (name, net) in [
        ("host", mupilot::switch::sandbox::NetworkMode::Host),
        ("loopback", mupilot::switch::sandbox::NetworkMode::Loopback),
    ] {
        let mut s = settings(&root.0);
        s.network = net;
        let mut times = Vec::new();
        for i in 0..50 {
            let t = std::time::Instant::now();
            let r = mupilot::switch::sandbox::launch(
                &s,
                plan(&format!("lat-{i}"), &u.account, &["true"]),
                None,
                None,
            )
            .unwrap();
            let o = r.wait().unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(o.exit_code, Some(0));
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "sandbox launch+wait of `true` (network={name}): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over 50 runs",
            times[25], times[45], times[49]
        );
        assert!(times[25] < 2000.0);
    }
}
