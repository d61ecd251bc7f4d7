//! `mupilot-server`: the reference VO server. All logic lives in `mupilot::server`.

fn main() {
    std::process::exit(mupilot::server::cli::main());
}
