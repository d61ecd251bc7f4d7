//! `mupilot trace ...`: the VO operator's view of this pilot's trace log (list, show one
//! payload, verify the chain, export records as a JSON array for incident response).
//!
//! The queries live in `crate::records` (shared with the helper's audit), and so do the `list`,
//! `export` and `verify` commands; `show` and the `trace` command set are the pilot's own.
//! What it adds is finding the log when no pilot.toml is given: `$MUPILOT_WORK/trace.jsonl`,
//! else the default work directories of the calling account (`$TMPDIR/mupilot-<pilot_id>`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::records::cli::{self, fail, select, with_stdio, LogArg, Out};
pub use crate::records::cli::{ListArgs, VerifyArgs};

/// `mupilot trace show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// Payload id
    pub id: String,
    #[command(flatten)]
    pub log: LogArg,
}

/// `mupilot trace <command>`.
#[derive(Debug, Clone, Subcommand)]
pub enum TraceCommand {
    /// List trace records by owner, time and payload
    List(ListArgs),
    /// Every record of one payload
    Show(ShowArgs),
    /// Verify the trace log's hash chain
    Verify(VerifyArgs),
    /// Print matching records as one JSON array (for the VO's incident response)
    Export(ListArgs),
}

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
                    show_main(
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
                with_stdio(|io| show_main(a, l, io));
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
    with_stdio(|io| trace_main(cmd, trace_log, io))
}

/// Runs one `trace` command. `default_log` is the pilot's trace log.
pub fn trace_main(cmd: &TraceCommand, default_log: &Path, io: &mut Out) -> i32 {
    match cmd {
        TraceCommand::List(a) => cli::list_main(a, default_log, io),
        TraceCommand::Show(a) => show_main(a, default_log, io),
        TraceCommand::Verify(a) => cli::verify_main(a, default_log, io),
        TraceCommand::Export(a) => cli::export_main(a, default_log, io),
    }
}

/// `trace show ID`: every record of one payload, as indented JSON.
pub fn show_main(args: &ShowArgs, default_log: &Path, io: &mut Out) -> i32 {
    let list = ListArgs {
        owner: None,
        since: None,
        until: None,
        payload: Some(args.id.clone()),
        json: true,
        log: args.log.clone(),
    };
    let lines = match select(&list, default_log) {
        Ok(l) => l,
        Err(e) => return fail(io, e),
    };
    if lines.is_empty() {
        let _ = writeln!(io.out, "no records of payload {}", args.id);
        return 1;
    }
    for l in &lines {
        let pretty = serde_json::from_str::<serde_json::Value>(l)
            .map(|v| serde_json::to_string_pretty(&v).expect("serialises"))
            .unwrap_or_else(|_| l.clone());
        let _ = writeln!(io.out, "{pretty}");
    }
    0
}
