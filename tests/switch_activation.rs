//! Socket activation of the real `mupilot-switch`: a listening socket passed as fd 3 with
//! LISTEN_FDS/LISTEN_PID (through `systemd-socket-activate` when installed, else a python
//! wrapper doing the same), and the configured socket path ignored meanwhile; and variables
//! meant for another process ignored.

mod switch_support;

use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switch_support::*;

fn activated(site: &Site, listen: &std::path::Path) -> Daemon {
    let log = site.path("activated.log");
    let mut cmd = if std::path::Path::new("/usr/bin/systemd-socket-activate").exists() {
        let mut c = Command::new("/usr/bin/systemd-socket-activate");
        c.arg("-l").arg(listen).arg(BIN);
        c
    } else {
        const WRAP: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"#;
        let mut c = Command::new("/usr/bin/python3");
        c.arg("-c").arg(WRAP).arg(listen).arg(BIN);
        c
    };
    let child = cmd
        .args(["serve", "--config"])
        .arg(&site.config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listen.exists() {
        assert!(
            Instant::now() < deadline,
            "activator did not create {}",
            listen.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

#[test]
fn socket_from_systemd_activation_answers_hello() {
    let _u = Users::acquire();
    let site = Site::new();
    let listen = site.path("activated.sock");
    let d = activated(&site, &listen);
    let c = Client::hello(&listen, Client::default_hello());
    drop(c);
    // A second connection is served by the same daemon.
    let _c = Client::hello(&listen, Client::default_hello());
    assert!(
        !site.socket.exists(),
        "the configured socket path must be ignored under socket activation"
    );
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("socket passed by systemd"), "{log}");
    d.stop();
}

#[test]
fn activation_variables_for_another_process_are_ignored() {
    let _u = Users::acquire();
    let site = Site::new();
    let log = site.path("not-for-us.log");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&site.config)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
    d.wait_for_socket(&site.socket);
    let meta = std::fs::symlink_metadata(&site.socket).unwrap();
    assert!(meta.file_type().is_socket());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    let _c = Client::hello(&site.socket, Client::default_hello());
    d.stop();
    // The daemon removes its socket when it stops.
    assert!(!site.socket.exists());
    // A helper killed hard leaves a stale socket, which does not block a restart; a live
    // helper on the same path does.
    let mut d = site.start();
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    assert!(site.socket.exists());
    let d = site.start();
    let _c = Client::hello(&site.socket, Client::default_hello());
    let (code, out) = {
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&site.config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("in use by a running helper"), "{out}");
    d.stop();
}
