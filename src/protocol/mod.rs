//! Wire types shared by the pilot, the helper and the server, and the payload envelope.
//!
//! Nothing here does I/O beyond framing bytes on a stream it is given: the helper uses this
//! module, so it must never pull in HTTP or TLS code.

#[forbid(unsafe_code)]
pub mod api;
#[forbid(unsafe_code)]
pub mod command;
#[forbid(unsafe_code)]
pub mod delegation;
#[forbid(unsafe_code)]
pub mod envelope;
// switch_wire: SCM_RIGHTS descriptors and the sealed memfd need raw system calls.
pub mod switch_wire;

pub use envelope::{
    EnvelopeBody, EnvelopeError, Owner, Resources, SignedEnvelope, VerifiedEnvelope, VoSigningKey,
    VoVerifyingKey,
};
