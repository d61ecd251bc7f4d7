//! The privileged helper links no HTTP, TLS, server or SQL code (ARCHITECTURE: "the helper
//! must stay small"). Checked on the built binaries' symbol tables; the server binary is the
//! control that shows the check can see those crates at all.

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "rustls::",
    "reqwest::",
    "hyper::",
    "hyper_util::",
    "axum::",
    "tokio_rustls::",
    "rusqlite::",
    "tokio::",
    "rcgen::",
];

fn symbols(bin: &str) -> String {
    let out = Command::new("nm")
        .args(["-C", "--defined-only", bin])
        .output()
        .expect("nm (binutils) is installed");
    assert!(out.status.success(), "nm {bin} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn forbidden_in(syms: &str) -> Vec<&'static str> {
    FORBIDDEN
        .iter()
        .copied()
        .filter(|c| {
            syms.lines()
                .any(|l| l.contains(&format!(" {c}")) || l.contains(&format!("<{c}")))
        })
        .collect()
}

#[test]
fn helper_binary_links_no_http_tls_or_server_code() {
    let helper = symbols(env!("CARGO_BIN_EXE_mupilot-switch"));
    assert_eq!(forbidden_in(&helper), Vec::<&str>::new());
    let server = symbols(env!("CARGO_BIN_EXE_mupilot-server"));
    assert!(
        forbidden_in(&server).contains(&"rustls::"),
        "the check must see rustls in the server binary"
    );
}
