//! The payload sandbox against the real kernel (run as root): identity, scratch, namespaces,
//! capabilities, cleanup of leftover processes, limits, outputs, bundle, environment, fds.

mod sandbox_support;

use sandbox_support::common::{memory_root, on_layout, Layout, TestCgroup};
use sandbox_support::{landlock_scopes, plan, run, settings, ScratchRoot, TestUser};

#[test]
fn identity_and_scratch() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("ident");
    let s = settings(&root.0);
    let p = plan(
        "ident",
        &u.account,
        &["sh", "-c", "id -u; id -G; pwd; stat -c '%a %u %g' ."],
    );
    let scratch = root.0.join(&p.payload_id);
    let (o, out) = run(&s, p);
    assert_eq!(o.exit_code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], u.account.uid.to_string(), "{out}");
    let mut want: Vec<u32> = u.account.groups.clone();
    want.push(u.account.gid);
    let got: Vec<u32> = lines[1]
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(got[0], u.account.gid);
    let (mut a, mut b) = (got.clone(), want.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(lines[2], scratch.display().to_string());
    assert_eq!(lines[3], format!("700 {} {}", u.account.uid, u.account.gid));
    assert!(!scratch.exists(), "scratch removed after wait");
}

#[test]
fn payloads_cannot_see_each_other() {
    let a = TestUser::get("mpt-sbx-a");
    let b = TestUser::get("mpt-sbx-b");
    let root = ScratchRoot::new("pair");
    let s = settings(&root.0);
    let pa = plan(
        "pair-a",
        &a.account,
        &["sh", "-c", "echo secret > secret.txt; sleep 3; echo done"],
    );
    let a_scratch = root.0.join(&pa.payload_id);
    let (wa, ta) = sandbox_support::capture();
    let ra = mupilot::switch::sandbox::launch(&s, pa, Some(wa), None).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(a_scratch.join("secret.txt").exists(), "A wrote its file");
    let script = format!(
        "cat {0}/secret.txt && echo READ-A; ls {0} && echo LIST-A; ls {1} && echo LIST-ROOT; \
         ls -a {1} 2>/dev/null | wc -l",
        a_scratch.display(),
        root.0.display()
    );
    let (ob, out) = run(&s, plan("pair-b", &b.account, &["sh", "-c", &script]));
    assert!(!out.contains("READ-A"), "{out}");
    assert!(!out.contains("LIST-A"), "{out}");
    assert!(!out.contains("LIST-ROOT"), "{out}");
    assert!(!out.lines().any(|l| l == "secret"), "{out}");
    assert!(ob.exit_code.is_some());
    let oa = ra.wait().unwrap();
    assert_eq!(oa.exit_code, Some(0));
    assert_eq!(ta.join().unwrap().trim(), "done");
}

#[test]
fn private_pid_namespace_and_tmp() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("pidns");
    let s = settings(&root.0);
    let marker = format!("/tmp/mupilot-test-sbx-marker-{}", std::process::id());
    let script = format!(
        "ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; ls -A /tmp /var/tmp /dev/shm | grep -v : | grep -c . ; \
         echo x > {marker}; hostname; ipcmk -M 4096 >/dev/null; ipcs -m | grep -c '^0x'"
    );
    let (o, out) = run(&s, plan("pidns", &u.account, &["sh", "-c", &script]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let pids: Vec<i32> = lines[0]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1), "{out}");
    assert!(pids.len() <= 5 && pids.iter().all(|p| *p < 20), "{out}");
    assert_eq!(
        lines[1], "0",
        "private /tmp, /var/tmp, /dev/shm start empty: {out}"
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "payload /tmp is not the host's"
    );
    assert!(lines[2].starts_with("mupilot-test-sbx-pidns"), "{out}");
    // Its own SysV IPC namespace: only the segment it made, and that one is gone with it.
    assert_eq!(lines[3], "1", "{out}");
    let host = std::process::Command::new("ipcs")
        .args(["-m", "-c"])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(!host.contains("mpt-sbx-a"), "{host}");
}

#[test]
fn no_capabilities_and_no_new_privs() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("caps");
    let s = settings(&root.0);
    let (o, out) = run(
        &s,
        plan(
            "caps",
            &u.account,
            &["grep", "-E", "^(Cap|NoNewPrivs)", "/proc/self/status"],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "{out}");
    let mut seen = 0;
    for l in out.lines() {
        let (k, v) = l.split_once(':').unwrap();
        let v = v.trim();
        if k == "NoNewPrivs" {
            assert_eq!(v, "1");
        } else {
            assert_eq!(u64::from_str_radix(v, 16).unwrap(), 0, "{l}");
        }
        seen += 1;
    }
    assert_eq!(
        seen, 6,
        "CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs: {out}"
    );
}

fn pids_with_cmdline(cgroup_dir: &std::path::Path, cmd: &str) -> Vec<i32> {
    let procs = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")).unwrap_or_default();
    procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c == cmd.as_bytes())
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn daemonized_children_are_killed() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("daemon");
    let s = settings(&root.0);
    let r = mupilot::switch::sandbox::launch(
        &s,
        plan(
            "daemon",
            &u.account,
            &["sh", "-c", "(setsid sleep 1000 &) ; sleep 1; exit 0"],
        ),
        None,
        None,
    )
    .unwrap();
    let cg = std::path::PathBuf::from(r.handle.cgroup());
    std::thread::sleep(std::time::Duration::from_millis(400));
    let daemons = pids_with_cmdline(&cg, "sleep\x001000\x00");
    assert_eq!(daemons.len(), 1, "the daemon runs in the payload cgroup");
    let o = r.wait().unwrap();
    assert_eq!(o.exit_code, Some(0));
    for p in daemons {
        let gone = std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|c| c != b"sleep\x001000\x00")
            .unwrap_or(true);
        assert!(gone, "daemon pid {p} still alive");
    }
    assert!(!cg.exists(), "cgroup removed");
}

#[test]
fn memory_limit_oom_kills() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("oom");
    let s = settings(&root.0);
    let mut p = plan(
        "oom",
        &u.account,
        &["sh", "-c", "head -c 419430400 /dev/zero | tail > /dev/null"],
    );
    p.memory_bytes = 64 << 20;
    let (o, out) = run(&s, p);
    assert_eq!(o.kill_reason.as_deref(), Some("oom"), "{o:?} {out}");
    assert_ne!(o.exit_code, Some(0));
    assert!(o.peak_memory_bytes.is_some_and(|p| p > 32 << 20), "{o:?}");
}

#[test]
fn outputs_skip_symlinks() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("out");
    let s = settings(&root.0);
    let mut p = plan(
        "out",
        &u.account,
        &[
            "sh",
            "-c",
            "echo hello > result.txt; ln -s /etc/shadow shadow; mkdir d; ln -s /etc d/etc",
        ],
    );
    p.outputs = vec![
        "result.txt".into(),
        "shadow".into(),
        "d/etc/shadow".into(),
        "missing.txt".into(),
    ];
    let (o, out) = run(&s, p);
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert_eq!(o.outputs_skipped.len(), 3, "{:?}", o.outputs_skipped);
    assert!(
        o.outputs_skipped[0].starts_with("shadow: symbolic link"),
        "{:?}",
        o.outputs_skipped
    );
    let bytes = o.outputs.unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut files = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).unwrap();
        files.push((name, body));
    }
    assert_eq!(
        files,
        vec![("result.txt".to_string(), "hello\n".to_string())]
    );
}

/// A tar.gz with a `../evil` entry, an absolute path, and a symlink to an absolute directory
/// followed by a file written through it.
/// A bundle as the helper passes it on: a sealed memfd.
fn memfd(bytes: &[u8]) -> std::sync::Arc<std::os::fd::OwnedFd> {
    std::sync::Arc::new(mupilot::protocol::switch_wire::sealed_memfd("test-bundle", bytes).unwrap())
}

fn hostile_bundle(outside: &std::path::Path) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut raw = |name: &str, ty: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_old();
        let n = &mut h.as_old_mut().name;
        n[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let o = outside.display().to_string();
    raw(
        "input.txt",
        tar::EntryType::Regular,
        None,
        b"payload input\n",
    );
    raw("../evil", tar::EntryType::Regular, None, b"evil\n");
    raw(
        &format!("{o}/abs-evil"),
        tar::EntryType::Regular,
        None,
        b"evil\n",
    );
    raw("escape", tar::EntryType::Symlink, Some(&o), b"");
    raw(
        "escape/through-link",
        tar::EntryType::Regular,
        None,
        b"evil\n",
    );
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn hostile_bundle_stays_in_scratch() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("bundle");
    let outside = std::path::PathBuf::from(format!(
        "/var/lib/mupilot-test-sbx-outside-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir(&outside).unwrap();
    // World-writable, so only the unpacker's checks (not permissions) can keep files out.
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&outside).unwrap().permissions(),
        0o777,
    );
    std::fs::set_permissions(
        &outside,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let s = settings(&root.0);
    let mut p = plan(
        "bundle",
        &u.account,
        &["sh", "-c", "cat input.txt; ls -A ..; ls -A"],
    );
    p.bundle = Some(memfd(&hostile_bundle(&outside)));
    let r = mupilot::switch::sandbox::launch(&s, p, None, None);
    let leaked: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let evil_in_root = root.0.join("evil").exists();
    let _ = std::fs::remove_dir_all(&outside);
    assert!(leaked.is_empty(), "written outside scratch: {leaked:?}");
    assert!(!evil_in_root);
    // The unpacker refuses the archive (an entry through a symlink is an error): the payload
    // does not run, with a bundle error (the caller's fault, not a setup failure of the site).
    match r {
        Err(e @ mupilot::switch::sandbox::SandboxError::Bundle { .. }) => {
            assert!(e.to_string().contains("not a usable tar.gz"), "{e}")
        }
        Ok(_) => panic!("a bundle writing through an escaping symlink was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
    assert!(!root
        .0
        .join(format!("test-sbx-bundle-{}", std::process::id()))
        .exists());
}

/// Without the symlink trick the bundle unpacks: `..` entries are dropped, absolute paths land
/// inside scratch, and the payload runs on its input.
#[test]
fn bundle_paths_are_neutralized() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("bundle2");
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data) in [
        ("input.txt", &b"payload input\n"[..]),
        ("../evil", b"evil\n"),
        ("/abs/evil", b"evil\n"),
    ] {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let s = settings(&root.0);
    let mut p = plan(
        "bundle2",
        &u.account,
        &[
            "sh",
            "-c",
            "cat input.txt; find . -type f | sort; stat -c %U input.txt",
        ],
    );
    p.bundle = Some(memfd(&b.into_inner().unwrap().finish().unwrap()));
    let (o, out) = run(&s, p);
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert_eq!(
        out, "payload input\n./abs/evil\n./input.txt\nmpt-sbx-a\n",
        "unpacked as the account, inside scratch only"
    );
    assert!(!root.0.join("evil").exists());
    assert!(!std::path::Path::new("/abs/evil").exists());
}

#[test]
fn cgroup_below_own_and_removed() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("cg");
    let s = settings(&root.0);
    let r =
        mupilot::switch::sandbox::launch(&s, plan("cg", &u.account, &["sleep", "0.3"]), None, None)
            .unwrap();
    let cg = std::path::PathBuf::from(r.handle.cgroup());
    let own = sandbox_support::own_memory_cgroup();
    // On v2 this process was moved into the `pilot` leaf; the payload is its sibling.
    let parent = if own.ends_with("pilot") {
        own.parent().unwrap().to_owned()
    } else {
        own
    };
    assert_eq!(cg.parent().unwrap(), parent, "{}", cg.display());
    assert!(cg
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("mupilot-test-sbx-cg"));
    assert!(cg.exists());
    let limit = std::fs::read_to_string(cg.join("memory.limit_in_bytes"))
        .or_else(|_| std::fs::read_to_string(cg.join("memory.max")))
        .unwrap();
    assert_eq!(limit.trim(), (256u64 << 20).to_string());
    let read = |v1: &str, v2: &str| {
        std::fs::read_to_string(v1)
            .or_else(|_| std::fs::read_to_string(cg.join(v2)))
            .unwrap()
            .trim()
            .to_string()
    };
    let name = cg.file_name().unwrap().to_str().unwrap().to_string();
    let own_root = |c: &str| {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let p = text
            .lines()
            .find_map(|l| {
                let mut it = l.splitn(3, ':');
                it.next();
                let cs = it.next()?;
                let p = it.next()?;
                cs.split(',').any(|x| x == c).then(|| p.to_owned())
            })
            .unwrap_or_default();
        format!("/sys/fs/cgroup/{c}{}/{name}", p.trim_end_matches('/'))
    };
    let quota = read(&format!("{}/cpu.cfs_quota_us", own_root("cpu")), "cpu.max");
    assert!(quota == "100000" || quota == "100000 100000", "{quota}");
    assert_eq!(
        read(&format!("{}/pids.max", own_root("pids")), "pids.max"),
        "256"
    );
    let o = r.wait().unwrap();
    assert_eq!(o.exit_code, Some(0));
    assert!(!cg.exists(), "cgroup removed after wait");
}

#[test]
fn no_inherited_descriptors() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("fds");
    let s = settings(&root.0);
    // An inheritable descriptor in the helper must not reach the payload.
    let f = std::fs::File::open("/etc/hostname").unwrap();
    // SAFETY: dup of a valid descriptor; the copy (without CLOEXEC) is closed below.
    let leak = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    assert!(leak > 2);
    let (o, out) = run(&s, plan("fds", &u.account, &["ls", "/proc/self/fd"]));
    // SAFETY: closing the descriptor we dup'ed above.
    unsafe { libc::close(leak) };
    assert_eq!(o.exit_code, Some(0), "{out}");
    let fds: Vec<i32> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    // 0, 1, 2 and the directory ls itself opened.
    assert_eq!(fds.len(), 4, "{out}");
    assert_eq!(&fds[..3], &[0, 1, 2]);
}

#[test]
fn network_none_and_loopback() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("net");
    let mut s = settings(&root.0);
    s.network = mupilot::switch::sandbox::NetworkMode::None;
    let (o, out) = run(&s, plan("net-none", &u.account, &["cat", "/proc/net/dev"]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    let ifs: Vec<&str> = out
        .lines()
        .skip(2)
        .map(|l| l.split(':').next().unwrap().trim())
        .collect();
    assert_eq!(ifs, vec!["lo"], "{out}");
    s.network = mupilot::switch::sandbox::NetworkMode::Loopback;
    let (o, out) = run(
        &s,
        plan(
            "net-lo",
            &u.account,
            &["/usr/sbin/ip", "-o", "link", "show"],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("lo:") && out.contains(",UP"), "{out}");
}

#[test]
fn network_host_keeps_the_hosts_network() {
    // Landlock scoping leaves the network alone: a payload under `network = "host"` reaches a
    // TCP service of the host (this test, on 127.0.0.1). Where the kernel cannot scope, the
    // tests' `ipc_fallback = "loopback"` puts it in a namespace of its own: refused.
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("net-host");
    let s = settings(&root.0);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut c, b"hello\n").unwrap();
    });
    let script =
        format!("exec 3<>/dev/tcp/127.0.0.1/{port} && read -r line <&3 && echo \"got $line\"");
    let (o, out) = run(&s, plan("net-host", &u.account, &["bash", "-c", &script]));
    if landlock_scopes() {
        assert_eq!((o.exit_code, out.trim()), (Some(0), "got hello"), "{out}");
    } else {
        assert_ne!(o.exit_code, Some(0), "{out}");
        assert!(out.contains("Connection refused"), "{out}");
        // Unblock the server thread.
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    }
    server.join().unwrap();
}

#[test]
fn user_namespaces_follow_the_setting() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("userns");
    let mut s = settings(&root.0);
    let (o, out) = run(
        &s,
        plan(
            "userns-on",
            &u.account,
            &["unshare", "-U", "-r", "id", "-u"],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "allowed: {out}");
    assert_eq!(out.trim(), "0");
    // Inside its own user namespace the payload gets capabilities there (securebits and the
    // bounding set are reset by the kernel for a new user namespace), as Apptainer needs.
    let (o, out) = run(
        &s,
        plan(
            "userns-caps",
            &u.account,
            &[
                "unshare",
                "-U",
                "-r",
                "-m",
                "sh",
                "-c",
                "mount -t tmpfs none /mnt && grep CapEff /proc/self/status",
            ],
        ),
    );
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert!(!out.contains("0000000000000000"), "{out}");
    s.allow_user_namespaces = false;
    let (o, out) = run(
        &s,
        plan(
            "userns-off",
            &u.account,
            &["unshare", "-U", "-r", "id", "-u"],
        ),
    );
    assert_ne!(o.exit_code, Some(0), "denied: {out}");
    // Ordinary work still runs under the filter (fork uses clone/clone3).
    let (o, out) = run(
        &s,
        plan("userns-off2", &u.account, &["sh", "-c", "echo a | cat"]),
    );
    assert_eq!(o.exit_code, Some(0), "{out}");
    assert_eq!(out.trim(), "a");
}

#[test]
fn walltime_and_kill_reasons() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("wall");
    let s = settings(&root.0);
    let mut p = plan("wall", &u.account, &["sleep", "30"]);
    p.walltime_seconds = 1;
    let t = std::time::Instant::now();
    let (o, _) = run(&s, p);
    assert!(t.elapsed().as_secs() < 10);
    assert_eq!(o.kill_reason.as_deref(), Some("walltime"));
    assert_eq!(o.signal, Some(libc::SIGTERM));

    let r = mupilot::switch::sandbox::launch(
        &s,
        plan("kill", &u.account, &["sleep", "30"]),
        None,
        None,
    )
    .unwrap();
    let h = r.handle.clone();
    assert!(h.pid() > 1);
    assert_eq!(
        std::fs::read(format!("/proc/{}/cmdline", h.pid())).unwrap(),
        b"sleep\x0030\x00"
    );
    h.kill("operator");
    let o = r.wait().unwrap();
    assert_eq!(o.kill_reason.as_deref(), Some("operator"));
    assert_eq!(o.signal, Some(libc::SIGKILL));

    let r =
        mupilot::switch::sandbox::launch(&s, plan("sig", &u.account, &["sleep", "30"]), None, None)
            .unwrap();
    r.handle.signal(libc::SIGUSR1).unwrap();
    let o = r.wait().unwrap();
    assert_eq!(o.signal, Some(libc::SIGUSR1));
    assert_eq!(o.kill_reason, None);
}

#[test]
fn exec_failure_is_reported_and_cleaned_up() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("execfail");
    let s = settings(&root.0);
    let p = plan("execfail", &u.account, &["/nonexistent/program"]);
    let scratch = root.0.join(&p.payload_id);
    let cg = sandbox_support::own_memory_cgroup();
    match mupilot::switch::sandbox::launch(&s, p, None, None) {
        Err(mupilot::switch::sandbox::SandboxError::Setup { step, error }) => {
            assert_eq!(step, "exec");
            assert!(error.contains("exec failed"), "{error}");
        }
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("launched a nonexistent program"),
    }
    assert!(!scratch.exists());
    let parent = if cg.ends_with("pilot") {
        cg.parent().unwrap().to_owned()
    } else {
        cg
    };
    let left: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("test-sbx-execfail")
        })
        .collect();
    assert!(left.is_empty());
}

#[test]
fn dropped_running_is_torn_down() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("drop");
    let s = settings(&root.0);
    let p = plan("drop", &u.account, &["sleep", "30"]);
    let scratch = root.0.join(&p.payload_id);
    let r = mupilot::switch::sandbox::launch(&s, p, None, None).unwrap();
    let cg = std::path::PathBuf::from(r.handle.cgroup());
    let pid = r.handle.pid();
    drop(r);
    assert!(!cg.exists(), "cgroup removed");
    assert!(!scratch.exists(), "scratch removed");
    let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c == b"sleep\x0030\x00")
        .unwrap_or(false);
    assert!(!alive, "payload killed");
}

#[test]
fn duplicate_payload_id_is_refused() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("dup");
    let s = settings(&root.0);
    let r =
        mupilot::switch::sandbox::launch(&s, plan("dup", &u.account, &["sleep", "2"]), None, None)
            .unwrap();
    let t = std::time::Instant::now();
    let e = match mupilot::switch::sandbox::launch(
        &s,
        plan("dup", &u.account, &["true"]),
        None,
        None,
    ) {
        Err(e) => e,
        Ok(_) => panic!("second payload with the same id started"),
    };
    assert!(t.elapsed().as_millis() < 500, "refused at once");
    assert!(e.to_string().contains("payload with this id"), "{e}");
    // The first one is untouched.
    assert!(std::path::Path::new(&r.handle.cgroup()).exists());
    let o = r.wait().unwrap();
    assert_eq!(o.exit_code, Some(0));
    assert_eq!(o.kill_reason, None);
}

/// A separate "pilot" process in its own CPU-limited cgroup and its own cpuset and devices
/// cgroups (as a batch system pins a job): the payload's cgroup goes below the pilot's (not
/// the helper's), its CPU quota never exceeds the pilot's, and it runs in the pilot's very
/// cpuset and devices cgroups, so the job's CPU pinning and device rules hold. v1 only (its
/// per-controller hierarchies); `payload_cgroup_follows_the_pilot_v2` is the same on v2.
#[test]
fn payload_cgroup_follows_the_pilot_v1() {
    on_layout(Layout::V1, "payload_cgroup_follows_the_pilot_v2", || {
        let u = TestUser::get("mpt-sbx-a");
        let root = ScratchRoot::new("pilotcg");
        let s = settings(&root.0);
        // The job's cgroups are removed on drop, also when an assertion fails; the pilot
        // (declared after them, so dropped first) is killed before that.
        let hierarchies = ["cpu", "cpuset", "devices"];
        let job_name = format!("mupilot-test-sbx-job-{}", std::process::id());
        let jobs: Vec<TestCgroup> = hierarchies
            .iter()
            .map(|h| {
                TestCgroup::new(
                    std::path::Path::new(&format!("/sys/fs/cgroup/{h}")),
                    "mupilot-test-sbx-job",
                )
            })
            .collect();
        let job = |h: &str| {
            jobs[hierarchies.iter().position(|x| *x == h).unwrap()]
                .0
                .clone()
        };
        let pilot = KillOnDrop(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        );
        std::fs::write(job("cpu").join("cpu.cfs_quota_us"), "50000").unwrap();
        // A v1 cpuset cgroup starts empty: the job gets the root's CPUs and memory nodes.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let all = std::fs::read_to_string(format!("/sys/fs/cgroup/cpuset/{f}")).unwrap();
            std::fs::write(job("cpuset").join(f), all.trim()).unwrap();
        }
        for h in ["cpu", "cpuset", "devices"] {
            std::fs::write(job(h).join("cgroup.procs"), pilot.0.id().to_string()).unwrap();
        }
        let mut p = plan(
            "pilotcg",
            &u.account,
            &["sh", "-c", "cat /proc/self/cgroup; sleep 0.5"],
        );
        p.pilot =
            mupilot::switch::sandbox::cgroup::PilotCgroups::read(pilot.0.id() as i32).unwrap();
        p.cores = 2;
        let id = p.payload_id.clone();
        let (w, t) = sandbox_support::capture();
        let r = mupilot::switch::sandbox::launch(&s, p, Some(w), None);
        let quota =
            std::fs::read_to_string(job("cpu").join(format!("mupilot-{id}/cpu.cfs_quota_us")));
        let o = r.map(|r| r.wait().unwrap());
        let out = t.join().unwrap();
        drop(pilot);
        let gone = !job("cpu").join(format!("mupilot-{id}")).exists();
        assert_eq!(o.unwrap().exit_code, Some(0), "{out}");
        assert_eq!(
            quota.unwrap().trim(),
            "50000",
            "clamped to the pilot's 0.5 core"
        );
        assert!(gone);
        let line = |h: &str| {
            out.lines()
                .find(|l| l.split(':').nth(1) == Some(h))
                .and_then(|l| l.split(':').nth(2))
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("cpu"), format!("/{job_name}/mupilot-{id}"), "{out}");
        assert_eq!(line("cpuset"), format!("/{job_name}"), "{out}");
        assert_eq!(line("devices"), format!("/{job_name}"), "{out}");
    });
}

/// v2: a separate "pilot" process alone in a CPU-limited job cgroup (as a batch system or
/// systemd puts a job): the pilot moves into the job's `pilot` leaf, the payload's cgroup is
/// the leaf's sibling below the job (so the job's limit binds it; v2 takes a child quota above
/// the parent's and the kernel applies the parent's), the job's limit is left as it was, and
/// the payload cgroup is gone afterwards. v1: `payload_cgroup_follows_the_pilot_v1`.
#[test]
fn payload_cgroup_follows_the_pilot_v2() {
    on_layout(Layout::V2, "payload_cgroup_follows_the_pilot_v1", || {
        let u = TestUser::get("mpt-sbx-a");
        let root = ScratchRoot::new("pilotcg2");
        let s = settings(&root.0);
        let job = TestCgroup::new(&memory_root(), "mupilot-test-sbx-job");
        job.write("cpu.max", "50000 100000");
        let mut pilot = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        job.add(pilot.id());
        let mut p = plan(
            "pilotcg2",
            &u.account,
            &["sh", "-c", "cat /proc/self/cgroup; sleep 0.5"],
        );
        p.pilot = mupilot::switch::sandbox::cgroup::PilotCgroups::read(pilot.id() as i32).unwrap();
        p.cores = 2;
        let id = p.payload_id.clone();
        let (w, t) = sandbox_support::capture();
        let r = mupilot::switch::sandbox::launch(&s, p, Some(w), None);
        let payload_dir = job.0.join(format!("mupilot-{id}"));
        let quota = std::fs::read_to_string(payload_dir.join("cpu.max"));
        let o = r.map(|r| r.wait().unwrap());
        let out = t.join().unwrap();
        let pilot_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", pilot.id()));
        pilot.kill().unwrap();
        pilot.wait().unwrap();
        let job_name = job.0.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(o.unwrap().exit_code, Some(0), "{out}");
        assert!(
            out.lines()
                .any(|l| l == format!("0::/{job_name}/mupilot-{id}")),
            "{out}"
        );
        assert_eq!(
            pilot_cgroup.unwrap().trim(),
            format!("0::/{job_name}/pilot")
        );
        assert_eq!(
            quota.unwrap().trim(),
            "200000 100000",
            "the payload's own 2 cores"
        );
        assert_eq!(
            std::fs::read_to_string(job.0.join("cpu.max"))
                .unwrap()
                .trim(),
            "50000 100000",
            "the job's 0.5 core, which binds the payload, unchanged"
        );
        assert!(!payload_dir.exists(), "payload cgroup removed");
    });
}

/// Where fs.protected_hardlinks is off a payload could hard-link a root file into its scratch;
/// simulated here by root: such an output is skipped, not read out with root's rights.
#[test]
fn outputs_skip_foreign_hard_links() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("hardlink");
    let s = settings(&root.0);
    let secret = std::path::PathBuf::from(format!(
        "/var/lib/mupilot-test-sbx-secret-{}",
        std::process::id()
    ));
    std::fs::write(&secret, "root secret\n").unwrap();
    let mut p = plan(
        "hardlink",
        &u.account,
        &["sh", "-c", "sleep 0.5; echo mine > mine.txt"],
    );
    p.outputs = vec!["stolen".into(), "mine.txt".into()];
    let scratch = root.0.join(&p.payload_id);
    let r = mupilot::switch::sandbox::launch(&s, p, None, None).unwrap();
    std::fs::hard_link(&secret, scratch.join("stolen")).unwrap();
    let o = r.wait().unwrap();
    std::fs::remove_file(&secret).unwrap();
    assert_eq!(
        o.outputs_skipped,
        vec!["stolen: not owned by the payload's account".to_string()]
    );
    let bytes = o.outputs.unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, vec!["mine.txt"]);
}

#[test]
fn pids_and_tmp_limits() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("limits");
    let mut s = settings(&root.0);
    s.pids_max = 16;
    s.tmp_size_bytes = 1 << 20;
    // tmp first (head needs a fork); then fill the pids limit and count with builtins only.
    let script = "head -c 2000000 /dev/zero > /tmp/big 2>/dev/null && echo TMP-UNLIMITED; \
                  ( for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24; \
                    do sleep 5 & done ) 2>/dev/null; \
                  set -- /proc/[0-9]*; echo $#; exit 0";
    let t = std::time::Instant::now();
    let (o, out) = run(&s, plan("limits", &u.account, &["sh", "-c", script]));
    assert_eq!(o.exit_code, Some(0), "{out}");
    let n: u32 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        (10..=16).contains(&n),
        "filled up to, never beyond, pids_max: {n}"
    );
    assert!(!out.contains("TMP-UNLIMITED"), "{out}");
    // The background sleeps died with the payload.
    assert!(t.elapsed().as_secs() < 5);
}

/// The helper creates the payload cgroup while the stage builds the scratch view. When that
/// fails (here a directory of that name is left over in the memory hierarchy), the launch
/// fails naming the path, the stage is withdrawn, the payload never runs, and its scratch
/// directory is gone.
#[test]
fn cgroup_creation_failure_is_reported_and_withdraws_the_stage() {
    let u = TestUser::get("mpt-sbx-a");
    let root = ScratchRoot::new("cgfail");
    let s = settings(&root.0);
    let p = plan("cgfail", &u.account, &["true"]);
    let located = mupilot::switch::sandbox::cgroup::Cgroup::locate(
        &p.pilot,
        &format!("mupilot-{}", p.payload_id),
    )
    .unwrap();
    let leftover = std::path::PathBuf::from(located.cgroup().display());
    std::fs::create_dir(&leftover).unwrap();
    let e = match mupilot::switch::sandbox::launch(&s, p.clone(), None, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the payload started without its cgroup"),
    };
    assert!(e.contains("payload cgroup: cannot create cgroup"), "{e}");
    assert!(e.contains(&leftover.display().to_string()), "{e}");
    assert!(!root.0.join(&p.payload_id).exists(), "scratch removed");
    let _ = std::fs::remove_dir(&leftover);
}

/// A child process killed and reaped when the test ends, also by a failed assertion.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
