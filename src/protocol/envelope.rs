//! The payload envelope: what the VO server promises about one payload, signed with the VO's
//! Ed25519 key.
//!
//! The signature covers the exact bytes of the JSON body, which travel base64-encoded, so no
//! canonical JSON form is needed and no re-serialisation can change what was signed. A
//! [`VerifiedEnvelope`] can only be obtained through [`SignedEnvelope::verify`]: code that
//! holds one knows the signature, the format version, the validity window (its length against
//! the site's maximum, and now inside it) and the binding to this node and this pilot were
//! checked. Replay protection (remembering nonces) is stateful and belongs to the helper.

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The envelope format version this code writes and accepts. Version 2 added the binding to
/// the node and the pilot the payload was matched to (`node`, `pilot_id`); version 1
/// envelopes are refused (see [`EnvelopeError::Unbound`]).
pub const ENVELOPE_VERSION: u32 = 2;

/// Longest accepted `node` (a fully qualified host name is at most 253 characters).
pub const MAX_NODE_LEN: usize = 253;

/// A node name as envelopes, switch.toml `node_name` and match requests carry it: 1-253
/// characters without whitespace or control characters.
pub fn is_valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_LEN
        && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Largest encoded body accepted before any parsing (bytes of base64).
pub const MAX_BODY_B64: usize = 1 << 20;

/// Who owns a payload, as the VO vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The owner's certificate subject, grid style: `/DC=org/DC=example/CN=Alice`.
    pub dn: String,
    /// The VO the owner belongs to; selects the key the helper verifies with.
    pub vo: String,
    /// VOMS-style attributes (`/vo/group/Role=prod`), most significant first.
    #[serde(default)]
    pub fqans: Vec<String>,
    /// End of the owner's current VO membership (P3): the helper refuses after it.
    pub membership_valid_until: DateTime<Utc>,
}

/// What the payload may consume; the helper turns these into cgroup limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cores: u32,
    pub memory_bytes: u64,
    pub walltime_seconds: u64,
}

/// The signed content of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeBody {
    pub version: u32,
    pub payload_id: String,
    pub owner: Owner,
    #[serde(default)]
    pub jobtag: Option<String>,
    /// argv[0] is the executable, resolved by the payload's PATH inside the sandbox.
    pub argv: Vec<String>,
    /// The payload's own environment variables (added to the site's allowlisted ones).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Lower-case hex SHA-256 of the input bundle (tar.gz), if the payload has one.
    #[serde(default)]
    pub bundle_sha256: Option<String>,
    pub resources: Resources,
    /// Paths relative to the scratch directory that are copied back after the payload ends.
    #[serde(default)]
    pub outputs: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// The node the payload was matched for, as its helper names itself (switch.toml
    /// `node_name`, reported to the pilot in `welcome` and by the pilot in its match request):
    /// a helper refuses an envelope bound to another node.
    pub node: String,
    /// The pilot the payload was matched to: a helper refuses it from a connection whose
    /// hello names another pilot.
    pub pilot_id: String,
    /// Random, unique per envelope: the helper refuses a nonce it has seen before.
    pub nonce: String,
    /// The server that signed (informational; the key decides).
    #[serde(default)]
    pub issuer: String,
    /// Set when the owner delegated an X.509 proxy to the VO server: the payload runs only
    /// with a worker-node proxy the helper verified (see `protocol::delegation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<super::delegation::DelegatedCredential>,
}

/// An envelope as it travels: the body's bytes (base64) and the signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEnvelope {
    /// base64 (standard alphabet, padded) of the JSON body bytes.
    pub body: String,
    /// base64 of the 64-byte Ed25519 signature over the decoded body bytes.
    pub signature: String,
}

/// Why an envelope was refused. Every variant is a caller-side problem: the payload must not run.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope body is not valid base64: {0}")]
    BodyEncoding(base64::DecodeError),
    #[error("envelope body is {0} bytes of base64, more than the {MAX_BODY_B64} accepted")]
    BodyTooLarge(usize),
    #[error("envelope signature is not 64 bytes of base64")]
    SignatureEncoding,
    #[error("envelope signature does not verify with the key of VO '{vo}': the envelope was altered or signed by another key")]
    BadSignature { vo: String },
    #[error("envelope body is not valid JSON of the expected shape: {0}")]
    BodyJson(serde_json::Error),
    #[error("envelope version {0} is not supported (this helper accepts {ENVELOPE_VERSION})")]
    Version(u32),
    #[error("envelope version 1 carries no node binding, so it could run on any node that trusts the VO, and is refused; the VO server must be upgraded to sign version {ENVELOPE_VERSION} envelopes bound to the pilot's node")]
    Unbound,
    #[error("envelope is valid for {window_seconds} s ({not_before} to {not_after}), more than this site's maximum of {max_seconds} s (max_envelope_validity_seconds in switch.toml); the VO server must sign shorter envelopes (envelope_lifetime_seconds in its server.toml)")]
    WindowTooLong {
        window_seconds: i64,
        max_seconds: i64,
        not_before: String,
        not_after: String,
    },
    #[error("envelope is not valid before {0}")]
    NotYetValid(DateTime<Utc>),
    #[error("envelope is stale: it is {age_seconds} s old (valid from {not_before} to {not_after}) and expired {late_seconds} s ago; a pilot launches right after its match, and a new match signs a fresh envelope")]
    Expired {
        age_seconds: i64,
        late_seconds: i64,
        not_before: String,
        not_after: String,
    },
    #[error("envelope is bound to node '{envelope}' but this helper is node '{here}' (node_name in switch.toml): an envelope runs only on the node of the pilot it was matched to")]
    WrongNode { envelope: String, here: String },
    #[error("envelope was matched to pilot '{envelope}' but this connection's hello names pilot '{hello}': an envelope runs only for the pilot it was matched to")]
    WrongPilot { envelope: String, hello: String },
    #[error("envelope field '{field}' is invalid: {why}")]
    Field { field: &'static str, why: String },
}

/// A key file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not a PEM {kind} Ed25519 key ({why}); create one with `mupilot-server init` or `openssl genpkey -algorithm ed25519`")]
    Parse {
        path: String,
        kind: &'static str,
        why: String,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The VO's private signing key (server side only).
pub struct VoSigningKey(SigningKey);

/// The VO's public key, as the site configures it for the helper.
#[derive(Clone, Debug)]
pub struct VoVerifyingKey(VerifyingKey);

impl VoSigningKey {
    pub fn generate() -> Self {
        VoSigningKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        SigningKey::from_pkcs8_pem(&text)
            .map(VoSigningKey)
            .map_err(|e| KeyError::Parse {
                path: path.display().to_string(),
                kind: "PKCS#8 private",
                why: e.to_string(),
            })
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(Default::default())
            .expect("an Ed25519 key always encodes as PKCS#8")
            .to_string()
    }

    pub fn verifying_key(&self) -> VoVerifyingKey {
        VoVerifyingKey(self.0.verifying_key())
    }

    /// Serialises and signs a body.
    pub fn sign(&self, body: &EnvelopeBody) -> SignedEnvelope {
        let (body, signature) = self.sign_json(body);
        SignedEnvelope { body, signature }
    }

    /// Serialises any body to JSON and signs its bytes: (base64 body, base64 signature).
    /// Envelopes and operator commands share this scheme.
    pub(crate) fn sign_json<T: Serialize>(&self, body: &T) -> (String, String) {
        let bytes = serde_json::to_vec(body).expect("signed bodies always serialise");
        let sig = self.0.sign(&bytes);
        (B64.encode(&bytes), B64.encode(sig.to_bytes()))
    }
}

impl VoVerifyingKey {
    /// Reads an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text).map_err(|why| KeyError::Parse {
            path: path.display().to_string(),
            kind: "SPKI public",
            why,
        })
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        VerifyingKey::from_public_key_pem(text)
            .map(VoVerifyingKey)
            .map_err(|e| e.to_string())
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_public_key_pem(Default::default())
            .expect("an Ed25519 key always encodes as SPKI")
    }

    /// Decodes a base64 body and checks the base64 signature over its bytes.
    /// Returns the body bytes only when the signature verifies.
    pub(crate) fn verify_b64(
        &self,
        body: &str,
        signature: &str,
    ) -> Result<Vec<u8>, SignatureError> {
        if body.len() > MAX_BODY_B64 {
            return Err(SignatureError::TooLarge(body.len()));
        }
        let bytes = B64.decode(body).map_err(SignatureError::Encoding)?;
        let sig_bytes: [u8; 64] = B64
            .decode(signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(SignatureError::SignatureEncoding)?;
        self.0
            .verify(&bytes, &Signature::from_bytes(&sig_bytes))
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(bytes)
    }
}

/// Why a signed body's signature could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("body is {0} bytes of base64, more than the {MAX_BODY_B64} accepted")]
    TooLarge(usize),
    #[error("body is not valid base64: {0}")]
    Encoding(base64::DecodeError),
    #[error("signature is not 64 bytes of base64")]
    SignatureEncoding,
    #[error("signature does not verify: altered, or signed by another key")]
    Mismatch,
}

/// A body whose signature, version and validity window have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEnvelope {
    body: EnvelopeBody,
    digest: String,
}

impl VerifiedEnvelope {
    pub fn body(&self) -> &EnvelopeBody {
        &self.body
    }
    /// Hex SHA-256 of the signed body bytes: names this exact envelope in records.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl SignedEnvelope {
    /// Reads the VO name from the body without trusting it, to choose the verifying key.
    /// Nothing else may be taken from an unverified body.
    pub fn claimed_vo(&self) -> Result<String, EnvelopeError> {
        #[derive(Deserialize)]
        struct Claim {
            owner: ClaimOwner,
        }
        #[derive(Deserialize)]
        struct ClaimOwner {
            vo: String,
        }
        let bytes = self.body_bytes()?;
        let claim: Claim = serde_json::from_slice(&bytes).map_err(EnvelopeError::BodyJson)?;
        Ok(claim.owner.vo)
    }

    /// Hex SHA-256 of the body bytes (the same value as [`VerifiedEnvelope::digest`]).
    pub fn digest(&self) -> Result<String, EnvelopeError> {
        Ok(hex::encode(Sha256::digest(self.body_bytes()?)))
    }

    fn body_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        if self.body.len() > MAX_BODY_B64 {
            return Err(EnvelopeError::BodyTooLarge(self.body.len()));
        }
        B64.decode(&self.body).map_err(EnvelopeError::BodyEncoding)
    }

    /// Checks the signature with `key`, then the format, the validity window and the binding
    /// to the node and pilot in `expect`.
    pub fn verify(
        &self,
        key: &VoVerifyingKey,
        expect: &Expect<'_>,
    ) -> Result<VerifiedEnvelope, EnvelopeError> {
        let bytes = key
            .verify_b64(&self.body, &self.signature)
            .map_err(|e| match e {
                SignatureError::TooLarge(n) => EnvelopeError::BodyTooLarge(n),
                SignatureError::Encoding(e) => EnvelopeError::BodyEncoding(e),
                SignatureError::SignatureEncoding => EnvelopeError::SignatureEncoding,
                SignatureError::Mismatch => EnvelopeError::BadSignature {
                    vo: self.claimed_vo().unwrap_or_default(),
                },
            })?;
        // The version first: an older body lacks fields and would otherwise read as a
        // malformed one rather than as an envelope of an older server.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = serde_json::from_slice(&bytes).map_err(EnvelopeError::BodyJson)?;
        match v.version {
            ENVELOPE_VERSION => {}
            1 => return Err(EnvelopeError::Unbound),
            n => return Err(EnvelopeError::Version(n)),
        }
        let body: EnvelopeBody = serde_json::from_slice(&bytes).map_err(EnvelopeError::BodyJson)?;
        check_window(&body, expect)?;
        if body.node != expect.node {
            return Err(EnvelopeError::WrongNode {
                envelope: body.node.clone(),
                here: expect.node.to_string(),
            });
        }
        if body.pilot_id != expect.pilot_id {
            return Err(EnvelopeError::WrongPilot {
                envelope: body.pilot_id.clone(),
                hello: expect.pilot_id.to_string(),
            });
        }
        check_fields(&body)?;
        Ok(VerifiedEnvelope {
            digest: hex::encode(Sha256::digest(&bytes)),
            body,
        })
    }
}

/// What the verifying helper requires of an envelope beyond its signature.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub now: DateTime<Utc>,
    /// This helper's node name (switch.toml `node_name`).
    pub node: &'a str,
    /// The pilot id of the connection's hello.
    pub pilot_id: &'a str,
    /// The site's longest accepted validity window (`not_after - not_before`).
    pub max_validity: chrono::Duration,
}

/// The window's length against the site's maximum, then `now` inside it.
fn check_window(body: &EnvelopeBody, expect: &Expect<'_>) -> Result<(), EnvelopeError> {
    let secs = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // Whole seconds: the times carry the signer's sub-second clock reading.
    let window = (body.not_after - body.not_before).num_seconds();
    if window > expect.max_validity.num_seconds() {
        return Err(EnvelopeError::WindowTooLong {
            window_seconds: window,
            max_seconds: expect.max_validity.num_seconds(),
            not_before: secs(body.not_before),
            not_after: secs(body.not_after),
        });
    }
    if expect.now < body.not_before {
        return Err(EnvelopeError::NotYetValid(body.not_before));
    }
    if expect.now > body.not_after {
        return Err(EnvelopeError::Expired {
            age_seconds: (expect.now - body.not_before).num_seconds(),
            late_seconds: (expect.now - body.not_after).num_seconds(),
            not_before: secs(body.not_before),
            not_after: secs(body.not_after),
        });
    }
    Ok(())
}

fn check_fields(body: &EnvelopeBody) -> Result<(), EnvelopeError> {
    let field = |field, why: &str| EnvelopeError::Field {
        field,
        why: why.to_string(),
    };
    if !crate::util::is_safe_id(&body.payload_id) {
        return Err(field(
            "payload_id",
            "must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'",
        ));
    }
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(field("argv", "must name an executable"));
    }
    if body.argv.iter().any(|a| a.contains('\0')) {
        return Err(field("argv", "must not contain NUL bytes"));
    }
    if body
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(field(
            "env",
            "names must be non-empty without '=' or NUL; values without NUL",
        ));
    }
    if body.resources.cores == 0 {
        return Err(field("resources.cores", "must be at least 1"));
    }
    if body.resources.memory_bytes < 4 << 20 {
        return Err(field("resources.memory_bytes", "must be at least 4 MiB"));
    }
    if body.resources.walltime_seconds == 0 {
        return Err(field("resources.walltime_seconds", "must be at least 1"));
    }
    if let Some(d) = &body.bundle_sha256 {
        if d.len() != 64
            || !d
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(field("bundle_sha256", "must be 64 lower-case hex digits"));
        }
    }
    for o in &body.outputs {
        if !crate::util::is_relative_clean_path(o) {
            return Err(field(
                "outputs",
                "each output must be a relative path without '..' components",
            ));
        }
    }
    if body.owner.dn.is_empty() || !body.owner.dn.starts_with('/') {
        return Err(field(
            "owner.dn",
            "must be a grid-style DN starting with '/'",
        ));
    }
    if !is_valid_node_name(&body.node) {
        return Err(field(
            "node",
            "must be 1-253 characters without spaces or control characters",
        ));
    }
    if !crate::util::is_safe_id(&body.pilot_id) {
        return Err(field(
            "pilot_id",
            "must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'",
        ));
    }
    if body.nonce.len() < 16 {
        return Err(field("nonce", "must be at least 16 characters"));
    }
    Ok(())
}

/// Hex SHA-256 of some bytes (bundles, argv digests).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    pub(crate) fn sample_body() -> EnvelopeBody {
        let now = Utc::now();
        EnvelopeBody {
            version: ENVELOPE_VERSION,
            payload_id: "p-1".into(),
            owner: Owner {
                dn: "/DC=org/DC=example/CN=Alice".into(),
                vo: "demo".into(),
                fqans: vec!["/demo".into()],
                membership_valid_until: now + Duration::days(30),
            },
            jobtag: Some("ADS".into()),
            argv: vec!["/bin/echo".into(), "hello".into()],
            env: BTreeMap::new(),
            bundle_sha256: None,
            resources: Resources {
                cores: 1,
                memory_bytes: 256 << 20,
                walltime_seconds: 600,
            },
            outputs: vec!["out.txt".into()],
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::minutes(10),
            node: "wn01.example.org".into(),
            pilot_id: "pilot-1".into(),
            nonce: "0123456789abcdef0123".into(),
            issuer: "test".into(),
            credential: None,
        }
    }

    #[test]
    fn sign_then_verify_roundtrips() {
        let key = VoSigningKey::generate();
        let env = key.sign(&sample_body());
        let v = env.verify(&key.verifying_key(), &at(Utc::now())).unwrap();
        assert_eq!(v.body(), &sample_body_eq(v.body()));
        assert_eq!(v.digest(), env.digest().unwrap());
    }

    fn at(now: DateTime<Utc>) -> Expect<'static> {
        Expect {
            now,
            node: "wn01.example.org",
            pilot_id: "pilot-1",
            max_validity: Duration::hours(1),
        }
    }

    fn sample_body_eq(b: &EnvelopeBody) -> EnvelopeBody {
        b.clone()
    }

    #[test]
    fn one_changed_byte_is_refused() {
        let key = VoSigningKey::generate();
        let env = key.sign(&sample_body());
        let mut bytes = B64.decode(&env.body).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let pos = text.find("hello").unwrap();
        bytes[pos] = b'j';
        let forged = SignedEnvelope {
            body: B64.encode(&bytes),
            signature: env.signature.clone(),
        };
        assert!(matches!(
            forged.verify(&key.verifying_key(), &at(Utc::now())),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn other_key_is_refused() {
        let key = VoSigningKey::generate();
        let other = VoSigningKey::generate();
        let env = key.sign(&sample_body());
        assert!(env.verify(&other.verifying_key(), &at(Utc::now())).is_err());
    }

    #[test]
    fn expired_and_early_are_refused() {
        let key = VoSigningKey::generate();
        let env = key.sign(&sample_body());
        let late = Utc::now() + Duration::hours(1);
        assert!(matches!(
            env.verify(&key.verifying_key(), &at(late)),
            Err(EnvelopeError::Expired { .. })
        ));
        let e = env
            .verify(&key.verifying_key(), &at(late))
            .unwrap_err()
            .to_string();
        // Valid from now-1min; an hour later it is 61 min old and 50 min past its end.
        assert!(
            e.contains("stale: it is 3660 s old") || e.contains("stale: it is 3659 s old"),
            "{e}"
        );
        assert!(
            e.contains("expired 3000 s ago") || e.contains("expired 2999 s ago"),
            "{e}"
        );
        let early = Utc::now() - Duration::hours(1);
        assert!(matches!(
            env.verify(&key.verifying_key(), &at(early)),
            Err(EnvelopeError::NotYetValid(_))
        ));
    }

    #[test]
    fn pem_roundtrip() {
        let key = VoSigningKey::generate();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, key.to_pem()).unwrap();
        let back = VoSigningKey::from_pem_file(&p).unwrap();
        let q = dir.path().join("k.pub");
        std::fs::write(&q, back.verifying_key().to_pem()).unwrap();
        let pubk = VoVerifyingKey::from_pem_file(&q).unwrap();
        let env = key.sign(&sample_body());
        env.verify(&pubk, &at(Utc::now())).unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let key = VoSigningKey::generate();
        let mut b = sample_body();
        b.outputs = vec!["../etc/passwd".into()];
        let err = key
            .sign(&b)
            .verify(&key.verifying_key(), &at(Utc::now()))
            .unwrap_err();
        assert!(err.to_string().contains("outputs"), "{err}");
    }

    #[test]
    fn binding_and_window_are_checked_and_named() {
        let key = VoSigningKey::generate();
        let env = key.sign(&sample_body());
        let now = Utc::now();
        let e = env
            .verify(
                &key.verifying_key(),
                &Expect {
                    node: "wn02.example.org",
                    ..at(now)
                },
            )
            .unwrap_err();
        assert!(matches!(e, EnvelopeError::WrongNode { .. }));
        let e = e.to_string();
        assert!(
            e.contains("'wn01.example.org'") && e.contains("'wn02.example.org'"),
            "{e}"
        );
        let e = env
            .verify(
                &key.verifying_key(),
                &Expect {
                    pilot_id: "pilot-2",
                    ..at(now)
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("'pilot-1'") && e.contains("'pilot-2'"), "{e}");
        // The sample's window is 11 minutes.
        let e = env
            .verify(
                &key.verifying_key(),
                &Expect {
                    max_validity: Duration::minutes(5),
                    ..at(now)
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("valid for 660 s") && e.contains("maximum of 300 s"),
            "{e}"
        );
    }

    #[test]
    fn version_1_is_refused_as_unbound() {
        let key = VoSigningKey::generate();
        let mut v = serde_json::to_value(sample_body()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.insert("version".into(), 1.into());
        o.remove("node");
        o.remove("pilot_id");
        let (body, signature) = key.sign_json(&v);
        let e = SignedEnvelope { body, signature }
            .verify(&key.verifying_key(), &at(Utc::now()))
            .unwrap_err();
        assert!(matches!(e, EnvelopeError::Unbound), "{e}");
        assert!(e.to_string().contains("VO server must be upgraded"), "{e}");
    }
}
