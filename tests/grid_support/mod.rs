//! The grid PKI the credential tests share: `make-fixtures.sh` (beside this file) run once per
//! test binary into cargo's target tmpdir (kept there for inspection after a failure, replaced
//! by the next run). See the script for what it holds.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes the PKI afresh in `<target tmpdir>/<name>` and returns its path.
pub fn make(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grid_support/make-fixtures.sh");
    let out = Command::new("sh").arg(&script).arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "make-fixtures.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}
