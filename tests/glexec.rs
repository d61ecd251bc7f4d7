//! `mupilot-glexec` against the real `mupilot-switch` daemon, as root: real accounts
//! (`mpt-glx-a` the proxy owner's, `mpt-glx-p` the pilot, `mpt-glx-o` a pilot not allowed to
//! use the entry), real proxies with VOMS ACs from voms-proxy-fake (tests/grid_support), the
//! client run as the pilot account with setpriv. Each of gLExec's exit codes, stdout/stderr
//! and stdin pass-through, exit status and signal propagation, forwarded signals, a killed
//! client, terminals and sockets as stdio, and the audit records.

#![cfg(feature = "grid")]

mod grid_support;
mod switch_support;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use switch_support::{common, Site};

const ALICE: &str = "/DC=org/DC=mupilot-test/CN=Alice";
const BOB: &str = "/DC=org/DC=mupilot-test/CN=Bob";
const ACCT: &str = "mpt-glx-a";
const PILOT: &str = "mpt-glx-p";
const OTHER: &str = "mpt-glx-o";
/// The pool of one account of the lease test (`.mpt-glxq` in the grid-mapfile).
const POOL_ACCT: &str = "mpt-glxq01";
const CLIENT: &str = env!("CARGO_BIN_EXE_mupilot-glexec");

static USERS: Mutex<()> = Mutex::new(());

/// The test accounts, for one test at a time: tests check that no process of an account is
/// left, which another test's commands would make untrue. Removed again when dropped.
struct Users(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Users {
    fn acquire() -> Users {
        let guard = USERS.lock().unwrap_or_else(|p| p.into_inner());
        for u in [ACCT, PILOT, OTHER, POOL_ACCT] {
            common::ensure_account(u);
        }
        Users(guard)
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for u in [ACCT, PILOT, OTHER, POOL_ACCT] {
            common::delete_account(u);
        }
    }
}

/// The PKI of tests/grid_support/make-fixtures.sh, made once per run. The helper (root)
/// reads it; the accounts need not.
fn pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| grid_support::make("glexec-pki"))
}

fn ids(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// A site with `[grid]` (unless `grid` is false) and the given `[glexec]` table, Alice mapped
/// to `mpt-glx-a`, and the pilot's proxy directory (0700, the pilot's).
struct GSite {
    site: Site,
    proxies: PathBuf,
    bans: PathBuf,
}

impl GSite {
    fn new(glexec: &str, grid: bool) -> GSite {
        GSite::build(glexec, grid, "")
    }

    /// As [`GSite::new`], with `authz` lines added to the `[authz]` table.
    fn build(glexec: &str, grid: bool, authz: &str) -> GSite {
        let site = Site::new();
        std::fs::write(&site.gridmap, format!("\"{ALICE}\" {ACCT}\n")).unwrap();
        let bans = site.path("ban_users.db");
        std::fs::write(&bans, "# LCAS ban list\n").unwrap();
        let grid_table = if grid {
            format!(
                "[grid]\ncert_dir = \"{0}/certificates\"\nvomsdir = \"{0}/vomsdir\"\nmax_proxy_lifetime_seconds = 172800\n",
                pki().display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            &site.config,
            format!(
                r#"socket = "run/switch.sock"
allowed_pilots = ["{PILOT}", "{OTHER}"]
gridmap = "grid-mapfile"
audit_log = "log/audit.jsonl"
state_dir = "state"
min_uid = 1000
[[vo]]
name = "atlas"
public_key = "vo.pub"
[[vo]]
name = "cms"
public_key = "vo.pub"
[sandbox]
scratch_root = "{}"
[authz]
ban_users = ["ban_users.db"]
{authz}
{grid_table}
{glexec}
"#,
                site.scratch.path().join("scratch").display()
            ),
        )
        .unwrap();
        let proxies = site.path("proxies");
        std::fs::create_dir(&proxies).unwrap();
        let (uid, gid) = ids(PILOT);
        std::os::unix::fs::chown(&proxies, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&proxies, std::fs::Permissions::from_mode(0o700)).unwrap();
        GSite {
            site,
            proxies,
            bans,
        }
    }

    fn enabled() -> GSite {
        GSite::enabled_with("")
    }

    /// The entry enabled for atlas and the pilot, with `authz` lines in `[authz]`.
    fn enabled_with(authz: &str) -> GSite {
        GSite::build(
            &format!("[glexec]\nenabled = true\nvos = [\"atlas\"]\npilots = [\"{PILOT}\"]\npreserve_env = [\"DIRAC_SITE\"]"),
            true,
            authz,
        )
    }

    /// Writes `bytes` as the pilot's proxy file `name` (0600 unless `mode`).
    fn proxy_bytes(&self, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = self.proxies.join(name);
        std::fs::write(&p, bytes).unwrap();
        let (uid, gid) = ids(PILOT);
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A fixture proxy, as the pilot's.
    fn proxy(&self, fixture: &str) -> PathBuf {
        let bytes = std::fs::read(pki().join("proxies").join(format!("{fixture}.pem"))).unwrap();
        self.proxy_bytes(&format!("{fixture}.pem"), &bytes, 0o600)
    }

    /// `mupilot-glexec ARGV` as `user` with a clean environment plus `env`.
    fn command(&self, user: &str, env: &[(&str, &str)], argv: &[&str]) -> Command {
        let (uid, gid) = ids(user);
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(CLIENT)
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("MUPILOT_SWITCH_SOCKET", &self.site.socket)
            .envs(env.iter().copied());
        c
    }

    fn run(&self, env: &[(&str, &str)], argv: &[&str], stdin: &[u8]) -> Output {
        self.run_as(PILOT, env, argv, stdin)
    }

    /// Runs the client as `user` to its end, within 60 s (killed and a panic after that).
    fn run_as(&self, user: &str, env: &[(&str, &str)], argv: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .command(user, env, argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut w = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        let feed = std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                let _ = r.read_to_end(&mut b);
                b
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "mupilot-glexec {argv:?} still ran after 60 s; stderr: {}",
                    text(&err.join().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        feed.join().unwrap();
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "killed by {:?}; stderr: {}",
            out.status.signal(),
            text(&out.stderr)
        )
    })
}

/// A refused call: exit code `want`, `says` in the reason on stderr, no output of a command.
fn expect(out: Output, want: i32, says: &str) {
    let err = text(&out.stderr);
    assert_eq!(code(&out), want, "{says}: {err}");
    assert!(err.contains(says), "wanted {says:?} in: {err}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
}

/// The good proxy with its private key block removed.
fn without_key(pem: &[u8]) -> Vec<u8> {
    let t = text(pem);
    let mut out = String::new();
    let mut in_key = false;
    for line in t.lines() {
        if line.contains("BEGIN") && line.contains("PRIVATE KEY") {
            in_key = true;
        }
        if !in_key {
            out.push_str(line);
            out.push('\n');
        }
        if line.contains("END") && line.contains("PRIVATE KEY") {
            in_key = false;
        }
    }
    out.into_bytes()
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

/// The private key block of a proxy file.
fn key_of(pem: &[u8]) -> String {
    let t = text(pem);
    let mut out = String::new();
    let mut in_key = false;
    for line in t.lines() {
        if line.contains("BEGIN") && line.contains("PRIVATE KEY") {
            in_key = true;
        }
        if in_key {
            out.push_str(line);
            out.push('\n');
        }
        if line.contains("END") && line.contains("PRIVATE KEY") {
            break;
        }
    }
    assert!(!out.is_empty(), "a key block");
    out
}

#[test]
fn runs_as_the_proxys_owner_with_its_stdio_status_and_proxy() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let cert = good.to_str().unwrap();
    let env = [
        ("GLEXEC_CLIENT_CERT", cert),
        ("GLEXEC_ENV", "wrapped-by-the-framework"),
        ("DIRAC_SITE", "LCG.Test.org"),
        ("PILOT_SECRET", "never-in-the-payload"),
    ];
    let script = r#"id -un; id -u; cat; echo "to stderr" >&2
echo "env:$GLEXEC_ENV:$DIRAC_SITE:${PILOT_SECRET:-unset}:$X509_CERT_DIR"
stat -c "proxy:%a:%U:%n" "$X509_USER_PROXY" | sed "s|:$HOME/|:scratch/|"; sha256sum < "$X509_USER_PROXY"
exit 7"#;
    let out = gs.run(&env, &["/bin/sh", "-c", script], b"from stdin\n");
    assert_eq!(code(&out), 7, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], ACCT, "{stdout}");
    assert_eq!(lines[1], ids(ACCT).0.to_string());
    assert_eq!(lines[2], "from stdin");
    assert_eq!(
        lines[3],
        format!(
            "env:wrapped-by-the-framework:LCG.Test.org:unset:{}/certificates",
            pki().display()
        )
    );
    // One writer and one name for every delivered proxy (proxy::deliver): x509up in scratch.
    assert_eq!(lines[4], format!("proxy:600:{ACCT}:scratch/x509up"));
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&good).unwrap()))
    };
    assert!(lines[5].starts_with(&digest), "{stdout}");
    assert_eq!(text(&out.stderr), "to stderr\n");

    // The command's own 201-204 become 204; other codes pass through.
    for (c, want) in [
        (0, 0),
        (1, 1),
        (126, 126),
        (201, 204),
        (203, 204),
        (204, 204),
    ] {
        let out = gs.run(&env, &["/bin/sh", "-c", &format!("exit {c}")], b"");
        assert_eq!(code(&out), want, "exit {c}: {}", text(&out.stderr));
    }
    // Killed by a signal: the client ends with the same signal.
    let out = gs.run(&env, &["/bin/sh", "-c", "kill -USR1 $$"], b"");
    assert_eq!(out.status.signal(), Some(libc::SIGUSR1), "{:?}", out.status);

    // The audit log: start and end, via glexec, the verified owner, FQANs and proxy digest.
    let recs = gs.site.records();
    let starts: Vec<_> = recs
        .iter()
        .filter(|r| r["via"] == "glexec" && r["event"] == "start")
        .collect();
    assert_eq!(starts.len(), 8, "{recs:#?}");
    let first = starts[0];
    assert_eq!(first["owner_dn"], ALICE);
    assert_eq!(first["vo"], "atlas");
    assert_eq!(first["account"], ACCT);
    assert_eq!(first["proxy_sha256"], digest.as_str());
    // The start record is the proxy's delivery record, as for a delegated proxy.
    assert!(
        first["proxy_serial"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{first}"
    );
    assert!(first["proxy_not_after"].is_string(), "{first}");
    assert!(
        first["fqans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "/atlas"),
        "{first}"
    );
    assert_eq!(first["pilot_uid"], ids(PILOT).0);
    let id = first["payload_id"].as_str().unwrap();
    assert!(id.starts_with("glexec-"), "{id}");
    let end = recs
        .iter()
        .find(|r| r["payload_id"] == id && r["event"] == "end")
        .expect("an end record");
    assert_eq!(end["exit_code"], 7);
    assert_eq!(end["via"], "glexec");
}

#[test]
fn each_refusal_has_glexecs_exit_code_and_a_reason() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let good_bytes = std::fs::read(&good).unwrap();
    let run = |env: &[(&str, &str)], argv: &[&str]| gs.run(env, argv, b"");
    let cert = |p: &Path| p.to_str().unwrap().to_string();
    let with = |p: &Path| vec![("GLEXEC_CLIENT_CERT", cert(p))];

    // 201: the caller must change something.
    expect(run(&[], &["/bin/true"]), 201, "set GLEXEC_CLIENT_CERT");
    let nokey = gs.proxy_bytes("nokey.pem", &without_key(&good_bytes), 0o600);
    expect(
        run(&as_refs(&with(&nokey)), &["/bin/true"]),
        201,
        "holds no private key",
    );
    // The good proxy's chain with the key of another proxy of the same person.
    let other = std::fs::read(pki().join("proxies/other-vo.pem")).unwrap();
    let mixed = text(&without_key(&good_bytes)) + &key_of(&other);
    let mixed = gs.proxy_bytes("mixed.pem", mixed.as_bytes(), 0o600);
    expect(
        run(&as_refs(&with(&mixed)), &["/bin/true"]),
        201,
        "does not belong to the proxy certificate",
    );
    let open = gs.proxy_bytes("open.pem", &good_bytes, 0o644);
    expect(
        run(&as_refs(&with(&open)), &["/bin/true"]),
        201,
        "chmod 600",
    );
    expect(
        run(&as_refs(&with(&good)), &["/nonexistent/program"]),
        201,
        "exec failed: ENOENT",
    );
    // A command the target account cannot read (the pilot's own 0700 script), in a directory
    // it can traverse outside /tmp (the command has a private /tmp).
    let bin = tempfile::Builder::new()
        .prefix("mupilot-test-glx-")
        .tempdir_in("/var/lib")
        .unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = bin.path().join("script.sh");
    std::fs::write(&secret, "#!/bin/sh\necho ran\n").unwrap();
    let (uid, gid) = ids(PILOT);
    std::os::unix::fs::chown(&secret, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    expect(
        run(&as_refs(&with(&good)), &[secret.to_str().unwrap()]),
        201,
        "exec failed: EACCES",
    );
    // An environment beyond what the helper reads (11 variables of 100 kB: one variable may
    // not exceed 128 KiB in an execve).
    let big = "x".repeat(100_000);
    const BIG: [&str; 11] = [
        "GLEXEC_B0",
        "GLEXEC_B1",
        "GLEXEC_B2",
        "GLEXEC_B3",
        "GLEXEC_B4",
        "GLEXEC_B5",
        "GLEXEC_B6",
        "GLEXEC_B7",
        "GLEXEC_B8",
        "GLEXEC_B9",
        "GLEXEC_B10",
    ];
    let good_env = with(&good);
    let mut e = as_refs(&good_env);
    e.extend(BIG.iter().map(|k| (*k, big.as_str())));
    expect(run(&e, &["/bin/true"]), 201, "more than the helper accepts");

    // 203: a local authorization decision.
    for (fixture, says) in [
        ("other-vo", "the gLExec entry serves only atlas"),
        ("limited", "limited proxy refused"),
        ("expired", "expired at"),
        ("unknown-ca", "not in the CA directory"),
        ("rogue-signer", "not in vomsdir/atlas"),
    ] {
        let p = gs.proxy(fixture);
        expect(run(&as_refs(&with(&p)), &["/bin/true"]), 203, says);
    }
    // A source proxy of another VO than the client certificate's.
    let cms = gs.proxy("other-vo");
    let mut e = as_refs(&good_env);
    let cms_s = cert(&cms);
    e.push(("GLEXEC_SOURCE_PROXY", &cms_s));
    expect(run(&e, &["/bin/true"]), 203, "GLEXEC_SOURCE_PROXY refused");
    // A pilot account the entry does not serve.
    let other_dir = gs.site.path("other");
    std::fs::create_dir(&other_dir).unwrap();
    let (ouid, ogid) = ids(OTHER);
    std::os::unix::fs::chown(&other_dir, Some(ouid), Some(ogid)).unwrap();
    let op = other_dir.join("good.pem");
    std::fs::write(&op, &good_bytes).unwrap();
    std::os::unix::fs::chown(&op, Some(ouid), Some(ogid)).unwrap();
    std::fs::set_permissions(&op, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = gs.run_as(OTHER, &as_refs(&with(&op)), &["/bin/true"], b"");
    expect(out, 203, "may not use the gLExec entry");
    // A banned DN (the ban list is followed live).
    std::fs::write(&gs.bans, format!("\"{ALICE}\"\n")).unwrap();
    expect(run(&as_refs(&with(&good)), &["/bin/true"]), 203, "banned");
    std::fs::write(&gs.bans, "").unwrap();
    let ok = run(&as_refs(&with(&good)), &["/bin/true"]);
    assert_eq!(code(&ok), 0, "{}", text(&ok.stderr));

    // 202: the site's side.
    let mut c = gs.command(PILOT, &as_refs(&with(&good)), &["/bin/true"]);
    c.env("MUPILOT_SWITCH_SOCKET", "/nonexistent/switch.sock");
    expect(c.output().unwrap(), 202, "cannot reach the site's helper");

    // Every refusal the helper made is a denial record of the glexec entry, with its class.
    let recs = gs.site.records();
    let denials: Vec<_> = recs
        .iter()
        .filter(|r| r["via"] == "glexec" && r["event"] == "denied")
        .collect();
    // nokey, mixed, open, five refused proxies, the source proxy, the pilot, the ban (no
    // certificate and the oversized request never reached the helper).
    assert_eq!(denials.len(), 11, "{denials:#?}");
    // A command that cannot be exec'd had its start record; an end record closes it.
    let setup_failed = recs
        .iter()
        .filter(|r| {
            r["via"] == "glexec" && r["event"] == "end" && r["kill_reason"] == "setup_failed"
        })
        .count();
    assert_eq!(setup_failed, 2, "{recs:#?}");
    assert!(denials.iter().any(|r| r["denial_class"] == "authorization"
        && r["reason"].as_str().unwrap().contains("banned")));
    assert!(recs.iter().all(|r| r["account"] != PILOT));
}

/// The pilot (or any local user) attacks with proxy files: another person's key or file or
/// proxy, links to what it may not read or what is no file, a FIFO that would block an open,
/// a huge file, none at all. Each gets gLExec's exit code with the reason and nothing runs
/// (control: a link to the pilot's own proxy works, as the file itself would).
#[test]
fn attacks_with_proxy_files_get_glexecs_codes_and_run_nothing() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let good_bytes = std::fs::read(&good).unwrap();
    let bob = gs.proxy("delegable-bob");
    let bob_bytes = std::fs::read(&bob).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let refused = |env: Vec<(&'static str, String)>, want: i32, says: &str| {
        expect(gs.run(&as_refs(&env), &["/bin/id"], b""), want, says)
    };
    let as_client = |p: &Path| vec![("GLEXEC_CLIENT_CERT", s(p))];
    let with_source = |p: &Path| {
        vec![
            ("GLEXEC_CLIENT_CERT", s(&good)),
            ("GLEXEC_SOURCE_PROXY", s(p)),
        ]
    };
    let starts_before = gs
        .site
        .records()
        .iter()
        .filter(|r| r["event"] == "start")
        .count();

    // Alice's chain (public: any TLS peer of hers saw it) with the pilot's key of another
    // person's proxy (Bob's): possession fails.
    let forged = text(&without_key(&good_bytes)) + &key_of(&bob_bytes);
    let forged = gs.proxy_bytes("forged.pem", forged.as_bytes(), 0o600);
    refused(
        as_client(&forged),
        201,
        "does not belong to the proxy certificate",
    );
    // Another person's whole proxy as the payload's: not the client certificate's owner.
    refused(
        with_source(&bob),
        203,
        "GLEXEC_SOURCE_PROXY refused: owner mismatch",
    );
    // Another local user's proxy file, readable by the pilot: not the caller's file.
    let theirs = gs.site.path("theirs.pem");
    std::fs::write(&theirs, &good_bytes).unwrap();
    let (auid, agid) = ids(ACCT);
    std::os::unix::fs::chown(&theirs, Some(auid), Some(agid)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(as_client(&theirs), 201, "not by the calling pilot account");

    // Links in the pilot's own directory, followed with the pilot's rights only.
    let link = |name: &str, to: &Path| {
        let l = gs.proxies.join(name);
        std::os::unix::fs::symlink(to, &l).unwrap();
        l
    };
    let roots = gs.site.path("root-only.pem");
    std::fs::write(&roots, &good_bytes).unwrap();
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
    let to_root = link("to-root.pem", &roots);
    refused(with_source(&to_root), 201, "cannot open: Permission denied");
    let to_theirs = link("to-theirs.pem", &theirs);
    refused(
        with_source(&to_theirs),
        201,
        "GLEXEC_SOURCE_PROXY: is owned by uid",
    );
    let to_zero = link("to-zero.pem", Path::new("/dev/zero"));
    refused(with_source(&to_zero), 201, "is not a regular file");
    let fifo = gs.proxies.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (puid, pgid) = ids(PILOT);
    std::os::unix::fs::chown(&fifo, Some(puid), Some(pgid)).unwrap();
    let to_fifo = link("to-fifo.pem", &fifo);
    refused(with_source(&to_fifo), 201, "is not a regular file");
    refused(
        as_client(&fifo),
        201,
        "GLEXEC_CLIENT_CERT: is not a regular file",
    );

    // A huge (sparse) proxy file is refused by its size, never read.
    let huge = gs.proxy_bytes("huge.pem", b"", 0o600);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    refused(
        as_client(&huge),
        201,
        "is 1073741824 bytes, more than a proxy file's 65536",
    );
    refused(
        with_source(&huge),
        201,
        "GLEXEC_SOURCE_PROXY: is 1073741824 bytes",
    );
    // No proxy, or a name that is not there.
    expect(
        gs.run(&[], &["/bin/id"], b""),
        201,
        "no proxy: set GLEXEC_CLIENT_CERT",
    );
    let missing = gs.proxies.join("missing.pem");
    refused(as_client(&missing), 201, "cannot open");
    // A local user who is no pilot account: the helper will not serve it.
    let out = gs.run_as(ACCT, &as_refs(&as_client(&theirs)), &["/bin/id"], b"");
    expect(out, 203, "is not an allowed pilot account");

    let recs = gs.site.records();
    let starts = recs.iter().filter(|r| r["event"] == "start").count();
    assert_eq!(starts, starts_before, "nothing started: {recs:#?}");
    assert!(recs.iter().all(|r| r["account"] != PILOT));

    // Control: a link to the pilot's own proxy is the proxy.
    let to_good = link("to-good.pem", &good);
    let out = gs.run(
        &as_refs(&with_source(&to_good)),
        &["/bin/sh", "-c", "echo ran"],
        b"",
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\n");
}

#[test]
fn a_site_without_the_entry_or_without_grid_says_so_with_202() {
    let _u = Users::acquire();
    for (glexec, grid, says) in [
        ("", true, "not enabled on this site"),
        (
            "[glexec]\nenabled = false\nvos = [\"atlas\"]",
            true,
            "not enabled on this site",
        ),
        (
            "[glexec]\nenabled = true\nvos = [\"atlas\"]",
            false,
            "needs the site's [grid] table",
        ),
    ] {
        let gs = GSite::new(glexec, grid);
        let _d = gs.site.start();
        let good = gs.proxy("good");
        let out = gs.run(
            &[("GLEXEC_CLIENT_CERT", good.to_str().unwrap())],
            &["/bin/true"],
            b"",
        );
        assert_eq!(code(&out), 202, "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    }
}

/// A running `mupilot-glexec` whose stdout a thread reads into lines, so every wait has a
/// deadline: a test fails, it never hangs. Killed (SIGKILL) and reaped when dropped, so a
/// failing test leaves no client behind (and with it no command: the helper kills that when
/// the connection closes).
struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: String,
    stderr: PathBuf,
}

impl Client {
    fn spawn(gs: &GSite, env: &[(&str, &str)], argv: &[&str]) -> Client {
        static N: AtomicUsize = AtomicUsize::new(0);
        let stderr = gs
            .site
            .path(&format!("client-{}.err", N.fetch_add(1, Ordering::Relaxed)));
        let mut child = gs
            .command(PILOT, env, argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                if l.ok().and_then(|l| tx.send(l).ok()).is_none() {
                    break;
                }
            }
        });
        Client {
            child,
            lines,
            seen: String::new(),
            stderr,
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), s).unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `within` for `line` on the command's stdout.
    fn expect_line(&mut self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                    if l == line {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no {line:?} within {within:?}; stdout: {:?}; stderr: {}",
                    self.seen,
                    self.stderr()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "stdout ended before {line:?}: {:?}; stderr: {}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// The client's exit status within `within`, and the rest of the command's stdout.
    fn finish(&mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "mupilot-glexec still runs after {within:?}; stdout: {:?}; stderr: {}",
                self.seen,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipe ends once the command's processes are gone too.
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push_str(&l);
            self.seen.push('\n');
        }
        (status, self.seen.clone())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's blocked signals (SigBlk of /proc/PID/status) once it is `mupilot-glexec`
/// (not yet setpriv), waiting up to 10 s.
fn blocked_signals(pid: nix::unistd::Pid) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() == "mupilot-glexec" {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let blk = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            if blk != 0 {
                return blk;
            }
        }
        assert!(Instant::now() < deadline, "{pid} never blocked its signals");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn account_processes(user: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-u", user]).output().unwrap();
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// Waits up to 10 s for no process of `user` to be left.
fn no_processes_left(user: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !account_processes(user).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?} of {user} still run",
            account_processes(user)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cgroup directories named for a payload, in every hierarchy (v1 has one per controller).
fn cgroups_of(payload_id: &str) -> Vec<String> {
    let out = Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "12", "-type", "d", "-name"])
        .arg(format!("mupilot-{payload_id}"))
        .output()
        .unwrap();
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// Waits up to 10 s for the payload's scratch directory and cgroups to be gone.
fn no_scratch_or_cgroup_left(scratch: &str, payload_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(scratch).exists() || !cgroups_of(payload_id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: scratch {scratch} ({}), cgroups {:?}",
            Path::new(scratch).exists(),
            cgroups_of(payload_id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The glexec record of `event` (waiting up to 10 s for it), the last one when several.
fn record(gs: &GSite, event: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = gs.site.records();
        if let Some(r) = recs
            .iter()
            .rev()
            .find(|r| r["via"] == "glexec" && r["event"] == event && pred(r))
        {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no {event} record: {recs:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn signals_are_forwarded_and_a_killed_client_leaves_nothing() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let env = [("GLEXEC_CLIENT_CERT", good.to_str().unwrap())];

    // SIGTERM to the client reaches the command, which handles it.
    let mut client = Client::spawn(
        &gs,
        &env,
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    client.expect_line("ready", Duration::from_secs(20));
    client.signal(nix::sys::signal::Signal::SIGTERM);
    let (st, out) = client.finish(Duration::from_secs(20));
    assert_eq!(st.code(), Some(3), "{st:?} {}", client.stderr());
    assert!(out.contains("got TERM"), "{out}");

    // The client killed outright: the helper kills the command.
    let mut client = Client::spawn(&gs, &env, &["/bin/sh", "-c", "echo ready; exec sleep 300"]);
    client.expect_line("ready", Duration::from_secs(20));
    assert!(!account_processes(ACCT).is_empty(), "the command runs");
    client.signal(nix::sys::signal::Signal::SIGKILL);
    client.finish(Duration::from_secs(10));
    no_processes_left(ACCT);
    let end = record(&gs, "end", |r| r["kill_reason"] == "pilot_gone");
    let id = end["payload_id"].as_str().unwrap();
    let start = record(&gs, "start", |r| r["payload_id"] == id);
    no_scratch_or_cgroup_left(start["scratch"].as_str().unwrap(), id);
}

/// A SIGTERM that reaches the client before the helper said `started` (the caller's batch
/// system does not wait for that) is kept until the command runs, then forwarded: the
/// command ends by it and so does the client. Before the fix it stayed queued for good and
/// the command ran on.
#[test]
fn a_sigterm_before_the_command_runs_reaches_it_once_it_does() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let env = [("GLEXEC_CLIENT_CERT", good.to_str().unwrap())];
    for round in 0..3 {
        let mut client = Client::spawn(&gs, &env, &["/bin/sh", "-c", "exec sleep 300"]);
        // As soon as the client holds TERM blocked (its first step), before it even connects.
        let blocked = blocked_signals(client.pid());
        assert_ne!(blocked & (1 << (libc::SIGTERM - 1)), 0, "{blocked:x}");
        let sent = chrono::Utc::now();
        client.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, _) = client.finish(Duration::from_secs(20));
        assert_eq!(
            st.signal(),
            Some(libc::SIGTERM),
            "round {round}: {st:?}; stderr: {}",
            client.stderr()
        );
        // The signal came before the command existed: its start record is later.
        let start = record(&gs, "start", |_| true);
        let started: chrono::DateTime<chrono::Utc> =
            start["time"].as_str().unwrap().parse().unwrap();
        assert!(
            started > sent,
            "round {round}: started {started}, sent {sent}"
        );
        let end = record(&gs, "end", |r| r["payload_id"] == start["payload_id"]);
        assert_eq!(end["signal"], libc::SIGTERM, "{end}");
        no_processes_left(ACCT);
    }
}

/// A killed client in a pool of one account: the helper ends the command and frees the
/// account, so once the lease's TTL passed it goes to the next owner (Bob); while the command
/// ran, Bob was refused (the pool exhausted: 202). Nothing of the payload is left.
#[test]
fn a_killed_client_leaves_no_process_cgroup_scratch_or_busy_account() {
    let _u = Users::acquire();
    let gs = GSite::enabled_with("gridmapdir = \"gridmapdir\"\nlease_ttl_seconds = 1");
    std::fs::write(
        &gs.site.gridmap,
        format!("\"{ALICE}\" .mpt-glxq\n\"{BOB}\" .mpt-glxq\n"),
    )
    .unwrap();
    let gmd = gs.site.path("gridmapdir");
    std::fs::create_dir(&gmd).unwrap();
    std::fs::write(gmd.join(POOL_ACCT), b"").unwrap();
    let _d = gs.site.start();
    let alice = gs.proxy("good");
    let bob = gs.proxy("delegable-bob");

    let mut client = Client::spawn(
        &gs,
        &[("GLEXEC_CLIENT_CERT", alice.to_str().unwrap())],
        &["/bin/sh", "-c", "id -un; echo ready; exec sleep 300"],
    );
    client.expect_line(POOL_ACCT, Duration::from_secs(20));
    client.expect_line("ready", Duration::from_secs(20));
    let start = record(&gs, "start", |r| r["owner_dn"] == ALICE);
    let id = start["payload_id"].as_str().unwrap().to_string();
    let scratch = start["scratch"].as_str().unwrap().to_string();
    assert!(!cgroups_of(&id).is_empty(), "the payload's cgroups exist");
    // Control: the one account is Alice's while her command runs.
    let refused = gs.run(
        &[("GLEXEC_CLIENT_CERT", bob.to_str().unwrap())],
        &["/bin/true"],
        b"",
    );
    assert_eq!(code(&refused), 202, "{}", text(&refused.stderr));

    client.signal(nix::sys::signal::Signal::SIGKILL);
    client.finish(Duration::from_secs(10));
    no_processes_left(POOL_ACCT);
    record(&gs, "end", |r| {
        r["payload_id"] == id.as_str() && r["kill_reason"] == "pilot_gone"
    });
    no_scratch_or_cgroup_left(&scratch, &id);
    // The account is free: after the lease's TTL it goes to Bob.
    std::thread::sleep(Duration::from_millis(1500));
    let out = gs.run(
        &[("GLEXEC_CLIENT_CERT", bob.to_str().unwrap())],
        &["id", "-un"],
        b"",
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), POOL_ACCT);
}

#[test]
fn terminals_and_sockets_reach_the_command_as_pipes() {
    let _u = Users::acquire();
    let gs = GSite::enabled();
    let _d = gs.site.start();
    let good = gs.proxy("good");
    let env = [("GLEXEC_CLIENT_CERT", good.to_str().unwrap())];
    let pty = nix::pty::openpty(None, None).unwrap();
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut child = gs
        .command(
            PILOT,
            &env,
            &[
                "/bin/sh",
                "-c",
                "readlink /proc/self/fd/0 /proc/self/fd/1; echo done",
            ],
        )
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = child.wait().unwrap();
    let mut got = String::new();
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = ours.read_to_string(&mut got);
    assert_eq!(st.code(), Some(0), "{got}");
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 3, "{got}");
    assert!(
        lines[0].starts_with("pipe:["),
        "stdin was a terminal: {got}"
    );
    assert!(lines[1].starts_with("pipe:["), "stdout was a socket: {got}");
    assert_eq!(lines[2], "done");
    drop(pty.master);
}
