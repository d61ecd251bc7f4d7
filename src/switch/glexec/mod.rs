//! The gLExec-compatible entry, the helper's half: a `glexec` request from `mupilot-glexec`
//! runs a command as the owner of a proxy the calling pilot holds. In order: the site enabled
//! the entry (`[glexec]`) for this pilot account; the proxy files, passed as descriptors the
//! caller opened, are the caller's and private (as gLExec checked); the client certificate
//! verifies against `[grid]` (CA directory, CRLs, vomsdir) and is of an enabled VO; the caller
//! holds its private key; the source proxy (delivered to the payload) is the same owner's and
//! VO's; then a payload is built from the verified owner and FQANs and goes through the
//! launch path's shared steps (`launch::launch_verified`: bans, policies, mapping, slot,
//! sandbox, start record), its proxy delivered into the scratch directory by the same writer
//! as a delegated proxy (`proxy::deliver`).
//!
//! Never opens a path the caller names, never runs anything before the shared steps said yes.

// Built without grid support the entry only refuses (nothing to verify a proxy with).
#![cfg_attr(not(feature = "grid"), allow(dead_code))]

mod config;

#[cfg(feature = "grid")]
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

pub use config::{GlexecConfig, RawGlexec};

use super::audit::AuditRecord;
use super::daemon::Helper;
use super::launch::{Caller, LaunchError, Started};
use crate::protocol::switch_wire::{DenialClass, GlexecRequest};

/// Largest proxy file read (a proxy with its key and a chain of a few certificates is 5-15 KiB).
pub const MAX_PROXY_BYTES: u64 = 64 << 10;

/// Why a gLExec request did not run. The class becomes gLExec's exit code in the client:
/// caller 201, system 202, authorization 203.
#[derive(Debug, thiserror::Error)]
pub enum GlexecError {
    #[error(
        "the gLExec entry is not enabled on this site (set [glexec] enabled = true in {config})"
    )]
    Disabled { config: String },
    #[cfg(not(feature = "grid"))]
    #[error("this helper was built without grid credential support (cargo feature 'grid'); the gLExec entry needs it")]
    NoGridBuild,
    #[error("the gLExec entry needs the site's [grid] table (CA directory and vomsdir) in {config} to verify proxies")]
    NoGrid { config: String },
    #[error("pilot account uid {uid} may not use the gLExec entry (glexec.pilots in {config})")]
    PilotNotAllowed { uid: u32, config: String },
    #[error("proxy of VO '{vo}': the gLExec entry serves only {allowed} (glexec.vos in {config})")]
    VoNotAllowed {
        vo: String,
        allowed: String,
        config: String,
    },
    #[error("{0}")]
    Request(String),
    #[error("{which}: {reason}")]
    File { which: &'static str, reason: String },
    #[error("{which} refused: {reason}")]
    Credential { which: &'static str, reason: String },
    #[error("{0}")]
    Launch(LaunchError),
}

impl GlexecError {
    /// Who is to blame, as gLExec's exit codes say it.
    pub fn class(&self) -> DenialClass {
        use GlexecError::*;
        match self {
            #[cfg(not(feature = "grid"))]
            NoGridBuild => DenialClass::System,
            Disabled { .. } | NoGrid { .. } => DenialClass::System,
            PilotNotAllowed { .. } | VoNotAllowed { .. } | Credential { .. } => {
                DenialClass::Authorization
            }
            Request(_) | File { .. } => DenialClass::Caller,
            // The command could not be exec'd as the account (missing, not executable, not
            // readable by it): gLExec's client error.
            Launch(LaunchError::SandboxAfterStart(super::sandbox::SandboxError::Setup {
                step,
                ..
            })) if step == "exec" => DenialClass::Caller,
            Launch(e) => e.class(),
        }
    }

    /// True when the audit log already closed this request's start with an end record.
    pub fn recorded_as_end(&self) -> bool {
        matches!(self, GlexecError::Launch(e) if e.recorded_as_end())
    }
}

/// Serves one `glexec` request: checks, verification, then the shared launch steps. `rec` is
/// filled as facts become known, for the caller's denial record.
pub fn run(
    helper: &Helper,
    caller: &Caller,
    req: &GlexecRequest,
    fds: Vec<OwnedFd>,
    rec: &mut AuditRecord,
) -> Result<Started, GlexecError> {
    rec.via = Some("glexec");
    // The process that connected is still there and the caller's (its cgroups are the
    // batch job's the command goes into, P7).
    caller
        .peer
        .check_still_caller()
        .map_err(|e| GlexecError::Launch(LaunchError::Peer(e)))?;
    let config = || helper.cfg.path.display().to_string();
    let cfg = match &helper.cfg.glexec {
        Some(c) if c.enabled => c,
        _ => return Err(GlexecError::Disabled { config: config() }),
    };
    if cfg
        .pilot_uids
        .as_ref()
        .is_some_and(|u| !u.contains(&caller.uid))
    {
        return Err(GlexecError::PilotNotAllowed {
            uid: caller.uid,
            config: config(),
        });
    }
    run_verified(helper, caller, cfg, req, fds, rec)
}

#[cfg(not(feature = "grid"))]
fn run_verified(
    _: &Helper,
    _: &Caller,
    _: &GlexecConfig,
    _: &GlexecRequest,
    _: Vec<OwnedFd>,
    _: &mut AuditRecord,
) -> Result<Started, GlexecError> {
    Err(GlexecError::NoGridBuild)
}

#[cfg(feature = "grid")]
fn run_verified(
    helper: &Helper,
    caller: &Caller,
    cfg: &GlexecConfig,
    req: &GlexecRequest,
    fds: Vec<OwnedFd>,
    rec: &mut AuditRecord,
) -> Result<Started, GlexecError> {
    use chrono::Utc;

    let Some(verifier) = helper.verifier.as_ref() else {
        return Err(GlexecError::NoGrid {
            config: helper.cfg.path.display().to_string(),
        });
    };
    let mut fds = Descriptors::new(fds, req)?;
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(GlexecError::Request(
            "no command given; call it as: mupilot-glexec COMMAND [ARGUMENTS]".into(),
        ));
    }
    rec.argv_sha256 = Some(super::audit::argv_sha256(&req.argv));

    // The client certificate: the caller's own private file, a proxy that verifies, of an
    // enabled VO, and the caller holds its key.
    let now = Utc::now();
    const CLIENT: &str = "GLEXEC_CLIENT_CERT";
    const SOURCE: &str = "GLEXEC_SOURCE_PROXY";
    let client_pem = read_private_file(&fds.client_cert, CLIENT, caller.uid)?;
    let cred = verifier
        .verify(&client_pem, &crate::grid::Claim::default(), now)
        .map_err(|e| GlexecError::Credential {
            which: CLIENT,
            reason: e.to_string(),
        })?;
    rec.owner_dn = Some(cred.owner_dn.clone());
    rec.vo = Some(cred.vo.clone());
    rec.fqans = Some(cred.fqans.clone());
    rec.proxy_sha256 = Some(cred.digest.clone());
    if !cfg.vos.contains(&cred.vo) {
        return Err(GlexecError::VoNotAllowed {
            vo: cred.vo.clone(),
            allowed: cfg.vos.iter().cloned().collect::<Vec<_>>().join(", "),
            config: helper.cfg.path.display().to_string(),
        });
    }
    crate::grid::possession::check(&client_pem).map_err(|e| GlexecError::File {
        which: CLIENT,
        reason: e.to_string(),
    })?;
    // The proxy the payload gets: the same owner's, of the same VO, with its key.
    let (source_pem, source) = match fds.source_proxy.take() {
        None => (client_pem, cred.clone()),
        Some(fd) => {
            let pem = read_private_file(&fd, SOURCE, caller.uid)?;
            let source = verifier
                .verify(
                    &pem,
                    &crate::grid::Claim::owner(&cred.owner_dn, &cred.vo),
                    now,
                )
                .map_err(|e| GlexecError::Credential {
                    which: SOURCE,
                    reason: e.to_string(),
                })?;
            crate::grid::possession::check(&pem).map_err(|e| GlexecError::File {
                which: SOURCE,
                reason: e.to_string(),
            })?;
            (pem, source)
        }
    };

    let payload_id = format!("glexec-{:016x}", rand::random::<u64>());
    rec.payload_id = Some(payload_id.clone());
    // Delivered as a delegated proxy is: the decision sees the client certificate's FQANs;
    // the file, its serial and not-after are the source proxy's.
    let delivery = super::proxy::Delivery::verified(source_pem, &source, cred.fqans.clone())
        .for_scratch(
            &helper.cfg.sandbox.scratch_root.join(&payload_id),
            verifier.config(),
        );
    delivery.note(rec);
    let body = crate::protocol::EnvelopeBody {
        version: crate::protocol::envelope::ENVELOPE_VERSION,
        payload_id,
        owner: crate::protocol::envelope::Owner {
            dn: cred.owner_dn.clone(),
            vo: cred.vo.clone(),
            fqans: cred.fqans.clone(),
            // The VO's word on membership is its signed AC, valid as long as the credential.
            membership_valid_until: cred.not_after,
        },
        jobtag: None,
        argv: req.argv.clone(),
        env: payload_env(cfg, &req.env),
        bundle_sha256: None,
        resources: crate::protocol::envelope::Resources {
            cores: cfg.cores,
            memory_bytes: cfg.memory_bytes,
            walltime_seconds: cfg.walltime_seconds,
        },
        outputs: Vec::new(),
        not_before: now,
        not_after: cred.not_after,
        node: helper.cfg.node_name.clone(),
        pilot_id: caller.hello.pilot_id.clone(),
        nonce: String::new(),
        issuer: "glexec".into(),
        credential: None,
    };
    super::launch::launch_verified(
        helper,
        caller,
        super::launch::Verified {
            body: &body,
            bundle: None,
            stdio: [fds.stdin.take(), fds.stdout.take(), fds.stderr.take()],
            nonce: None,
            delivery: Some(delivery),
        },
        now,
        rec,
    )
    .map_err(GlexecError::Launch)
}

/// What reaches the payload of the caller's environment: as gLExec, every `GLEXEC_*` variable
/// (`GLEXEC_ENV` carries a framework's wrapped environment) and `TZ`, plus the names the site
/// lists in `glexec.preserve_env`. Identity variables are the sandbox's own (`HOME`, `USER`,
/// `X509_USER_PROXY`, ...), never the caller's.
#[cfg(feature = "grid")]
fn payload_env(cfg: &GlexecConfig, caller: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    const NEVER: [&str; 5] = ["X509_USER_PROXY", "HOME", "USER", "LOGNAME", "PATH"];
    caller
        .iter()
        .filter(|(k, _)| {
            (k.starts_with("GLEXEC_") || *k == "TZ" || cfg.preserve_env.contains(k))
                && !NEVER.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(feature = "grid")]
/// The request's descriptors by role.
struct Descriptors {
    client_cert: OwnedFd,
    source_proxy: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

#[cfg(feature = "grid")]
impl Descriptors {
    /// Takes each role's descriptor by its index (each index used once) and checks stdin is
    /// readable and stdout/stderr writable pipes or regular files.
    fn new(fds: Vec<OwnedFd>, req: &GlexecRequest) -> Result<Descriptors, GlexecError> {
        let n = fds.len();
        let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: Option<usize>, what: &str| -> Result<Option<OwnedFd>, GlexecError> {
            match i {
                None => Ok(None),
                Some(i) => slots.get_mut(i).and_then(Option::take).map(Some).ok_or_else(|| {
                    GlexecError::Request(format!(
                        "{what} names descriptor {i}, which is not one of the {n} that came or was named twice"
                    ))
                }),
            }
        };
        let client_cert = take(Some(req.client_cert_fd), "client_cert_fd")?
            .expect("Some index gives Some or an error");
        let d = Descriptors {
            client_cert,
            source_proxy: take(req.source_proxy_fd, "source_proxy_fd")?,
            stdin: take(req.stdin_fd, "stdin_fd")?,
            stdout: take(req.stdout_fd, "stdout_fd")?,
            stderr: take(req.stderr_fd, "stderr_fd")?,
        };
        let check = |fd: &Option<OwnedFd>, which: &'static str, writing: bool| match fd {
            None => Ok(()),
            Some(fd) => super::launch::check_stdio_fd(fd, which, writing)
                .map_err(|e| GlexecError::Request(e.to_string())),
        };
        check(&d.stdin, "stdin", false)?;
        check(&d.stdout, "stdout", true)?;
        check(&d.stderr, "stderr", true)?;
        Ok(d)
    }
}

/// Reads a proxy file through the descriptor the caller opened, after gLExec's checks on the
/// open file: a regular file owned by the caller, no access for group or others, at most
/// [`MAX_PROXY_BYTES`]. Read by position (the offset is shared with the caller).
#[cfg(feature = "grid")]
fn read_private_file(fd: &OwnedFd, which: &'static str, uid: u32) -> Result<Vec<u8>, GlexecError> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let bad = |reason: String| GlexecError::File { which, reason };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| bad(format!("fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad("is not a regular file".into()));
    }
    if st.st_uid != uid {
        return Err(bad(format!(
            "is owned by uid {}, not by the calling pilot account (uid {uid}); the caller must own its proxy files, as with gLExec",
            st.st_uid
        )));
    }
    if st.st_mode & 0o7077 != 0 {
        return Err(bad(format!(
            "has mode {:04o}, which lets others read the private key; chmod 600 it",
            st.st_mode & 0o7777
        )));
    }
    if st.st_size as u64 > MAX_PROXY_BYTES {
        return Err(bad(format!(
            "is {} bytes, more than a proxy file's {MAX_PROXY_BYTES}",
            st.st_size
        )));
    }
    let file = std::fs::File::from(fd.try_clone().map_err(|e| bad(format!("dup: {e}")))?);
    let mut out = Vec::new();
    crate::protocol::switch_wire::ReadAt::new(&file)
        .take(MAX_PROXY_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("read: {e}")))?;
    // The caller can still write the file: what was read counts, not what fstat said.
    if out.len() as u64 > MAX_PROXY_BYTES {
        return Err(bad(format!(
            "grew past a proxy file's {MAX_PROXY_BYTES} bytes while it was read"
        )));
    }
    Ok(out)
}

#[cfg(all(test, feature = "grid"))]
mod tests {
    use super::*;

    #[test]
    fn only_what_glexec_kept_reaches_the_payload() {
        let cfg: GlexecConfig = toml::from_str::<RawGlexec>("preserve_env = [\"DIRAC_SITE\"]")
            .unwrap()
            .validate(&[], &[])
            .unwrap();
        let caller: BTreeMap<String, String> = [
            ("GLEXEC_ENV", "wrapped"),
            ("TZ", "UTC"),
            ("DIRAC_SITE", "x"),
            ("SECRET_TOKEN", "no"),
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("X509_USER_PROXY", "/home/pilot/proxy"),
            ("HOME", "/home/pilot"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env = payload_env(&cfg, &caller);
        assert_eq!(
            env.keys().collect::<Vec<_>>(),
            ["DIRAC_SITE", "GLEXEC_ENV", "TZ"]
        );
    }

    #[test]
    fn proxy_files_must_be_the_callers_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"pem").unwrap();
        let me = nix::unistd::getuid().as_raw();
        let open = || OwnedFd::from(std::fs::File::open(f.path()).unwrap());
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private_file(&open(), "X", me).unwrap(), b"pem");
        let e = read_private_file(&open(), "X", me + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not by the calling pilot account"), "{e}");
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_private_file(&open(), "X", me).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        let big = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(big.path(), vec![b'x'; 70_000]).unwrap();
        std::fs::set_permissions(big.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let fd = OwnedFd::from(std::fs::File::open(big.path()).unwrap());
        let e = read_private_file(&fd, "X", me).unwrap_err().to_string();
        assert!(e.contains("70000 bytes"), "{e}");
    }
}
