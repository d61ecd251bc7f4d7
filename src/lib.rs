//! mupilot: a multi-user pilot job system for grid and HPC worker nodes.
//!
//! One library, four thin binaries:
//! - `mupilot` (the pilot agent, [`pilot`]) runs as the VO's pilot account inside a batch slot;
//! - `mupilot-switch` (the site's identity-switching helper, [`switch`]) runs as root;
//! - `mupilot-server` (the reference VO server, [`server`]) runs as a VO service account;
//! - `mupilot-glexec` ([`glexec`]), a gLExec-compatible client of the helper for frameworks
//!   that call `glexec`; runs as the pilot account, no setuid bit.
//!
//! Shared pieces: [`protocol`] (wire types and envelope signing), [`records`] (the hash-chained
//! JSON-lines log behind both the pilot's trace and the helper's audit), [`policy`] (the
//! fine-grained authorization language), [`cgroups`] (cgroup v1 and v2: the helper's payload
//! cgroups and the limits the pilot's slot discovery reads). [`tls`] is used by the pilot and
//! the server only: the helper never reaches it, so the `mupilot-switch` binary links no TLS or
//! HTTP code. [`grid`] (feature `grid`, on by default) verifies X.509 proxies and VOMS
//! attributes with OpenSSL's certificate code for the helper; the static pilot is built without it.

pub mod cgroups;
pub mod glexec;
#[cfg(feature = "grid")]
pub mod grid;
pub mod pilot;
pub mod policy;
pub mod protocol;
pub mod records;
pub mod server;
pub mod switch;
pub mod tls;
pub mod util;
