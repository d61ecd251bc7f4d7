//! `mupilot-glexec`: the gLExec-compatible entry (no setuid bit; the site's helper switches
//! identity). See `mupilot::glexec`.

fn main() {
    std::process::exit(mupilot::glexec::main());
}
