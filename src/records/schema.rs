//! The record schema of the payload logs, in one place: the event kinds and the field names
//! that the helper's audit records (`switch::audit::AuditRecord`), the pilot's trace records
//! (`pilot::trace::TraceRecord`) and the chain writer's own records are written with, and that
//! the readers (`query`, `lost`, the listings of `cli`) look for. A writer that names a field or
//! an event the schema does not know fails `tests/records_schema.rs`; readers take their names
//! and byte needles from here. (The VO server's request log has a schema of its own,
//! `server::portal::requestlog`.) Names only: no I/O, no record is built here.

/// What a record says happened: its `event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A payload was started (audit) or matched (trace): opens the payload.
    Start,
    /// The payload is over: closes it.
    End,
    /// The payload's end was never recorded (a crash); written after restart: closes it.
    Lost,
    Kill,
    Signal,
    Denied,
    RefusedCaller,
    RefusedSummary,
    /// A pilot sent an earlier pilot's outbox entry (trace).
    Delivered,
    /// The chain writer removed a torn last line.
    Torn,
    /// Records were held in memory while the log could not take them.
    WriteFailed,
    /// Rotated files were deleted by retention.
    Retention,
    /// The chain head as told to syslog.
    Anchor,
    /// A running payload's delegated proxy was replaced by a renewed one (audit).
    ProxyRenewed,
    /// A renewal of a running payload's proxy was refused; it keeps the old one (audit).
    ProxyRefused,
}

impl Event {
    pub const ALL: [Event; 15] = [
        Event::Start,
        Event::End,
        Event::Lost,
        Event::Kill,
        Event::Signal,
        Event::Denied,
        Event::RefusedCaller,
        Event::RefusedSummary,
        Event::Delivered,
        Event::Torn,
        Event::WriteFailed,
        Event::Retention,
        Event::Anchor,
        Event::ProxyRenewed,
        Event::ProxyRefused,
    ];

    /// The name in the `event` field.
    pub const fn name(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::End => "end",
            Event::Lost => "lost",
            Event::Kill => "kill",
            Event::Signal => "signal",
            Event::Denied => "denied",
            Event::RefusedCaller => "refused_caller",
            Event::RefusedSummary => "refused_summary",
            Event::Delivered => "delivered",
            Event::Torn => "torn",
            Event::WriteFailed => "write_failed",
            Event::Retention => "retention",
            Event::Anchor => "anchor",
            Event::ProxyRenewed => "proxy_renewed",
            Event::ProxyRefused => "proxy_refused",
        }
    }

    /// The event of that name.
    pub fn from_name(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Whether a record of this event ends its payload (`end`, or `lost` after a crash).
    pub const fn closes_payload(self) -> bool {
        matches!(self, Event::End | Event::Lost)
    }
}

/// The name of every field a payload log's record may carry, the chain's own `seq` and `prev`
/// included. Kept sorted.
pub const FIELDS: &[&str] = &[
    "account",
    "anchor_hash",
    "anchor_seq",
    "argv_sha256",
    "batch_job_id",
    "batch_system",
    "bundle_sha256",
    "cgroup",
    "cpu_seconds",
    "decision",
    "deleted",
    "denial_class",
    "dropped",
    "dropped_events",
    "end",
    "envelope_sha256",
    "error",
    "event",
    "exit_code",
    "failed_since",
    "file",
    "first_seq",
    "fqans",
    "gid",
    "helper_pid",
    "host",
    "jobtag",
    "kept",
    "kill_reason",
    "match_time",
    "owner_dn",
    "payload_id",
    "peak_memory_bytes",
    "pilot_dn",
    "pilot_id",
    "pilot_pid",
    "pilot_uid",
    "prev",
    "proxy_not_after",
    "proxy_serial",
    "proxy_sha256",
    "reason",
    "refused_count",
    "removed_bytes",
    "removed_sha256",
    "scratch",
    "seq",
    "server_url",
    "signal",
    "slot",
    "start",
    "state",
    "time",
    "uid",
    "upload",
    "via",
    "vo",
    "wall_seconds",
];

/// The fields a `lost` record copies from the open `start` record it closes: who ran what,
/// where and as whom, so the `lost` record answers `audit who` as the `end` would have.
pub const LOST_COPIES: &[&str] = &[
    "host",
    "pilot_uid",
    "pilot_pid",
    "pilot_id",
    "batch_job_id",
    "pilot_dn",
    "payload_id",
    "owner_dn",
    "vo",
    "fqans",
    "jobtag",
    "account",
    "uid",
    "gid",
    "cgroup",
    "scratch",
    "start",
];

/// Byte needles the scanners search for in compact JSON lines before any parse (the chain
/// writer writes `"key":value` without spaces). Checked against [`Event::name`] below.
pub mod needle {
    /// `"event":"start"`.
    pub const START: &[u8] = b"\"event\":\"start\"";
    /// `"event":"end"`.
    pub const END: &[u8] = b"\"event\":\"end\"";
    /// `"event":"lost"`.
    pub const LOST: &[u8] = b"\"event\":\"lost\"";
    /// `"event":"retention"`.
    pub const RETENTION: &[u8] = b"\"event\":\"retention\"";
    /// `"payload_id":"`, the start of a string value.
    pub const PAYLOAD_ID_STR: &[u8] = b"\"payload_id\":\"";
    /// `"owner_dn":`.
    pub const OWNER_DN: &[u8] = b"\"owner_dn\":";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_needle(e: Event) -> Vec<u8> {
        format!("\"event\":\"{}\"", e.name()).into_bytes()
    }

    #[test]
    fn needles_spell_the_schema_names() {
        assert_eq!(needle::START, event_needle(Event::Start));
        assert_eq!(needle::END, event_needle(Event::End));
        assert_eq!(needle::LOST, event_needle(Event::Lost));
        assert_eq!(needle::RETENTION, event_needle(Event::Retention));
        for (n, f) in [
            (needle::PAYLOAD_ID_STR, "payload_id\":\""),
            (needle::OWNER_DN, "owner_dn\":"),
        ] {
            assert_eq!(n, format!("\"{f}").as_bytes());
        }
        assert!(FIELDS.contains(&"payload_id") && FIELDS.contains(&"owner_dn"));
    }

    #[test]
    fn names_are_unique_sorted_and_round_trip() {
        assert!(
            FIELDS.windows(2).all(|w| w[0] < w[1]),
            "FIELDS sorted, no repeats"
        );
        for f in LOST_COPIES {
            assert!(FIELDS.contains(f), "{f} copied by lost but not in FIELDS");
        }
        for e in Event::ALL {
            assert_eq!(Event::from_name(e.name()), Some(e));
        }
        assert_eq!(Event::from_name("started"), None);
        let closing: Vec<_> = Event::ALL
            .into_iter()
            .filter(|e| e.closes_payload())
            .collect();
        assert_eq!(closing, [Event::End, Event::Lost]);
    }
}
