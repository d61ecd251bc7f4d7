//! Landlock IPC scoping of payloads (P8): every payload is its own Landlock domain with
//! `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET` and `LANDLOCK_SCOPE_SIGNAL` (ABI 6, Linux 6.12), so
//! its processes can neither connect to an abstract unix socket bound outside the payload nor
//! signal a process outside it, while the host's network stays usable (`network = "host"`).
//!
//! Three moments, so the payload's process (which shares the stage's memory until its exec and
//! must not allocate, payload.rs) only makes one system call:
//!
//! 1. The helper, once at start ([`resolve`]): probes the kernel and decides, with the site's
//!    `sandbox.ipc_fallback`, what a kernel without scoping means: run `network = "host"`
//!    payloads in a private network namespace that pasta connects to the host's network (the
//!    default, net.rs), or in one with only `lo`, or refuse to start (abstract sockets belong
//!    to the network namespace). Never silently unscoped.
//! 2. The stage, before its plan (idle time, [`ruleset`]): creates the ruleset (a descriptor,
//!    close-on-exec) with the `landlock` crate; a failure there fails the launch.
//! 3. The payload's process, after no_new_privs and before its exec ([`restrict_self`]):
//!    `landlock_restrict_self(2)`, a raw system call on that descriptor.
//!
//! Holds no state and must not decide anything else about the sandbox.

use std::os::fd::{OwnedFd, RawFd};

use landlock::{CompatLevel, Compatible, Ruleset, RulesetAttr, Scope};
use serde::{Deserialize, Serialize};

use super::privs::Failed;
use super::NetworkMode;

/// The Landlock ABI that scopes abstract unix sockets and signals (Linux 6.12).
pub const SCOPE_ABI: i32 = 6;

/// What the helper does where the kernel cannot scope payloads (Landlock ABI < 6, or
/// Landlock not enabled) and `network = "host"` (site setting `sandbox.ipc_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpcFallback {
    /// Payloads get a private network namespace each, connected to the host's network by
    /// `pasta` running as the payload's account, as `network = "pasta"` (net.rs).
    #[default]
    Pasta,
    /// Payloads get a private network namespace with only `lo` up, as `network = "loopback"`.
    Loopback,
    /// The helper does not start and says why: the site chooses between a newer kernel and
    /// payloads in a namespace of their own.
    Refuse,
}

/// How payloads of this helper are kept apart beyond namespaces: decided once by [`resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcIsolation {
    /// The network the payloads get (the site's, or loopback as the fallback).
    pub network: NetworkMode,
    /// Each payload is its own Landlock domain scoping abstract sockets and signals.
    pub landlock: bool,
    /// The kernel's Landlock ABI (0: none), for messages.
    pub abi: i32,
}

impl std::fmt::Display for IpcIsolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let net = self.network.as_str();
        match self.landlock {
            true => write!(
                f,
                "Landlock scope of abstract sockets and signals (ABI {}), network {net}",
                self.abi
            ),
            false => write!(
                f,
                "network namespace per payload ({net}; Landlock ABI {} cannot scope)",
                self.abi
            ),
        }
    }
}

/// The running kernel's Landlock ABI version; 0 when Landlock is not built in or not enabled
/// at boot (`lsm=`).
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the version (or -1 with errno); no memory is read or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// Decides with the running kernel; see [`decide`]. A pasta network also needs pasta and a
/// usable /dev/net/tun on this node ([`super::net::check`]).
pub fn resolve(network: NetworkMode, fallback: IpcFallback) -> Result<IpcIsolation, String> {
    let isolation = decide(kernel_abi(), network, fallback)?;
    if isolation.network == NetworkMode::Pasta {
        super::net::check().map_err(|e| match network {
            NetworkMode::Pasta => e.to_string(),
            _ => format!(
                "this kernel cannot scope payloads' abstract sockets (Landlock ABI {}), so \
                 ipc_fallback = \"pasta\" gives each payload a network namespace of its own, \
                 but {e}; or choose ipc_fallback = \"loopback\" (no network beyond the node)",
                isolation.abi
            ),
        })?;
    }
    if isolation.landlock {
        // The probe that counts: the stage will make exactly this ruleset.
        ruleset()
            .map_err(|e| format!("the kernel reports Landlock ABI {} but {e}", isolation.abi))?;
    }
    Ok(isolation)
}

/// Landlock scoping where the kernel has it, in every network mode; without it, abstract
/// sockets stay private only in a network namespace of their own: `network = "host"` then
/// follows `fallback`. (Signals: pid namespaces and accounts still separate payloads; what
/// scoping adds there is a pidfd handed across, see docs/security-model.md.)
pub fn decide(
    abi: i32,
    network: NetworkMode,
    fallback: IpcFallback,
) -> Result<IpcIsolation, String> {
    let landlock = abi >= SCOPE_ABI;
    let network = match (landlock, network, fallback) {
        (false, NetworkMode::Host, IpcFallback::Refuse) => {
            return Err(format!(
                "this kernel cannot keep payloads' abstract unix sockets and signals apart with \
                 network = \"host\" (Landlock ABI {abi}{}; scoping needs ABI {SCOPE_ABI}, Linux 6.12, \
                 with landlock in the boot parameter lsm=). Choose one in switch.toml [sandbox]: \
                 ipc_fallback = \"pasta\" (the default: a network namespace per payload connected \
                 to the node's network by pasta, package passt), ipc_fallback = \"loopback\" \
                 (payloads get a private network namespace with only lo: no network beyond the \
                 node), network = \"loopback\" or \"none\", or boot a kernel with Landlock ABI \
                 {SCOPE_ABI}",
                if abi == 0 { ": Landlock not enabled" } else { "" }
            ))
        }
        (false, NetworkMode::Host, IpcFallback::Loopback) => NetworkMode::Loopback,
        (false, NetworkMode::Host, IpcFallback::Pasta) => NetworkMode::Pasta,
        (_, n, _) => n,
    };
    Ok(IpcIsolation {
        network,
        landlock,
        abi,
    })
}

/// The ruleset every payload restricts itself with: no access rights handled, only the two
/// scopes, required in full (no best effort). Close-on-exec (the kernel makes it so).
pub(super) fn ruleset() -> Result<OwnedFd, String> {
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|r| r.create())
        .map_err(|e| format!("cannot create the Landlock ruleset: {e}"))?;
    Option::<OwnedFd>::from(created)
        .ok_or_else(|| "cannot create the Landlock ruleset: the kernel made none".to_owned())
}

/// Makes the calling process (and everything it starts) a new Landlock domain with `ruleset`.
/// Needs no_new_privs (or CAP_SYS_ADMIN). One raw system call: safe in the payload's process,
/// which must not allocate.
pub(super) fn restrict_self(ruleset: RawFd) -> Result<(), Failed> {
    // SAFETY: landlock_restrict_self(2) with a descriptor and flags 0; no memory is passed.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
        return Err(Failed::os("landlock: scope abstract sockets and signals"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoping_kernels_keep_the_sites_network() {
        for abi in [6, 7, 9] {
            for n in [
                NetworkMode::Host,
                NetworkMode::None,
                NetworkMode::Loopback,
                NetworkMode::Pasta,
            ] {
                for f in [
                    IpcFallback::Refuse,
                    IpcFallback::Loopback,
                    IpcFallback::Pasta,
                ] {
                    let i = decide(abi, n, f).unwrap();
                    assert!(i.landlock);
                    assert_eq!(i.network, n);
                }
            }
        }
    }

    #[test]
    fn older_kernels_follow_the_fallback_with_network_host() {
        for abi in [0, 1, 5] {
            let e = decide(abi, NetworkMode::Host, IpcFallback::Refuse).unwrap_err();
            assert!(e.contains(&format!("Landlock ABI {abi}")), "{e}");
            assert!(e.contains("ipc_fallback = \"loopback\""), "{e}");
            assert_eq!(abi == 0, e.contains("not enabled"), "{e}");
            assert!(e.contains("ipc_fallback = \"pasta\""), "{e}");
            let i = decide(abi, NetworkMode::Host, IpcFallback::Loopback).unwrap();
            assert_eq!((i.network, i.landlock), (NetworkMode::Loopback, false));
            // The default: a namespace of its own, with the network through pasta.
            assert_eq!(IpcFallback::default(), IpcFallback::Pasta);
            let i = decide(abi, NetworkMode::Host, IpcFallback::default()).unwrap();
            assert_eq!((i.network, i.landlock), (NetworkMode::Pasta, false));
            // A network namespace of their own already keeps abstract sockets apart.
            for n in [NetworkMode::None, NetworkMode::Loopback, NetworkMode::Pasta] {
                let i = decide(abi, n, IpcFallback::Refuse).unwrap();
                assert_eq!((i.network, i.landlock), (n, false));
            }
        }
    }
}
