//! The privileged helper links no HTTP, TLS, server or SQL code (ARCHITECTURE: "the helper
//! must stay small"). The build enforces it (features per program, tests/build_boundaries.rs);
//! this checks what that leaves to the linker: the helper as `cargo build` makes it, with every
//! program's feature on in the library, keeps none of those crates' symbols, and of the OpenSSL
//! that grid verification links it imports no TLS function (no feature can separate libssl from
//! libcrypto). Checked on the built binaries' symbol tables; the server binary is the control
//! that shows the check can see those crates at all.

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

/// The helper verifies grid proxies with OpenSSL's certificate code (src/grid), which
/// openssl-sys links together with libssl; it must call no TLS function of it: the only libssl
/// symbol it may import is the library's initialiser.
#[cfg(feature = "grid")]
#[test]
fn helper_calls_no_openssl_tls_function() {
    let out = Command::new("nm")
        .args([
            "-D",
            "--undefined-only",
            env!("CARGO_BIN_EXE_mupilot-switch"),
        ])
        .output()
        .expect("nm (binutils) is installed");
    assert!(out.status.success());
    let imports = String::from_utf8_lossy(&out.stdout);
    let tls: Vec<&str> = imports
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|s| s.split('@').next().unwrap_or(s))
        .filter(|s| {
            (s.starts_with("SSL_") || s.starts_with("TLS") || s.starts_with("DTLS"))
                || (s.contains("_ssl") && *s != "OPENSSL_init_ssl")
        })
        .collect();
    assert_eq!(tls, Vec::<&str>::new());
    assert!(
        imports.contains("X509_verify_cert"),
        "the check must see the OpenSSL imports at all"
    );
}
