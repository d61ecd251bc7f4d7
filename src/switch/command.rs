//! Operator commands (VO-wide job management): a cancel, signal or information request for a
//! running payload, made by its owner or a VO operator, signed by the VO server and relayed by
//! the pilot. The helper verifies the signature and the nonce, checks the payload belongs to
//! the relaying pilot, authorizes the *requester* with the site's and the VO's policies
//! (action, jobowner, jobtag, SELF), then acts. Every decision is audited.
//!
//! Decides and acts on one payload; never starts anything.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::audit::AuditEvent;
use super::daemon::Helper;
use super::registry::Entry;
use crate::protocol::command::{CommandAction, CommandBody, SignedCommand};
use crate::protocol::switch_wire::{RunningPayload, SwitchEvent};

/// How long a cancelled payload has between SIGTERM and SIGKILL.
pub const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Verifies, authorizes and carries out `signed` for a payload of connection `conn_id`;
/// returns the answer for the pilot.
pub fn run(helper: &Arc<Helper>, conn_id: u64, signed: &SignedCommand) -> SwitchEvent {
    let body = match verify(helper, signed) {
        Ok(b) => b,
        Err(reason) => return SwitchEvent::Error { reason },
    };
    let done =
        |ok: bool, reason: String, information: Option<RunningPayload>| SwitchEvent::CommandDone {
            payload_id: body.payload_id.clone(),
            action: body.action,
            requester: body.requester_dn.clone(),
            ok,
            reason,
            information: information.map(Box::new),
            nonce: Some(body.nonce.clone()),
        };
    let Some(entry) = helper.registry.get(conn_id, &body.payload_id) else {
        return done(
            false,
            format!(
                "payload '{}' is not running for this pilot",
                body.payload_id
            ),
            None,
        );
    };
    let (Some(handle), Some(envelope)) = (entry.handle.clone(), entry.envelope.clone()) else {
        return done(false, "payload is still starting; ask again".into(), None);
    };
    if envelope.owner.vo != signed.vo {
        return done(
            false,
            format!(
                "command signed for VO '{}' but the payload belongs to VO '{}'",
                signed.vo, envelope.owner.vo
            ),
            None,
        );
    }
    let decision = helper.authz.decide_command(&body, &envelope);
    let mut rec = entry.record.follow_up(match body.action {
        CommandAction::Cancel => AuditEvent::Kill,
        _ => AuditEvent::Signal,
    });
    rec.signal = body.signal;
    let what = format!(
        "operator command {} by \"{}\"",
        body.action.as_str(),
        body.requester_dn
    );
    if let Err(e) = decision {
        rec.decision = Some("deny");
        rec.reason = Some(format!("{what} denied: {e}"));
        helper.audit.append_or_log(&rec);
        return done(false, format!("denied: {e}"), None);
    }
    rec.decision = Some("permit");
    rec.reason = Some(what.clone());
    if body.action == CommandAction::Cancel {
        rec.kill_reason = Some(format!("cancelled by {}", body.requester_dn));
    }
    helper.audit.append_or_log(&rec);
    match body.action {
        CommandAction::Information => {
            let info = information(&body.payload_id, &entry);
            done(true, "information".into(), info)
        }
        CommandAction::Signal => {
            let sig = body.signal.unwrap_or(libc::SIGTERM);
            match handle.signal(sig) {
                Ok(()) => done(true, format!("signal {sig} delivered"), None),
                Err(e) => done(false, format!("signal failed: {e}"), None),
            }
        }
        CommandAction::Cancel => {
            let reason = format!("cancelled by {}", body.requester_dn);
            let _ = handle.signal(libc::SIGTERM);
            let h = helper.clone();
            let id = body.payload_id.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cancel-{id}"))
                .spawn({
                    let reason = reason.clone();
                    move || {
                        std::thread::sleep(CANCEL_GRACE);
                        if h.registry.get(conn_id, &id).is_some() {
                            handle.kill(&reason);
                        }
                    }
                });
            if spawned.is_err() {
                // No timer: end it now rather than leave a cancelled payload running.
                if let Some(e) = helper.registry.get(conn_id, &body.payload_id) {
                    if let Some(h) = e.handle {
                        h.kill(&reason);
                    }
                }
            }
            done(
                true,
                format!(
                    "{reason}: SIGTERM, SIGKILL after {}s",
                    CANCEL_GRACE.as_secs()
                ),
                None,
            )
        }
    }
}

/// Signature with the key of the VO it names, expiry, and the nonce seen only once.
fn verify(helper: &Helper, signed: &SignedCommand) -> Result<CommandBody, String> {
    let vo = helper.cfg.vo(&signed.vo).ok_or_else(|| {
        format!(
            "command for VO '{}', which is not configured on this site",
            signed.vo
        )
    })?;
    let body = signed
        .verify(&vo.key, Utc::now())
        .map_err(|e| format!("operator command refused: {e}"))?;
    let fresh = helper
        .replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check_and_insert(&signed.vo, &body.nonce, body.not_after)
        .map_err(|e| format!("operator command refused: {e}"))?;
    if !fresh {
        return Err(format!(
            "operator command nonce '{}' was used before: replayed command",
            body.nonce
        ));
    }
    Ok(body)
}

/// The answer to an authorized `information` request: what `status` tells the pilot, plus the
/// number of processes. What is left out on purpose (the payload's command lines,
/// environment, files, other payloads on the node, the site's policy and mapping details) is
/// listed in docs/security-model.md, "What the VO learns about a running payload".
fn information(payload_id: &str, entry: &Entry) -> Option<RunningPayload> {
    let mut view = super::registry::running_view(payload_id.to_string(), entry)?;
    view.processes = entry
        .handle
        .as_ref()
        .map(|h| u32::try_from(h.processes()).unwrap_or(u32::MAX));
    Some(view)
}
