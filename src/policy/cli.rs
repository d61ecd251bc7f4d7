//! `mupilot-switch policy check FILE...` and `policy eval --policy FILE... --request FILE|-`.
//! The argument parsing is the helper CLI's; these functions do the work and return the exit
//! code: 0 valid / permit, 3 deny, 2 bad policy or request.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::eval::{combine, Decision};
use super::index::Policy;
use super::request::Request;

/// Exit code: every file valid / permit.
pub const EXIT_OK: i32 = 0;
/// Exit code: a policy or the request is malformed or unreadable.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code: the request is denied.
pub const EXIT_DENY: i32 = 3;

/// `policy check FILE...`: exit 0 when every file is valid, 2 otherwise.
pub fn check_main(files: &[PathBuf]) -> i32 {
    check(
        files,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// `policy eval --policy FILE... --request FILE|-`: exit 0 permit, 3 deny, 2 bad input.
pub fn eval_main(policies: &[PathBuf], request: &Path) -> i32 {
    eval(
        policies,
        request,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// [`check_main`] with explicit streams: a summary line per valid file on `out`, every error as
/// `file:line:column: message (hint: ...)` on `err`.
pub fn check(files: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    if files.is_empty() {
        let _ = writeln!(
            err,
            "policy check: no file given (hint: mupilot-switch policy check FILE...)"
        );
        return EXIT_BAD_INPUT;
    }
    let mut code = EXIT_OK;
    for file in files {
        match Policy::load(file) {
            Ok(p) => {
                let sets: usize = p.statements().iter().map(|s| s.sets.len()).sum();
                let _ = writeln!(
                    out,
                    "{}: ok ({} statements, {} assertion sets)",
                    file.display(),
                    p.statements().len(),
                    sets
                );
            }
            Err(e) => {
                code = EXIT_BAD_INPUT;
                let _ = writeln!(err, "{}", e);
            }
        }
    }
    code
}

/// [`eval_main`] with explicit streams; `-` reads the request from `stdin`.
pub fn eval(
    policies: &[PathBuf],
    request: &Path,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    if policies.is_empty() {
        let _ = writeln!(
            err,
            "policy eval: no --policy given (hint: --policy site.policy [--policy vo.policy])"
        );
        return EXIT_BAD_INPUT;
    }
    let mut loaded = Vec::new();
    let mut bad = false;
    for file in policies {
        match Policy::load(file) {
            Ok(p) => loaded.push(p),
            Err(e) => {
                bad = true;
                let _ = writeln!(err, "{}", e);
            }
        }
    }
    let text = if request == Path::new("-") {
        let mut s = String::new();
        stdin.read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(request)
    };
    let request_name = request.display().to_string();
    let parsed = match text {
        Ok(t) => Request::from_json(&t).map_err(|e| format!("{request_name}: {e}")),
        Err(e) => Err(format!(
            "cannot read request {request_name}: {e} (hint: give a JSON file or - for stdin)"
        )),
    };
    let req = match parsed {
        Ok(r) => r,
        Err(message) => {
            let _ = writeln!(err, "{message}");
            return EXIT_BAD_INPUT;
        }
    };
    if bad {
        return EXIT_BAD_INPUT;
    }
    let decisions: Vec<(String, Decision)> = loaded
        .iter()
        .map(|p| (p.name().to_string(), p.decide(&req)))
        .collect();
    let labelled: Vec<(&str, Decision)> = decisions
        .iter()
        .map(|(l, d)| (l.as_str(), d.clone()))
        .collect();
    let decision = combine(&labelled);
    let _ = writeln!(out, "{}", decision.to_json());
    if decision.is_permit() {
        EXIT_OK
    } else {
        EXIT_DENY
    }
}
