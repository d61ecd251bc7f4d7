//! `mupilot`: the pilot agent. All logic lives in `mupilot::pilot`.

#![forbid(unsafe_code)]

fn main() {
    std::process::exit(mupilot::pilot::cli::main());
}
