//! Payload proxy keys made before they are asked for. A key is an RSA-2048 pair: tens of
//! milliseconds of CPU, more under load. Made when a pilot's `proxy_request` or `proxy_renew`
//! arrives, it held up that pilot's connection thread, and so its other launches, signals and
//! status requests, for as long. The helper's `key-pool` thread keeps [`READY`] keys made, at
//! the lowest CPU priority, and a request takes one; when the pool is empty (a burst of
//! delegated launches, or no refill thread) the key is made on the caller's thread as before.
//!
//! Each key is handed out once, is held only in the helper's memory (about 2 KiB each) and is
//! never written anywhere until it is a payload's. The thread makes a key only to replace one
//! taken, so a pilot asking for many CSRs costs the node no more key-making than before: one
//! key per request, whichever thread makes it. Must not: block a caller on the refill thread,
//! or hand the same key out twice.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::grid::worker_key::{KeyError, WorkerKey};

/// How many keys the pool keeps made: a pilot starting the delegated payloads of a whole
/// 8-core slot at once takes them all without waiting for one.
pub const READY: usize = 8;

/// How long the thread waits after OpenSSL failed to make a key before it tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// The ready keys, and the refill thread's wake-up.
#[derive(Default)]
pub struct KeyPool {
    ready: Mutex<Vec<WorkerKey>>,
    taken: Condvar,
}

impl KeyPool {
    fn ready(&self) -> MutexGuard<'_, Vec<WorkerKey>> {
        // A panic while a key was pushed or popped leaves a whole Vec: the keys are still good.
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A key no one else has: a ready one, else one made now on this thread. Wakes the
    /// refill thread either way.
    pub fn take(&self) -> Result<WorkerKey, KeyError> {
        let ready = self.ready().pop();
        self.taken.notify_one();
        match ready {
            Some(key) => Ok(key),
            None => WorkerKey::generate(),
        }
    }

    /// How many keys are ready now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ready().len()
    }

    /// The refill thread's body (never returns): at the lowest CPU priority, makes keys until
    /// [`READY`] are ready, then sleeps until one is taken.
    pub fn refill(&self) -> ! {
        // On Linux setpriority(PRIO_PROCESS, 0) sets the calling thread's nice value only, so
        // the launch path, the other threads and the payloads keep theirs.
        if let Err(e) = rustix::process::setpriority_process(None, 19) {
            tracing::warn!(error = %e, "cannot lower the key pool thread's priority");
        }
        loop {
            let mut ready = self.ready();
            while ready.len() >= READY {
                ready = self
                    .taken
                    .wait(ready)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(ready);
            match WorkerKey::generate() {
                Ok(key) => self.ready().push(key),
                Err(e) => {
                    tracing::error!(error = %e, "the key pool cannot make a payload proxy key; requests make their own");
                    std::thread::sleep(RETRY_AFTER_FAILURE);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn an_empty_pool_makes_the_key_and_a_filled_one_hands_each_key_out_once() {
        let pool = Arc::new(KeyPool::default());
        let inline = pool.take().unwrap();
        let p = Arc::clone(&pool);
        std::thread::spawn(move || p.refill());
        let deadline = Instant::now() + Duration::from_secs(120);
        while pool.len() < READY {
            assert!(Instant::now() < deadline, "the pool did not fill");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(pool.len(), READY, "no key beyond READY is made");
        let mut csrs: Vec<String> = (0..READY)
            .map(|_| pool.take().unwrap().csr_pem().to_string())
            .collect();
        csrs.push(inline.csr_pem().to_string());
        let handed_out = csrs.len();
        csrs.sort();
        csrs.dedup();
        assert_eq!(csrs.len(), handed_out, "every key is a different one");
        // Taken keys are replaced.
        let deadline = Instant::now() + Duration::from_secs(120);
        while pool.len() < READY {
            assert!(Instant::now() < deadline, "the pool did not refill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
