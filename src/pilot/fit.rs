//! Partitioning the batch slot between payloads: what is free, and whether a payload fits.
//!
//! Pure arithmetic; no I/O. The slot is the ceiling (P7): a payload is only launched when its
//! cores, memory and wall time fit in what the running payloads leave free.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::envelope::Resources;

/// Seconds reported to the server when the slot has no known end.
pub const UNKNOWN_SECONDS_LEFT: u64 = 30 * 24 * 3600;

/// The slot and the share each running payload holds.
#[derive(Debug, Clone)]
pub struct Capacity {
    cores: u32,
    memory_bytes: u64,
    held: BTreeMap<String, Resources>,
}

impl Capacity {
    pub fn new(cores: u32, memory_bytes: u64) -> Self {
        Capacity {
            cores,
            memory_bytes,
            held: BTreeMap::new(),
        }
    }

    pub fn free_cores(&self) -> u32 {
        let used: u32 = self.held.values().map(|r| r.cores).sum();
        self.cores.saturating_sub(used)
    }

    pub fn free_memory_bytes(&self) -> u64 {
        let used: u64 = self.held.values().map(|r| r.memory_bytes).sum();
        self.memory_bytes.saturating_sub(used)
    }

    /// True when at least one core is free (memory is checked per payload).
    pub fn has_room(&self) -> bool {
        self.free_cores() > 0 && self.free_memory_bytes() > 0
    }

    /// Why `r` does not fit now, or `None` when it does.
    pub fn misfit(&self, r: &Resources, seconds_left: u64) -> Option<String> {
        if r.cores > self.free_cores() {
            return Some(format!(
                "needs {} cores, the pilot has {} free",
                r.cores,
                self.free_cores()
            ));
        }
        if r.memory_bytes > self.free_memory_bytes() {
            return Some(format!(
                "needs {} bytes of memory, the pilot has {} free",
                r.memory_bytes,
                self.free_memory_bytes()
            ));
        }
        if r.walltime_seconds > seconds_left {
            return Some(format!(
                "needs {} s of wall time, the pilot has {} s left",
                r.walltime_seconds, seconds_left
            ));
        }
        None
    }

    /// Reserves `r` for `payload_id` (after [`Capacity::misfit`] said it fits).
    pub fn hold(&mut self, payload_id: &str, r: Resources) {
        self.held.insert(payload_id.to_string(), r);
    }

    /// Gives back what `payload_id` held.
    pub fn release(&mut self, payload_id: &str) {
        self.held.remove(payload_id);
    }
}

/// Seconds a new payload may still run: until the deadline minus the shutdown margin.
pub fn seconds_left(deadline_unix: Option<i64>, now_unix: i64, margin: Duration) -> u64 {
    match deadline_unix {
        None => UNKNOWN_SECONDS_LEFT,
        Some(d) => (d - now_unix - margin.as_secs() as i64).max(0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cores: u32, mem: u64, wall: u64) -> Resources {
        Resources {
            cores,
            memory_bytes: mem,
            walltime_seconds: wall,
        }
    }

    #[test]
    fn partitions_the_slot() {
        let mut c = Capacity::new(4, 8 << 30);
        assert!(c.misfit(&r(2, 4 << 30, 60), 100).is_none());
        c.hold("a", r(2, 4 << 30, 60));
        assert_eq!(c.free_cores(), 2);
        assert_eq!(c.free_memory_bytes(), 4 << 30);
        c.hold("b", r(1, 1 << 30, 60));
        let why = c.misfit(&r(2, 1 << 30, 60), 100).unwrap();
        assert!(why.contains("cores"), "{why}");
        let why = c.misfit(&r(1, 4 << 30, 60), 100).unwrap();
        assert!(why.contains("memory"), "{why}");
        let why = c.misfit(&r(1, 1 << 30, 101), 100).unwrap();
        assert!(why.contains("wall time"), "{why}");
        c.release("a");
        assert_eq!(c.free_cores(), 3);
        assert!(c.has_room());
        c.hold("c", r(3, 1 << 20, 1));
        assert!(!c.has_room());
    }

    #[test]
    fn seconds_left_subtracts_the_margin() {
        assert_eq!(seconds_left(None, 0, Duration::ZERO), UNKNOWN_SECONDS_LEFT);
        assert_eq!(seconds_left(Some(1000), 100, Duration::from_secs(120)), 780);
        assert_eq!(seconds_left(Some(100), 100, Duration::from_secs(120)), 0);
    }
}
