//! The keys the helper made for one connection's payloads, waiting for the VO server's chain:
//! one per payload, bound to the envelope it was asked for (a launch) or to the running
//! payload (a renewal), at most [`MAX_PENDING`], dropped with the connection. And the check
//! of an issued chain against its key and the site's `[grid]`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::pool::KeyPool;
use super::{Delivery, ProxyError};
use crate::grid::worker_key::WorkerKey;
use crate::grid::{Claim, Verifier};
use crate::protocol::EnvelopeBody;

/// Most keys one connection may hold unanswered (a pilot launches at most its slot's cores'
/// worth of payloads at once; each key is about 2 KiB).
pub const MAX_PENDING: usize = 64;

/// A key unanswered this long is dropped (longer than any envelope may be valid).
const PENDING_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// What a pending key is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// The launch of the envelope with this digest.
    Launch(String),
    /// The renewal of the running payload's proxy.
    Renewal,
}

/// A key made for a payload, waiting for its chain.
pub struct Pending {
    pub key: WorkerKey,
    purpose: Purpose,
    made: Instant,
}

/// One connection's pending keys, by payload id.
#[derive(Default)]
pub struct PendingKeys {
    map: HashMap<String, Pending>,
}

impl PendingKeys {
    /// The CSR for `payload_id`: the pending one when it was made for the same purpose (a
    /// pilot asking again gets the same request, at no new key's cost), else that of a fresh
    /// key from `pool`.
    pub fn request(
        &mut self,
        pool: &KeyPool,
        payload_id: &str,
        purpose: Purpose,
    ) -> Result<String, ProxyError> {
        self.map.retain(|_, p| p.made.elapsed() < PENDING_LIFETIME);
        match self.map.get(payload_id) {
            Some(p) if p.purpose == purpose => return Ok(p.key.csr_pem().to_string()),
            Some(_) => {}
            None if self.map.len() >= MAX_PENDING => {
                return Err(ProxyError::TooManyPending {
                    pending: self.map.len(),
                    max: MAX_PENDING,
                })
            }
            None => {}
        }
        let key = pool.take().map_err(|e| ProxyError::Key(e.to_string()))?;
        let csr = key.csr_pem().to_string();
        self.map.insert(
            payload_id.to_string(),
            Pending {
                key,
                purpose,
                made: Instant::now(),
            },
        );
        Ok(csr)
    }

    /// Takes the key made for `payload_id` for `purpose` (a key is used once, whatever the
    /// outcome).
    pub fn take(&mut self, payload_id: &str, purpose: &Purpose) -> Option<Pending> {
        match self.map.get(payload_id) {
            Some(p) if &p.purpose == purpose => self.map.remove(payload_id),
            _ => None,
        }
    }
}

/// Checks an issued chain: for `key` first (a chain for another request, or an old one
/// replayed, fails here at no verification's cost), then against the CA directory and vomsdir
/// for the envelope's owner DN and VO; the FQANs per `grid.envelope_fqans`.
pub fn verify_issued(
    verifier: &Verifier,
    key: &Pending,
    chain_pem: &[u8],
    body: &EnvelopeBody,
    now: DateTime<Utc>,
) -> Result<Delivery, ProxyError> {
    let file = key.key.proxy_file(chain_pem)?;
    let cred = verifier.verify(
        chain_pem,
        &Claim::owner(&body.owner.dn, &body.owner.vo),
        now,
    )?;
    let fqans = verifier
        .config()
        .effective_fqans(&body.owner.fqans, &cred.fqans)?;
    Ok(Delivery::verified(file, &cred, fqans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_payload_and_purpose_bounded() {
        let pool = KeyPool::default();
        let mut k = PendingKeys::default();
        let a = k
            .request(&pool, "p1", Purpose::Launch("d1".into()))
            .unwrap();
        assert_eq!(
            k.request(&pool, "p1", Purpose::Launch("d1".into()))
                .unwrap(),
            a,
            "asking again costs no key"
        );
        assert!(k.take("p1", &Purpose::Launch("d2".into())).is_none());
        assert!(k.take("p1", &Purpose::Renewal).is_none());
        assert!(k.take("p1", &Purpose::Launch("d1".into())).is_some());
        assert!(
            k.take("p1", &Purpose::Launch("d1".into())).is_none(),
            "used once"
        );
        let one = WorkerKey::generate().unwrap();
        for i in 0..MAX_PENDING {
            k.map.insert(
                format!("q{i}"),
                Pending {
                    key: one.same_key(),
                    purpose: Purpose::Renewal,
                    made: Instant::now(),
                },
            );
        }
        let e = k.request(&pool, "new", Purpose::Renewal).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        // A payload that has a key may still ask for its own.
        assert!(k.request(&pool, "q0", Purpose::Renewal).is_ok());
    }
}
