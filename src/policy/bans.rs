//! Site ban lists (P6: local authorization decisions win): banned DNs in the LCAS
//! `ban_users.db` format, banned FQANs/groups, banned VOs. [`Bans`] follows its files with
//! [`Reloading`], so a ban takes effect for the next request; a ban file that becomes unreadable
//! or malformed refuses every request until it is fixed (fail closed).
//!
//! Formats (one entry per line, `#` starts a comment, blank lines ignored):
//! - DN list: `"/DC=org/DC=example/CN=Mallory"` — the DN in double quotes, compared exactly;
//! - FQAN list: `/vo/group` or `"/vo/group/Role=x"` — bans that FQAN and everything below it;
//! - VO list: `demo` or `"demo"` (a leading `/` is ignored).
//!
//! The one writer of these files is here too, beside the parser whose format it must keep:
//! [`append_dn`] adds a DN to a DN list (`mupilot-switch audit kill --ban`).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::ast::identity_covers;
use super::reload::{Load, ReloadError, Reloading};

/// Which kind of list a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanKind {
    Dn,
    Fqan,
    Vo,
}

impl BanKind {
    fn what(self) -> &'static str {
        match self {
            BanKind::Dn => "DN",
            BanKind::Fqan => "FQAN",
            BanKind::Vo => "VO",
        }
    }
}

/// A malformed line in a ban list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanParseError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    pub hint: &'static str,
}

impl fmt::Display for BanParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {} (hint: {})",
            self.file, self.line, self.column, self.message, self.hint
        )
    }
}

impl std::error::Error for BanParseError {}

/// One parsed ban list: entry -> line number.
#[derive(Debug, Clone)]
pub struct BanList<const KIND: u8> {
    file: String,
    entries: HashMap<String, u32>,
}

/// `ban_users.db`: banned DNs.
pub type DnBans = BanList<0>;
/// Banned FQANs (groups, roles).
pub type FqanBans = BanList<1>;
/// Banned VOs.
pub type VoBans = BanList<2>;

impl<const KIND: u8> BanList<KIND> {
    fn kind() -> BanKind {
        match KIND {
            0 => BanKind::Dn,
            1 => BanKind::Fqan,
            _ => BanKind::Vo,
        }
    }

    /// Parses a list; `file` names it in errors and reasons.
    pub fn parse(file: &str, text: &str) -> Result<Self, BanParseError> {
        let kind = Self::kind();
        let mut entries = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n as u32 + 1;
            let err = |column: usize, message: String, hint: &'static str| BanParseError {
                file: file.to_string(),
                line,
                column: column as u32 + 1,
                message,
                hint,
            };
            let chars: Vec<char> = raw.chars().collect();
            let start = chars
                .iter()
                .position(|c| !c.is_whitespace())
                .unwrap_or(chars.len());
            if start == chars.len() || chars[start] == '#' {
                continue;
            }
            let (value, rest) = if chars[start] == '"' {
                match chars[start + 1..].iter().position(|&c| c == '"') {
                    Some(len) => (
                        chars[start + 1..start + 1 + len].iter().collect::<String>(),
                        start + len + 2,
                    ),
                    None => {
                        return Err(err(
                            start,
                            "quoted entry is not closed".into(),
                            "end the entry with '\"'",
                        ));
                    }
                }
            } else if kind == BanKind::Dn {
                return Err(err(
                    start,
                    "DN is not in double quotes".into(),
                    "write one DN per line as \"/DC=org/DC=example/CN=Name\" (the LCAS ban_users.db format)",
                ));
            } else {
                let end = chars[start..]
                    .iter()
                    .position(|c| c.is_whitespace() || *c == '#')
                    .map_or(chars.len(), |l| start + l);
                (chars[start..end].iter().collect::<String>(), end)
            };
            if let Some(extra) = chars[rest..].iter().position(|c| !c.is_whitespace()) {
                if chars[rest + extra] != '#' {
                    return Err(err(
                        rest + extra,
                        format!("unexpected text after the {}", kind.what()),
                        "one entry per line; quote an entry that holds spaces; '#' starts a comment",
                    ));
                }
            }
            let value = match kind {
                BanKind::Vo => value.trim_start_matches('/').to_string(),
                _ => value,
            };
            let bad = match kind {
                BanKind::Dn | BanKind::Fqan => !value.starts_with('/'),
                BanKind::Vo => {
                    value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                }
            };
            if bad {
                let hint = match kind {
                    BanKind::Dn => "a DN starts with '/', e.g. \"/DC=org/DC=example/CN=Name\"",
                    BanKind::Fqan => {
                        "an FQAN starts with '/', e.g. /demo/testers or /demo/Role=pilot"
                    }
                    BanKind::Vo => "a VO name is letters, digits, '.', '-', '_', e.g. demo",
                };
                return Err(err(
                    start,
                    format!("'{value}' is not a valid {}", kind.what()),
                    hint,
                ));
            }
            entries.entry(value).or_insert(line);
        }
        Ok(BanList {
            file: file.to_string(),
            entries,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the list bans nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The line banning `value`, if any: exact for DNs and VOs; for FQANs the FQAN itself or a
    /// leading part of it at a `/` boundary (banning `/demo/bad` bans `/demo/bad/Role=x`).
    pub fn find(&self, value: &str) -> Option<(&str, u32)> {
        match Self::kind() {
            BanKind::Dn => self
                .entries
                .get_key_value(value)
                .map(|(k, &l)| (k.as_str(), l)),
            BanKind::Vo => self
                .entries
                .get_key_value(value.trim_start_matches('/'))
                .map(|(k, &l)| (k.as_str(), l)),
            BanKind::Fqan => {
                let mut best: Option<(&str, u32)> = None;
                let mut consider = |key: &str| {
                    if let Some((k, &l)) = self.entries.get_key_value(key) {
                        if identity_covers(k, value) && best.is_none_or(|(_, bl)| l < bl) {
                            best = Some((k.as_str(), l));
                        }
                    }
                };
                for (i, b) in value.bytes().enumerate() {
                    if b == b'/' && i > 0 {
                        consider(&value[..i]);
                    }
                }
                consider(value);
                best
            }
        }
    }

    /// The file this list came from.
    pub fn file(&self) -> &str {
        &self.file
    }
}

impl<const KIND: u8> Load for BanList<KIND> {
    type Error = BanParseError;
    fn load(name: &str, bytes: &[u8]) -> Result<Self, BanParseError> {
        let text = std::str::from_utf8(bytes).map_err(|e| BanParseError {
            file: name.to_string(),
            line: 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u32,
            column: 1,
            message: "file is not valid UTF-8".into(),
            hint: "save the list as UTF-8 text",
        })?;
        Self::parse(name, text)
    }
}

/// Why a request is refused by the ban lists; the reason names the list file and line (or
/// the unusable file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanDenial {
    /// A listed entry bans the DN, an FQAN or the VO.
    Banned { reason: String },
    /// A list could not be used (fail closed): a system denial.
    Unusable { reason: String },
}

impl BanDenial {
    pub fn reason(&self) -> &str {
        match self {
            BanDenial::Banned { reason } | BanDenial::Unusable { reason } => reason,
        }
    }
}

impl fmt::Display for BanDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// The site's ban lists, followed live. Any number of each kind (none means nothing banned).
#[derive(Debug, Default)]
pub struct Bans {
    dn: Vec<Reloading<DnBans>>,
    fqan: Vec<Reloading<FqanBans>>,
    vo: Vec<Reloading<VoBans>>,
}

impl Bans {
    /// No lists.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a DN list (`ban_users.db`); fails now if it does not load.
    pub fn with_dn_file(mut self, path: impl Into<PathBuf>) -> Result<Self, ReloadError> {
        self.dn.push(Reloading::open(path)?);
        Ok(self)
    }

    /// Adds an FQAN list; fails now if it does not load.
    pub fn with_fqan_file(mut self, path: impl Into<PathBuf>) -> Result<Self, ReloadError> {
        self.fqan.push(Reloading::open(path)?);
        Ok(self)
    }

    /// Adds a VO list; fails now if it does not load.
    pub fn with_vo_file(mut self, path: impl Into<PathBuf>) -> Result<Self, ReloadError> {
        self.vo.push(Reloading::open(path)?);
        Ok(self)
    }

    /// `Some(denial)` when the DN, one of the FQANs or the VO is banned, or when a list cannot be
    /// used right now; `None` when nothing bans the request.
    pub fn check(&self, dn: &str, fqans: &[String], vo: &str) -> Option<BanDenial> {
        fn hit<const K: u8>(lists: &[Reloading<BanList<K>>], values: &[&str]) -> Option<BanDenial> {
            for list in lists {
                let current = match list.get() {
                    Ok(c) => c,
                    Err(e) => {
                        return Some(BanDenial::Unusable {
                            reason: e.to_string(),
                        })
                    }
                };
                for v in values {
                    if let Some((entry, line)) = current.find(v) {
                        let what = BanList::<K>::kind().what();
                        let reason = if entry == *v {
                            format!("{what} '{v}' is banned at {}:{line}", current.file())
                        } else {
                            format!(
                                "{what} '{v}' is banned by '{entry}' at {}:{line}",
                                current.file()
                            )
                        };
                        return Some(BanDenial::Banned { reason });
                    }
                }
            }
            None
        }
        let fqans: Vec<&str> = fqans.iter().map(String::as_str).collect();
        hit(&self.dn, &[dn])
            .or_else(|| hit(&self.fqan, &fqans))
            .or_else(|| hit(&self.vo, &[vo]))
    }
}

/// Why a DN could not be added to a DN ban list.
#[derive(Debug, thiserror::Error)]
pub enum BanWriteError {
    /// The DN cannot be written as one quoted entry the parser reads back as itself.
    #[error("cannot ban {dn:?}: quotes and newlines are not allowed in a DN")]
    Unquotable { dn: String },
    #[error("cannot add the ban to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Appends `dn` to the DN ban list at `path` as one line `"DN"` (the format [`DnBans`] parses),
/// with one `write(2)` on an `O_APPEND` descriptor; the file must exist. A list whose last line
/// has no newline (an editor that leaves none) gets one first: glued to that line, the entry
/// would make the list malformed, and a malformed list refuses every request. [`Bans`] follows
/// the file, so the ban applies to the next request without a restart.
pub fn append_dn(path: &Path, dn: &str) -> Result<(), BanWriteError> {
    if dn.contains('"') || dn.contains('\n') {
        return Err(BanWriteError::Unquotable { dn: dn.to_string() });
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)?;
        let len = f.metadata()?.len();
        let mut last = [b'\n'];
        if len > 0 {
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut last, len - 1)?;
        }
        let sep = if last[0] == b'\n' { "" } else { "\n" };
        f.write_all(format!("{sep}\"{dn}\"\n").as_bytes())
    };
    write().map_err(|source| BanWriteError::Write {
        path: path.to_path_buf(),
        source,
    })
}
