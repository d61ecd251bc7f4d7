//! The local authorization decision (P3, P6) and the owner -> account mapping (P5).
//!
//! The decision is a sequence, each step able to say no, default deny:
//! 1. the owner's VO is configured on this site;
//! 2. the site's ban lists (DN, FQAN, VO) ban none of the owner's identities;
//! 3. every configured policy source (the site's policy, the VO's policy) permits the `start`;
//! 4. the owner maps to an account: the grid-mapfile by DN first, then the group map by FQAN;
//!    a pool entry (`.prefix`) leases a pool account from the gridmapdir.
//!
//! Every file is followed live (a changed ban list, policy or map takes effect for the next
//! decision) and fails closed. Only decides and leases; resolving the account and launching
//! belong to other modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::gridmap::{Gridmap, Mapping};
use super::leases::{Gridmapdir, LeaseError, Quarantine};
use crate::policy::{
    Action, Attr, BanDenial, Bans, Decision, DenyClass, PolicyStack, ReloadError, Reloading,
    Request, Verdict,
};
use crate::protocol::command::CommandBody;
use crate::protocol::EnvelopeBody;

/// What the launch decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub body: &'a EnvelopeBody,
    pub pilot_uid: u32,
    pub pilot_dn: Option<&'a str>,
}

/// Why authorization said no (or could not decide).
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("VO '{vo}' is not configured on this site")]
    VoNotConfigured { vo: String },
    #[error("banned: {0}")]
    Banned(String),
    #[error("ban list unusable: {0}")]
    BanListUnusable(String),
    #[error("policy: {0}")]
    PolicyDenied(String),
    #[error("policy unusable: {0}")]
    PolicyUnusable(String),
    #[error("no mapping for DN \"{dn}\" in {file}{groups}")]
    NoMapping {
        dn: String,
        file: String,
        /// ", nor for its FQANs in FILE" when a group map is configured.
        groups: String,
    },
    #[error("{who} maps to pool '.{pool}' ({file} line {line}), but no gridmapdir is configured; set 'gridmapdir' in switch.toml")]
    PoolNotConfigured {
        who: String,
        pool: String,
        file: String,
        line: usize,
    },
    #[error("pool account lease: {0}")]
    Lease(#[from] LeaseError),
    #[error("{0}")]
    MapFile(#[from] ReloadError),
}

impl AuthzError {
    /// True when the helper could not decide or could not serve a permitted owner (a broken
    /// file, a failed cleanup, every pool account leased), rather than a decision saying no:
    /// reported as a `system` refusal. An exhausted pool is the site's capacity, not a
    /// verdict on the owner (docs/vo-operator.md reserves `denied` for such verdicts).
    pub fn is_system(&self) -> bool {
        matches!(
            self,
            AuthzError::BanListUnusable(_)
                | AuthzError::PolicyUnusable(_)
                | AuthzError::PoolNotConfigured { .. }
                | AuthzError::MapFile(_)
                | AuthzError::Lease(_)
        )
    }
}

/// A permit: the account name the owner maps to, and where that came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    pub account: String,
    pub mapped_by: String,
    /// The account is a leased pool account (touched when its payloads end).
    pub pooled: bool,
}

/// The site's authorization sources, as configured in switch.toml.
pub struct AuthzSources {
    pub vos: BTreeSet<String>,
    pub bans: Bans,
    /// Per VO: its policy sources (the site's policy and the VO's own); absent when neither is
    /// configured.
    pub policies: BTreeMap<String, PolicyStack>,
    pub gridmap: PathBuf,
    pub groupmap: Option<PathBuf>,
    pub pool: Option<Gridmapdir>,
}

/// The decision maker of one helper.
pub struct Authorizer {
    vos: BTreeSet<String>,
    bans: Bans,
    policies: BTreeMap<String, PolicyStack>,
    gridmap: Reloading<Gridmap>,
    groupmap: Option<Reloading<Gridmap>>,
    pool: Option<Gridmapdir>,
    quarantine: Box<dyn Quarantine + Send + Sync>,
}

impl Authorizer {
    /// Opens every followed file; fails when one does not load now.
    pub fn new(
        sources: AuthzSources,
        quarantine: Box<dyn Quarantine + Send + Sync>,
    ) -> Result<Self, ReloadError> {
        Ok(Authorizer {
            vos: sources.vos,
            bans: sources.bans,
            policies: sources.policies,
            gridmap: Reloading::open(sources.gridmap)?,
            groupmap: sources.groupmap.map(Reloading::open).transpose()?,
            pool: sources.pool,
            quarantine,
        })
    }

    /// The pool directory, when pool accounts are configured.
    pub fn pool(&self) -> Option<&Gridmapdir> {
        self.pool.as_ref()
    }

    /// Decides a launch; a permit names the account (leasing a pool account if the mapping
    /// says so). `in_use(account)` tells whether payloads of an account run now.
    pub fn decide(
        &self,
        req: &AuthzRequest<'_>,
        in_use: &dyn Fn(&str) -> bool,
    ) -> Result<Permit, AuthzError> {
        let owner = &req.body.owner;
        if !self.vos.contains(&owner.vo) {
            return Err(AuthzError::VoNotConfigured {
                vo: owner.vo.clone(),
            });
        }
        self.check_bans(&owner.dn, &owner.fqans, &owner.vo)?;
        if let Some(stack) = self.policies.get(&owner.vo) {
            policy_outcome(stack.decide(&Request::for_launch(req.body)))?;
        }
        self.map(&owner.dn, &owner.fqans, in_use)
    }

    /// Decides an operator command (cancel, signal, information) on a running payload whose
    /// envelope is `payload`. The requester must not be banned; with policies configured for
    /// the VO they decide (action, jobowner, jobtag, SELF); without, the VO server's signature
    /// on the command is the VO's decision and the site adds none.
    pub fn decide_command(
        &self,
        cmd: &CommandBody,
        payload: &EnvelopeBody,
    ) -> Result<(), AuthzError> {
        self.check_bans(&cmd.requester_dn, &cmd.requester_fqans, &payload.owner.vo)?;
        let Some(stack) = self.policies.get(&payload.owner.vo) else {
            return Ok(());
        };
        let action = match cmd.action {
            crate::protocol::command::CommandAction::Cancel => Action::Cancel,
            crate::protocol::command::CommandAction::Signal => Action::Signal,
            crate::protocol::command::CommandAction::Information => Action::Information,
        };
        // The job's attributes as its start request had them, then the manager's view.
        let mut r = Request::for_launch(payload);
        r.identity = cmd.requester_dn.clone();
        r.action = action;
        r.jobowner = Some(payload.owner.dn.clone());
        r.attributes.remove(&Attr::Fqan);
        for f in &cmd.requester_fqans {
            r = r.add(Attr::Fqan, f);
        }
        policy_outcome(stack.decide(&r))
    }

    fn check_bans(&self, dn: &str, fqans: &[String], vo: &str) -> Result<(), AuthzError> {
        match self.bans.check(dn, fqans, vo) {
            None => Ok(()),
            Some(BanDenial::Unusable { reason }) => Err(AuthzError::BanListUnusable(reason)),
            Some(BanDenial::Banned { reason }) => Err(AuthzError::Banned(reason)),
        }
    }

    /// DN in the grid-mapfile first; then each FQAN (most significant first) in the group map.
    fn map(
        &self,
        dn: &str,
        fqans: &[String],
        in_use: &dyn Fn(&str) -> bool,
    ) -> Result<Permit, AuthzError> {
        let gm = self.gridmap.get()?;
        let gm_file = self.gridmap.path().display().to_string();
        if let Some((mapping, line)) = gm.lookup(dn) {
            return self.resolve(mapping, dn, None, &gm_file, line, in_use);
        }
        let mut groups = String::new();
        if let Some(groupmap) = &self.groupmap {
            let map = groupmap.get()?;
            let file = groupmap.path().display().to_string();
            for fqan in fqans {
                if let Some((mapping, line)) = lookup_fqan(&map, fqan) {
                    return self.resolve(mapping, dn, Some((fqan, fqans)), &file, line, in_use);
                }
            }
            groups = format!(", nor for its FQANs {fqans:?} in {file}");
        }
        Err(AuthzError::NoMapping {
            dn: dn.to_string(),
            file: gm_file,
            groups,
        })
    }

    fn resolve(
        &self,
        mapping: Mapping,
        dn: &str,
        by_fqan: Option<(&String, &[String])>,
        file: &str,
        line: usize,
        in_use: &dyn Fn(&str) -> bool,
    ) -> Result<Permit, AuthzError> {
        let mapped_by = format!("{file} line {line}");
        match mapping {
            Mapping::Account(account) => Ok(Permit {
                account,
                mapped_by,
                pooled: false,
            }),
            Mapping::Pool(prefix) => {
                let Some(pool) = &self.pool else {
                    return Err(AuthzError::PoolNotConfigured {
                        who: match by_fqan.map(|(chosen, _)| chosen) {
                            Some(g) => format!("FQAN \"{g}\""),
                            None => format!("DN \"{dn}\""),
                        },
                        pool: prefix,
                        file: file.to_string(),
                        line,
                    });
                };
                // The FQAN that chose the pool, and all the owner's (LCMAPS names the lease by
                // the groups of all of them when the site's groupmapfile is configured).
                let (chosen, all) = match by_fqan {
                    Some((chosen, all)) => (std::slice::from_ref(chosen), all),
                    None => (&[][..], &[][..]),
                };
                let account =
                    pool.acquire_for(dn, chosen, all, &prefix, in_use, &*self.quarantine)?;
                Ok(Permit {
                    account,
                    mapped_by: format!("{mapped_by}, pool '.{prefix}' lease"),
                    pooled: true,
                })
            }
        }
    }
}

/// The group map's entry for an FQAN: an exact match, or an entry ending in `/*` that covers
/// it (`"/demo/*"` covers `/demo/prod`). First match in file order wins.
fn lookup_fqan(map: &Gridmap, fqan: &str) -> Option<(Mapping, usize)> {
    let e = map.entries.iter().find(|e| {
        e.dn == fqan
            || e.dn
                .strip_suffix('*')
                .is_some_and(|prefix| prefix.ends_with('/') && fqan.starts_with(prefix))
    })?;
    Some((Mapping::from_account(&e.accounts[0]), e.line))
}

/// A policy decision as the helper's result: a deny from what a policy says, or from a source
/// that cannot be used (a system denial).
fn policy_outcome(d: Decision) -> Result<(), AuthzError> {
    match d.verdict {
        Verdict::Permit => Ok(()),
        Verdict::Deny(DenyClass::Policy) => Err(AuthzError::PolicyDenied(d.reason)),
        Verdict::Deny(DenyClass::Unusable) => Err(AuthzError::PolicyUnusable(d.reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Owner, Resources};

    struct NoClean;
    impl Quarantine for NoClean {
        fn clean(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    fn body(dn: &str, vo: &str, fqans: &[&str]) -> EnvelopeBody {
        let now = chrono::Utc::now();
        EnvelopeBody {
            version: crate::protocol::envelope::ENVELOPE_VERSION,
            payload_id: "p".into(),
            owner: Owner {
                dn: dn.into(),
                vo: vo.into(),
                fqans: fqans.iter().map(|s| s.to_string()).collect(),
                membership_valid_until: now,
            },
            jobtag: Some("ADS".into()),
            argv: vec!["/bin/true".into()],
            env: Default::default(),
            bundle_sha256: None,
            resources: Resources {
                cores: 1,
                memory_bytes: 64 << 20,
                walltime_seconds: 60,
            },
            outputs: vec![],
            not_before: now,
            not_after: now,
            node: "wn01".into(),
            pilot_id: "pilot-1".into(),
            nonce: "0123456789abcdef".into(),
            issuer: String::new(),
            credential: None,
        }
    }

    fn decide(az: &Authorizer, b: &EnvelopeBody) -> Result<Permit, AuthzError> {
        az.decide(
            &AuthzRequest {
                body: b,
                pilot_uid: 1,
                pilot_dn: None,
            },
            &|_| false,
        )
    }

    #[test]
    fn decision_chain_bans_policy_maps_pools() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("gm"), "\"/CN=a\" acct-a\n\"/CN=p\" .pool\n").unwrap();
        std::fs::write(p("groups"), "\"/demo/prod\" .prod\n\"/demo/*\" acct-demo\n").unwrap();
        std::fs::write(p("ban_users.db"), "\"/CN=banned\"\n").unwrap();
        std::fs::write(
            p("site.policy"),
            "&/:\n(action = start)(jobtag != NULL)\n/:\n&(action = start)\n",
        )
        .unwrap();
        std::fs::create_dir(p("gridmapdir")).unwrap();
        for a in ["pool001", "prod001"] {
            std::fs::write(p("gridmapdir").join(a), b"").unwrap();
        }
        let stack = PolicyStack::new()
            .with_file("site", p("site.policy"))
            .unwrap();
        let az = Authorizer::new(
            AuthzSources {
                vos: ["demo".to_string()].into(),
                bans: Bans::new().with_dn_file(p("ban_users.db")).unwrap(),
                policies: [("demo".to_string(), stack)].into(),
                gridmap: p("gm"),
                groupmap: Some(p("groups")),
                pool: Some(
                    Gridmapdir::new(
                        &p("gridmapdir"),
                        &p("state"),
                        std::time::Duration::from_secs(60),
                    )
                    .unwrap()
                    // prod001 is no host account; LCMAPS names its lease by the pool's group.
                    .with_group_lookup(Box::new(|_| Ok("demo".into()))),
                ),
            },
            Box::new(NoClean),
        )
        .unwrap();
        assert_eq!(
            decide(&az, &body("/CN=a", "demo", &[])).unwrap().account,
            "acct-a"
        );
        let e = decide(&az, &body("/CN=a", "other", &[])).unwrap_err();
        assert!(matches!(e, AuthzError::VoNotConfigured { .. }));
        let e = decide(&az, &body("/CN=banned", "demo", &[])).unwrap_err();
        assert!(e.to_string().contains("ban_users.db:1"), "{e}");
        let mut untagged = body("/CN=a", "demo", &[]);
        untagged.jobtag = None;
        assert!(matches!(
            decide(&az, &untagged),
            Err(AuthzError::PolicyDenied(_))
        ));
        let pooled = decide(&az, &body("/CN=p", "demo", &[])).unwrap();
        assert_eq!((pooled.account.as_str(), pooled.pooled), ("pool001", true));
        let by_group = decide(&az, &body("/CN=g", "demo", &["/demo/prod"])).unwrap();
        assert_eq!(by_group.account, "prod001");
        let by_wildcard = decide(&az, &body("/CN=h", "demo", &["/demo/x"])).unwrap();
        assert_eq!(by_wildcard.account, "acct-demo");
        let e = decide(&az, &body("/CN=c", "demo", &["/other"])).unwrap_err();
        assert!(e.to_string().contains("no mapping"), "{e}");
        // A ban added later applies to the next decision, no restart.
        std::fs::write(p("ban_users.db"), "\"/CN=banned\"\n\"/CN=a\"\n").unwrap();
        let e = decide(&az, &body("/CN=a", "demo", &[])).unwrap_err();
        assert!(matches!(e, AuthzError::Banned(_)), "{e}");
    }
}
