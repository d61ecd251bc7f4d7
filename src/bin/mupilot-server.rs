//! `mupilot-server`: the reference VO server. All logic lives in `mupilot::server`.

#![forbid(unsafe_code)]

fn main() {
    std::process::exit(mupilot::server::cli::main());
}
