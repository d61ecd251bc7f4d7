//! The helper's counters for node_exporter's textfile collector (switch.toml
//! `metrics_textfile`, off when absent): launches, denials by class, payloads held, kills by
//! reason and audit write latency. Counted from the audit records as they are written (atomic
//! increments, no syscall), encoded by `prometheus-client` in the Prometheus text format and
//! written atomically (temporary file, rename) by a thread of its own every
//! `metrics_interval_seconds`, never on the launch path. No HTTP here; no DN, payload id or
//! account in any label.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::audit::{AuditEvent, AuditRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// The kill reasons the helper writes, as labels; "cancelled by DN" is `cancelled` (no DN in a
/// label), anything else `other`, so the label set stays bounded.
fn kill_label(reason: &str) -> &'static str {
    const KNOWN: [&str; 7] = [
        "oom",
        "walltime",
        "pilot_gone",
        "helper_stopping",
        "site_admin",
        "helper_error",
        "cancelled",
    ];
    if reason.starts_with("cancelled") {
        return "cancelled";
    }
    KNOWN
        .iter()
        .copied()
        .find(|k| *k == reason)
        .unwrap_or("other")
}

fn class_label(class: Option<&str>) -> &'static str {
    match class {
        Some("authorization") => "authorization",
        Some("caller") => "caller",
        Some("system") => "system",
        _ => "unknown",
    }
}

/// The helper's metrics: updated by the audit log, read by the textfile writer.
pub struct SwitchMetrics {
    registry: Registry,
    launches: Counter,
    denials: Family<Class, Counter>,
    refused_connections: Counter,
    kills: Family<Reason, Counter>,
    payloads: Gauge,
    audit_write_seconds: Histogram,
}

impl Default for SwitchMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SwitchMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mupilot_switch");
        let launches = Counter::default();
        registry.register(
            "launches",
            "Payloads started (start record written)",
            launches.clone(),
        );
        let denials = Family::<Class, Counter>::default();
        registry.register(
            "denials",
            "Launches refused, by denial class (authorization, caller, system)",
            denials.clone(),
        );
        let refused_connections = Counter::default();
        registry.register(
            "refused_connections",
            "Connections refused before any request (not an allowed pilot, over a limit)",
            refused_connections.clone(),
        );
        let kills = Family::<Reason, Counter>::default();
        registry.register(
            "kills",
            "Payloads that ended killed, by reason",
            kills.clone(),
        );
        let payloads = Gauge::default();
        registry.register(
            "payloads",
            "Payloads the helper holds now (being set up or running)",
            payloads.clone(),
        );
        // 100 us .. ~1.6 s: an fsync on a local disk is ~1 ms, a struggling one far more.
        let audit_write_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "audit_write_seconds",
            "Time to write one audit record (with its fsync when written synced)",
            audit_write_seconds.clone(),
        );
        // Every class exported from the start, so a rate() has a series to work on.
        let m = SwitchMetrics {
            registry,
            launches,
            denials,
            refused_connections,
            kills,
            payloads,
            audit_write_seconds,
        };
        for class in ["authorization", "caller", "system"] {
            let _ = m.denials.get_or_create(&Class { class });
        }
        m
    }

    /// One audit record handed to the log, `elapsed` the write; `written` false when the
    /// log refused it (a start record that could not be written launches nothing).
    pub fn record(&self, rec: &AuditRecord, written: bool, elapsed: Duration) {
        self.audit_write_seconds.observe(elapsed.as_secs_f64());
        match rec.event {
            Some(AuditEvent::Start) if written => {
                self.launches.inc();
            }
            Some(AuditEvent::Denied) => {
                self.denials
                    .get_or_create(&Class {
                        class: class_label(rec.denial_class),
                    })
                    .inc();
            }
            Some(AuditEvent::RefusedCaller) => {
                self.refused_connections.inc();
            }
            Some(AuditEvent::RefusedSummary) => {
                self.refused_connections
                    .inc_by(rec.refused_count.unwrap_or(0));
            }
            Some(AuditEvent::End) => {
                if let Some(r) = &rec.kill_reason {
                    self.kills
                        .get_or_create(&Reason {
                            reason: kill_label(r),
                        })
                        .inc();
                }
            }
            _ => {}
        }
    }

    /// The metrics in the Prometheus text format (what node_exporter's textfile collector
    /// reads), `payloads` the number held now.
    pub fn render(&self, payloads: usize) -> String {
        self.payloads.set(payloads as i64);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same directory (0644: the
/// node_exporter account reads it), then a rename, so the collector never reads half a file.
/// No fsync: a file lost in a crash is rewritten at the next interval.
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    // Root writes into a directory another account may write to: never open a name that
    // already exists (a symlink or a hard link planted there would make root write through
    // it). Whatever sits at the temporary name is unlinked, then the file made with O_EXCL;
    // if something is planted in between, the open fails and this interval is skipped.
    let _ = std::fs::remove_file(&tmp);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// `NAME.prom` -> `.NAME.prom.tmp` (node_exporter reads only `*.prom`).
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_reasons_are_a_bounded_set() {
        assert_eq!(kill_label("oom"), "oom");
        assert_eq!(kill_label("cancelled by /DC=org/CN=alice"), "cancelled");
        assert_eq!(kill_label("/DC=org/CN=mallory"), "other");
        assert_eq!(
            tmp_path(Path::new("/x/mupilot.prom")),
            Path::new("/x/.mupilot.prom.tmp")
        );
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let prom = dir.path().join("m.prom");
        std::os::unix::fs::symlink(&victim, tmp_path(&prom)).unwrap();
        write_textfile(&prom, "x 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::hard_link(&victim, tmp_path(&prom)).unwrap();
        write_textfile(&prom, "x 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&prom).unwrap(), "x 2\n");
        assert!(!tmp_path(&prom).exists());
    }

    #[test]
    fn counts_follow_the_records() {
        let m = SwitchMetrics::new();
        let rec = |e, class: Option<&'static str>, kill: Option<&str>| AuditRecord {
            event: Some(e),
            denial_class: class,
            kill_reason: kill.map(String::from),
            ..Default::default()
        };
        let t = Duration::from_micros(300);
        m.record(&rec(AuditEvent::Start, None, None), true, t);
        m.record(&rec(AuditEvent::Start, None, None), false, t);
        m.record(
            &rec(AuditEvent::Denied, Some("authorization"), None),
            true,
            t,
        );
        m.record(&rec(AuditEvent::End, None, Some("walltime")), true, t);
        let text = m.render(3);
        for line in [
            "mupilot_switch_launches_total 1",
            "mupilot_switch_denials_total{class=\"authorization\"} 1",
            "mupilot_switch_denials_total{class=\"system\"} 0",
            "mupilot_switch_kills_total{reason=\"walltime\"} 1",
            "mupilot_switch_payloads 3",
            "mupilot_switch_audit_write_seconds_count 4",
            "# TYPE mupilot_switch_launches_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
