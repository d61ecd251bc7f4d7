//! The pilot agent (`mupilot`), running as the VO's pilot account inside a batch slot.

pub mod cli;
pub mod slot;
