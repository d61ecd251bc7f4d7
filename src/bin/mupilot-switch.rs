//! `mupilot-switch`: the site's identity-switching helper (root).
//!
//! `mupilot-switch stage` is the re-exec'd, single-threaded stage process that builds one
//! payload's sandbox, and `mupilot-switch stage-factory` the single-threaded process that forks
//! such stages ahead of time; both are dispatched before anything else runs (no threads, no
//! logging setup), so the privileged steps happen in a process that never had a second thread.

#![deny(unsafe_code)]

fn main() {
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("stage") => std::process::exit(mupilot::switch::sandbox::stage_main()),
        Some("stage-factory") => std::process::exit(mupilot::switch::sandbox::stage_factory_main()),
        _ => {}
    }
    // The helper runs a thread per running payload, and glibc gives threads arenas of their
    // own, up to 8 per CPU, each keeping its pages: on a 64-CPU node with 64 payloads that made
    // the helper 12 MiB instead of 9 (docs/benchmarks.md). Those threads mostly wait on
    // sockets; two arenas serve them without contention.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)] // mallopt(3): libc has no safe binding
    // SAFETY: mallopt only sets a tunable of glibc's allocator, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    std::process::exit(mupilot::switch::cli::main());
}
