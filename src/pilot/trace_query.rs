//! `mupilot trace ...`: the VO operator's view of this pilot's trace log (list, show one
//! payload, verify the chain, export records as a JSON array for incident response).
//!
//! Thin on purpose: the queries live in `crate::records` (shared with the helper's audit).
//! What it adds is finding the log when no pilot.toml is given: `$MUPILOT_WORK/trace.jsonl`,
//! else the default work directories of the calling account (`$TMPDIR/mupilot-<pilot_id>`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::records::cli::{self, with_stdio, Out};
pub use crate::records::cli::{ListArgs, ShowArgs, TraceCommand, VerifyArgs};

/// Names the pilot's work directory: pilot.toml's `work_dir` default, and where the trace
/// commands look first without `--config`.
pub const WORK_ENV: &str = "MUPILOT_WORK";

/// `$MUPILOT_WORK`, when set and not empty.
pub fn work_env() -> Option<PathBuf> {
    std::env::var_os(WORK_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The trace logs of this account's pilots that ran with the default work directory:
/// `$TMPDIR/mupilot-*/trace.jsonl` in directories owned by the caller, sorted.
pub fn default_logs() -> Vec<PathBuf> {
    let tmp = std::env::temp_dir();
    let uid = nix::unistd::geteuid().as_raw();
    let Ok(rd) = std::fs::read_dir(&tmp) else {
        return Vec::new();
    };
    let mut logs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("mupilot-"))
        .filter(|e| std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid))
        .map(|e| e.path().join("trace.jsonl"))
        .filter(|l| l.is_file())
        .collect();
    logs.sort();
    logs
}

/// Whether the command names its log itself (`--log FILE`).
fn names_its_log(cmd: &TraceCommand) -> bool {
    match cmd {
        TraceCommand::List(a) | TraceCommand::Export(a) => a.log.log.is_some(),
        TraceCommand::Show(a) => a.log.log.is_some(),
        TraceCommand::Verify(a) => a.log.log.is_some(),
    }
}

/// Runs `mupilot trace <cmd>` without a pilot.toml: the log is `--log`, else
/// `$MUPILOT_WORK/trace.jsonl`, else the one default log of this account; `show ID` searches
/// every default log for the payload. Several logs for another command is a usage error
/// naming them.
pub fn run_found(cmd: &TraceCommand) -> i32 {
    if names_its_log(cmd) {
        return run(cmd, Path::new("trace.jsonl"));
    }
    if let Some(work) = work_env() {
        return run(cmd, &work.join("trace.jsonl"));
    }
    let logs = default_logs();
    let fix = format!(
        "pass --config pilot.toml, set {WORK_ENV} to the pilot's work_dir, or give --log FILE"
    );
    let tmp = std::env::temp_dir();
    match (logs.as_slice(), cmd) {
        ([], _) => {
            eprintln!(
                "mupilot: no trace log of this account in {}/mupilot-*/ (the default work_dir); {fix}",
                tmp.display()
            );
            2
        }
        ([one], _) => run(cmd, one),
        (many, TraceCommand::Show(a)) => {
            let holding: Vec<&PathBuf> = many
                .iter()
                .filter(|l| {
                    let mut sink = std::io::sink();
                    let mut sink2 = std::io::sink();
                    cli::show_main(
                        a,
                        l,
                        &mut Out {
                            out: &mut sink,
                            err: &mut sink2,
                        },
                    ) == 0
                })
                .collect();
            if holding.is_empty() {
                println!("no records of payload {} in {}", a.id, join(many));
                return 1;
            }
            for l in &holding {
                if holding.len() > 1 {
                    println!("== {}", l.display());
                }
                show_main(a, l);
            }
            0
        }
        (many, _) => {
            eprintln!(
                "mupilot: several pilots' trace logs in {}: {}; {fix}",
                tmp.display(),
                join(many)
            );
            2
        }
    }
}

fn join(logs: &[PathBuf]) -> String {
    logs.iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

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
