//! `mupilot-switch audit ...`: the site admin's incident-response commands over the helper's
//! audit log (who held uid X at time T, what did DN Y run, is the log intact, stop DN Y here).
//!
//! Thin on purpose: the queries live in `crate::records` (shared with the pilot's trace), this
//! file only binds them to the process's stdout/stderr and the helper's configured paths.

use std::path::Path;

use crate::records::cli::{self, with_stdio};
pub use crate::records::cli::{AuditCommand, KillArgs, ListArgs, VerifyArgs, WhoArgs};

/// The audit log when switch.toml does not say otherwise.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/mupilot/audit.jsonl";
/// The helper's socket when switch.toml does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mupilot/switch.sock";

/// Runs `mupilot-switch audit <cmd>`; `audit_log` and `socket` come from switch.toml.
pub fn run(cmd: &AuditCommand, audit_log: &Path, socket: &Path) -> i32 {
    with_stdio(|io| cli::audit_main(cmd, audit_log, socket, io))
}

/// `audit who (--uid UID | --account NAME) --at TIME [--json] [--log FILE]`.
pub fn who_main(args: &WhoArgs, audit_log: &Path) -> i32 {
    with_stdio(|io| cli::who_main(args, audit_log, io))
}

/// `audit list [--owner DN] [--since T] [--until T] [--payload ID] [--json] [--log FILE]`.
pub fn list_main(args: &ListArgs, audit_log: &Path) -> i32 {
    with_stdio(|io| cli::list_main(args, audit_log, io))
}

/// `audit verify [--anchor SEQ:HASH]... [--json] [--log FILE]`.
pub fn verify_main(args: &VerifyArgs, audit_log: &Path) -> i32 {
    with_stdio(|io| cli::verify_main(args, audit_log, io))
}

/// `audit kill --owner DN [--ban] [--socket PATH]` (root; needs the running helper).
pub fn kill_main(args: &KillArgs, socket: &Path) -> i32 {
    with_stdio(|io| cli::kill_main(args, socket, io))
}
