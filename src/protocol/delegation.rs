//! The owner's delegated X.509 proxy as the wire sees it: the envelope's note that one exists,
//! and the two messages by which a worker node obtains its own proxy from the VO server.
//!
//! The member's side: `POST /v1/delegations` answers a [`DelegationCreated`] (the server made
//! a key and a request for it), the member signs a proxy for it with their own proxy and
//! sends the chain (`PUT /v1/delegations/{id}`, [`DelegationUpload`]), answered by a
//! [`DelegationView`]; a submission then names the delegation (`SubmitRequest.delegation`).
//!
//! No private key ever crosses the network (portal policy): the worker node makes a key pair
//! and sends only a certificate request (`ProxyCsr`); the VO server signs a proxy for that key
//! with the credential the owner delegated to it and returns the chain (`IssuedProxy`).
//! Plain data only: no crypto and no I/O here, so the helper may use this module.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Carried in the signed envelope when the owner delegated a proxy to the VO server: the
/// pilot must obtain a worker-node proxy for the payload, and the helper must verify and
/// deliver it. Signed by the VO, so a pilot cannot strip the requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegatedCredential {
    /// What was delegated; today only RFC 3820 proxies.
    pub kind: CredentialKind,
    /// When the delegated credential held by the server expires (it signs no proxy past it).
    pub not_after: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// An RFC 3820 proxy certificate chain, possibly carrying VOMS attribute certificates.
    X509Proxy,
}

/// Pilot -> server, `POST /v1/payloads/{id}/proxy`: a request for a proxy for a key made on
/// the worker node. Only the pilot the payload is matched to may ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyCsr {
    /// A PEM `CERTIFICATE REQUEST` (PKCS#10) for the worker node's fresh key.
    pub csr_pem: String,
}

/// Server -> pilot: the answer to a [`ProxyCsr`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedProxy {
    /// PEM certificates: first the new proxy (for the CSR's key), then the delegated chain it
    /// was signed with, up to and including the owner's end-entity certificate.
    pub chain_pem: String,
    /// The new proxy's notAfter.
    pub not_after: DateTime<Utc>,
}

/// Server -> member, `POST /v1/delegations`: a request for a proxy for a key the server made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationCreated {
    pub delegation_id: String,
    /// A PEM `CERTIFICATE REQUEST` (PKCS#10) for the server's new key.
    pub csr_pem: String,
    /// The chain must be uploaded before this; the request lapses then.
    pub upload_by: DateTime<Utc>,
}

/// Member -> server, `PUT /v1/delegations/{id}`: the proxy signed for the request, then the
/// member's own chain down to the end-entity certificate (PEM, no private key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationUpload {
    pub chain_pem: String,
}

/// A stored delegation as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationView {
    pub delegation_id: String,
    pub owner_dn: String,
    /// The delegated proxy's subject and serial (lower-case hex).
    pub subject: String,
    pub serial: String,
    /// The chain's earliest notAfter; the server deletes the credential then.
    pub not_after: DateTime<Utc>,
    pub limited: bool,
}
