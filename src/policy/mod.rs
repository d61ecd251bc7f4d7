//! The fine-grained authorization policy language (site and VO policies).
