//! The fine-grained authorization policy language (site and VO policies) and the site's ban
//! lists: the local authorization decision of P3/P6, taken before any payload runs.
//!
//! Linked into the root helper: no async runtime, no network, no TLS here. Parse once
//! ([`Policy::parse`], [`Reloading`] for live files), decide many times ([`Policy::decide`],
//! [`PolicyStack::decide`], [`Bans::check`]); a decision is a few hash lookups and comparisons.
//!
//! Modules: `ast` (parsed form), `parser` (text -> statements, precise errors), `index`
//! ([`Policy`], identity index), `request`, `eval` (decisions and combination), `stack` (site +
//! VO sources), `bans`, `reload` (follow a file, fail closed), `cli`, `bench`.

pub(crate) mod ast;
pub mod bans;
pub mod bench;
pub mod cli;
pub(crate) mod error;
pub(crate) mod eval;
pub(crate) mod index;
pub(crate) mod parser;
pub(crate) mod reload;
pub(crate) mod request;
pub mod stack;

pub use ast::{Action, Attr, Op};
pub use bans::{BanDenial, BanParseError, BanWriteError, Bans, DnBans, FqanBans, VoBans};
pub use error::{ParseError, ParseErrorKind, PolicyError, RequestError};
pub use eval::{combine, Decision, DenyClass, Verdict};
pub use index::Policy;
pub use reload::{Load, ReloadError, Reloading};
pub use request::Request;
pub use stack::PolicyStack;
