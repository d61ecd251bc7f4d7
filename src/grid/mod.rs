//! Grid credentials the site verifies itself: X.509 proxy chains (RFC 3820) against the site's CA
//! directory and the VOMS attribute certificate inside them against its vomsdir.
//!
//! One entry point, [`Verifier::verify`]: a PEM chain (proxy first, as a proxy file holds it), the
//! owner DN and VO the envelope claims, and the time; out comes a [`VerifiedCredential`] (the
//! end-entity DN, proxy serials, not-after, limited flag, VO and FQANs from the verified AC) or a
//! [`CredentialRefusal`] whose message names what failed and the value. Verified results are
//! cached by the chain's SHA-256 until the credential's not-after or a change of the CA
//! directory or vomsdir ([`cache`]).
//!
//! This module reads files and does cryptography only: it starts no process and opens no
//! socket. The verifier holds no private key (a proxy file's key is skipped unread); the one
//! private key here is the payload's, made on the worker node ([`worker_key`]). It links the
//! system's OpenSSL (feature `grid`), which the static musl pilot is built without.

pub(crate) mod ac;
pub(crate) mod cache;
pub(crate) mod config;
pub mod delegation;
pub(crate) mod dn;
pub(crate) mod lsc;
pub(crate) mod possession;
pub(crate) mod proxy;
pub(crate) mod refusal;
pub(crate) mod trust;
pub(crate) mod verify;
pub(crate) mod voms;
#[cfg(feature = "switch")]
pub(crate) mod worker_key;

pub use config::{EnvelopeFqans, GridConfig, LimitedProxies};
pub use refusal::CredentialRefusal;
pub use verify::{Claim, VerifiedCredential, Verifier};
