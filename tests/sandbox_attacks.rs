//! Hostile payloads against the real sandbox (run as root, cgroup v1 and v2): each test runs a
//! payload that attempts one attack, preferably against a concurrently running victim payload,
//! and asserts that the attack failed. Where it helps, a control shows that the same attempt
//! succeeds where it is legitimate (inside the victim itself, or outside the sandbox), so a
//! failure really comes from the sandbox and not from a broken attack.
//!
//! The attacks are made by `examples/attack.rs` (raw system calls, no python/gcc needed, so the
//! cgroup-v2 VM runs them too); `cargo build --all-targets` or `cargo test` builds it.

mod sandbox_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use mupilot::switch::sandbox::{
    self, IpcFallback, LaunchPlan, NetworkMode, Running, SandboxSettings,
};
use sandbox_support::{
    landlock_scopes, plan, run, settings, SandboxProgram, ScratchRoot, TestUser,
};

/// The built attack program: target/<profile>/examples/attack, beside this test's deps dir.
fn built_attack() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/attack")
}

/// The attack program where payloads see it, for one test (removed after it): the build tree
/// may be hidden inside the sandbox (a clone under /tmp).
fn attack(test: &str) -> SandboxProgram {
    SandboxProgram::copy(&built_attack(), &format!("atk-{test}"))
}

/// Starts a payload in the background; the thread returns its stdout and stderr.
fn start(s: &SandboxSettings, p: LaunchPlan) -> (Running, std::thread::JoinHandle<String>) {
    let (w, t) = sandbox_support::capture();
    let w2 = w.try_clone().unwrap();
    let r = sandbox::launch(s, p, Some(w), Some(w2)).expect("launch");
    (r, t)
}

/// Waits until `path` exists (a victim's "ready" marker in its scratch).
fn wait_for(path: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < end, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A victim script ends when the test creates `done` in its scratch (or after 30 s).
const UNTIL_DONE: &str =
    "i=0; while [ ! -e done ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done";

fn release(r: &Running) {
    std::fs::write(r.handle.scratch().join("done"), "").unwrap();
}

fn succeeded(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("SUCCEEDED")).collect()
}

fn failed(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("FAILED")).collect()
}

#[test]
fn ptrace_and_signals_cannot_reach_a_sibling_the_pilot_or_init() {
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-ptrace");
    let s = settings(&root.0);
    let atk = attack("ptrace_and_signals_cannot_reach_a_sibling_the_pilot_or_init");
    let (victim, vt) = start(
        &s,
        plan(
            "atk-ptrace-v",
            &a.account,
            &[
                "sh",
                "-c",
                &format!("touch ready; {UNTIL_DONE}; echo victim-ok"),
            ],
        ),
    );
    wait_for(&victim.handle.scratch().join("ready"));
    let vpid = victim.handle.pid();
    let me = std::process::id();
    // Same account as the victim: only the pid namespace stands between them. The pilot
    // (this test process) is not visible either; pid 1 is the namespace's root init.
    let script = format!(
        "{atk} ptrace {vpid}; {atk} ptrace {me}; {atk} ptrace 1; \
         {atk} kill {vpid}; {atk} kill {me}; {atk} kill 1; \
         sleep 5 & {atk} ptrace $!"
    );
    let (o, out) = run(&s, plan("atk-ptrace", &a.account, &["sh", "-c", &script]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    for pid in [vpid.to_string(), me.to_string()] {
        for what in ["ptrace-attach", "ptrace-seize"] {
            assert!(
                out.contains(&format!("FAILED {what} {pid} ESRCH")),
                "{what} {pid}: {out}"
            );
        }
        for what in ["kill-0", "kill-9"] {
            assert!(
                out.contains(&format!("FAILED {what} {pid} ESRCH")),
                "{what} {pid}: {out}"
            );
        }
    }
    for what in ["ptrace-attach 1", "ptrace-seize 1", "kill-0 1", "kill-9 1"] {
        assert!(
            out.contains(&format!("FAILED {what} EPERM")),
            "{what}: {out}"
        );
    }
    // Control: ptrace of its own child works, so the failures above are the sandbox's doing.
    let own: Vec<&str> = succeeded(&out);
    assert_eq!(own.len(), 2, "only the own child is traceable: {out}");
    assert!(
        own.iter().all(|l| l.starts_with("SUCCEEDED ptrace-")),
        "{out}"
    );
    release(&victim);
    let ov = victim.wait().unwrap();
    assert_eq!(ov.exit_code, Some(0), "the victim was not disturbed");
    assert_eq!(vt.join().unwrap().trim(), "victim-ok");
}

#[test]
fn ipc_objects_of_another_payload_are_out_of_reach() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-ipc");
    let s = settings(&root.0);
    let atk = attack("ipc_objects_of_another_payload_are_out_of_reach");
    let name = format!("mpt-atk-{}", std::process::id());
    let key = 0x4d50_0000 + (std::process::id() as i32 & 0xffff);
    // The victim creates world-accessible objects (mode 0666), so permissions do not protect
    // them: only the payload's IPC and mount namespaces do. It opens them itself as a control.
    let (victim, vt) = start(
        &s,
        plan(
            "atk-ipc-v",
            &a.account,
            &[
                "sh",
                "-c",
                &format!("{atk} ipc-create {name} {key}; {atk} ipc-open {name} {key}; touch ready; {UNTIL_DONE}"),
            ],
        ),
    );
    wait_for(&victim.handle.scratch().join("ready"));
    for (who, acct) in [("b", &b.account), ("a", &a.account)] {
        let (o, out) = run(
            &s,
            plan(
                &format!("atk-ipc-{who}"),
                acct,
                &["sh", "-c", &format!("{atk} ipc-open {name} {key}")],
            ),
        );
        assert_eq!(o.exit_code, Some(0), "{out}");
        assert_eq!(succeeded(&out), Vec::<&str>::new(), "attacker {who}: {out}");
        assert_eq!(failed(&out).len(), 5, "attacker {who}: {out}");
        assert!(
            failed(&out).iter().all(|l| l.ends_with("ENOENT")),
            "attacker {who}: {out}"
        );
    }
    release(&victim);
    let ov = victim.wait().unwrap();
    let vout = vt.join().unwrap();
    assert_eq!(ov.exit_code, Some(0), "{vout}");
    assert_eq!(
        succeeded(&vout).len(),
        9,
        "victim created and opened all: {vout}"
    );
    // Nothing reached the host's namespaces either.
    let host = std::process::Command::new(&*atk)
        .args(["ipc-open", &name, &key.to_string()])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert_eq!(succeeded(&host), Vec::<&str>::new(), "on the host: {host}");
}

#[test]
fn unix_sockets_of_another_payload_are_out_of_reach() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-sock");
    let mut s = settings(&root.0);
    s.network = NetworkMode::Loopback;
    let atk = attack("unix_sockets_of_another_payload_are_out_of_reach");
    let name = format!("mpt-atk-sock-{}", std::process::id());
    let victim_script = format!(
        "{atk} abstract-listen {name} 30 & {atk} unix-listen $HOME/sock 30 & \
         {atk} unix-listen /tmp/sock 30 & sleep 0.5; \
         {atk} abstract-connect {name}; {atk} unix-connect $HOME/sock; {atk} unix-connect /tmp/sock; \
         touch ready; {UNTIL_DONE}"
    );
    let (victim, vt) = start(
        &s,
        plan("atk-sock-v", &a.account, &["sh", "-c", &victim_script]),
    );
    wait_for(&victim.handle.scratch().join("ready"));
    let vscratch = victim.handle.scratch();
    for (who, acct) in [("b", &b.account), ("a", &a.account)] {
        let script = format!(
            "{atk} abstract-connect {name}; {atk} unix-connect {}/sock; {atk} unix-connect /tmp/sock",
            vscratch.display()
        );
        let (o, out) = run(
            &s,
            plan(&format!("atk-sock-{who}"), acct, &["sh", "-c", &script]),
        );
        assert_eq!(o.exit_code, Some(0), "{out}");
        assert_eq!(succeeded(&out), Vec::<&str>::new(), "attacker {who}: {out}");
        assert_eq!(failed(&out).len(), 3, "attacker {who}: {out}");
    }
    release(&victim);
    let ov = victim.wait().unwrap();
    let vout = vt.join().unwrap();
    assert_eq!(ov.exit_code, Some(0), "{vout}");
    // Control: the victim reaches its own sockets.
    assert_eq!(
        succeeded(&vout).len(),
        6,
        "3 listening, 3 connected: {vout}"
    );
}

/// How a connect to an abstract socket bound outside the payload fails under `network =
/// "host"`: Landlock's scope refuses it (EPERM) where the kernel has ABI >= 6; elsewhere the
/// tests' `ipc_fallback = "loopback"` gives each payload a network namespace of its own, and
/// the name does not exist there (ECONNREFUSED).
fn abstract_refusal() -> &'static str {
    if landlock_scopes() {
        "EPERM"
    } else {
        "ECONNREFUSED"
    }
}

#[test]
fn abstract_sockets_of_another_payload_are_out_of_reach_by_default() {
    // The default `network = "host"`: every payload is in the host's network namespace, where
    // abstract socket names are shared; only its Landlock domain (or, on an older kernel, the
    // fallback's network namespace) keeps another payload out.
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-host");
    let s = settings(&root.0);
    assert_eq!(s.network, NetworkMode::Host);
    let atk = attack("abstract_sockets_of_another_payload_are_out_of_reach_by_default");
    let name = format!("mpt-atk-host-{}", std::process::id());
    // Control: a second process of the victim's own payload connects.
    let (victim, vt) = start(
        &s,
        plan(
            "atk-host-v",
            &a.account,
            &[
                "sh",
                "-c",
                &format!(
                    "{atk} abstract-listen {name} 30 & sleep 0.3; {atk} abstract-connect {name}; \
                     touch ready; {UNTIL_DONE}"
                ),
            ],
        ),
    );
    wait_for(&victim.handle.scratch().join("ready"));
    let refusal = abstract_refusal();
    for (who, acct) in [("b", &b.account), ("a", &a.account)] {
        let (o, out) = run(
            &s,
            plan(
                &format!("atk-host-{who}"),
                acct,
                &[&atk, "abstract-connect", &name],
            ),
        );
        assert_eq!(o.exit_code, Some(0), "{out}");
        assert_eq!(
            out.trim(),
            format!("FAILED connect abstract {refusal}"),
            "attacker {who}"
        );
    }
    // Outside every payload (this test: the host's network namespace, no Landlock domain): with
    // scoping the victim's socket is right there, so the refusals above are the scope's doing;
    // with the fallback it lives in the victim's own namespace.
    let host = std::process::Command::new(&*atk)
        .args(["abstract-connect", &name])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    match landlock_scopes() {
        true => assert_eq!(host.trim(), "SUCCEEDED connect abstract"),
        false => assert_eq!(host.trim(), "FAILED connect abstract ECONNREFUSED"),
    }
    release(&victim);
    let ov = victim.wait().unwrap();
    let vout = vt.join().unwrap();
    assert_eq!(ov.exit_code, Some(0), "{vout}");
    assert_eq!(
        succeeded(&vout),
        vec!["SUCCEEDED listen abstract", "SUCCEEDED connect abstract"],
        "the victim reaches its own socket"
    );
}

#[test]
fn signals_cannot_leave_the_payload() {
    // A process of the payload's own account that is in the payload's pid namespace (so the
    // payload sees its pid) but not in its sandbox, as an admin's `nsenter` would start one:
    // neither the pid namespace nor the account check stands between them. The payload's
    // Landlock domain (signal scope) does; without scoping (older kernels) nothing does.
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-signal");
    let s = settings(&root.0);
    let atk = attack("signals_cannot_leave_the_payload");
    // Control first: a process of its own payload (same domain) is signalled.
    let script = format!(
        "touch ready; i=0; while [ ! -e go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
         sleep 30 & {atk} kill $!; {atk} kill $(cat outsider)"
    );
    let (payload, pt) = start(&s, plan("atk-sig", &a.account, &["sh", "-c", &script]));
    let scratch = payload.handle.scratch();
    wait_for(&scratch.join("ready"));
    let mut outsider = std::process::Command::new(&*atk)
        .args(["ns-spawn", &payload.handle.pid().to_string()])
        .args([a.account.uid.to_string(), a.account.gid.to_string()])
        .arg("30")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(outsider.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let inner = line
        .trim()
        .strip_prefix("SPAWNED ")
        .expect(&line)
        .to_owned();
    std::fs::write(scratch.join("outsider"), &inner).unwrap();
    std::fs::write(scratch.join("go"), "").unwrap();
    let o = payload.wait().unwrap();
    let out = pt.join().unwrap();
    assert_eq!(o.exit_code, Some(0), "{out}");
    let kills: Vec<&str> = out.lines().filter(|l| l.contains(" kill-")).collect();
    assert_eq!(kills.len(), 4, "{out}");
    assert!(
        kills[..2].iter().all(|l| l.starts_with("SUCCEEDED")),
        "control: {out}"
    );
    let across = match landlock_scopes() {
        true => [
            format!("FAILED kill-0 {inner} EPERM"),
            format!("FAILED kill-9 {inner} EPERM"),
        ],
        false => [
            format!("SUCCEEDED kill-0 {inner}"),
            format!("SUCCEEDED kill-9 {inner}"),
        ],
    };
    assert_eq!(kills[2..], across, "{out}");
    // The payload's end killed the outsider too (pid 1's kill(-1) reaches its whole namespace).
    outsider.wait().unwrap();
}

#[test]
fn network_host_is_scoped_or_refused_by_default() {
    // ipc_fallback = "refuse": on a kernel with Landlock ABI >= 6 a payload keeps the host's
    // network but cannot reach an abstract socket outside its domain (here one of the
    // pilot's: this test process); without it the sandbox refuses to run payloads at all
    // rather than share abstract sockets, and says why. (The site default is "pasta", a
    // namespace per payload with the node's network: tests/sandbox_netns.rs.)
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-refuse");
    let mut s = settings(&root.0);
    s.ipc_fallback = IpcFallback::Refuse;
    assert_eq!(
        IpcFallback::default(),
        IpcFallback::Pasta,
        "the site default"
    );
    let atk = attack("network_host_is_scoped_or_refused_by_default");
    let name = format!("mpt-atk-pilot-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    if landlock_scopes() {
        let (o, out) = run(
            &s,
            plan("atk-refuse", &a.account, &[&atk, "abstract-connect", &name]),
        );
        assert_eq!(o.exit_code, Some(0), "{out}");
        assert_eq!(out.trim(), "FAILED connect abstract EPERM");
        // Control: from outside any payload the same connect works.
        UnixStream::connect_addr(&addr).unwrap();
    } else {
        let e = sandbox::launch(
            &s,
            plan("atk-refuse", &a.account, &[&atk, "abstract-connect", &name]),
            None,
            None,
        )
        .err()
        .expect("the sandbox refuses network = host without Landlock scoping");
        let e = e.to_string();
        assert!(
            e.contains("sandbox.ipc_fallback")
                && e.contains("Landlock ABI")
                && e.contains("ipc_fallback = \"loopback\""),
            "{e}"
        );
        assert!(
            !root
                .0
                .join(format!("test-sbx-atk-refuse-{}", std::process::id()))
                .exists(),
            "nothing was made for the refused payload"
        );
    }
}

/// A root-owned 0755 directory outside scratch for privileged copies of the attack program.
struct BinDir(PathBuf);

impl BinDir {
    fn new(test: &str) -> BinDir {
        let p = PathBuf::from(format!(
            "/var/lib/mupilot-test-atk-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinDir(p)
    }
}

impl Drop for BinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `argv` outside the sandbox as `account` (setpriv, no capabilities kept): the control
/// that shows a privileged binary does work for an ordinary process.
fn as_user_outside(account: &sandbox::Account, argv: &[&str]) -> String {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", account.uid))
        .arg(format!("--regid={}", account.gid))
        .arg("--clear-groups")
        .args(argv)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn setuid_root_binary_gains_nothing() {
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-suid");
    let s = settings(&root.0);
    let dir = BinDir::new("suid");
    let suid = dir.0.join("attack-suid");
    std::fs::copy(built_attack(), &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let suid = suid.display().to_string();
    let uid = a.account.uid;
    let control = as_user_outside(&a.account, &[&suid, "setuid", "0"]);
    assert!(
        control.contains(&format!("UIDS {uid} 0")),
        "control: {control}"
    );
    assert!(
        control.contains("SUCCEEDED setresuid 0"),
        "control: {control}"
    );
    let (o, out) = run(&s, plan("atk-suid", &a.account, &[&suid, "setuid", "0"]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(out.contains(&format!("UIDS {uid} {uid}")), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("FAILED setresuid 0 EPERM"), "{out}");
    // The system's own setuid-root programs, where present, stay the account too.
    if Path::new("/usr/bin/newgrp").exists() {
        let (_, out) = run(
            &s,
            plan("atk-suid-sys", &a.account, &["/usr/bin/newgrp", "root"]),
        );
        assert!(!out.contains("uid=0"), "{out}");
    }
}

/// Copies the attack program to `bin` with file capabilities: `struct vfs_cap_data` revision 2,
/// permitted = CAP_SETUID (7), with or without the effective flag (what `setcap
/// cap_setuid+ep` / `cap_setuid+p` write), set directly so no libcap tool is needed.
fn with_file_cap(bin: &Path, effective: bool) -> String {
    std::fs::copy(built_attack(), bin).unwrap();
    std::fs::set_permissions(bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut blob = Vec::new();
    blob.extend_from_slice(&(0x0200_0000u32 | u32::from(effective)).to_le_bytes());
    for w in [1u32 << 7, 0, 0, 0] {
        blob.extend_from_slice(&w.to_le_bytes());
    }
    let path = std::ffi::CString::new(bin.display().to_string()).unwrap();
    // SAFETY: path and the attribute name are NUL-terminated; blob is valid for blob.len().
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"security.capability".as_ptr(),
            blob.as_ptr().cast(),
            blob.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    bin.display().to_string()
}

#[test]
fn file_capabilities_gain_nothing() {
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-fcap");
    let s = settings(&root.0);
    let dir = BinDir::new("fcap");
    let ep = with_file_cap(&dir.0.join("attack-cap-ep"), true);
    let p = with_file_cap(&dir.0.join("attack-cap-p"), false);
    // Control: outside the sandbox an ordinary account gains CAP_SETUID and becomes root.
    let control = as_user_outside(&a.account, &[&ep, "setuid", "0"]);
    assert!(
        control.contains("CapPrm:\t0000000000000080") && control.contains("SUCCEEDED setresuid 0"),
        "control: {control}"
    );
    // In the sandbox: with the effective flag the kernel refuses the exec outright (the
    // bounding set is empty, so the file's permitted set cannot be granted); without it the
    // program runs with nothing.
    let script = format!("{ep} setuid 0; echo ep-exit=$?; {p} setuid 0");
    let (o, out) = run(&s, plan("atk-fcap", &a.account, &["sh", "-c", &script]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(out.contains("ep-exit=126"), "{out}");
    assert_eq!(
        out.matches("UIDS ").count(),
        1,
        "only the +p copy ran: {out}"
    );
    assert!(out.contains("CapPrm:\t0000000000000000"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("FAILED setresuid 0 EPERM"), "{out}");
    assert_eq!(succeeded(&out), Vec::<&str>::new(), "{out}");
}

#[test]
fn cgroup_limits_cannot_be_lifted_from_inside() {
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-cg");
    let s = settings(&root.0);
    let atk = attack("cgroup_limits_cannot_be_lifted_from_inside");
    let p = plan(
        "atk-cg",
        &a.account,
        &[
            "sh",
            "-c",
            &format!("{atk} cgroup-escape; touch ready; {UNTIL_DONE}"),
        ],
    );
    let id = p.payload_id.clone();
    let limit = p.memory_bytes;
    let (r, t) = start(&s, p);
    wait_for(&r.handle.scratch().join("ready"));
    let cg = PathBuf::from(r.handle.cgroup());
    let v1 = cg.starts_with("/sys/fs/cgroup/memory");
    let mem = cg.join(if v1 {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    });
    let pids = pids_dir(&r).join("pids.max");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    assert_eq!(read(&mem), limit.to_string(), "{}", mem.display());
    assert_eq!(read(&pids), s.pids_max.to_string(), "{}", pids.display());
    release(&r);
    let o = r.wait().unwrap();
    let out = t.join().unwrap();
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert_eq!(succeeded(&out), Vec::<&str>::new(), "{out}");
    let tries = failed(&out);
    assert!(
        tries.len() >= 10,
        "the cgroup files were reachable and refused: {out}"
    );
    assert!(
        tries.iter().all(|l| ["EACCES", "EPERM", "EROFS", "ENOENT"]
            .iter()
            .any(|e| l.ends_with(e))),
        "{out}"
    );
    // Still in its own cgroup for the controllers that limit it.
    let cgroups: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("CGROUP "))
        .collect();
    let limiting: Vec<&&str> = cgroups
        .iter()
        .filter(|l| {
            if v1 {
                let ctrl = l.split(':').nth(1).unwrap_or("");
                ctrl.split(',').any(|c| c == "memory" || c == "pids")
            } else {
                l.starts_with("0::")
            }
        })
        .collect();
    assert_eq!(limiting.len(), if v1 { 2 } else { 1 }, "{out}");
    assert!(limiting.iter().all(|l| l.ends_with(&id)), "{out}");
}

/// The pids controller's directory of a running payload (v1: its place in the pids
/// hierarchy, which need not mirror the memory one; v2: the unified directory).
fn pids_dir(r: &Running) -> PathBuf {
    let cg = PathBuf::from(r.handle.cgroup());
    if !cg.starts_with("/sys/fs/cgroup/memory") {
        return cg;
    }
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", r.handle.pid())).unwrap();
    let rel = text
        .lines()
        .find_map(|l| {
            let mut it = l.splitn(3, ':');
            it.next();
            let c = it.next()?;
            let p = it.next()?;
            c.split(',').any(|c| c == "pids").then(|| p.to_owned())
        })
        .expect("payload in a pids cgroup");
    Path::new("/sys/fs/cgroup/pids").join(rel.trim_start_matches('/'))
}

#[test]
fn fork_bomb_is_held_by_the_pids_limit() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-fork");
    let mut s = settings(&root.0);
    s.pids_max = 32;
    let atk = attack("fork_bomb_is_held_by_the_pids_limit");
    let mut p = plan("atk-fork", &a.account, &[&atk, "forkbomb"]);
    p.walltime_seconds = 8;
    let t0 = Instant::now();
    let (bomb, bt) = start(&s, p);
    let current = pids_dir(&bomb).join("pids.current");
    let mut peak = 0u64;
    for _ in 0..20 {
        let n: u64 = std::fs::read_to_string(&current)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        peak = peak.max(n);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        (s.pids_max - 4..=s.pids_max).contains(&peak),
        "the bomb fills its pids limit and no more: {peak}"
    );
    // A sibling started while the bomb runs completes normally, and so does the node.
    let sib = plan(
        "atk-fork-sib",
        &b.account,
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sh -c :; done; echo sibling-ok",
        ],
    );
    let (os, sout) = run(&s, sib);
    assert_eq!(os.exit_code, Some(0), "{sout}");
    assert_eq!(sout.trim(), "sibling-ok");
    assert!(current.exists(), "the bomb was still running meanwhile");
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    let o = bomb.wait().unwrap();
    let out = bt.join().unwrap();
    assert_eq!(o.kill_reason.as_deref(), Some("walltime"), "{o:?}");
    assert!(out.contains("FORK-FAILED EAGAIN"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(20), "ended at teardown");
    assert!(!current.exists(), "cgroup removed");
}

#[test]
fn memory_bomb_is_killed_in_its_own_cgroup() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-mem");
    let s = settings(&root.0);
    let atk = attack("memory_bomb_is_killed_in_its_own_cgroup");
    let mut p = plan("atk-mem", &a.account, &[&atk, "membomb"]);
    p.memory_bytes = 64 << 20;
    let (bomb, _bt) = start(&s, p);
    let (os, sout) = run(
        &s,
        plan(
            "atk-mem-sib",
            &b.account,
            &["sh", "-c", "head -c 50000000 /dev/zero | wc -c"],
        ),
    );
    let o = bomb.wait().unwrap();
    assert_eq!(o.kill_reason.as_deref(), Some("oom"), "{o:?}");
    assert!(o.peak_memory_bytes.is_some_and(|p| p <= 64 << 20), "{o:?}");
    assert_eq!(os.exit_code, Some(0), "{sout}");
    assert_eq!(os.kill_reason, None);
    assert_eq!(sout.trim(), "50000000");
}

fn wrote(out: &str, path_line: &str) -> u64 {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.contains(path_line))
        .unwrap_or_else(|| panic!("{path_line}: {out}"));
    lines[i - 1]
        .strip_prefix("WROTE ")
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn filling_tmp_hits_its_limit_and_scratch_stays_private() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-fill");
    let mut s = settings(&root.0);
    s.tmp_size_bytes = 8 << 20;
    let atk = attack("filling_tmp_hits_its_limit_and_scratch_stays_private");
    // Scratch has no quota of its own: 200 MB go through (the batch slot's disk is the limit).
    let script = format!(
        "{atk} fill /tmp/big 1073741824; {atk} fill /dev/shm/big 1073741824; \
         {atk} fill /var/tmp/big 1073741824; {atk} fill $HOME/big 209715200"
    );
    let mut fp = plan("atk-fill", &a.account, &["sh", "-c", &script]);
    // Room for 200 MB of page cache (charged to the payload; on a tmpfs-rooted node, such as
    // the test VM, scratch itself is memory).
    fp.memory_bytes = 512 << 20;
    let (filler, ft) = start(&s, fp);
    let fscratch = filler.handle.scratch();
    let sib = format!(
        "{atk} fill /tmp/small 4194304; {atk} fill $HOME/small 4194304; {atk} fill /dev/shm/small 4194304"
    );
    let (os, sout) = run(&s, plan("atk-fill-sib", &b.account, &["sh", "-c", &sib]));
    assert_eq!(os.exit_code, Some(0), "{sout}");
    assert_eq!(
        succeeded(&sout).len(),
        3,
        "the sibling's own space is intact: {sout}"
    );
    let o = filler.wait().unwrap();
    let out = ft.join().unwrap();
    assert_eq!(o.exit_code, Some(0), "{out}");
    for t in ["/tmp/big", "/dev/shm/big", "/var/tmp/big"] {
        assert!(
            out.contains(&format!("FAILED fill {t} ENOSPC")),
            "{t}: {out}"
        );
        assert!(
            wrote(&out, &format!("fill {t}")) <= s.tmp_size_bytes,
            "{out}"
        );
    }
    let big = format!("SUCCEEDED fill {}/big", fscratch.display());
    assert!(out.contains(&big), "{out}");
    assert_eq!(wrote(&out, &big), 209715200, "{out}");
    assert!(
        !fscratch.exists(),
        "the filled scratch is removed at teardown"
    );
}

#[test]
fn the_pilots_key_is_unreadable() {
    let a = TestUser::get("mpt-atk-a");
    let pilot = TestUser::get("mpt-atk-pilot");
    let root = ScratchRoot::new("atk-key");
    let s = settings(&root.0);
    let dir = BinDir::new("key");
    std::os::unix::fs::chown(&dir.0, Some(pilot.account.uid), Some(pilot.account.gid)).unwrap();
    let key = dir.0.join("pilot.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nmpt-atk-secret\n").unwrap();
    std::os::unix::fs::chown(&key, Some(pilot.account.uid), Some(pilot.account.gid)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let atk = attack("the_pilots_key_is_unreadable");
    let k = key.display();
    let script = format!("{atk} read {k}; {atk} write {k} x; cat {k}; cp {k} mine");
    let (o, out) = run(&s, plan("atk-key", &a.account, &["sh", "-c", &script]));
    assert!(o.exit_code.is_some(), "{out}");
    assert!(out.contains(&format!("FAILED read {k} EACCES")), "{out}");
    assert!(out.contains(&format!("FAILED write {k} EACCES")), "{out}");
    assert!(!out.contains("mpt-atk-secret"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "-----BEGIN PRIVATE KEY-----\nmpt-atk-secret\n"
    );
}

#[test]
fn another_payloads_environment_is_unreadable() {
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-env");
    let s = settings(&root.0);
    let atk = attack("another_payloads_environment_is_unreadable");
    let secret = format!("mpt-atk-secret-{}", std::process::id());
    let own = format!("mpt-atk-own-{}", std::process::id());
    let mut vp = plan(
        "atk-env-v",
        &a.account,
        &["sh", "-c", &format!("touch ready; {UNTIL_DONE}")],
    );
    vp.env.insert("VICTIM_TOKEN".into(), secret.clone());
    let (victim, _vt) = start(&s, vp);
    wait_for(&victim.handle.scratch().join("ready"));
    let vpid = victim.handle.pid();
    let me = std::process::id();
    // Same account as the victim: only the pid namespace hides the victim's /proc entries.
    let mut ap = plan(
        "atk-env",
        &a.account,
        &[
            "sh",
            "-c",
            &format!("{atk} environ-scan {secret} {vpid} {me} 1; {atk} environ-scan {own}"),
        ],
    );
    ap.env.insert("OWN_TOKEN".into(), own.clone());
    let (o, out) = run(&s, ap);
    assert_eq!(o.exit_code, Some(0), "{out}");
    let found: Vec<&str> = succeeded(&out);
    // Control: its own processes' environments are readable and hold its own token.
    assert!(!found.is_empty(), "{out}");
    assert!(
        found.iter().all(|l| l.starts_with("SUCCEEDED secret")),
        "{out}"
    );
    let first_scan: Vec<&str> = out
        .lines()
        .take_while(|l| !l.starts_with("PROCS"))
        .filter(|l| l.starts_with("SUCCEEDED"))
        .collect();
    assert_eq!(
        first_scan,
        Vec::<&str>::new(),
        "victim's secret seen: {out}"
    );
    assert!(
        out.contains(&format!("FAILED read /proc/{vpid}/environ ENOENT")),
        "{out}"
    );
    assert!(
        out.contains(&format!("FAILED read /proc/{me}/environ ENOENT")),
        "{out}"
    );
    assert!(out.contains("FAILED read /proc/1/environ EACCES"), "{out}");
    release(&victim);
    victim.wait().unwrap();
}

/// Gives the calling thread (and so the helper-like stage it spawns) a fresh session keyring
/// named `name`, the way systemd gives one to every system service (KeyringMode=private),
/// and puts a "user" key `desc` = `value` in it. Returns the key's serial.
fn session_keyring_with_key(name: &str, desc: &str, value: &str) -> libc::c_long {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING reads one NUL-terminated string; it changes only the
    // credentials of this thread (the test's own), which end with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            name.as_ptr(),
        )
    };
    assert!(
        rc > 0,
        "join session keyring: {}",
        std::io::Error::last_os_error()
    );
    let desc = std::ffi::CString::new(desc).unwrap();
    // SAFETY: add_key reads two NUL-terminated strings and value.len() bytes of value.
    let key = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            c"user".as_ptr(),
            desc.as_ptr(),
            value.as_ptr(),
            value.len(),
            libc::KEY_SPEC_SESSION_KEYRING as libc::c_long,
        )
    };
    assert!(key > 0, "add_key: {}", std::io::Error::last_os_error());
    key
}

#[test]
fn the_helpers_session_keyring_is_out_of_reach() {
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-keys");
    let s = settings(&root.0);
    let atk = attack("the_helpers_session_keyring_is_out_of_reach");
    let pid = std::process::id();
    let key = session_keyring_with_key(
        &format!("mupilot-test-atk-{pid}"),
        "mpt-atk-helper-secret",
        "helper-secret-value",
    );
    // A payload reading the helper's key, and planting one for the next payload.
    let (o, out) = run(
        &s,
        plan(
            "atk-keys-a",
            &a.account,
            &[
                "sh",
                "-c",
                &format!(
                    "{atk} key-read mpt-atk-helper-secret; {atk} key-add mpt-atk-planted from-a; \
                     {atk} key-read mpt-atk-planted"
                ),
            ],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(!out.contains("helper-secret-value"), "{out}");
    assert!(
        out.contains("FAILED key-search mpt-atk-helper-secret"),
        "{out}"
    );
    // Control: the payload has a working keyring of its own (Kerberos/AFS tokens need one).
    assert!(out.contains("KEY from-a"), "{out}");
    let (o, outb) = run(
        &s,
        plan(
            "atk-keys-b",
            &b.account,
            &[&atk, "key-read", "mpt-atk-planted"],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "{outb}");
    assert!(!outb.contains("from-a"), "{outb}");
    assert!(outb.contains("FAILED key-search mpt-atk-planted"), "{outb}");
    // SAFETY: KEYCTL_INVALIDATE takes the key's serial only.
    unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_INVALIDATE, key) };
}

#[test]
fn world_writable_host_directories_are_not_shared() {
    // /run/lock (/var/lock) is 1777 on Debian-like nodes: without a private mount it would be
    // a drop box between payloads and keep their files after teardown.
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-lock");
    let s = settings(&root.0);
    let name = format!("mpt-atk-lock-{}", std::process::id());
    let dirs = ["/run/lock", "/var/lock", "/tmp", "/var/tmp", "/dev/shm"];
    let plant: String = dirs
        .iter()
        .map(|d| format!("echo planted > {d}/{name} && chmod 644 {d}/{name} && echo WROTE {d}; "))
        .collect();
    let (victim, vt) = start(
        &s,
        plan(
            "atk-lock-v",
            &a.account,
            &["sh", "-c", &format!("{plant} touch ready; {UNTIL_DONE}")],
        ),
    );
    wait_for(&victim.handle.scratch().join("ready"));
    let read: String = dirs
        .iter()
        .map(|d| format!("cat {d}/{name} 2>/dev/null; "))
        .collect();
    let (o, out) = run(&s, plan("atk-lock-b", &b.account, &["sh", "-c", &read]));
    release(&victim);
    let ov = victim.wait().unwrap();
    let vout = vt.join().unwrap();
    // Remove what leaked before asserting, so a failure leaves nothing behind either.
    let left: Vec<PathBuf> = dirs
        .iter()
        .map(|d| Path::new(d).join(&name))
        .filter(|p| p.exists())
        .collect();
    for p in &left {
        let _ = std::fs::remove_file(p);
    }
    assert!(o.exit_code.is_some());
    assert!(!out.contains("planted"), "{out}");
    assert_eq!(left, Vec::<PathBuf>::new(), "left behind on the host");
    // Control: the victim could write in its own private copies.
    assert_eq!(ov.exit_code, Some(0), "{vout}");
    assert!(
        vout.contains("WROTE /tmp") && vout.contains("WROTE /dev/shm"),
        "{vout}"
    );
}

#[test]
fn covering_mounts_cannot_be_lifted_from_a_user_namespace() {
    // With user namespaces allowed (Apptainer), a payload can be "root" of its own user and
    // mount namespaces. The mounts it inherits come locked together from the init's more
    // privileged namespace, so it cannot unmount the private /tmp or the tmpfs over the
    // scratch root to reach the host's /tmp or other payloads' scratch.
    let a = TestUser::get("mpt-atk-a");
    let b = TestUser::get("mpt-atk-b");
    let root = ScratchRoot::new("atk-userns");
    let s = settings(&root.0);
    assert!(s.allow_user_namespaces);
    let atk = attack("covering_mounts_cannot_be_lifted_from_a_user_namespace");
    let marker = PathBuf::from(format!("/tmp/mupilot-test-atk-peek-{}", std::process::id()));
    std::fs::write(&marker, "host").unwrap();
    let vp = plan(
        "atk-userns-v",
        &b.account,
        &["sh", "-c", &format!("touch ready; {UNTIL_DONE}")],
    );
    let vid = vp.payload_id.clone();
    let (victim, _vt) = start(&s, vp);
    wait_for(&victim.handle.scratch().join("ready"));
    let sr = root.0.display().to_string();
    let (o, out) = run(
        &s,
        plan(
            "atk-userns",
            &a.account,
            &[&atk, "userns-peek", &sr, "/tmp", "/var/tmp", "/dev/shm"],
        ),
    );
    release(&victim);
    victim.wait().unwrap();
    let _ = std::fs::remove_file(&marker);
    assert_eq!(o.exit_code, Some(0), "{out}");
    // The route was really open: the namespaces were made and root mapped.
    assert!(
        out.contains("SUCCEEDED unshare user+mount namespace"),
        "{out}"
    );
    assert!(
        out.contains("SUCCEEDED map root in the user namespace"),
        "{out}"
    );
    for p in [sr.as_str(), "/tmp", "/var/tmp", "/dev/shm"] {
        assert!(
            out.contains(&format!("FAILED umount {p} EINVAL")),
            "{p}: {out}"
        );
    }
    assert!(!out.contains(&vid), "the victim's scratch was seen: {out}");
    assert!(
        !out.contains("mupilot-test-atk-peek"),
        "the host's /tmp was seen: {out}"
    );
}

#[test]
fn cgroup_limits_cannot_be_lifted_from_a_user_namespace() {
    // Root of its own user, mount and cgroup namespaces, a payload may mount cgroupfs (the
    // mount's root is its own cgroup). The files there belong to the real root, unmapped in
    // its namespace, so its namespace capabilities do not apply: every write fails.
    let a = TestUser::get("mpt-atk-a");
    let root = ScratchRoot::new("atk-cgns");
    let s = settings(&root.0);
    let atk = attack("cgroup_limits_cannot_be_lifted_from_a_user_namespace");
    let p = plan(
        "atk-cgns",
        &a.account,
        &[
            "sh",
            "-c",
            &format!("{atk} userns-cgroup /tmp/cg; touch ready; {UNTIL_DONE}"),
        ],
    );
    let limit = p.memory_bytes;
    let (r, t) = start(&s, p);
    wait_for(&r.handle.scratch().join("ready"));
    let cg = PathBuf::from(r.handle.cgroup());
    let mem = cg.join(if cg.starts_with("/sys/fs/cgroup/memory") {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    });
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    let (mem_now, pids_now) = (read(&mem), read(&pids_dir(&r).join("pids.max")));
    release(&r);
    let o = r.wait().unwrap();
    let out = t.join().unwrap();
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(
        out.contains("SUCCEEDED unshare user+mount namespace"),
        "{out}"
    );
    assert!(
        out.contains("SUCCEEDED map root in the user namespace"),
        "{out}"
    );
    assert!(!out.contains("SUCCEEDED write"), "{out}");
    assert!(
        out.contains("MOUNTED") && out.contains("FAILED write"),
        "the attack reached cgroup files: {out}"
    );
    assert_eq!(mem_now, limit.to_string(), "{out}");
    assert_eq!(pids_now, s.pids_max.to_string(), "{out}");
}
