//! The output archive the pilot uploads for each ended payload: a tar.gz holding `outputs/`
//! (the declared outputs the helper copied back) plus the payload's `stdout` and `stderr`.
//!
//! Only regular files and directories with clean relative names are carried over from the
//! helper's archive; nothing is ever extracted to disk here.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

/// Most bytes of stdout or stderr put in the archive (the rest is cut, and said so).
pub const LOG_LIMIT: u64 = 64 << 20;

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("helper outputs archive is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("cannot build the output archive: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the archive. `outputs_b64` is the helper's tar.gz (base64), if any. Returns the
/// archive bytes and the notes on what was skipped.
pub fn build_archive(
    outputs_b64: Option<&str>,
    stdout: &Path,
    stderr: &Path,
) -> Result<(Vec<u8>, Vec<String>), OutputError> {
    let mut notes = Vec::new();
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    if let Some(b64) = outputs_b64 {
        let raw = B64.decode(b64)?;
        let mut inner = tar::Archive::new(GzDecoder::new(raw.as_slice()));
        for entry in inner.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let clean = path.trim_start_matches("./").trim_end_matches('/');
            let kind = entry.header().entry_type();
            if clean.is_empty() {
                continue;
            }
            if !crate::util::is_relative_clean_path(clean) || !(kind.is_file() || kind.is_dir()) {
                notes.push(format!("skipped outputs entry {path:?} ({kind:?})"));
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(entry.header().mode().unwrap_or(0o644) & 0o777);
            header.set_mtime(entry.header().mtime().unwrap_or(0));
            header.set_size(if kind.is_file() { entry.size() } else { 0 });
            let name = format!("outputs/{clean}");
            tar.append_data(&mut header, name, &mut entry)?;
        }
    }
    for (name, path) in [("stdout", stdout), ("stderr", stderr)] {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                notes.push(format!("{name} not included: {e}"));
                continue;
            }
        };
        let len = file.metadata()?.len();
        if len > LOG_LIMIT {
            notes.push(format!(
                "{name} cut to its first {LOG_LIMIT} of {len} bytes"
            ));
        }
        let size = len.min(LOG_LIMIT);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_size(size);
        tar.append_data(&mut header, name, file.take(size))?;
    }
    let gz = tar.into_inner()?;
    Ok((gz.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn helper_archive() -> String {
        let mut t = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        t.append_data(&mut h, "res", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        t.append_data(&mut h, "res/a.txt", &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_link_name("/etc/shadow").unwrap();
        t.append_data(&mut h, "evil", std::io::empty()).unwrap();
        B64.encode(t.into_inner().unwrap().finish().unwrap())
    }

    #[test]
    fn archive_holds_outputs_and_logs_and_skips_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdout");
        std::fs::File::create(&out)
            .unwrap()
            .write_all(b"out!")
            .unwrap();
        let err = dir.path().join("stderr");
        std::fs::write(&err, b"").unwrap();
        let (bytes, notes) = build_archive(Some(&helper_archive()), &out, &err).unwrap();
        assert!(notes.iter().any(|n| n.contains("evil")), "{notes:?}");
        let mut a = tar::Archive::new(GzDecoder::new(bytes.as_slice()));
        let mut names = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            names.push((name, s));
        }
        let want: Vec<(String, String)> = [
            ("outputs/res", ""),
            ("outputs/res/a.txt", "hello"),
            ("stdout", "out!"),
            ("stderr", ""),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(names, want);
    }
}
