//! The generated man pages and completions (examples/gen-docs) cover every command: one page
//! per program and subcommand, each rendering with `man -l` (man-db, installed by
//! scripts/test.sh) without warnings, and completions that name every subcommand.

use std::path::Path;
use std::process::Command;

#[path = "../examples/gen-docs/generate.rs"]
mod generate;

/// `(page name, subcommand names)` of `cmd` and every visible subcommand below it.
fn commands(cmd: &clap::Command, out: &mut Vec<(String, Vec<String>)>) {
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    out.push((
        cmd.get_display_name().unwrap_or(cmd.get_name()).to_string(),
        subs.iter().map(|s| s.get_name().to_string()).collect(),
    ));
    for s in subs {
        commands(s, out);
    }
}

#[test]
fn every_command_has_a_page_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let written = generate::write_all(dir.path()).unwrap();
    let man = dir.path().join("man");
    let mut expected = Vec::new();
    for (name, section, command) in generate::PROGRAMS {
        let mut cmd = command().disable_help_subcommand(true);
        cmd.build();
        let mut all = Vec::new();
        commands(&cmd, &mut all);
        // mupilot-glexec takes a command, as gLExec did: one page, no subcommands.
        assert!(
            all.len() > 3 || name == "mupilot-glexec",
            "{name} has subcommands: {all:?}"
        );
        for (page, subs) in all {
            let file = man.join(format!("{page}.{section}"));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("no page {}: {e}", file.display()));
            assert!(text.contains(".SH NAME"), "{}", file.display());
            // A parent page lists its subcommands by their pages' names (roff escapes '-').
            let plain = text.replace("\\-", "-");
            for s in &subs {
                assert!(
                    plain.contains(&format!("{page}-{s}({section})")),
                    "{page} lists {s}"
                );
            }
            expected.push(file);
        }
        for (sub, file) in [
            ("bash", name.to_string()),
            ("zsh", format!("_{name}")),
            ("fish", format!("{name}.fish")),
        ] {
            let f = dir.path().join("completions").join(sub).join(file);
            let text = std::fs::read_to_string(&f).unwrap();
            for s in command().get_subcommands() {
                assert!(
                    text.contains(s.get_name()),
                    "{} completes {}",
                    f.display(),
                    s.get_name()
                );
            }
            expected.push(f);
        }
    }
    let mut pages: Vec<_> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let mut want: Vec<_> = expected
        .iter()
        .filter(|p| p.starts_with(&man))
        .cloned()
        .collect();
    want.sort();
    assert_eq!(pages, want, "exactly one page per command, no `help` pages");
    assert_eq!(written.len(), expected.len());
    for p in [
        "mupilot.1",
        "mupilot-trace-show.1",
        "mupilot-switch-check-config.8",
        "mupilot-server-init.8",
    ] {
        assert!(man.join(p).exists(), "{p}");
    }

    // The bash completion parses.
    let st = Command::new("bash")
        .arg("-n")
        .arg(dir.path().join("completions/bash/mupilot-switch"))
        .status()
        .unwrap();
    assert!(st.success());

    // man renders every page (man-db's `man -l`, through groff) and says nothing on stderr.
    for p in &pages {
        assert!(render(p).contains("NAME"), "{}", p.display());
    }
    let out = render(&man.join("mupilot-switch-check-config.8"));
    assert!(out.contains("mupilot-switch-check-config"), "{out}");
    assert!(out.contains("--config"), "{out}");
    let out = render(&man.join("mupilot-switch.8"));
    assert!(
        out.contains("check-config") && out.contains("Exit codes"),
        "{out}"
    );
}

fn render(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man (man-db) is installed");
    assert!(out.status.success(), "man -l {}: {:?}", page.display(), out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().is_empty(),
        "man -l {} warned: {err}",
        page.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
