//! Launch-latency measurements for scripts/bench.sh (a benchmark, not a test).
//!
//! `launch_bench cmd N [--gap-ms G] -- ARGV...`: spawns ARGV N times in sequence (pausing G ms,
//! untimed, before each) and prints one latency per line in microseconds (spawn to reaped exit).
//!
//! `launch_bench mupilot N --socket S --vo-key K --dn DN --vo VO`: the pilot side of mupilot's
//! whole launch path: connects to the helper as the calling (pilot) account, and N times signs
//! an envelope for `true`, sends `launch`, and waits for `exited`; prints one latency per line.
//!
//! `launch_bench hold N SECONDS --socket S --vo-key K --dn DN --vo VO`: keeps N `sleep SECONDS`
//! payloads running through the helper at once; prints `started N` when all run.
//!
//! `launch_bench floor N --uid U --gid G`: the kernel work any launcher that gives `true` the
//! namespaces mupilot gives it cannot avoid, done in this process with no helper program, no
//! cgroup, no scratch, no record and no capability drop: fork, unshare(pid, mount, IPC, UTS),
//! fork (pid 1 of the new namespace), `/` recursively slave, /proc and a tmpfs on /tmp, uid
//! switch, exec; reaped by the parent. Root only. One latency per line (µs).
//!
//! `launch_bench csr N [--gap-ms G] --socket S --vo-key K --dn DN --vo VO`: the helper's part of
//! a delegated launch before the VO server is asked: N times (pausing G ms, untimed, before
//! each) signs an envelope that carries a delegated credential, sends `proxy_request` and waits
//! for the CSR of the key the helper made for it; prints one latency per line (µs). The helper
//! must have a `[grid]` table. A new connection every 60 requests (a connection holds at most
//! 64 keys waiting for their chain).
//!
//! `launch_bench stats FILE...`: reads latencies and prints `name n p50 p99 mean` (µs).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use mupilot::protocol::delegation::{CredentialKind, DelegatedCredential};
use mupilot::protocol::envelope::{EnvelopeBody, Owner, Resources, VoSigningKey, ENVELOPE_VERSION};
use mupilot::protocol::switch_wire::{
    read_frame, write_frame, PilotHello, SwitchEvent, SwitchRequest,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("cmd") => cmd(&args[1..]),
        Some("mupilot") => mupilot_path(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("csr") => csr(&args[1..]),
        Some("floor") => floor(&args[1..]),
        Some("stats") => stats(&args[1..]),
        _ => {
            eprintln!("usage: launch_bench cmd N [--gap-ms G] -- ARGV... | mupilot N --socket S --vo-key K --dn DN --vo VO | hold N SECONDS --socket .. | csr N [--gap-ms G] --socket .. | stats FILE...");
            2
        }
    };
    std::process::exit(code);
}

fn count(arg: Option<&String>) -> usize {
    arg.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("N must be a positive integer"))
}

fn cmd(args: &[String]) -> i32 {
    let n = count(args.first());
    let argv = match args.iter().position(|a| a == "--") {
        Some(i) => &args[i + 1..],
        None => return 2,
    };
    // A pause before each launch (not timed) lets kernel state that fast back-to-back launches
    // share (an RCU grace period already passed) go cold again, as between real payloads.
    let gap = args
        .iter()
        .position(|a| a == "--gap-ms")
        .and_then(|i| args.get(i + 1))
        .and_then(|g| g.parse().ok())
        .map(std::time::Duration::from_millis);
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        if let Some(g) = gap {
            std::thread::sleep(g);
        }
        let t = Instant::now();
        let st = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn");
        let us = t.elapsed().as_secs_f64() * 1e6;
        if !st.success() {
            eprintln!("{argv:?} failed: {st}");
            return 1;
        }
        writeln!(out, "{us:.1}").unwrap();
    }
    0
}

fn floor(args: &[String]) -> i32 {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{execv, fork, setgroups, setresgid, setresuid, ForkResult, Gid, Uid};
    let n = count(args.first());
    let uid = Uid::from_raw(flag(args, "--uid").parse().expect("--uid"));
    let gid = Gid::from_raw(flag(args, "--gid").parse().expect("--gid"));
    let prog = std::ffi::CString::new("/bin/true").unwrap();
    // Runs in the forked children of this single-threaded program; any failure exits 1.
    let isolated = || -> nix::Result<()> {
        unshare(
            CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        )?;
        // SAFETY: the benchmark is single-threaded, so the child may do anything after fork.
        match unsafe { fork() }? {
            ForkResult::Child => {
                let none = None::<&str>;
                mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)?;
                mount(Some("proc"), "/proc", Some("proc"), MsFlags::empty(), none)?;
                mount(Some("tmpfs"), "/tmp", Some("tmpfs"), MsFlags::empty(), none)?;
                setgroups(&[gid])?;
                setresgid(gid, gid, gid)?;
                setresuid(uid, uid, uid)?;
                execv(&prog, &[&prog])?;
                Ok(())
            }
            ForkResult::Parent { child } => match waitpid(child, None)? {
                WaitStatus::Exited(_, 0) => Ok(()),
                _ => Err(nix::errno::Errno::ECHILD),
            },
        }
    };
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: as above.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = i32::from(isolated().is_err());
                // SAFETY: _exit skips the parent's atexit handlers and buffered stdout.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => {}
                other => {
                    eprintln!("floor launch failed: {other:?}");
                    return 1;
                }
            },
        }
        writeln!(out, "{:.1}", t.elapsed().as_secs_f64() * 1e6).unwrap();
    }
    0
}

fn flag(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| panic!("missing {name}"))
}

fn mupilot_path(args: &[String]) -> i32 {
    let n = count(args.first());
    let socket = PathBuf::from(flag(args, "--socket"));
    let key = VoSigningKey::from_pem_file(&PathBuf::from(flag(args, "--vo-key"))).expect("VO key");
    let dn = flag(args, "--dn");
    let vo = flag(args, "--vo");
    let mut stream = connect(&socket);
    // The payload's stdout/stderr: one pipe we drain nowhere (`true` writes nothing).
    let (_r, w) = nix::unistd::pipe().unwrap();
    let mut out = std::io::stdout().lock();
    let run = std::process::id();
    for i in 0..n {
        let body = envelope_body(&dn, &vo, &format!("bench-{run}-{i}"), &["true"], 60);
        let envelope = key.sign(&body);
        let t = Instant::now();
        let req = SwitchRequest::Launch {
            envelope,
            bundle_fd: None,
        };
        write_frame(&mut stream, &req, &[w.as_raw_fd(), w.as_raw_fd()]).unwrap();
        loop {
            let (ev, _): (SwitchEvent, _) = read_frame(&mut stream).expect("helper answers");
            match ev {
                SwitchEvent::Exited { report, .. } => {
                    if report.exit_code != Some(0) {
                        eprintln!("payload failed: {report:?}");
                        return 1;
                    }
                    break;
                }
                SwitchEvent::Denied { reason, .. } => {
                    eprintln!("denied: {reason}");
                    return 1;
                }
                SwitchEvent::Error { reason } => {
                    eprintln!("error: {reason}");
                    return 1;
                }
                _ => {}
            }
        }
        writeln!(out, "{:.1}", t.elapsed().as_secs_f64() * 1e6).unwrap();
    }
    0
}

fn csr(args: &[String]) -> i32 {
    let n = count(args.first());
    let gap = args
        .iter()
        .position(|a| a == "--gap-ms")
        .map_or(0, |i| count(args.get(i + 1)) as u64);
    let socket = PathBuf::from(flag(args, "--socket"));
    let key = VoSigningKey::from_pem_file(&PathBuf::from(flag(args, "--vo-key"))).expect("VO key");
    let dn = flag(args, "--dn");
    let vo = flag(args, "--vo");
    let mut out = std::io::stdout().lock();
    let run = std::process::id();
    let mut stream = connect(&socket);
    for i in 0..n {
        if i > 0 && i % 60 == 0 {
            stream = connect(&socket);
        }
        let mut body = envelope_body(&dn, &vo, &format!("csr-{run}-{i}"), &["true"], 60);
        body.credential = Some(DelegatedCredential {
            kind: CredentialKind::X509Proxy,
            not_after: chrono::Utc::now() + chrono::Duration::hours(12),
        });
        let envelope = key.sign(&body);
        std::thread::sleep(std::time::Duration::from_millis(gap));
        let t = Instant::now();
        write_frame(&mut stream, &SwitchRequest::ProxyRequest { envelope }, &[]).unwrap();
        let (ev, _): (SwitchEvent, _) = read_frame(&mut stream).expect("helper answers");
        match ev {
            SwitchEvent::ProxyCsr { .. } => {}
            other => {
                eprintln!("no CSR: {other:?}");
                return 1;
            }
        }
        writeln!(out, "{:.1}", t.elapsed().as_secs_f64() * 1e6).unwrap();
    }
    0
}

/// Connects to the helper and says hello as a pilot.
fn connect(socket: &PathBuf) -> UnixStream {
    let mut stream = UnixStream::connect(socket).expect("connect to the helper");
    let hello = SwitchRequest::Hello(PilotHello {
        pilot_id: pilot_id(),
        ..Default::default()
    });
    write_frame(&mut stream, &hello, &[]).unwrap();
    let (_welcome, _): (SwitchEvent, _) = read_frame(&mut stream).unwrap();
    stream
}

/// This process's pilot id (envelopes are bound to it).
fn pilot_id() -> String {
    format!("bench-{}", std::process::id())
}

/// An envelope body as the VO server would sign it, valid for ten minutes, bound to this node
/// (the helper's default node name, the kernel's host name) and to this pilot.
fn envelope_body(dn: &str, vo: &str, id: &str, argv: &[&str], walltime: u64) -> EnvelopeBody {
    let now = chrono::Utc::now();
    EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: id.to_string(),
        owner: Owner {
            dn: dn.to_string(),
            vo: vo.to_string(),
            fqans: vec![format!("/{vo}")],
            membership_valid_until: now + chrono::Duration::days(30),
        },
        jobtag: Some("bench".into()),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        bundle_sha256: None,
        resources: Resources {
            cores: 1,
            memory_bytes: 64 << 20,
            walltime_seconds: walltime,
        },
        outputs: vec![],
        not_before: now - chrono::Duration::seconds(60),
        not_after: now + chrono::Duration::seconds(540),
        node: nix::unistd::gethostname()
            .expect("host name")
            .into_string()
            .expect("UTF-8 host name"),
        pilot_id: pilot_id(),
        nonce: format!("{:032x}", rand::random::<u128>()),
        issuer: "bench".into(),
        credential: None,
    }
}

/// Launches N `sleep SECONDS` payloads through the helper on one connection, prints `started N`
/// once all run (the script samples the helper then), and waits for every exit.
fn hold(args: &[String]) -> i32 {
    let n = count(args.first());
    let secs: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .expect("SECONDS must be a positive integer");
    let socket = PathBuf::from(flag(args, "--socket"));
    let key = VoSigningKey::from_pem_file(&PathBuf::from(flag(args, "--vo-key"))).expect("VO key");
    let dn = flag(args, "--dn");
    let vo = flag(args, "--vo");
    let mut stream = connect(&socket);
    let (_r, w) = nix::unistd::pipe().unwrap();
    let run = std::process::id();
    let secs_s = secs.to_string();
    for i in 0..n {
        let body = envelope_body(
            &dn,
            &vo,
            &format!("hold-{run}-{i}"),
            &["sleep", &secs_s],
            secs + 60,
        );
        let req = SwitchRequest::Launch {
            envelope: key.sign(&body),
            bundle_fd: None,
        };
        write_frame(&mut stream, &req, &[w.as_raw_fd(), w.as_raw_fd()]).unwrap();
    }
    let (mut started, mut exited) = (0, 0);
    while exited < n {
        let (ev, _): (SwitchEvent, _) = read_frame(&mut stream).expect("helper answers");
        match ev {
            SwitchEvent::Started { .. } => {
                started += 1;
                if started == n {
                    println!("started {n}");
                    std::io::stdout().flush().unwrap();
                }
            }
            SwitchEvent::Exited { .. } => exited += 1,
            SwitchEvent::Denied { reason, .. } => {
                eprintln!("denied: {reason}");
                return 1;
            }
            SwitchEvent::Error { reason } => {
                eprintln!("error: {reason}");
                return 1;
            }
            _ => {}
        }
    }
    0
}

fn stats(files: &[String]) -> i32 {
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let mut v: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if v.is_empty() {
            println!("{f} 0 - - -");
            continue;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let name = std::path::Path::new(f)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        println!(
            "{name} {} {:.0} {:.0} {:.0}",
            v.len(),
            pct(0.5),
            pct(0.99),
            mean
        );
    }
    0
}
