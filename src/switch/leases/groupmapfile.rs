//! The site's LCMAPS groupmapfile (`"FQAN" group`), read as LCMAPS reads it, to name leases as
//! LCMAPS's default configuration does: its `voms_localgroup` maps the owner's first FQAN to the
//! primary group and each other FQAN to a secondary group; `voms_poolaccount` (without
//! `-do_not_use_secondary_gids`) appends `:` and the primary group's name, then the secondary
//! groups' names, deduplicated and sorted by gid. Parsing and NSS look-ups only; never touches
//! the gridmapdir.
//!
//! The format is the grid-mapfile's as `lcmaps_gridmapfile.c` parses it: leading blanks skipped;
//! a `#` or an empty line is no entry; the key is quoted (`"..."`, `\` escapes the next byte and
//! is kept) or ends at a blank; it is a glob pattern matched with `fnmatch(3)` and
//! `FNM_NOESCAPE`, so `*` spans `/`; the rest up to an unescaped `#` is a list of mappings split
//! by `,`, blanks and tabs (`\` escapes expanded); the first mapping not starting with `.` is the
//! group, and a line without one is passed over. The first line that gives a group wins.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// A groupmapfile that cannot be used; names the file, the line or the group and the fix.
#[derive(Debug, thiserror::Error)]
pub enum GroupmapfileError {
    #[error("cannot read LCMAPS groupmapfile {path}: {source}; fix authz.lcmaps_groupmapfile")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("LCMAPS groupmapfile {path} line {line}: {what}")]
    Syntax {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("LCMAPS groupmapfile {path} line {line} maps FQAN \"{fqan}\" to group '{group}', which does not exist; create it (groupadd) or fix the line")]
    NoGroup {
        path: PathBuf,
        line: usize,
        fqan: String,
        group: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    pattern: CString,
    mappings: Vec<String>,
    line: usize,
}

/// A parsed groupmapfile.
#[derive(Debug, Clone)]
pub struct Groupmapfile {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Groupmapfile {
    pub fn load(path: &Path) -> Result<Groupmapfile, GroupmapfileError> {
        let text = std::fs::read(path).map_err(|source| GroupmapfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses groupmapfile bytes; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Groupmapfile, GroupmapfileError> {
        let mut entries = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let syntax = |what: &str| GroupmapfileError::Syntax {
                path: path.to_path_buf(),
                line,
                what: what.to_string(),
            };
            let s = trim_blanks(raw);
            if s.is_empty() || s[0] == b'#' {
                continue;
            }
            let (key, rest) = if s[0] == b'"' {
                let end = scan(&s[1..], |b| b == b'"')
                    .ok_or_else(|| syntax("quote-inbalance: no closing '\"'"))?;
                (&s[1..1 + end], &s[end + 2..])
            } else {
                let end = scan(s, |b| b == b' ' || b == b'\t').unwrap_or(s.len());
                (&s[..end], &s[end..])
            };
            if key.is_empty() {
                continue;
            }
            let rest = match scan(rest, |b| b == b'#') {
                Some(end) => &rest[..end],
                None => rest,
            };
            let pattern = CString::new(key).map_err(|_| syntax("NUL byte in the FQAN"))?;
            entries.push(Entry {
                pattern,
                mappings: mappings(rest),
                line,
            });
        }
        Ok(Groupmapfile {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The group `fqan` maps to, with its line: the first line whose pattern matches and that
    /// has a mapping not starting with `.`.
    pub fn group_of(&self, fqan: &str) -> Option<(&str, usize)> {
        let fqan = CString::new(fqan).ok()?;
        self.entries
            .iter()
            .filter(|e| fnmatch(&e.pattern, &fqan))
            .find_map(|e| {
                e.mappings
                    .iter()
                    .find(|m| !m.starts_with('.'))
                    .map(|m| (m.as_str(), e.line))
            })
    }

    /// The group names LCMAPS appends to the lease of an owner with `fqans` (in the owner's
    /// order): the first FQAN's group (when it maps), then the other FQANs' groups, each gid
    /// once, sorted by gid, every name as NSS gives it for the gid.
    pub fn lease_groups(&self, fqans: &[String]) -> Result<Vec<String>, GroupmapfileError> {
        let mut primary = None;
        let mut secondary: Vec<nix::unistd::Gid> = Vec::new();
        for (i, fqan) in fqans.iter().enumerate() {
            let Some((name, line)) = self.group_of(fqan) else {
                continue;
            };
            let no_group = || GroupmapfileError::NoGroup {
                path: self.path.clone(),
                line,
                fqan: fqan.clone(),
                group: name.to_string(),
            };
            let gid = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(no_group)?
                .gid;
            if i == 0 {
                primary = Some((gid, name.to_string()));
            } else if !secondary.contains(&gid) {
                secondary.push(gid);
            }
        }
        secondary.sort_by_key(|g| g.as_raw());
        let name_of = |gid: nix::unistd::Gid, fallback: String| {
            nix::unistd::Group::from_gid(gid)
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or(fallback)
        };
        let mut out = Vec::new();
        if let Some((gid, name)) = primary {
            out.push(name_of(gid, name));
        }
        for gid in secondary {
            out.push(name_of(gid, gid.to_string()));
        }
        Ok(out)
    }
}

/// `fnmatch(pattern, s, FNM_NOESCAPE) == 0`, as LCMAPS matches keys (glibc's own matcher).
fn fnmatch(pattern: &CString, s: &CString) -> bool {
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call; fnmatch
    // only reads them and keeps no reference.
    unsafe { libc::fnmatch(pattern.as_ptr(), s.as_ptr(), libc::FNM_NOESCAPE) == 0 }
}

fn trim_blanks(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let s = &s[start..];
    s.strip_suffix(b"\r").unwrap_or(s)
}

/// The index of the first byte `stop` accepts, skipping each `\` and the byte it escapes.
fn scan(s: &[u8], stop: impl Fn(u8) -> bool) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            i += 2;
            continue;
        }
        if stop(s[i]) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The mappings of a line's rest: split by `,`, blanks and tabs; `\` escapes expanded.
fn mappings(rest: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' if i + 1 < rest.len() => {
                cur.push(rest[i + 1]);
                i += 1;
            }
            b',' | b' ' | b'\t' => {
                if !cur.is_empty() {
                    out.push(String::from_utf8_lossy(&cur).into_owned());
                    cur.clear();
                }
            }
            b => cur.push(b),
        }
        i += 1;
    }
    if !cur.is_empty() {
        out.push(String::from_utf8_lossy(&cur).into_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Groupmapfile {
        Groupmapfile::parse(Path::new("gm"), text.as_bytes()).unwrap()
    }

    #[test]
    fn lines_are_read_as_lcmaps_reads_them() {
        let g = parse(
            "# comment\n\n  \"/demo/Role=prod\" prodgrp # trailing\n\
             \"/demo/Role=pool\" .pool\n\"/demo/Role=pool\" .p2, poolgrp\n\
             /demo/sub\\ x  subgrp\n\"/demo/*\" demogrp\n\"/other\" a\\,b,c\r\n",
        );
        assert_eq!(g.group_of("/demo/Role=prod"), Some(("prodgrp", 3)));
        // A line with only pool mappings is passed over; the next line for the FQAN gives it.
        assert_eq!(g.group_of("/demo/Role=pool"), Some(("poolgrp", 5)));
        // An unquoted key keeps its `\` (FNM_NOESCAPE: it matches itself).
        assert_eq!(g.group_of("/demo/sub\\ x"), Some(("subgrp", 6)));
        // `*` spans `/` (fnmatch without FNM_PATHNAME).
        assert_eq!(g.group_of("/demo/a/Role=x"), Some(("demogrp", 7)));
        assert_eq!(g.group_of("/other"), Some(("a,b", 8)));
        assert_eq!(g.group_of("/nothing"), None);
        let e = Groupmapfile::parse(Path::new("gm"), b"\"/demo x\n").unwrap_err();
        assert!(e.to_string().contains("gm line 1: quote-inbalance"), "{e}");
    }

    #[test]
    fn lease_groups_are_primary_then_secondaries_by_gid() {
        // root (gid 0) and daemon (gid 1) exist on every Debian host.
        let g = parse("\"/demo/Role=prod\" daemon\n\"/demo\" root\n\"/demo/x\" root\n");
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            g.lease_groups(&f(&["/demo/Role=prod", "/demo", "/demo/x"]))
                .unwrap(),
            ["daemon", "root"]
        );
        // The first FQAN unmapped: no primary group, the others are secondary.
        assert_eq!(
            g.lease_groups(&f(&["/none", "/demo/Role=prod", "/demo"]))
                .unwrap(),
            ["root", "daemon"]
        );
        let g = parse("\"/demo\" no-such-group-h17\n");
        let e = g.lease_groups(&f(&["/demo"])).unwrap_err();
        assert!(e.to_string().contains("groupadd"), "{e}");
    }
}
