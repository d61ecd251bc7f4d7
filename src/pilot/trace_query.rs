//! `mupilot trace ...`: the VO operator's view of this pilot's trace log (list, show one
//! payload, verify the chain, export records as a JSON array for incident response).
//!
//! Thin on purpose: the queries live in `crate::records` (shared with the helper's audit).

use std::path::Path;

use crate::records::cli::{self, with_stdio};
pub use crate::records::cli::{ListArgs, ShowArgs, TraceCommand, VerifyArgs};

/// Runs `mupilot trace <cmd>`; `trace_log` is pilot.toml's trace log (work_dir/trace.jsonl).
pub fn run(cmd: &TraceCommand, trace_log: &Path) -> i32 {
    with_stdio(|io| cli::trace_main(cmd, trace_log, io))
}

/// `trace list [--owner DN] [--since T] [--until T] [--payload ID] [--json] [--log FILE]`.
pub fn list_main(args: &ListArgs, trace_log: &Path) -> i32 {
    with_stdio(|io| cli::list_main(args, trace_log, io))
}

/// `trace show ID [--log FILE]`.
pub fn show_main(args: &ShowArgs, trace_log: &Path) -> i32 {
    with_stdio(|io| cli::show_main(args, trace_log, io))
}

/// `trace verify [--anchor SEQ:HASH]... [--json] [--log FILE]`.
pub fn verify_main(args: &VerifyArgs, trace_log: &Path) -> i32 {
    with_stdio(|io| cli::verify_main(args, trace_log, io))
}

/// `trace export [--owner DN] [--since T] [--until T] [--payload ID] [--log FILE]`: a JSON array.
pub fn export_main(args: &ListArgs, trace_log: &Path) -> i32 {
    with_stdio(|io| cli::export_main(args, trace_log, io))
}
