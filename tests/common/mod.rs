//! Fixtures every kind of integration test needs, in one place: the machine's cgroup layout
//! and how a test that needs the other one is reported as skipped, cgroups a test makes and
//! removes, and throw-away accounts. Test binaries include it as `mod common;`; the suite
//! support modules (`sandbox_support`, `switch_support`, ...) build on it.
//!
//! Why a skip is a printed line and not `#[ignore]`: the test binaries are built once, on the
//! host, and run both there (cgroup v1) and in the cgroup-v2 VM (scripts/vm-test-sandbox.sh),
//! so whether a test can run is known only when it runs. docs/testing.md, "Skipped tests".
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The cgroup layout of the machine the test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A v1 memory hierarchy is mounted (pure v1, or hybrid with an empty unified mount): what
    /// the helper then uses.
    V1,
    /// Only the unified hierarchy, at /sys/fs/cgroup.
    V2,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::V1 => "v1",
            Layout::V2 => "v2",
        })
    }
}

/// The layout here, decided as the helper decides it.
pub fn layout() -> Layout {
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        Layout::V1
    } else {
        Layout::V2
    }
}

/// Runs `test` when the machine's layout is `needs`; otherwise reports the test as skipped,
/// naming what it needs and `counterpart`, the test that covers the same on the other layout.
/// The report is one line `SKIPPED: <test>: needs cgroup <v>...` written straight to the
/// test's stderr (libtest does not capture it), which scripts/test.sh counts and lists.
pub fn on_layout(needs: Layout, counterpart: &str, test: impl FnOnce()) {
    let here = layout();
    if here == needs {
        return test();
    }
    use std::io::Write;
    let name = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let line = format!(
        "SKIPPED: {name}: needs cgroup {needs}, this machine is {here}; {counterpart} covers {here}\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The root of the hierarchy that holds memory: v1 /sys/fs/cgroup/memory, v2 /sys/fs/cgroup.
pub fn memory_root() -> PathBuf {
    match layout() {
        Layout::V1 => PathBuf::from("/sys/fs/cgroup/memory"),
        Layout::V2 => PathBuf::from("/sys/fs/cgroup"),
    }
}

/// A process's cgroup in the hierarchy that holds memory (v1) or the unified one (v2).
pub fn memory_cgroup_of(pid: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (lines, _) = mupilot::cgroups::membership::parse_all(&text);
    let line = match layout() {
        Layout::V1 => lines.iter().find(|m| m.has("memory")),
        Layout::V2 => lines.iter().find(|m| m.is_unified()),
    };
    let path = &line.expect("a memory or unified line").path;
    memory_root().join(path.trim_start_matches('/'))
}

/// A cgroup made for one test, removed on drop with every cgroup below it (what the helper
/// made there, once empty). The processes a test moves in must be gone by then.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    /// `<root>/<name>-<pid of the test>`; one that exists already is reused.
    pub fn new(root: &Path, name: &str) -> TestCgroup {
        let p = root.join(format!("{name}-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&p) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists,
                "mkdir {}: {e}",
                p.display()
            );
        }
        TestCgroup(p)
    }

    /// Moves a process in.
    pub fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    pub fn write(&self, file: &str, value: &str) {
        std::fs::write(self.0.join(file), value)
            .unwrap_or_else(|e| panic!("write {value:?} to {}/{file}: {e}", self.0.display()));
    }

    /// The directories of the cgroups directly below.
    pub fn children(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // rmdir can see EBUSY for a moment after the last process left.
        for _ in 0..100 {
            for c in self.children() {
                let _ = std::fs::remove_dir(self.0.join(c));
            }
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The uid of an account, if it exists.
pub fn uid_of(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// Creates a login-less account without a home directory (`useradd -M -N -s nologin`), after
/// removing one of that name a failed run may have left.
pub fn create_account(name: &str) {
    delete_account(name);
    useradd(name);
}

/// Creates the account unless it exists.
pub fn ensure_account(name: &str) {
    if uid_of(name).is_none() {
        useradd(name);
    }
}

fn useradd(name: &str) {
    let st = Command::new("useradd")
        .args(["-M", "-N", "-s", "/usr/sbin/nologin", name])
        .status()
        .expect("useradd runs");
    assert!(st.success(), "useradd {name} failed");
}

/// Removes an account (and nothing else); a missing one is fine.
pub fn delete_account(name: &str) {
    let _ = Command::new("userdel")
        .arg(name)
        .stderr(Stdio::null())
        .status();
}
