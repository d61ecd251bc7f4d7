//! The record commands every program's log has: `list`, `export` and `verify` behind
//! `mupilot-switch audit ...` (site), `mupilot trace ...` (VO) and `mupilot-server requests
//! ...`: argument types (clap) and functions that run one command, write to the given streams
//! and return the exit code. The commands of one program only live with it (`audit who` and
//! `audit kill` in `switch::audit_query`, `trace show` in `pilot::trace_query`).
//!
//! Exit codes mean one thing each: 0 the answer is "yes/found/intact" (or a listing), 1 the
//! answer is "nobody" or "not intact", 2 the command could not run (bad argument, unreadable
//! log, helper unreachable). No printing to the process's stdout from here: callers pass it.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use clap::Args;

use super::query::{self, Filter};
use super::{parse_user_time, rotate, verify_files, Anchor, ChainReport};

/// Where the log is: `--log FILE` (the current file; rotated files beside it are read too).
#[derive(Debug, Clone, Args)]
pub struct LogArg {
    /// Log file to read (its rotated files `FILE.<timestamp>` are read too, oldest first)
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// `audit list` / `trace list` / `trace export` (and `trace show`): records matching filters.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only records of payloads owned by this DN (e.g. "/DC=org/DC=example/CN=alice")
    #[arg(long, value_name = "DN")]
    pub owner: Option<String>,
    /// Only records at or after this time (as --at of who, e.g. "now")
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records at or before this time (as --at of who)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only records of this payload id
    #[arg(long, value_name = "ID")]
    pub payload: Option<String>,
    /// Print the records as JSON lines, exactly as stored
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: LogArg,
}

/// `verify`: check the hash chain across rotated files, optionally against syslog anchors.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// A chain head copied from syslog, "SEQ:HASH" (repeatable); detects a truncated tail
    #[arg(long, value_name = "SEQ:HASH")]
    pub anchor: Vec<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: LogArg,
}

/// Runs `f` with the process's stdout and stderr as its output streams.
pub fn with_stdio(f: impl FnOnce(&mut Out) -> i32) -> i32 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let (mut o, mut e) = (stdout.lock(), stderr.lock());
    f(&mut Out {
        out: &mut o,
        err: &mut e,
    })
}

/// Output streams of a command.
pub struct Out<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

/// The chain files of the chosen log, oldest first; an error names the file and the fix.
pub(crate) fn files(arg: &LogArg, default_log: &Path) -> Result<Vec<PathBuf>, String> {
    let log = arg.log.as_deref().unwrap_or(default_log);
    let files = rotate::chain_files(log).map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Err(format!(
            "no log at {} (nor rotated files of it): pass --log FILE, or check the log path in the configuration",
            log.display()
        ));
    }
    Ok(files)
}

pub(crate) fn fail(io: &mut Out, msg: impl std::fmt::Display) -> i32 {
    let _ = writeln!(io.err, "error: {msg}");
    2
}

/// A time given on the command line: what [`parse_user_time`] reads, or `now` (to the
/// microsecond, the records' precision).
pub(crate) fn user_time(s: &str) -> Result<DateTime<Utc>, String> {
    if s.trim().eq_ignore_ascii_case("now") {
        let now = Utc::now();
        return Ok(DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now));
    }
    parse_user_time(s)
}

fn opt_time(s: &Option<String>, flag: &str) -> Result<Option<DateTime<Utc>>, String> {
    s.as_deref()
        .map(|t| user_time(t).map_err(|e| format!("{flag}: {e}")))
        .transpose()
}

fn filter_of(args: &ListArgs) -> Result<Filter, String> {
    Ok(Filter {
        owner_dn: args.owner.clone(),
        payload_id: args.payload.clone(),
        since: opt_time(&args.since, "--since")?,
        until: opt_time(&args.until, "--until")?,
    })
}

pub(crate) fn select(args: &ListArgs, default_log: &Path) -> Result<Vec<String>, String> {
    let filter = filter_of(args)?;
    let files = files(&args.log, default_log)?;
    query::list_lines(&files, &filter).map_err(|e| e.to_string())
}

/// `audit list` and `trace list`.
pub fn list_main(args: &ListArgs, default_log: &Path, io: &mut Out) -> i32 {
    let lines = match select(args, default_log) {
        Ok(l) => l,
        Err(e) => return fail(io, e),
    };
    for l in &lines {
        let _ = if args.json {
            writeln!(io.out, "{l}")
        } else {
            writeln!(io.out, "{}", summary_line(l))
        };
    }
    if lines.is_empty() && !args.json {
        let _ = writeln!(io.out, "no records match");
    }
    0
}

/// Fields shown after the fixed columns of a listing, when a record has them.
const DETAIL_KEYS: &[&str] = &[
    "decision",
    "denial_class",
    "reason",
    "exit_code",
    "signal",
    "cpu_seconds",
    "peak_memory_bytes",
    "wall_seconds",
    "kill_reason",
    "jobtag",
    "bundle_sha256",
    "argv_sha256",
    "upload",
    "anchor_seq",
];

/// One listing line: time, event, payload, owner, account(uid), host, then key=value details.
pub fn summary_line(raw: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(raw) else {
        return raw.to_string();
    };
    let s = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    let mut line = format!(
        "{} {:<6} {} {} {}({}) {}",
        s("time"),
        s("event"),
        s("payload_id"),
        s("owner_dn"),
        s("account"),
        s("uid"),
        s("host"),
    );
    for k in DETAIL_KEYS {
        match v.get(*k) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(x)) if !x.contains(' ') && !x.is_empty() => {
                line.push_str(&format!(" {k}={x}"))
            }
            Some(x) => line.push_str(&format!(" {k}={x}")),
        }
    }
    line
}

/// `trace export`: the matching records as one JSON array, each record exactly as stored.
pub fn export_main(args: &ListArgs, default_log: &Path, io: &mut Out) -> i32 {
    let lines = match select(args, default_log) {
        Ok(l) => l,
        Err(e) => return fail(io, e),
    };
    let _ = if lines.is_empty() {
        writeln!(io.out, "[]")
    } else {
        writeln!(io.out, "[\n{}\n]", lines.join(",\n"))
    };
    0
}

/// `verify`: the chain across rotated files, and each `--anchor`.
pub fn verify_main(args: &VerifyArgs, default_log: &Path, io: &mut Out) -> i32 {
    let mut anchors = Vec::new();
    for a in &args.anchor {
        match a.parse::<Anchor>() {
            Ok(a) => anchors.push(a),
            Err(e) => return fail(io, format!("--anchor: {e}")),
        }
    }
    let files = match files(&args.log, default_log) {
        Ok(f) => f,
        Err(e) => return fail(io, e),
    };
    let report = match verify_files(&files, &anchors, false) {
        Ok(r) => r,
        Err(e) => return fail(io, e),
    };
    let _ = if args.json {
        writeln!(
            io.out,
            "{}",
            serde_json::to_string_pretty(&report).expect("serialises")
        )
    } else {
        write_verify(io.out, &report)
    };
    if report.intact() {
        0
    } else {
        1
    }
}

fn write_verify(w: &mut dyn Write, r: &ChainReport) -> std::io::Result<()> {
    for f in &r.files {
        let first = f.last_seq + 1 - f.records;
        match &f.first_break {
            None => writeln!(
                w,
                "{}: {} records ({}-{}) intact",
                f.path.display(),
                f.records,
                first,
                f.last_seq
            )?,
            Some(b) => writeln!(
                w,
                "{}: BROKEN at line {}: {}",
                f.path.display(),
                b.line,
                b.reason
            )?,
        }
        if let Some(t) = f.torn_tail {
            writeln!(
                w,
                "{}: the last line ({t}) is torn: a write cut short by a crash or a full disk, never a complete record; the writer removes it before it writes again",
                f.path.display()
            )?;
        }
    }
    if r.starts_after_retention {
        writeln!(
            w,
            "note: the chain starts at record {}: a retention record shows the older files were deleted by retention",
            r.first_seq
        )?;
    }
    for a in &r.anchors {
        let tag = if a.ok { "ok" } else { "FAILED" };
        writeln!(w, "anchor {}: {tag}: {}", a.anchor.seq, a.detail)?;
    }
    if r.intact() {
        writeln!(
            w,
            "chain intact: {} records, head {}:{}",
            r.records, r.last_seq, r.head
        )
    } else {
        writeln!(w, "chain NOT intact")
    }
}
