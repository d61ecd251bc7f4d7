//! Man pages and shell completions of the three programs, generated from their clap
//! definitions, so they cannot drift from the binaries: one page per command and subcommand
//! (`mupilot-switch.8`, `mupilot-switch-audit-who.8`, ...; the daemons in section 8, the
//! pilot in section 1) and bash, zsh and fish completions, named as they are installed.
//!
//! Shared by `examples/gen-docs` (what packaging runs) and the tests that check the output.
//! Writes only below the directory it is given.

use std::io;
use std::path::{Path, PathBuf};

/// A program: its name, its man section and its command-line definition.
pub type Program = (&'static str, &'static str, fn() -> clap::Command);

/// The four programs (`mupilot-glexec`, the gLExec-compatible client, in section 1: the pilot
/// account runs it).
pub const PROGRAMS: [Program; 4] = [
    ("mupilot", "1", mupilot::pilot::cli::command),
    ("mupilot-switch", "8", mupilot::switch::cli::command),
    ("mupilot-server", "8", mupilot::server::cli::command),
    ("mupilot-glexec", "1", mupilot::glexec::command),
];

/// Writes `DIR/man/<page>.<section>` and `DIR/completions/{bash,zsh,fish}/...`; returns every
/// file written.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    for (name, section, command) in PROGRAMS {
        // `help` is not a subcommand worth a page; building propagates the display names
        // (`mupilot-switch-audit-who`) the pages are named by.
        let mut cmd = command().disable_help_subcommand(true);
        cmd.build();
        pages(&cmd, section, &man, &mut written)?;
        for (shell, sub, file) in [
            (clap_complete::Shell::Bash, "bash", name.to_string()),
            (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
            (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let d = dir.join("completions").join(sub);
            std::fs::create_dir_all(&d)?;
            let path = d.join(file);
            let mut f = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut command(), name, &mut f);
            written.push(path);
        }
    }
    Ok(written)
}

fn pages(cmd: &clap::Command, section: &str, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, section, dir, out)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section(section)
        .source(format!("mupilot {}", env!("CARGO_PKG_VERSION")))
        .manual("mupilot");
    out.push(man.generate_to(dir)?);
    Ok(())
}
