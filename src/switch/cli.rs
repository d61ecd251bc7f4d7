//! The `mupilot-switch` command line: `serve`, `check-config`, `policy check|eval`,
//! `audit who|list|verify|kill`, `leases`, `check-proxy`. Parses arguments, sets up logging, maps results to exit codes; the work
//! happens in the modules it calls.
//!
//! Exit codes: 0 ok; 1 runtime failure (or a broken audit chain); 2 usage or configuration
//! error; 3 denied (`policy eval`).

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use super::config::{SwitchConfig, DEFAULT_CONFIG};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: a runtime failure, or `audit verify` found a broken chain.
pub const EXIT_RUNTIME: i32 = 1;
/// Exit code: bad command line or configuration.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: `policy eval` denied the request.
pub const EXIT_DENIED: i32 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "mupilot-switch",
    version,
    about = "The site's identity-switching helper for multi-user pilot jobs (runs as root)",
    long_about = "The site's identity-switching helper for multi-user pilot jobs. Runs as root, \
normally socket-activated by systemd (mupilot-switch.socket). Pilots connect to its unix socket; \
the helper verifies each payload envelope, decides locally whether it may run, maps its owner to a \
local account, runs it in a sandbox under that account and writes a hash-chained audit log.",
    after_help = "Exit codes: 0 ok, 1 runtime failure (audit verify: chain broken), 2 usage or \
configuration error, 3 denied (policy eval, check-proxy).\nSee docs/site-admin.md for switch.toml."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the helper daemon (socket from systemd, or the configured `socket` path).
    Serve {
        /// The site configuration.
        #[arg(long, short, default_value = DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load and validate a configuration and the site it names (directory modes, pool
    /// accounts), print a summary and every problem with its fix; exit 0 when usable, 2 when not.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check or evaluate authorization policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Incident response over the audit log: who, list, verify, kill.
    Audit {
        /// switch.toml, for the audit log and socket paths (default: /etc/mupilot/switch.toml
        /// when it exists, else the built-in paths).
        #[arg(long, global = true, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: super::audit_query::AuditCommand,
    },
    /// Verify an X.509 proxy with its VOMS attributes against the CA directory and vomsdir, as
    /// the helper does before a launch; print what was verified or the refusal (exit 0 / 3).
    #[cfg(feature = "grid")]
    CheckProxy(super::check_proxy::CheckProxyArgs),
    /// List pool accounts and their leases (account, owner, since, last used, state).
    Leases {
        #[arg(long, short, default_value = DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Parse policy files; exit 0 when every one is valid.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Evaluate a request (JSON) against policies; exit 0 permit, 3 deny, 2 bad input.
    Eval {
        #[arg(long = "policy", required = true, value_name = "FILE")]
        policies: Vec<PathBuf>,
        /// The request as JSON, or `-` for standard input.
        #[arg(long, value_name = "FILE|-")]
        request: PathBuf,
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
    if !matches!(cli.command, Command::Serve { .. }) {
        crate::util::exit_quietly_on_broken_pipe();
    }
    crate::util::init_logging();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Policy {
            command: PolicyCommand::Check { files },
        } => crate::policy::cli::check_main(&files),
        Command::Policy {
            command: PolicyCommand::Eval { policies, request },
        } => crate::policy::cli::eval_main(&policies, &request),
        Command::Audit { config, command } => audit(config, &command),
        Command::Leases { config, json } => leases(&config, json),
        #[cfg(feature = "grid")]
        Command::CheckProxy(args) => super::check_proxy::main(&args),
    }
}

fn load(config: &Path) -> Result<SwitchConfig, i32> {
    SwitchConfig::load(config).map_err(|e| {
        eprintln!("mupilot-switch: {e}");
        EXIT_USAGE
    })
}

fn serve(config: &Path) -> i32 {
    if !nix::unistd::getuid().is_root() {
        eprintln!(
            "mupilot-switch: serve must run as root (it switches identities); start it through systemd (mupilot-switch.socket)"
        );
        return EXIT_USAGE;
    }
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match super::daemon::serve(cfg) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mupilot-switch: {e}");
            EXIT_RUNTIME
        }
    }
}

fn check_config(config: &Path) -> i32 {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // What `serve` would refuse to start with: payloads' IPC not kept apart on this kernel.
    let isolation =
        match super::sandbox::scope::resolve(cfg.sandbox.network, cfg.sandbox.ipc_fallback) {
            Ok(isolation) => isolation,
            Err(e) => {
                eprintln!(
                    "mupilot-switch: {}: key 'sandbox.ipc_fallback': {e}",
                    cfg.path.display()
                );
                return EXIT_USAGE;
            }
        };
    let problems = super::check::problems(&cfg);
    if problems.is_empty() {
        println!("{}: ok", cfg.path.display());
    } else {
        println!("{}: {} problem(s)", cfg.path.display(), problems.len());
    }
    println!("  socket         {}", cfg.socket.display());
    let pilots: Vec<String> = cfg
        .allowed_pilots
        .iter()
        .map(|p| format!("{} (uid {})", p.written, p.uid))
        .collect();
    println!("  allowed_pilots {}", pilots.join(", "));
    println!("  gridmap        {}", cfg.gridmap.display());
    println!("  audit_log      {}", cfg.audit_log.display());
    println!("  state_dir      {}", cfg.state_dir.display());
    println!("  min_uid        {}", cfg.min_uid);
    for v in &cfg.vos {
        println!(
            "  vo             {} ({})",
            v.name,
            v.public_key_path.display()
        );
    }
    println!("  scratch_root   {}", cfg.sandbox.scratch_root.display());
    println!("  ipc isolation  {isolation}");
    for p in &problems {
        eprintln!("mupilot-switch: {p}");
    }
    if problems.is_empty() {
        EXIT_OK
    } else {
        eprintln!(
            "mupilot-switch: {}: {} problem(s); the helper would refuse or fail payloads until they are fixed",
            cfg.path.display(),
            problems.len()
        );
        EXIT_USAGE
    }
}

fn leases(config: &Path, json: bool) -> i32 {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(dir) = &cfg.authz.gridmapdir else {
        eprintln!(
            "mupilot-switch: {} configures no pool accounts; set authz.gridmapdir to use leases",
            cfg.path.display()
        );
        return EXIT_USAGE;
    };
    let pool = match super::leases::Gridmapdir::new(
        dir,
        &cfg.state_dir,
        std::time::Duration::from_secs(cfg.authz.lease_ttl_seconds),
    )
    .and_then(|p| p.list())
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mupilot-switch: {e}");
            return EXIT_RUNTIME;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&pool).expect("leases serialise")
        );
        return EXIT_OK;
    }
    let time = |t: Option<i64>| {
        t.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map_or_else(
                || "-".to_string(),
                |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            )
    };
    println!(
        "{:<16} {:<8} {:<21} {:<21} OWNER",
        "ACCOUNT", "STATE", "SINCE", "LAST USED"
    );
    for l in pool {
        let state = serde_json::to_value(l.state).expect("state serialises");
        println!(
            "{:<16} {:<8} {:<21} {:<21} {}",
            l.account,
            state.as_str().unwrap_or("-"),
            time(l.since),
            time(l.last_used),
            l.owner.as_deref().unwrap_or("-")
        );
    }
    EXIT_OK
}

/// `audit ...`: paths from the given switch.toml, the default one when present, or defaults.
fn audit(config: Option<PathBuf>, cmd: &super::audit_query::AuditCommand) -> i32 {
    use super::audit_query::{run, DEFAULT_AUDIT_LOG, DEFAULT_SOCKET};
    let config = config.or_else(|| {
        let d = PathBuf::from(DEFAULT_CONFIG);
        d.exists().then_some(d)
    });
    match config {
        Some(c) => match load(&c) {
            Ok(cfg) => run(cmd, &cfg.audit_log, &cfg.socket),
            Err(code) => code,
        },
        None => run(cmd, Path::new(DEFAULT_AUDIT_LOG), Path::new(DEFAULT_SOCKET)),
    }
}
