//! The HTTPS JSON API (`/v1/...`) as an axum router: who may call what, input validation,
//! envelope signing. The caller's identity is the [`PeerDn`] the listener put into the
//! request's extensions from the verified client certificate (pilot requests), and for member
//! requests the [`Caller`] the portal gate derived from it (a portal acting for the member it
//! names, a robot, a person); nothing else is trusted. Every route passes the gate
//! (`portal::gate`): identity, rate limits and the request log.
//! Database work runs on blocking threads through [`Store`].

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{Duration, Utc};
use serde::Deserialize;

use super::config::{SubmitLimits, ENVELOPE_SKEW_SECONDS};
use super::portal::gate::{Controls, ErrorOf, PayloadOf};
use super::portal::identity::Caller;
use super::store::{Matched, Member, NewPayload, Store, StoreError};
use crate::protocol::api::OperatorCommand;
use crate::protocol::api::{
    ApiError, InformationView, MatchRequest, MatchResponse, PayloadState, PayloadView, StatusAck,
    StatusReport, SubmitRequest, SubmitResponse, Work,
};
use crate::protocol::delegation::{CredentialKind, DelegatedCredential};
use crate::protocol::envelope::{
    is_valid_node_name, sha256_hex, ENVELOPE_VERSION, MAX_BODY_B64, MAX_NODE_LEN,
};
use crate::protocol::{EnvelopeBody, Owner, VoSigningKey};

/// Largest decoded input bundle.
pub const MAX_BUNDLE_BYTES: usize = 64 << 20;
/// Largest submit request (the bundle travels base64 inside JSON: 4/3 of it, plus the rest).
pub const MAX_SUBMIT_BODY: usize = MAX_BUNDLE_BYTES / 3 * 4 + (1 << 20);
/// Largest output archive a pilot may upload.
pub const MAX_OUTPUT_BYTES: usize = 256 << 20;

/// The verified subject DN of the client certificate on this connection.
#[derive(Clone, Debug)]
pub struct PeerDn(pub Arc<str>);

/// What every handler shares.
pub struct AppState {
    pub store: Arc<Store>,
    pub key: VoSigningKey,
    pub vo: String,
    pub pilot_dns: HashSet<String>,
    pub envelope_lifetime: Duration,
    /// A payload's files are deleted this long after its final state.
    pub retention: Duration,
    /// How long finished payloads' records and issued proxies' records are kept.
    pub record_retention: Duration,
    /// Written into envelopes as `issuer`.
    pub issuer: String,
    /// The most one payload may ask for (server.toml `[limits]`).
    pub limits: SubmitLimits,
    /// Asked of pilots in every match answer; the sweeper counts missed ones.
    pub heartbeat_seconds: u64,
    /// Validity of a proxy signed for a worker node (server.toml `worker_proxy_seconds`).
    #[cfg_attr(not(feature = "grid"), allow(dead_code))]
    pub worker_proxy: Duration,
    /// Counters and latency histograms (served when server.toml sets `metrics_listen`).
    pub metrics: Arc<super::metrics::Metrics>,
    /// Portals, robots, rate limits and the request log.
    pub portal: Controls,
    /// The membership registry's policy and audit log (`[membership]`).
    pub registry: Arc<super::membership::Registry>,
}

/// A matched payload that is not reported running this long after its envelope expired is
/// queued again by the sweeper (`Work.requeue_after` tells the pilot when).
pub const REQUEUE_MARGIN_SECONDS: i64 = 300;

type St = State<Arc<AppState>>;

/// An error answer: HTTP status plus an [`ApiError`] body (and `Retry-After` when the
/// client should come back later).
#[derive(Debug)]
pub struct Fail {
    status: StatusCode,
    body: ApiError,
    retry_after: Option<u64>,
}

impl Fail {
    pub(crate) fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        Fail {
            status,
            body: ApiError {
                error: error.to_string(),
                message: message.into(),
            },
            retry_after: None,
        }
    }
    /// Asks the client to retry after `seconds` (429, 503).
    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "not_authorized", message)
    }
    /// A well-formed submission that can never run: over a VO limit or the envelope's size.
    fn over_limit(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "over_limit", message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        // The request log records the code and message of every refusal.
        let of = ErrorOf {
            code: self.body.error.clone(),
            message: self.body.message.clone(),
        };
        let mut resp = (self.status, Extension(of), Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        resp
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::NotFound(_) => Fail::new(StatusCode::NOT_FOUND, "not_found", msg),
            StoreError::Forbidden(_) | StoreError::NoMember(_) => Fail::forbidden(msg),
            StoreError::Conflict(_) => Fail::new(StatusCode::CONFLICT, "conflict", msg),
            StoreError::Invalid(_) => Fail::bad(msg),
            _ => {
                tracing::error!(error = %msg, "store failure");
                Fail::internal(format!("server storage failed: {msg}"))
            }
        }
    }
}

impl From<JsonRejection> for Fail {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        Fail::new(status, code, r.body_text())
    }
}

/// Runs store work on a blocking thread.
pub(crate) async fn blocking<T, F>(st: &AppState, f: F) -> Result<T, Fail>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = st.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Fail::internal(format!("worker thread failed: {e}")))?
        .map_err(Fail::from)
}

/// The API router.
pub fn router(state: Arc<AppState>) -> Router {
    let r = Router::new();
    // Delegated X.509 credentials need OpenSSL (feature `grid`).
    #[cfg(feature = "grid")]
    let r = r.merge(super::delegation::routes());
    r.route(
        "/v1/payloads",
        post(submit)
            .get(list)
            .layer(DefaultBodyLimit::max(MAX_SUBMIT_BODY)),
    )
    .route("/v1/match", post(match_work))
    .route("/v1/payloads/:id", get(view))
    .route("/v1/payloads/:id/status", post(status))
    .route(
        "/v1/payloads/:id/output",
        get(download)
            .put(upload)
            .layer(DefaultBodyLimit::max(MAX_OUTPUT_BYTES)),
    )
    .route("/v1/payloads/:id/cancel", post(cancel))
    .route("/v1/payloads/:id/signal", post(signal))
    .route("/v1/payloads/:id/information", post(information))
    .route(
        "/v1/payloads/:id/information/:request_id",
        get(information_answer),
    )
    .merge(super::membership::api::routes())
    .fallback(|| async {
        Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint; the API lives under /v1/ (see docs/protocol.md)",
        )
    })
    // Every request, routed or not, passes the portal gate (identity, rate limits, the
    // request log).
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        super::portal::gate::gate,
    ))
    .with_state(state)
}

pub(crate) fn check_id(id: &str) -> Result<(), Fail> {
    if crate::util::is_safe_id(id) {
        Ok(())
    } else {
        Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{id:?} is not a payload id"),
        ))
    }
}

pub(crate) fn require_pilot(st: &AppState, dn: &str) -> Result<(), Fail> {
    if st.pilot_dns.contains(dn) {
        Ok(())
    } else {
        Err(Fail::forbidden(format!(
            "{dn} is not a pilot of VO {}; the VO lists its pilots' DNs in pilot_dns of server.toml",
            st.vo
        )))
    }
}

/// Room kept in an envelope below [`MAX_BODY_B64`] for what can change between submit and
/// match (the owner's FQANs, the membership date, the issuer): a submission whose envelope
/// fits now but not with this room could fail at match.
pub const ENVELOPE_RESERVE: usize = 16 << 10;

/// Refuses resources above the VO's limits (422 naming the limit).
fn within_limits(req: &SubmitRequest, l: &SubmitLimits) -> Result<(), Fail> {
    let r = &req.resources;
    for (field, v, key, max) in [
        (
            "cores",
            u64::from(r.cores),
            "max_cores",
            u64::from(l.max_cores),
        ),
        (
            "memory_bytes",
            r.memory_bytes,
            "max_memory_bytes",
            l.max_memory_bytes,
        ),
        (
            "walltime_seconds",
            r.walltime_seconds,
            "max_walltime_seconds",
            l.max_walltime_seconds,
        ),
    ] {
        if v > max {
            return Err(Fail::over_limit(format!(
                "resources.{field} = {v} is more than this VO allows ({key} = {max} in the server's server.toml [limits]); no pilot would ever be sent for it"
            )));
        }
    }
    Ok(())
}

/// Refuses a submission whose signed envelope would be larger than the helper and the pilot
/// accept ([`MAX_BODY_B64`]): measured on the envelope it would get now, with the owner's
/// FQANs, plus [`ENVELOPE_RESERVE`].
fn envelope_fits(st: &AppState, req: &SubmitRequest, member: &Member) -> Result<(), Fail> {
    let body = EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: "p-".to_string() + &"0".repeat(32),
        owner: Owner {
            dn: member.dn.clone(),
            vo: member.vo.clone(),
            fqans: member.fqans.clone(),
            membership_valid_until: member.renewal_due,
        },
        jobtag: req.jobtag.clone(),
        argv: req.argv.clone(),
        env: req.env.clone(),
        bundle_sha256: req.bundle.as_ref().map(|_| "0".repeat(64)),
        resources: req.resources,
        outputs: req.outputs.clone(),
        not_before: Utc::now(),
        not_after: Utc::now(),
        // The longest node name and pilot id a match may bind it to.
        node: "n".repeat(MAX_NODE_LEN),
        pilot_id: "p".repeat(64),
        nonce: "0".repeat(32),
        issuer: st.issuer.clone(),
        credential: req.delegation.as_ref().map(|_| DelegatedCredential {
            kind: CredentialKind::X509Proxy,
            not_after: Utc::now(),
        }),
    };
    let json = serde_json::to_vec(&body).map_err(|e| Fail::internal(e.to_string()))?;
    let b64 = json.len().div_ceil(3) * 4;
    if b64 + ENVELOPE_RESERVE > MAX_BODY_B64 {
        return Err(Fail::over_limit(format!(
            "argv, env, outputs and jobtag make a signed envelope of {b64} bytes (base64); the envelope limit is {MAX_BODY_B64} bytes, {ENVELOPE_RESERVE} of them kept for the owner's attributes: pass large data in the bundle instead"
        )));
    }
    Ok(())
}

/// Checks a submission field by field; names the field that is wrong.
fn validate(req: &SubmitRequest) -> Result<(), Fail> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(Fail::bad("argv must name an executable (argv[0])"));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(Fail::bad("argv must not contain NUL bytes"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Fail::bad(format!(
                "env {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    if let Some(t) = &req.jobtag {
        if t.len() > 128 || t.chars().any(char::is_control) {
            return Err(Fail::bad(
                "jobtag must be at most 128 characters without control characters",
            ));
        }
    }
    let r = &req.resources;
    if r.cores == 0 {
        return Err(Fail::bad("resources.cores must be at least 1"));
    }
    if r.memory_bytes < 4 << 20 {
        return Err(Fail::bad(format!(
            "resources.memory_bytes = {} is below the 4 MiB minimum",
            r.memory_bytes
        )));
    }
    if r.walltime_seconds == 0 {
        return Err(Fail::bad("resources.walltime_seconds must be at least 1"));
    }
    for o in &req.outputs {
        if !crate::util::is_relative_clean_path(o) {
            return Err(Fail::bad(format!(
                "outputs: {o:?} must be a relative path below the scratch directory, without '..', '.' or empty components"
            )));
        }
    }
    Ok(())
}

async fn submit(
    st: St,
    caller: Extension<Caller>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<(StatusCode, Extension<PayloadOf>, Json<SubmitResponse>), Fail> {
    let started = std::time::Instant::now();
    let metrics = st.metrics.clone();
    let res = submit_inner(st, caller, body).await;
    metrics.submitted(res.is_ok(), started.elapsed());
    res.map(|(code, body)| (code, Extension(PayloadOf(body.payload_id.clone())), body))
}

/// The active member `dn` (a submission's owner, or the person answering for a robot), or a
/// refusal saying who is not one and how that is fixed.
pub(crate) async fn active_member(st: &AppState, dn: &str, role: String) -> Result<Member, Fail> {
    let now = Utc::now();
    let who = dn.to_string();
    let active = blocking(st, move |store| {
        Ok(store.member(&who)?.filter(|m| m.is_active(now)))
    })
    .await?;
    active.ok_or_else(|| {
        StoreError::Forbidden(format!(
            "{role}{dn} is not an active member of VO {} (unregistered, suspended, removed or past renewal); ask a VO operator to run `mupilot-server member add` or `member renew`",
            st.vo
        ))
        .into()
    })
}

async fn submit_inner(
    State(st): St,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), Fail> {
    let Json(req) = body?;
    validate(&req)?;
    within_limits(&req, &st.limits)?;
    let bundle = match &req.bundle {
        None => None,
        Some(b) => {
            if b.len() > MAX_BUNDLE_BYTES / 3 * 4 + 4 {
                return Err(Fail::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("bundle is larger than {MAX_BUNDLE_BYTES} bytes; ship big inputs another way"),
                ));
            }
            Some(
                B64.decode(b)
                    .map_err(|e| Fail::bad(format!("bundle is not valid base64: {e}")))?,
            )
        }
    };
    let dn = caller.acting_dn().to_string();
    let now = Utc::now();
    // A portal submits only for active members; a robot only while it and the person
    // responsible for it are active members.
    let role = match &caller {
        Caller::Portal { dn: portal, .. } => format!("portal {portal} acts for "),
        _ => String::new(),
    };
    let member = active_member(&st, &dn, role).await?;
    if let Caller::Robot {
        dn: robot,
        responsible,
    } = &caller
    {
        active_member(&st, responsible, format!("robot {robot} answers to ")).await?;
    }
    envelope_fits(&st, &req, &member)?;
    if let Some(d) = &req.delegation {
        usable_delegation(&st, d, &dn, now).await?;
    }
    let id = blocking(&st, move |store| {
        let p = NewPayload {
            owner_dn: dn,
            vo: member.vo,
            argv: req.argv,
            env: req.env,
            jobtag: req.jobtag,
            resources: req.resources,
            outputs: req.outputs,
            bundle_sha256: bundle.as_deref().map(sha256_hex),
            delegation_id: req.delegation,
        };
        store.submit(&p, bundle.as_deref(), now)
    })
    .await?;
    tracing::info!(
        payload = %id,
        owner = %caller.acting_dn(),
        certificate = %caller.certificate_dn(),
        responsible = ?caller.responsible(),
        "payload submitted"
    );
    Ok((
        StatusCode::CREATED,
        Json(SubmitResponse {
            payload_id: id,
            state: PayloadState::Queued,
        }),
    ))
}

/// Refuses a submission naming a delegation that is not the submitter's, holds no chain yet,
/// or has expired.
async fn usable_delegation(
    st: &AppState,
    id: &str,
    dn: &str,
    now: chrono::DateTime<Utc>,
) -> Result<(), Fail> {
    let did = id.to_string();
    let d = blocking(st, move |s| s.delegation(&did)).await?;
    let fix =
        "delegate a proxy with `mupilot-server delegate --proxy FILE` (or submit with --proxy)";
    match d {
        None => Err(Fail::bad(format!(
            "delegation {id} does not exist (expired ones are deleted); {fix}"
        ))),
        Some(d) if d.owner_dn != dn => Err(Fail::forbidden(format!(
            "delegation {id} is not {dn}'s; a payload runs only with its owner's credential"
        ))),
        Some(d) if d.chain_pem.is_none() => Err(Fail::bad(format!(
            "delegation {id} holds no credential yet: upload the signed chain (PUT /v1/delegations/{id}) first"
        ))),
        Some(d) if d.not_after <= now => Err(Fail::bad(format!(
            "delegation {id} expired at {}; {fix}",
            d.not_after
        ))),
        Some(_) => Ok(()),
    }
}

/// The envelope of a match, bound to the node and the pilot that asked for it (the helper on
/// another node, or serving another pilot, refuses it). Its window is `envelope_lifetime`
/// long and starts a minute before now (clock skew between the server and the nodes).
fn envelope_body(st: &AppState, m: &Matched, req: &MatchRequest) -> EnvelopeBody {
    let now = Utc::now();
    let not_before = now - Duration::seconds(ENVELOPE_SKEW_SECONDS as i64);
    let nonce: [u8; 16] = rand::random();
    EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: m.id.clone(),
        owner: Owner {
            dn: m.owner_dn.clone(),
            vo: m.vo.clone(),
            fqans: m.fqans.clone(),
            membership_valid_until: m.membership_valid_until,
        },
        jobtag: m.jobtag.clone(),
        argv: m.argv.clone(),
        env: m.env.clone(),
        bundle_sha256: m.bundle_sha256.clone(),
        resources: m.resources,
        outputs: m.outputs.clone(),
        not_before,
        not_after: not_before + st.envelope_lifetime,
        node: req.host.clone(),
        pilot_id: req.pilot_id.clone(),
        nonce: hex::encode(nonce),
        issuer: st.issuer.clone(),
        credential: m
            .delegation
            .as_ref()
            .map(|(_, not_after)| DelegatedCredential {
                kind: CredentialKind::X509Proxy,
                not_after: *not_after,
            }),
    }
}

async fn match_work(
    State(st): St,
    Extension(peer): Extension<PeerDn>,
    body: Result<Json<MatchRequest>, JsonRejection>,
) -> Result<(Option<Extension<PayloadOf>>, Json<MatchResponse>), Fail> {
    use super::metrics::MatchResult;
    let started = std::time::Instant::now();
    require_pilot(&st, &peer.0)?;
    let Json(req) = body?;
    // Counted only for callers allowed to match, with a well-formed request: the pilot id
    // is theirs to name, and a malformed one is refused below without being remembered.
    let pilot_id = req.pilot_id.clone();
    let res = match_inner(&st, &peer, req).await;
    let result = match &res {
        Ok(r) if r.work.is_some() => MatchResult::Work,
        Ok(_) => MatchResult::NoWork,
        Err(_) => MatchResult::Error,
    };
    let vo = matches!(result, MatchResult::Work).then_some(st.vo.as_str());
    let id = crate::util::is_safe_id(&pilot_id).then_some(pilot_id.as_str());
    st.metrics.matched(id, vo, result, started.elapsed());
    res.map(|r| {
        let of = r
            .work
            .as_ref()
            .map(|w| Extension(PayloadOf(w.payload_id.clone())));
        (of, Json(r))
    })
}

async fn match_inner(
    st: &Arc<AppState>,
    peer: &PeerDn,
    req: MatchRequest,
) -> Result<MatchResponse, Fail> {
    if !crate::util::is_safe_id(&req.pilot_id) {
        return Err(Fail::bad(format!(
            "pilot_id {:?} must be 1-64 characters of [A-Za-z0-9._-]",
            req.pilot_id
        )));
    }
    if !is_valid_node_name(&req.host) {
        return Err(Fail::bad(format!(
            "host {:?} must be the node name the site's helper reported in its welcome (1-{MAX_NODE_LEN} characters without spaces): the envelope is bound to it",
            req.host
        )));
    }
    let dn = peer.0.to_string();
    let state = st.clone();
    let found = blocking(st, move |store| {
        let Some(m) = store.match_one(&dn, &req, Utc::now())? else {
            return Ok(None);
        };
        let bundle = match &m.bundle_sha256 {
            None => None,
            Some(_) => match std::fs::read(store.bundle_path(&m.id)) {
                Ok(b) => Some(B64.encode(b)),
                Err(e) => {
                    let reason = format!(
                        "server lost the input bundle {}: {e}",
                        store.bundle_path(&m.id).display()
                    );
                    store.fail_matched(&m.id, &reason, Utc::now())?;
                    return Err(StoreError::Io {
                        path: store.bundle_path(&m.id),
                        source: e,
                    });
                }
            },
        };
        let body = envelope_body(&state, &m, &req);
        let requeue_after = body.not_after + Duration::seconds(REQUEUE_MARGIN_SECONDS);
        let envelope = state.key.sign(&body);
        Ok(Some(Work {
            payload_id: m.id,
            envelope,
            bundle,
            heartbeat_seconds: Some(state.heartbeat_seconds),
            requeue_after: Some(requeue_after),
            live_usage: true,
        }))
    })
    .await?;
    if let Some(w) = &found {
        tracing::info!(payload = %w.payload_id, pilot = %peer.0, "payload matched");
    }
    Ok(MatchResponse { work: found })
}

async fn status(
    State(st): St,
    Extension(peer): Extension<PeerDn>,
    Path(id): Path<String>,
    body: Result<Json<StatusReport>, JsonRejection>,
) -> Result<Json<StatusAck>, Fail> {
    check_id(&id)?;
    require_pilot(&st, &peer.0)?;
    let Json(rep) = body?;
    let dn = peer.0.to_string();
    let state = rep.state;
    let pid = id.clone();
    let commands = blocking(&st, move |s| s.apply_status(&pid, &dn, &rep, Utc::now())).await?;
    if let Some(s) = state {
        tracing::info!(payload = %id, state = %s, "status reported");
    }
    let commands = commands
        .into_iter()
        .map(|c| sign_command(&st, &id, c))
        .collect();
    Ok(Json(StatusAck { commands }))
}

/// How long a delivered operator command stays valid for the helper.
const COMMAND_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

/// Signs an operator command as it is delivered, so the site's helper can authorize the
/// requester it names with its own policies, and the pilot cannot alter it.
/// An information request's nonce is its request id, which the helper's answer names.
fn sign_command(st: &AppState, payload_id: &str, c: OperatorCommand) -> OperatorCommand {
    use crate::protocol::command::{CommandAction, CommandBody, SignedCommand};
    let fresh = || format!("{:032x}", rand::random::<u128>());
    let (action, requester, signal, nonce) = match &c {
        OperatorCommand::Cancel { requester, .. } => {
            (CommandAction::Cancel, requester, None, fresh())
        }
        OperatorCommand::Signal {
            requester, signal, ..
        } => (CommandAction::Signal, requester, Some(*signal), fresh()),
        OperatorCommand::Information {
            requester,
            request_id,
            ..
        } => (
            CommandAction::Information,
            requester,
            None,
            request_id.clone(),
        ),
        // Never stored by this server: nothing to sign.
        OperatorCommand::Unknown => return c,
    };
    let body = CommandBody {
        version: 1,
        payload_id: payload_id.to_string(),
        action,
        requester_dn: requester.clone(),
        requester_fqans: Vec::new(),
        signal,
        not_after: Utc::now() + COMMAND_LIFETIME,
        nonce,
    };
    let signed = Some(SignedCommand::sign(&st.key, &st.vo, &body));
    match c {
        OperatorCommand::Cancel { requester, .. } => OperatorCommand::Cancel { requester, signed },
        OperatorCommand::Signal {
            requester, signal, ..
        } => OperatorCommand::Signal {
            requester,
            signal,
            signed,
        },
        OperatorCommand::Information {
            requester,
            request_id,
            ..
        } => OperatorCommand::Information {
            requester,
            request_id,
            signed,
        },
        OperatorCommand::Unknown => OperatorCommand::Unknown,
    }
}

async fn upload(
    State(st): St,
    Extension(peer): Extension<PeerDn>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Fail> {
    check_id(&id)?;
    require_pilot(&st, &peer.0)?;
    if body.len() < 2 || body[0] != 0x1f || body[1] != 0x8b {
        return Err(Fail::bad(
            "the output body must be a gzip-compressed tar archive (application/gzip)",
        ));
    }
    let dn = peer.0.to_string();
    blocking(&st, move |s| {
        if s.holder(&id)?.as_deref() != Some(dn.as_str()) {
            return Err(StoreError::Forbidden(format!(
                "{dn} does not hold payload {id}; only the pilot it was matched to may upload its output"
            )));
        }
        if let Some(t) = s.files_deleted_at(&id)? {
            return Err(StoreError::Conflict(format!(
                "payload {id}'s files were deleted at {t} after the retention period; an output archive is no longer accepted"
            )));
        }
        super::store::write_atomic(&s.output_path(&id), &body)?;
        s.set_has_output(&id, Utc::now())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Loads a payload and checks that the caller acts as its owner or is a VO operator.
async fn readable(st: &AppState, caller: &Caller, id: &str) -> Result<PayloadView, Fail> {
    check_id(id)?;
    let pid = id.to_string();
    let view = blocking(st, move |s| s.view(&pid)).await?;
    let dn = caller.acting_dn();
    if view.owner_dn != dn && !caller.is_operator() {
        return Err(Fail::forbidden(format!(
            "{dn} may not read payload {id}: only its owner or a VO operator may"
        )));
    }
    Ok(view)
}

async fn view(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<PayloadView>, Fail> {
    Ok(Json(readable(&st, &caller, &id).await?))
}

async fn download(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let view = readable(&st, &caller, &id).await?;
    if let Some(t) = view.files_deleted_at {
        return Err(Fail::new(
            StatusCode::GONE,
            "gone",
            format!("payload {id}'s output archive was deleted at {t}, after the server's retention period (retention_seconds in server.toml)"),
        ));
    }
    if !view.has_output {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("payload {id} has no output yet (state {})", view.state),
        ));
    }
    let path = st.store.output_path(&id);
    let data = tokio::fs::read(&path)
        .await
        .map_err(|e| Fail::internal(format!("cannot read {}: {e}", path.display())))?;
    Ok(([(header::CONTENT_TYPE, "application/gzip")], data).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
}

async fn list(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<PayloadView>>, Fail> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            serde_json::from_value::<PayloadState>(serde_json::Value::String(s.into()))
                .map_err(|_| {
                    Fail::bad(format!(
                        "state={s:?} is not a payload state (queued, matched, running, done, failed, denied, cancelled, lost)"
                    ))
                })?,
        ),
    };
    let owner = if caller.is_operator() {
        None
    } else {
        Some(caller.acting_dn().to_string())
    };
    Ok(Json(
        blocking(&st, move |s| s.list(owner.as_deref(), state)).await?,
    ))
}

/// `POST /v1/payloads/{id}/signal` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: i32,
}

async fn signal(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SignalRequest>, JsonRejection>,
) -> Result<Json<PayloadView>, Fail> {
    check_id(&id)?;
    let Json(req) = body?;
    let dn = caller.acting_dn().to_string();
    let op = caller.is_operator();
    let pid = id.clone();
    let view = blocking(&st, move |s| {
        s.queue_signal(&pid, &dn, op, req.signal)?;
        s.view(&pid)
    })
    .await?;
    tracing::info!(payload = %id, requester = %caller.acting_dn(), certificate = %caller.certificate_dn(), signal = req.signal, "signal requested");
    Ok(Json(view))
}

async fn cancel(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<PayloadView>, Fail> {
    check_id(&id)?;
    let dn = caller.acting_dn().to_string();
    let op = caller.is_operator();
    let pid = id.clone();
    let view = blocking(&st, move |s| {
        s.cancel(&pid, &dn, op, Utc::now())?;
        s.view(&pid)
    })
    .await?;
    tracing::info!(payload = %id, requester = %caller.acting_dn(), certificate = %caller.certificate_dn(), state = %view.state, "cancel requested");
    Ok(Json(view))
}

/// `POST /v1/payloads/{id}/information`: asks the site's helper, through the payload's pilot,
/// what it sees of the running payload (owner or VO operator, as cancel and signal; the helper
/// authorizes the requester again). Answers the request at once; the answer arrives with the
/// pilot's next heartbeat at `GET .../information/{request_id}`.
async fn information(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<InformationView>), Fail> {
    check_id(&id)?;
    let dn = caller.acting_dn().to_string();
    let op = caller.is_operator();
    let pid = id.clone();
    let hb = st.heartbeat_seconds;
    let view = blocking(&st, move |s| {
        let rid = s.request_information(&pid, &dn, op, Utc::now())?;
        s.information(&pid, &rid, &dn, op, hb)
    })
    .await?;
    tracing::info!(payload = %id, requester = %caller.acting_dn(), certificate = %caller.certificate_dn(), request = %view.request_id, "information requested");
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// `GET /v1/payloads/{id}/information/{request_id}`: the request and its answer so far.
async fn information_answer(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path((id, request_id)): Path<(String, String)>,
) -> Result<Json<InformationView>, Fail> {
    check_id(&id)?;
    if request_id.len() > 64 || !request_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{request_id:?} is not an information request id"),
        ));
    }
    let dn = caller.acting_dn().to_string();
    let op = caller.is_operator();
    let hb = st.heartbeat_seconds;
    Ok(Json(
        blocking(&st, move |s| s.information(&id, &request_id, &dn, op, hb)).await?,
    ))
}
