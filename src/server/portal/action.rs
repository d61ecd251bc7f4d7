//! What a request asks for, read from its method and path before any handler runs: the
//! action the request log records and the portal permissions are checked against, and the
//! payload id the path names. Mirrors the routes of `api::router` (the test below lists each
//! of them); reads nothing but the request line.

use axum::http::Method;

/// One API action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `POST /v1/payloads`.
    Submit,
    /// `GET /v1/payloads`.
    List,
    /// `GET /v1/payloads/{id}`.
    View,
    /// `GET /v1/payloads/{id}/output`.
    Download,
    /// `POST /v1/payloads/{id}/cancel`.
    Cancel,
    /// `POST /v1/payloads/{id}/signal`.
    Signal,
    /// `POST /v1/payloads/{id}/information` (ask the site's helper; `GET
    /// .../information/{request}` reads the answer and is a `view`).
    Information,
    /// `POST /v1/match` (pilots).
    Match,
    /// `POST /v1/payloads/{id}/status` (pilots).
    Status,
    /// `PUT /v1/payloads/{id}/output` (pilots).
    Upload,
    /// A change to the membership registry: `POST /v1/membership/...`.
    Membership,
    /// A read of the membership registry: `GET /v1/membership/...`.
    MembershipRead,
    /// `POST /v1/delegations`, `PUT /v1/delegations/{id}`: a member delegates a proxy.
    Delegate,
    /// `POST /v1/payloads/{id}/proxy` (pilots): a proxy for the worker node's key.
    Proxy,
    /// Anything else (answered 404 or 405 by the router).
    Other,
}

impl Action {
    /// The name in request records and in `requests --action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Submit => "submit",
            Action::List => "list",
            Action::View => "view",
            Action::Download => "download",
            Action::Cancel => "cancel",
            Action::Signal => "signal",
            Action::Information => "information",
            Action::Match => "match",
            Action::Status => "status",
            Action::Upload => "upload",
            Action::Membership => "membership",
            Action::MembershipRead => "membership_read",
            Action::Delegate => "delegate",
            Action::Proxy => "proxy",
            Action::Other => "other",
        }
    }

    /// Actions members take on their own payloads (and portals and robots for them).
    pub fn is_member_action(self) -> bool {
        matches!(
            self,
            Action::Submit
                | Action::List
                | Action::View
                | Action::Download
                | Action::Cancel
                | Action::Signal
                | Action::Information
                | Action::Delegate
        )
    }

    /// Actions that put work into the VO's queue, change it, hand it to a pilot, or store a
    /// member's credential: refused while the request log cannot record them. Reads, and the
    /// pilots' requests on work already out (reports, outputs, a worker-node proxy, whose
    /// signing the database records anyway), are served (their records wait in memory).
    pub fn needs_log(self) -> bool {
        matches!(
            self,
            Action::Submit
                | Action::Cancel
                | Action::Signal
                | Action::Match
                | Action::Membership
                | Action::Delegate
        )
    }

    /// Actions whose record is on disk before the answer leaves (a member's request that
    /// changes the queue); the others reach the disk within the log's sync interval.
    pub fn synced(self) -> bool {
        matches!(
            self,
            Action::Submit | Action::Cancel | Action::Signal | Action::Membership
        )
    }
}

/// The action of a request and the payload id its path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub action: Action,
    pub payload_id: Option<String>,
}

impl Target {
    /// Reads `method` and `path` as the router would route them.
    pub fn parse(method: &Method, path: &str) -> Target {
        let other = Target {
            action: Action::Other,
            payload_id: None,
        };
        let Some(rest) = path.strip_prefix("/v1/") else {
            return other;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (action, id) = match (method, parts.as_slice()) {
            (&Method::POST, ["payloads"]) => (Action::Submit, None),
            (&Method::GET, ["payloads"]) => (Action::List, None),
            (&Method::POST, ["match"]) => (Action::Match, None),
            (&Method::GET, ["payloads", id]) => (Action::View, Some(*id)),
            (&Method::GET, ["payloads", id, "output"]) => (Action::Download, Some(*id)),
            (&Method::PUT, ["payloads", id, "output"]) => (Action::Upload, Some(*id)),
            (&Method::POST, ["payloads", id, "cancel"]) => (Action::Cancel, Some(*id)),
            (&Method::POST, ["payloads", id, "signal"]) => (Action::Signal, Some(*id)),
            (&Method::POST, ["payloads", id, "status"]) => (Action::Status, Some(*id)),
            (&Method::POST, ["payloads", id, "information"]) => (Action::Information, Some(*id)),
            (&Method::GET, ["payloads", id, "information", _]) => (Action::View, Some(*id)),
            (&Method::POST, ["membership", ..]) => (Action::Membership, None),
            (&Method::GET, ["membership", ..]) => (Action::MembershipRead, None),
            (&Method::POST, ["payloads", id, "proxy"]) => (Action::Proxy, Some(*id)),
            (&Method::POST, ["delegations"]) | (&Method::PUT, ["delegations", _]) => {
                (Action::Delegate, None)
            }
            _ => return other,
        };
        // Only a well-formed id is recorded as one (the handler refuses the others).
        let payload_id = id
            .filter(|i| crate::util::is_safe_id(i))
            .map(str::to_string);
        Target { action, payload_id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_action_and_id() {
        let t = |m: Method, p: &str| {
            let t = Target::parse(&m, p);
            (t.action, t.payload_id)
        };
        let id = Some("p-1".to_string());
        assert_eq!(t(Method::POST, "/v1/payloads"), (Action::Submit, None));
        assert_eq!(t(Method::GET, "/v1/payloads"), (Action::List, None));
        assert_eq!(t(Method::POST, "/v1/match"), (Action::Match, None));
        assert_eq!(
            t(Method::GET, "/v1/payloads/p-1"),
            (Action::View, id.clone())
        );
        assert_eq!(
            t(Method::GET, "/v1/payloads/p-1/output"),
            (Action::Download, id.clone())
        );
        assert_eq!(
            t(Method::PUT, "/v1/payloads/p-1/output"),
            (Action::Upload, id.clone())
        );
        assert_eq!(
            t(Method::POST, "/v1/payloads/p-1/cancel"),
            (Action::Cancel, id.clone())
        );
        assert_eq!(
            t(Method::POST, "/v1/payloads/p-1/signal"),
            (Action::Signal, id.clone())
        );
        assert_eq!(
            t(Method::POST, "/v1/payloads/p-1/status"),
            (Action::Status, id.clone())
        );
        assert_eq!(
            t(Method::POST, "/v1/payloads/p-1/information"),
            (Action::Information, id.clone())
        );
        assert_eq!(
            t(Method::GET, "/v1/payloads/p-1/information/00ff"),
            (Action::View, id.clone())
        );
        assert_eq!(
            t(Method::POST, "/v1/membership/requests/r-1/approve"),
            (Action::Membership, None)
        );
        assert_eq!(
            t(Method::GET, "/v1/membership/me"),
            (Action::MembershipRead, None)
        );
        assert_eq!(
            t(Method::POST, "/v1/payloads/p-1/proxy"),
            (Action::Proxy, Some("p-1".to_string()))
        );
        assert_eq!(t(Method::POST, "/v1/delegations"), (Action::Delegate, None));
        assert_eq!(
            t(Method::PUT, "/v1/delegations/d-1"),
            (Action::Delegate, None)
        );
        assert_eq!(t(Method::DELETE, "/v1/payloads").0, Action::Other);
        assert_eq!(t(Method::GET, "/v2/payloads").0, Action::Other);
        assert_eq!(t(Method::GET, "/v1/payloads/a/b/c").0, Action::Other);
        // A path id that is not an id is not recorded as one.
        assert_eq!(t(Method::GET, "/v1/payloads/a%2fb"), (Action::View, None));
    }
}
