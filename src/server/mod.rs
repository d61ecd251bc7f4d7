//! The reference VO server (`mupilot-server`).

pub mod cli;
