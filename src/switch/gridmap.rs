//! The grid-mapfile: owner DN -> local account, in the format sites already keep.
//!
//! A line is `"DN" account` or `"DN" account1,account2` (the first account is used); `#`
//! starts a comment; DNs are quoted, with `\"` and `\\` escapes (an unquoted DN without spaces
//! is accepted too). An account starting with `.` names a pool (`.prefix`) whose accounts are
//! leased from the gridmapdir (`leases`). The same format keyed by FQAN is the group map.
//! Parsing only: this module never looks accounts up and never decides anything; files are
//! followed live through `crate::policy::Reloading`.

use std::path::{Path, PathBuf};

/// What a DN maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// A static account name (the first of the line's list).
    Account(String),
    /// A pool of accounts `<prefix>NNN` (gridmapdir style).
    Pool(String),
}

impl Mapping {
    /// The mapping an account field names: `.prefix` is a pool, anything else an account.
    pub fn from_account(field: &str) -> Mapping {
        match field.strip_prefix('.') {
            Some(prefix) => Mapping::Pool(prefix.to_string()),
            None => Mapping::Account(field.to_string()),
        }
    }
}

/// One mapping line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    pub accounts: Vec<String>,
    /// 1-based line number, for messages.
    pub line: usize,
}

/// A parsed grid-mapfile.
#[derive(Debug, Clone, Default)]
pub struct Gridmap {
    pub entries: Vec<Entry>,
}

/// A grid-mapfile that cannot be used; names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum GridmapError {
    #[error("cannot read grid-mapfile {path}: {source}; create it or fix the 'gridmap' path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("grid-mapfile {path} line {line}: {what}; write lines as \"DN\" account[,account...]")]
    Syntax {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

impl Gridmap {
    /// Reads and parses a grid-mapfile.
    pub fn load(path: &Path) -> Result<Self, GridmapError> {
        let text = std::fs::read_to_string(path).map_err(|source| GridmapError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses grid-mapfile text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, GridmapError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let syntax = |what: String| GridmapError::Syntax {
                path: path.to_path_buf(),
                line,
                what,
            };
            let s = raw.trim();
            if s.is_empty() || s.starts_with('#') {
                continue;
            }
            let (dn, rest) = split_dn(s).map_err(syntax)?;
            let rest = rest.trim();
            let rest = match rest.find('#') {
                Some(i) => rest[..i].trim(),
                None => rest,
            };
            if rest.is_empty() {
                return Err(syntax(format!("DN \"{dn}\" has no account")));
            }
            let accounts: Vec<String> = rest.split(',').map(|a| a.trim().to_string()).collect();
            for a in &accounts {
                let name = a.strip_prefix('.').unwrap_or(a);
                if !is_account_name(name) {
                    return Err(syntax(format!("'{a}' is not a valid account name")));
                }
            }
            if !dn.starts_with('/') {
                return Err(syntax(format!("DN \"{dn}\" does not start with '/'")));
            }
            entries.push(Entry { dn, accounts, line });
        }
        Ok(Gridmap { entries })
    }

    /// The mapping of `dn` (first matching line wins), with its line number.
    pub fn lookup(&self, dn: &str) -> Option<(Mapping, usize)> {
        let e = self.entries.iter().find(|e| e.dn == dn)?;
        Some((Mapping::from_account(&e.accounts[0]), e.line))
    }
}

/// Account names as useradd accepts them (plus '.', which some sites use).
fn is_account_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Splits the leading DN (quoted or not) from the rest of the line.
fn split_dn(s: &str) -> Result<(String, &str), String> {
    let Some(body) = s.strip_prefix('"') else {
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        return Ok((s[..end].to_string(), &s[end..]));
    };
    let mut dn = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e)) => dn.push(e),
                None => return Err("the line ends inside an escape".into()),
            },
            '"' => return Ok((dn, &body[i + 1..])),
            c => dn.push(c),
        }
    }
    Err("the DN's closing quote is missing".into())
}

impl crate::policy::Load for Gridmap {
    type Error = GridmapError;
    fn load(name: &str, bytes: &[u8]) -> Result<Self, GridmapError> {
        let text = String::from_utf8_lossy(bytes);
        Gridmap::parse(Path::new(name), &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotes_lists_pools_comments() {
        let text = r#"
# site map
"/DC=org/DC=x/CN=Alice Smith" mpu-alice
"/DC=org/CN=Quote \"Q\" Person" q1,q2   # two accounts
/DC=org/CN=bare bare
"/DC=org/CN=pooled" .demo
"#;
        let g = Gridmap::parse(Path::new("gm"), text).unwrap();
        assert_eq!(
            g.lookup("/DC=org/DC=x/CN=Alice Smith"),
            Some((Mapping::Account("mpu-alice".into()), 3))
        );
        assert_eq!(
            g.lookup("/DC=org/CN=Quote \"Q\" Person"),
            Some((Mapping::Account("q1".into()), 4))
        );
        assert_eq!(g.entries[1].accounts, vec!["q1", "q2"]);
        assert_eq!(
            g.lookup("/DC=org/CN=bare"),
            Some((Mapping::Account("bare".into()), 5))
        );
        assert_eq!(
            g.lookup("/DC=org/CN=pooled"),
            Some((Mapping::Pool("demo".into()), 6))
        );
        assert_eq!(g.lookup("/DC=org/CN=nobody"), None);
    }

    #[test]
    fn errors_name_the_line() {
        let e = Gridmap::parse(Path::new("gm"), "\"/CN=a\" ok\n\"/CN=b ok\n").unwrap_err();
        assert!(e.to_string().contains("gm line 2"), "{e}");
        let e = Gridmap::parse(Path::new("gm"), "\"/CN=a\"\n").unwrap_err();
        assert!(e.to_string().contains("no account"), "{e}");
        let e = Gridmap::parse(Path::new("gm"), "\"/CN=a\" bad/name\n").unwrap_err();
        assert!(e.to_string().contains("bad/name"), "{e}");
    }

    #[test]
    fn shipped_example_maps_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
        let gm = Gridmap::load(&dir.join("grid-mapfile")).unwrap();
        assert!(gm.lookup("/DC=org/DC=mupilot-demo/CN=alice").is_some());
        assert!(gm.lookup("/DC=org/DC=mupilot-demo/CN=carol").is_none());
        let groups = Gridmap::load(&dir.join("groupmapfile")).unwrap();
        assert_eq!(
            groups.lookup("/demo/Role=prod"),
            Some((Mapping::Pool("mpprod".into()), 4))
        );
    }
}
