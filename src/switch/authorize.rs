//! The local authorization decision (P3, P6) and the owner -> account mapping (P5).
//!
//! The decision is a sequence, each step able to say no, default deny:
//! 1. the owner's VO is configured on this site;
//! 2. every [`LocalCheck`] permits: this is where site ban lists (DN, FQAN, VO) and the policy
//!    language (`crate::policy`: site policy AND VO policy) plug in, as further checks added in
//!    [`Authorizer::new`];
//! 3. the grid-mapfile maps the owner's DN to an account (pool leases are not available yet).
//!
//! Only decides; resolving the account and launching belong to other modules.

use std::collections::BTreeSet;

use super::gridmap::{GridmapError, GridmapSource, Mapping};
use crate::protocol::Owner;

/// What the decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub owner: &'a Owner,
    pub payload_id: &'a str,
    pub jobtag: Option<&'a str>,
    pub pilot_uid: u32,
    pub pilot_dn: Option<&'a str>,
}

/// One local authorization check. `Err(reason)` denies; the reason reaches the pilot, the VO
/// server and the audit log, so it must name what matched.
pub trait LocalCheck: Send + Sync {
    /// Short name for records, e.g. `ban_list` or `site_policy`.
    fn name(&self) -> &'static str;
    fn check(&self, req: &AuthzRequest<'_>) -> Result<(), String>;
}

/// Why authorization said no (or could not decide).
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("VO '{vo}' is not configured on this site")]
    VoNotConfigured { vo: String },
    #[error("{check}: {reason}")]
    Check { check: &'static str, reason: String },
    #[error("no mapping for DN \"{dn}\" in {file}")]
    NoMapping { dn: String, file: String },
    #[error("DN \"{dn}\" maps to pool '.{pool}' ({file} line {line}), but pool accounts are not configured on this helper")]
    PoolNotConfigured {
        dn: String,
        pool: String,
        file: String,
        line: usize,
    },
    #[error("{0}")]
    Gridmap(#[from] GridmapError),
}

/// A permit: the account name the owner maps to, and where that came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    pub account: String,
    pub mapped_by: String,
}

/// The decision maker of one helper.
pub struct Authorizer {
    vos: BTreeSet<String>,
    checks: Vec<Box<dyn LocalCheck>>,
    gridmap: GridmapSource,
}

impl Authorizer {
    /// The site's decision chain. Ban lists and policies are added to `checks` here.
    pub fn new(vos: BTreeSet<String>, gridmap: GridmapSource) -> Self {
        Authorizer {
            vos,
            checks: Vec::new(),
            gridmap,
        }
    }

    /// Adds a check after the existing ones.
    pub fn with_check(mut self, check: Box<dyn LocalCheck>) -> Self {
        self.checks.push(check);
        self
    }

    /// Decides; a permit names the account.
    pub fn decide(&self, req: &AuthzRequest<'_>) -> Result<Permit, AuthzError> {
        if !self.vos.contains(&req.owner.vo) {
            return Err(AuthzError::VoNotConfigured {
                vo: req.owner.vo.clone(),
            });
        }
        for c in &self.checks {
            c.check(req).map_err(|reason| AuthzError::Check {
                check: c.name(),
                reason,
            })?;
        }
        let gm = self.gridmap.current()?;
        let file = self.gridmap.path().display().to_string();
        match gm.lookup(&req.owner.dn) {
            None => Err(AuthzError::NoMapping {
                dn: req.owner.dn.clone(),
                file,
            }),
            Some((Mapping::Pool(pool), line)) => Err(AuthzError::PoolNotConfigured {
                dn: req.owner.dn.clone(),
                pool,
                file,
                line,
            }),
            Some((Mapping::Account(account), line)) => Ok(Permit {
                account,
                mapped_by: format!("{file} line {line}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct BanAll;
    impl LocalCheck for BanAll {
        fn name(&self) -> &'static str {
            "ban_list"
        }
        fn check(&self, req: &AuthzRequest<'_>) -> Result<(), String> {
            Err(format!("DN \"{}\" is banned", req.owner.dn))
        }
    }

    fn owner(dn: &str, vo: &str) -> Owner {
        Owner {
            dn: dn.into(),
            vo: vo.into(),
            fqans: vec![],
            membership_valid_until: chrono::Utc::now(),
        }
    }

    #[test]
    fn decision_chain() {
        let dir = tempfile::tempdir().unwrap();
        let gm = dir.path().join("gm");
        std::fs::write(&gm, "\"/CN=a\" acct-a\n\"/CN=p\" .pool\n").unwrap();
        let az = Authorizer::new(["demo".to_string()].into(), GridmapSource::new(gm.clone()));
        fn req(o: &Owner) -> AuthzRequest<'_> {
            AuthzRequest {
                owner: o,
                payload_id: "p",
                jobtag: None,
                pilot_uid: 1,
                pilot_dn: None,
            }
        }
        let a = owner("/CN=a", "demo");
        assert_eq!(az.decide(&req(&a)).unwrap().account, "acct-a");
        let e = az.decide(&req(&owner("/CN=a", "other"))).unwrap_err();
        assert!(matches!(e, AuthzError::VoNotConfigured { .. }));
        let e = az.decide(&req(&owner("/CN=c", "demo"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no mapping for DN \"/CN=c\" in {}", gm.display())
        );
        let e = az.decide(&req(&owner("/CN=p", "demo"))).unwrap_err();
        assert!(
            e.to_string().contains("pool accounts are not configured"),
            "{e}"
        );
        let az = az.with_check(Box::new(BanAll));
        let e = az.decide(&req(&a)).unwrap_err();
        assert_eq!(e.to_string(), "ban_list: DN \"/CN=a\" is banned");
    }
}
