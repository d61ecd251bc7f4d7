//! Renewing a running payload's proxy: a fresh key and CSR for it ([`csr`]), then the issued
//! chain verified as at launch and the proxy file replaced ([`renewed`]). Only the pilot that
//! launched the payload may renew it; the new proxy must carry the FQANs the payload was
//! authorized with.

use chrono::Utc;

use super::keys::{self, PendingKeys, Purpose};
use super::{deliver, Delivery, ProxyError};
use crate::switch::daemon::Helper;
use crate::switch::registry::Entry;

/// The running payload `payload_id` of connection `conn_id` with its handle and envelope.
fn running(helper: &Helper, conn_id: u64, payload_id: &str) -> Result<Entry, ProxyError> {
    let not_running = || ProxyError::NotRunning {
        payload_id: payload_id.to_string(),
    };
    let entry = helper
        .registry
        .get(conn_id, payload_id)
        .ok_or_else(not_running)?;
    if entry.ended || entry.handle.is_none() {
        return Err(not_running());
    }
    match &entry.envelope {
        Some(b) if b.credential.is_some() => Ok(entry),
        _ => Err(ProxyError::NoCredential {
            payload_id: payload_id.to_string(),
        }),
    }
}

/// A CSR for a new key of a running payload of this connection.
pub fn csr(
    helper: &Helper,
    conn_id: u64,
    keys: &mut PendingKeys,
    payload_id: &str,
) -> Result<String, ProxyError> {
    running(helper, conn_id, payload_id)?;
    if helper.verifier.is_none() {
        return Err(ProxyError::NoGrid {
            config: helper.cfg.path.display().to_string(),
        });
    }
    keys.request(&helper.key_pool, payload_id, Purpose::Renewal)
}

/// Verifies the chain issued for the renewal CSR and replaces the payload's proxy file with
/// it. Returns the delivery and the payload's entry (for the audit record).
pub fn renewed(
    helper: &Helper,
    conn_id: u64,
    keys: &mut PendingKeys,
    payload_id: &str,
    chain_pem: &str,
) -> Result<(Delivery, Entry), ProxyError> {
    let entry = running(helper, conn_id, payload_id)?;
    let key = keys
        .take(payload_id, &Purpose::Renewal)
        .ok_or_else(|| ProxyError::NoPendingKey {
            payload_id: payload_id.to_string(),
        })?;
    let verifier = helper.verifier.as_ref().ok_or_else(|| ProxyError::NoGrid {
        config: helper.cfg.path.display().to_string(),
    })?;
    let body = entry.envelope.as_deref().expect("checked by running()");
    let d = keys::verify_issued(verifier, &key, chain_pem.as_bytes(), body, Utc::now())?;
    let launched = entry.record.fqans.clone().unwrap_or_default();
    if d.fqans != launched {
        return Err(ProxyError::FqansChanged {
            renewed: d.fqans.clone(),
            launched,
        });
    }
    let scratch = entry
        .handle
        .as_ref()
        .expect("checked by running()")
        .scratch();
    deliver(&scratch, entry.account.uid, entry.account.gid, &d.file)?;
    Ok((d, entry))
}
