//! `mupilot-glexec`: the gLExec-compatible entry for pilot frameworks that still call
//! `glexec COMMAND [ARGS]` with `GLEXEC_CLIENT_CERT` set. No setuid bit: it runs as the
//! calling pilot account and asks the site's helper (`glexec` request on its socket) to run
//! the command as the proxy's owner in the helper's sandbox, passing the proxy files and its
//! stdin/stdout/stderr as descriptors, forwarding signals, and exiting as gLExec did: the
//! command's status, or 201 (client error), 202 (system error), 203 (authorization failure),
//! 204 (the command itself exited 201-204).
//!
//! Rooms: [`stdio`] (which descriptors the payload gets, relays for terminals and sockets),
//! [`session`] (the conversation with the helper and the signals). Must not reach the helper's
//! or the server's code: it speaks `protocol::switch_wire` only.

mod session;
mod stdio;

use std::path::PathBuf;

/// The command finished but gLExec's own codes would be ambiguous (it exited 201-204).
pub const EXIT_PAYLOAD_OVERLAP: i32 = 204;
/// Something the caller must change: no or unusable proxy file, no command, bad stdio.
pub const EXIT_CLIENT: i32 = 201;
/// The site's side failed: no helper, entry not enabled, sandbox or account problems.
pub const EXIT_SYSTEM: i32 = 202;
/// A local authorization decision said no: proxy refused, banned, no mapping, not allowed.
pub const EXIT_AUTHZ: i32 = 203;

/// Where the helper listens unless `MUPILOT_SWITCH_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mupilot/switch.sock";

/// The command line, for `--help` and the man page. The command and its arguments are taken
/// verbatim (no option of ours after the command's name).
pub fn command() -> clap::Command {
    clap::Command::new("mupilot-glexec")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Run a command as the owner of a grid proxy, gLExec-compatibly, through the site's mupilot-switch")
        .long_about(
            "Runs COMMAND as the local account the site maps the owner of the proxy in \
             GLEXEC_CLIENT_CERT to, in mupilot-switch's sandbox, with this process's stdin, \
             stdout and stderr, and exits with the command's status. A drop-in for gLExec's \
             `glexec COMMAND [ARGS]`; not setuid: the site's helper verifies the proxy, \
             authorizes, maps and audits. The site enables it in switch.toml's [glexec] table.",
        )
        .after_long_help(
            "ENVIRONMENT:\n  \
             GLEXEC_CLIENT_CERT   the proxy file naming the user: certificate chain and private key, a regular file owned by the caller, mode 0600, at most 64 KiB (opened by mupilot-glexec with the caller's rights, so a link is followed only as far as the caller may); X509_USER_PROXY when unset\n  \
             GLEXEC_SOURCE_PROXY  the proxy delivered to the command (default: GLEXEC_CLIENT_CERT); same owner and VO, with its key, the same file rules\n  \
             GLEXEC_TARGET_PROXY  ignored: the proxy lands in the command's scratch directory as x509up (0600, the account's), named by X509_USER_PROXY\n  \
             GLEXEC_*, TZ         passed to the command (GLEXEC_ENV carries a wrapped environment), with the site's glexec.preserve_env\n  \
             MUPILOT_SWITCH_SOCKET  the helper's socket (default /run/mupilot/switch.sock)\n\n\
             SIGNALS:\n  \
             TERM, INT, HUP, QUIT, USR1, USR2 and XCPU are forwarded to every process of the command; one that comes before the command runs is kept and forwarded once it does. If mupilot-glexec is killed, the helper kills the command.\n\n\
             EXIT STATUS:\n  \
             the command's own status; a command killed by a signal kills mupilot-glexec with the same signal\n  \
             201  client error: no or unusable proxy file, no command, the command cannot be executed by the account\n  \
             202  system error: the helper unreachable, the entry not enabled, no [grid] table, no free pool account, sandbox failures\n  \
             203  authorization failure: the proxy refused, another VO, banned, no mapping, this pilot not allowed\n  \
             204  the command itself exited 201, 202, 203 or 204",
        )
        .arg(
            clap::Arg::new("command")
                .value_name("COMMAND")
                .num_args(1..)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
                .required(true)
                .help("The command and its arguments (looked up in the command's PATH)"),
        )
}

/// What the caller asked for, read from the command line and the environment.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub argv: Vec<String>,
    pub client_cert: PathBuf,
    /// Only when it names another file than `client_cert`.
    pub source_proxy: Option<PathBuf>,
    pub socket: PathBuf,
    pub env: std::collections::BTreeMap<String, String>,
}

/// Reads the invocation; `Err` is the message for a client error (201).
pub fn invocation(args: Vec<String>) -> Result<Invocation, String> {
    if args.is_empty() {
        return Err("no command given; usage: mupilot-glexec COMMAND [ARGUMENTS]".into());
    }
    let env: std::collections::BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let var = |n: &str| env.get(n).filter(|v| !v.is_empty()).map(PathBuf::from);
    let client_cert = var("GLEXEC_CLIENT_CERT").or_else(|| var("X509_USER_PROXY")).ok_or(
        "no proxy: set GLEXEC_CLIENT_CERT to the payload owner's proxy file (X509_USER_PROXY is used when it is unset)",
    )?;
    let source_proxy = var("GLEXEC_SOURCE_PROXY").filter(|s| *s != client_cert);
    Ok(Invocation {
        argv: args,
        client_cert,
        source_proxy,
        socket: var("MUPILOT_SWITCH_SOCKET").unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        env,
    })
}

/// The exit code gLExec gave for a command's own exit code.
pub fn exit_code_of(code: i32) -> i32 {
    if (EXIT_CLIENT..=EXIT_PAYLOAD_OVERLAP).contains(&code) {
        EXIT_PAYLOAD_OVERLAP
    } else {
        code
    }
}

/// `mupilot-glexec`'s main: returns the exit code (or ends the process with the command's
/// signal).
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            let _ = command().print_long_help();
            return 0;
        }
        Some("-v" | "-V" | "--version") => {
            println!("mupilot-glexec {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        _ => {}
    }
    let inv = match invocation(args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("mupilot-glexec: {e}");
            return EXIT_CLIENT;
        }
    };
    session::run(&inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_codes_that_look_like_ours_become_204() {
        assert_eq!(
            [0, 1, 126, 200, 201, 202, 203, 204, 205].map(exit_code_of),
            [0, 1, 126, 200, 204, 204, 204, 204, 205]
        );
    }

    #[test]
    fn the_command_is_taken_verbatim() {
        let m = command()
            .try_get_matches_from(["mupilot-glexec", "/bin/sh", "-c", "echo --help"])
            .unwrap();
        let got: Vec<&String> = m.get_many("command").unwrap().collect();
        assert_eq!(got, ["/bin/sh", "-c", "echo --help"]);
        assert!(invocation(vec![]).unwrap_err().contains("no command"));
    }
}
