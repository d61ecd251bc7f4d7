//! `cargo run --example gen-docs -- DIR`: writes the man pages and shell completions of
//! `mupilot`, `mupilot-switch` and `mupilot-server` below DIR (`DIR/man`, `DIR/completions`)
//! for packaging to install. A build-time generator rather than a flag of the binaries: the
//! root helper stays free of roff and completion code it would never run on a node.

mod generate;

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!(
            "usage: cargo run --example gen-docs -- DIR   (writes DIR/man and DIR/completions)"
        );
        std::process::exit(2);
    };
    match generate::write_all(std::path::Path::new(&dir)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
        }
        Err(e) => {
            eprintln!(
                "gen-docs: cannot write below {}: {e}",
                std::path::Path::new(&dir).display()
            );
            std::process::exit(1);
        }
    }
}
