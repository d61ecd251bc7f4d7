//! Submission rate limits: one token bucket per (kind, DN), refilled continuously at the
//! configured rate up to its burst. A submission takes one token from every bucket it
//! counts against, or from none: when any is empty it is refused with the seconds until
//! all of them hold a token again (the `Retry-After` of the 429).
//!
//! In memory, per server instance: several instances behind one name each keep their own
//! buckets. Holds no I/O; time is passed in, so tests need no sleeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::identity::Charge;

/// Buckets beyond this number are pruned of the full ones (callers idle long enough to have
/// refilled: forgetting them changes nothing).
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When it holds its whole burst again (then it is as good as absent).
    full_at: Instant,
}

/// A submission refused by a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// Whole seconds until the submission would be accepted (at least 1).
    pub retry_after: u64,
    /// The limit that is exhausted: kind, DN, rate.
    pub kind: &'static str,
    pub dn: Arc<str>,
    pub per_minute: u32,
    pub burst: u32,
}

/// The buckets of one server instance.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(&'static str, Arc<str>), Bucket>>,
}

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one token from each bucket of `charges` at `now`, or refuses naming the bucket
    /// that needs the longest wait.
    pub fn take(&self, charges: &[Charge], now: Instant) -> Result<(), Limited> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut worst: Option<(Duration, &Charge)> = None;
        let mut levels = Vec::with_capacity(charges.len());
        for c in charges {
            let burst = f64::from(c.rate.burst);
            let rate = c.rate.per_second();
            let level = match map.get(&(c.kind, c.dn.clone())) {
                None => burst,
                Some(b) => {
                    let dt = now.saturating_duration_since(b.at).as_secs_f64();
                    (b.tokens + dt * rate).min(burst)
                }
            };
            if level < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - level) / rate);
                if worst.is_none_or(|(w, _)| wait > w) {
                    worst = Some((wait, c));
                }
            }
            levels.push(level);
        }
        if let Some((wait, c)) = worst {
            return Err(Limited {
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                kind: c.kind,
                dn: c.dn.clone(),
                per_minute: c.rate.per_minute,
                burst: c.rate.burst,
            });
        }
        for (c, level) in charges.iter().zip(levels) {
            let tokens = level - 1.0;
            let refill = (f64::from(c.rate.burst) - tokens) / c.rate.per_second();
            map.insert(
                (c.kind, c.dn.clone()),
                Bucket {
                    tokens,
                    at: now,
                    full_at: now + Duration::from_secs_f64(refill),
                },
            );
        }
        if map.len() > PRUNE_ABOVE {
            // A full bucket answers as a missing one does: dropping it changes nothing.
            map.retain(|_, b| b.full_at > now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::portal::config::Rate;

    fn charge(kind: &'static str, dn: &str, per_minute: u32, burst: u32) -> Charge {
        Charge {
            kind,
            dn: Arc::from(dn),
            rate: Rate { per_minute, burst },
        }
    }

    #[test]
    fn burst_then_refill_at_the_rate_with_retry_after_in_whole_seconds() {
        let l = RateLimiter::new();
        let t0 = Instant::now();
        let c = [charge("user", "/CN=a", 60, 3)];
        for _ in 0..3 {
            l.take(&c, t0).unwrap();
        }
        let e = l.take(&c, t0).unwrap_err();
        assert_eq!((e.retry_after, e.kind, &*e.dn), (1, "user", "/CN=a"));
        // Half a token later: still refused, 1 s (rounded up) to wait.
        assert_eq!(
            l.take(&c, t0 + Duration::from_millis(500))
                .unwrap_err()
                .retry_after,
            1
        );
        l.take(&c, t0 + Duration::from_millis(1000)).unwrap();
        // Slow rate: 6 a minute is one per 10 s.
        let slow = [charge("portal", "/CN=p", 6, 1)];
        l.take(&slow, t0).unwrap();
        assert_eq!(
            l.take(&slow, t0 + Duration::from_secs(1))
                .unwrap_err()
                .retry_after,
            9
        );
        // Never more than the burst after a long pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.take(&c, later).unwrap();
        }
        assert!(l.take(&c, later).is_err());
    }

    #[test]
    fn a_refused_submission_takes_no_token_from_any_bucket() {
        let l = RateLimiter::new();
        let t0 = Instant::now();
        let portal = charge("portal", "/CN=p", 60, 10);
        let bob = charge("user", "/CN=bob", 60, 1);
        let carol = charge("user", "/CN=carol", 60, 1);
        l.take(&[portal.clone(), bob.clone()], t0).unwrap();
        let e = l.take(&[portal.clone(), bob.clone()], t0).unwrap_err();
        assert_eq!(&*e.dn, "/CN=bob");
        // The portal's bucket kept its tokens: 9 left, used for carol and 8 more.
        l.take(&[portal.clone(), carol], t0).unwrap();
        for i in 0..8 {
            l.take(
                &[portal.clone(), charge("user", &format!("/CN=u{i}"), 60, 1)],
                t0,
            )
            .unwrap();
        }
        let e = l
            .take(&[portal, charge("user", "/CN=new", 60, 1)], t0)
            .unwrap_err();
        assert_eq!(e.kind, "portal");
    }
}
