//! Operator commands: a cancel, signal or information request for a running payload, from its
//! owner or a VO operator, signed by the VO server and relayed by the pilot to the helper.
//!
//! The helper verifies the signature with the same VO key as envelopes, then authorizes the
//! *requester* named inside with the site and VO policies (action, jobowner, jobtag, SELF)
//! before acting, and audits the decision. The pilot can relay or withhold a command; it cannot
//! forge one or change who asked.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::envelope::{SignatureError, VoSigningKey, VoVerifyingKey};

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Stop the payload: TERM, then KILL after the grace period.
    Cancel,
    /// Deliver `signal` to every process of the payload.
    Signal,
    /// Report the payload's state and usage so far.
    Information,
}

impl CommandAction {
    /// The action's name in the policy language.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Signal => "signal",
            Self::Information => "information",
        }
    }
}

/// The signed content of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    pub version: u32,
    pub payload_id: String,
    pub action: CommandAction,
    /// Who asked: the owner or a VO operator (grid DN).
    pub requester_dn: String,
    #[serde(default)]
    pub requester_fqans: Vec<String>,
    /// For `signal`: the signal number.
    #[serde(default)]
    pub signal: Option<i32>,
    pub not_after: DateTime<Utc>,
    /// Unique per command: the helper acts on a nonce once.
    pub nonce: String,
}

/// A command as it travels (same scheme as the envelope: base64 body + Ed25519 signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCommand {
    /// The VO whose key signed it.
    pub vo: String,
    pub body: String,
    pub signature: String,
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command signature: {0}")]
    Signature(#[from] SignatureError),
    #[error("command body is not valid JSON of the expected shape: {0}")]
    Json(serde_json::Error),
    #[error("command version {0} is not supported (this helper accepts 1)")]
    Version(u32),
    #[error("command expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("command for signal has no valid signal number (1-64)")]
    BadSignal,
}

impl SignedCommand {
    pub fn sign(key: &VoSigningKey, vo: &str, body: &CommandBody) -> SignedCommand {
        let (body, signature) = key.sign_json(body);
        SignedCommand {
            vo: vo.to_string(),
            body,
            signature,
        }
    }

    /// Checks the signature, version, expiry and signal number.
    pub fn verify(
        &self,
        key: &VoVerifyingKey,
        now: DateTime<Utc>,
    ) -> Result<CommandBody, CommandError> {
        let bytes = key.verify_b64(&self.body, &self.signature)?;
        let body: CommandBody = serde_json::from_slice(&bytes).map_err(CommandError::Json)?;
        if body.version != 1 {
            return Err(CommandError::Version(body.version));
        }
        if now > body.not_after {
            return Err(CommandError::Expired(body.not_after));
        }
        if body.action == CommandAction::Signal && !matches!(body.signal, Some(1..=64)) {
            return Err(CommandError::BadSignal);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CommandBody {
        CommandBody {
            version: 1,
            payload_id: "p1".into(),
            action: CommandAction::Cancel,
            requester_dn: "/DC=org/CN=manager".into(),
            requester_fqans: vec![],
            signal: None,
            not_after: Utc::now() + chrono::Duration::minutes(5),
            nonce: "00112233445566778899".into(),
        }
    }

    #[test]
    fn commands_verify_and_resist_change() {
        let key = VoSigningKey::generate();
        let b = body();
        let c = SignedCommand::sign(&key, "demo", &b);
        assert_eq!(c.verify(&key.verifying_key(), Utc::now()).unwrap(), b);
        let mut forged = c.clone();
        forged.body = forged.body.replacen('e', "f", 1);
        assert!(forged.verify(&key.verifying_key(), Utc::now()).is_err());
        let late = Utc::now() + chrono::Duration::hours(1);
        assert!(matches!(
            c.verify(&key.verifying_key(), late),
            Err(CommandError::Expired(_))
        ));
    }
}
