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
//! (check-config's site checks), [`audit_query`] and [`admin_client`] (`mupilot-switch audit`,
//! and the root client `audit kill` uses to reach the running helper).

// The modules with `allow(unsafe_code)` make system calls without a safe binding, each block
// with its SAFETY comment; every other module here is under the crate's `deny(unsafe_code)`.
pub(crate) mod accounts;
#[allow(unsafe_code)] // the socket systemd passes, taken by its number (sd_listen_fds)
pub(crate) mod activation;
pub mod admin_client;
pub(crate) mod admission;
pub mod audit;
pub mod audit_query;
pub mod authorize;
pub(crate) mod check;
#[cfg(feature = "grid")]
pub(crate) mod check_proxy;
pub mod cli;
pub(crate) mod command;
// Public until the launch path reads its `[grid]` table (issue 17), which is dead code until then.
pub mod config;
pub(crate) mod connection;
#[allow(unsafe_code)] // the shutdown signal handler and its self-pipe
pub(crate) mod daemon;
pub(crate) mod glexec;
pub(crate) mod gridmap;
#[allow(unsafe_code)] // F_GET_SEALS on the bundle's memfd
pub(crate) mod launch;
#[allow(unsafe_code)] // fnmatch(3), as LCMAPS matches the groupmapfile's patterns
pub mod leases;
pub(crate) mod metrics;
#[allow(unsafe_code)] // SO_PEERPIDFD, pidfd_open, clock_gettime, sysconf
pub(crate) mod peer;
pub(crate) mod proxy;
pub(crate) mod registry;
pub(crate) mod replay;
mod report;
#[allow(unsafe_code)] // namespaces, clone, identity switch, seccomp: the privileged path
pub mod sandbox;
#[allow(unsafe_code)] // openlog(3), syslog(3)
pub(crate) mod syslog;
