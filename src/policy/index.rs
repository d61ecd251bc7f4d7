//! A parsed policy with its identity index: statements keyed by their identity string, so the
//! statements that cover a DN are found with one hash lookup per `/` in the DN, whatever the
//! size of the policy.
//!
//! No file watching here (that is `reload`), no decisions (that is `eval`).

use std::collections::HashMap;
use std::path::Path;

use super::ast::{identity_covers, Statement};
use super::error::PolicyError;
use super::parser::parse_statements;

/// One policy source (a file), parsed and indexed. Immutable once built.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    statements: Vec<Statement>,
    /// identity -> indices into `statements`, ascending (file order).
    index: HashMap<String, Vec<u32>>,
}

impl Policy {
    /// Parses policy text; `name` (usually the file path) prefixes locations and errors.
    pub fn parse(name: &str, text: &str) -> Result<Self, PolicyError> {
        let statements = parse_statements(name, text).map_err(PolicyError::Parse)?;
        let mut index: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, s) in statements.iter().enumerate() {
            index.entry(s.identity.clone()).or_default().push(i as u32);
        }
        Ok(Policy {
            name: name.to_string(),
            statements,
            index,
        })
    }

    /// Reads and parses a policy file; errors name the path as given.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The source name used in locations.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All statements in file order.
    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }

    /// The statements whose identity covers `dn` (see [`identity_covers`]), in file order.
    pub fn matching(&self, dn: &str) -> Vec<&Statement> {
        let mut ids: Vec<u32> = Vec::new();
        let mut add = |key: &str| {
            if let Some(found) = self.index.get(key) {
                ids.extend_from_slice(found);
            }
        };
        for (i, b) in dn.bytes().enumerate() {
            if b == b'/' {
                if i > 0 {
                    add(&dn[..i]);
                }
                add(&dn[..=i]);
            }
        }
        if !dn.ends_with('/') {
            add(dn);
        }
        ids.sort_unstable();
        ids.dedup();
        let found: Vec<&Statement> = ids.iter().map(|&i| &self.statements[i as usize]).collect();
        debug_assert!(found.iter().all(|s| identity_covers(&s.identity, dn)));
        found
    }

    /// "file:line" of a position in this policy.
    pub fn location(&self, line: u32) -> String {
        format!("{}:{}", self.name, line)
    }
}
