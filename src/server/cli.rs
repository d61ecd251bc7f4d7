//! The `mupilot-server` command line: `init`, `serve`, `member ...` (registry administration
//! on the server's database) and the client commands `submit`, `status`, `output`, `cancel`,
//! `signal`, `info`, `delegate`.
//!
//! Exit codes: 0 ok; 1 runtime or server error; 2 usage or configuration error;
//! 3 the payload ended unsuccessfully (failed, denied, cancelled, lost) for `status --wait`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::client::{self, Client, ClientError};
use super::config::{ClientConfig, ServerConfig};
use super::init::{self, InitOptions};
use super::membership::types::RequestKind;
use super::store::Store;
use crate::protocol::api::{InformationView, PayloadState, PayloadView, SubmitRequest};
use crate::protocol::Resources;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: runtime or server error.
pub const EXIT_RUNTIME: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the payload ended without success (`status --wait`).
pub const EXIT_PAYLOAD: i32 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "mupilot-server",
    version,
    about = "Reference VO server for mupilot: membership registry, payload queue, signed envelopes",
    after_help = "Start with `mupilot-server init DIR`, then `mupilot-server serve --config DIR/server.toml`.\n\
                  Exit codes: 0 ok, 1 runtime/server error, 2 usage/config error, 3 payload ended unsuccessfully (status --wait)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a demo VO in DIR: CA, server/pilot/user certificates, VO signing key,
    /// grid-mapfile, server.toml, pilot.toml, switch.toml, client-<user>.toml.
    Init {
        dir: PathBuf,
        /// VO name.
        #[arg(long, default_value = "demo")]
        vo: String,
        /// Address the server will listen on (also written into pilot.toml).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Overwrite the demo files in a non-empty DIR.
        #[arg(long)]
        force: bool,
    },
    /// Run the HTTPS API server until SIGTERM or SIGINT.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Administer the membership registry (P3) in the server's database.
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Submit a payload; prints its id.
    Submit(SubmitArgs),
    /// Delegate your X.509 proxy to the VO server without sending its private key (the
    /// server makes the key, the proxy for it is signed here); prints the delegation id.
    Delegate(DelegateArgs),
    /// Show a payload's state; with --wait, wait until it ends.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
        /// Print the full record as JSON.
        #[arg(long)]
        json: bool,
        /// Wait up to SECONDS for a final state; exit 3 unless it is `done`.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Download a payload's output archive and unpack it.
    Output {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
        /// Directory to unpack into (created if needed).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Cancel a payload (owner or VO operator).
    Cancel {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
    },
    /// Send a signal to a running payload (owner or VO operator), through its pilot and the
    /// site's helper, which authorizes it with the site's policies.
    Signal {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
        /// Signal number (e.g. 10 for SIGUSR1, 15 for SIGTERM).
        #[arg(long, value_name = "N")]
        signal: i32,
    },
    /// Ask the site's helper what it sees of a running payload (owner or VO operator; the
    /// site authorizes the request with its own policies): state, account, start time, usage,
    /// cgroup. The request reaches the pilot with its next heartbeat; waits for the answer.
    #[command(
        after_help = "Exit codes: 0 answered, 1 no answer in time, the pilot gone, or the site refused, 2 usage error."
    )]
    Info {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
        /// Print the request and answer as JSON.
        #[arg(long)]
        json: bool,
        /// Wait at most SECONDS for the answer [default: twice the server's heartbeat
        /// interval plus 10 s].
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Query the request log: which address and port submitted a payload, what a DN did or
    /// had done for it, what came from an address; `requests verify` checks its chain.
    #[command(
        after_help = "Exit codes: 0 found (verify: intact), 1 nothing matched (verify: not intact), 2 could not run."
    )]
    Requests(super::portal::query::RequestsArgs),
    /// The membership registry (reference 002) over the API: register, renew, ask for
    /// changes, decide requests (VO managers), suspend, reinstate, remove; and on the
    /// server's own files: the audit log and the purge of ended memberships' personal data.
    Membership {
        #[command(subcommand)]
        cmd: super::membership::cli::MembershipCmd,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Register a DN by hand (or again after its removal) for 12 months: its registration
    /// data and the AUP versions it accepted, recorded as a membership request the operator
    /// approved, saying what was verified.
    Add {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        dn: String,
        /// person, host, service or robot.
        #[arg(long, default_value = "person")]
        kind: String,
        #[command(flatten)]
        data: Box<super::membership::cli::RegistrationArgs>,
        /// The checks made and people consulted, e.g. "identity checked in person; institute
        /// representative consulted".
        #[arg(long, required = true)]
        verification: String,
        /// FQAN (repeatable); default "/<vo>".
        #[arg(long = "fqan")]
        fqans: Vec<String>,
    },
    /// Reinstate a suspended member; those who asked for the suspension are notified.
    Reinstate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        dn: String,
        /// The checks made and people consulted before reinstating.
        #[arg(long, required = true)]
        verification: String,
    },
    /// List the registry.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Suspend a member: no new submissions, queued payloads are not matched.
    Suspend {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        dn: String,
    },
    /// Remove a member.
    Remove {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        dn: String,
    },
    /// Renew a registered member for 12 months from now: its data re-confirmed, the current
    /// AUPs accepted again, recorded as a renewal request the operator approved.
    Renew {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        dn: String,
        #[command(flatten)]
        data: Box<super::membership::cli::RegistrationArgs>,
        /// The checks made, e.g. "continued membership confirmed with the institute".
        #[arg(long, required = true)]
        verification: String,
    },
}

/// Where the client connects and with which identity: flags, or a client toml.
#[derive(Args, Debug, Clone)]
pub(crate) struct ConnArgs {
    /// Client toml with server_url, cert, key, ca (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// VO server base URL, e.g. https://127.0.0.1:8443.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// PEM client certificate.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// CA file or hashed CA directory [default: /etc/grid-security/certificates].
    #[arg(long, value_name = "FILE|DIR")]
    ca: Option<PathBuf>,
    /// Act for this member (a portal's certificate only): the member's DN, sent in the
    /// Mupilot-On-Behalf-Of header.
    #[arg(long, value_name = "DN")]
    on_behalf_of: Option<String>,
}

#[derive(Args, Debug)]
struct SubmitArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long)]
    jobtag: Option<String>,
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Memory limit: bytes or with K/M/G/T.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Wall-time limit in seconds.
    #[arg(long, default_value_t = 600)]
    walltime: u64,
    /// Directory packed as the input bundle (unpacked into the payload's scratch).
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Output path relative to the scratch directory (repeatable).
    #[arg(long = "output", value_name = "PATH")]
    outputs: Vec<String>,
    /// Environment variable K=V for the payload (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Run with a proxy delegated from this proxy file (without FILE: $X509_USER_PROXY, else
    /// /tmp/x509up_u<uid>); the worker node gets a proxy of its own from it.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "", conflicts_with = "delegation")]
    proxy: Option<PathBuf>,
    /// Run with an existing delegation (`mupilot-server delegate` prints its id).
    #[arg(long, value_name = "ID")]
    delegation: Option<String>,
    /// Validity asked for the delegated proxy with --proxy (cut to your proxy's; at most
    /// 1000000, the portal policy's bound on a stored credential).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_DELEGATION_SECONDS)]
    lifetime: i64,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "ARGV")]
    argv: Vec<String>,
}

/// Default validity asked for a delegated proxy: four days, inside the 1,000,000 s bound.
pub const DEFAULT_DELEGATION_SECONDS: i64 = 4 * 86400;

#[derive(Args, Debug)]
struct DelegateArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Your proxy file (from voms-proxy-init) [default: $X509_USER_PROXY, else
    /// /tmp/x509up_u<uid>]. Its private key stays on this host.
    #[arg(long, value_name = "FILE")]
    proxy: Option<PathBuf>,
    /// Validity asked for the delegated proxy (cut to your proxy's; at most 1000000, the
    /// portal policy's bound on a stored credential).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_DELEGATION_SECONDS)]
    lifetime: i64,
    /// Delegate a limited proxy.
    #[arg(long)]
    limited: bool,
}

/// `--proxy` as given, else `$X509_USER_PROXY`, else `/tmp/x509up_u<uid>` (grid tools' order).
fn proxy_path(given: Option<&PathBuf>) -> PathBuf {
    match given {
        Some(p) if !p.as_os_str().is_empty() => p.clone(),
        _ => match std::env::var_os("X509_USER_PROXY") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(format!("/tmp/x509up_u{}", nix::unistd::getuid())),
        },
    }
}

/// Delegates the proxy at `path` (feature `grid`).
async fn delegate_proxy(
    c: &Client,
    path: &std::path::Path,
    lifetime: i64,
    limited: bool,
) -> Result<crate::protocol::delegation::DelegationView, ClientError> {
    if lifetime <= 0 {
        return Err(ClientError::Usage(format!(
            "--lifetime {lifetime}: give the seconds the delegated proxy should be valid, e.g. 86400"
        )));
    }
    #[cfg(feature = "grid")]
    {
        c.delegate(path, chrono::Duration::seconds(lifetime), limited)
            .await
    }
    #[cfg(not(feature = "grid"))]
    {
        let _ = (c, path, limited);
        Err(ClientError::Usage(
            "this mupilot-server was built without the `grid` feature (OpenSSL); delegation needs it".into(),
        ))
    }
}

impl ConnArgs {
    /// The client these flags describe, acting for `--on-behalf-of` when given.
    pub(crate) fn client(&self) -> Result<Client, ClientError> {
        let c = Client::new(&self.resolve()?)?;
        match &self.on_behalf_of {
            Some(dn) => c.on_behalf_of(dn),
            None => Ok(c),
        }
    }

    fn resolve(&self) -> Result<ClientConfig, ClientError> {
        let base = match &self.config {
            Some(p) => Some(ClientConfig::load(p)?),
            None => None,
        };
        let need = |v: Option<String>, flag: &str| {
            v.ok_or_else(|| {
                ClientError::Usage(format!(
                    "{flag} is required (or pass --config with a client toml, e.g. DIR/client-alice.toml from `mupilot-server init`)"
                ))
            })
        };
        let server_url = need(
            self.server
                .clone()
                .or(base.as_ref().map(|b| b.server_url.clone())),
            "--server",
        )?;
        let cert = need(
            self.cert
                .clone()
                .or(base.as_ref().map(|b| b.cert.clone()))
                .map(|p| p.display().to_string()),
            "--cert",
        )?;
        let key = need(
            self.key
                .clone()
                .or(base.as_ref().map(|b| b.key.clone()))
                .map(|p| p.display().to_string()),
            "--key",
        )?;
        let ca = self
            .ca
            .clone()
            .or(base.as_ref().map(|b| b.ca.clone()))
            .unwrap_or_else(|| PathBuf::from(crate::tls::DEFAULT_CA_DIR));
        Ok(ClientConfig {
            server_url,
            cert: cert.into(),
            key: key.into(),
            ca,
        })
    }
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
    if !matches!(cli.cmd, Command::Serve { .. }) {
        crate::util::exit_quietly_on_broken_pipe();
    }
    match cli.cmd {
        Command::Init {
            dir,
            vo,
            listen,
            force,
        } => {
            let opts = InitOptions {
                dir,
                vo,
                listen,
                force,
            };
            match init::run(&opts) {
                Ok(dir) => {
                    println!("demo VO written to {}", dir.display());
                    println!(
                        "start the server: mupilot-server serve --config {}",
                        dir.join("server.toml").display()
                    );
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("mupilot-server init: {e}");
                    match e {
                        init::InitError::Write { .. } | init::InitError::Pki(_) => EXIT_RUNTIME,
                        _ => EXIT_USAGE,
                    }
                }
            }
        }
        Command::Serve { config } => serve(&config),
        Command::Requests(args) => {
            crate::records::cli::with_stdio(|io| super::portal::query::main(&args, io))
        }
        Command::Member { cmd } => member(cmd),
        Command::Membership { cmd } => super::membership::cli::main(cmd),
        Command::Submit(args) => run_client(|| submit(args)),
        Command::Delegate(args) => run_client(|| async move {
            let c = args.conn.client()?;
            let path = proxy_path(args.proxy.as_ref());
            let v = delegate_proxy(&c, &path, args.lifetime, args.limited).await?;
            println!("{}", v.delegation_id);
            eprintln!(
                "delegated {} (serial {}) valid until {}{}",
                v.subject,
                v.serial,
                v.not_after.format("%Y-%m-%dT%H:%M:%SZ"),
                if v.limited { ", limited" } else { "" }
            );
            Ok(EXIT_OK)
        }),
        Command::Status {
            conn,
            id,
            json,
            wait,
        } => run_client(|| status(conn, id, json, wait)),
        Command::Output { conn, id, to } => run_client(|| async move {
            let c = conn.client()?;
            let data = c.output(&id).await?;
            let dest = to.clone();
            tokio::task::spawn_blocking(move || client::unpack(&data, &dest))
                .await
                .map_err(|e| ClientError::Usage(e.to_string()))??;
            println!("output of {id} unpacked into {}", to.display());
            Ok(EXIT_OK)
        }),
        Command::Cancel { conn, id } => run_client(|| async move {
            let c = conn.client()?;
            let v = c.cancel(&id).await?;
            if v.state == PayloadState::Cancelled {
                println!("{id} cancelled");
            } else {
                println!("{id} is {}: cancel sent to its pilot", v.state);
            }
            Ok(EXIT_OK)
        }),
        Command::Info {
            conn,
            id,
            json,
            wait,
        } => run_client(|| info(conn, id, json, wait)),
        Command::Signal { conn, id, signal } => run_client(|| async move {
            let c = conn.client()?;
            let v = c.signal(&id, signal).await?;
            println!("{id} is {}: signal {signal} sent to its pilot", v.state);
            Ok(EXIT_OK)
        }),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built")
}

pub(crate) fn run_client<F, Fut>(f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<i32, ClientError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    match rt.block_on(f()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mupilot-server: {e}");
            e.exit_code()
        }
    }
}

fn serve(config: &std::path::Path) -> i32 {
    crate::util::init_logging();
    let cfg = match ServerConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mupilot-server serve: {e}");
            return EXIT_USAGE;
        }
    };
    let prepared = match super::listener::prepare(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mupilot-server serve: {e}");
            return match e {
                super::listener::ServeError::Store(_) => EXIT_RUNTIME,
                _ => EXIT_USAGE,
            };
        }
    };
    let rt = runtime();
    let result = rt.block_on(async {
        super::listener::serve(prepared, async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler can be installed");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        })
        .await
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("mupilot-server serve: {e}");
            EXIT_RUNTIME
        }
    }
}

fn member(cmd: MemberCmd) -> i32 {
    let config = match &cmd {
        MemberCmd::Add { config, .. }
        | MemberCmd::Reinstate { config, .. }
        | MemberCmd::List { config, .. }
        | MemberCmd::Suspend { config, .. }
        | MemberCmd::Remove { config, .. }
        | MemberCmd::Renew { config, .. } => config.clone(),
    };
    let cfg = match ServerConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mupilot-server member: {e}");
            return EXIT_USAGE;
        }
    };
    let store = match Store::open_with(&cfg.data_dir, &cfg.database.for_command()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mupilot-server member: {e}");
            return EXIT_RUNTIME;
        }
    };
    let registry = super::membership::Registry::new(&cfg.vo, &cfg.membership);
    // The server's own account on the server's host: the registry's operator of last resort.
    let actor = format!("mupilot-server member (uid {})", nix::unistd::getuid());
    let result = match cmd {
        MemberCmd::Add {
            dn,
            kind,
            data,
            verification,
            fqans,
            ..
        } => match add_request(&registry, &dn, &kind, &data, fqans) {
            Ok(r) => local_add(&store, &registry, &actor, &r, &verification),
            Err(why) => {
                eprintln!("mupilot-server member add: {why}");
                return EXIT_USAGE;
            }
        },
        MemberCmd::Reinstate {
            dn, verification, ..
        } => local_change(
            &store,
            &registry,
            &actor,
            RequestKind::Reinstatement,
            &dn,
            "reinstated with `mupilot-server member reinstate` on the server",
            &verification,
        ),
        MemberCmd::List { json, .. } => match store.members() {
            Ok(list) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("members serialise")
                );
                return EXIT_OK;
            }
            other => other,
        },
        // Suspension and removal as the registry makes them (reference 002): a request
        // record, the member's queued payloads cancelled and running ones sent a cancel,
        // the audit log.
        MemberCmd::Suspend { dn, .. } => local_change(
            &store,
            &registry,
            &actor,
            RequestKind::Suspension,
            &dn,
            "suspended with `mupilot-server member suspend` on the server",
            OPERATOR_VERIFICATION,
        ),
        MemberCmd::Remove { dn, .. } => local_change(
            &store,
            &registry,
            &actor,
            RequestKind::Removal,
            &dn,
            "removed with `mupilot-server member remove` on the server",
            OPERATOR_VERIFICATION,
        ),
        MemberCmd::Renew {
            dn,
            data,
            verification,
            ..
        } => match renewal_request(&store, &registry, &dn, &data) {
            Ok(Ok(filed)) => local_decide(&store, &registry, &actor, &filed, &verification),
            Ok(Err(why)) => {
                eprintln!("mupilot-server member renew: {why}");
                return EXIT_USAGE;
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(members) => {
            for m in members {
                let status = serde_json::to_value(m.status).expect("status serialises");
                println!(
                    "{}\t{}\t{}\t{}\trenewal due {}",
                    m.dn,
                    m.vo,
                    status.as_str().unwrap_or(""),
                    m.fqans.join(","),
                    m.renewal_due.format("%Y-%m-%d")
                );
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("mupilot-server member: {e}");
            match e {
                super::store::StoreError::NoMember(_)
                | super::store::StoreError::Invalid(_)
                | super::store::StoreError::Conflict(_) => EXIT_USAGE,
                _ => EXIT_RUNTIME,
            }
        }
    }
}

/// The verification step of a suspension or removal made on the server's host: the
/// operator acts on the VO's behalf with the server's own account.
const OPERATOR_VERIFICATION: &str = "VO operator on the server's host";

/// The registration `member add` asks for, checked as a member's own `register` is.
fn add_request(
    registry: &super::membership::Registry,
    dn: &str,
    kind: &str,
    data: &super::membership::cli::RegistrationArgs,
    fqans: Vec<String>,
) -> Result<super::store::NewRegistration, String> {
    use super::membership::types::{EntityKind, RegisterRequest};
    let kind = EntityKind::parse(kind)
        .ok_or_else(|| format!("--kind {kind:?}: must be person, host, service or robot"))?;
    let (registration, accept) = data.parts().map_err(|e| e.to_string())?;
    let req = RegisterRequest {
        kind,
        registration,
        accept,
        fqans,
    };
    registry.new_registration(dn, req).map_err(flag_error)
}

/// A refused registration field, named by the command-line flag it came from.
fn flag_error(e: super::membership::types::FieldError) -> String {
    let flag = e
        .field
        .trim_start_matches("registration.person.")
        .replace("registration.responsible", "responsible")
        .replace("accept.grid_aup", "accept_grid_aup")
        .replace("accept.vo_aup", "accept_vo_aup")
        .replace('_', "-");
    format!("--{flag}: {}", e.why)
}

/// The renewal `member renew` files for a registered member (reference 002 4.4): the data
/// re-confirmed for its kind and the current AUP versions accepted again. The outer error is
/// the registry's (no such member, not registered), the inner a refused flag.
fn renewal_request(
    store: &Store,
    registry: &super::membership::Registry,
    dn: &str,
    data: &super::membership::cli::RegistrationArgs,
) -> Result<Result<super::store::FiledRequest, String>, super::store::StoreError> {
    let m = store
        .member(dn)?
        .ok_or_else(|| super::store::StoreError::NoMember(dn.into()))?;
    if m.status != super::store::MemberStatus::Registered {
        return Err(super::store::StoreError::Conflict(format!(
            "{dn} is {}: only a registered member renews (a suspended one is reinstated first with `member reinstate`, a removed one registers again with `member add`)",
            m.state(chrono::Utc::now())
        )));
    }
    let (registration, accept) = match data.parts() {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let s = &registry.settings;
    if let Err(e) = registration
        .check(m.kind)
        .and_then(|()| accept.check(&s.grid_aup_version, &s.vo_aup_version))
    {
        return Ok(Err(flag_error(e)));
    }
    Ok(Ok(super::store::FiledRequest {
        kind: RequestKind::Renewal,
        subject_dn: dn.to_string(),
        requester_dn: dn.to_string(),
        details: serde_json::json!({
            "registration": registration,
            "grid_aup": accept.grid_aup,
            "vo_aup": accept.vo_aup,
        }),
    }))
}

/// Files `filed` and approves it as the operator, each step in the audit log, as a member's
/// request and a manager's approval are.
fn local_decide(
    store: &Store,
    registry: &super::membership::Registry,
    actor: &str,
    filed: &super::store::FiledRequest,
    verification: &str,
) -> Result<Vec<super::store::Member>, super::store::StoreError> {
    check_verification(verification)?;
    let now = chrono::Utc::now();
    let req = store.file_request(filed, now)?;
    registry.record_request(store, "request", actor, &req, None)?;
    approve_filed(store, registry, actor, &req.id, verification, now)
}

/// Approves a request the operator just filed, as a manager's approval does, and audits it.
fn approve_filed(
    store: &Store,
    registry: &super::membership::Registry,
    actor: &str,
    id: &str,
    verification: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<super::store::Member>, super::store::StoreError> {
    let (req, effect) = store.decide(id, actor, true, verification, None, now)?;
    registry.record_request(store, "approve", actor, &req, Some(&effect))?;
    println!("request {} approved by {actor}: {verification}", req.id);
    Ok(effect.member.into_iter().collect())
}

fn check_verification(verification: &str) -> Result<(), super::store::StoreError> {
    super::membership::types::check_text(
        "--verification",
        verification,
        super::membership::types::MAX_NOTE,
    )
    .map_err(|e| super::store::StoreError::Invalid(e.to_string()))
}

/// `member add`: the registration and its approval by the operator, two request records
/// as a member's own registration and a manager's approval make them, each in the audit log.
/// A DN already in the registry is refused (a suspended one is reinstated with `member
/// reinstate`, an active one renewed); a removed one registers anew.
fn local_add(
    store: &Store,
    registry: &super::membership::Registry,
    actor: &str,
    r: &super::store::NewRegistration,
    verification: &str,
) -> Result<Vec<super::store::Member>, super::store::StoreError> {
    check_verification(verification)?;
    if let Some(m) = store.member(&r.dn)? {
        if m.status == super::store::MemberStatus::Suspended {
            return Err(super::store::StoreError::Conflict(format!(
                "{} is suspended; reinstate it with `mupilot-server member reinstate --verification TEXT` (those who asked for the suspension are notified)",
                r.dn
            )));
        }
    }
    let now = chrono::Utc::now();
    let filed = store.register(r, now)?;
    registry.record_request(store, "register", actor, &filed, None)?;
    approve_filed(store, registry, actor, &filed.id, verification, now)
}

/// A suspension, removal or reinstatement made with `member suspend|remove|reinstate` on
/// the server's host.
fn local_change(
    store: &Store,
    registry: &super::membership::Registry,
    actor: &str,
    kind: RequestKind,
    dn: &str,
    reason: &str,
    verification: &str,
) -> Result<Vec<super::store::Member>, super::store::StoreError> {
    let filed = super::store::FiledRequest {
        kind,
        subject_dn: dn.to_string(),
        requester_dn: actor.to_string(),
        details: serde_json::json!({ "reason": reason, "requester_role": "vo_operator" }),
    };
    let (req, effect) = store.file_and_decide(&filed, actor, verification, chrono::Utc::now())?;
    let action = match kind {
        RequestKind::Suspension => "suspend",
        RequestKind::Reinstatement => "reinstate",
        _ => "remove",
    };
    registry.record_request(store, action, actor, &req, Some(&effect))?;
    for id in &effect.cancelled {
        println!("payload {id} cancelled (was queued)");
    }
    for id in &effect.cancelling {
        println!("payload {id}: cancel queued for its pilot");
    }
    Ok(effect.member.into_iter().collect())
}

async fn submit(args: SubmitArgs) -> Result<i32, ClientError> {
    let memory_bytes = client::parse_memory(&args.memory)
        .map_err(|e| ClientError::Usage(format!("--memory {e}")))?;
    let mut env = BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ClientError::Usage(format!("--env {kv:?}: write it as NAME=VALUE")))?;
        env.insert(k.to_string(), v.to_string());
    }
    let bundle = match &args.bundle {
        Some(dir) => {
            let dir = dir.clone();
            let data = tokio::task::spawn_blocking(move || client::pack_dir(&dir))
                .await
                .map_err(|e| ClientError::Usage(e.to_string()))??;
            use base64::Engine;
            Some(base64::engine::general_purpose::STANDARD.encode(data))
        }
        None => None,
    };
    let mut req = SubmitRequest {
        argv: args.argv,
        env,
        jobtag: args.jobtag,
        resources: Resources {
            cores: args.cores,
            memory_bytes,
            walltime_seconds: args.walltime,
        },
        outputs: args.outputs,
        bundle,
        delegation: args.delegation,
    };
    let c = args.conn.client()?;
    if let Some(p) = &args.proxy {
        let path = proxy_path(Some(p));
        let v = delegate_proxy(&c, &path, args.lifetime, false).await?;
        req.delegation = Some(v.delegation_id);
    }
    let resp = c.submit(&req).await?;
    println!("{}", resp.payload_id);
    Ok(EXIT_OK)
}

fn describe(v: &PayloadView) -> String {
    let mut s = format!("{}\t{}", v.payload_id, v.state);
    if let Some(a) = &v.account {
        s.push_str(&format!("\taccount={a}"));
    }
    if let Some(c) = v.exit_code {
        s.push_str(&format!("\texit={c}"));
    }
    if let Some(sig) = v.signal {
        s.push_str(&format!("\tsignal={sig}"));
    }
    if let Some(c) = &v.denial_class {
        s.push_str(&format!("\tclass={c}"));
    }
    if let Some(r) = &v.reason {
        s.push_str(&format!("\treason={r}"));
    }
    match (v.has_output, v.files_deleted_at) {
        (_, Some(t)) => s.push_str(&format!(
            "\tfiles=deleted {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )),
        (true, None) => s.push_str("\toutput=yes"),
        (false, None) => {}
    }
    if let Some(u) = usage_text(v) {
        s.push_str(&format!("\t{u}"));
    }
    // One line each: the user must see which declared outputs are not in the archive, and why.
    for o in &v.outputs_skipped {
        s.push_str(&format!("\n  output skipped: {o}"));
    }
    s
}

async fn status(
    conn: ConnArgs,
    id: String,
    json: bool,
    wait: Option<u64>,
) -> Result<i32, ClientError> {
    let c = conn.client()?;
    let deadline = wait.map(|w| std::time::Instant::now() + std::time::Duration::from_secs(w));
    let view = loop {
        let v = c.view(&id).await?;
        match deadline {
            Some(d) if !v.state.is_final() => {
                if std::time::Instant::now() >= d {
                    return Err(ClientError::Timeout(format!(
                        "payload {id} is still {} after {} s; wait longer or check again later",
                        v.state,
                        wait.unwrap_or(0)
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            _ => break v,
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).expect("views serialise")
        );
    } else {
        println!("{}", describe(&view));
    }
    Ok(match wait {
        Some(_) if view.state != PayloadState::Done => EXIT_PAYLOAD,
        _ => EXIT_OK,
    })
}

/// Bytes as MiB with one decimal (usage lines are read by people; `--json` has the bytes).
fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The usage part of a status line: `cpu=12.3s mem=100.0MiB peak=120.0MiB usage_at=T`
/// (while the payload runs, from its last heartbeat; after its end the final CPU and peak
/// and the last memory heard), or None when no usage was reported.
fn usage_text(v: &PayloadView) -> Option<String> {
    let at = v.usage_at?;
    let mut parts = Vec::new();
    if let Some(c) = v.cpu_seconds {
        parts.push(format!("cpu={c:.2}s"));
    }
    if let Some(m) = v.memory_bytes_now {
        parts.push(format!("mem={}", mib(m)));
    }
    if let Some(p) = v.peak_memory_bytes {
        parts.push(format!("peak={}", mib(p)));
    }
    parts.push(format!(
        "usage_at={}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ));
    Some(parts.join("\t"))
}

/// The lines `info` prints for an answer.
fn describe_information(v: &InformationView) -> String {
    let Some(a) = &v.answer else {
        return format!("{}\t{}\tno answer yet", v.payload_id, v.state);
    };
    if !a.ok {
        return format!(
            "{}\trefused by the site's helper: {}",
            v.payload_id, a.reason
        );
    }
    let mut s = format!("{}\t{}", v.payload_id, v.state);
    let mut line = |k: &str, val: String| s.push_str(&format!("\n  {k}: {val}"));
    line("pilot", v.pilot_id.clone().unwrap_or_default());
    line("node", v.host.clone().unwrap_or_default());
    if let Some(p) = &a.payload {
        line("account", format!("{} (uid {})", p.account, p.uid));
        if let Some(t) = &p.started_at {
            line("started", t.clone());
        }
        if let Some(u) = &p.usage {
            line("cpu", format!("{:.2} s", u.cpu_seconds));
            line("memory", mib(u.memory_bytes));
            line(
                "peak memory",
                u.peak_memory_bytes
                    .map(mib)
                    .unwrap_or_else(|| "not kept by this kernel (cgroup v2 before 5.19)".into()),
            );
        }
        if let (Some(c), Some(m)) = (p.cores, p.memory_limit_bytes) {
            line("limits", format!("{c} cores, {}", mib(m)));
        }
        if let Some(n) = p.processes {
            line("processes", n.to_string());
        }
        line("main pid", p.pid.to_string());
        line("cgroup", p.cgroup.clone());
    }
    if let Some(t) = v.answered_at {
        line(
            "answered",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
    }
    s
}

/// `info ID`: makes the request, then waits for the pilot to relay the helper's answer. The
/// wait ends early when the payload ends or is lost (its pilot is gone: nobody will answer).
async fn info(
    conn: ConnArgs,
    id: String,
    json: bool,
    wait: Option<u64>,
) -> Result<i32, ClientError> {
    let c = conn.client()?;
    let first = c.request_information(&id).await?;
    let wait = wait.unwrap_or(2 * first.heartbeat_seconds + 10);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut v = first;
    while v.answer.is_none() {
        if v.state.is_final() {
            let gone = if v.state == PayloadState::Lost {
                format!(
                    "its pilot {} on {} is gone",
                    v.pilot_id.as_deref().unwrap_or("?"),
                    v.host.as_deref().unwrap_or("?")
                )
            } else {
                "it ended".to_string()
            };
            return Err(ClientError::Timeout(format!(
                "payload {id} is now {} and the request was not answered: {gone}; `mupilot-server status {id}` shows the last values reported",
                v.state
            )));
        }
        if std::time::Instant::now() >= deadline {
            let last = v
                .updated_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "never".into());
            return Err(ClientError::Timeout(format!(
                "no answer from pilot {} on {} within {wait} s (heartbeats every {} s; its last report: {last}); the pilot may be gone or stopped (the server marks its payloads lost after missed heartbeats), or older than this server; ask again later or wait longer with --wait",
                v.pilot_id.as_deref().unwrap_or("?"),
                v.host.as_deref().unwrap_or("?"),
                v.heartbeat_seconds
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        v = c.information(&id, &v.request_id).await?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("answers serialise")
        );
    } else {
        println!("{}", describe_information(&v));
    }
    Ok(match &v.answer {
        Some(a) if a.ok => EXIT_OK,
        _ => EXIT_RUNTIME,
    })
}
