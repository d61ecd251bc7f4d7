//! `mupilot-server requests`: the request log's questions ("which Internet address and port
//! submitted payload X", everything a DN did or had done for it, what came from an address,
//! in a time window) and `requests verify` (the chain, with the records commands' verifier).
//! Read-only; works on the files alone (server stopped or running, database gone or not).
//!
//! Exit codes as the records commands: 0 found / intact, 1 nothing matched / not intact,
//! 2 the command could not run.

use std::net::IpAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Deserialize;

use crate::records::cli::{LogArg, Out, VerifyArgs};
use crate::records::{parse_record_time, parse_user_time, query::scan_lines, rotate};

/// Where the request log is.
#[derive(Debug, Clone, Args)]
pub struct LogSource {
    /// The server's server.toml: its [request_log] path (default DATA_DIR/requests.jsonl)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The request log file itself (its rotated files FILE.<timestamp> are read too)
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub log: Option<PathBuf>,
}

/// `requests [filters]`: the matching request records.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Requests about this payload id: its submission (with the address and port it came
    /// from), its match, the pilot's reports, reads, cancels and signals
    #[arg(long, value_name = "ID")]
    pub payload: Option<String>,
    /// Requests by or for this DN: as the certificate, as the member a portal named, or as
    /// the person responsible for the robot or portal
    #[arg(long, value_name = "DN")]
    pub dn: Option<String>,
    /// Requests from this client address: an IP, or IP:PORT ([IPv6]:PORT)
    #[arg(long, value_name = "ADDR")]
    pub client: Option<String>,
    /// Only this action: submit, list, view, download, cancel, signal, match, status, upload,
    /// membership, membership_read, other
    #[arg(long, value_name = "ACTION")]
    pub action: Option<String>,
    /// Only requests at or after this time: RFC 3339, "YYYY-MM-DD HH:MM[:SS]" in UTC, or "now"
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only requests at or before this time (as --since)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Print the records as JSON lines, exactly as stored
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: LogSource,
}

/// `requests verify`.
#[derive(Debug, Clone, Args)]
pub struct RequestsVerifyArgs {
    /// A chain head copied from syslog, "SEQ:HASH" (repeatable); detects a truncated tail
    #[arg(long, value_name = "SEQ:HASH")]
    pub anchor: Vec<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: LogSource,
}

/// `requests <command>`.
#[derive(Debug, Clone, Subcommand)]
pub enum RequestsCommand {
    /// Verify the request log's hash chain (rotated files included), optionally against anchors
    Verify(RequestsVerifyArgs),
}

/// `mupilot-server requests`: list by default, or a subcommand.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RequestsArgs {
    #[command(subcommand)]
    pub command: Option<RequestsCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

/// Runs `requests`; returns the exit code.
pub fn main(args: &RequestsArgs, io: &mut Out) -> i32 {
    match &args.command {
        Some(RequestsCommand::Verify(v)) => verify(v, io),
        None => list(&args.list, io),
    }
}

fn fail(io: &mut Out, msg: impl std::fmt::Display) -> i32 {
    let _ = writeln!(io.err, "error: {msg}");
    2
}

/// The log path: `--log`, or the `[request_log]` of `--config`.
fn log_path(src: &LogSource) -> Result<PathBuf, String> {
    match (&src.log, &src.config) {
        (Some(l), _) => Ok(l.clone()),
        (None, Some(c)) => crate::server::config::ServerConfig::load(c)
            .map(|cfg| cfg.portal.request_log)
            .map_err(|e| e.to_string()),
        (None, None) => {
            Err("say which log: --config SERVER.TOML (its [request_log]) or --log FILE".to_string())
        }
    }
}

fn files(src: &LogSource) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let log = log_path(src)?;
    let files = rotate::chain_files(&log).map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Err(format!(
            "no request log at {} (nor rotated files of it): check [request_log] path in server.toml, or pass --log FILE",
            log.display()
        ));
    }
    Ok((log, files))
}

fn verify(args: &RequestsVerifyArgs, io: &mut Out) -> i32 {
    let log = match log_path(&args.source) {
        Ok(l) => l,
        Err(e) => return fail(io, e),
    };
    let v = VerifyArgs {
        anchor: args.anchor.clone(),
        json: args.json,
        log: LogArg {
            log: Some(log.clone()),
        },
    };
    crate::records::cli::verify_main(&v, &log, io)
}

/// The fields of a request record the listing reads.
#[derive(Debug, Deserialize)]
struct View<'a> {
    #[serde(borrow)]
    time: &'a str,
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow, default)]
    client_ip: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    client_port: Option<u16>,
    #[serde(borrow, default)]
    dn: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    on_behalf_of: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    responsible: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<&'a str>,
    #[serde(borrow, default)]
    payload_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(borrow, default)]
    error: Option<std::borrow::Cow<'a, str>>,
}

/// A client address to match: an IP, with or without a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientFilter {
    ip: IpAddr,
    port: Option<u16>,
}

fn parse_client(s: &str) -> Result<ClientFilter, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(ClientFilter {
            ip: a.ip().to_canonical(),
            port: Some(a.port()),
        });
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| ClientFilter {
            ip: ip.to_canonical(),
            port: None,
        })
        .map_err(|_| {
            format!("--client {s:?}: give an IP address or IP:PORT, e.g. 192.0.2.7, 192.0.2.7:40122 or [2001:db8::7]:40122")
        })
}

fn user_time(s: &Option<String>, flag: &str) -> Result<Option<DateTime<Utc>>, String> {
    let Some(s) = s else { return Ok(None) };
    if s.trim().eq_ignore_ascii_case("now") {
        return Ok(Some(Utc::now()));
    }
    parse_user_time(s)
        .map(Some)
        .map_err(|e| format!("{flag}: {e}"))
}

const ACTIONS: [&str; 15] = [
    "submit",
    "list",
    "view",
    "download",
    "cancel",
    "signal",
    "information",
    "match",
    "status",
    "upload",
    "membership",
    "membership_read",
    "delegate",
    "proxy",
    "other",
];

fn needle(key: &str, value: &str) -> Vec<u8> {
    format!("\"{key}\":{}", serde_json::Value::from(value)).into_bytes()
}

fn list(args: &ListArgs, io: &mut Out) -> i32 {
    let since = match user_time(&args.since, "--since") {
        Ok(t) => t,
        Err(e) => return fail(io, e),
    };
    let until = match user_time(&args.until, "--until") {
        Ok(t) => t,
        Err(e) => return fail(io, e),
    };
    let client = match args.client.as_deref().map(parse_client).transpose() {
        Ok(c) => c,
        Err(e) => return fail(io, e),
    };
    if let Some(a) = &args.action {
        if !ACTIONS.contains(&a.as_str()) {
            return fail(io, format!("--action {a:?}: one of {}", ACTIONS.join(", ")));
        }
    }
    let (_, files) = match files(&args.source) {
        Ok(f) => f,
        Err(e) => return fail(io, e),
    };
    // The rarest field given finds the candidate lines before any JSON is parsed.
    let needles: Vec<Vec<u8>> = if let Some(id) = &args.payload {
        vec![needle("payload_id", id)]
    } else if let Some(dn) = &args.dn {
        ["dn", "on_behalf_of", "responsible"]
            .iter()
            .map(|k| needle(k, dn))
            .collect()
    } else if let Some(c) = &client {
        vec![needle("client_ip", &c.ip.to_string())]
    } else {
        vec![needle("event", "request")]
    };
    let mut hits: Vec<String> = Vec::new();
    let scanned = scan_lines(&files, &needles, |line| {
        let Ok(v) = serde_json::from_slice::<View>(line) else {
            return;
        };
        if v.event != "request" {
            return;
        }
        if args
            .payload
            .as_deref()
            .is_some_and(|p| v.payload_id.as_deref() != Some(p))
        {
            return;
        }
        if let Some(dn) = args.dn.as_deref() {
            let is = |f: &Option<std::borrow::Cow<str>>| f.as_deref() == Some(dn);
            if !(is(&v.dn) || is(&v.on_behalf_of) || is(&v.responsible)) {
                return;
            }
        }
        if let Some(c) = client {
            let ip = v
                .client_ip
                .as_deref()
                .and_then(|i| i.parse::<IpAddr>().ok());
            if ip != Some(c.ip) || c.port.is_some_and(|p| v.client_port != Some(p)) {
                return;
            }
        }
        if args.action.as_deref().is_some_and(|a| v.action != Some(a)) {
            return;
        }
        if since.is_some() || until.is_some() {
            let Some(t) = parse_record_time(v.time) else {
                return;
            };
            if since.is_some_and(|s| t < s) || until.is_some_and(|u| t > u) {
                return;
            }
        }
        hits.push(if args.json {
            String::from_utf8_lossy(line).into_owned()
        } else {
            summary(&v)
        });
    });
    if let Err(e) = scanned {
        return fail(io, e);
    }
    for h in &hits {
        let _ = writeln!(io.out, "{h}");
    }
    if hits.is_empty() {
        if !args.json {
            let _ = writeln!(io.out, "no requests match");
        }
        return 1;
    }
    0
}

/// One listing line: time, client address:port, action, status, kind and DN, then who it
/// was for, who answers for it, the payload and the error code when there are.
fn summary(v: &View) -> String {
    let ip = v.client_ip.as_deref().unwrap_or("-");
    let port = v.client_port.map_or("-".to_string(), |p| p.to_string());
    let addr = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let mut s = format!(
        "{} {addr} {} {} {} {}",
        v.time,
        v.action.unwrap_or("-"),
        v.status.map_or("-".to_string(), |s| s.to_string()),
        v.kind.unwrap_or("-"),
        v.dn.as_deref().unwrap_or("-"),
    );
    if let Some(m) = &v.on_behalf_of {
        s.push_str(&format!(" for={m}"));
    }
    if let Some(r) = &v.responsible {
        s.push_str(&format!(" responsible={r}"));
    }
    if let Some(p) = &v.payload_id {
        s.push_str(&format!(" payload={p}"));
    }
    if let Some(e) = &v.error {
        s.push_str(&format!(" error={e}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_with_and_without_port() {
        let c = parse_client("192.0.2.7:40122").unwrap();
        assert_eq!(
            (c.ip.to_string(), c.port),
            ("192.0.2.7".into(), Some(40122))
        );
        let c = parse_client("[2001:db8::7]:443").unwrap();
        assert_eq!(
            (c.ip.to_string(), c.port),
            ("2001:db8::7".into(), Some(443))
        );
        assert_eq!(parse_client("192.0.2.7").unwrap().port, None);
        // An IPv4 client over an IPv6 socket is recorded as IPv4.
        assert_eq!(
            parse_client("[::ffff:192.0.2.7]:1").unwrap().ip.to_string(),
            "192.0.2.7"
        );
        assert!(parse_client("host.example")
            .unwrap_err()
            .contains("--client"));
    }
}
