//! One `mupilot-glexec` run against the helper: hello, the `glexec` request with the proxy
//! files and the stdio descriptors, then events until the command ends, forwarding the
//! signals a batch system or framework sends (TERM, INT, HUP, QUIT, USR1, USR2, XCPU) to the
//! command's whole cgroup. If this process dies, the helper sees the connection close and
//! kills the command: nothing outlives its caller.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::stdio::{self, Stream};
use super::{exit_code_of, Invocation, EXIT_AUTHZ, EXIT_CLIENT, EXIT_SYSTEM};
use crate::protocol::switch_wire::{
    read_frame, write_frame, DenialClass, ExitReport, GlexecRequest, PilotHello, SwitchEvent,
    SwitchRequest, WireError, MAX_REQUEST_FRAME,
};

/// The signals forwarded to the command.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGXCPU,
];

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("mupilot-glexec: {msg}");
    code
}

/// Runs the invocation to its end; returns the exit code (a command killed by a signal ends
/// this process with that signal instead).
pub fn run(inv: &Invocation) -> i32 {
    // Blocked before any thread starts (the relays inherit the mask), read from a signalfd.
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    if let Err(e) = mask.thread_block() {
        return fail(EXIT_SYSTEM, format!("cannot block signals: {e}"));
    }
    let signals = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_SYSTEM, format!("signalfd: {e}")),
    };
    // A relay writing to a caller that went away gets EPIPE, not death.
    // SAFETY: setting a signal's disposition to ignore installs no handler code.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn);
    }

    // The proxy files, opened as the caller, so a link is followed with the caller's rights
    // only (the helper checks type, owner, mode and size on the open file). Non-blocking: a
    // FIFO or a device named there must not hang the caller; the helper refuses it.
    let open = |var: &str, path: &std::path::Path| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map(OwnedFd::from)
            .map_err(|e| {
                fail(
                    EXIT_CLIENT,
                    format!("{var} {}: cannot open: {e}", path.display()),
                )
            })
    };
    let client_cert = match open("GLEXEC_CLIENT_CERT", &inv.client_cert) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let source_proxy = match inv
        .source_proxy
        .as_deref()
        .map(|p| open("GLEXEC_SOURCE_PROXY", p))
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(code)) => return code,
    };
    let mut streams: Vec<Option<Stream>> = Vec::new();
    for fd in 0..3 {
        match stdio::stream(fd) {
            Ok(s) => streams.push(s),
            Err(e) => return fail(EXIT_SYSTEM, format!("cannot set up fd {fd}: {e}")),
        }
    }

    let mut sock = match UnixStream::connect(&inv.socket) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                EXIT_SYSTEM,
                format!(
                    "cannot reach the site's helper at {}: {e}; is mupilot-switch installed and its socket started?",
                    inv.socket.display()
                ),
            )
        }
    };
    let hello = PilotHello {
        pilot_id: format!("glexec-{}", std::process::id()),
        ..Default::default()
    };
    if let Err(code) = say_hello(&mut sock, hello) {
        return code;
    }

    // The request: descriptors by index.
    let mut fds: Vec<RawFd> = vec![client_cert.as_raw_fd()];
    let mut index = |fd: Option<RawFd>| {
        fd.map(|f| {
            fds.push(f);
            fds.len() - 1
        })
    };
    let source_proxy_fd = index(source_proxy.as_ref().map(|f| f.as_raw_fd()));
    let [i0, i1, i2] = [0, 1, 2].map(|i| index(streams[i].as_ref().map(|s| s.pass.as_raw_fd())));
    let req = SwitchRequest::Glexec(GlexecRequest {
        argv: inv.argv.clone(),
        env: inv.env.clone(),
        client_cert_fd: 0,
        source_proxy_fd,
        stdin_fd: i0,
        stdout_fd: i1,
        stderr_fd: i2,
    });
    // The helper reads at most MAX_REQUEST_FRAME: say so here rather than be cut off there.
    let size = serde_json::to_vec(&req).map_or(0, |b| b.len());
    if size > MAX_REQUEST_FRAME {
        return fail(
            EXIT_CLIENT,
            format!(
                "the command and the environment come to {size} bytes, more than the helper accepts ({MAX_REQUEST_FRAME}); pass large data in files (GLEXEC_ENV included)"
            ),
        );
    }
    if let Err(e) = write_frame(&mut sock, &req, &fds) {
        return fail(EXIT_SYSTEM, format!("cannot send the request: {e}"));
    }
    // Our copies of what was passed close now, so the relays see end of file when the
    // command's processes are gone.
    drop((client_cert, source_proxy));
    let relays: Vec<_> = streams
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s.relay)))
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();

    let outcome = converse(&mut sock, &signals);
    // stdout and stderr drained before the status is given (a stdin relay may be blocked
    // reading a terminal: it ends with the process).
    for (i, r) in relays {
        if i > 0 {
            let _ = r.join();
        }
    }
    match outcome {
        Outcome::Code(c) => c,
        Outcome::Signal(sig) => die_of(sig),
    }
}

enum Outcome {
    Code(i32),
    Signal(i32),
}

fn say_hello(sock: &mut UnixStream, hello: PilotHello) -> Result<(), i32> {
    if let Err(e) = write_frame(sock, &SwitchRequest::Hello(hello), &[]) {
        return Err(fail(EXIT_SYSTEM, format!("cannot talk to the helper: {e}")));
    }
    match read_frame::<SwitchEvent>(sock) {
        Ok((SwitchEvent::Welcome { .. }, _)) => Ok(()),
        // The one refusal of a hello that is a decision about the caller.
        Ok((SwitchEvent::Error { reason }, _)) if reason.contains("allowed_pilots") => Err(fail(
            EXIT_AUTHZ,
            format!("the helper refused this account: {reason}"),
        )),
        Ok((SwitchEvent::Error { reason }, _)) => {
            Err(fail(EXIT_SYSTEM, format!("the helper refused: {reason}")))
        }
        Ok((other, _)) => Err(fail(
            EXIT_SYSTEM,
            format!("unexpected answer to hello: {other:?}"),
        )),
        Err(e) => Err(fail(EXIT_SYSTEM, format!("no answer to hello: {e}"))),
    }
}

/// Events until the command's end. A signal that comes before the helper said `started`
/// (the command may already print, since its stdout is the caller's) is queued, one of each
/// kind as the kernel keeps them, and forwarded as soon as `started` is read: in the same
/// turn of the loop, since nothing else may wake it before the command ends.
fn converse(sock: &mut UnixStream, signals: &SignalFd) -> Outcome {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut payload_id: Option<String> = None;
    let mut pending = Pending::default();
    loop {
        let (sock_ready, sig_ready) = {
            let mut p = [
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut p, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Outcome::Code(fail(EXIT_SYSTEM, format!("poll: {e}"))),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&p[0]), ready(&p[1]))
        };
        if sig_ready {
            if let Ok(Some(info)) = signals.read_signal() {
                pending.push(info.ssi_signo as i32);
            }
        }
        if sock_ready {
            match read_frame::<SwitchEvent>(sock) {
                Ok((SwitchEvent::Started { payload_id: id, .. }, _)) => payload_id = Some(id),
                Ok((SwitchEvent::Exited { report, .. }, _)) => return exited(&report),
                Ok((SwitchEvent::Denied { class, reason, .. }, _)) => {
                    let code = match class {
                        DenialClass::Caller => EXIT_CLIENT,
                        DenialClass::System => EXIT_SYSTEM,
                        DenialClass::Authorization => EXIT_AUTHZ,
                    };
                    return Outcome::Code(fail(
                        code,
                        format!("{} refused: {reason}", class.as_str()),
                    ));
                }
                Ok((SwitchEvent::Signalled { ok: false, reason, .. }, _)) => {
                    eprintln!(
                        "mupilot-glexec: a forwarded signal was not delivered: {}",
                        reason.unwrap_or_default()
                    );
                }
                Ok((SwitchEvent::Error { reason }, _)) => {
                    return Outcome::Code(fail(EXIT_SYSTEM, format!("the helper: {reason}")))
                }
                Ok(_) => {}
                Err(WireError::Closed) => {
                    return Outcome::Code(fail(
                        EXIT_SYSTEM,
                        "the helper closed the connection before the command ended (it was stopped); the command was killed",
                    ))
                }
                Err(e) => {
                    return Outcome::Code(fail(EXIT_SYSTEM, format!("helper connection: {e}")))
                }
            }
        }
        // After the event: a signal queued before `started` leaves in this very turn.
        if let Some(id) = &payload_id {
            for signal in pending.take() {
                let req = SwitchRequest::Signal {
                    payload_id: id.clone(),
                    signal,
                    reason: Some("forwarded by mupilot-glexec".into()),
                };
                if let Err(e) = write_frame(sock, &req, &[]) {
                    return Outcome::Code(fail(
                        EXIT_SYSTEM,
                        format!("cannot forward a signal: {e}"),
                    ));
                }
            }
        }
    }
}

/// Signals waiting for the command to run, in the order they came, each kind once (as the
/// kernel keeps standard signals pending): a flood before `started` costs nothing.
#[derive(Debug, Default)]
struct Pending(Vec<i32>);

impl Pending {
    fn push(&mut self, signal: i32) {
        if !self.0.contains(&signal) {
            self.0.push(signal);
        }
    }

    fn take(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.0)
    }
}

/// The command's status as gLExec gave it.
fn exited(r: &ExitReport) -> Outcome {
    match (r.exit_code, r.signal) {
        (Some(c), _) => Outcome::Code(exit_code_of(c)),
        (None, Some(s)) => Outcome::Signal(s),
        (None, None) => Outcome::Code(fail(
            EXIT_SYSTEM,
            format!(
                "the helper reported neither an exit code nor a signal ({})",
                r.kill_reason.as_deref().unwrap_or("no reason")
            ),
        )),
    }
}

/// Ends this process with the command's signal, so the caller's wait status says what a
/// directly exec'd command's would (gLExec exec'd the command in its own process): no core
/// file of ours; 128 + the signal if it does not end us.
fn die_of(sig: i32) -> i32 {
    use nix::sys::resource::{setrlimit, Resource};
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    if let Ok(s) = Signal::try_from(sig) {
        // SAFETY: restores the default disposition; no handler code is installed.
        unsafe {
            let _ = nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl);
        }
        let mut set = SigSet::empty();
        set.add(s);
        let _ = set.thread_unblock();
        let _ = nix::sys::signal::raise(s);
    }
    128 + sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_signals_keep_their_order_and_each_kind_once() {
        let mut p = Pending::default();
        for s in [15, 10, 15, 15, 2, 10] {
            p.push(s);
        }
        assert_eq!(p.take(), [15, 10, 2]);
        assert!(p.take().is_empty());
    }
}
