//! The membership API's wire types (`/v1/membership/...`), shared by the server and the
//! client, and their checks: every body becomes a typed, bounded value here or an error that
//! names the field, the value's problem and the fix. No database, HTTP or file work here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest free-text field (names, institutes, reasons, verification notes), in characters.
pub const MAX_TEXT: usize = 256;
/// Longest reason or verification note, in characters.
pub const MAX_NOTE: usize = 2000;
/// Longest e-mail address (RFC 5321 path limit).
pub const MAX_EMAIL: usize = 254;
/// Most FQANs one member may hold or request.
pub const MAX_FQANS: usize = 32;
/// Largest membership request body.
pub const MAX_BODY: usize = 64 << 10;

/// What is registered: a person, or a host, service or robot a person answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Person,
    Host,
    Service,
    Robot,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Person => "person",
            EntityKind::Host => "host",
            EntityKind::Service => "service",
            EntityKind::Robot => "robot",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "person" => EntityKind::Person,
            "host" => EntityKind::Host,
            "service" => EntityKind::Service,
            "robot" => EntityKind::Robot,
            _ => return None,
        })
    }
}

/// A real person's contact data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    pub family_name: String,
    pub given_name: String,
    /// The employing institute.
    pub institute: String,
    pub email: String,
    /// Optional; the VO may need it during a security incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// The personal registration data of reference 002 (the DN is the member's key, taken from
/// the certificate). For a host, service or robot, `responsible` is the person who requested
/// it and answers for it, and `person` describes the entity's contact (usually the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub person: Person,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responsible: Option<Person>,
}

/// The AUP versions a member accepts with this request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AupAcceptance {
    pub grid_aup: String,
    pub vo_aup: String,
}

/// `POST /v1/membership/register`: the caller registers its own certificate's DN.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub kind: EntityKind,
    pub registration: Registration,
    pub accept: AupAcceptance,
    /// The groups and roles asked for (default: the VO's root group).
    #[serde(default)]
    pub fqans: Vec<String>,
}

/// The kinds of membership request (each one a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Membership,
    /// A change of groups or roles.
    Attributes,
    Renewal,
    Suspension,
    Removal,
    Reinstatement,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Membership => "membership",
            RequestKind::Attributes => "attributes",
            RequestKind::Renewal => "renewal",
            RequestKind::Suspension => "suspension",
            RequestKind::Removal => "removal",
            RequestKind::Reinstatement => "reinstatement",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "membership" => RequestKind::Membership,
            "attributes" => RequestKind::Attributes,
            "renewal" => RequestKind::Renewal,
            "suspension" => RequestKind::Suspension,
            "removal" => RequestKind::Removal,
            "reinstatement" => RequestKind::Reinstatement,
            _ => return None,
        })
    }
}

/// `POST /v1/membership/requests`: a request for a decision by a VO manager. The requester
/// is always the certificate that sends it; no field of the body names it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NewRequest {
    /// The caller asks for these groups and roles instead of its current ones.
    Attributes { fqans: Vec<String> },
    /// The caller renews: data re-confirmed (or updated) and the current AUPs accepted.
    Renewal {
        registration: Box<Registration>,
        accept: AupAcceptance,
    },
    /// A security officer or operations asks for `dn`'s suspension.
    Suspension { dn: String, reason: String },
    /// Someone (an institute representative, say) asks for `dn`'s removal.
    Removal { dn: String, reason: String },
}

/// `POST /v1/membership/requests/{id}/approve|reject`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The checks made and the people consulted (e.g. "institute representative consulted").
    pub verification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `POST /v1/membership/suspend` (a VO manager, at once: an emergency). `reported_by` is the
/// security officer or operations person whose request this carries out, confirmed later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspendRequest {
    pub dn: String,
    pub reason: String,
    pub verification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
}

/// `POST /v1/membership/reinstate` (a VO manager).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReinstateRequest {
    pub dn: String,
    pub verification: String,
}

/// `POST /v1/membership/remove`: the caller leaves (no `dn`, or its own), or a VO manager
/// removes `dn`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A membership request as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestView {
    pub id: String,
    pub kind: RequestKind,
    pub subject_dn: String,
    pub requester_dn: String,
    pub requested_at: DateTime<Utc>,
    /// What was asked (FQANs, reason, re-confirmed data ...); `{}` once purged.
    pub details: serde_json::Value,
    /// `pending`, `approved` or `rejected`.
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub verification: Option<String>,
    pub note: Option<String>,
}

/// A notification the server owes someone (the requesters of a suspension, at reinstatement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    pub recipient_dn: String,
    pub subject_dn: String,
    pub request_id: String,
    pub message: String,
    /// The notify hook's outcome (`delivered at ...`, `failed: ...`), or None when no hook is
    /// configured (the operator reads the list).
    pub delivery: Option<String>,
}

/// A refused body: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct FieldError {
    pub field: String,
    pub why: String,
}

fn err(field: &str, why: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        why: why.into(),
    }
}

/// A bounded single-line text: 1..=`max` characters, no control characters.
pub fn check_text(field: &str, v: &str, max: usize) -> Result<(), FieldError> {
    let n = v.chars().count();
    if v.trim().is_empty() {
        return Err(err(field, "is empty; fill it in"));
    }
    if n > max {
        return Err(err(
            field,
            format!("is {n} characters long; at most {max} are kept"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(err(
            field,
            "contains control characters (newlines, tabs, escapes); write it on one line",
        ));
    }
    Ok(())
}

/// A grid-style DN (`/DC=org/.../CN=name`), bounded.
pub fn check_dn(field: &str, v: &str) -> Result<(), FieldError> {
    check_text(field, v, 1024)?;
    if !v.starts_with('/') || !v.contains('=') {
        return Err(err(
            field,
            format!("{v:?} is not a grid-style DN; write it like /DC=org/DC=example/CN=name"),
        ));
    }
    Ok(())
}

fn check_email(field: &str, v: &str) -> Result<(), FieldError> {
    check_text(field, v, MAX_EMAIL)?;
    let ok = match v.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !v.contains(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{v:?} is not an e-mail address; write it like name@institute.example"),
        ))
    }
}

fn check_phone(field: &str, v: &str) -> Result<(), FieldError> {
    check_text(field, v, 32)?;
    let digits = v.chars().filter(char::is_ascii_digit).count();
    if digits < 4
        || !v
            .chars()
            .all(|c| c.is_ascii_digit() || " +-().".contains(c))
    {
        return Err(err(
            field,
            format!("{v:?} is not a phone number; use digits, spaces and + - ( ) . only, e.g. +41 22 767 1234"),
        ));
    }
    Ok(())
}

impl Person {
    pub fn check(&self, at: &str) -> Result<(), FieldError> {
        check_text(&format!("{at}.family_name"), &self.family_name, MAX_TEXT)?;
        check_text(&format!("{at}.given_name"), &self.given_name, MAX_TEXT)?;
        check_text(&format!("{at}.institute"), &self.institute, MAX_TEXT)?;
        check_email(&format!("{at}.email"), &self.email)?;
        if let Some(p) = &self.phone {
            check_phone(&format!("{at}.phone"), p)?;
        }
        Ok(())
    }
}

impl Registration {
    /// Checks the data for an entity of `kind`: a host, service or robot needs its
    /// responsible person.
    pub fn check(&self, kind: EntityKind) -> Result<(), FieldError> {
        self.person.check("registration.person")?;
        match (&self.responsible, kind) {
            (Some(r), EntityKind::Host | EntityKind::Service | EntityKind::Robot) => {
                r.check("registration.responsible")
            }
            (None, EntityKind::Person) => Ok(()),
            (None, k) => Err(err(
                "registration.responsible",
                format!(
                    "is required for a {}: the real person who requests it and answers for it",
                    k.as_str()
                ),
            )),
            (Some(_), EntityKind::Person) => Err(err(
                "registration.responsible",
                "applies to hosts, services and robots only; leave it out for a person",
            )),
        }
    }
}

impl AupAcceptance {
    /// The accepted versions must be the current ones (server.toml `[membership]`).
    pub fn check(&self, grid_current: &str, vo_current: &str) -> Result<(), FieldError> {
        for (field, v, cur, key) in [
            (
                "accept.grid_aup",
                &self.grid_aup,
                grid_current,
                "grid_aup_version",
            ),
            ("accept.vo_aup", &self.vo_aup, vo_current, "vo_aup_version"),
        ] {
            check_text(field, v, 64)?;
            if v != cur {
                return Err(err(
                    field,
                    format!("accepts version {v:?}, but the current one is {cur:?} ({key} in the VO's server.toml); read and accept version {cur:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// FQANs of the VO `vo`: 1..=[`MAX_FQANS`], each `/vo` or below it, bounded, no duplicates.
pub fn check_fqans(vo: &str, fqans: &[String]) -> Result<(), FieldError> {
    if fqans.is_empty() {
        return Err(err("fqans", format!("is empty; ask for at least /{vo}")));
    }
    if fqans.len() > MAX_FQANS {
        return Err(err(
            "fqans",
            format!("lists {} FQANs; at most {MAX_FQANS}", fqans.len()),
        ));
    }
    let root = format!("/{vo}");
    for (i, f) in fqans.iter().enumerate() {
        let field = format!("fqans[{i}]");
        check_text(&field, f, 255)?;
        if f != &root && !f.starts_with(&format!("{root}/")) {
            return Err(err(
                &field,
                format!("{f:?} is not an FQAN of VO {vo}; it starts with {root}, e.g. {root}/Role=production"),
            ));
        }
        if fqans[..i].contains(f) {
            return Err(err(&field, format!("{f:?} is listed twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person() -> Person {
        Person {
            family_name: "Doe".into(),
            given_name: "Jane".into(),
            institute: "CERN".into(),
            email: "jane@cern.ch".into(),
            phone: Some("+41 22 767 1234".into()),
        }
    }

    #[test]
    fn hostile_fields_are_refused_by_name() {
        let mut p = person();
        p.family_name = "x".repeat(MAX_TEXT + 1);
        assert_eq!(p.check("p").unwrap_err().field, "p.family_name");
        let mut p = person();
        p.institute = "CERN\n\u{1b}[31mroot".into();
        assert_eq!(p.check("p").unwrap_err().field, "p.institute");
        let mut p = person();
        p.email = "jane at cern".into();
        assert_eq!(p.check("p").unwrap_err().field, "p.email");
        let mut p = person();
        p.phone = Some("call me; rm -rf /".into());
        assert_eq!(p.check("p").unwrap_err().field, "p.phone");
        assert!(person().check("p").is_ok());
    }

    #[test]
    fn robots_need_a_responsible_person_and_people_do_not_have_one() {
        let r = Registration {
            person: person(),
            responsible: None,
        };
        assert!(r.check(EntityKind::Person).is_ok());
        assert_eq!(
            r.check(EntityKind::Robot).unwrap_err().field,
            "registration.responsible"
        );
        let r = Registration {
            person: person(),
            responsible: Some(person()),
        };
        assert!(r.check(EntityKind::Robot).is_ok());
        assert!(r.check(EntityKind::Person).is_err());
    }

    #[test]
    fn fqans_stay_in_the_vo_and_aups_must_be_current() {
        assert!(check_fqans("demo", &["/demo".into(), "/demo/Role=x".into()]).is_ok());
        assert!(check_fqans("demo", &["/demoX".into()]).is_err());
        assert!(check_fqans("demo", &["/other".into()]).is_err());
        assert!(check_fqans("demo", &["/demo".into(), "/demo".into()]).is_err());
        let a = AupAcceptance {
            grid_aup: "1.0".into(),
            vo_aup: "2".into(),
        };
        assert!(a.check("1.0", "2").is_ok());
        let e = a.check("1.1", "2").unwrap_err();
        assert_eq!(e.field, "accept.grid_aup");
        assert!(e.why.contains("1.1"), "{e}");
    }

    #[test]
    fn a_requester_field_in_a_request_body_is_refused() {
        let forged =
            r#"{"kind":"suspension","dn":"/CN=a","reason":"x","requester_dn":"/CN=officer"}"#;
        assert!(serde_json::from_str::<NewRequest>(forged).is_err());
        let ok = r#"{"kind":"suspension","dn":"/CN=a","reason":"x"}"#;
        assert!(serde_json::from_str::<NewRequest>(ok).is_ok());
    }
}
