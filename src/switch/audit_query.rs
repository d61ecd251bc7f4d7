//! `mupilot-switch audit ...`: the site admin's incident-response commands over the helper's
//! audit log (who held uid X at time T, what did DN Y run, is the log intact, stop DN Y here).
//!
//! The commands only the site has (`who`, `kill`, and the `audit` command set) live here; the
//! queries are `crate::records::query`, and `list` and `verify` are the record layer's
//! commands, shared with the pilot's trace and the server's request log. This file binds them
//! to the helper's configured paths.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use crate::records::cli::{self, fail, files, user_time, with_stdio, LogArg, Out};
pub use crate::records::cli::{ListArgs, VerifyArgs};
use crate::records::query::{self, Holding, Subject};

/// The audit log when switch.toml does not say otherwise.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/mupilot/audit.jsonl";
/// The helper's socket when switch.toml does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mupilot/switch.sock";

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

/// Runs `mupilot-switch audit <cmd>`; `audit_log` and `socket` come from switch.toml.
pub fn run(cmd: &AuditCommand, audit_log: &Path, socket: &Path) -> i32 {
    with_stdio(|io| audit_main(cmd, audit_log, socket, io))
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
        AuditCommand::List(a) => cli::list_main(a, default_log, io),
        AuditCommand::Verify(a) => cli::verify_main(a, default_log, io),
        AuditCommand::Kill(a) => kill_main(a, default_socket, io),
    }
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

/// `audit kill`: asks the running helper to kill the owner's payloads (and ban the owner).
pub fn kill_main(args: &KillArgs, default_socket: &Path, io: &mut Out) -> i32 {
    let socket = args.socket.as_deref().unwrap_or(default_socket);
    match super::admin_client::admin_kill(socket, &args.owner, args.ban, Duration::from_secs(60)) {
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
