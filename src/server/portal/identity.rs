//! Who is calling. The certificate on a connection is classified once (portal, robot, pilot,
//! operator, user; robot certificates are known by the IGTF robot policy OID or by a
//! `[[robot]]` entry), and each member request gets the [`Caller`] its handler acts for: a
//! portal names the member in the `Mupilot-On-Behalf-Of` header, a robot acts as itself and
//! answers to its responsible person. Decides identity, portal permissions and which rate
//! limits a submission counts against; never membership (the handlers ask the registry).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode};

use super::action::Action;
use super::config::{PortalAction, PortalSettings, Rate};

/// The IGTF robot certificate policy (1SCP certificate type "robot"), in a certificate's
/// certificate-policies extension.
pub const ROBOT_POLICY_OID: &str = "1.2.840.113612.5.2.3.3.1";

/// The request header in which a portal names the member it acts for (the member's DN, UTF-8).
pub const ON_BEHALF_OF: &str = "Mupilot-On-Behalf-Of";

/// Whether the DER certificate carries the IGTF robot policy OID.
pub fn has_robot_policy(der: &[u8]) -> bool {
    use x509_parser::extensions::ParsedExtension;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let found = cert
        .iter_extensions()
        .any(|ext| match ext.parsed_extension() {
            ParsedExtension::CertificatePolicies(policies) => policies
                .iter()
                .any(|p| p.policy_id.to_id_string() == ROBOT_POLICY_OID),
            _ => false,
        });
    found
}

/// What the certificate on a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Listed as `[[portal]]`.
    Portal,
    /// Listed as `[[robot]]` (with or without the robot policy OID).
    Robot,
    /// Listed in `pilot_dns`.
    Pilot,
    /// Listed in `operator_dns`.
    Operator,
    /// Carries the robot policy OID but has no `[[robot]]` entry: no responsible person is
    /// known, so it may not act as a member.
    UnregisteredRobot,
    /// Anyone else with a certificate from the VO's CA (a member, or not).
    User,
}

impl PeerKind {
    /// The `kind` of request records.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Portal => "portal",
            PeerKind::Robot => "robot",
            PeerKind::Pilot => "pilot",
            PeerKind::Operator => "operator",
            PeerKind::UnregisteredRobot => "unregistered_robot",
            PeerKind::User => "user",
        }
    }
}

/// The certificate on one connection, classified.
#[derive(Debug, Clone)]
pub struct Peer {
    pub dn: Arc<str>,
    pub kind: PeerKind,
    /// The certificate carries [`ROBOT_POLICY_OID`].
    pub robot_oid: bool,
}

/// The identity a member request acts as, and who answers for it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A person acting for themself (an operator keeps operator rights).
    User { dn: Arc<str>, operator: bool },
    /// A robot acting as itself; its responsible person answers for it.
    Robot { dn: Arc<str>, responsible: Arc<str> },
    /// A portal acting for the member it named.
    Portal {
        dn: Arc<str>,
        on_behalf_of: Arc<str>,
        responsible: Arc<str>,
    },
}

impl Caller {
    /// The DN the request acts as: owner of what it submits, whose payloads it may read,
    /// the requester of its cancels and signals.
    pub fn acting_dn(&self) -> &str {
        match self {
            Caller::User { dn, .. } | Caller::Robot { dn, .. } => dn,
            Caller::Portal { on_behalf_of, .. } => on_behalf_of,
        }
    }

    /// The subject of the certificate that made the request.
    pub fn certificate_dn(&self) -> &str {
        match self {
            Caller::User { dn, .. } | Caller::Robot { dn, .. } | Caller::Portal { dn, .. } => dn,
        }
    }

    /// Operator rights (any payload): only an operator's own certificate has them, never a
    /// portal acting for one.
    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::User { operator: true, .. })
    }

    /// The member a portal acts for.
    pub fn on_behalf_of(&self) -> Option<&str> {
        match self {
            Caller::Portal { on_behalf_of, .. } => Some(on_behalf_of),
            _ => None,
        }
    }

    /// The person who answers for a robot or a portal.
    pub fn responsible(&self) -> Option<&str> {
        match self {
            Caller::Robot { responsible, .. } | Caller::Portal { responsible, .. } => {
                Some(responsible)
            }
            Caller::User { .. } => None,
        }
    }
}

/// A request refused before its handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn forbidden(message: String) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            code: "not_authorized",
            message,
        }
    }
    fn bad(message: String) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }
}

/// One rate limit a submission counts against: `kind` (`user`, `robot`, `portal`) and DN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub kind: &'static str,
    pub dn: Arc<str>,
    pub rate: Rate,
}

struct PortalInfo {
    responsible: Arc<str>,
    actions: HashSet<PortalAction>,
    rate: Rate,
}

struct RobotInfo {
    responsible: Arc<str>,
    rate: Option<Rate>,
}

/// The identities server.toml names, for classifying connections and requests.
pub struct Identities {
    vo: String,
    portals: HashMap<String, PortalInfo>,
    robots: HashMap<String, RobotInfo>,
    pilots: HashSet<String>,
    operators: HashSet<String>,
    user_rate: Option<Rate>,
    robot_rate: Option<Rate>,
}

impl Identities {
    pub fn new(
        vo: &str,
        s: &PortalSettings,
        pilot_dns: &[String],
        operator_dns: &[String],
    ) -> Self {
        Identities {
            vo: vo.to_string(),
            portals: s
                .portals
                .iter()
                .map(|p| {
                    let info = PortalInfo {
                        responsible: Arc::from(p.responsible.as_str()),
                        actions: p.actions.iter().copied().collect(),
                        rate: p.rate,
                    };
                    (p.dn.clone(), info)
                })
                .collect(),
            robots: s
                .robots
                .iter()
                .map(|r| {
                    let info = RobotInfo {
                        responsible: Arc::from(r.responsible.as_str()),
                        rate: r.rate,
                    };
                    (r.dn.clone(), info)
                })
                .collect(),
            pilots: pilot_dns.iter().cloned().collect(),
            operators: operator_dns.iter().cloned().collect(),
            user_rate: s.rate_limits.user,
            robot_rate: s.rate_limits.robot,
        }
    }

    /// Classifies the certificate of a connection (`der`: the certificate as presented).
    pub fn classify(&self, dn: &str, der: &[u8]) -> Peer {
        let robot_oid = has_robot_policy(der);
        let kind = if self.portals.contains_key(dn) {
            PeerKind::Portal
        } else if self.robots.contains_key(dn) {
            PeerKind::Robot
        } else if self.pilots.contains(dn) {
            PeerKind::Pilot
        } else if self.operators.contains(dn) {
            PeerKind::Operator
        } else if robot_oid {
            PeerKind::UnregisteredRobot
        } else {
            PeerKind::User
        };
        Peer {
            dn: Arc::from(dn),
            kind,
            robot_oid,
        }
    }

    /// The caller a request acts as: `None` for requests that are not member actions (pilot
    /// requests, unknown paths), which their handlers check themselves. Refuses the
    /// on-behalf-of header outside member actions or from anyone but a portal, a portal
    /// without it or beyond its actions, and a robot certificate without a responsible person.
    pub fn caller(
        &self,
        peer: &Peer,
        on_behalf: Option<&HeaderValue>,
        action: Action,
    ) -> Result<Option<Caller>, Refusal> {
        if !action.is_member_action() {
            if on_behalf.is_some() {
                return Err(Refusal::bad(format!(
                    "the {ON_BEHALF_OF} header applies to member requests (submit, list, view, download, cancel, signal, information), not to {}",
                    action.as_str()
                )));
            }
            return Ok(None);
        }
        let dn = &peer.dn;
        if let Some(p) = self.portals.get(&**dn) {
            let Some(raw) = on_behalf else {
                return Err(Refusal::forbidden(format!(
                    "{dn} is a portal of VO {}: it acts only for members, and names the member's DN in the {ON_BEHALF_OF} header",
                    self.vo
                )));
            };
            let member = parse_dn_header(raw)?;
            let needed = match action {
                Action::Submit | Action::Delegate => PortalAction::Submit,
                Action::Cancel => PortalAction::Cancel,
                Action::Signal => PortalAction::Signal,
                _ => PortalAction::Read,
            };
            if !p.actions.contains(&needed) {
                let mut allowed: Vec<&str> =
                    p.actions.iter().map(|a| portal_action_name(*a)).collect();
                allowed.sort_unstable();
                return Err(Refusal::forbidden(format!(
                    "portal {dn} may not {} for members: its [[portal]] actions in the VO's server.toml are {}",
                    portal_action_name(needed),
                    allowed.join(", ")
                )));
            }
            return Ok(Some(Caller::Portal {
                dn: dn.clone(),
                on_behalf_of: Arc::from(member),
                responsible: p.responsible.clone(),
            }));
        }
        if on_behalf.is_some() {
            return Err(Refusal::forbidden(format!(
                "{dn} sent {ON_BEHALF_OF} but is not a portal of VO {}; only certificates listed as [[portal]] in the VO's server.toml may act for members",
                self.vo
            )));
        }
        if let Some(r) = self.robots.get(&**dn) {
            return Ok(Some(Caller::Robot {
                dn: dn.clone(),
                responsible: r.responsible.clone(),
            }));
        }
        if peer.robot_oid {
            return Err(Refusal::forbidden(format!(
                "{dn} is a robot certificate (IGTF robot policy {ROBOT_POLICY_OID}) with no responsible person in VO {}; the VO lists it as [[robot]] with its `responsible` DN in server.toml",
                self.vo
            )));
        }
        Ok(Some(Caller::User {
            dn: dn.clone(),
            operator: self.operators.contains(&**dn),
        }))
    }

    /// The rate limits a submission by `caller` counts against (empty: not limited). A
    /// portal's submission counts against the portal and the member it names.
    pub fn charges(&self, caller: &Caller) -> Vec<Charge> {
        let mut out = Vec::new();
        let mut push = |kind, dn: &Arc<str>, rate: Option<Rate>| {
            if let Some(rate) = rate {
                out.push(Charge {
                    kind,
                    dn: dn.clone(),
                    rate,
                });
            }
        };
        match caller {
            Caller::User { dn, .. } => push("user", dn, self.user_rate),
            Caller::Robot { dn, .. } => {
                let own = self.robots.get(&**dn).and_then(|r| r.rate);
                push("robot", dn, own.or(self.robot_rate));
            }
            Caller::Portal {
                dn, on_behalf_of, ..
            } => {
                push("portal", dn, self.portals.get(&**dn).map(|p| p.rate));
                push("user", on_behalf_of, self.user_rate);
            }
        }
        out
    }
}

fn portal_action_name(a: PortalAction) -> &'static str {
    match a {
        PortalAction::Submit => "submit",
        PortalAction::Read => "read",
        PortalAction::Cancel => "cancel",
        PortalAction::Signal => "signal",
    }
}

/// The member DN of an on-behalf-of header: UTF-8, grid style, no control characters.
fn parse_dn_header(raw: &HeaderValue) -> Result<&str, Refusal> {
    let bad = || {
        Refusal::bad(format!(
            "the {ON_BEHALF_OF} header must be the member's grid-style DN in UTF-8, e.g. \"/DC=org/DC=example/CN=alice\""
        ))
    };
    let s = std::str::from_utf8(raw.as_bytes()).map_err(|_| bad())?;
    if !s.starts_with('/') || s.len() > 1024 || s.chars().any(char::is_control) {
        return Err(bad());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::portal::config::{PortalEntry, RateLimits, RobotEntry};

    fn ids() -> Identities {
        let rate = Rate {
            per_minute: 60,
            burst: 5,
        };
        let s = PortalSettings {
            portals: vec![PortalEntry {
                dn: "/CN=portal".into(),
                responsible: "/CN=manager".into(),
                contact: None,
                actions: vec![PortalAction::Submit, PortalAction::Read],
                rate,
            }],
            robots: vec![RobotEntry {
                dn: "/CN=robot".into(),
                responsible: "/CN=alice".into(),
                rate: None,
            }],
            rate_limits: RateLimits {
                user: Some(rate),
                robot: None,
            },
            request_log: "/x".into(),
            request_log_retention: std::time::Duration::from_secs(1),
        };
        Identities::new("demo", &s, &["/CN=pilot".into()], &["/CN=op".into()])
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn portals_act_for_the_member_they_name_within_their_actions() {
        let ids = ids();
        let portal = ids.classify("/CN=portal", b"");
        assert_eq!(portal.kind, PeerKind::Portal);
        let c = ids
            .caller(&portal, Some(&hv("/CN=bob")), Action::Submit)
            .unwrap()
            .unwrap();
        assert_eq!(c.acting_dn(), "/CN=bob");
        assert_eq!(c.responsible(), Some("/CN=manager"));
        assert!(!c.is_operator());
        // Portal and member are both charged.
        let charges: Vec<_> = ids
            .charges(&c)
            .into_iter()
            .map(|c| (c.kind, c.dn))
            .collect();
        assert_eq!(
            charges,
            vec![
                ("portal", Arc::from("/CN=portal")),
                ("user", Arc::from("/CN=bob"))
            ]
        );
        let e = ids.caller(&portal, None, Action::Submit).unwrap_err();
        assert!(e.message.contains(ON_BEHALF_OF), "{}", e.message);
        let e = ids
            .caller(&portal, Some(&hv("/CN=bob")), Action::Cancel)
            .unwrap_err();
        assert!(
            e.message.contains("may not cancel") && e.message.contains("read, submit"),
            "{}",
            e.message
        );
        // Not a DN; a portal naming a member for a pilot request.
        assert_eq!(
            ids.caller(&portal, Some(&hv("bob")), Action::View)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ids.caller(&portal, Some(&hv("/CN=bob")), Action::Match)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        // Operator rights never pass through a portal.
        let c = ids
            .caller(&portal, Some(&hv("/CN=op")), Action::List)
            .unwrap()
            .unwrap();
        assert!(!c.is_operator());
    }

    #[test]
    fn only_portals_name_members_and_robots_need_a_responsible_person() {
        let ids = ids();
        let alice = ids.classify("/CN=alice", b"");
        assert_eq!(alice.kind, PeerKind::User);
        let e = ids
            .caller(&alice, Some(&hv("/CN=bob")), Action::Submit)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let robot = ids.classify("/CN=robot", b"");
        let c = ids.caller(&robot, None, Action::Submit).unwrap().unwrap();
        assert_eq!(
            (c.acting_dn(), c.responsible()),
            ("/CN=robot", Some("/CN=alice"))
        );
        // A configured robot without its own rate and no [rate_limits] robot: unlimited.
        assert!(ids.charges(&c).is_empty());
        let unregistered = Peer {
            dn: Arc::from("/CN=other robot"),
            kind: PeerKind::UnregisteredRobot,
            robot_oid: true,
        };
        let e = ids.caller(&unregistered, None, Action::List).unwrap_err();
        assert!(e.message.contains(ROBOT_POLICY_OID), "{}", e.message);
        let op = ids.classify("/CN=op", b"");
        assert!(ids
            .caller(&op, None, Action::List)
            .unwrap()
            .unwrap()
            .is_operator());
        assert!(ids
            .caller(&ids.classify("/CN=pilot", b""), None, Action::Match)
            .unwrap()
            .is_none());
    }
}
