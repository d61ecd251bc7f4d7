//! Batch slot discovery: what the batch system, machine/job features and the pilot's own
//! cgroup grant this pilot. The effective slot is the minimum of every source present (P7).
//!
//! INTERFACE SKELETON (phase 0): the slot work fills the bodies; the signatures are the
//! contract the pilot codes against.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Explicit limits from pilot.toml or flags; they lower, never raise, what sources say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    pub cores: Option<u32>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub walltime_seconds: Option<u64>,
}

/// The effective slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub batch_system: Option<String>,
    pub batch_job_id: Option<String>,
    pub cores: u32,
    pub memory_bytes: u64,
    /// Unix time the slot ends (null when unknown).
    pub deadline_unix: Option<i64>,
}

/// The slot plus what every source said (for `mupilot limits`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotReport {
    #[serde(flatten)]
    pub slot: Slot,
    /// source name -> the values it gave.
    pub sources: BTreeMap<String, serde_json::Value>,
    /// Malformed values that were ignored, each naming the source and value.
    pub problems: Vec<String>,
}

/// Discovers the slot from the process environment, files and cgroups.
pub fn discover(overrides: &Overrides) -> SlotReport {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    SlotReport {
        slot: Slot {
            batch_system: None,
            batch_job_id: None,
            cores: overrides.cores.unwrap_or(cores).min(cores),
            memory_bytes: overrides.memory_bytes.unwrap_or(2 << 30),
            deadline_unix: overrides
                .walltime_seconds
                .map(|w| chrono::Utc::now().timestamp() + w as i64),
        },
        sources: BTreeMap::new(),
        problems: Vec::new(),
    }
}
