//! `/v1/membership/...`: the registry's HTTPS API. The caller is the verified client
//! certificate of the connection ([`ConnInfo`]); no body field names a requester or an
//! approver. Pilot and portal certificates are not members and are refused here. Every
//! change is written to the audit log before its answer leaves.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::types::{
    check_dn, check_fqans, check_text, Decision, FieldError, NewRequest, Notification,
    RegisterRequest, ReinstateRequest, RemoveRequest, RequestKind, RequestView, SuspendRequest,
    MAX_BODY, MAX_NOTE,
};
use super::{Registry, Role};
use crate::server::api::{AppState, Fail};
use crate::server::portal::gate::ConnInfo;
use crate::server::portal::identity::PeerKind;
use crate::server::store::{FiledRequest, Member, Store, StoreError};

type St = State<Arc<AppState>>;
type Body<T> = Result<Json<T>, JsonRejection>;

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/membership/register", post(register))
        .route("/v1/membership/me", get(me))
        .route("/v1/membership/members", get(members))
        .route("/v1/membership/requests", post(file).get(requests))
        .route("/v1/membership/requests/:id/approve", post(approve))
        .route("/v1/membership/requests/:id/reject", post(reject))
        .route("/v1/membership/suspend", post(suspend))
        .route("/v1/membership/reinstate", post(reinstate))
        .route("/v1/membership/remove", post(remove))
        .route("/v1/membership/notifications", get(notifications))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// A member as the API shows it: the registry entry and its state now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    /// `active`, `expired`, `pending`, `suspended` or `removed`.
    pub state: String,
    #[serde(flatten)]
    pub member: serde_json::Value,
}

impl MemberView {
    pub fn of(m: &Member) -> Self {
        MemberView {
            state: m.state(Utc::now()).to_string(),
            member: serde_json::to_value(m).expect("members serialise"),
        }
    }
}

/// `GET /v1/membership/me`: the caller's own entry and requests (how members see their data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeView {
    pub member: Option<MemberView>,
    pub requests: Vec<RequestView>,
}

/// The answer to a change: the request as decided (or filed) and the member after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeView {
    pub request: RequestView,
    pub member: Option<MemberView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub payloads_cancelled: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub payloads_cancel_sent: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
}

fn bad(e: FieldError) -> Fail {
    Fail::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("{}: {}", e.field, e.why),
    )
}

/// The certificate DN of a person-like caller; pilots and portals are not members.
fn caller(conn: &ConnInfo) -> Result<String, Fail> {
    match conn.peer.kind {
        PeerKind::Pilot | PeerKind::Portal => Err(Fail::new(
            StatusCode::FORBIDDEN,
            "not_authorized",
            format!(
                "{} is a {} certificate of the VO; membership requests come from the member's own certificate",
                conn.peer.dn,
                conn.peer.kind.as_str()
            ),
        )),
        _ => Ok(conn.peer.dn.to_string()),
    }
}

/// Runs registry work on a blocking thread (store calls, audit appends, the notify hook).
async fn blocking<T, F>(st: &AppState, f: F) -> Result<T, Fail>
where
    T: Send + 'static,
    F: FnOnce(&Store, &Registry) -> Result<T, StoreError> + Send + 'static,
{
    let store = st.store.clone();
    let reg = st.registry.clone();
    tokio::task::spawn_blocking(move || f(&store, &reg))
        .await
        .map_err(|e| Fail::internal(format!("worker thread failed: {e}")))?
        .map_err(Fail::from)
}

fn change(request: RequestView, effect: Option<crate::server::store::Effect>) -> ChangeView {
    let e = effect.unwrap_or_default();
    ChangeView {
        request,
        member: e.member.as_ref().map(MemberView::of),
        payloads_cancelled: e.cancelled,
        payloads_cancel_sent: e.cancelling,
        notifications: e.notifications,
    }
}

async fn register(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    body: Body<RegisterRequest>,
) -> Result<(StatusCode, Json<ChangeView>), Fail> {
    let dn = caller(&conn)?;
    let Json(req) = body?;
    if conn.peer.robot_oid && req.kind != super::types::EntityKind::Robot {
        return Err(bad(FieldError {
            field: "kind".into(),
            why: format!(
                "{dn} is a robot certificate (IGTF robot policy); register it with kind \"robot\" and its responsible person"
            ),
        }));
    }
    let r = st.registry.new_registration(&dn, req).map_err(bad)?;
    let view = blocking(&st, move |store, reg| {
        let v = store.register(&r, Utc::now())?;
        reg.record_request(store, "register", &dn, &v, None)?;
        Ok(v)
    })
    .await?;
    tracing::info!(request = %view.id, dn = %view.subject_dn, "membership registration filed");
    Ok((StatusCode::CREATED, Json(change(view, None))))
}

async fn me(State(st): St, Extension(conn): Extension<ConnInfo>) -> Result<Json<MeView>, Fail> {
    let dn = caller(&conn)?;
    let view = blocking(&st, move |store, _| {
        Ok(MeView {
            member: store.member(&dn)?.as_ref().map(MemberView::of),
            requests: store.membership_requests(Some(&dn), None)?,
        })
    })
    .await?;
    Ok(Json(view))
}

#[derive(Deserialize)]
struct MembersQuery {
    #[serde(default)]
    dn: Option<String>,
}

async fn members(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    Query(q): Query<MembersQuery>,
) -> Result<Json<Vec<MemberView>>, Fail> {
    let dn = caller(&conn)?;
    let list = blocking(&st, move |store, reg| {
        reg.require_manager(store, &dn, "read the membership registry", Utc::now())?;
        Ok(match q.dn {
            Some(one) => store.member(&one)?.into_iter().collect(),
            None => store.members()?,
        })
    })
    .await?;
    Ok(Json(list.iter().map(MemberView::of).collect()))
}

async fn file(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    body: Body<NewRequest>,
) -> Result<(StatusCode, Json<ChangeView>), Fail> {
    let dn = caller(&conn)?;
    let Json(req) = body?;
    let vo = st.vo.clone();
    let (grid, vo_aup) = (
        st.registry.settings.grid_aup_version.clone(),
        st.registry.settings.vo_aup_version.clone(),
    );
    // The shape checks first, so a hostile body is refused before any lookup.
    match &req {
        NewRequest::Attributes { fqans } => check_fqans(&vo, fqans).map_err(bad)?,
        NewRequest::Renewal { accept, .. } => accept.check(&grid, &vo_aup).map_err(bad)?,
        NewRequest::Suspension { dn: who, reason } | NewRequest::Removal { dn: who, reason } => {
            check_dn("dn", who).map_err(bad)?;
            check_text("reason", reason, MAX_NOTE).map_err(bad)?;
        }
    }
    let view = blocking(&st, move |store, reg| {
        let now = Utc::now();
        let filed = match req {
            NewRequest::Attributes { fqans } => FiledRequest {
                kind: RequestKind::Attributes,
                subject_dn: dn.clone(),
                requester_dn: dn.clone(),
                details: serde_json::json!({ "fqans": fqans }),
            },
            NewRequest::Renewal {
                registration,
                accept,
            } => {
                let m = store
                    .member(&dn)?
                    .ok_or_else(|| StoreError::NoMember(dn.clone()))?;
                registration
                    .check(m.kind)
                    .map_err(|e| StoreError::Invalid(format!("{}: {}", e.field, e.why)))?;
                FiledRequest {
                    kind: RequestKind::Renewal,
                    subject_dn: dn.clone(),
                    requester_dn: dn.clone(),
                    details: serde_json::json!({
                        "registration": registration,
                        "grid_aup": accept.grid_aup,
                        "vo_aup": accept.vo_aup,
                    }),
                }
            }
            NewRequest::Suspension { dn: who, reason } => {
                let role = reg.role(store, &dn, now)?;
                if role == Role::Other {
                    return Err(StoreError::Forbidden(format!(
                        "{dn} may not ask for a suspension: requests come from the Grid security officer or Grid operations (security_officer_dns, operations_dns of [membership] in the VO's server.toml) or a VO manager; a site routes its request through them"
                    )));
                }
                let role = match role {
                    Role::Manager => "vo_manager",
                    Role::SecurityOfficer => "security_officer",
                    Role::Operations => "operations",
                    Role::Other => unreachable!("refused above"),
                };
                FiledRequest {
                    kind: RequestKind::Suspension,
                    subject_dn: who,
                    requester_dn: dn.clone(),
                    details: serde_json::json!({ "reason": reason, "requester_role": role }),
                }
            }
            NewRequest::Removal { dn: who, reason } => {
                if who == dn {
                    return Err(StoreError::Invalid(
                        "a member leaves at once with `mupilot-server membership remove` (POST /v1/membership/remove); a removal request is for someone else's membership".into(),
                    ));
                }
                FiledRequest {
                    kind: RequestKind::Removal,
                    subject_dn: who,
                    requester_dn: dn.clone(),
                    details: serde_json::json!({ "reason": reason }),
                }
            }
        };
        let v = store.file_request(&filed, now)?;
        reg.record_request(store, "request", &dn, &v, None)?;
        Ok(v)
    })
    .await?;
    tracing::info!(request = %view.id, kind = view.kind.as_str(), subject = %view.subject_dn, "membership request filed");
    Ok((StatusCode::CREATED, Json(change(view, None))))
}

#[derive(Deserialize)]
struct RequestsQuery {
    #[serde(default)]
    state: Option<String>,
}

async fn requests(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    Query(q): Query<RequestsQuery>,
) -> Result<Json<Vec<RequestView>>, Fail> {
    let dn = caller(&conn)?;
    if let Some(s) = &q.state {
        if !matches!(s.as_str(), "pending" | "approved" | "rejected") {
            return Err(bad(FieldError {
                field: "state".into(),
                why: format!("{s:?} is not a request state (pending, approved, rejected)"),
            }));
        }
    }
    let list = blocking(&st, move |store, reg| {
        // Managers see every request; anyone else the ones they filed or are the subject of.
        let own = reg.role(store, &dn, Utc::now())? != Role::Manager;
        store.membership_requests(own.then_some(dn.as_str()), q.state.as_deref())
    })
    .await?;
    Ok(Json(list))
}

async fn decide(
    st: Arc<AppState>,
    conn: ConnInfo,
    id: String,
    body: Body<Decision>,
    approve: bool,
) -> Result<Json<ChangeView>, Fail> {
    let dn = caller(&conn)?;
    let Json(d) = body?;
    check_text("verification", &d.verification, MAX_NOTE).map_err(bad)?;
    if let Some(n) = &d.note {
        check_text("note", n, MAX_NOTE).map_err(bad)?;
    }
    if !crate::util::is_safe_id(&id) {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{id:?} is not a membership request id"),
        ));
    }
    let (req, effect) = blocking(&st, move |store, reg| {
        let now = Utc::now();
        reg.require_manager(store, &dn, "decide membership requests", now)?;
        let (req, effect) =
            store.decide(&id, &dn, approve, &d.verification, d.note.as_deref(), now)?;
        let action = if approve { "approve" } else { "reject" };
        reg.record_request(store, action, &dn, &req, Some(&effect))?;
        Ok((req, effect))
    })
    .await?;
    tracing::info!(request = %req.id, kind = req.kind.as_str(), subject = %req.subject_dn, outcome = %req.state, by = %conn.peer.dn, "membership request decided");
    Ok(Json(change(req, Some(effect))))
}

async fn approve(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    body: Body<Decision>,
) -> Result<Json<ChangeView>, Fail> {
    decide(st, conn, id, body, true).await
}

async fn reject(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    body: Body<Decision>,
) -> Result<Json<ChangeView>, Fail> {
    decide(st, conn, id, body, false).await
}

/// Files and carries out a manager's (or a leaving member's) change in one transaction.
async fn at_once(
    st: &AppState,
    dn: String,
    filed: FiledRequest,
    verification: String,
    action: &'static str,
    manager_only: Option<&'static str>,
) -> Result<Json<ChangeView>, Fail> {
    let (req, effect) = blocking(st, move |store, reg| {
        let now = Utc::now();
        if let Some(what) = manager_only {
            reg.require_manager(store, &dn, what, now)?;
        }
        let (req, effect) = store.file_and_decide(&filed, &dn, &verification, now)?;
        reg.record_request(store, action, &dn, &req, Some(&effect))?;
        Ok((req, effect))
    })
    .await?;
    tracing::info!(request = %req.id, kind = req.kind.as_str(), subject = %req.subject_dn, cancelled = effect.cancelled.len(), cancel_sent = effect.cancelling.len(), "membership change carried out");
    Ok(Json(change(req, Some(effect))))
}

async fn suspend(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    body: Body<SuspendRequest>,
) -> Result<Json<ChangeView>, Fail> {
    let dn = caller(&conn)?;
    let Json(r) = body?;
    check_dn("dn", &r.dn).map_err(bad)?;
    check_text("reason", &r.reason, MAX_NOTE).map_err(bad)?;
    check_text("verification", &r.verification, MAX_NOTE).map_err(bad)?;
    if let Some(by) = &r.reported_by {
        check_dn("reported_by", by).map_err(bad)?;
    }
    let filed = FiledRequest {
        kind: RequestKind::Suspension,
        subject_dn: r.dn,
        requester_dn: dn.clone(),
        details: serde_json::json!({
            "reason": r.reason,
            "reported_by": r.reported_by,
            "requester_role": "vo_manager",
        }),
    };
    at_once(
        &st,
        dn,
        filed,
        r.verification,
        "suspend",
        Some("suspend members"),
    )
    .await
}

async fn reinstate(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    body: Body<ReinstateRequest>,
) -> Result<Json<ChangeView>, Fail> {
    let dn = caller(&conn)?;
    let Json(r) = body?;
    check_dn("dn", &r.dn).map_err(bad)?;
    check_text("verification", &r.verification, MAX_NOTE).map_err(bad)?;
    let filed = FiledRequest {
        kind: RequestKind::Reinstatement,
        subject_dn: r.dn,
        requester_dn: dn.clone(),
        details: serde_json::json!({}),
    };
    at_once(
        &st,
        dn,
        filed,
        r.verification,
        "reinstate",
        Some("reinstate members"),
    )
    .await
}

async fn remove(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
    body: Body<RemoveRequest>,
) -> Result<Json<ChangeView>, Fail> {
    let dn = caller(&conn)?;
    let Json(r) = body?;
    if let Some(reason) = &r.reason {
        check_text("reason", reason, MAX_NOTE).map_err(bad)?;
    }
    let subject = r.dn.clone().unwrap_or_else(|| dn.clone());
    check_dn("dn", &subject).map_err(bad)?;
    let own = subject == dn;
    let filed = FiledRequest {
        kind: RequestKind::Removal,
        subject_dn: subject,
        requester_dn: dn.clone(),
        details: serde_json::json!({ "reason": r.reason }),
    };
    let (verification, manager) = if own {
        ("the member removed themself".to_string(), None)
    } else {
        if r.reason.is_none() {
            return Err(bad(FieldError {
                field: "reason".into(),
                why: "is required when a VO manager removes someone (the audit log keeps why)"
                    .into(),
            }));
        }
        (
            format!("removed by VO manager {dn}"),
            Some("remove other members"),
        )
    };
    at_once(&st, dn, filed, verification, "remove", manager).await
}

async fn notifications(
    State(st): St,
    Extension(conn): Extension<ConnInfo>,
) -> Result<Json<Vec<Notification>>, Fail> {
    let dn = caller(&conn)?;
    let list = blocking(&st, move |store, reg| {
        reg.require_manager(store, &dn, "read membership notifications", Utc::now())?;
        store.membership_notifications()
    })
    .await?;
    Ok(Json(list))
}
