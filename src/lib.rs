//! mupilot: a multi-user pilot job system for grid and HPC worker nodes.
//!
//! One library, three thin binaries:
//! - `mupilot` (the pilot agent, [`pilot`]) runs as the VO's pilot account inside a batch slot;
//! - `mupilot-switch` (the site's identity-switching helper, [`switch`]) runs as root;
//! - `mupilot-server` (the reference VO server, [`server`]) runs as a VO service account.
//!
//! Shared pieces: [`protocol`] (wire types and envelope signing), [`records`] (the hash-chained
//! JSON-lines log behind both the pilot's trace and the helper's audit), [`policy`] (the
//! fine-grained authorization language), [`cgroups`] (cgroup v1 and v2: the helper's payload
//! cgroups and the limits the pilot's slot discovery reads). [`tls`] is used by the pilot and
//! the server only: the helper never reaches it, so the `mupilot-switch` binary links no TLS or
//! HTTP code. [`grid`] (feature `grid`, on by default) verifies X.509 proxies and VOMS
//! attributes with OpenSSL's certificate code for the helper; the static pilot is built without it.

// One feature per program (Cargo.toml): a module only one program uses is compiled only with
// that program's feature, so the helper built alone has no `pilot`, `server` or `tls` module to
// reach, and no HTTP, TLS or SQL crate to link (docs/architecture.md).
#[cfg(any(feature = "pilot", feature = "switch"))]
pub mod cgroups;
#[cfg(feature = "grid")]
pub mod grid;
#[cfg(feature = "pilot")]
pub mod pilot;
#[cfg(feature = "switch")]
pub mod policy;
pub mod protocol;
pub mod records;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "switch")]
pub mod switch;
#[cfg(feature = "tls")]
pub mod tls;
pub mod util;
