//! Turns policy text into statements (see docs/policy.md for the language), collecting every
//! error with its line and column so `policy check` can show them all at once.
//!
//! Line oriented: an assertion never spans lines, an assertion set may. No I/O and no decisions
//! here; indexing is `index`.

use super::ast::{
    Action, Assertion, AssertionSet, Attr, Op, Operand, Pos, Statement, StatementKind,
};
use super::error::{ParseError, ParseErrorKind as K};

/// Parses a whole policy text. `file` names the source in errors.
pub fn parse_statements(file: &str, text: &str) -> Result<Vec<Statement>, Vec<ParseError>> {
    let mut p = Parser {
        file,
        statements: Vec::new(),
        errors: Vec::new(),
        current: None,
        set: None,
        orphan_reported: false,
    };
    for (index, line) in text.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        p.line(index as u32 + 1, &chars);
    }
    p.finish_statement();
    if p.errors.is_empty() {
        Ok(p.statements)
    } else {
        Err(p.errors)
    }
}

struct OpenStatement {
    statement: Statement,
    /// The identity line was malformed: parse its sets for errors, then drop it.
    broken: bool,
}

struct OpenSet {
    set: AssertionSet,
    /// An assertion in it was malformed: the set is dropped (the file is rejected anyway).
    broken: bool,
}

struct Parser<'a> {
    file: &'a str,
    statements: Vec<Statement>,
    errors: Vec<ParseError>,
    current: Option<OpenStatement>,
    set: Option<OpenSet>,
    /// Only the first set of a run without an identity gets an error.
    orphan_reported: bool,
}

/// An error at a column of the current line; the caller adds file and line.
struct At(u32, K);

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\r'
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && is_space(chars[i]) {
        i += 1;
    }
    i
}

fn col(i: usize) -> u32 {
    i as u32 + 1
}

impl<'a> Parser<'a> {
    fn error(&mut self, line: u32, At(column, kind): At) {
        self.errors.push(ParseError {
            file: self.file.to_string(),
            line,
            column,
            kind,
        });
    }

    fn line(&mut self, line: u32, chars: &[char]) {
        let i = skip_space(chars, 0);
        if i == chars.len() || chars[i] == '#' {
            return;
        }
        if chars[i] == '(' {
            return self.sets(line, chars, i);
        }
        if chars[i] == '&' {
            let j = skip_space(chars, i + 1);
            if j == chars.len() || chars[j] == '(' || chars[j] == '#' {
                return self.sets(line, chars, i);
            }
            return self.identity(line, chars, j, StatementKind::Requirement, i);
        }
        self.identity(line, chars, i, StatementKind::Grant, i)
    }

    /// An `IDENTITY:` line starting at `start` (after the `&` of a requirement).
    fn identity(
        &mut self,
        line: u32,
        chars: &[char],
        start: usize,
        kind: StatementKind,
        stmt_col: usize,
    ) {
        self.finish_statement();
        self.orphan_reported = false;
        let pos = Pos {
            line,
            column: col(stmt_col),
        };
        let parsed = if chars[start] == '"' {
            quoted_identity(chars, start)
        } else {
            bare_identity(chars, start)
        };
        let (identity, rest, broken) = match parsed {
            Ok((identity, rest)) => (identity, rest, false),
            Err(at) => {
                self.error(line, at);
                (String::new(), chars.len(), true)
            }
        };
        self.current = Some(OpenStatement {
            statement: Statement {
                kind,
                identity,
                sets: Vec::new(),
                pos,
            },
            broken,
        });
        self.sets(line, chars, rest);
    }

    /// Assertion sets from `i` to the end of the line.
    fn sets(&mut self, line: u32, chars: &[char], mut i: usize) {
        loop {
            i = skip_space(chars, i);
            if i >= chars.len() || chars[i] == '#' {
                return;
            }
            match chars[i] {
                '&' => {
                    self.finish_set();
                    self.open_set(line, i);
                    i += 1;
                }
                '(' => {
                    if self.set.is_none() {
                        self.open_set(line, i);
                    }
                    let (result, next) = assertion(chars, i, line);
                    match result {
                        Ok(a) => {
                            if let Some(open) = self.set.as_mut() {
                                open.set.assertions.push(a);
                            }
                        }
                        Err(at) => {
                            self.error(line, at);
                            if let Some(open) = self.set.as_mut() {
                                open.broken = true;
                            }
                        }
                    }
                    i = next;
                }
                _ => {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| is_space(c) || c == '(' || c == '&')
                        .map_or(chars.len(), |n| i + n);
                    let text: String = chars[i..end].iter().collect();
                    self.error(line, At(col(i), K::UnexpectedText(text)));
                    if let Some(open) = self.set.as_mut() {
                        open.broken = true;
                    }
                    return;
                }
            }
        }
    }

    fn open_set(&mut self, line: u32, i: usize) {
        if self.current.is_none() && !self.orphan_reported {
            self.error(line, At(col(i), K::StatementWithoutIdentity));
            self.orphan_reported = true;
        }
        self.set = Some(OpenSet {
            set: AssertionSet {
                assertions: Vec::new(),
                pos: Pos {
                    line,
                    column: col(i),
                },
            },
            broken: false,
        });
    }

    fn finish_set(&mut self) {
        let Some(open) = self.set.take() else { return };
        if open.set.assertions.is_empty() && !open.broken {
            let Pos { line, column } = open.set.pos;
            self.error(line, At(column, K::EmptyAssertionSet));
            return;
        }
        if let Some(stmt) = self.current.as_mut() {
            if open.broken {
                stmt.broken = true;
            } else {
                stmt.statement.sets.push(open.set);
            }
        }
    }

    fn finish_statement(&mut self) {
        self.finish_set();
        let Some(open) = self.current.take() else {
            return;
        };
        if open.broken {
            return;
        }
        if open.statement.sets.is_empty() {
            let Pos { line, column } = open.statement.pos;
            self.error(
                line,
                At(column, K::StatementWithoutSets(open.statement.identity)),
            );
            return;
        }
        self.statements.push(open.statement);
    }
}

/// `"...":` — a quoted identity (for DNs holding `:` or `#`).
fn quoted_identity(chars: &[char], start: usize) -> Result<(String, usize), At> {
    let (value, next) = quoted(chars, start)?;
    let i = skip_space(chars, next);
    if i >= chars.len() || chars[i] != ':' {
        return Err(At(col(i), K::MissingColon(value)));
    }
    if value.trim().is_empty() {
        return Err(At(col(start), K::EmptyIdentity));
    }
    Ok((value, i + 1))
}

/// `IDENTITY:` — the identity ends at the first `:` followed by the end of the line, a
/// comment, `&` or `(`; a `:` inside a DN (`http://...`) is followed by other text.
fn bare_identity(chars: &[char], start: usize) -> Result<(String, usize), At> {
    for i in start..chars.len() {
        if chars[i] != ':' {
            continue;
        }
        let j = skip_space(chars, i + 1);
        if j == chars.len() || matches!(chars[j], '#' | '&' | '(') {
            let identity: String = chars[start..i]
                .iter()
                .collect::<String>()
                .trim_end()
                .to_string();
            if identity.is_empty() {
                return Err(At(col(i), K::EmptyIdentity));
            }
            return Ok((identity, i + 1));
        }
    }
    // No colon: point just after the identity text (before any trailing comment).
    let text: String = chars[start..].iter().collect();
    let text = text.split(" #").next().unwrap_or("").trim_end().to_string();
    Err(At(col(start + text.chars().count()), K::MissingColon(text)))
}

/// A `"..."` string starting at `start`; `\"` and `\\` escape. Returns the text and the index
/// after the closing quote.
fn quoted(chars: &[char], start: usize) -> Result<(String, usize), At> {
    let mut out = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' => return Ok((out, i + 1)),
            '\\' if i + 1 < chars.len() && matches!(chars[i + 1], '"' | '\\') => {
                out.push(chars[i + 1]);
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Err(At(col(start), K::UnterminatedQuote))
}

struct Token {
    text: String,
    quoted: bool,
    at: usize,
}

/// One `(attr op value...)` starting at `open`. Returns the assertion (or the first error in it)
/// and where to continue.
fn assertion(chars: &[char], open: usize, line: u32) -> (Result<Assertion, At>, usize) {
    match assertion_inner(chars, open, line) {
        Ok((a, next)) => (Ok(a), next),
        Err((at, resume)) => (Err(at), resume),
    }
}

fn assertion_inner(
    chars: &[char],
    open: usize,
    line: u32,
) -> Result<(Assertion, usize), (At, usize)> {
    let unterminated = || (At(col(open), K::UnterminatedAssertion), chars.len());
    // Syntax first: an unclosed assertion is reported as such, whatever else is wrong in it.
    let close = {
        let mut i = open + 1;
        let mut in_quote = false;
        let mut quote_at = 0;
        loop {
            if i >= chars.len() {
                if in_quote {
                    return Err((At(col(quote_at), K::UnterminatedQuote), chars.len()));
                }
                return Err(unterminated());
            }
            match chars[i] {
                '\\' if in_quote => i += 1,
                '"' => {
                    in_quote = !in_quote;
                    quote_at = i;
                }
                ')' if !in_quote => break i,
                '(' if !in_quote => return Err((At(col(open), K::UnterminatedAssertion), i)),
                _ => {}
            }
            i += 1;
        }
    };
    let fail = |at: At| (at, close + 1);
    let mut i = skip_space(chars, open + 1);
    if i == close {
        return Err(fail(At(col(open), K::EmptyAssertion)));
    }
    // Attribute name.
    let name_at = i;
    while i < close && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
        i += 1;
    }
    if i == name_at {
        return Err(fail(At(col(name_at), K::MissingAttribute)));
    }
    let name: String = chars[name_at..i].iter().collect();
    let attr = Attr::from_name(&name)
        .ok_or_else(|| fail(At(col(name_at), K::UnknownAttribute(name.clone()))))?;
    // Operator.
    i = skip_space(chars, i);
    let op_at = i;
    while i < close
        && matches!(
            chars[i],
            '=' | '!' | '<' | '>' | '~' | '^' | '$' | '*' | ':'
        )
    {
        i += 1;
    }
    if i == op_at {
        return Err(fail(At(col(op_at), K::MissingOperator(name))));
    }
    let op_text: String = chars[op_at..i].iter().collect();
    let op = Op::from_text(&op_text)
        .ok_or_else(|| fail(At(col(op_at), K::UnknownOperator(op_text.clone()))))?;
    // Values.
    let mut values = Vec::new();
    loop {
        i = skip_space(chars, i);
        if i >= close {
            break;
        }
        if chars[i] == '"' {
            let (text, next) = quoted(chars, i).map_err(fail)?;
            values.push(Token {
                text,
                quoted: true,
                at: i,
            });
            i = next;
        } else {
            let start = i;
            while i < close && !is_space(chars[i]) && chars[i] != '"' {
                i += 1;
            }
            values.push(Token {
                text: chars[start..i].iter().collect(),
                quoted: false,
                at: start,
            });
        }
    }
    if values.is_empty() {
        return Err(fail(At(col(close), K::MissingValue)));
    }
    let operand = operand(attr, op, op_at, &values).map_err(fail)?;
    let shown: Vec<String> = values
        .iter()
        .map(|t| {
            if t.quoted {
                format!("\"{}\"", t.text)
            } else {
                t.text.clone()
            }
        })
        .collect();
    let assertion = Assertion {
        attr,
        op,
        operand,
        text: format!("({} {} {})", attr, op.text(), shown.join(" ")),
        pos: Pos {
            line,
            column: col(open),
        },
    };
    Ok((assertion, close + 1))
}

/// Checks the values against the attribute and operator.
fn operand(attr: Attr, op: Op, op_at: usize, values: &[Token]) -> Result<Operand, At> {
    let special = |t: &Token| !t.quoted && (t.text == "NULL" || t.text == "SELF");
    if let Some(t) = values.iter().find(|t| special(t)) {
        if values.len() > 1 {
            return Err(At(col(t.at), K::SpecialValueInList(t.text.clone())));
        }
        if t.text == "SELF" && attr != Attr::Jobowner {
            return Err(At(col(t.at), K::SelfOutsideJobowner(attr.name())));
        }
        if op.is_ordering() {
            return Err(At(
                col(op_at),
                K::OrderingOnNonNumeric {
                    attr: attr.name(),
                    op: op.text(),
                },
            ));
        }
        return Ok(if t.text == "NULL" {
            Operand::Null
        } else {
            Operand::SelfId
        });
    }
    if op.is_ordering() && !attr.is_numeric() {
        return Err(At(
            col(op_at),
            K::OrderingOnNonNumeric {
                attr: attr.name(),
                op: op.text(),
            },
        ));
    }
    if op.is_ordering() && values.len() > 1 {
        return Err(At(col(op_at), K::OrderingWithSeveralValues(op.text())));
    }
    if attr == Attr::Action {
        let mut actions = Vec::new();
        for t in values {
            actions.push(
                Action::from_name(&t.text)
                    .ok_or_else(|| At(col(t.at), K::UnknownAction(t.text.clone())))?,
            );
        }
        return Ok(Operand::Actions(actions));
    }
    if attr.is_numeric() {
        let mut numbers = Vec::new();
        for t in values {
            numbers.push(attr.parse_number(&t.text).ok_or_else(|| {
                At(
                    col(t.at),
                    K::BadNumber {
                        attr: attr.name(),
                        value: t.text.clone(),
                        syntax: attr.number_syntax(),
                    },
                )
            })?);
        }
        return Ok(Operand::Numbers(numbers));
    }
    Ok(Operand::Strings(
        values.iter().map(|t| t.text.clone()).collect(),
    ))
}
