//! The payload's X.509 proxy on the worker node (issue 17 items 2-4): the key the helper
//! makes for a delegated one ([`keys`], made ahead by the [`pool`]; grid builds), the checks a launch with `credential`
//! must pass ([`for_launch`]), the verified proxy as it goes to a payload ([`Delivery`], also
//! the gLExec entry's), the one writer of the proxy file into the payload's scratch as the
//! account ([`deliver`]) and its renewal while the payload runs ([`renew`]).
//!
//! Runs in the multi-threaded helper as root. The payload's private key never leaves the
//! helper but for the 0600 file in the payload's own scratch; the pilot sees only the CSR and
//! the issued chain. Every refusal is a [`ProxyError`] naming what failed; launches without
//! `credential` do not enter this module beyond one `Option` test.

// Built without grid support, this module only refuses delegated launches; the rest is unused.
#![cfg_attr(not(feature = "grid"), allow(dead_code, unused_imports))]

// setfsuid/setfsgid for writing as the account; descriptors from open(2) taken into OwnedFd.
#[allow(unsafe_code)]
pub mod deliver;
#[cfg(feature = "grid")]
pub mod keys;
#[cfg(feature = "grid")]
pub mod pool;
#[cfg(feature = "grid")]
pub mod renew;

use crate::protocol::switch_wire::DenialClass;
use crate::protocol::EnvelopeBody;

pub use deliver::{deliver, proxy_path};

/// Why a payload's proxy was not accepted, made or delivered.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[cfg(not(feature = "grid"))]
    #[error("the envelope carries a delegated credential, but this helper was built without grid support (cargo feature \"grid\"); install the packaged mupilot-switch")]
    NotBuilt,
    #[error("the envelope carries a delegated credential, but this site verifies no grid credentials: add a [grid] table (cert_dir, vomsdir) to {config}")]
    NoGrid { config: String },
    #[error("the envelope requires the owner's delegated proxy (credential x509-proxy), but the launch carried none; send proxy_request, relay its CSR to the VO server and launch with launch_with_proxy")]
    Missing,
    #[error("a proxy came with the launch but the envelope carries no credential")]
    Unexpected,
    #[error("proxy_request for an envelope without a delegated credential; launch it with launch")]
    NotDelegated,
    #[error("no proxy key was made for payload '{payload_id}' with this envelope on this connection; send proxy_request first")]
    NoPendingKey { payload_id: String },
    #[error("{pending} proxy requests are pending on this connection (at most {max}); launch or drop some first")]
    TooManyPending { pending: usize, max: usize },
    #[error("{0}")]
    Key(String),
    /// The credential itself was refused (`grid::CredentialRefusal`'s message).
    #[error("proxy refused: {0}")]
    Refused(String),
    /// The site's CA directory or vomsdir could not be used.
    #[error("proxy not verifiable: {0}")]
    SiteTrust(String),
    #[error("the renewed proxy's FQANs {renewed:?} are not those the payload was authorized with {launched:?}")]
    FqansChanged {
        renewed: Vec<String>,
        launched: Vec<String>,
    },
    #[error("payload '{payload_id}' is not running for this pilot")]
    NotRunning { payload_id: String },
    #[error("payload '{payload_id}' has no delegated credential to renew")]
    NoCredential { payload_id: String },
    #[error("cannot write the proxy file {path}: {reason}")]
    Deliver { path: String, reason: String },
}

#[cfg(feature = "grid")]
impl From<crate::grid::CredentialRefusal> for ProxyError {
    fn from(r: crate::grid::CredentialRefusal) -> Self {
        match r {
            crate::grid::CredentialRefusal::Site(s) => ProxyError::SiteTrust(s),
            other => ProxyError::Refused(other.to_string()),
        }
    }
}

impl ProxyError {
    /// Who is to blame, as for a launch denial.
    pub fn class(&self) -> DenialClass {
        match self {
            #[cfg(not(feature = "grid"))]
            ProxyError::NotBuilt => DenialClass::System,
            ProxyError::NoGrid { .. }
            | ProxyError::Key(_)
            | ProxyError::SiteTrust(_)
            | ProxyError::Deliver { .. } => DenialClass::System,
            ProxyError::Missing
            | ProxyError::Refused(_)
            | ProxyError::FqansChanged { .. }
            | ProxyError::NoCredential { .. } => DenialClass::Authorization,
            ProxyError::Unexpected
            | ProxyError::NotDelegated
            | ProxyError::NoPendingKey { .. }
            | ProxyError::TooManyPending { .. }
            | ProxyError::NotRunning { .. } => DenialClass::Caller,
        }
    }
}

/// A key the helper made for a payload, as a launch takes it from the connection.
#[cfg(feature = "grid")]
pub type PendingKey = keys::Pending;
/// Without grid support no key is ever made.
#[cfg(not(feature = "grid"))]
pub enum PendingKey {}

/// What came with a `launch_with_proxy`: the issued chain and the key made for it, if any.
pub struct LaunchProxy<'a> {
    pub key: Option<PendingKey>,
    pub chain_pem: &'a str,
}

/// A verified proxy, ready to go into the payload's scratch.
pub struct Delivery {
    /// The proxy file: the new proxy, its key, the chain.
    pub file: Vec<u8>,
    /// The new proxy's serial (lower-case hex).
    pub serial: String,
    /// When the credential stops being usable (chain and AC).
    pub not_after: String,
    /// The FQANs that feed bans, policies and the group map (`grid.envelope_fqans`).
    pub fqans: Vec<String>,
    /// X509_USER_PROXY, X509_CERT_DIR, X509_VOMS_DIR for the payload (set at launch).
    pub env: Vec<(String, String)>,
}

#[cfg(feature = "grid")]
impl Delivery {
    /// The proxy file `file` of a credential the verifier accepted; `fqans` are those the
    /// decision sees. The environment is set by [`Delivery::for_scratch`].
    pub fn verified(
        file: Vec<u8>,
        cred: &crate::grid::VerifiedCredential,
        fqans: Vec<String>,
    ) -> Delivery {
        Delivery {
            file,
            serial: cred.proxy_serials.first().cloned().unwrap_or_default(),
            not_after: cred
                .not_after
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            fqans,
            env: Vec::new(),
        }
    }

    /// The payload's variables for a proxy delivered into `scratch` (the directory the
    /// sandbox makes for the payload): `X509_USER_PROXY` naming the file, and the site's CA
    /// directory and vomsdir, where grid tools look for them.
    pub fn for_scratch(
        mut self,
        scratch: &std::path::Path,
        grid: &crate::grid::GridConfig,
    ) -> Self {
        self.env = vec![
            (
                "X509_USER_PROXY".into(),
                proxy_path(scratch).display().to_string(),
            ),
            ("X509_CERT_DIR".into(), grid.cert_dir.display().to_string()),
            ("X509_VOMS_DIR".into(), grid.vomsdir.display().to_string()),
        ];
        self
    }
}

impl Delivery {
    /// Its facts in a launch's records: the verified FQANs, the serial and not-after (the
    /// start record is the delivery record).
    pub fn note(&self, rec: &mut super::audit::AuditRecord) {
        rec.fqans = Some(self.fqans.clone());
        rec.proxy_serial = Some(self.serial.clone());
        rec.proxy_not_after = Some(self.not_after.clone());
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // The file holds the payload's private key: leave no copy in freed memory.
        self.file.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.file);
    }
}

/// The checks of a launch (issue 17 item 2), after the envelope's signature and nonce: none
/// for an envelope without `credential` and no chain; otherwise the chain must be for the key
/// made for this envelope (`key`, taken from the connection's pending keys) and verify
/// against the site's `[grid]` for the envelope's owner DN and VO.
#[cfg(feature = "grid")]
pub fn for_launch(
    helper: &super::daemon::Helper,
    body: &EnvelopeBody,
    proxy: Option<LaunchProxy<'_>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Delivery>, ProxyError> {
    match (&body.credential, proxy) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ProxyError::Unexpected),
        (Some(_), None) => {
            // Said before "missing" so a site without [grid] learns what to configure.
            helper.verifier.as_ref().ok_or_else(|| no_grid(helper))?;
            Err(ProxyError::Missing)
        }
        (Some(_), Some(LaunchProxy { key, chain_pem })) => {
            let verifier = helper.verifier.as_ref().ok_or_else(|| no_grid(helper))?;
            let key = key.ok_or_else(|| ProxyError::NoPendingKey {
                payload_id: body.payload_id.clone(),
            })?;
            let d = keys::verify_issued(verifier, &key, chain_pem.as_bytes(), body, now)?;
            // The scratch directory the sandbox makes for this payload (sandbox/start.rs).
            let scratch = helper.cfg.sandbox.scratch_root.join(&body.payload_id);
            Ok(Some(d.for_scratch(&scratch, verifier.config())))
        }
    }
}

/// [`for_launch`] of a helper built without grid support: an envelope with `credential`
/// cannot run here.
#[cfg(not(feature = "grid"))]
pub fn for_launch(
    _helper: &super::daemon::Helper,
    body: &EnvelopeBody,
    proxy: Option<LaunchProxy<'_>>,
    _now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Delivery>, ProxyError> {
    match (&body.credential, proxy) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ProxyError::Unexpected),
        (Some(_), _) => Err(ProxyError::NotBuilt),
    }
}

#[cfg(feature = "grid")]
fn no_grid(helper: &super::daemon::Helper) -> ProxyError {
    ProxyError::NoGrid {
        config: helper.cfg.path.display().to_string(),
    }
}
