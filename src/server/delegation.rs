//! The delegation routes: a member delegates a proxy to the server without any private key
//! crossing the network (`POST /v1/delegations`: the server makes a key and a request;
//! `PUT /v1/delegations/{id}`: the member's chain for it, checked), and the matched pilot
//! obtains a proxy for the worker node's key (`POST /v1/payloads/{id}/proxy`), signed with
//! that credential while its owner is an active member. Keys are made and used here with
//! src/grid/delegation.rs; rows and key files are the store's. Every signing is recorded
//! (serial, subject, notAfter).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{post, put};
use axum::{Extension, Json, Router};
use chrono::{Duration, Utc};
use openssl::pkey::PKey;

use super::api::{active_member, blocking, check_id, require_pilot, AppState, Fail, PeerDn};
use super::portal::identity::Caller;
use super::store::{Delegation, Signing, StoreError};
use crate::grid::delegation::{
    check_delegated, new_key_request, Credential, DelegationError, ProxyOrder,
};
use crate::grid::CredentialRefusal;
use crate::protocol::delegation::{
    DelegationCreated, DelegationUpload, DelegationView, IssuedProxy, ProxyCsr,
};

/// How long the server waits for the member's chain after making a key for it.
pub const UPLOAD_WINDOW: Duration = Duration::minutes(10);
/// Requests one member may have waiting for their chain at once: each costs the server an RSA
/// key generation and a key file, so they are bounded.
pub const MAX_PENDING: i64 = 8;

type St = State<Arc<AppState>>;

/// The routes, added to the API router.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/delegations", post(create))
        .route("/v1/delegations/:id", put(upload))
        .route("/v1/payloads/:id/proxy", post(issue))
}

fn refusal(e: DelegationError) -> Fail {
    match e {
        DelegationError::Openssl { .. } => Fail::internal(e.to_string()),
        DelegationError::TooLong { .. } => Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "over_limit",
            e.to_string(),
        ),
        DelegationError::NotTheCaller { .. } => {
            Fail::new(StatusCode::FORBIDDEN, "not_authorized", e.to_string())
        }
        _ => Fail::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    }
}

fn gone(message: String) -> Fail {
    Fail::new(StatusCode::GONE, "gone", message)
}

async fn create(
    State(st): St,
    Extension(caller): Extension<Caller>,
) -> Result<(StatusCode, Json<DelegationCreated>), Fail> {
    let dn = caller.acting_dn().to_string();
    active_member(&st, &dn, String::new()).await?;
    let (owner, now) = (dn.clone(), Utc::now());
    let pending = blocking(&st, move |s| s.pending_delegations(&owner, now)).await?;
    if pending >= MAX_PENDING {
        return Err(Fail::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "{dn} has {pending} delegations waiting for their chain (at most {MAX_PENDING}); upload them (PUT /v1/delegations/{{id}}) or let them lapse ({} s)",
                UPLOAD_WINDOW.num_seconds()
            ),
        )
        .retry_after(UPLOAD_WINDOW.num_seconds() as u64));
    }
    // RSA key generation takes tens of milliseconds: off the async threads.
    let kr = tokio::task::spawn_blocking(new_key_request)
        .await
        .map_err(|e| Fail::internal(format!("worker thread failed: {e}")))?
        .map_err(refusal)?;
    let key_pem = kr.key_pem().map_err(refusal)?;
    let id = format!("d-{}", uuid::Uuid::new_v4().simple());
    let now = Utc::now();
    let upload_by = now + UPLOAD_WINDOW;
    let (did, owner) = (id.clone(), dn.clone());
    blocking(&st, move |s| {
        s.create_delegation(&did, &owner, &key_pem, upload_by, now)
    })
    .await?;
    tracing::info!(delegation = %id, owner = %dn, "delegation requested");
    Ok((
        StatusCode::CREATED,
        Json(DelegationCreated {
            delegation_id: id,
            csr_pem: kr.csr_pem,
            upload_by,
        }),
    ))
}

fn view(d: &Delegation, subject: String) -> DelegationView {
    DelegationView {
        delegation_id: d.id.clone(),
        owner_dn: d.owner_dn.clone(),
        subject,
        serial: d.serial.clone().unwrap_or_default(),
        not_after: d.not_after,
        limited: d.limited,
    }
}

async fn upload(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<DelegationUpload>, JsonRejection>,
) -> Result<Json<DelegationView>, Fail> {
    check_id(&id)?;
    let Json(up) = body?;
    let dn = caller.acting_dn().to_string();
    let (did, owner) = (id.clone(), dn.clone());
    let found = blocking(&st, move |s| {
        let d = s
            .delegation(&did)?
            .ok_or_else(|| StoreError::NotFound(format!("delegation {did}")))?;
        if d.owner_dn != owner {
            return Err(StoreError::Forbidden(format!(
                "delegation {did} was requested by another member; request your own with POST /v1/delegations (`mupilot-server delegate`)"
            )));
        }
        let key = std::fs::read(s.delegation_key_path(&did)).map_err(|source| StoreError::Io {
            path: s.delegation_key_path(&did),
            source,
        })?;
        Ok((d, key))
    })
    .await?;
    let (_, key_pem) = found;
    let key = PKey::private_key_from_pem(&key_pem)
        .map_err(|e| Fail::internal(format!("delegation {id}'s stored key is unreadable: {e}")))?;
    let now = Utc::now();
    let checked = check_delegated(up.chain_pem.as_bytes(), &key, &dn, now).map_err(refusal)?;
    let signing = Signing {
        delegation_id: id.clone(),
        payload_id: None,
        signer_dn: dn.clone(),
        serial: checked.serial.clone(),
        subject: checked.subject.clone(),
        not_after: checked.not_after,
        signed_at: now,
    };
    let (did, owner, chain) = (id.clone(), dn.clone(), up.chain_pem);
    let limited = checked.limited;
    let d = blocking(&st, move |s| {
        s.complete_delegation(&did, &owner, &chain, limited, &signing, now)
    })
    .await?;
    tracing::info!(delegation = %id, owner = %dn, serial = %checked.serial, not_after = %checked.not_after, "credential delegated");
    Ok(Json(view(&d, checked.subject)))
}

async fn issue(
    State(st): St,
    Extension(peer): Extension<PeerDn>,
    Path(id): Path<String>,
    body: Result<Json<ProxyCsr>, JsonRejection>,
) -> Result<Json<IssuedProxy>, Fail> {
    check_id(&id)?;
    require_pilot(&st, &peer.0)?;
    let Json(csr) = body?;
    let pid = id.clone();
    let (holder, delegation) = blocking(&st, move |s| {
        let h = s.proxy_holder(&pid)?;
        let d = match &h.delegation_id {
            Some(d) => s.delegation(d)?.map(|d| {
                let key = std::fs::read(s.delegation_key_path(&d.id));
                (d, key)
            }),
            None => None,
        };
        Ok((h, d))
    })
    .await?;
    if holder.pilot_dn.as_deref() != Some(&*peer.0) {
        return Err(Fail::new(
            StatusCode::FORBIDDEN,
            "not_authorized",
            format!(
                "{} does not hold payload {id}; only the pilot it was matched to may ask for its proxy",
                peer.0
            ),
        ));
    }
    let Some(did) = holder.delegation_id else {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("payload {id} was submitted without a delegated credential; there is no proxy to sign"),
        ));
    };
    if holder.state != "matched" && holder.state != "running" {
        return Err(Fail::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "payload {id} is {}; proxies are signed only while it is matched or running",
                holder.state
            ),
        ));
    }
    // A member suspended, removed or past renewal gets no fresh credential: the suspension
    // or removal cancels the payload, and until the cancel has reached the node the VO does
    // not extend the proxy of someone it no longer vouches for (P3).
    active_member(
        &st,
        &holder.owner_dn,
        format!("the owner of payload {id}, "),
    )
    .await?;
    let now = Utc::now();
    let Some((d, key)) = delegation.filter(|(d, _)| d.not_after > now) else {
        return Err(gone(format!(
            "payload {id}'s delegated credential {did} has expired (or its owner was removed); the owner delegates anew with `mupilot-server delegate`"
        )));
    };
    let chain = d.chain_pem.as_deref().unwrap_or_default();
    let key =
        key.map_err(|e| Fail::internal(format!("delegation {did}'s key file is unreadable: {e}")))?;
    let key = PKey::private_key_from_pem(&key)
        .map_err(|e| Fail::internal(format!("delegation {did}'s stored key is unreadable: {e}")))?;
    let cred = Credential::new(chain.as_bytes(), key).map_err(refusal)?;
    let order = ProxyOrder {
        lifetime: st.worker_proxy,
        limited: false,
    };
    let issued = cred
        .sign_proxy(csr.csr_pem.as_bytes(), &order, now)
        .map_err(|e| match e {
            DelegationError::Refused(r @ CredentialRefusal::Expired { .. }) => {
                gone(format!("payload {id}'s delegated credential {did}: {r}"))
            }
            e => refusal(e),
        })?;
    let signing = Signing {
        delegation_id: did.clone(),
        payload_id: Some(id.clone()),
        signer_dn: st.issuer.clone(),
        serial: issued.serial.clone(),
        subject: issued.subject.clone(),
        not_after: issued.not_after,
        signed_at: now,
    };
    blocking(&st, move |s| s.record_signing(&signing)).await?;
    tracing::info!(payload = %id, delegation = %did, pilot = %peer.0, serial = %issued.serial, not_after = %issued.not_after, "worker-node proxy signed");
    Ok(Json(IssuedProxy {
        chain_pem: issued.chain_pem,
        not_after: issued.not_after,
    }))
}
