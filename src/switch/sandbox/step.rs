//! A failed step of the stage, or of a process it starts: which step, and why, as a type
//! ([`StageError`]) until the failure crosses to the helper, where it becomes the text of
//! `wire::FromStage::Failed` ([`StageError::to_message`]). Holds the error type and its
//! conversions only; must not do I/O.

use std::borrow::Cow;
use std::io;

use super::privs::Failed;
use super::wire::{Fault, FromStage};

/// The setup step a bundle that is not a usable tar.gz fails at (see
/// `SandboxError::Bundle`).
pub(crate) const BUNDLE_ARCHIVE_STEP: &str = "bundle archive";

/// A setup step that failed, and why. Displays as `step: cause`.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub(crate) struct StageError {
    /// What the stage was doing, e.g. "mount tmpfs on /tmp" or "join cgroup PATH".
    pub step: Cow<'static, str>,
    #[source]
    pub source: Cause,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Cause {
    /// A system call or file operation failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A system call made through nix failed.
    #[error("{0}")]
    Errno(#[from] nix::errno::Errno),
    /// The payload cgroup could not be read or joined.
    #[error("{0}")]
    Cgroup(#[from] super::cgroup::CgroupError),
    /// A gate did not open (the launch was withdrawn).
    #[error("{0}")]
    Gate(#[from] super::wire::GateError),
    /// What a check found, or the text of a part that only has text (a process that could
    /// not allocate, a child that reported over a pipe).
    #[error("{0}")]
    Detail(String),
    /// The input bundle is not a usable tar.gz: the caller's fault, not the node's.
    #[error("{0}")]
    Bundle(String),
}

impl From<String> for Cause {
    fn from(s: String) -> Self {
        Cause::Detail(s)
    }
}

impl From<&str> for Cause {
    fn from(s: &str) -> Self {
        Cause::Detail(s.to_owned())
    }
}

impl StageError {
    pub fn new(step: impl Into<Cow<'static, str>>, source: impl Into<Cause>) -> Self {
        StageError {
            step: step.into(),
            source: source.into(),
        }
    }

    /// Whose fault the failure is, as the helper reports it.
    pub fn fault(&self) -> Fault {
        match self.source {
            Cause::Bundle(_) => Fault::Bundle,
            _ => Fault::Node,
        }
    }

    /// The message to the helper: from here on the failure is text.
    pub fn to_message(&self) -> FromStage {
        FromStage::Failed {
            step: self.step.to_string(),
            error: self.source.to_string(),
            fault: self.fault(),
        }
    }
}

/// A failure of code that could not allocate (privs.rs, payload.rs's child), named by its
/// static parts.
impl From<Failed> for StageError {
    fn from(f: Failed) -> Self {
        let (step, msg) = f.describe();
        StageError::new(step, Cause::Detail(msg))
    }
}

/// `r`, its error tagged with the step `name`.
pub(crate) fn step<T, E: Into<Cause>>(
    name: impl Into<Cow<'static, str>>,
    r: Result<T, E>,
) -> Result<T, StageError> {
    r.map_err(|e| StageError::new(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_error_reads_step_then_cause_and_knows_whose_fault_it_is() {
        let e = step::<(), _>("mount /proc", Err(nix::errno::Errno::EPERM)).unwrap_err();
        assert_eq!(e.to_string(), "mount /proc: EPERM: Operation not permitted");
        assert_eq!(
            e.to_message(),
            FromStage::Failed {
                step: "mount /proc".into(),
                error: "EPERM: Operation not permitted".into(),
                fault: Fault::Node,
            }
        );
        let b = StageError::new(
            BUNDLE_ARCHIVE_STEP,
            Cause::Bundle("invalid gzip header".into()),
        );
        assert_eq!(b.fault(), Fault::Bundle);
        let f: StageError = Failed::check("verify dropped privileges", "a uid differs").into();
        assert_eq!(f.to_string(), "verify dropped privileges: a uid differs");
        assert_eq!(f.fault(), Fault::Node);
    }
}
