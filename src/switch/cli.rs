//! Command-line entry point (phase-0 placeholder, replaced by the real CLI).

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    eprintln!("not built yet");
    2
}
