//! The seam between slot discovery and the world: environment variables, a filesystem root,
//! a command runner (scontrol, squeue, qstat, bjobs), the host name, host cores and "now".
//!
//! Discovery code reads nothing from the process directly; it asks an [`Env`]. Tests build one
//! from a map, a temporary directory and a fake runner; [`Env::real`] reads the live system.
//! This module must not interpret any batch system's values.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a batch system query (scontrol, qstat, bjobs …) may take before it is killed.
/// A slow controller must not delay the pilot's start by more than this.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What running a query command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdOutcome {
    /// The command is not installed on this node: not an error, the source just says less.
    Missing,
    /// It ran and exited 0; this is its standard output.
    Output(String),
    /// It ran but failed, timed out or printed garbage; the text says how.
    Failed(String),
}

/// Runs batch system query commands.
pub trait CommandRunner: Send + Sync {
    /// Runs `program args…` and returns its outcome; never blocks longer than its timeout.
    fn run(&self, program: &str, args: &[&str]) -> CmdOutcome;
}

/// Runs real commands with [`COMMAND_TIMEOUT`], killing (by pid) any that overrun.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> CmdOutcome {
        run_with_timeout(program, args, COMMAND_TIMEOUT)
    }
}

/// Runs one command with a timeout; output beyond 1 MiB is cut (no query needs more).
pub fn run_with_timeout(program: &str, args: &[&str], timeout: Duration) -> CmdOutcome {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CmdOutcome::Missing,
        Err(e) => return CmdOutcome::Failed(format!("cannot start {program}: {e}")),
    };
    // Read stdout on a thread so a chatty command cannot fill the pipe and block forever.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut buf);
        buf
    });
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                // Only the child we spawned is killed, by its pid.
                let _ = child.kill();
                let _ = child.wait();
                return CmdOutcome::Failed(format!(
                    "{program} did not answer within {} s; killed",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return CmdOutcome::Failed(format!("waiting for {program}: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        let msg = String::from_utf8_lossy(&err);
        return CmdOutcome::Failed(format!(
            "{program} {} exited with {status}: {}",
            args.join(" "),
            msg.trim()
        ));
    }
    CmdOutcome::Output(String::from_utf8_lossy(&out).into_owned())
}

/// Everything discovery may look at.
pub struct Env {
    /// Environment variables of the pilot (those that are UTF-8 text).
    pub vars: BTreeMap<String, String>,
    /// Variables slot discovery reads (see [`is_ours`]) whose value is not UTF-8: name -> the
    /// value with invalid bytes replaced, for `problems`. Other non-UTF-8 variables are not
    /// ours to judge and are left out of both maps.
    pub unreadable: BTreeMap<String, String>,
    /// Where absolute paths are resolved ("/" on a real system, a temp dir in tests).
    pub root: PathBuf,
    /// Runs scontrol, squeue, qstat, bjobs.
    pub runner: Box<dyn CommandRunner>,
    /// Unix time of the discovery.
    pub now: i64,
    /// This node's host name (compared by its short form with node files and host lists).
    pub hostname: String,
    /// CPUs this process may run on (sched_getaffinity), the host fallback for cores.
    pub host_cores: Option<u32>,
    /// The offset Slurm's local-time timestamps are in; None means the system's local zone.
    pub local_offset: Option<chrono::FixedOffset>,
}

impl Env {
    /// The live system: process environment, "/", real commands, the clock, the host name.
    pub fn real() -> Env {
        // vars_os, not vars: std::env::vars panics on the first variable that is not UTF-8,
        // and the batch environment is anyone's to fill.
        let (vars, unreadable) = split_vars(std::env::vars_os());
        Env {
            vars,
            unreadable,
            root: PathBuf::from("/"),
            runner: Box::new(SystemRunner),
            now: chrono::Utc::now().timestamp(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            host_cores: affinity_cores(),
            local_offset: None,
        }
    }

    /// A non-empty, trimmed environment variable.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Resolves an absolute path (from a variable or a well-known location) under `root`.
    pub fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        let rel = abs.strip_prefix("/").unwrap_or(abs);
        self.root.join(rel)
    }

    /// Reads a small text file under `root`; Err carries the io error text.
    pub fn read(&self, abs: impl AsRef<Path>) -> std::io::Result<String> {
        std::fs::read_to_string(self.path(abs))
    }

    /// True when `name` (possibly fully qualified) names this host.
    pub fn is_this_host(&self, name: &str) -> bool {
        let short = |s: &str| s.split('.').next().unwrap_or("").to_ascii_lowercase();
        !name.is_empty() && short(name) == short(&self.hostname)
    }
}

/// Prefixes and names of the variables slot discovery reads: the batch systems', machine/job
/// features'. A non-UTF-8 value of one of these is a problem worth reporting; any other
/// variable is none of discovery's business.
const OUR_PREFIXES: [&str; 5] = ["SLURM_", "PBS_", "LSB_", "_CONDOR_", "SGE_"];
const OUR_NAMES: [&str; 6] = [
    "JOB_ID",
    "NSLOTS",
    "PE_HOSTFILE",
    "NCPUS",
    "MACHINEFEATURES",
    "JOBFEATURES",
];

/// True for a variable slot discovery reads or could read (by name or by prefix).
pub fn is_ours(name: &str) -> bool {
    OUR_NAMES.contains(&name) || OUR_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Splits an OS environment into its UTF-8 variables and the ones of ours that are not UTF-8
/// (value shown lossily). A variable whose *name* is not UTF-8 cannot be one of ours.
pub fn split_vars(
    os: impl IntoIterator<Item = (OsString, OsString)>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut vars = BTreeMap::new();
    let mut unreadable = BTreeMap::new();
    for (k, v) in os {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => {
                vars.insert(k, v);
            }
            Err(v) if is_ours(&k) => {
                unreadable.insert(k, v.to_string_lossy().into_owned());
            }
            Err(_) => {}
        }
    }
    (vars, unreadable)
}

/// The number of CPUs in this process's affinity mask (what a cpuset or taskset grants).
fn affinity_cores() -> Option<u32> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let n = (0..CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .count() as u32;
    if n > 0 {
        Some(n)
    } else {
        std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_command_is_missing() {
        let r = run_with_timeout("mupilot-slt-no-such-command", &[], COMMAND_TIMEOUT);
        assert_eq!(r, CmdOutcome::Missing);
    }

    #[test]
    fn output_and_failure_and_timeout() {
        assert_eq!(
            run_with_timeout("sh", &["-c", "echo hi"], COMMAND_TIMEOUT),
            CmdOutcome::Output("hi\n".into())
        );
        assert!(matches!(
            run_with_timeout("sh", &["-c", "echo nope >&2; exit 3"], COMMAND_TIMEOUT),
            CmdOutcome::Failed(m) if m.contains("nope")
        ));
        let t = Instant::now();
        assert!(matches!(
            run_with_timeout("sleep", &["30"], Duration::from_millis(300)),
            CmdOutcome::Failed(m) if m.contains("did not answer")
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn non_utf8_values_are_set_aside_ours_reported_others_ignored() {
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(vec![b'4', 0xff, 0xfe]);
        let (vars, unreadable) = split_vars([
            (OsString::from("SLURM_MEM_PER_NODE"), bad()),
            (OsString::from("LANG_GARBAGE"), bad()),
            (OsString::from_vec(vec![b'X', 0xff]), OsString::from("1")),
            (OsString::from("SLURM_JOB_ID"), OsString::from("77")),
        ]);
        assert_eq!(vars.len(), 1);
        assert_eq!(vars["SLURM_JOB_ID"], "77");
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable["SLURM_MEM_PER_NODE"], "4\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn host_names_compare_short() {
        let mut env = Env::real();
        env.hostname = "wn042.example.org".into();
        assert!(env.is_this_host("wn042"));
        assert!(env.is_this_host("WN042.example.org"));
        assert!(!env.is_this_host("wn043"));
        assert!(!env.is_this_host(""));
    }
}
