//! Portal controls (the VO portal policy): who is calling (users, robots known by the IGTF
//! robot policy OID or by `[[robot]]`, portals acting for the members they name), how fast
//! each may submit, and the request log that ties every request to an Internet address, TCP
//! port and identity, with the `requests` command that queries and verifies it.
//!
//! Rooms: `config` (server.toml sections), `action` (what a request asks for), `identity`
//! (classifying certificates and callers), `ratelimit` (token buckets), `requestlog` (the
//! hash-chained log), `gate` (the middleware that ties them together), `query` (the
//! `requests` command). Must not touch the SQL store: membership and ownership stay with the
//! handlers, and the request log is a file of its own.
//!
//! Stored user credentials: the server stores none (no proxy, token, key or password of a
//! member is received or kept); the policy's limit (nothing usable past 1,000,000 s) is for
//! the credential delegation of issue 17 to keep, see docs/vo-operator.md.

pub mod action;
pub mod config;
pub mod gate;
pub mod identity;
pub mod query;
pub mod ratelimit;
pub mod requestlog;
