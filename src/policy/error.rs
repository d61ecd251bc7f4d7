//! Errors of the policy layer: one kind per way a policy can be malformed, a request error, and
//! the file-level error that wraps them. Every message says what is wrong and how to fix it.
//!
//! Pure data; no parsing here.

use std::fmt;
use std::path::PathBuf;

/// What is wrong at one place in a policy file. Each kind has its own message and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// `(` without its `)` on the same line.
    UnterminatedAssertion,
    /// `"` without its closing `"` on the same line.
    UnterminatedQuote,
    /// `&` (a new set) with no `(attr op value)` after it.
    EmptyAssertionSet,
    /// `()`: parentheses with nothing inside.
    EmptyAssertion,
    /// `(= x)`: no attribute name.
    MissingAttribute,
    /// An attribute the language does not know.
    UnknownAttribute(String),
    /// `(count 4)`: no operator after the attribute.
    MissingOperator(String),
    /// An operator that is not one of = != < <= > >=.
    UnknownOperator(String),
    /// `(count <)`: nothing after the operator.
    MissingValue,
    /// A value of `action` that is not start, cancel, information or signal.
    UnknownAction(String),
    /// A value of a numeric attribute that is not a number in its syntax.
    BadNumber {
        attr: &'static str,
        value: String,
        syntax: &'static str,
    },
    /// `<`, `<=`, `>`, `>=` on an attribute that is not numeric (or against NULL/SELF).
    OrderingOnNonNumeric {
        attr: &'static str,
        op: &'static str,
    },
    /// An ordering operator with several values.
    OrderingWithSeveralValues(&'static str),
    /// `NULL` or `SELF` mixed with other values.
    SpecialValueInList(String),
    /// `SELF` on an attribute other than jobowner.
    SelfOutsideJobowner(&'static str),
    /// An assertion set before any `IDENTITY:` line.
    StatementWithoutIdentity,
    /// A line that is neither a comment, an assertion set nor `IDENTITY:`.
    MissingColon(String),
    /// `:` or `&:` with no identity before it.
    EmptyIdentity,
    /// `IDENTITY:` followed by no assertion set before the next statement or the end.
    StatementWithoutSets(String),
    /// Something after an assertion that is neither `(`, `&`, nor a comment.
    UnexpectedText(String),
}

impl ParseErrorKind {
    /// A short stable name for the kind (used by tests and tools).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnterminatedAssertion => "unterminated-assertion",
            Self::UnterminatedQuote => "unterminated-quote",
            Self::EmptyAssertionSet => "empty-assertion-set",
            Self::EmptyAssertion => "empty-assertion",
            Self::MissingAttribute => "missing-attribute",
            Self::UnknownAttribute(_) => "unknown-attribute",
            Self::MissingOperator(_) => "missing-operator",
            Self::UnknownOperator(_) => "unknown-operator",
            Self::MissingValue => "missing-value",
            Self::UnknownAction(_) => "unknown-action",
            Self::BadNumber { .. } => "bad-number",
            Self::OrderingOnNonNumeric { .. } => "ordering-on-non-numeric",
            Self::OrderingWithSeveralValues(_) => "ordering-with-several-values",
            Self::SpecialValueInList(_) => "special-value-in-list",
            Self::SelfOutsideJobowner(_) => "self-outside-jobowner",
            Self::StatementWithoutIdentity => "statement-without-identity",
            Self::MissingColon(_) => "missing-colon",
            Self::EmptyIdentity => "empty-identity",
            Self::StatementWithoutSets(_) => "statement-without-sets",
            Self::UnexpectedText(_) => "unexpected-text",
        }
    }

    /// What is wrong.
    pub fn message(&self) -> String {
        match self {
            Self::UnterminatedAssertion => {
                "assertion is not closed: '(' without ')' on this line".into()
            }
            Self::UnterminatedQuote => {
                "quoted value is not closed: '\"' without its closing '\"' on this line".into()
            }
            Self::EmptyAssertionSet => {
                "empty assertion set: '&' is not followed by any (attribute op value)".into()
            }
            Self::EmptyAssertion => "empty assertion '()'".into(),
            Self::MissingAttribute => "assertion has no attribute name before its operator".into(),
            Self::UnknownAttribute(a) => format!("unknown attribute '{a}'"),
            Self::MissingOperator(a) => format!("no operator after attribute '{a}'"),
            Self::UnknownOperator(o) => format!("unknown operator '{o}'"),
            Self::MissingValue => "assertion has no value after its operator".into(),
            Self::UnknownAction(v) => format!("unknown action '{v}'"),
            Self::BadNumber { attr, value, .. } => {
                format!("'{value}' is not a valid number for {attr}")
            }
            Self::OrderingOnNonNumeric { attr, op } => {
                format!("operator '{op}' compares numbers, but '{attr}' is not a numeric attribute (or the value is NULL/SELF)")
            }
            Self::OrderingWithSeveralValues(op) => {
                format!("operator '{op}' takes exactly one value")
            }
            Self::SpecialValueInList(v) => format!("{v} must be the only value of an assertion"),
            Self::SelfOutsideJobowner(a) => {
                format!("SELF is only meaningful for jobowner, not for '{a}'")
            }
            Self::StatementWithoutIdentity => "assertion set before any 'IDENTITY:' line".into(),
            Self::MissingColon(id) => format!("statement identity '{id}' is not followed by ':'"),
            Self::EmptyIdentity => "statement has an empty identity before ':'".into(),
            Self::StatementWithoutSets(id) => format!("statement '{id}:' has no assertion set"),
            Self::UnexpectedText(t) => format!("unexpected text '{t}' between assertions"),
        }
    }

    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            Self::UnterminatedAssertion => "write each assertion as (attribute op value) on one line".into(),
            Self::UnterminatedQuote => "close the value with '\"'; write \\\" for a quote inside it".into(),
            Self::EmptyAssertionSet => "write &(action = start)(...) or remove the '&'".into(),
            Self::EmptyAssertion => "write (attribute op value) or remove the '()'".into(),
            Self::MissingAttribute => format!("start the assertion with one of: {}", super::ast::ATTR_NAMES),
            Self::UnknownAttribute(_) => format!("use one of: {}", super::ast::ATTR_NAMES),
            Self::MissingOperator(_) => "write (attribute op value) with op one of = != < <= > >=".into(),
            Self::UnknownOperator(_) => "use one of = != < <= > >=".into(),
            Self::MissingValue => "write a value after the operator: a word, a \"quoted string\", NULL or SELF".into(),
            Self::UnknownAction(_) => "action is one of start, cancel, information, signal".into(),
            Self::BadNumber { syntax, .. } => format!("write {syntax}"),
            Self::OrderingOnNonNumeric { .. } => {
                "use = or != for strings; < <= > >= only for count, cores, memory, walltime with a number".into()
            }
            Self::OrderingWithSeveralValues(_) => "write one assertion per bound, e.g. (count >= 2)(count <= 8)".into(),
            Self::SpecialValueInList(_) => "write NULL or SELF alone, e.g. (jobtag != NULL)".into(),
            Self::SelfOutsideJobowner(_) => "write (jobowner = SELF) or quote the word: \"SELF\"".into(),
            Self::StatementWithoutIdentity => "start the statement with a line 'IDENTITY:' (or '&IDENTITY:' for a requirement)".into(),
            Self::MissingColon(_) => "end the identity with ':'; if this was meant as an assertion, enclose it in ( )".into(),
            Self::EmptyIdentity => "write a DN or DN prefix before ':', e.g. /DC=org/DC=example:".into(),
            Self::StatementWithoutSets(_) => "follow the identity with at least one &(attribute op value) set, or remove it".into(),
            Self::UnexpectedText(_) => "start a new set with '&', an assertion with '(', a comment with '#'".into(),
        }
    }
}

/// One error in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The file name as given (or the name a string policy was parsed under).
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub kind: ParseErrorKind,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {} (hint: {})",
            self.file,
            self.line,
            self.column,
            self.kind.message(),
            self.kind.hint()
        )
    }
}

impl std::error::Error for ParseError {}

/// A policy file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source} (hint: check the path and that it is readable by root)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", join_errors(.0))]
    Parse(Vec<ParseError>),
}

fn join_errors(errors: &[ParseError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A request that cannot be evaluated (bad JSON, unknown attribute, bad number).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request is not valid JSON: {0} (hint: {{\"identity\": \"/DC=org/CN=x\", \"action\": \"start\", \"attributes\": {{...}}}})")]
    Json(String),
    #[error("request attribute '{0}' is unknown (hint: use one of: {names})", names = super::ast::ATTR_NAMES)]
    UnknownAttribute(String),
    #[error("request attribute '{0}' is given by its own field, not in attributes (hint: use the top-level \"action\" / \"jobowner\")")]
    ReservedAttribute(String),
    #[error("request action '{0}' is unknown (hint: start, cancel, information or signal)")]
    UnknownAction(String),
    #[error("request attribute {attr} = '{value}' is not a number (hint: {syntax})")]
    BadNumber {
        attr: &'static str,
        value: String,
        syntax: &'static str,
    },
    #[error("request attribute {attr} has a value that is neither a string nor a number (hint: use a string, a number or a list of strings)")]
    BadValue { attr: &'static str },
    #[error("request identity is empty (hint: give the requester's DN)")]
    EmptyIdentity,
}
