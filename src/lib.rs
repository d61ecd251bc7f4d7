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

// No unsafe code but where a system call has no safe binding: `deny` here, an `allow` on each
// module or function that needs it (saying why), `forbid` on the modules that need none, so
// neither a new unsafe block nor a new allow can slip into them (docs/architecture.md).
#![deny(unsafe_code)]

// One feature per program (Cargo.toml): a module only one program uses is compiled only with
// that program's feature, so the helper built alone has no `pilot`, `server` or `tls` module to
// reach, and no HTTP, TLS or SQL crate to link (docs/architecture.md).
// cgroups: kill(2) of the pids a cgroup lists (`cgroups::Cgroup::kill_all`).
#[cfg(any(feature = "pilot", feature = "switch"))]
pub mod cgroups;
// glexec: signal dispositions around the command's run and the caller's stdio descriptors.
#[cfg(feature = "glexec")]
#[allow(unsafe_code)]
pub mod glexec;
#[cfg(feature = "grid")]
#[forbid(unsafe_code)]
pub mod grid;
#[cfg(feature = "pilot")]
#[forbid(unsafe_code)]
pub mod pilot;
#[cfg(feature = "switch")]
#[forbid(unsafe_code)]
pub mod policy;
// protocol: descriptors received with SCM_RIGHTS and the sealed memfd (`switch_wire`).
pub mod protocol;
// records: syslog(3) for the chain anchor (`anchor`).
pub mod records;
#[cfg(feature = "server")]
#[forbid(unsafe_code)]
pub mod server;
// switch: the root helper's system calls; the modules that make them say so (switch/mod.rs).
#[cfg(feature = "switch")]
pub mod switch;
#[cfg(feature = "tls")]
#[forbid(unsafe_code)]
pub mod tls;
// util: signal(2) to restore SIGPIPE's default.
pub mod util;
