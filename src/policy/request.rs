//! What is asked: a [`Request`] (requester, action, job owner, job attributes), built by the
//! helper from a verified envelope or a management request, or read from JSON by
//! `policy eval`.
//!
//! No decisions here (that is `eval`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ast::{Action, Attr};
use super::error::RequestError;
use crate::protocol::envelope::EnvelopeBody;

/// One authorization question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The requester's DN.
    pub identity: String,
    pub action: Action,
    /// The DN of the job's initiator. For `start` it defaults to the requester.
    pub jobowner: Option<String>,
    /// Job attributes; a multi-valued attribute (fqan) holds several strings. Numeric attributes
    /// hold decimal strings (or the unit syntax of their attribute).
    pub attributes: BTreeMap<Attr, Vec<String>>,
}

impl Request {
    /// A request with no attributes yet.
    pub fn new(identity: impl Into<String>, action: Action) -> Self {
        Request {
            identity: identity.into(),
            action,
            jobowner: None,
            attributes: BTreeMap::new(),
        }
    }

    /// Sets (replaces) a single-valued attribute.
    pub fn with(mut self, attr: Attr, value: impl ToString) -> Self {
        self.attributes.insert(attr, vec![value.to_string()]);
        self
    }

    /// Adds one value to a (multi-valued) attribute.
    pub fn add(mut self, attr: Attr, value: impl ToString) -> Self {
        self.attributes
            .entry(attr)
            .or_default()
            .push(value.to_string());
        self
    }

    /// Sets the job owner (management requests: the DN that started the job).
    pub fn owned_by(mut self, dn: impl Into<String>) -> Self {
        self.jobowner = Some(dn.into());
        self
    }

    /// The `start` request for a payload envelope: the owner asks to start argv\[0\] with the
    /// envelope's jobtag, resources, VO and FQANs. `executable` is argv\[0\]'s file name and
    /// `directory` its directory when argv\[0\] holds a `/`; `count` and `cores` are the cores.
    pub fn for_launch(body: &EnvelopeBody) -> Self {
        let mut r = Request::new(body.owner.dn.clone(), Action::Start);
        if let Some(program) = body.argv.first() {
            match program.rsplit_once('/') {
                Some((dir, file)) => {
                    r = r.with(Attr::Executable, file);
                    r = r.with(Attr::Directory, if dir.is_empty() { "/" } else { dir });
                }
                None => r = r.with(Attr::Executable, program),
            }
        }
        if let Some(tag) = &body.jobtag {
            r = r.with(Attr::Jobtag, tag);
        }
        r = r
            .with(Attr::Count, body.resources.cores)
            .with(Attr::Cores, body.resources.cores)
            .with(Attr::Memory, body.resources.memory_bytes)
            .with(Attr::Walltime, body.resources.walltime_seconds)
            .with(Attr::Vo, &body.owner.vo);
        for fqan in &body.owner.fqans {
            r = r.add(Attr::Fqan, fqan);
        }
        r
    }

    /// The job owner as policies see it: the given one, or the requester for `start`.
    pub fn effective_jobowner(&self) -> Option<&str> {
        match (&self.jobowner, self.action) {
            (Some(owner), _) => Some(owner),
            (None, Action::Start) => Some(&self.identity),
            (None, _) => None,
        }
    }

    /// Reads a request from JSON:
    /// `{"identity": DN, "action": "start", "jobowner": DN?, "attributes": {name: value}}` where a
    /// value is a string, a number or a list of them.
    pub fn from_json(text: &str) -> Result<Self, RequestError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            identity: String,
            action: String,
            #[serde(default)]
            jobowner: Option<String>,
            #[serde(default)]
            attributes: BTreeMap<String, serde_json::Value>,
        }
        let wire: Wire =
            serde_json::from_str(text).map_err(|e| RequestError::Json(e.to_string()))?;
        if wire.identity.trim().is_empty() {
            return Err(RequestError::EmptyIdentity);
        }
        let action =
            Action::from_name(&wire.action).ok_or(RequestError::UnknownAction(wire.action))?;
        let mut request = Request::new(wire.identity, action);
        request.jobowner = wire.jobowner;
        for (name, value) in wire.attributes {
            let attr = Attr::from_name(&name)
                .ok_or_else(|| RequestError::UnknownAttribute(name.clone()))?;
            if matches!(attr, Attr::Action | Attr::Jobowner) {
                return Err(RequestError::ReservedAttribute(name));
            }
            let items = match value {
                serde_json::Value::Null => continue,
                serde_json::Value::Array(items) => items,
                other => vec![other],
            };
            let mut values = Vec::new();
            for item in items {
                let text = match item {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return Err(RequestError::BadValue { attr: attr.name() }),
                };
                if attr.is_numeric() && attr.parse_number(&text).is_none() {
                    return Err(RequestError::BadNumber {
                        attr: attr.name(),
                        value: text,
                        syntax: attr.number_syntax(),
                    });
                }
                values.push(text);
            }
            request.attributes.insert(attr, values);
        }
        Ok(request)
    }
}
