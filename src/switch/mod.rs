//! The site's identity-switching helper (`mupilot-switch`), running as root.
//!
//! Must not use HTTP, TLS or server code: nothing here may reach `crate::tls`,
//! `crate::server` or `crate::pilot`.
//!
//! Rooms: [`config`] (switch.toml), [`activation`] (the listening socket), [`daemon`] (shared
//! state, accept loop, shutdown), [`connection`] (one pilot), `report` (a payload's start and end, told), [`launch`] (the checks in
//! order), [`authorize`] (the local decision), [`gridmap`] (the mapping file), [`accounts`]
//! (account lookup and refusals), [`leases`] (pool accounts), [`glexec`] (the gLExec-compatible entry), [`replay`] (seen nonces), [`proxy`] (the payload's delegated proxy), [`registry`] (running payloads and
//! slots), [`audit`] and [`syslog`] (records), [`metrics`] (node_exporter textfile), [`sandbox`] (the payload's isolation), [`check`]
//! (check-config's site checks).

pub mod accounts;
pub mod activation;
pub mod admission;
pub mod audit;
pub mod audit_query;
pub mod authorize;
pub mod check;
#[cfg(feature = "grid")]
pub mod check_proxy;
pub mod cli;
pub mod command;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod glexec;
pub mod gridmap;
pub mod launch;
pub mod leases;
pub mod metrics;
pub mod peer;
pub mod proxy;
pub mod registry;
pub mod replay;
mod report;
pub mod sandbox;
pub mod syslog;
