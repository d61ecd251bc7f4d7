//! The reference VO server (`mupilot-server`): submission API, membership registry (P3),
//! matchmaking, envelope signing, status and operator commands, stored in SQLite or PostgreSQL.
//!
//! Layout: [`config`] (server.toml), [`store`] (SQLite or PostgreSQL, and payload files), [`api`] (axum
//! routes), [`membership`] (the registry of reference 002: registration, requests, audit),
//! [`listener`] (TLS accept loop, peer DN per connection), [`portal`] (portals,
//! robots, rate limits, the request log), [`metrics`] (Prometheus endpoint), [`init`]/[`pki`] (demo VO),
//! [`client`] (submit/status/output/cancel, delegate), [`cli`] (the command line), `delegation`
//! (feature `grid`: delegated X.509 proxies, and proxies signed for worker nodes).

pub(crate) mod api;
pub mod cli;
pub(crate) mod client;
pub mod config;
#[cfg(feature = "grid")]
pub(crate) mod delegation;
pub(crate) mod init;
pub(crate) mod listener;
pub mod membership;
pub(crate) mod metrics;
pub(crate) mod pki;
pub(crate) mod portal;
pub mod store;
