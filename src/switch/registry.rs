//! The helper's table of payloads, host-wide: which pilot connection started each one, what it
//! reserved of that pilot's slot, and the sandbox handle to signal or kill it. A payload id
//! runs at most once per host at a time. Keeps state; starts and stops nothing itself.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::audit::AuditRecord;
use super::sandbox::{Account, Handle};
use crate::protocol::switch_wire::{PilotHello, RunningPayload};
use crate::protocol::EnvelopeBody;

/// A launch that does not fit what the pilot declared about its slot.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("payload '{0}' is already running on this host")]
    Duplicate(String),
    #[error("payload asks for {asked} cores but the pilot's slot has {free} of {total} free")]
    Cores { asked: u32, free: u32, total: u32 },
    #[error(
        "payload asks for {asked} bytes of memory but the pilot's slot has {free} of {total} free"
    )]
    Memory { asked: u64, free: u64, total: u64 },
    #[error("payload asks for {asked} s of wall time but the pilot's slot ends in {left} s")]
    Walltime { asked: u64, left: i64 },
}

/// One payload known to the helper.
#[derive(Debug, Clone)]
pub struct Entry {
    pub conn_id: u64,
    pub cores: u32,
    pub memory_bytes: u64,
    pub account: Account,
    /// None between the reservation and the sandbox's answer.
    pub handle: Option<Handle>,
    /// The start record, the base of later kill/signal/end records.
    pub record: AuditRecord,
    /// The verified envelope, for authorizing operator commands on the payload.
    pub envelope: Option<std::sync::Arc<EnvelopeBody>>,
    /// The payload ended and no process of it is left; its scratch and cgroup are still being
    /// removed. It no longer counts against the slot, but its account stays in use.
    pub ended: bool,
}

/// What a launch asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub cores: u32,
    pub memory_bytes: u64,
    pub walltime_seconds: u64,
}

/// All payloads of this helper.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    emptied: Condvar,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `ask` against the pilot's slot minus its running payloads and reserves it, in
    /// one step so two launches cannot both take the last core.
    pub fn reserve(
        &self,
        conn_id: u64,
        payload_id: &str,
        ask: Ask,
        hello: &PilotHello,
        account: &Account,
        now_unix: i64,
    ) -> Result<(), SlotError> {
        let mut map = self.lock();
        if map.contains_key(payload_id) {
            return Err(SlotError::Duplicate(payload_id.to_string()));
        }
        let (used_cores, used_mem) = map
            .values()
            .filter(|e| e.conn_id == conn_id && !e.ended)
            .fold((0u64, 0u64), |(c, m), e| {
                (c + e.cores as u64, m + e.memory_bytes)
            });
        if let Some(total) = hello.slot_cores {
            let free = (total as u64).saturating_sub(used_cores) as u32;
            if ask.cores > free {
                return Err(SlotError::Cores {
                    asked: ask.cores,
                    free,
                    total,
                });
            }
        }
        if let Some(total) = hello.slot_memory_bytes {
            let free = total.saturating_sub(used_mem);
            if ask.memory_bytes > free {
                return Err(SlotError::Memory {
                    asked: ask.memory_bytes,
                    free,
                    total,
                });
            }
        }
        if let Some(deadline) = hello.slot_deadline_unix {
            let left = deadline - now_unix;
            if left < 0 || ask.walltime_seconds > left as u64 {
                return Err(SlotError::Walltime {
                    asked: ask.walltime_seconds,
                    left,
                });
            }
        }
        map.insert(
            payload_id.to_string(),
            Entry {
                conn_id,
                cores: ask.cores,
                memory_bytes: ask.memory_bytes,
                account: account.clone(),
                handle: None,
                record: AuditRecord::default(),
                envelope: None,
                ended: false,
            },
        );
        Ok(())
    }

    /// Attaches the sandbox handle, the start record and the envelope to a reservation.
    pub fn set_running(
        &self,
        payload_id: &str,
        handle: Handle,
        record: AuditRecord,
        envelope: EnvelopeBody,
    ) {
        if let Some(e) = self.lock().get_mut(payload_id) {
            e.handle = Some(handle);
            e.record = record;
            e.envelope = Some(std::sync::Arc::new(envelope));
        }
    }

    /// Marks a payload ended (its processes are gone, its exit is about to be reported): its
    /// share of the slot is free for the pilot's next launch at once, while the entry stays,
    /// holding the account, until its leftovers are removed and [`Registry::remove`] is called.
    pub fn ended(&self, payload_id: &str) {
        if let Some(e) = self.lock().get_mut(payload_id) {
            e.ended = true;
            e.handle = None;
        }
    }

    /// Whether any payload (running, being started or being cleaned up) holds `account`.
    pub fn account_in_use(&self, account: &str) -> bool {
        self.lock().values().any(|e| e.account.name == account)
    }

    /// Every payload of the owner `dn`, on any connection.
    pub fn of_owner(&self, dn: &str) -> Vec<(String, Entry)> {
        self.lock()
            .iter()
            .filter(|(_, e)| !e.ended && e.record.owner_dn.as_deref() == Some(dn))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Forgets a payload (it ended, or its launch failed).
    pub fn remove(&self, payload_id: &str) -> Option<Entry> {
        let mut map = self.lock();
        let e = map.remove(payload_id);
        if map.is_empty() {
            self.emptied.notify_all();
        }
        e
    }

    /// A running payload of connection `conn_id`.
    pub fn get(&self, conn_id: u64, payload_id: &str) -> Option<Entry> {
        self.lock()
            .get(payload_id)
            .filter(|e| e.conn_id == conn_id && !e.ended)
            .cloned()
    }

    /// Every payload of connection `conn_id` (all of them when None).
    pub fn list(&self, conn_id: Option<u64>) -> Vec<(String, Entry)> {
        self.lock()
            .iter()
            .filter(|(_, e)| conn_id.is_none_or(|c| e.conn_id == c))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// The `status` view of a connection's payloads, with each one's usage read from its
    /// cgroup now (after the table's lock is released: the reads never hold up a launch).
    /// Only this connection's payloads: a pilot learns nothing of another pilot's.
    pub fn status(&self, conn_id: u64) -> Vec<RunningPayload> {
        let mut v: Vec<RunningPayload> = self
            .list(Some(conn_id))
            .into_iter()
            .filter_map(|(id, e)| running_view(id, &e))
            .collect();
        v.sort_by(|a, b| a.payload_id.cmp(&b.payload_id));
        v
    }

    /// Waits until no payload is left, at most `timeout`; true when empty.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let map = self.lock();
        let (map, _) = self
            .emptied
            .wait_timeout_while(map, timeout, |m| !m.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        map.is_empty()
    }
}

/// What the helper tells the pilot (and through it the VO) about one running payload: its
/// account, main pid, cgroup, start time, reservation and usage; None while it is starting
/// or after it ended. (docs/security-model.md, "What the VO learns about a running payload".)
pub fn running_view(payload_id: String, e: &Entry) -> Option<RunningPayload> {
    if e.ended {
        return None;
    }
    let h = e.handle.as_ref()?;
    Some(RunningPayload {
        payload_id,
        account: e.account.name.clone(),
        uid: e.account.uid,
        pid: h.pid(),
        cgroup: h.cgroup(),
        started_at: Some(e.record.time.clone()).filter(|t| !t.is_empty()),
        usage: Some(h.live_usage().into()),
        cores: Some(e.cores),
        memory_limit_bytes: Some(e.memory_bytes),
        processes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_shared_by_a_pilots_payloads() {
        let r = Registry::default();
        let hello = PilotHello {
            pilot_id: "p".into(),
            slot_cores: Some(4),
            slot_memory_bytes: Some(8 << 30),
            slot_deadline_unix: Some(10_000),
            ..Default::default()
        };
        let acct = Account {
            name: "a".into(),
            uid: 5000,
            gid: 5000,
            groups: vec![],
        };
        let ask = |cores, mem| Ask {
            cores,
            memory_bytes: mem,
            walltime_seconds: 100,
        };
        r.reserve(1, "a", ask(3, 1 << 30), &hello, &acct, 0)
            .unwrap();
        assert!(matches!(
            r.reserve(1, "b", ask(2, 1 << 30), &hello, &acct, 0),
            Err(SlotError::Cores { free: 1, .. })
        ));
        assert!(matches!(
            r.reserve(2, "a", ask(1, 1), &hello, &acct, 0),
            Err(SlotError::Duplicate(_))
        ));
        assert!(matches!(
            r.reserve(1, "c", ask(1, 8 << 30), &hello, &acct, 0),
            Err(SlotError::Memory { .. })
        ));
        assert!(matches!(
            r.reserve(1, "d", ask(1, 1), &hello, &acct, 9_950),
            Err(SlotError::Walltime { left: 50, .. })
        ));
        // Another pilot's slot is its own.
        r.reserve(2, "e", ask(4, 1), &hello, &acct, 0).unwrap();
        // An ended payload frees its share of the slot before its entry goes, but keeps its
        // account in use until then.
        r.ended("a");
        assert!(r.get(1, "a").is_none());
        assert!(r.account_in_use("a"));
        r.reserve(1, "b", ask(2, 1 << 30), &hello, &acct, 0)
            .unwrap();
        r.remove("a");
        assert_eq!(r.list(Some(1)).len(), 1);
    }
}
