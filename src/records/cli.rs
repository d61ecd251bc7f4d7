//! The record commands behind `mupilot-switch audit ...` (site) and `mupilot trace ...` (VO):
//! argument types (clap) and functions that run one command, write to the given streams and
//! return the exit code.
//!
//! Exit codes mean one thing each: 0 the answer is "yes/found/intact" (or a listing), 1 the
//! answer is "nobody" or "not intact", 2 the command could not run (bad argument, unreadable
//! log, helper unreachable). No printing to the process's stdout from here: callers pass it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::query::{self, Filter, Holding, Subject};
use super::{parse_user_time, rotate, verify_files, Anchor, ChainReport};

/// Where the log is: `--log FILE` (the current file; rotated files beside it are read too).
#[derive(Debug, Clone, Args)]
pub struct LogArg {
    /// Log file to read (its rotated files `FILE.<timestamp>` are read too, oldest first)
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// `audit who`: who held an account at a time.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["uid", "account"])))]
pub struct WhoArgs {
    /// Numeric uid of the account
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Account name
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// The moment: RFC 3339, "YYYY-MM-DD HH:MM[:SS[.ffffff]]" in UTC, or "now"
    #[arg(long, value_name = "TIME")]
    pub at: String,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: LogArg,
}

/// `audit list` / `trace list` / `trace export`: records matching filters.
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

/// `audit kill`: ask the running helper to kill an owner's payloads on this node.
#[derive(Debug, Clone, Args)]
pub struct KillArgs {
    /// Owner DN whose payloads to kill
    #[arg(long, value_name = "DN")]
    pub owner: String,
    /// Also refuse this DN from now on (until the helper restarts or the ban is lifted)
    #[arg(long)]
    pub ban: bool,
    /// The helper's socket
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `mupilot-switch audit <command>`.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Who held an account (by uid or name) at a given time
    Who(WhoArgs),
    /// List audit records by owner, time and payload
    List(ListArgs),
    /// Verify the audit log's hash chain (rotated files included), optionally against anchors
    Verify(VerifyArgs),
    /// Kill every running payload of an owner on this node (asks the running helper; root)
    Kill(KillArgs),
}

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

/// Runs one `audit` command. `default_log` is switch.toml's `audit_log`, `default_socket`
/// its `socket`.
pub fn audit_main(
    cmd: &AuditCommand,
    default_log: &Path,
    default_socket: &Path,
    io: &mut Out,
) -> i32 {
    match cmd {
        AuditCommand::Who(a) => who_main(a, default_log, io),
        AuditCommand::List(a) => list_main(a, default_log, io),
        AuditCommand::Verify(a) => verify_main(a, default_log, io),
        AuditCommand::Kill(a) => kill_main(a, default_socket, io),
    }
}

/// Runs one `trace` command. `default_log` is the pilot's trace log.
pub fn trace_main(cmd: &TraceCommand, default_log: &Path, io: &mut Out) -> i32 {
    match cmd {
        TraceCommand::List(a) => list_main(a, default_log, io),
        TraceCommand::Show(a) => show_main(a, default_log, io),
        TraceCommand::Verify(a) => verify_main(a, default_log, io),
        TraceCommand::Export(a) => export_main(a, default_log, io),
    }
}

/// The chain files of the chosen log, oldest first; an error names the file and the fix.
fn files(arg: &LogArg, default_log: &Path) -> Result<Vec<PathBuf>, String> {
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

fn fail(io: &mut Out, msg: impl std::fmt::Display) -> i32 {
    let _ = writeln!(io.err, "error: {msg}");
    2
}

/// A time given on the command line: what [`parse_user_time`] reads, or `now` (to the
/// microsecond, the records' precision).
fn user_time(s: &str) -> Result<DateTime<Utc>, String> {
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

/// A queried moment as given: fractional seconds kept, none printed when there are none.
fn secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// `audit who`.
pub fn who_main(args: &WhoArgs, default_log: &Path, io: &mut Out) -> i32 {
    let at = match user_time(&args.at) {
        Ok(t) => t,
        Err(e) => return fail(io, format!("--at: {e}")),
    };
    let (subject, label) = match (&args.uid, &args.account) {
        (Some(u), _) => (Subject::Uid(*u), format!("uid {u}")),
        (None, Some(a)) => (Subject::Account(a.clone()), format!("account {a}")),
        (None, None) => return fail(io, "give --uid UID or --account NAME"),
    };
    let files = match files(&args.log, default_log) {
        Ok(f) => f,
        Err(e) => return fail(io, e),
    };
    let held = match query::who(&files, &subject, at) {
        Ok(h) => h,
        Err(e) => return fail(io, e),
    };
    let w = &mut io.out;
    // A closed stdout (e.g. `| head`) is not an error worth reporting; the exit code stands.
    let _ = if args.json {
        let v = serde_json::json!({"query": label, "at": secs(at), "holders": held});
        writeln!(
            w,
            "{}",
            serde_json::to_string_pretty(&v).expect("serialises")
        )
    } else if held.is_empty() {
        writeln!(w, "nobody held {label} at {}", secs(at))
    } else {
        write_holders(w, &label, at, &held)
    };
    if held.is_empty() {
        1
    } else {
        0
    }
}

fn dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

fn write_holders(
    w: &mut dyn Write,
    label: &str,
    at: DateTime<Utc>,
    held: &[Holding],
) -> std::io::Result<()> {
    writeln!(w, "{label} at {} was held by:", secs(at))?;
    for h in held {
        let fq = if h.fqans.is_empty() {
            String::new()
        } else {
            format!(", fqans {}", h.fqans.join(" "))
        };
        writeln!(
            w,
            "  owner    {} (vo {}{fq})",
            dash(&h.owner_dn),
            dash(&h.vo)
        )?;
        let uid = h.uid.map_or("-".to_string(), |u| u.to_string());
        writeln!(
            w,
            "  payload  {}, account {} (uid {uid})",
            h.payload_id,
            dash(&h.account)
        )?;
        writeln!(
            w,
            "  pilot    {} ({}), batch job {} on {}",
            dash(&h.pilot_id),
            dash(&h.pilot_dn),
            dash(&h.batch_job_id),
            dash(&h.host)
        )?;
        match (&h.end, &h.end_event) {
            (Some(e), Some(ev)) if ev == "lost" => {
                writeln!(w, "  from     {} to {e} (lost: end not recorded)", h.start)?
            }
            (Some(e), _) => writeln!(w, "  from     {} to {e}", h.start)?,
            (None, _) => writeln!(w, "  from     {} (no end recorded: still running)", h.start)?,
        }
    }
    Ok(())
}

fn filter_of(args: &ListArgs) -> Result<Filter, String> {
    Ok(Filter {
        owner_dn: args.owner.clone(),
        payload_id: args.payload.clone(),
        since: opt_time(&args.since, "--since")?,
        until: opt_time(&args.until, "--until")?,
    })
}

fn select(args: &ListArgs, default_log: &Path) -> Result<Vec<String>, String> {
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

/// `audit kill`: asks the running helper to kill the owner's payloads (and ban the owner).
pub fn kill_main(args: &KillArgs, default_socket: &Path, io: &mut Out) -> i32 {
    let socket = args.socket.as_deref().unwrap_or(default_socket);
    match super::admin::admin_kill(socket, &args.owner, args.ban, Duration::from_secs(60)) {
        Ok(killed) => {
            if killed.is_empty() {
                let _ = writeln!(io.out, "no running payload of {} on this node", args.owner);
            } else {
                let _ = writeln!(
                    io.out,
                    "killed {} payload(s) of {}: {}",
                    killed.len(),
                    args.owner,
                    killed.join(" ")
                );
            }
            if args.ban {
                let _ = writeln!(io.out, "{} is banned on this node", args.owner);
            }
            0
        }
        Err(e) => fail(io, e),
    }
}
