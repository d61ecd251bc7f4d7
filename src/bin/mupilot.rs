//! `mupilot`: the pilot agent. All logic lives in `mupilot::pilot`.

fn main() {
    std::process::exit(mupilot::pilot::cli::main());
}
