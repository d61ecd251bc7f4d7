//! `mupilot-switch check-proxy FILE`: verify a proxy file as the helper will before a launch
//! and print what was verified or why it is refused. Reads files only; runs as any user who
//! can read the proxy, the CA directory and the vomsdir.

use std::path::{Path, PathBuf};

use crate::grid::{Claim, GridConfig, Verifier};

use super::cli::{EXIT_DENIED, EXIT_OK, EXIT_USAGE};

/// `check-proxy`'s arguments.
#[derive(clap::Args, Debug)]
pub struct CheckProxyArgs {
    /// The proxy file (PEM: the proxy, its key, the certificates it was delegated from).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Refuse unless the end-entity DN is this (grid form: /DC=org/DC=example/CN=Alice).
    #[arg(long, value_name = "DN")]
    pub owner: Option<String>,
    /// Refuse unless the VOMS AC is of this VO.
    #[arg(long, value_name = "VO")]
    pub vo: Option<String>,
    /// Grid settings as TOML (the keys of switch.toml's grid table: cert_dir, vomsdir,
    /// limited_proxies, max_proxy_lifetime_seconds, max_chain_length, envelope_fqans).
    #[arg(long, value_name = "FILE")]
    pub grid_config: Option<PathBuf>,
    /// The CA directory (default /etc/grid-security/certificates).
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// The vomsdir (default /etc/grid-security/vomsdir).
    #[arg(long, value_name = "DIR")]
    pub vomsdir: Option<PathBuf>,
}

fn load(path: &Path) -> Result<GridConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `check-proxy`; returns 0 verified, 3 refused, 2 bad arguments or unreadable files.
pub fn main(args: &CheckProxyArgs) -> i32 {
    let mut cfg = match args.grid_config.as_deref().map(load).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            eprintln!("mupilot-switch: {e}");
            return EXIT_USAGE;
        }
    };
    if let Some(d) = &args.cert_dir {
        cfg.cert_dir = d.clone();
    }
    if let Some(d) = &args.vomsdir {
        cfg.vomsdir = d.clone();
    }
    let problems = cfg.problems();
    for p in &problems {
        eprintln!("mupilot-switch: {p}");
    }
    if !problems.is_empty() {
        return EXIT_USAGE;
    }
    let pem = match std::fs::read(&args.file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mupilot-switch: {}: {e}", args.file.display());
            return EXIT_USAGE;
        }
    };
    let claim = Claim {
        owner_dn: args.owner.as_deref(),
        vo: args.vo.as_deref(),
    };
    match Verifier::new(cfg).verify(&pem, &claim, chrono::Utc::now()) {
        Ok(c) => {
            println!("{}: verified", args.file.display());
            println!("  owner       {}", c.owner_dn);
            println!("  issuer      {}", c.issuer_dn);
            println!(
                "  proxies     {} (serials {})",
                c.proxy_serials.len(),
                c.proxy_serials.join(", ")
            );
            println!("  limited     {}", if c.limited { "yes" } else { "no" });
            println!("  not after   {}", c.not_after.format("%Y-%m-%dT%H:%M:%SZ"));
            println!("  vo          {} ({})", c.vo, c.voms_uri);
            println!("  fqans       {}", c.fqans.join(", "));
            println!("  ac signer   {}", c.ac_signer);
            println!("  sha256      {}", c.digest);
            EXIT_OK
        }
        Err(refusal) => {
            println!("{}: refused: {refusal}", args.file.display());
            EXIT_DENIED
        }
    }
}
