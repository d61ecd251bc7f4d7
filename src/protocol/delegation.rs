//! The owner's delegated X.509 proxy as the wire sees it: the envelope's note that one exists,
//! and the two messages by which a worker node obtains its own proxy from the VO server.
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
