//! Payloads in a network namespace of their own with the node's network (`network = "pasta"`,
//! and the default `ipc_fallback` on kernels without Landlock ABI 6), against the real thing
//! (run as root): pasta from the passt package, real accounts, cgroups and namespaces.
//!
//! On this host (Landlock ABI >= 6) the fallback is forced by config (`network = "pasta"`);
//! in the cgroup-v2 VM with Debian 12's kernel (scripts/vm-test-sandbox.sh) the default
//! configuration takes the same path, which `the_default_config_keeps_the_network` shows.

mod sandbox_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mupilot::switch::sandbox::{self, scope, IpcFallback, NetworkMode, Running, SandboxSettings};
use sandbox_support::{
    landlock_scopes, plan, run, settings, SandboxProgram, ScratchRoot, TestUser, Tun,
};

fn pasta_settings(root: &Path) -> SandboxSettings {
    SandboxSettings {
        network: NetworkMode::Pasta,
        ..settings(root)
    }
}

/// The built attack program (examples/attack.rs) where payloads see it.
fn attack(test: &str) -> SandboxProgram {
    let exe = std::env::current_exe().unwrap();
    let built = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/attack");
    SandboxProgram::copy(&built, &format!("net-{test}"))
}

/// A TCP service of the host on 127.0.0.1, listening before the payload starts (pasta
/// forwards the ports the node listens on when it starts); greets one client.
fn host_service() -> (u16, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"hello\n").unwrap();
    });
    (port, t)
}

fn greeting_script(port: u16) -> String {
    format!("exec 3<>/dev/tcp/127.0.0.1/{port} && read -r line <&3 && echo \"got $line\"")
}

/// Processes (host pids) whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let real: u32 = st
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let name = st.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
            (real == uid).then(|| (pid, name.to_owned()))
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(
    s: &SandboxSettings,
    p: sandbox::LaunchPlan,
) -> (Running, std::thread::JoinHandle<String>) {
    let (w, t) = sandbox_support::capture();
    let w2 = w.try_clone().unwrap();
    let r = sandbox::launch(s, p, Some(w), Some(w2)).expect("launch");
    (r, t)
}

const UNTIL_DONE: &str =
    "i=0; while [ ! -e done ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done";

#[test]
fn a_pasta_payload_reaches_a_host_service_from_a_namespace_of_its_own() {
    let _tun = Tun::get();
    // An account of this test only: at the end no process of it may be left anywhere.
    let u = TestUser::get("mpt-net-c");
    let root = ScratchRoot::new("net-pasta");
    let s = pasta_settings(&root.0);
    let (port, server) = host_service();
    let host_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let script = format!(
        "{}; readlink /proc/self/ns/net; touch ready; {UNTIL_DONE}",
        greeting_script(port)
    );
    let (r, t) = start(&s, plan("net-pasta", &u.account, &["bash", "-c", &script]));
    let ready = r.handle.scratch().join("ready");
    wait_until("the payload never got ready", || ready.exists());
    // pasta carries the traffic as the payload's account, in the payload's cgroup.
    let cgroup_pids = r_pids(&r);
    let pasta: Vec<_> = processes_of(u.account.uid)
        .into_iter()
        .filter(|(_, n)| n.starts_with("pasta") || n.starts_with("passt"))
        .collect();
    assert_eq!(pasta.len(), 1, "one pasta as {}: {pasta:?}", u.account.name);
    assert!(
        cgroup_pids.contains(&pasta[0].0),
        "pasta {} in the payload cgroup {cgroup_pids:?}",
        pasta[0].0
    );
    std::fs::write(r.handle.scratch().join("done"), "").unwrap();
    let o = r.wait().unwrap();
    let out = t.join().unwrap();
    server.join().unwrap();
    assert_eq!(o.exit_code, Some(0), "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("got hello"), "{out}");
    let ns = lines.next().unwrap_or_default();
    assert!(ns.starts_with("net:["), "{out}");
    assert_ne!(Path::new(ns), host_netns, "a network namespace of its own");
    // Nothing is left: no process of the account (pasta included), no cgroup.
    wait_until("pasta outlived its payload", || {
        processes_of(u.account.uid).is_empty()
    });
}

fn r_pids(r: &Running) -> Vec<i32> {
    let dir = PathBuf::from(r.handle.cgroup());
    ["cgroup.procs", "tasks"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

#[test]
fn a_pasta_payload_resolves_names_through_the_hosts_resolver() {
    // The payload reads the host's /etc/resolv.conf; pasta carries the queries to the
    // resolver named there. The name is one the host itself resolves (checked first).
    let _tun = Tun::get();
    let u = TestUser::get("mpt-net-a");
    let root = ScratchRoot::new("net-dns");
    let s = pasta_settings(&root.0);
    let name = "deb.debian.org";
    let host = std::process::Command::new("getent")
        .args(["hosts", name])
        .output()
        .unwrap();
    assert!(
        host.status.success(),
        "precondition: this host resolves {name} through /etc/resolv.conf"
    );
    let (o, out) = run(&s, plan("net-dns", &u.account, &["getent", "hosts", name]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(out.trim().ends_with(name), "{out}");
}

#[test]
fn abstract_sockets_of_another_pasta_payload_are_out_of_reach() {
    // Every pasta payload has its own network namespace, where abstract socket names live.
    let _tun = Tun::get();
    let a = TestUser::get("mpt-net-a");
    let b = TestUser::get("mpt-net-b");
    let root = ScratchRoot::new("net-abstract");
    let s = pasta_settings(&root.0);
    let atk = attack("abstract");
    let name = format!("mpt-net-{}", std::process::id());
    // Control: a second process of the victim's own payload connects.
    let (victim, vt) = start(
        &s,
        plan(
            "net-abs-v",
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
    let ready = victim.handle.scratch().join("ready");
    wait_until("the victim never got ready", || ready.exists());
    for (who, acct) in [("b", &b.account), ("a", &a.account)] {
        let (o, out) = run(
            &s,
            plan(
                &format!("net-abs-{who}"),
                acct,
                &[&atk, "abstract-connect", &name],
            ),
        );
        assert_eq!(o.exit_code, Some(0), "{out}");
        assert_eq!(
            out.trim(),
            "FAILED connect abstract ECONNREFUSED",
            "attacker {who}"
        );
    }
    // The host (this test) does not see it either: it lives in the victim's namespace.
    let host = std::process::Command::new(&*atk)
        .args(["abstract-connect", &name])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        "FAILED connect abstract ECONNREFUSED"
    );
    std::fs::write(victim.handle.scratch().join("done"), "").unwrap();
    let ov = victim.wait().unwrap();
    let vout = vt.join().unwrap();
    assert_eq!(ov.exit_code, Some(0), "{vout}");
    assert!(
        vout.contains("SUCCEEDED connect abstract"),
        "control: the victim connects to its own socket: {vout}"
    );
}

#[test]
fn the_default_config_keeps_the_network() {
    // The packaged default: network = "host", ipc_fallback = "pasta". With Landlock ABI 6
    // (this host) payloads share the host's network, scoped; without (Debian 12's kernel in
    // the VM) each gets a namespace connected by pasta. Either way a host service answers.
    let _tun = Tun::get();
    let u = TestUser::get("mpt-net-a");
    let root = ScratchRoot::new("net-default");
    let s = SandboxSettings {
        ipc_fallback: IpcFallback::default(),
        ..settings(&root.0)
    };
    assert_eq!(s.network, NetworkMode::Host);
    let chosen = scope::resolve(s.network, s.ipc_fallback).unwrap();
    match landlock_scopes() {
        true => assert_eq!(chosen.network, NetworkMode::Host),
        false => assert_eq!(chosen.network, NetworkMode::Pasta),
    }
    let (port, server) = host_service();
    let (o, out) = run(
        &s,
        plan(
            "net-default",
            &u.account,
            &["bash", "-c", &greeting_script(port)],
        ),
    );
    server.join().unwrap();
    assert_eq!((o.exit_code, out.trim()), (Some(0), "got hello"), "{out}");
}
