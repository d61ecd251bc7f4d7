//! `mupilot-server membership ...`: the registry's client commands (over the mTLS API, as
//! the certificate given) and two commands on the server's own files (`purge`, `audit`),
//! which read server.toml. Output is one line per item, or JSON with `--json`.
//!
//! Exit codes as the rest of `mupilot-server`: 0 ok; 1 runtime or server error (a refusal
//! included); 2 usage or configuration error.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::api::{ChangeView, MeView, MemberView};
use super::types::{
    AupAcceptance, Decision, EntityKind, NewRequest, Notification, Person, RegisterRequest,
    Registration, ReinstateRequest, RemoveRequest, RequestView, SuspendRequest,
};
use crate::server::cli::{run_client, ConnArgs, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE};
use crate::server::client::ClientError;

#[derive(Subcommand, Debug)]
pub(crate) enum MembershipCmd {
    /// Register your certificate's DN (pending until a VO manager approves it).
    Register {
        #[command(flatten)]
        conn: ConnArgs,
        /// person, host, service or robot.
        #[arg(long, default_value = "person")]
        kind: String,
        #[command(flatten)]
        data: RegistrationArgs,
        /// Groups and roles asked for (repeatable); default the VO's root group.
        #[arg(long = "fqan")]
        fqans: Vec<String>,
    },
    /// Renew your membership: re-confirm your data and accept the current AUPs.
    Renew {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        data: RegistrationArgs,
    },
    /// Ask for other groups and roles.
    Change {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long = "fqan", required = true)]
        fqans: Vec<String>,
    },
    /// Show your own registry entry and requests.
    Show {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        json: bool,
    },
    /// List the registry (VO managers).
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this DN.
        #[arg(long)]
        dn: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List requests (VO managers: all; others: their own).
    Requests {
        #[command(flatten)]
        conn: ConnArgs,
        /// pending, approved or rejected.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (VO managers), saying what was verified.
    Approve {
        #[command(flatten)]
        decision: DecisionArgs,
    },
    /// Reject a request (VO managers), saying what was verified.
    Reject {
        #[command(flatten)]
        decision: DecisionArgs,
    },
    /// Ask for a member's suspension (Grid security officer, Grid operations).
    RequestSuspension {
        #[command(flatten)]
        conn: ConnArgs,
        dn: String,
        #[arg(long, required = true)]
        reason: String,
    },
    /// Ask for someone else's removal (e.g. an institute representative).
    RequestRemoval {
        #[command(flatten)]
        conn: ConnArgs,
        dn: String,
        #[arg(long, required = true)]
        reason: String,
    },
    /// Suspend a member at once (VO managers): queued payloads are cancelled, running ones
    /// cancelled through their pilots.
    Suspend {
        #[command(flatten)]
        conn: ConnArgs,
        dn: String,
        #[arg(long, required = true)]
        reason: String,
        #[arg(long, required = true)]
        verification: String,
        /// The security officer or operations person who asked (notified at reinstatement).
        #[arg(long, value_name = "DN")]
        reported_by: Option<String>,
    },
    /// Reinstate a suspended member (VO managers); those who asked for the suspension are
    /// notified.
    Reinstate {
        #[command(flatten)]
        conn: ConnArgs,
        dn: String,
        #[arg(long, required = true)]
        verification: String,
    },
    /// Leave the VO (no DN), or remove a member (VO managers, with --reason).
    Remove {
        #[command(flatten)]
        conn: ConnArgs,
        dn: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List the notifications owed at reinstatements and how each was delivered (VO managers).
    Notifications {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete the personal data of memberships ended longer ago than
    /// personal_data_retention_days (on the server's database; `serve` runs it too).
    Purge {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the membership audit log (every file of its chain), optionally for one DN;
    /// --verify checks the hash chain instead.
    Audit {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        dn: Option<String>,
        #[arg(long)]
        verify: bool,
    },
}

/// A manager's decision on a request: `approve` and `reject`.
#[derive(Args, Debug, Clone)]
pub(crate) struct DecisionArgs {
    #[command(flatten)]
    conn: ConnArgs,
    id: String,
    /// The checks made and people consulted, e.g. "institute representative consulted".
    #[arg(long, required = true)]
    verification: String,
    #[arg(long)]
    note: Option<String>,
}

impl DecisionArgs {
    /// Posts the decision (`approve` or `reject`) and prints what it did.
    async fn post(self, outcome: &str) -> Result<(), ClientError> {
        let path = format!(
            "/v1/membership/requests/{}/{outcome}",
            path_segment(&self.id)?
        );
        let body = Decision {
            verification: self.verification,
            note: self.note,
        };
        post_change(&self.conn, &path, &body).await
    }
}

/// The registration data flags of `register` and `renew`.
#[derive(Args, Debug, Clone)]
pub(crate) struct RegistrationArgs {
    #[arg(long, required = true)]
    family_name: String,
    #[arg(long, required = true)]
    given_name: String,
    /// Your employing institute.
    #[arg(long, required = true)]
    institute: String,
    #[arg(long, required = true)]
    email: String,
    #[arg(long)]
    phone: Option<String>,
    /// For a host, service or robot: the responsible person, as
    /// "FAMILY;GIVEN;INSTITUTE;EMAIL[;PHONE]".
    #[arg(long, value_name = "FAMILY;GIVEN;INSTITUTE;EMAIL[;PHONE]")]
    responsible: Option<String>,
    /// The Grid AUP version you accept (the server says which is current).
    #[arg(long, required = true, value_name = "VERSION")]
    accept_grid_aup: String,
    /// The VO AUP version you accept.
    #[arg(long, required = true, value_name = "VERSION")]
    accept_vo_aup: String,
}

impl RegistrationArgs {
    pub(crate) fn parts(&self) -> Result<(Registration, AupAcceptance), ClientError> {
        let responsible = match &self.responsible {
            None => None,
            Some(r) => {
                let f: Vec<&str> = r.split(';').collect();
                if !(4..=5).contains(&f.len()) {
                    return Err(ClientError::Usage(format!(
                        "--responsible {r:?}: write FAMILY;GIVEN;INSTITUTE;EMAIL or FAMILY;GIVEN;INSTITUTE;EMAIL;PHONE"
                    )));
                }
                Some(Person {
                    family_name: f[0].into(),
                    given_name: f[1].into(),
                    institute: f[2].into(),
                    email: f[3].into(),
                    phone: f.get(4).map(|p| p.to_string()),
                })
            }
        };
        Ok((
            Registration {
                person: Person {
                    family_name: self.family_name.clone(),
                    given_name: self.given_name.clone(),
                    institute: self.institute.clone(),
                    email: self.email.clone(),
                    phone: self.phone.clone(),
                },
                responsible,
            },
            AupAcceptance {
                grid_aup: self.accept_grid_aup.clone(),
                vo_aup: self.accept_vo_aup.clone(),
            },
        ))
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("values serialise")
    );
}

/// A list as JSON, or one line per item.
fn print_list<T: serde::Serialize>(list: &[T], json: bool, line: fn(&T) -> String) {
    if json {
        print_json(&list);
    } else {
        for item in list {
            println!("{}", line(item));
        }
    }
}

fn request_line(r: &RequestView) -> String {
    let mut s = format!(
        "{}\t{}\t{}\t{}\trequested by {} at {}",
        r.id,
        r.kind.as_str(),
        r.state,
        r.subject_dn,
        r.requester_dn,
        r.requested_at.format("%Y-%m-%d %H:%M")
    );
    if let Some(by) = &r.decided_by {
        s.push_str(&format!(
            "\tdecided by {by}: {}",
            r.verification.as_deref().unwrap_or("")
        ));
    }
    s
}

fn member_line(m: &MemberView) -> String {
    let f = |k: &str| m.member[k].as_str().unwrap_or("").to_string();
    let fqans: Vec<String> = m.member["fqans"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}\t{}\t{}\t{}\trenewal due {}",
        f("dn"),
        m.state,
        f("kind"),
        fqans.join(","),
        f("renewal_due").get(..10).unwrap_or("")
    )
}

fn print_change(c: &ChangeView) {
    println!("{}", request_line(&c.request));
    if let Some(m) = &c.member {
        println!("member: {}", member_line(m));
    }
    for id in &c.payloads_cancelled {
        println!("payload {id} cancelled (was queued)");
    }
    for id in &c.payloads_cancel_sent {
        println!("payload {id}: cancel sent to its pilot");
    }
    for n in &c.notifications {
        println!(
            "notified {}: {}",
            n.recipient_dn,
            n.delivery.as_deref().unwrap_or("recorded")
        );
    }
}

fn path_segment(id: &str) -> Result<&str, ClientError> {
    if crate::util::is_safe_id(id) {
        Ok(id)
    } else {
        Err(ClientError::Usage(format!(
            "{id:?} is not a request id (r-...; see `membership requests`)"
        )))
    }
}

/// Posts a change and prints what it did.
async fn post_change<B: serde::Serialize>(
    conn: &ConnArgs,
    path: &str,
    body: &B,
) -> Result<(), ClientError> {
    let c: ChangeView = conn.client()?.post_json(path, body).await?;
    print_change(&c);
    Ok(())
}

/// Runs one `membership` command; returns the exit code.
pub(crate) fn main(cmd: MembershipCmd) -> i32 {
    match cmd {
        MembershipCmd::Purge { config } => purge(&config),
        MembershipCmd::Audit { config, dn, verify } => audit(&config, dn.as_deref(), verify),
        other => run_client(|| client(other)),
    }
}

async fn client(cmd: MembershipCmd) -> Result<i32, ClientError> {
    match cmd {
        MembershipCmd::Register {
            conn,
            kind,
            data,
            fqans,
        } => {
            let kind = EntityKind::parse(&kind).ok_or_else(|| {
                ClientError::Usage(format!(
                    "--kind {kind:?}: one of person, host, service, robot"
                ))
            })?;
            let (registration, accept) = data.parts()?;
            let body = RegisterRequest {
                kind,
                registration,
                accept,
                fqans,
            };
            post_change(&conn, "/v1/membership/register", &body).await?;
        }
        MembershipCmd::Renew { conn, data } => {
            let (registration, accept) = data.parts()?;
            let body = NewRequest::Renewal {
                registration: Box::new(registration),
                accept,
            };
            post_change(&conn, "/v1/membership/requests", &body).await?;
        }
        MembershipCmd::Change { conn, fqans } => {
            post_change(
                &conn,
                "/v1/membership/requests",
                &NewRequest::Attributes { fqans },
            )
            .await?;
        }
        MembershipCmd::RequestSuspension { conn, dn, reason } => {
            post_change(
                &conn,
                "/v1/membership/requests",
                &NewRequest::Suspension { dn, reason },
            )
            .await?;
        }
        MembershipCmd::RequestRemoval { conn, dn, reason } => {
            post_change(
                &conn,
                "/v1/membership/requests",
                &NewRequest::Removal { dn, reason },
            )
            .await?;
        }
        MembershipCmd::Show { conn, json } => {
            let me: MeView = conn.client()?.get_json("/v1/membership/me").await?;
            if json {
                print_json(&me);
            } else {
                match &me.member {
                    Some(m) => println!("{}", member_line(m)),
                    None => println!(
                        "not in the registry; register with `mupilot-server membership register`"
                    ),
                }
                for r in &me.requests {
                    println!("{}", request_line(r));
                }
            }
        }
        MembershipCmd::List { conn, dn, json } => {
            let query = dn.map(|d| format!("?dn={}", url_encode(&d)));
            let path = format!("/v1/membership/members{}", query.unwrap_or_default());
            let list: Vec<MemberView> = conn.client()?.get_json(&path).await?;
            print_list(&list, json, member_line);
        }
        MembershipCmd::Requests { conn, state, json } => {
            let query = state.map(|s| format!("?state={}", url_encode(&s)));
            let path = format!("/v1/membership/requests{}", query.unwrap_or_default());
            let list: Vec<RequestView> = conn.client()?.get_json(&path).await?;
            print_list(&list, json, request_line);
        }
        MembershipCmd::Approve { decision } => decision.post("approve").await?,
        MembershipCmd::Reject { decision } => decision.post("reject").await?,
        MembershipCmd::Suspend {
            conn,
            dn,
            reason,
            verification,
            reported_by,
        } => {
            let body = SuspendRequest {
                dn,
                reason,
                verification,
                reported_by,
            };
            post_change(&conn, "/v1/membership/suspend", &body).await?;
        }
        MembershipCmd::Reinstate {
            conn,
            dn,
            verification,
        } => {
            post_change(
                &conn,
                "/v1/membership/reinstate",
                &ReinstateRequest { dn, verification },
            )
            .await?;
        }
        MembershipCmd::Remove { conn, dn, reason } => {
            post_change(
                &conn,
                "/v1/membership/remove",
                &RemoveRequest { dn, reason },
            )
            .await?;
        }
        MembershipCmd::Notifications { conn, json } => {
            let list: Vec<Notification> = conn
                .client()?
                .get_json("/v1/membership/notifications")
                .await?;
            if json {
                print_json(&list);
            } else {
                for n in &list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        n.created_at.format("%Y-%m-%d %H:%M"),
                        n.recipient_dn,
                        n.subject_dn,
                        n.delivery.as_deref().unwrap_or("not delivered by a hook"),
                        n.message
                    );
                }
            }
        }
        MembershipCmd::Purge { .. } | MembershipCmd::Audit { .. } => {
            unreachable!("run on the server's files, not over the API")
        }
    }
    Ok(EXIT_OK)
}

/// Percent-encodes a query value (DNs hold `/`, `=` and spaces).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn load(config: &std::path::Path, what: &str) -> Result<crate::server::config::ServerConfig, i32> {
    crate::server::config::ServerConfig::load(config).map_err(|e| {
        eprintln!("mupilot-server membership {what}: {e}");
        EXIT_USAGE
    })
}

fn purge(config: &std::path::Path) -> i32 {
    let cfg = match load(config, "purge") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store =
        match crate::server::store::Store::open_with(&cfg.data_dir, &cfg.database.for_command()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mupilot-server membership purge: {e}");
                return EXIT_RUNTIME;
            }
        };
    let reg = super::Registry::new(&cfg.vo, &cfg.membership);
    let actor = format!(
        "mupilot-server membership purge (uid {})",
        nix::unistd::getuid()
    );
    let now = chrono::Utc::now();
    let days = cfg.membership.retention_days;
    match reg.purge(&store, &actor, now) {
        Ok(n) => println!(
            "purged the registry data of {} memberships that ended more than {days} days ago, {} requests decided and {} notifications written before then",
            n.members, n.requests, n.notifications
        ),
        Err(e) => {
            eprintln!("mupilot-server membership purge: {e}");
            return EXIT_RUNTIME;
        }
    }
    let keep = cfg.record_retention_days;
    match store.expire_records(now - chrono::Duration::days(i64::from(keep))) {
        Ok(r) => {
            println!(
                "deleted the records of {} payloads finished more than {keep} days ago ({} commands, {} information requests) and {} records of proxies expired before then",
                r.payloads, r.commands, r.information, r.proxy_signings
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("mupilot-server membership purge: {e}");
            EXIT_RUNTIME
        }
    }
}

fn audit(config: &std::path::Path, dn: Option<&str>, verify: bool) -> i32 {
    let cfg = match load(config, "audit") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let log = &cfg.membership.audit_log;
    let files = match crate::records::query::log_files(log, true) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mupilot-server membership audit: {e}");
            return EXIT_RUNTIME;
        }
    };
    if verify {
        return match crate::records::verify_files(&files, &[], false) {
            Ok(r) if r.intact() => {
                println!("{}: intact ({} records)", log.display(), r.records);
                EXIT_OK
            }
            Ok(r) => {
                eprintln!("{}: NOT intact: {r:?}", log.display());
                EXIT_RUNTIME
            }
            Err(e) => {
                eprintln!("mupilot-server membership audit: {e}");
                EXIT_RUNTIME
            }
        };
    }
    for f in &files {
        let recs = match crate::records::read_records(f) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mupilot-server membership audit: {e}");
                return EXIT_RUNTIME;
            }
        };
        for r in recs {
            let hit = match dn {
                None => true,
                Some(d) => {
                    r["subject_dn"] == d
                        || r["actor_dn"] == d
                        || r["details"]["requester_dn"] == d
                        || r["details"]["recipient_dn"] == d
                }
            };
            if hit {
                println!("{r}");
            }
        }
    }
    EXIT_OK
}
