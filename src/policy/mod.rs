//! The fine-grained authorization policy language (site and VO policies) and ban lists.
//!
//! INTERFACE SKELETON (phase 0): the policy work fills this module.

pub mod cli;
