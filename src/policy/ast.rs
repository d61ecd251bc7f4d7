//! The parsed form of a policy: attributes, operators, values, assertions, assertion sets and
//! statements, each carrying the place in the file it came from.
//!
//! Pure data and small helpers (number syntax, attribute and action names). No I/O, no parsing
//! of whole files (that is `parser`), no decisions (that is `eval`).

use std::fmt;

/// Where something was written: 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

/// A request attribute the language knows. Names are case-insensitive in policies and requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attr {
    /// What the requester wants to do: start, cancel, information, signal.
    Action,
    /// The program to run (argv\[0\], without its directory).
    Executable,
    /// The directory the executable is taken from.
    Directory,
    /// The job management group the job belongs to.
    Jobtag,
    /// Number of processors (RSL `count`).
    Count,
    /// The job initiator's DN; `SELF` is the requester's own DN.
    Jobowner,
    /// The batch queue.
    Queue,
    /// The owner's VO name.
    Vo,
    /// The owner's VOMS FQANs (several values; alias `group`).
    Fqan,
    /// Cores of the payload's slot.
    Cores,
    /// Memory limit in bytes (policy values may use K, M, G, T suffixes, powers of 1024).
    Memory,
    /// Wall-time limit in seconds (policy values may use s, m, h, d suffixes).
    Walltime,
}

/// The attribute names accepted, for hints.
pub const ATTR_NAMES: &str =
    "action, executable, directory, jobtag, count, jobowner, queue, vo, fqan (or group), cores, memory, walltime";

impl Attr {
    /// Looks an attribute up by name (case-insensitive; `group` is an alias of `fqan`).
    pub fn from_name(name: &str) -> Option<Attr> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            "action" => Attr::Action,
            "executable" => Attr::Executable,
            "directory" => Attr::Directory,
            "jobtag" => Attr::Jobtag,
            "count" => Attr::Count,
            "jobowner" => Attr::Jobowner,
            "queue" => Attr::Queue,
            "vo" => Attr::Vo,
            "fqan" | "group" => Attr::Fqan,
            "cores" => Attr::Cores,
            "memory" => Attr::Memory,
            "walltime" => Attr::Walltime,
            _ => return None,
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Attr::Action => "action",
            Attr::Executable => "executable",
            Attr::Directory => "directory",
            Attr::Jobtag => "jobtag",
            Attr::Count => "count",
            Attr::Jobowner => "jobowner",
            Attr::Queue => "queue",
            Attr::Vo => "vo",
            Attr::Fqan => "fqan",
            Attr::Cores => "cores",
            Attr::Memory => "memory",
            Attr::Walltime => "walltime",
        }
    }

    /// Position in a request's attribute storage (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Numeric attributes compare as numbers and accept `<`, `<=`, `>`, `>=`.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Attr::Count | Attr::Cores | Attr::Memory | Attr::Walltime
        )
    }

    /// Parses a number in this attribute's syntax: decimal digits, with the unit suffixes of
    /// `memory` (K, M, G, T: powers of 1024) and `walltime` (s, m, h, d).
    pub fn parse_number(self, text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        if digits.is_empty() {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let factor: u64 = match (self, suffix) {
            (_, "") => 1,
            (Attr::Memory, "K" | "k") => 1 << 10,
            (Attr::Memory, "M" | "m") => 1 << 20,
            (Attr::Memory, "G" | "g") => 1 << 30,
            (Attr::Memory, "T" | "t") => 1 << 40,
            (Attr::Walltime, "s") => 1,
            (Attr::Walltime, "m") => 60,
            (Attr::Walltime, "h") => 3600,
            (Attr::Walltime, "d") => 86400,
            _ => return None,
        };
        n.checked_mul(factor)
    }

    /// The number syntax of this attribute, for hints.
    pub fn number_syntax(self) -> &'static str {
        match self {
            Attr::Memory => {
                "a whole number of bytes, optionally with K, M, G or T (powers of 1024), e.g. 4G"
            }
            Attr::Walltime => "a whole number of seconds, optionally with s, m, h or d, e.g. 36h",
            _ => "a whole non-negative number, e.g. 4",
        }
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a request asks to do with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Start,
    Cancel,
    Information,
    Signal,
}

impl Action {
    /// Looks an action up by name (case-insensitive).
    pub fn from_name(name: &str) -> Option<Action> {
        match name.to_ascii_lowercase().as_str() {
            "start" => Some(Action::Start),
            "cancel" => Some(Action::Cancel),
            "information" => Some(Action::Information),
            "signal" => Some(Action::Signal),
            _ => None,
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Cancel => "cancel",
            Action::Information => "information",
            Action::Signal => "signal",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// Looks an operator up by its spelling.
    pub fn from_text(text: &str) -> Option<Op> {
        Some(match text {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => return None,
        })
    }

    /// The spelling.
    pub fn text(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }

    /// `<`, `<=`, `>`, `>=`: only for numeric attributes.
    pub fn is_ordering(self) -> bool {
        !matches!(self, Op::Eq | Op::Ne)
    }

    /// Applies an ordering or equality to two numbers.
    pub fn compare(self, left: u64, right: u64) -> bool {
        match self {
            Op::Eq => left == right,
            Op::Ne => left != right,
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
        }
    }
}

/// The right-hand side of an assertion, checked against its attribute at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// `NULL`: with `=` the attribute must be absent (or empty), with `!=` present and non-empty.
    Null,
    /// `SELF` (jobowner only): the requester's own identity.
    SelfId,
    /// One or more strings (an RSL value sequence: `=` means "one of", `!=` "none of").
    Strings(Vec<String>),
    /// One number (numeric attributes with an ordering operator) or several (with `=`/`!=`).
    Numbers(Vec<u64>),
    /// One or more actions.
    Actions(Vec<Action>),
}

/// One `(attr op value)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    pub attr: Attr,
    pub op: Op,
    pub operand: Operand,
    /// The assertion as written (normalised spacing), for reasons.
    pub text: String,
    pub pos: Pos,
}

/// A conjunction of assertions (`&(a)(b)...`): satisfied when every assertion holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionSet {
    pub assertions: Vec<Assertion>,
    /// Where the set starts (its `&` or first `(`).
    pub pos: Pos,
}

/// Whether a statement grants or requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// `IDENTITY:` — the sets are alternatives that permit a request.
    Grant,
    /// `&IDENTITY:` — a request of a matching identity must satisfy one of the sets that apply
    /// to its action.
    Requirement,
}

/// One `IDENTITY:` (or `&IDENTITY:`) followed by its assertion sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub kind: StatementKind,
    /// The identity prefix (a DN or a leading part of one, ending at a `/` boundary).
    pub identity: String,
    pub sets: Vec<AssertionSet>,
    pub pos: Pos,
}

/// Whether the identity pattern `pattern` covers `dn`: equal, or a leading part of it that ends
/// at a component boundary (the next character of `dn` is `/`, or the pattern ends with `/`).
///
/// The paper's "identities that start with the string" is a plain string prefix; cutting only at
/// `/` keeps `/O=Grid/OU=mcs.anl.gov` from also covering `/O=Grid/OU=mcs.anl.gov.evil.org`.
pub fn identity_covers(pattern: &str, dn: &str) -> bool {
    if !dn.starts_with(pattern) {
        return false;
    }
    dn.len() == pattern.len() || pattern.ends_with('/') || dn.as_bytes()[pattern.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_with_units() {
        assert_eq!(Attr::Count.parse_number("4"), Some(4));
        assert_eq!(Attr::Count.parse_number("4G"), None);
        assert_eq!(Attr::Memory.parse_number("2G"), Some(2 << 30));
        assert_eq!(Attr::Memory.parse_number("512k"), Some(512 << 10));
        assert_eq!(Attr::Walltime.parse_number("36h"), Some(36 * 3600));
        assert_eq!(Attr::Walltime.parse_number("2d"), Some(2 * 86400));
        assert_eq!(Attr::Walltime.parse_number("h"), None);
        assert_eq!(Attr::Memory.parse_number("99999999999999999999"), None);
        assert_eq!(Attr::Memory.parse_number("18446744073709551615T"), None);
    }

    #[test]
    fn identity_prefixes_cut_at_slashes() {
        assert!(identity_covers("/DC=org", "/DC=org"));
        assert!(identity_covers("/DC=org", "/DC=org/CN=a"));
        assert!(identity_covers("/DC=org/", "/DC=org/CN=a"));
        assert!(identity_covers("/", "/DC=org/CN=a"));
        assert!(!identity_covers("/DC=org", "/DC=orgx/CN=a"));
        assert!(!identity_covers("/DC=org/CN=a", "/DC=org"));
    }
}
