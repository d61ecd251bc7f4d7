//! Delivery of a notification through the optional `notify_command` (a mail hook, a ticket
//! system): the command runs with the notification as one JSON object on stdin, without a
//! shell, with a time limit. The notification row is the authority and exists before the
//! hook runs (it commits with the reinstatement); the hook's outcome is recorded on it, so a
//! failed delivery shows in `membership notifications` instead of blocking a reinstatement.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::types::Notification;

/// How long the hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `argv` with `n` on stdin; returns the delivery text to record (`delivered ...` or
/// `failed: ...`).
pub fn deliver(argv: &[String], n: &Notification) -> String {
    let started = Instant::now();
    let mut child = match Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return format!("failed: cannot run {}: {e}", argv[0]),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let body = serde_json::to_vec(n).expect("notifications serialise");
        // A hook that does not read its stdin still gets to finish.
        let _ = stdin.write_all(&body);
    }
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => {
                return format!(
                    "delivered by {} at {}",
                    argv[0],
                    crate::records::now_rfc3339()
                )
            }
            Ok(Some(st)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.by_ref().take(512).read_to_string(&mut err);
                }
                return format!("failed: {} exited with {st}: {}", argv[0], err.trim());
            }
            Ok(None) if started.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return format!(
                    "failed: {} did not finish within {} s and was killed",
                    argv[0],
                    HOOK_TIMEOUT.as_secs()
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return format!("failed: waiting for {}: {e}", argv[0]),
        }
    }
}
