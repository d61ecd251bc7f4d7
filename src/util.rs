//! Small checks on untrusted strings, and the logging setup, shared by every program.

/// For a command that only prints (not a daemon): a closed stdout or stderr pipe ends the
/// process quietly by SIGPIPE, as it ends `cat` or `ls` (`mupilot-server status | head -1`).
/// Rust ignores SIGPIPE, so the write would fail with EPIPE and `println!` would panic with a
/// backtrace. Daemons (`serve`, `run`) keep ignoring it: a peer that closes a socket must be
/// an error there, never the end of the process.
#[allow(unsafe_code)] // signal(2)
pub fn exit_quietly_on_broken_pipe() {
    // SAFETY: signal(2) with SIG_DFL only resets a disposition; called at the start of main,
    // before any other thread exists or any handler for SIGPIPE was installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Logs to stderr (the journal under systemd) with the filter from `MUPILOT_LOG` (or
/// `RUST_LOG`; tracing's filter syntax), `info` by default.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MUPILOT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// A name that is safe as one path component and in a URL: 1-64 of `[A-Za-z0-9._-]`, not
/// starting with '.'. Used for payload ids, pilot ids and account names in paths.
pub fn is_safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A relative path that stays below its base: no leading '/', no '..', no empty or '.'
/// components, no NUL.
pub fn is_relative_clean_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_safe_id("p-01.a_b"));
        assert!(!is_safe_id(""));
        assert!(!is_safe_id(".."));
        assert!(!is_safe_id("a/b"));
        assert!(!is_safe_id(&"x".repeat(65)));
    }

    #[test]
    fn paths() {
        assert!(is_relative_clean_path("out/result.txt"));
        assert!(!is_relative_clean_path("/etc/passwd"));
        assert!(!is_relative_clean_path("a/../b"));
        assert!(!is_relative_clean_path("a//b"));
        assert!(!is_relative_clean_path("./a"));
    }
}
