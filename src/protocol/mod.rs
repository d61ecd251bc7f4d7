//! Wire types shared by the pilot, the helper and the server, and the payload envelope.
//!
//! Nothing here does I/O beyond framing bytes on a stream it is given: the helper uses this
//! module, so it must never pull in HTTP or TLS code.

pub mod api;
pub mod command;
pub mod delegation;
pub mod envelope;
pub mod switch_wire;

pub use envelope::{
    EnvelopeBody, EnvelopeError, Owner, Resources, SignedEnvelope, VerifiedEnvelope, VoSigningKey,
    VoVerifyingKey,
};
