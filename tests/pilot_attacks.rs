//! The pilot account as an adversary of the root helper (run as root, against the real
//! `mupilot-switch serve`, real accounts and cgroups; cgroup v1 here and v2 in the VM through
//! scripts/vm-test-sandbox.sh). Each attack comes with a control showing the same action
//! works where it is allowed, so a refusal really comes from the defence:
//!
//! - pid reuse: a child connects and exits, its pid goes to a process in another cgroup;
//!   the launch is refused as a caller error (both ways of holding the peer: SO_PEERPIDFD and
//!   pidfd_open); the control's payload lands below the connecting process's own cgroup;
//! - frames announcing 200 MiB, idle connections, slow frames: bounded, capped, timed out,
//!   with the helper's RSS below 32 MiB;
//! - the bundle as a descriptor: sealed, within the site's limit, digest checked from it;
//! - the audit flood: a non-pilot's connect/close loop adds a handful of records, every
//!   refusal counted, the chain intact; a uid outside the socket's group gets EACCES.
//!
//! Processes of other uids are forked from this test and make raw system calls only (no
//! allocation after the fork: the test harness is multi-threaded), so no python is needed.

mod switch_support;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mupilot::protocol::switch_wire::{
    sealed_memfd, DenialClass, PilotHello, SwitchEvent, SwitchRequest,
};
use switch_support::common::{layout, memory_root, Layout, TestCgroup};
use switch_support::*;

/// A site whose switch.toml gets `top` keys (before the tables) and a `[limits]` table.
/// Its payloads get a loopback-only network namespace on kernels without Landlock ABI 6
/// (the cgroup-v2 VM's), where the site default would refuse to start: these attacks are on
/// the helper, not on the payloads' IPC.
fn site_with(top: &str, limits: &str) -> Site {
    let site = Site::new();
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[sandbox]\n", "[sandbox]\nipc_fallback = \"loopback\"\n");
    std::fs::write(&site.config, format!("{top}\n{text}\n[limits]\n{limits}\n")).unwrap();
    site
}

fn hello_frame(pilot_id: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&SwitchRequest::Hello(PilotHello {
        pilot_id: pilot_id.into(),
        ..Client::default_hello()
    }))
    .unwrap();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    (
        addr,
        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
    )
}

/// Forks a child that becomes `uid:gid` with `groups` and runs `child` (raw system calls
/// only: no allocation, no locks), then exits with its result. Returns the child's pid.
fn fork_as(uid: u32, gid: u32, groups: &[u32], child: impl FnOnce() -> i32) -> libc::pid_t {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the child only makes raw system calls on memory prepared before the fork and
    // ends with _exit; it allocates nothing and takes no lock.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw id changes of this single-threaded child, then its own code.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                libc::_exit(90);
            }
            libc::_exit(child());
        }
    }
    pid
}

fn wait_pid(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child, status on our stack.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    }
}

/// Child side: connect `fd` to the socket, send `frame`, read one answer frame. No allocation.
fn connect_and_hello(fd: RawFd, addr: &(libc::sockaddr_un, libc::socklen_t), frame: &[u8]) -> i32 {
    // SAFETY: raw calls on our descriptor and on buffers that live for the call.
    unsafe {
        if libc::connect(fd, (&addr.0 as *const libc::sockaddr_un).cast(), addr.1) != 0 {
            return 91;
        }
        if libc::write(fd, frame.as_ptr().cast(), frame.len()) != frame.len() as isize {
            return 92;
        }
        let mut head = [0u8; 4];
        if libc::recv(fd, head.as_mut_ptr().cast(), 4, libc::MSG_WAITALL) != 4 {
            return 93;
        }
        let len = u32::from_be_bytes(head) as usize;
        let mut body = [0u8; 4096];
        if len > body.len()
            || libc::recv(fd, body.as_mut_ptr().cast(), len, libc::MSG_WAITALL) != len as isize
        {
            return 94;
        }
        // `{"type":"welcome"...`
        if &body[..17] != b"{\"type\":\"welcome\"" {
            return 95;
        }
    }
    0
}

fn pilot_ids() -> (u32, u32) {
    (uid_of(PILOT).unwrap(), gid_of(PILOT).unwrap())
}

/// Makes the next process this test spawns get `pid` (through ns_last_pid) and starts it:
/// `sleep 60` as the pilot account. Retries while other processes take the pid first.
fn sleeper_with_pid(pid: libc::pid_t) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = pilot_ids();
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut c = Command::new("sleep")
            .arg("60")
            .uid(uid)
            .gid(gid)
            .spawn()
            .unwrap();
        if c.id() as libc::pid_t == pid {
            return c;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    panic!("could not get pid {pid} back through ns_last_pid");
}

/// The pid-reuse attack against one way of holding the peer (`peer_pidfd`).
fn pid_reuse_is_refused(peer_pidfd: &str) {
    let _u = Users::acquire();
    let site = site_with("", &format!("peer_pidfd = \"{peer_pidfd}\""));
    let _d = site.start();
    let (uid, gid) = pilot_ids();
    let addr = sockaddr(&site.socket);
    let frame = hello_frame("atk-reuse");
    // The socket is made here and shared with the child, which connects it as the pilot,
    // says hello and exits; this process keeps the connection.
    // SAFETY: socket(2) with integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a descriptor socket() just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let child = fork_as(uid, gid, &[], || connect_and_hello(fd, &addr, &frame));
    assert_eq!(wait_pid(child), 0, "the connecting child failed");
    // Its pid goes to a process of the pilot's uid in another cgroup.
    let other = TestCgroup::new(&memory_root(), &format!("mpt-atk-reuse-{peer_pidfd}"));
    let mut victim = sleeper_with_pid(child);
    other.add(child as u32);
    let mut c = Client {
        stream: UnixStream::from(sock),
    };
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = site.body(DN_ALICE, &["/bin/true"]);
    let (_, class, reason) = denied(c.launch(&site.sign(&body), None));
    assert_eq!(class, DenialClass::Caller, "{reason}");
    assert!(
        reason.contains(&format!(
            "the process that connected (pid {child}) has exited"
        )),
        "{reason}"
    );
    assert!(
        other.children().is_empty(),
        "a payload cgroup appeared below the other process's cgroup: {:?}",
        other.children()
    );
    let _ = victim.kill();
    let _ = victim.wait();
    // The denial is audited as a caller error.
    let recs = site.records_of(&body.payload_id);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["denial_class"], "caller");
}

#[test]
fn pid_reuse_after_hello_is_refused_with_so_peerpidfd() {
    pid_reuse_is_refused("auto");
}

#[test]
fn pid_reuse_after_hello_is_refused_with_the_pidfd_open_fallback() {
    pid_reuse_is_refused("pidfd_open");
}

/// A child that connects and exits before its hello: the hello itself is refused.
#[test]
fn hello_from_a_process_that_is_gone_is_refused() {
    let _u = Users::acquire();
    let site = site_with("", "");
    let _d = site.start();
    let (uid, gid) = pilot_ids();
    let addr = sockaddr(&site.socket);
    // SAFETY: socket(2) with integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a descriptor socket() just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let child = fork_as(uid, gid, &[], || {
        // SAFETY: connect on our descriptor with an address prepared before the fork.
        let r = unsafe { libc::connect(fd, (&addr.0 as *const libc::sockaddr_un).cast(), addr.1) };
        if r == 0 {
            0
        } else {
            91
        }
    });
    assert_eq!(wait_pid(child), 0);
    let mut c = Client {
        stream: UnixStream::from(sock),
    };
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match c.call(&SwitchRequest::Hello(Client::default_hello()), &[]) {
        SwitchEvent::Error { reason } => {
            assert!(reason.contains("has exited"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The control of the pid-reuse attack, and the P7 property it protects: the connecting
/// process lives in a cgroup of its own (neither the helper's nor this test's); the payload's
/// cgroup is created below it and the payload's processes are in it. Fails if the helper
/// placed the payload anywhere else (its own cgroup, the test's, the root).
#[test]
fn payloads_land_below_the_connecting_pilots_cgroup() {
    let _u = Users::acquire();
    let site = site_with("", "");
    let _d = site.start();
    let (uid, gid) = pilot_ids();
    let addr = sockaddr(&site.socket);
    let frame = hello_frame("atk-place");
    // SAFETY: socket(2) with integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a descriptor socket() just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // go: this process -> child (connect now); ready: child -> this process (welcomed);
    // hold: the child stays until this process closes it.
    let (go_r, go_w) = nix::unistd::pipe().unwrap();
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    let (hold_r, hold_w) = nix::unistd::pipe().unwrap();
    let (go_r_fd, ready_w_fd, hold_r_fd) =
        (go_r.as_raw_fd(), ready_w.as_raw_fd(), hold_r.as_raw_fd());
    let theirs = [go_w.as_raw_fd(), ready_r.as_raw_fd(), hold_w.as_raw_fd()];
    let child = fork_as(uid, gid, &[], || {
        let mut b = 0u8;
        // SAFETY: closes the child's copies of the test's ends (so closing `hold` in the test
        // is seen here), then reads into a local; raw calls only.
        unsafe {
            for fd in theirs {
                libc::close(fd);
            }
            if libc::read(go_r_fd, (&mut b as *mut u8).cast(), 1) != 1 {
                return 96;
            }
        }
        let r = connect_and_hello(fd, &addr, &frame);
        if r != 0 {
            return r;
        }
        // SAFETY: as above; the second read returns when the test closes the pipe.
        unsafe {
            libc::write(ready_w_fd, (&b as *const u8).cast(), 1);
            libc::read(hold_r_fd, (&mut b as *mut u8).cast(), 1);
        }
        0
    });
    drop(go_r);
    drop(ready_w);
    drop(hold_r);
    let pilot_cg = TestCgroup::new(&memory_root(), "mpt-atk-place");
    pilot_cg.add(child as u32);
    let mut go = std::fs::File::from(go_w);
    go.write_all(b"x").unwrap();
    let mut c = Client {
        stream: UnixStream::from(sock),
    };
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut ready = [0u8; 1];
    std::fs::File::from(ready_r)
        .read_exact(&mut ready)
        .expect("the child was not welcomed");
    let mut body = site.body(DN_ALICE, &["/bin/sh", "-c", "cat /proc/self/cgroup"]);
    // Envelopes are bound to the pilot of their match: this one to the child's hello.
    body.pilot_id = "atk-place".into();
    let out = tempfile::NamedTempFile::new().unwrap();
    let ev = c.call(
        &SwitchRequest::Launch {
            envelope: site.sign(&body),
            bundle_fd: None,
        },
        &[out.as_file().as_raw_fd(), out.as_file().as_raw_fd()],
    );
    let name = format!("mupilot-{}", body.payload_id);
    let cgroup = match ev {
        SwitchEvent::Started { cgroup, .. } => cgroup,
        other => panic!("the control launch failed: {other:?}"),
    };
    assert_eq!(
        PathBuf::from(&cgroup),
        pilot_cg.0.join(&name),
        "payload cgroup"
    );
    match c.recv() {
        SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
    let seen = std::fs::read_to_string(out.path()).unwrap();
    let rel = pilot_cg.0.strip_prefix(memory_root()).unwrap().join(&name);
    let line = if layout() == Layout::V2 {
        format!("0::/{}", rel.display())
    } else {
        format!("memory:/{}", rel.display())
    };
    assert!(
        seen.lines().any(|l| l.ends_with(&line)),
        "payload saw:\n{seen}\nwanted {line}"
    );
    // The helper's and this test's own cgroups are elsewhere.
    for pid in [_d.child.id(), std::process::id()] {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            !own.contains(&format!("mpt-atk-place-{}", std::process::id())),
            "{own}"
        );
    }
    drop(hold_w);
    assert_eq!(wait_pid(child), 0);
    drop(c);
}

/// VmRSS of a process, bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn threads(pid: u32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Reads what is left on a connection the helper closed: its last error, then EOF.
fn closing_error(c: &mut Client) -> String {
    let ev = c.recv();
    let mut rest = Vec::new();
    let _ = c.stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection stayed open");
    match ev {
        SwitchEvent::Error { reason } => reason,
        other => panic!("expected an error, got {other:?}"),
    }
}

const RSS_LIMIT: u64 = 32 << 20;

#[test]
fn frames_announcing_200_mib_are_refused_unallocated() {
    let _u = Users::acquire();
    let site = site_with("", "");
    let d = site.start();
    let mut conns: Vec<Client> = (0..4)
        .map(|_| Client::hello(&site.socket, Client::default_hello()))
        .collect();
    for c in &mut conns {
        c.stream.write_all(&(200u32 << 20).to_be_bytes()).unwrap();
        c.stream.write_all(&[b' '; 64 << 10]).unwrap_or(());
    }
    for c in &mut conns {
        let reason = closing_error(c);
        assert!(
            reason.contains("frame of 209715200 bytes exceeds the limit of 1048576 bytes"),
            "{reason}"
        );
    }
    let r = rss(d.child.id());
    assert!(
        r < RSS_LIMIT,
        "helper RSS {r} bytes after 4 x 200 MiB frames"
    );
    // Control: a request just under the limit is read and answered.
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let mut body = serde_json::to_vec(&SwitchRequest::Status).unwrap();
    body.resize(1000 << 10, b' ');
    c.stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .unwrap();
    c.stream.write_all(&body).unwrap();
    assert_eq!(c.recv(), SwitchEvent::Running { payloads: vec![] });
}

#[test]
fn hello_and_frames_have_deadlines_but_idle_pilots_stay() {
    let _u = Users::acquire();
    let site = site_with("", "hello_timeout_seconds = 2\nframe_timeout_seconds = 2");
    let _d = site.start();
    // No hello at all.
    let t = Instant::now();
    let mut c = Client::connect(&site.socket);
    let reason = closing_error(&mut c);
    assert!(reason.contains("in time"), "{reason}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A hello trickled byte by byte never completes in time.
    let t = Instant::now();
    let mut c = Client::connect(&site.socket);
    for b in hello_frame("atk-slow") {
        if c.stream.write_all(&[b]).is_err() || t.elapsed() > Duration::from_secs(4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let reason = closing_error(&mut c);
    assert!(reason.contains("in time"), "{reason}");
    // After hello: idle longer than the frame deadline is fine (a pilot keeps its connection
    // for its life) ...
    let mut c = Client::hello(&site.socket, Client::default_hello());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.call(&SwitchRequest::Status, &[]),
        SwitchEvent::Running { payloads: vec![] }
    );
    // ... and a frame sent in two parts within the deadline is answered ...
    let body = serde_json::to_vec(&SwitchRequest::Status).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    c.stream.write_all(&frame[..6]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.stream.write_all(&frame[6..]).unwrap();
    assert_eq!(c.recv(), SwitchEvent::Running { payloads: vec![] });
    // ... but one left half-sent is not.
    c.stream.write_all(&frame[..6]).unwrap();
    let t = Instant::now();
    let reason = closing_error(&mut c);
    assert!(
        reason.contains("begun but not completed within 2 s"),
        "{reason}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn connections_are_capped_per_uid_and_idle_ones_cost_little() {
    let _u = Users::acquire();
    let site = site_with("", "max_connections_per_uid = 64\nmax_connections = 128");
    let d = site.start();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let mut c = Client::connect(&site.socket);
        // A refused connection may be closed before this write: its answer is still there.
        let _ = mupilot::protocol::switch_wire::write_frame_to(
            &c.stream,
            &SwitchRequest::Hello(Client::default_hello()),
            &[],
        );
        match c.recv() {
            SwitchEvent::Welcome { .. } => admitted.push(c),
            SwitchEvent::Error { reason } => {
                assert!(reason.contains("max_connections_per_uid"), "{reason}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((admitted.len(), refused), (64, 236));
    let t = threads(d.child.id());
    // One per admitted connection, plus the helper's own (main, accept, anchor, refusals,
    // the record sync thread, the stage pool's refill).
    assert!(t <= 64 + 8, "{t} threads with 64 connections");
    let r = rss(d.child.id());
    assert!(
        r < RSS_LIMIT,
        "helper RSS {r} bytes with 64 idle connections, 236 refused"
    );
    // Control: a freed place is taken again.
    drop(admitted.pop());
    std::thread::sleep(Duration::from_millis(200));
    let _again = Client::hello(&site.socket, Client::default_hello());
    // The refusals were audited aggregated: the first in full, the rest counted later.
    let full = site
        .records()
        .iter()
        .filter(|r| r["event"] == "refused_caller")
        .count();
    assert_eq!(full, 1);
}

/// A tar.gz holding one file.
fn tar_gz(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

fn launch_with(
    c: &mut Client,
    site: &Site,
    body: &mupilot::protocol::EnvelopeBody,
    out: &std::fs::File,
    bundle: RawFd,
) -> SwitchEvent {
    c.call(
        &SwitchRequest::Launch {
            envelope: site.sign(body),
            bundle_fd: Some(2),
        },
        &[out.as_raw_fd(), out.as_raw_fd(), bundle],
    )
}

#[test]
fn bundles_travel_as_sealed_descriptors_within_the_site_limit() {
    let _u = Users::acquire();
    let site = site_with("", "bundle_max_bytes = 1048576");
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let out = tempfile::NamedTempFile::new().unwrap();
    let bundle = tar_gz("input.txt", b"the input");
    let digest = mupilot::protocol::envelope::sha256_hex(&bundle);
    let body = |argv: &[&str]| {
        let mut b = site.body(DN_ALICE, argv);
        b.bundle_sha256 = Some(digest.clone());
        b
    };
    // Control: sealed, within the limit, matching: unpacked for the payload.
    let memfd = sealed_memfd("atk-bundle", &bundle).unwrap();
    match launch_with(
        &mut c,
        &site,
        &body(&["/bin/cat", "input.txt"]),
        out.as_file(),
        memfd.as_raw_fd(),
    ) {
        SwitchEvent::Started { .. } => {}
        other => panic!("{other:?}"),
    }
    match c.recv() {
        SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_to_string(out.path()).unwrap(), "the input");
    // The same bytes in a file the pilot could still change after the check.
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&bundle).unwrap();
    let (_, class, reason) = denied(launch_with(
        &mut c,
        &site,
        &body(&["/bin/true"]),
        out.as_file(),
        f.as_raw_fd(),
    ));
    assert_eq!(class, DenialClass::Caller);
    assert!(reason.contains("not sealed against writing"), "{reason}");
    // Sealed but above the site's limit (its digest matches: the size is what is refused).
    let big = vec![7u8; 2 << 20];
    let mut b = body(&["/bin/true"]);
    b.bundle_sha256 = Some(mupilot::protocol::envelope::sha256_hex(&big));
    let memfd = sealed_memfd("atk-big", &big).unwrap();
    let (_, class, reason) = denied(launch_with(
        &mut c,
        &site,
        &b,
        out.as_file(),
        memfd.as_raw_fd(),
    ));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("exceeds this site's limit of 1048576 bytes"),
        "{reason}"
    );
    // Sealed, but not what the envelope signed: the digest is read from the descriptor.
    let other = sealed_memfd("atk-other", &tar_gz("input.txt", b"other input")).unwrap();
    let (_, class, reason) = denied(launch_with(
        &mut c,
        &site,
        &body(&["/bin/true"]),
        out.as_file(),
        other.as_raw_fd(),
    ));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("does not match the envelope's bundle_sha256"),
        "{reason}"
    );
    // An index that names no descriptor.
    let (_, class, reason) = denied(c.call(
        &SwitchRequest::Launch {
            envelope: site.sign(&body(&["/bin/true"])),
            bundle_fd: Some(5),
        },
        &[],
    ));
    assert_eq!(class, DenialClass::Caller);
    assert!(
        reason.contains("bundle_fd 5 names no descriptor"),
        "{reason}"
    );
}

/// Records in the audit log so far (the helper creates it just after it listens).
fn records_so_far(site: &Site) -> usize {
    if site.audit.exists() {
        site.records().len()
    } else {
        0
    }
}

/// The group of the socket and a uid in it that is no pilot; removed on drop.
struct NonPilot {
    group: &'static str,
    user: &'static str,
}

impl NonPilot {
    fn create() -> NonPilot {
        let np = NonPilot {
            group: "mpt-atk-pilots",
            user: "mpt-atk-np",
        };
        let _ = Command::new("groupadd").arg(np.group).status();
        if uid_of(np.user).is_none() {
            let st = Command::new("useradd")
                .args([
                    "-M",
                    "-N",
                    "-s",
                    "/usr/sbin/nologin",
                    "-G",
                    np.group,
                    np.user,
                ])
                .status()
                .unwrap();
            assert!(st.success());
        }
        np
    }

    fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(self.group)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }
}

impl Drop for NonPilot {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(self.user).status();
        let _ = Command::new("groupdel").arg(self.group).status();
    }
}

/// Child side: connect and close as fast as possible for `secs`; the number of connects that
/// succeeded goes to `report` (8 bytes). No allocation.
fn connect_loop(addr: &(libc::sockaddr_un, libc::socklen_t), secs: i64, report: RawFd) -> i32 {
    let mut n: u64 = 0;
    let mut refused_access = 0u64;
    // SAFETY: raw calls on our own descriptors and locals.
    unsafe {
        let mut start: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut start);
        loop {
            let mut now: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
            if now.tv_sec - start.tv_sec >= secs {
                break;
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return 97;
            }
            if libc::connect(fd, (&addr.0 as *const libc::sockaddr_un).cast(), addr.1) == 0 {
                n += 1;
            } else if *libc::__errno_location() == libc::EACCES {
                refused_access += 1;
            }
            libc::close(fd);
        }
        let both = [n, refused_access];
        libc::write(report, both.as_ptr().cast(), 16);
    }
    0
}

/// Runs [`connect_loop`] as `uid:gid` with `groups`; returns (connects, EACCES refusals).
fn connect_loop_as(site: &Site, uid: u32, gid: u32, groups: &[u32], secs: i64) -> (u64, u64) {
    let addr = sockaddr(&site.socket);
    let (r, w) = nix::unistd::pipe().unwrap();
    let wfd = w.as_raw_fd();
    let child = fork_as(uid, gid, groups, || connect_loop(&addr, secs, wfd));
    drop(w);
    let mut buf = [0u8; 16];
    std::fs::File::from(r).read_exact(&mut buf).unwrap();
    assert_eq!(wait_pid(child), 0);
    (
        u64::from_ne_bytes(buf[..8].try_into().unwrap()),
        u64::from_ne_bytes(buf[8..].try_into().unwrap()),
    )
}

#[test]
fn a_connect_loop_of_a_non_pilot_adds_a_handful_of_records() {
    let _u = Users::acquire();
    let np = NonPilot::create();
    let site = site_with(
        &format!("socket_group = \"{}\"", np.group),
        "refusal_audit_interval_seconds = 4",
    );
    let d = site.start();
    // The socket is the group's, 0660.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&site.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), np.gid());
    let before = records_so_far(&site);
    // In the group, not a pilot: may connect, is refused and audited, aggregated.
    let npu = uid_of(np.user).unwrap();
    let (connects, eacces) = connect_loop_as(&site, npu, np.gid(), &[np.gid()], 10);
    assert_eq!(eacces, 0);
    assert!(connects > 200, "only {connects} connects in 10 s");
    // The helper accepts in order: once a later connection is welcomed, every connect of the
    // loop was accepted and refused. Then stop it: the last summary is written.
    drop(Client::hello(&site.socket, Client::default_hello()));
    assert!(d.stop().is_some_and(|s| s.success()));
    let recs = site.records();
    // The chain's anchor, written at every stop, is no refusal.
    let added: Vec<_> = recs[before..]
        .iter()
        .filter(|r| r["event"] != "anchor")
        .collect();
    assert!(
        added.len() <= 8,
        "{} records for {connects} refused connects: {added:?}",
        added.len()
    );
    let full = added
        .iter()
        .filter(|r| r["event"] == "refused_caller")
        .count() as u64;
    let counted: u64 = added
        .iter()
        .filter(|r| r["event"] == "refused_summary")
        .map(|r| r["refused_count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        full + counted,
        connects,
        "every refusal is counted: {added:?}"
    );
    assert!(added.iter().all(|r| r["pilot_uid"] == npu), "{added:?}");
    let (code, out) = cli(&["audit", "--config", site.config.to_str().unwrap(), "verify"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn outside_the_socket_group_connect_is_eacces_and_a_pilot_in_it_is_served() {
    let _u = Users::acquire();
    let np = NonPilot::create();
    let site = site_with(&format!("socket_group = \"{}\"", np.group), "");
    let _d = site.start();
    let before = records_so_far(&site);
    // nobody, no groups: the kernel refuses the connect; the helper never hears of it.
    let (connects, eacces) = connect_loop_as(&site, 65534, 65534, &[], 1);
    assert_eq!(connects, 0);
    assert!(eacces > 0);
    assert_eq!(records_so_far(&site), before);
    // Control: the pilot account with the socket's group is served.
    let (uid, gid) = pilot_ids();
    let addr = sockaddr(&site.socket);
    let frame = hello_frame("atk-group");
    // SAFETY: socket(2) with integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a descriptor socket() just returned to us.
    let _sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let child = fork_as(uid, gid, &[np.gid()], || {
        connect_and_hello(fd, &addr, &frame)
    });
    assert_eq!(
        wait_pid(child),
        0,
        "the pilot in the socket's group was not welcomed"
    );
}

/// The control of the bundle attacks through the pilot's own client: the bundle the server sent
/// (base64) reaches the real helper as a sealed memfd and is unpacked for the payload.
#[test]
fn the_pilots_client_passes_its_bundle_as_a_sealed_memfd() {
    use base64::Engine;
    use mupilot::pilot::helper_client::{connect, HelperApi, HelperMsg};
    let _u = Users::acquire();
    let site = site_with("", "");
    let _d = site.start();
    let (conn, _welcome, mut rx) = connect(&site.socket, Client::default_hello()).unwrap();
    let bundle = tar_gz("input.txt", b"through the pilot");
    let mut body = site.body(DN_ALICE, &["/bin/cat", "input.txt"]);
    body.bundle_sha256 = Some(mupilot::protocol::envelope::sha256_hex(&bundle));
    let out = tempfile::NamedTempFile::new().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bundle);
    conn.launch(&site.sign(&body), Some(&b64), out.as_file(), out.as_file())
        .unwrap();
    let mut next = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.try_recv() {
                Ok(HelperMsg::Event(ev)) => return ev,
                Ok(other) => panic!("{other:?}"),
                Err(_) => {
                    assert!(Instant::now() < deadline, "no helper event");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    };
    assert!(matches!(next(), SwitchEvent::Started { .. }));
    match next() {
        SwitchEvent::Exited { report, .. } => assert_eq!(report.exit_code, Some(0)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(out.path()).unwrap(),
        "through the pilot"
    );
}
