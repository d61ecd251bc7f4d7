//! Shared fixtures for the slot tests: a fake command runner, a temporary root with host
//! files, and an [`Env`] builder. Nothing here touches the live system.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mupilot::pilot::slot::{CmdOutcome, CommandRunner, Env};

/// 2026-11-23T12:00:00Z.
pub const NOW: i64 = 1_795_435_200;
/// Host fallback values every fixture root carries.
pub const HOST_CORES: u32 = 8;
pub const HOST_MEM: u64 = 16_384_000 * 1024;

/// Answers commands from a table; anything else is "not installed". Records every call.
#[derive(Clone, Default)]
pub struct FakeRunner {
    pub answers: BTreeMap<String, CmdOutcome>,
    pub calls: Arc<Mutex<Vec<String>>>,
}

impl CommandRunner for FakeRunner {
    fn run(&self, program: &str, args: &[&str]) -> CmdOutcome {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{program} {}", args.join(" ")));
        self.answers
            .get(program)
            .cloned()
            .unwrap_or(CmdOutcome::Missing)
    }
}

/// A temporary root with /proc/meminfo (16000 MiB).
pub fn root() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("mupilot-test-slt-")
        .tempdir()
        .unwrap();
    write(
        d.path(),
        "/proc/meminfo",
        "MemTotal:       16384000 kB\nMemFree: 1 kB\n",
    );
    d
}

/// Writes `content` at absolute `path` under `root`, creating directories.
pub fn write(root: &Path, path: &str, content: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// An Env over `root` with `vars` and command answers `cmds`; host wn042.example.org, UTC.
pub fn env(root: &Path, vars: &[(&str, &str)], cmds: &[(&str, CmdOutcome)]) -> (Env, FakeRunner) {
    let runner = FakeRunner {
        answers: cmds
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        calls: Arc::default(),
    };
    let env = Env {
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        unreadable: Default::default(),
        root: root.to_path_buf(),
        runner: Box::new(runner.clone()),
        now: NOW,
        hostname: "wn042.example.org".into(),
        host_cores: Some(HOST_CORES),
        local_offset: chrono::FixedOffset::east_opt(0),
    };
    (env, runner)
}

pub fn out(s: &str) -> CmdOutcome {
    CmdOutcome::Output(s.to_string())
}
