//! The boundaries between the three programs are a property of the build (docs/architecture.md
//! "Boundaries the build enforces"): each program has a cargo feature, and the crates only the
//! pilot and the server may use are optional dependencies that only their features enable. This
//! checks the dependency graph cargo resolves for each program built with its own features
//! alone: a crate missing from it cannot be named by any code compiled into that program, so
//! `use reqwest` in src/switch fails to compile (scripts/test.sh compiles each program that way,
//! "each program with only its own features"). The full graph is the control that shows the
//! check sees those crates at all.

use std::collections::BTreeSet;
use std::process::Command;

/// HTTP, TLS, async and SQL crates: never in the helper (ARCHITECTURE: "the privileged helper
/// must stay small: it links no HTTP client, no TLS, no server code").
const NOT_IN_THE_HELPER: &[&str] = &[
    "tokio",
    "reqwest",
    "hyper",
    "hyper-util",
    "h2",
    "axum",
    "tower",
    "rustls",
    "rustls-pemfile",
    "tokio-rustls",
    "ring",
    "x509-parser",
    "rcgen",
    "rusqlite",
    "libsqlite3-sys",
    "postgres",
    "r2d2",
    "refinery",
];

/// The static pilot links no SQL, no HTTP server, no OpenSSL and nothing of the sandbox.
const NOT_IN_THE_PILOT: &[&str] = &[
    "axum",
    "rusqlite",
    "libsqlite3-sys",
    "postgres",
    "r2d2",
    "refinery",
    "openssl",
    "openssl-sys",
    "landlock",
];

/// The server has no sandbox. (It links OpenSSL even alone: postgres-openssl for TLS to
/// PostgreSQL; its grid code, delegation, comes with the `grid` feature.)
const NOT_IN_THE_SERVER: &[&str] = &["landlock"];

/// The crates the library and a binary link (normal edges, build scripts' own dependencies
/// left out) with exactly `features`.
fn linked(features: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "tree",
        "--locked",
        "--offline",
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if features != "default" {
        cmd.args(["--no-default-features", "--features", features]);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree --features {features} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn present<'a>(graph: &BTreeSet<String>, crates: &[&'a str]) -> Vec<&'a str> {
    crates
        .iter()
        .copied()
        .filter(|c| graph.contains(*c))
        .collect()
}

#[test]
fn the_helper_built_alone_has_no_http_tls_or_sql_crate() {
    let helper = linked("switch,grid");
    assert_eq!(present(&helper, NOT_IN_THE_HELPER), Vec::<&str>::new());
    // What it does need is there: the check reads the real graph.
    for c in ["mupilot", "landlock", "rustix", "openssl", "ed25519-dalek"] {
        assert!(helper.contains(c), "{c} missing from the helper's graph");
    }
    // The control: with every program's feature the same crates are in the graph.
    let all = linked("default");
    assert_eq!(present(&all, NOT_IN_THE_HELPER), NOT_IN_THE_HELPER.to_vec());
}

#[test]
fn the_pilot_and_the_server_built_alone_have_only_their_own_crates() {
    let pilot = linked("pilot");
    assert_eq!(present(&pilot, NOT_IN_THE_PILOT), Vec::<&str>::new());
    for c in ["tokio", "reqwest", "rustls"] {
        assert!(pilot.contains(c), "{c} missing from the pilot's graph");
    }
    let server = linked("server");
    assert_eq!(present(&server, NOT_IN_THE_SERVER), Vec::<&str>::new());
    for c in ["axum", "rusqlite", "postgres", "postgres-openssl", "rustls"] {
        assert!(server.contains(c), "{c} missing from the server's graph");
    }
}

#[test]
fn the_glexec_client_built_alone_has_neither_network_nor_sandbox_nor_grid_crates() {
    // It passes descriptors to the helper over its Unix socket; it verifies nothing itself.
    let glexec = linked("glexec");
    assert_eq!(present(&glexec, NOT_IN_THE_HELPER), Vec::<&str>::new());
    assert_eq!(
        present(&glexec, &["landlock", "openssl", "openssl-sys"]),
        Vec::<&str>::new()
    );
    assert!(
        glexec.contains("nix"),
        "nix missing from the client's graph"
    );
}
