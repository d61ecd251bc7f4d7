//! [`PolicyStack`]: the sources a request must pass, each a fixed policy or a followed file
//! (the site's policy, the VO's policy). Every source must permit; none configured means deny.
//!
//! A source file that stops loading denies every request (fail closed) with a reason naming it.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::PolicyError;
use super::eval::{combine, Decision};
use super::index::Policy;
use super::reload::{Load, ReloadError, Reloading};
use super::request::Request;

impl Load for Policy {
    type Error = PolicyError;
    fn load(name: &str, bytes: &[u8]) -> Result<Self, PolicyError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Policy::parse(name, text),
            Err(e) => Err(PolicyError::Read {
                path: PathBuf::from(name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        }
    }
}

enum Source {
    Fixed(Arc<Policy>),
    Live(Reloading<Policy>),
}

/// An ordered list of labelled policy sources; see [`PolicyStack::decide`].
#[derive(Default)]
pub struct PolicyStack {
    sources: Vec<(String, Source)>,
}

impl PolicyStack {
    /// No sources (decides deny).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an already parsed policy under `label` (e.g. "site", "vo demo").
    pub fn with_policy(mut self, label: impl Into<String>, policy: Policy) -> Self {
        self.sources
            .push((label.into(), Source::Fixed(Arc::new(policy))));
        self
    }

    /// Adds a policy file followed live; fails now if it does not load.
    pub fn with_file(
        mut self,
        label: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> Result<Self, ReloadError> {
        self.sources
            .push((label.into(), Source::Live(Reloading::open(path)?)));
        Ok(self)
    }

    /// Number of sources.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// True when no source is configured.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Permit iff every source permits (and there is at least one).
    pub fn decide(&self, request: &Request) -> Decision {
        let decisions: Vec<(&str, Decision)> = self
            .sources
            .iter()
            .map(|(label, source)| {
                let d = match source {
                    Source::Fixed(p) => p.decide(request),
                    Source::Live(r) => match r.get() {
                        Ok(p) => p.decide(request),
                        Err(e) => Decision::unusable(e.to_string()),
                    },
                };
                (label.as_str(), d)
            })
            .collect();
        combine(&decisions)
    }
}

impl std::fmt::Debug for PolicyStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.sources.iter().map(|(l, _)| l))
            .finish()
    }
}
