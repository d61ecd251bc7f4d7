//! The sandbox's payload cgroups: the crate's one cgroup module ([`crate::cgroups`], shared with
//! the pilot's slot discovery), under the name the sandbox uses. Holds no logic of its own.

pub use crate::cgroups::{own_cgroups, Cgroup, CgroupError, Limits, Located, PilotCgroups, Usage};
