//! Verified credentials by the SHA-256 of the chain as presented, so a payload whose proxy was
//! verified before costs a hash and a lookup. An entry lives until the credential's not-after
//! and only while the trust inputs it was verified under are unchanged (the caller's stamp:
//! the vomsdir's mtimes; a reloaded CA directory clears the whole cache). Bounded: when full,
//! expired entries go, and if none had, everything does.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// Most entries kept (a node runs at most a few hundred payloads' credentials at a time).
pub const CAPACITY: usize = 4096;

/// The cache key: SHA-256 of the credential bytes.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

struct Entry<S, V> {
    not_after: DateTime<Utc>,
    stamp: S,
    value: V,
}

/// Values by digest, each with its expiry and stamp.
pub struct DigestCache<S, V> {
    entries: HashMap<[u8; 32], Entry<S, V>>,
    capacity: usize,
}

impl<S: PartialEq, V: Clone> DigestCache<S, V> {
    pub fn new(capacity: usize) -> Self {
        DigestCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value for `key` if it has not expired at `now` and was stored under `stamp`
    /// (computed lazily: only a hit needs it); a stale entry is dropped.
    pub fn get(
        &mut self,
        key: &[u8; 32],
        now: DateTime<Utc>,
        stamp: impl FnOnce(&V) -> S,
    ) -> Option<V> {
        let e = self.entries.get(key)?;
        if now <= e.not_after && stamp(&e.value) == e.stamp {
            return Some(e.value.clone());
        }
        self.entries.remove(key);
        None
    }

    /// Stores `value` until `not_after`.
    pub fn insert(
        &mut self,
        key: [u8; 32],
        not_after: DateTime<Utc>,
        stamp: S,
        value: V,
        now: DateTime<Utc>,
    ) {
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, e| now <= e.not_after);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(
            key,
            Entry {
                not_after,
                stamp,
                value,
            },
        );
    }

    /// Drops everything (the CA directory changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn expiry_stamp_and_bound() {
        let now = Utc::now();
        let mut c: DigestCache<u32, &str> = DigestCache::new(2);
        let k = digest(b"chain");
        c.insert(k, now + Duration::hours(1), 7, "cred", now);
        assert_eq!(c.get(&k, now, |_| 7), Some("cred"));
        assert_eq!(c.get(&k, now, |_| 8), None, "a changed stamp invalidates");
        assert!(c.is_empty());
        c.insert(k, now + Duration::hours(1), 7, "cred", now);
        assert_eq!(c.get(&k, now + Duration::hours(2), |_| 7), None, "expired");
        c.insert(digest(b"a"), now - Duration::seconds(1), 7, "old", now);
        c.insert(digest(b"b"), now + Duration::hours(1), 7, "b", now);
        c.insert(digest(b"c"), now + Duration::hours(1), 7, "c", now);
        assert_eq!(c.len(), 2, "the expired entry made room");
        assert_eq!(c.get(&digest(b"c"), now, |_| 7), Some("c"));
    }
}
