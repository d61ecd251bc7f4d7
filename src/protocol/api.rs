//! JSON bodies of the VO server's HTTPS API (`/v1/...`). See docs/protocol.md.
//!
//! Binary data (bundles, output archives) travels base64-encoded inside JSON, except the
//! output upload, whose request body is the raw tar.gz.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::envelope::{Resources, SignedEnvelope};

/// `POST /v1/payloads`: a member submits a payload. The owner is the client certificate's
/// subject DN; the server fills VO, FQANs and membership from its registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub jobtag: Option<String>,
    pub resources: Resources,
    #[serde(default)]
    pub outputs: Vec<String>,
    /// base64 of a tar.gz unpacked into the payload's scratch directory before it starts.
    #[serde(default)]
    pub bundle: Option<String>,
    /// A delegation of the submitter's (`POST /v1/delegations`) the payload runs with: its
    /// envelope then carries a `credential` and the worker node obtains a proxy from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub payload_id: String,
    pub state: PayloadState,
}

/// `POST /v1/match`: a pilot asks for work that fits what it has free.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRequest {
    pub pilot_id: String,
    #[serde(default)]
    pub batch_system: Option<String>,
    #[serde(default)]
    pub batch_job_id: Option<String>,
    /// The node name the site's helper reported in its `welcome` (switch.toml `node_name`,
    /// the kernel's host name by default): the server signs it into the envelope, and a
    /// helper on another node refuses that envelope.
    pub host: String,
    pub free_cores: u32,
    pub free_memory_bytes: u64,
    /// Seconds the pilot can still give a payload (deadline minus shutdown margin).
    pub seconds_left: u64,
}

/// The answer to a match: work, or none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatchResponse {
    #[serde(default)]
    pub work: Option<Work>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Work {
    pub payload_id: String,
    pub envelope: SignedEnvelope,
    /// base64 of the input bundle, whose SHA-256 the envelope carries.
    #[serde(default)]
    pub bundle: Option<String>,
    /// How often the server wants a status report for this payload while it runs; after
    /// `missed_heartbeats` (server.toml) missed ones it marks the payload `lost`. Absent from
    /// older servers: the pilot then uses its own `heartbeat_seconds`.
    #[serde(default)]
    pub heartbeat_seconds: Option<u64>,
    /// If the server has not heard that the payload started by this time, it queues it
    /// again; a pilot that started it but could not tell the server kills it before then, so
    /// it never runs in two places.
    #[serde(default)]
    pub requeue_after: Option<DateTime<Utc>>,
    /// The server stores live usage and information answers: the pilot may put
    /// `memory_bytes` and `information` into its status reports for this payload. Absent
    /// (false) from older servers, which refuse those fields.
    #[serde(default)]
    pub live_usage: bool,
}

/// Lifecycle of a payload as the server records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadState {
    /// Waiting for a pilot.
    Queued,
    /// Handed to one pilot; not yet started.
    Matched,
    /// The helper started it.
    Running,
    /// Ended with exit code 0.
    Done,
    /// Ended with a non-zero exit code or a signal; or the helper refused to start it because
    /// the request was wrong (`denial_class` `caller`: signature, expiry, node, replay, bundle)
    /// or because the site could not serve it (`system`: sandbox setup, an exhausted pool
    /// account pool, a broken site file). The reason says which.
    Failed,
    /// Refused by a local authorization decision (P6; `denial_class` `authorization`: ban,
    /// policy, no mapping, expired membership): final, never retried elsewhere by the pilot.
    Denied,
    /// Cancelled by its owner or a VO operator.
    Cancelled,
    /// The pilot lost track of it (the pilot died, or the helper crashed).
    Lost,
}

impl PayloadState {
    /// The final state of a payload the helper refused, by the refusal's class: only a local
    /// authorization decision is `denied` (P6); a refusal of class `caller` or `system` is
    /// `failed`, with the class and the reason beside it. A missing or unknown class reads
    /// as `denied` (the helper said no, for a reason this code does not know).
    pub fn of_refusal(class: Option<&str>) -> Self {
        match class {
            Some("caller") | Some("system") => Self::Failed,
            _ => Self::Denied,
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Matched | Self::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Matched => "matched",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Denied => "denied",
            Self::Cancelled => "cancelled",
            Self::Lost => "lost",
        }
    }
}

impl std::fmt::Display for PayloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/payloads/{id}/status`: the pilot reports progress and the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub pilot_id: String,
    pub state: Option<PayloadState>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default)]
    pub wall_seconds: Option<f64>,
    /// Why it was denied, failed or killed; free text for humans.
    #[serde(default)]
    pub reason: Option<String>,
    /// For payloads the helper refused: `caller`, `system` or `authorization` (the state is
    /// `denied` for `authorization` only, `failed` for the others; see
    /// [`PayloadState::of_refusal`]).
    #[serde(default)]
    pub denial_class: Option<String>,
    /// Declared outputs (or entries inside declared directories) the helper did not copy,
    /// each "path: reason". Left out when empty, so older servers accept the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs_skipped: Vec<String>,
    /// In a heartbeat: memory charged to the payload's cgroup now (`cpu_seconds` and
    /// `peak_memory_bytes` carry the rest of the usage so far). Sent only to servers that
    /// announce `live_usage` in the match answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The helper's answer to an `information` request, relayed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub information: Option<InformationAnswer>,
}

/// The site helper's answer to an `information` request, as the pilot relays it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InformationAnswer {
    /// The request it answers (the signed command's nonce).
    pub request_id: String,
    /// False when the helper refused (its policies, the signature) or the payload was not
    /// running there.
    pub ok: bool,
    /// The helper's words: "information", or why not.
    pub reason: String,
    /// What the helper disclosed (docs/security-model.md, "What the VO learns about a
    /// running payload").
    #[serde(default)]
    pub payload: Option<super::switch_wire::RunningPayload>,
}

/// `POST /v1/payloads/{id}/information` and `GET .../information/{request_id}`: a request for
/// the site helper's view of a running payload, and its answer once the pilot relayed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InformationView {
    pub request_id: String,
    pub payload_id: String,
    pub requester: String,
    pub requested_at: DateTime<Utc>,
    /// The payload's state now, and its pilot and node.
    pub state: PayloadState,
    #[serde(default)]
    pub pilot_id: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// When the server last heard from the pilot about this payload.
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// The server's heartbeat interval: the pilot picks the request up with its next
    /// heartbeat, so an answer is due within about this long.
    pub heartbeat_seconds: u64,
    #[serde(default)]
    pub answered_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub answer: Option<InformationAnswer>,
}

/// Most `outputs_skipped` entries a server keeps (and a helper reports, the last one saying
/// how many more there were), and the most characters of each.
pub const MAX_OUTPUTS_SKIPPED: usize = 1000;
pub const MAX_OUTPUT_SKIP_CHARS: usize = 1024;

/// The answer to a status report: operator commands for the payload, if any.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusAck {
    #[serde(default)]
    pub commands: Vec<OperatorCommand>,
}

/// A request from the owner or a VO operator that the pilot relays to the helper. `signed` is
/// the same request signed by the VO server: the helper authorizes the requester named in it
/// with the site's and the VO's policies before acting, and the pilot cannot alter it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OperatorCommand {
    Cancel {
        requester: String,
        #[serde(default)]
        signed: Option<super::command::SignedCommand>,
    },
    Signal {
        requester: String,
        signal: i32,
        #[serde(default)]
        signed: Option<super::command::SignedCommand>,
    },
    /// Ask the site's helper what it sees of the payload; the pilot relays the answer in a
    /// status report (`information`) under `request_id`, which is also the signed command's
    /// nonce.
    Information {
        requester: String,
        request_id: String,
        #[serde(default)]
        signed: Option<super::command::SignedCommand>,
    },
    /// A command of a newer server: the pilot ignores it rather than fail the whole answer.
    #[serde(other)]
    Unknown,
}

/// `GET /v1/payloads/{id}`: what the owner sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayloadView {
    pub payload_id: String,
    pub owner_dn: String,
    pub vo: String,
    pub state: PayloadState,
    pub argv: Vec<String>,
    #[serde(default)]
    pub jobtag: Option<String>,
    pub resources: Resources,
    #[serde(default)]
    pub outputs: Vec<String>,
    pub submitted_at: DateTime<Utc>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pilot_id: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub batch_job_id: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    /// Memory charged to the payload now, from its last heartbeat (while it runs; after the
    /// end the last value heard).
    #[serde(default)]
    pub memory_bytes_now: Option<u64>,
    /// When the usage above was last reported (a heartbeat or the final report).
    #[serde(default)]
    pub usage_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub denial_class: Option<String>,
    /// True once the pilot uploaded the output archive (`GET .../output` fetches it until
    /// `files_deleted_at`).
    #[serde(default)]
    pub has_output: bool,
    /// Declared outputs that were not copied, each "path: reason" (symlink, FIFO, over the
    /// size limit, missing, ...).
    #[serde(default)]
    pub outputs_skipped: Vec<String>,
    /// When the server deleted the payload's input bundle and output archive, its retention
    /// period (`retention_seconds` in server.toml) after the final state.
    #[serde(default)]
    pub files_deleted_at: Option<DateTime<Utc>>,
}

/// Every error answer has this body, with an HTTP status that fits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `not_authorized`, `bad_request`, `not_found`.
    pub error: String,
    /// What went wrong and how to fix it.
    pub message: String,
}
