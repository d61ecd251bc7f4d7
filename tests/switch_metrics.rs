//! The real `mupilot-switch` daemon writing its node_exporter textfile (switch.toml
//! `metrics_textfile`, every `metrics_interval_seconds`): zeros at start, then a launch, an
//! authorization denial, a payload held, and a kill at shutdown, read back from the file in
//! the Prometheus text format. As root, with the accounts of tests/switch_support.

mod switch_support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use mupilot::protocol::switch_wire::{DenialClass, SwitchEvent};
use switch_support::*;

/// Parses the Prometheus text format into `series -> value`, checking each line's shape.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert!(series.starts_with("mupilot_switch_"), "{series}");
        out.insert(series.to_string(), v);
    }
    out
}

/// Waits until the textfile shows `series` at `value` (it is rewritten every second).
fn wait_for(path: &Path, series: &str, value: f64) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            let m = parse(&t);
            if m.get(series) == Some(&value) {
                return m;
            }
            if Instant::now() > deadline {
                panic!("{series} never became {value}:\n{t}");
            }
        } else if Instant::now() > deadline {
            panic!("{} was never written", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn textfile_counts_launches_denials_payloads_and_kills() {
    let _u = Users::acquire();
    let site = Site::new();
    let textdir = site.path("textfile");
    std::fs::create_dir(&textdir).unwrap();
    let prom = textdir.join("mupilot-switch.prom");
    let cfg = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!(
            "metrics_textfile = \"{}\"\nmetrics_interval_seconds = 1\n{cfg}",
            prom.display()
        ),
    )
    .unwrap();
    let d = site.start();

    // Written at start, before any launch: every denial class at 0.
    let m = wait_for(&prom, "mupilot_switch_launches_total", 0.0);
    assert_eq!(
        m["mupilot_switch_denials_total{class=\"authorization\"}"],
        0.0
    );
    assert_eq!(m["mupilot_switch_payloads"], 0.0);
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "node_exporter's account must read it");

    let mut c = Client::hello(&site.socket, Client::default_hello());
    // A denial (no mapping: class authorization).
    let (_, class, _) = denied(c.launch(&site.sign(&site.body(DN_UNMAPPED, &["/bin/true"])), None));
    assert_eq!(class, DenialClass::Authorization);
    // A payload that stays: launched and held.
    let body = site.body(DN_ALICE, &["/bin/sleep", "60"]);
    match c.launch(&site.sign(&body), None) {
        SwitchEvent::Started { .. } => {}
        other => panic!("{other:?}\n{}", std::fs::read_to_string(&d.log).unwrap()),
    }
    let m = wait_for(&prom, "mupilot_switch_payloads", 1.0);
    assert_eq!(m["mupilot_switch_launches_total"], 1.0);
    assert_eq!(
        m["mupilot_switch_denials_total{class=\"authorization\"}"],
        1.0
    );
    assert_eq!(m["mupilot_switch_denials_total{class=\"caller\"}"], 0.0);
    // The denial and the start record at least: each write observed.
    assert!(
        m["mupilot_switch_audit_write_seconds_count"] >= 2.0,
        "{m:?}"
    );
    assert!(m["mupilot_switch_audit_write_seconds_sum"] > 0.0, "{m:?}");

    // SIGTERM kills the payload; the last write at shutdown counts it.
    let st = d.stop();
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let text = std::fs::read_to_string(&prom).unwrap();
    let m = parse(&text);
    assert_eq!(
        m["mupilot_switch_kills_total{reason=\"helper_stopping\"}"], 1.0,
        "{text}"
    );
    assert_eq!(m["mupilot_switch_payloads"], 0.0, "{text}");
    assert!(
        !text.contains("CN="),
        "a DN leaked into the textfile:\n{text}"
    );
    // Only the file itself: no temporary file left for node_exporter to trip over.
    let names: Vec<_> = std::fs::read_dir(&textdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["mupilot-switch.prom"]);
}

#[test]
fn a_textfile_node_exporter_would_not_read_is_refused_naming_the_key() {
    let _u = Users::acquire();
    let site = Site::new();
    let cfg = std::fs::read_to_string(&site.config).unwrap();
    for (value, expect) in [
        ("textfile/mupilot.txt", "must end in .prom"),
        ("no-such-dir/mupilot.prom", "does not exist"),
    ] {
        std::fs::write(
            &site.config,
            format!("metrics_textfile = \"{value}\"\n{cfg}"),
        )
        .unwrap();
        let (code, out) = cli(&["check-config", "--config", site.config.to_str().unwrap()]);
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("metrics_textfile") && out.contains(expect),
            "{out}"
        );
    }
}
