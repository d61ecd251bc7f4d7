//! The pilot agent (`mupilot`), running as the VO's pilot account inside a batch slot.
//!
//! It discovers the slot, fetches payloads from the VO server over mutual TLS, has the site's
//! helper run each one under its owner's account, reports and records. It never runs a
//! payload itself (P6), and links nothing the helper needs.
//!
//! - [`config`]: pilot.toml; [`cli`]: the command line and exit codes;
//! - [`client`]: the VO server API; [`helper_client`]: the helper socket;
//! - [`agent`]: the loop; [`fit`]: slot partitioning; [`reporter`]: per-payload reporting;
//! - [`outbox`]: what is owed to the server, on disk; [`output`]: the output archive;
//! - [`trace`]: the trace log; [`signals`]: signal handling;
//! - [`slot`]: batch slot discovery.

pub(crate) mod agent;
pub mod cli;
pub mod client;
pub(crate) mod config;
pub(crate) mod fit;
pub mod helper_client;
pub(crate) mod outbox;
pub(crate) mod output;
pub(crate) mod reporter;
pub(crate) mod signals;
pub mod slot;
pub mod trace;
pub mod trace_query;
