//! `mupilot-server init DIR`: writes a complete demo VO into one directory: CA, server, pilot
//! and user certificates, the VO signing key, a grid-mapfile, and ready-to-use server.toml,
//! pilot.toml and switch.toml (plus one client toml per demo user).
//!
//! Demo material only. Private keys are written 0600; nothing outside DIR is touched.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::VoSigningKey;

use super::pki::{DemoCa, PkiError};

/// The DC components of every demo DN.
pub const DEMO_DCS: [&str; 2] = ["org", "mupilot-demo"];
/// Demo users; the first two have accounts in the grid-mapfile, carol has none.
pub const DEMO_USERS: [&str; 3] = ["alice", "bob", "carol"];

/// Options of `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub vo: String,
    pub listen: String,
    pub force: bool,
}

/// Why init failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{dir} is not empty; choose an empty or new directory, or pass --force to overwrite the demo files in it")]
    NotEmpty { dir: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("--vo {0:?}: must be 1-64 characters of [A-Za-z0-9._-]")]
    BadVo(String),
    #[error("--listen {0:?}: must be an IP address and port, e.g. 127.0.0.1:8443")]
    BadListen(String),
}

/// The grid DN of a demo identity.
pub fn demo_dn(cn: &str) -> String {
    format!("/DC={}/DC={}/CN={}", DEMO_DCS[0], DEMO_DCS[1], cn)
}

fn write_file(path: &Path, data: &str, mode: u32) -> Result<(), InitError> {
    let err = |source| InitError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Remove first so a --force rerun does not keep an older, wider mode.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn mkdir(path: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|source| InitError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// A TOML basic string (quotes and escapes).
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn qp(p: &Path) -> String {
    q(&p.display().to_string())
}

/// Creates the demo VO in `opts.dir`. Returns the absolute directory.
pub fn run(opts: &InitOptions) -> Result<PathBuf, InitError> {
    if !crate::util::is_safe_id(&opts.vo) {
        return Err(InitError::BadVo(opts.vo.clone()));
    }
    let Ok(listen) = opts.listen.parse::<std::net::SocketAddr>() else {
        return Err(InitError::BadListen(opts.listen.clone()));
    };
    mkdir(&opts.dir)?;
    let non_empty = std::fs::read_dir(&opts.dir)
        .map_err(|source| InitError::Write {
            path: opts.dir.clone(),
            source,
        })?
        .next()
        .is_some();
    if non_empty && !opts.force {
        return Err(InitError::NotEmpty {
            dir: opts.dir.clone(),
        });
    }
    let dir = std::fs::canonicalize(&opts.dir).map_err(|source| InitError::Write {
        path: opts.dir.clone(),
        source,
    })?;
    let d = |name: &str| dir.join(name);

    let ca = DemoCa::new(&DEMO_DCS, "mupilot-demo CA")?;
    write_file(&d("ca.pem"), &ca.cert_pem, 0o644)?;
    write_file(&d("ca.key"), &ca.key_pem, 0o600)?;
    mkdir(&d("certificates"))?;
    write_file(&d("certificates").join("ca.pem"), &ca.cert_pem, 0o644)?;

    let server = ca.issue(&DEMO_DCS, "localhost", &["localhost", "127.0.0.1"], true)?;
    write_file(&d("server.crt"), &server.cert_pem, 0o644)?;
    write_file(&d("server.key"), &server.key_pem, 0o600)?;
    for name in std::iter::once("pilot").chain(DEMO_USERS) {
        let c = ca.issue(&DEMO_DCS, name, &[], false)?;
        write_file(&d(&format!("{name}.crt")), &c.cert_pem, 0o644)?;
        write_file(&d(&format!("{name}.key")), &c.key_pem, 0o600)?;
    }

    let vo_key = VoSigningKey::generate();
    write_file(&d("vo.key"), &vo_key.to_pem(), 0o600)?;
    write_file(&d("vo.pub"), &vo_key.verifying_key().to_pem(), 0o644)?;

    let gridmap = format!(
        "# grid-mapfile written by mupilot-server init: \"DN\" account\n\"{}\" mpu-alice\n\"{}\" mpu-bob\n",
        demo_dn("alice"),
        demo_dn("bob")
    );
    write_file(&d("grid-mapfile"), &gridmap, 0o644)?;

    let mut server_toml = format!(
        "# VO server configuration written by mupilot-server init (demo VO).\n\
         listen = {listen}\n\
         cert = {cert}\n\
         key = {key}\n\
         ca = {ca}\n\
         data_dir = {data}\n\
         vo = {vo}\n\
         signing_key = {sk}\n\
         pilot_dns = [{pilot}]\n\
         operator_dns = []\n\
         envelope_lifetime_seconds = 600\n\
         retention_seconds = 2592000\n",
        listen = q(&opts.listen),
        cert = qp(&d("server.crt")),
        key = qp(&d("server.key")),
        ca = qp(&d("certificates")),
        data = qp(&d("server-data")),
        vo = q(&opts.vo),
        sk = qp(&d("vo.key")),
        pilot = q(&demo_dn("pilot")),
    );
    for user in DEMO_USERS {
        server_toml.push_str(&format!(
            "\n[[member]]\ndn = {}\nfqans = [{}]\n",
            q(&demo_dn(user)),
            q(&format!("/{}", opts.vo))
        ));
    }
    write_file(&d("server.toml"), &server_toml, 0o644)?;

    // Clients cannot connect to the wildcard address, and the server certificate names
    // 127.0.0.1 and localhost only: point them at the loopback address on the same port.
    let url = if listen.ip().is_unspecified() {
        format!("https://127.0.0.1:{}", listen.port())
    } else {
        format!("https://{listen}")
    };
    let pilot_toml = format!(
        "# Pilot configuration written by mupilot-server init (demo VO).\n\
         server_url = {url}\n\
         cert = {cert}\n\
         key = {key}\n\
         ca = {ca}\n\
         switch_socket = {sock}\n\
         work_dir = {work}\n",
        url = q(&url),
        cert = qp(&d("pilot.crt")),
        key = qp(&d("pilot.key")),
        ca = qp(&d("certificates")),
        sock = qp(&d("switch.sock")),
        work = qp(&d("pilot-work")),
    );
    write_file(&d("pilot.toml"), &pilot_toml, 0o644)?;

    let switch_toml = format!(
        "# Site helper configuration written by mupilot-server init (demo VO).\n\
         socket = {sock}\n\
         allowed_pilots = [\"mupilot\"]\n\
         gridmap = {gridmap}\n\
         audit_log = {audit}\n\
         state_dir = {state}\n\
         min_uid = 1000\n\
         \n\
         [[vo]]\n\
         name = {vo}\n\
         public_key = {pubkey}\n\
         \n\
         [sandbox]\n\
         scratch_root = {scratch}\n",
        sock = qp(&d("switch.sock")),
        gridmap = qp(&d("grid-mapfile")),
        audit = qp(&d("audit.jsonl")),
        state = qp(&d("switch-state")),
        vo = q(&opts.vo),
        pubkey = qp(&d("vo.pub")),
        scratch = qp(&d("scratch")),
    );
    write_file(&d("switch.toml"), &switch_toml, 0o644)?;

    for user in DEMO_USERS {
        let client = format!(
            "# Client file for mupilot-server submit/status/output/cancel --config (user {user}).\n\
             server_url = {url}\n\
             cert = {cert}\n\
             key = {key}\n\
             ca = {ca}\n",
            url = q(&url),
            cert = qp(&d(&format!("{user}.crt"))),
            key = qp(&d(&format!("{user}.key"))),
            ca = qp(&d("certificates")),
        );
        write_file(&d(&format!("client-{user}.toml")), &client, 0o644)?;
    }
    Ok(dir)
}
