//! Decisions: one policy against one request, and the combination of several sources (site and
//! VO) where every source must permit. Default deny.
//!
//! Semantics (docs/policy.md has the long form):
//! - a grant statement `IDENTITY:` permits when one of its sets holds entirely;
//! - a requirement `&IDENTITY:` applies to a request when one of its sets' `action` assertions
//!   hold for the request's action; it is then satisfied when one of those sets holds entirely;
//! - a policy permits iff some grant set holds and every applicable requirement is satisfied.
//!
//! Pure functions over parsed policies; no I/O (live files are `stack`).

use super::ast::{Assertion, AssertionSet, Attr, Op, Operand, StatementKind};
use super::index::Policy;
use super::request::Request;

/// What a decision says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Permit,
    Deny(DenyClass),
}

/// Why a deny is a deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyClass {
    /// What a policy says (or that none grants).
    Policy,
    /// A source could not be loaded (a broken or unreadable file), so it fails closed: the
    /// helper reports it as a system denial.
    Unusable,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Why, for the audit log, the pilot and the VO server.
    pub reason: String,
    /// "file:line" of the sets that decided: on permit the granting set and every satisfied
    /// requirement set; on deny the failing requirement or the grant sets that were tried.
    pub matched: Vec<String>,
}

impl Decision {
    /// A permit, with the sets that granted it.
    pub fn permit(reason: impl Into<String>, matched: Vec<String>) -> Self {
        Decision {
            verdict: Verdict::Permit,
            reason: reason.into(),
            matched,
        }
    }

    /// A deny with no location.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision {
            verdict: Verdict::Deny(DenyClass::Policy),
            reason: reason.into(),
            matched: Vec::new(),
        }
    }

    /// A deny because a source is unusable (fail closed).
    pub fn unusable(reason: impl Into<String>) -> Self {
        Decision {
            verdict: Verdict::Deny(DenyClass::Unusable),
            ..Decision::deny(reason)
        }
    }

    /// Whether the request is permitted.
    pub fn is_permit(&self) -> bool {
        self.verdict == Verdict::Permit
    }

    /// The decision as the JSON line `policy eval` prints:
    /// `{"decision":"permit"|"deny","reason":"...","matched":["file:line",...]}`.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Wire<'a> {
            decision: &'static str,
            reason: &'a str,
            matched: &'a [String],
        }
        let wire = Wire {
            decision: if self.is_permit() { "permit" } else { "deny" },
            reason: &self.reason,
            matched: &self.matched,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            r#"{"decision":"deny","reason":"cannot encode decision","matched":[]}"#.into()
        })
    }
}

/// How many failing grant sets a deny reason names (the rest are counted).
const REASON_SETS: usize = 3;

impl Policy {
    /// Decides one request against this policy alone.
    pub fn decide(&self, request: &Request) -> Decision {
        let statements = self.matching(&request.identity);
        let mut matched = Vec::new();
        // Requirements: every applicable one must be satisfied.
        for s in statements
            .iter()
            .filter(|s| s.kind == StatementKind::Requirement)
        {
            let applicable: Vec<&AssertionSet> = s
                .sets
                .iter()
                .filter(|set| action_applies(set, request))
                .collect();
            if applicable.is_empty() {
                continue;
            }
            match applicable
                .iter()
                .find(|set| first_failure(set, request).is_none())
            {
                Some(set) => matched.push(self.location(set.pos.line)),
                None => {
                    let set = applicable[0];
                    let failed = first_failure(set, request)
                        .map(|a| explain(a, request))
                        .unwrap_or_default();
                    return Decision {
                        verdict: Verdict::Deny(DenyClass::Policy),
                        reason: format!(
                            "requirement for '{}' at {} not satisfied: {}",
                            s.identity,
                            self.location(set.pos.line),
                            failed
                        ),
                        matched: applicable
                            .iter()
                            .map(|set| self.location(set.pos.line))
                            .collect(),
                    };
                }
            }
        }
        // Grants: one satisfied set is enough.
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        for s in statements.iter().filter(|s| s.kind == StatementKind::Grant) {
            for set in &s.sets {
                match first_failure(set, request) {
                    None => {
                        let here = self.location(set.pos.line);
                        matched.insert(0, here.clone());
                        return Decision::permit(
                            format!("{} granted by {} ('{}')", request.action, here, s.identity),
                            matched,
                        );
                    }
                    Some(a) => {
                        tried.push(self.location(set.pos.line));
                        failures.push(format!(
                            "{}: {}",
                            self.location(set.pos.line),
                            explain(a, request)
                        ));
                    }
                }
            }
        }
        let reason = if failures.is_empty() {
            format!(
                "no grant in {} covers '{}' (default deny)",
                self.name(),
                request.identity
            )
        } else {
            let more = failures.len().saturating_sub(REASON_SETS);
            let mut r = format!(
                "no grant set for '{}' allows this {}: ",
                request.identity, request.action
            );
            r.push_str(&failures[..failures.len().min(REASON_SETS)].join("; "));
            if more > 0 {
                r.push_str(&format!("; and {more} more"));
            }
            r
        };
        Decision {
            verdict: Verdict::Deny(DenyClass::Policy),
            reason,
            matched: tried,
        }
    }
}

/// Every `action` assertion of the set holds (a set without one applies to all actions).
fn action_applies(set: &AssertionSet, request: &Request) -> bool {
    set.assertions
        .iter()
        .filter(|a| a.attr == Attr::Action)
        .all(|a| holds(a, request))
}

/// The first assertion of the set that does not hold.
fn first_failure<'s>(set: &'s AssertionSet, request: &Request) -> Option<&'s Assertion> {
    set.assertions.iter().find(|a| !holds(a, request))
}

/// The request's values of an attribute, empty strings dropped (an empty value is absent).
fn values(attr: Attr, request: &Request) -> Vec<&str> {
    match attr {
        Attr::Action => vec![request.action.name()],
        Attr::Jobowner => request
            .effective_jobowner()
            .into_iter()
            .filter(|v| !v.is_empty())
            .collect(),
        _ => request
            .attributes
            .get(&attr)
            .map(|v| {
                v.iter()
                    .map(String::as_str)
                    .filter(|v| !v.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Whether one assertion holds for the request. Absent attributes satisfy only `= NULL` and
/// `!= value`; a request number that does not parse satisfies nothing (fail closed).
pub fn holds(a: &Assertion, request: &Request) -> bool {
    let present = values(a.attr, request);
    let is_eq = a.op == Op::Eq;
    match &a.operand {
        Operand::Null => present.is_empty() == is_eq,
        Operand::SelfId => {
            let same = present
                .first()
                .is_some_and(|owner| *owner == request.identity);
            same == is_eq
        }
        Operand::Actions(actions) => actions.contains(&request.action) == is_eq,
        Operand::Strings(allowed) => {
            let any = present.iter().any(|v| allowed.iter().any(|x| x == v));
            any == is_eq
        }
        Operand::Numbers(bounds) => {
            let mut numbers = Vec::with_capacity(present.len());
            for v in &present {
                match a.attr.parse_number(v) {
                    Some(n) => numbers.push(n),
                    None => return false,
                }
            }
            match a.op {
                Op::Eq => numbers.iter().any(|n| bounds.contains(n)),
                Op::Ne => !numbers.iter().any(|n| bounds.contains(n)),
                op => !numbers.is_empty() && numbers.iter().all(|&n| op.compare(n, bounds[0])),
            }
        }
    }
}

/// "(count < 4) is false: count = 4" for deny reasons.
fn explain(a: &Assertion, request: &Request) -> String {
    let present = values(a.attr, request);
    let shown = if present.is_empty() {
        format!("{} is absent", a.attr)
    } else {
        format!("{} = {}", a.attr, present.join(" "))
    };
    format!("{} fails ({})", a.text, shown)
}

/// Combines the decisions of several sources (labelled, e.g. "site", "vo demo"): permit iff
/// there is at least one source and every source permits.
pub fn combine(parts: &[(&str, Decision)]) -> Decision {
    if parts.is_empty() {
        return Decision::deny("no policy source is configured (default deny)");
    }
    if let Some((label, d)) = parts.iter().find(|(_, d)| !d.is_permit()) {
        return Decision {
            verdict: d.verdict,
            reason: format!("denied by {label} policy: {}", d.reason),
            matched: d.matched.clone(),
        };
    }
    let reason = match parts {
        [(_, only)] => only.reason.clone(),
        _ => parts
            .iter()
            .map(|(label, d)| format!("{label}: {}", d.reason))
            .collect::<Vec<_>>()
            .join("; "),
    };
    Decision::permit(
        reason,
        parts
            .iter()
            .flat_map(|(_, d)| d.matched.iter().cloned())
            .collect(),
    )
}
