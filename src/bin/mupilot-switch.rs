//! `mupilot-switch`: the site's identity-switching helper (root).
//!
//! `mupilot-switch stage` is the re-exec'd, single-threaded stage process that builds one
//! payload's sandbox; it is dispatched before anything else runs (no threads, no logging
//! setup), so the privileged steps happen in a process that never had a second thread.

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("stage")) {
        std::process::exit(mupilot::switch::sandbox::stage_main());
    }
    std::process::exit(mupilot::switch::cli::main());
}
