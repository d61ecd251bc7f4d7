//! The gate every API request passes, as axum middleware around the router: finds who is
//! calling ([`Identities::caller`]), refuses what the portal rules refuse, refuses the
//! requests that need a record while the request log cannot take one (503), counts
//! submissions against their rate limits (429 with `Retry-After`), runs the handler, and
//! records the request with its outcome. A submission's, cancel's or signal's record is on
//! disk before its answer leaves.
//!
//! Decides nothing about membership or payload ownership: the handlers do, with the
//! [`Caller`] the gate puts into the request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::action::{Action, Target};
use super::identity::{Caller, Identities, Peer, ON_BEHALF_OF};
use super::ratelimit::RateLimiter;
use super::requestlog::{RequestLog, RequestRecord};
use crate::records::Keep;
use crate::server::api::{AppState, Fail};

/// How long a client is asked to wait while the request log cannot take records.
const LOG_RETRY_AFTER: u64 = 5;
/// Longest `reason` kept in a record (a refusal's message).
const MAX_REASON: usize = 512;

/// What the listener knows of a connection; put into each of its requests.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Arc<Peer>,
}

/// The payload an answer is about when its path names none (a submission's new id, the
/// payload a match handed out); handlers put it into the response.
#[derive(Debug, Clone)]
pub struct PayloadOf(pub String);

/// A refusal's error code and message, put into the response by [`Fail`] for the record.
#[derive(Debug, Clone)]
pub struct ErrorOf {
    pub code: String,
    pub message: String,
}

/// The portal controls of one server instance.
pub struct Controls {
    pub identities: Identities,
    pub limiter: RateLimiter,
    pub log: RequestLog,
    /// This instance, as request records name it.
    pub server: Arc<str>,
}

/// The middleware (see the module documentation). The request runs in a task of its own:
/// a client that closes its connection mid-request drops only the wait for the answer, never
/// the handler's work nor the record of it (else a submission could be made unrecorded by
/// disconnecting right after sending it).
pub async fn gate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match tokio::spawn(gated(st, req, next)).await {
        Ok(resp) => resp,
        Err(e) => Fail::internal(format!("the request's task failed: {e}")).into_response(),
    }
}

async fn gated(st: Arc<AppState>, mut req: Request, next: Next) -> Response {
    let arrived = crate::records::now_rfc3339();
    let started = Instant::now();
    let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
        // Only the listener builds requests; without it there is nobody to answer for this one.
        return Fail::internal("request without connection information").into_response();
    };
    let c = &st.portal;
    let target = Target::parse(req.method(), req.uri().path());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let on_behalf = req.headers().get(ON_BEHALF_OF).cloned();
    let admitted = admit(c, &conn.peer, on_behalf.as_ref(), &target, started);
    let (caller, resp) = match admitted {
        Ok(caller) => {
            if let Some(cl) = &caller {
                req.extensions_mut().insert(cl.clone());
            }
            (caller, next.run(req).await)
        }
        Err(refused) => {
            let resp = refused.into_response();
            st.metrics.gate_refused(resp.status().as_u16());
            (None, resp)
        }
    };
    let error = resp.extensions().get::<ErrorOf>();
    let rec = RequestRecord {
        time: arrived,
        event: "request",
        server: c.server.to_string(),
        client_ip: conn.remote.ip().to_canonical().to_string(),
        client_port: conn.remote.port(),
        dn: conn.peer.dn.to_string(),
        kind: conn.peer.kind.as_str(),
        // The member a portal acted for, or, on a refusal, whom the header named.
        on_behalf_of: match caller.as_ref() {
            Some(c) => c.on_behalf_of().map(str::to_string),
            None => on_behalf.map(|v| truncate(&String::from_utf8_lossy(v.as_bytes()), 1024)),
        },
        responsible: caller
            .as_ref()
            .and_then(|c| c.responsible())
            .map(str::to_string),
        action: target.action.as_str(),
        method,
        path,
        payload_id: target
            .payload_id
            .or_else(|| resp.extensions().get::<PayloadOf>().map(|p| p.0.clone())),
        status: resp.status().as_u16(),
        error: error.map(|e| e.code.clone()),
        reason: error.map(|e| truncate(&e.message, MAX_REASON)),
        retry_after: resp
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        micros: started.elapsed().as_micros() as u64,
    };
    let ok = resp.status().is_success();
    let keep = if ok && target.action != Action::Other && !is_read(target.action) {
        Keep::Essential
    } else {
        // Reads and refusals: a caller can make any number of them.
        Keep::BestEffort
    };
    let synced = ok && target.action.synced();
    if let Some(pending) = c.log.append(&rec, keep, synced) {
        // fsync on a blocking thread, outside the log's lock: other requests keep going.
        match tokio::task::spawn_blocking(move || pending.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, payload_id = ?rec.payload_id, "request record written but not synced")
            }
            Err(e) => {
                tracing::error!(error = %e, payload_id = ?rec.payload_id, "request record sync did not finish")
            }
        }
    }
    resp
}

fn is_read(a: Action) -> bool {
    matches!(
        a,
        Action::List | Action::View | Action::Download | Action::MembershipRead
    )
}

/// The checks before the handler: identity and portal rules, the request log's health for
/// the requests that need a record, and a submission's rate limits.
fn admit(
    c: &Controls,
    peer: &Peer,
    on_behalf: Option<&axum::http::HeaderValue>,
    target: &Target,
    now: Instant,
) -> Result<Option<Caller>, Fail> {
    let caller = c
        .identities
        .caller(peer, on_behalf, target.action)
        .map_err(|r| Fail::new(r.status, r.code, r.message))?;
    if target.action.needs_log() && !c.log.writable() {
        return Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "the server cannot write its request log {} (see its log): submissions, cancels, signals and matches wait until every request can be recorded; retry after {LOG_RETRY_AFTER} s",
                c.log.path().display()
            ),
        )
        .retry_after(LOG_RETRY_AFTER));
    }
    if target.action == Action::Submit {
        if let Some(cl) = &caller {
            c.limiter
                .take(&c.identities.charges(cl), now)
                .map_err(|l| {
                    Fail::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!(
                            "{} {} is over its submission rate ({} a minute, bursts of {}); retry after {} s",
                            l.kind, l.dn, l.per_minute, l.burst, l.retry_after
                        ),
                    )
                    .retry_after(l.retry_after)
                })?;
        }
    }
    Ok(caller)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
