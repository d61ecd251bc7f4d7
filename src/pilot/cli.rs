//! The `mupilot` command line: `run`, `limits` and `trace verify`.
//!
//! Exit codes (each means one thing): 0 success; 1 runtime failure (helper connection lost,
//! trace log unwritable, broken trace chain); 2 usage or configuration error (bad flag, bad
//! pilot.toml, unreadable certificate, key or CA); 4 the helper is missing or refused the
//! pilot (the pilot never runs payloads without it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt;

use clap::{Parser, Subcommand};

use super::agent::{self, AgentSettings};
use super::client::HttpsServer;
use super::config::PilotConfig;
use super::helper_client;
use super::outbox::Outbox;
use super::slot::{self, Overrides};
use super::trace::TraceLog;
use crate::protocol::switch_wire::PilotHello;

/// Success.
pub const EXIT_OK: i32 = 0;
/// Runtime failure.
pub const EXIT_RUNTIME: i32 = 1;
/// Usage or configuration error.
pub const EXIT_USAGE: i32 = 2;
/// The helper is unreachable or refused the pilot.
pub const EXIT_HELPER: i32 = 4;

/// mupilot: multi-user pilot agent. Runs inside a batch slot as the VO's pilot account,
/// fetches payloads over mutual TLS and has the site's helper (mupilot-switch) run each one
/// under its owner's account.
#[derive(Debug, Parser)]
#[command(name = "mupilot", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pilot until it is idle, drained, stopped or out of time.
    Run {
        /// pilot.toml (see docs/vo-framework.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Stop fetching after N launches; exit when they end (overrides max_payloads).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_payloads: Option<u32>,
        /// Exit after S seconds with no work and nothing running (overrides idle_timeout_seconds).
        #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
        idle_timeout: Option<u64>,
    },
    /// Show the batch slot this pilot would use (cores, memory, deadline and their sources).
    Limits {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Apply the [slot] overrides of this pilot.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// The pilot's trace log: list, show, verify, export (for the VO's incident response).
    Trace {
        /// pilot.toml, for the trace log path. Without it: --log FILE, else
        /// $MUPILOT_WORK/trace.jsonl, else this account's $TMPDIR/mupilot-*/trace.jsonl.
        #[arg(long, global = true, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: super::trace_query::TraceCommand,
    },
}

/// The command-line definition, for generated man pages and shell completions
/// (examples/gen-docs).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    if !matches!(cli.command, Command::Run { .. }) {
        crate::util::exit_quietly_on_broken_pipe();
    }
    crate::util::init_logging();
    match cli.command {
        Command::Run {
            config,
            max_payloads,
            idle_timeout,
        } => run(&config, max_payloads, idle_timeout),
        Command::Limits { json, config } => limits(json, config.as_deref()),
        Command::Trace { config, command } => trace(config, &command),
    }
}

fn load_config(path: &Path) -> Result<PilotConfig, i32> {
    PilotConfig::load(path).map_err(|e| {
        eprintln!("mupilot: {e}");
        EXIT_USAGE
    })
}

fn run(config: &Path, max_payloads: Option<u32>, idle_timeout: Option<u64>) -> i32 {
    let mut cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if max_payloads.is_some() {
        cfg.max_payloads = max_payloads;
    }
    if let Some(s) = idle_timeout {
        cfg.idle_timeout = Duration::from_secs(s);
    }
    // Certificate, key and CA are loaded now, so a wrong path or a bad key fails at once with
    // the file named, before any payload is fetched.
    let server = match HttpsServer::new(&cfg.server_url, &cfg.cert, &cfg.key, &cfg.ca) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "mupilot: TLS setup from {} failed: {e}",
                cfg.source.display()
            );
            return EXIT_USAGE;
        }
    };
    let pilot_dn = crate::tls::load_certs(&cfg.cert)
        .ok()
        .and_then(|c| c.first().and_then(|c| crate::tls::subject_dn(c)));
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.work_dir)
    {
        eprintln!(
            "mupilot: cannot create work_dir {}: {e}; set work_dir in {} to a writable directory",
            cfg.work_dir.display(),
            cfg.source.display()
        );
        return EXIT_USAGE;
    }
    let trace = match TraceLog::open(&cfg.trace_log) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "mupilot: {e}; set trace_log in {} to a writable file",
                cfg.source.display()
            );
            return EXIT_USAGE;
        }
    };
    // Opened (and locked) before anything is fetched: what the pilot will owe the server
    // must have a durable place.
    let outbox = match Outbox::open(&cfg.work_dir, &cfg.pilot_id) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mupilot: {e} (work_dir in {})", cfg.source.display());
            return EXIT_USAGE;
        }
    };
    let report = slot::discover(&cfg.slot);
    for p in &report.problems {
        tracing::warn!(problem = %p, "slot discovery");
    }
    let slot = report.slot;
    tracing::info!(
        pilot_id = %cfg.pilot_id,
        cores = slot.cores,
        memory_bytes = slot.memory_bytes,
        deadline_unix = ?slot.deadline_unix,
        batch_system = ?slot.batch_system,
        batch_job_id = ?slot.batch_job_id,
        "slot discovered"
    );
    let hello = PilotHello {
        pilot_id: cfg.pilot_id.clone(),
        pilot_dn,
        batch_system: slot.batch_system.clone(),
        batch_job_id: slot.batch_job_id.clone(),
        slot_cores: Some(slot.cores),
        slot_memory_bytes: Some(slot.memory_bytes),
        slot_deadline_unix: slot.deadline_unix,
    };
    let (helper, welcome, helper_rx) = match helper_client::connect(&cfg.switch_socket, hello) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mupilot: {e}");
            return EXIT_HELPER;
        }
    };
    tracing::info!(helper_host = %welcome.host, helper_version = %welcome.helper_version, socket = %cfg.switch_socket.display(), "helper connected");
    let settings = AgentSettings {
        pilot_id: cfg.pilot_id.clone(),
        // The helper's node name: the server binds envelopes to it, and the helper refuses
        // an envelope bound to another node.
        host: welcome.host.clone(),
        server_url: cfg.server_url.clone(),
        work_dir: cfg.work_dir.clone(),
        poll_interval: cfg.poll_interval,
        idle_timeout: cfg.idle_timeout,
        shutdown_margin: cfg.shutdown_margin,
        grace: cfg.grace,
        heartbeat: cfg.heartbeat,
        launch_timeout: Duration::from_secs(300),
        tick: Duration::from_millis(500),
        max_payloads: cfg.max_payloads,
        drain_file: cfg.drain_file.clone(),
        upload_reserve: cfg.upload_reserve,
        outbox_wait: cfg.outbox_wait,
        proxy_renew_margin: cfg.proxy_renew_margin,
        patience: Default::default(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mupilot: cannot start the async runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    let outcome = rt.block_on(async move {
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = super::signals::forward(control_tx) {
            eprintln!("mupilot: cannot install signal handlers: {e}");
            return None;
        }
        Some(
            agent::run(
                settings,
                slot,
                Arc::new(server),
                Arc::new(helper),
                helper_rx,
                control_rx,
                agent::Ledger { trace, outbox },
            )
            .await,
        )
    });
    // Reporter tasks are done by now; do not wait for idle keep-alive connections.
    rt.shutdown_timeout(Duration::from_secs(1));
    let Some(outcome) = outcome else {
        return EXIT_RUNTIME;
    };
    // The payloads are over: a closed stdout must not turn the exit code into a panic's.
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout(),
        "mupilot: pilot {} {} (trace {})",
        cfg.pilot_id,
        outcome.summary,
        cfg.trace_log.display()
    );
    outcome.exit_code
}

fn limits(json: bool, config: Option<&Path>) -> i32 {
    let overrides = match config {
        Some(p) => match load_config(p) {
            Ok(c) => c.slot,
            Err(code) => return code,
        },
        None => Overrides::default(),
    };
    slot::limits_main(json, &overrides)
}

/// `trace ...`: the log from pilot.toml, else found (`--log`, `$MUPILOT_WORK`, the account's
/// default work directories).
fn trace(config: Option<PathBuf>, cmd: &super::trace_query::TraceCommand) -> i32 {
    match config {
        Some(c) => match load_config(&c) {
            Ok(cfg) => super::trace_query::run(cmd, &cfg.trace_log),
            Err(code) => code,
        },
        None => super::trace_query::run_found(cmd),
    }
}
