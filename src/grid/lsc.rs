//! vomsdir `.lsc` files: `<vomsdir>/<VO>/<host>.lsc` names, line by line, the subject and then
//! the issuer of each certificate in a VOMS server's chain (the standard format of VOMS and
//! LCMAPS). Lines are DNs in grid form; blank lines and `#` comments are skipped; a line of
//! `------NEXT CHAIN------` starts an alternative chain (a server changing its CA).

use std::path::{Path, PathBuf};

/// One acceptable chain: (subject, issuer) DN pairs, the VOMS server's own certificate first.
pub type LscChain = Vec<(String, String)>;

/// The parsed file: the chains any one of which the AC's signer chain must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lsc {
    pub path: PathBuf,
    pub chains: Vec<LscChain>,
}

/// Why an `.lsc` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LscError {
    #[error("no {}", .0.display())]
    Missing(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}; the file holds the VOMS server's subject DN and then its issuer's, one per line", path.display())]
    Format { path: PathBuf, reason: String },
}

const NEXT_CHAIN: &str = "------NEXT CHAIN------";

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// `vo`'s directory in the vomsdir; `None` when the name could climb out of it (it comes from
/// the AC, which is not verified yet when the directory is looked up).
pub fn vo_dir(vomsdir: &Path, vo: &str) -> Option<PathBuf> {
    safe_name(vo).then(|| vomsdir.join(vo))
}

/// The path of `host`'s file for `vo`; `None` when `vo` or `host` is not a plain file name.
pub fn path_for(vomsdir: &Path, vo: &str, host: &str) -> Option<PathBuf> {
    vo_dir(vomsdir, vo)
        .filter(|_| safe_name(host))
        .map(|d| d.join(format!("{host}.lsc")))
}

/// Parses the text of an `.lsc` file.
pub fn parse(path: &Path, text: &str) -> Result<Lsc, LscError> {
    let fmt = |reason: String| LscError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut chains = Vec::new();
    let mut lines: Vec<&str> = Vec::new();
    let flush = |lines: &mut Vec<&str>, chains: &mut Vec<LscChain>| -> Result<(), LscError> {
        if lines.is_empty() {
            return Ok(());
        }
        if lines.len() % 2 != 0 {
            return Err(fmt(format!(
                "{} DN lines in a chain, expected subject/issuer pairs",
                lines.len()
            )));
        }
        chains.push(
            lines
                .chunks(2)
                .map(|p| (p[0].to_string(), p[1].to_string()))
                .collect(),
        );
        lines.clear();
        Ok(())
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == NEXT_CHAIN {
            flush(&mut lines, &mut chains)?;
            continue;
        }
        if !line.starts_with('/') {
            return Err(fmt(format!(
                "line {}: {line:?} is not a DN in /DC=…/CN=… form",
                n + 1
            )));
        }
        lines.push(line);
    }
    flush(&mut lines, &mut chains)?;
    if chains.is_empty() {
        return Err(fmt("no DN in it".into()));
    }
    Ok(Lsc {
        path: path.to_path_buf(),
        chains,
    })
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Lsc, LscError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LscError::Missing(path.into())),
        Err(source) => Err(LscError::Io {
            path: path.into(),
            source,
        }),
    }
}

impl Lsc {
    /// Whether `chain` ((subject, issuer) of the signer's certificates, signer first) matches
    /// one of the file's chains.
    pub fn matches(&self, chain: &[(String, String)]) -> bool {
        self.chains
            .iter()
            .any(|c| c.len() <= chain.len() && c.iter().zip(chain).all(|(a, b)| a == b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_two_lines_and_alternatives() {
        let p = Path::new("/v/atlas/voms.example.lsc");
        let l = parse(p, "/DC=org/CN=voms.example\n/DC=org/CN=CA\n").unwrap();
        assert_eq!(
            l.chains,
            vec![vec![(
                "/DC=org/CN=voms.example".into(),
                "/DC=org/CN=CA".into()
            )]]
        );
        let pair = [(
            "/DC=org/CN=voms.example".to_string(),
            "/DC=org/CN=CA".to_string(),
        )];
        assert!(l.matches(&pair));
        assert!(!l.matches(&[("/DC=org/CN=other".into(), "/DC=org/CN=CA".into())]));
        let l = parse(
            p,
            "# old CA\n/DC=org/CN=voms.example\n/DC=org/CN=Old CA\n------NEXT CHAIN------\n/DC=org/CN=voms.example\n/DC=org/CN=CA\n",
        )
        .unwrap();
        assert_eq!(l.chains.len(), 2);
        assert!(l.matches(&pair));
    }

    #[test]
    fn bad_files_name_the_file_and_fix() {
        let p = Path::new("/v/atlas/x.lsc");
        let e = parse(p, "/DC=org/CN=voms.example\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/v/atlas/x.lsc") && e.contains("pairs"), "{e}");
        let e = parse(p, "CN=voms\nCN=ca\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(parse(p, "\n# nothing\n").is_err());
    }

    #[test]
    fn names_from_the_ac_stay_inside_the_vomsdir() {
        let d = Path::new("/v");
        assert_eq!(
            path_for(d, "atlas", "voms.example").unwrap(),
            Path::new("/v/atlas/voms.example.lsc")
        );
        assert!(path_for(d, "..", "x").is_none());
        assert!(path_for(d, "atlas", "../../etc/passwd").is_none());
        assert!(path_for(d, "", "x").is_none());
    }
}
