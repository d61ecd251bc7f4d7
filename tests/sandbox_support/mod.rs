//! Shared helpers for tests that need real accounts, a scratch root and a sandbox launch
//! (root only). Reusable by other test files: `#[path = "sandbox_support/mod.rs"] mod sbx;`.
//!
//! Accounts are created with useradd on first use and removed with `userdel -r` when the last
//! user of them in this test binary is done, so a test binary can run twice in a row.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use mupilot::switch::sandbox::cgroup::PilotCgroups;
use mupilot::switch::sandbox::{
    self, Account, IpcFallback, LaunchPlan, NetworkMode, Outcome, SandboxSettings,
};

static USERS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

/// A real account, held for the lifetime of the guard; the last guard of a name deletes it.
pub struct TestUser {
    pub account: Account,
}

impl TestUser {
    /// Creates `name` (useradd -m, nologin shell) if absent and resolves uid, gid, groups.
    pub fn get(name: &str) -> TestUser {
        let mut g = USERS.lock().unwrap_or_else(|p| p.into_inner());
        let map = g.get_or_insert_with(HashMap::new);
        let count = map.entry(name.to_owned()).or_insert(0);
        if nix::unistd::User::from_name(name).unwrap().is_none() {
            let st = Command::new("useradd")
                .args(["-m", "-s", "/usr/sbin/nologin", name])
                .status()
                .unwrap();
            assert!(st.success(), "useradd {name} failed");
        }
        *count += 1;
        TestUser {
            account: account(name),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let mut g = USERS.lock().unwrap_or_else(|p| p.into_inner());
        let map = g.get_or_insert_with(HashMap::new);
        let c = map.get_mut(&self.account.name).unwrap();
        *c -= 1;
        if *c == 0 {
            let _ = Command::new("userdel")
                .args(["-r", &self.account.name])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Resolves an existing account from the user and group databases.
pub fn account(name: &str) -> Account {
    let u = nix::unistd::User::from_name(name)
        .unwrap()
        .expect("user exists");
    let out = Command::new("id").args(["-G", name]).output().unwrap();
    let groups = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .filter(|g| *g != u.gid.as_raw())
        .collect();
    Account {
        name: name.to_owned(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
    }
}

/// A scratch root for one test, removed on drop.
pub struct ScratchRoot(pub PathBuf);

impl ScratchRoot {
    pub fn new(test: &str) -> ScratchRoot {
        let p = PathBuf::from(format!(
            "/var/lib/mupilot-test-sbx-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        ScratchRoot(p)
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Site settings pointing the stage at the built `mupilot-switch`. `network = "host"` with
/// `ipc_fallback = "loopback"`: on a kernel with Landlock ABI >= 6 (this host) payloads are
/// scoped, on one without (the cgroup-v2 VM's Debian kernel) every test runs the fallback, a
/// network namespace per payload. (The site default, "refuse", has a test of its own.)
pub fn settings(root: &Path) -> SandboxSettings {
    SandboxSettings {
        scratch_root: root.to_owned(),
        tmp_size_bytes: 64 << 20,
        pids_max: 256,
        network: NetworkMode::Host,
        ipc_fallback: IpcFallback::Loopback,
        env_allowlist: vec!["LANG".into()],
        nofile: 1024,
        core_bytes: 0,
        output_limit_bytes: 1 << 20,
        allow_user_namespaces: true,
        warm_stages: 0,
        stage_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_mupilot-switch"))),
    }
}

/// Whether this kernel scopes abstract unix sockets and signals with Landlock (ABI >= 6):
/// what the sandbox tests expect of payloads depends on it.
pub fn landlock_scopes() -> bool {
    sandbox::scope::kernel_abi() >= sandbox::scope::SCOPE_ABI
}

/// Directories every payload has a private copy of (or, for the scratch root, a covering
/// tmpfs): a program below them is not the one the payload would see, or not there at all.
const HIDDEN_IN_SANDBOX: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"];

/// A program built by cargo (target/ may be anywhere: a repository cloned under /tmp has it
/// below the payloads' private /tmp), copied into a root-owned 0755 directory the sandbox
/// shows (`/var/lib/mupilot-test-bin-<name>-<pid>`, never a scratch root); the directory is
/// removed with the value. Refuses up front, saying why, when that place is hidden too.
pub struct SandboxProgram {
    dir: PathBuf,
    pub path: String,
}

impl SandboxProgram {
    pub fn copy(built: &Path, name: &str) -> SandboxProgram {
        assert!(
            built.is_file(),
            "{} is missing: build it first (cargo test and cargo build --all-targets build the \
             examples too)",
            built.display()
        );
        let dir = PathBuf::from(format!(
            "/var/lib/mupilot-test-bin-{name}-{}",
            std::process::id()
        ));
        if let Some(h) = HIDDEN_IN_SANDBOX.iter().find(|h| dir.starts_with(h)) {
            panic!(
                "{} would be hidden from payloads (their {h} is private); the tests need a \
                 directory the sandbox shows",
                dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = built.file_name().unwrap();
        let path = dir.join(file);
        std::fs::copy(built, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        SandboxProgram {
            path: path.display().to_string(),
            dir,
        }
    }
}

impl std::ops::Deref for SandboxProgram {
    type Target = str;
    fn deref(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Display for SandboxProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path)
    }
}

impl Drop for SandboxProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// /dev/net/tun as udev makes it (0666; devtmpfs alone makes it 0600): pasta opens it as the payload's account.
/// Some hosts (this development machine) have it 0600; the tests set 0666 while they run and
/// put the old mode back after the last one.
pub struct Tun;

static TUN_USERS: Mutex<(usize, u32)> = Mutex::new((0, 0));

impl Tun {
    pub fn get() -> Tun {
        let mut g = TUN_USERS.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 == 0 {
            let mode = std::fs::metadata("/dev/net/tun")
                .expect("/dev/net/tun (modprobe tun)")
                .permissions()
                .mode()
                & 0o7777;
            g.1 = mode;
            if mode != 0o666 {
                set_tun_mode(0o666);
            }
        }
        g.0 += 1;
        Tun
    }
}

impl Drop for Tun {
    fn drop(&mut self) {
        let mut g = TUN_USERS.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if g.0 == 0 && g.1 != 0o666 {
            set_tun_mode(g.1);
        }
    }
}

fn set_tun_mode(mode: u32) {
    std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A plan for `argv` as `account`, 1 core, 256 MiB, 60 s, in this test process's cgroup.
pub fn plan(id: &str, account: &Account, argv: &[&str]) -> LaunchPlan {
    LaunchPlan {
        payload_id: format!("test-sbx-{id}-{}", std::process::id()),
        account: account.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cores: 1,
        memory_bytes: 256 << 20,
        walltime_seconds: 60,
        pilot: PilotCgroups::read(std::process::id() as i32).unwrap(),
        bundle: None,
        outputs: Vec::new(),
        stdin: None,
    }
}

/// A pipe whose write end becomes the payload's stdout; the reader thread returns the text.
pub fn capture() -> (OwnedFd, std::thread::JoinHandle<String>) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(r).read_to_string(&mut s);
        s
    });
    (w, t)
}

/// Launches and waits; returns the outcome and the payload's stdout (stderr too).
pub fn run(settings: &SandboxSettings, plan: LaunchPlan) -> (Outcome, String) {
    let (w, t) = capture();
    let w2 = w.try_clone().unwrap();
    let r = sandbox::launch(settings, plan, Some(w), Some(w2)).expect("launch");
    let o = r.wait().expect("wait");
    (o, t.join().unwrap())
}

/// This process's cgroup directory in the memory hierarchy (v1) or the unified one (v2).
pub fn own_memory_cgroup() -> PathBuf {
    common::memory_cgroup_of("self")
}
