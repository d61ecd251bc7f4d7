//! One concise syslog line (facility authpriv) per identity switch, next to the audit log, so
//! the site's central log collection sees every switch even if the local audit file is lost.
//! Only formats and sends lines; never fails the caller (syslog(3) drops lines when no daemon
//! listens).

use std::ffi::CString;
use std::sync::Once;

static OPEN: Once = Once::new();

/// Identity passed to openlog(3); must outlive every syslog call, hence static.
static IDENT: &std::ffi::CStr = c"mupilot-switch";

/// Opens the connection to syslog once (LOG_PID, facility LOG_AUTHPRIV).
pub fn open() {
    OPEN.call_once(|| {
        // SAFETY: IDENT is a 'static NUL-terminated string, as openlog(3) requires (it keeps
        // the pointer); the flags and facility are valid constants.
        unsafe {
            libc::openlog(
                IDENT.as_ptr(),
                libc::LOG_PID | libc::LOG_NDELAY,
                libc::LOG_AUTHPRIV,
            )
        };
    });
}

/// Sends one line at `LOG_INFO` (or `LOG_NOTICE` when `notice`). NUL bytes are replaced.
pub fn line(notice: bool, msg: &str) {
    open();
    let msg = CString::new(msg.replace('\0', "?")).expect("NUL bytes were replaced");
    let prio = libc::LOG_AUTHPRIV
        | if notice {
            libc::LOG_NOTICE
        } else {
            libc::LOG_INFO
        };
    // SAFETY: the format is a constant "%s" and the only argument is a valid NUL-terminated
    // string that lives across the call, so syslog(3) reads exactly one C string.
    unsafe { libc::syslog(prio, c"%s".as_ptr(), msg.as_ptr()) };
}

/// Quotes a DN for a syslog line (`"` and `\` escaped) so a DN cannot forge fields.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
