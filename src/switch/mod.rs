//! The site's identity-switching helper (`mupilot-switch`), running as root.
//!
//! Must not use HTTP, TLS or server code: nothing here may reach `crate::tls`,
//! `crate::server` or `crate::pilot`.

pub mod sandbox;

pub mod cli;
pub mod leases;
