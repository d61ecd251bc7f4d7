//! The load-time checks of `switch.toml`: from the raw schema ([`RawConfig`]) to a
//! [`SwitchConfig`] whose paths are resolved and whose files (VO keys, policies, the
//! grid-mapfile, ban lists) parse. Creates the audit and state directories (0700) and nothing
//! else; every error names the key, the value and the fix.

use std::path::{Path, PathBuf};

use super::super::gridmap::Gridmap;
use super::super::sandbox::SandboxSettings;
use super::*;
use crate::protocol::VoVerifyingKey;

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

pub(super) type KeyErr = (String, String);

pub(super) fn validate(raw: RawConfig, base: &Path) -> Result<SwitchConfig, KeyErr> {
    let bad = |key: &str, what: String| (key.to_string(), what);

    if raw.min_uid == 0 {
        return Err(bad(
            "min_uid",
            "0 would allow mapping payloads to root; set it to the lowest uid of the payload accounts (e.g. 1000)".into(),
        ));
    }

    let node_name = match raw.node_name {
        Some(n) => n,
        None => detect_node_name().map_err(|what| bad("node_name", what))?,
    };
    if !crate::protocol::envelope::is_valid_node_name(&node_name) {
        return Err(bad(
            "node_name",
            format!("'{node_name}' is not a node name; use 1-253 characters without spaces, e.g. \"wn042.example.org\""),
        ));
    }
    if raw.max_envelope_validity_seconds < 60
        || raw.max_envelope_validity_seconds > MAX_ENVELOPE_VALIDITY_LIMIT
    {
        return Err(bad(
            "max_envelope_validity_seconds",
            format!(
                "{} is outside 60..{MAX_ENVELOPE_VALIDITY_LIMIT}; the default is {DEFAULT_MAX_ENVELOPE_VALIDITY} (an hour)",
                raw.max_envelope_validity_seconds
            ),
        ));
    }

    if raw.allowed_pilots.is_empty() {
        return Err(bad(
            "allowed_pilots",
            "is empty, so no pilot could use the helper; list the pilot account names or uids, e.g. [\"mupilot\"]".into(),
        ));
    }
    let mut allowed_pilots = Vec::new();
    for (i, p) in raw.allowed_pilots.iter().enumerate() {
        let key = format!("allowed_pilots[{i}]");
        let ap = match p {
            PilotRef::Uid(uid) => AllowedPilot {
                written: uid.to_string(),
                uid: *uid,
            },
            PilotRef::Name(name) => match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => AllowedPilot {
                    written: name.clone(),
                    uid: u.uid.as_raw(),
                },
                Ok(None) => {
                    return Err(bad(
                        &key,
                        format!("no account named '{name}' exists; create it (useradd) or write its numeric uid"),
                    ))
                }
                Err(e) => {
                    return Err(bad(
                        &key,
                        format!("cannot look up account '{name}': {e}; check the passwd database (nsswitch)"),
                    ))
                }
            },
        };
        allowed_pilots.push(ap);
    }

    if raw.vo.is_empty() {
        return Err(bad(
            "vo",
            "no [[vo]] table, so every envelope would be refused; add [[vo]] name = \"...\" public_key = \"...\"".into(),
        ));
    }
    let mut vos: Vec<VoConfig> = Vec::new();
    for (i, v) in raw.vo.into_iter().enumerate() {
        if !crate::util::is_safe_id(&v.name) {
            return Err(bad(
                &format!("vo[{i}].name"),
                format!(
                    "'{}' is not a valid VO name; use 1-64 characters of [A-Za-z0-9._-]",
                    v.name
                ),
            ));
        }
        if vos.iter().any(|o| o.name == v.name) {
            return Err(bad(
                &format!("vo[{i}].name"),
                format!(
                    "VO '{}' is configured twice; keep one [[vo]] table per VO",
                    v.name
                ),
            ));
        }
        let path = resolve(base, v.public_key);
        let key = VoVerifyingKey::from_pem_file(&path)
            .map_err(|e| bad(&format!("vo[{i}].public_key"), e.to_string()))?;
        let policy = v.policy.map(|p| resolve(base, p));
        if let Some(p) = &policy {
            crate::policy::Policy::load(p)
                .map_err(|e| bad(&format!("vo[{i}].policy"), e.to_string()))?;
        }
        vos.push(VoConfig {
            name: v.name,
            public_key_path: path,
            key,
            policy,
        });
    }

    let gridmap = resolve(base, raw.gridmap);
    Gridmap::load(&gridmap).map_err(|e| bad("gridmap", e.to_string()))?;
    let authz = validate_authz(raw.authz, base)?;

    let audit_log = resolve(base, raw.audit_log);
    let audit_dir = audit_log
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            bad(
                "audit_log",
                "must be a file path, e.g. /var/log/mupilot/audit.jsonl".into(),
            )
        })?;
    ensure_private_dir(audit_dir).map_err(|what| bad("audit_log", what))?;
    if audit_log.is_dir() {
        return Err(bad(
            "audit_log",
            format!(
                "{} is a directory; name a file inside it, e.g. audit.jsonl",
                audit_log.display()
            ),
        ));
    }

    let state_dir = resolve(base, raw.state_dir);
    ensure_private_dir(&state_dir).map_err(|what| bad("state_dir", what))?;

    let metrics_textfile = match raw.metrics_textfile {
        None => None,
        Some(p) => {
            let p = resolve(base, p);
            let shown = p.display().to_string();
            if p.extension().and_then(|e| e.to_str()) != Some("prom") {
                return Err(bad(
                    "metrics_textfile",
                    format!("{shown} must end in .prom (node_exporter's textfile collector reads only *.prom), e.g. /var/lib/prometheus/node-exporter/mupilot-switch.prom"),
                ));
            }
            match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) if d.is_dir() => {}
                _ => {
                    return Err(bad(
                        "metrics_textfile",
                        format!("the directory of {shown} does not exist; name a file in node_exporter's --collector.textfile.directory, or remove the key"),
                    ))
                }
            }
            Some(p)
        }
    };
    if !(1..=3600).contains(&raw.metrics_interval_seconds) {
        return Err(bad(
            "metrics_interval_seconds",
            format!(
                "{} must be between 1 and 3600 seconds; the default is 15",
                raw.metrics_interval_seconds
            ),
        ));
    }

    let s = raw.sandbox;
    let scratch_root = resolve(
        base,
        s.scratch_root
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_ROOT)),
    );
    if ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .any(|t| scratch_root.starts_with(t))
    {
        return Err(bad(
            "sandbox.scratch_root",
            format!(
                "{} is below /tmp, /var/tmp or /dev/shm, which are private per payload; use a directory such as {DEFAULT_SCRATCH_ROOT}",
                scratch_root.display()
            ),
        ));
    }
    if s.tmp_size_bytes < 1 << 20 {
        return Err(bad(
            "sandbox.tmp_size_bytes",
            "must be at least 1048576 (1 MiB)".into(),
        ));
    }
    if s.pids_max == 0 {
        return Err(bad("sandbox.pids_max", "must be at least 1".into()));
    }
    if s.nofile < 16 {
        return Err(bad("sandbox.nofile", "must be at least 16".into()));
    }
    if s.warm_stages > MAX_WARM_STAGES {
        return Err(bad(
            "sandbox.warm_stages",
            format!("{} is more than {MAX_WARM_STAGES}; idle stages only save the exec of the helper binary, a few are enough (0 turns them off)", s.warm_stages),
        ));
    }
    for (i, name) in s.env_allowlist.iter().enumerate() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(bad(
                &format!("sandbox.env_allowlist[{i}]"),
                format!("'{name}' is not an environment variable name; remove it"),
            ));
        }
    }

    let socket_group = match raw.socket_group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(&name) {
            Ok(Some(g)) => Some((name, g.gid.as_raw())),
            Ok(None) => {
                return Err(bad(
                    "socket_group",
                    format!("no group named '{name}' exists; create it (groupadd) and add the pilot accounts to it"),
                ))
            }
            Err(e) => {
                return Err(bad(
                    "socket_group",
                    format!("cannot look up group '{name}': {e}; check the group database (nsswitch)"),
                ))
            }
        },
    };
    let l = raw.limits;
    for (key, v) in [
        ("limits.hello_timeout_seconds", l.hello_timeout_seconds),
        ("limits.frame_timeout_seconds", l.frame_timeout_seconds),
        (
            "limits.refusal_audit_interval_seconds",
            l.refusal_audit_interval_seconds,
        ),
    ] {
        if !(1..=3600).contains(&v) {
            return Err(bad(key, format!("{v} is outside 1..=3600 seconds")));
        }
    }
    if l.max_connections_per_uid == 0 || l.max_connections < l.max_connections_per_uid {
        return Err(bad(
            "limits.max_connections",
            format!(
                "must be at least max_connections_per_uid ({}), which must be at least 1",
                l.max_connections_per_uid
            ),
        ));
    }
    if l.bundle_max_bytes == 0 {
        return Err(bad(
            "limits.bundle_max_bytes",
            "must be at least 1 (payloads without a bundle need no limit)".into(),
        ));
    }
    #[cfg(feature = "grid")]
    let grid = match raw.grid {
        None => None,
        Some(mut g) => {
            g.cert_dir = resolve(base, g.cert_dir);
            g.vomsdir = resolve(base, g.vomsdir);
            if let Some(p) = g.problems().into_iter().next() {
                return Err(bad("grid", p));
            }
            Some(g)
        }
    };
    let glexec = match raw.glexec {
        None => None,
        Some(g) => {
            let vo_names: Vec<&str> = vos.iter().map(|v| v.name.as_str()).collect();
            let pilots: Vec<(&str, u32)> = allowed_pilots
                .iter()
                .map(|p| (p.written.as_str(), p.uid))
                .collect();
            Some(g.validate(&vo_names, &pilots)?)
        }
    };
    let limits = LimitsConfig {
        bundle_max_bytes: l.bundle_max_bytes,
        hello_timeout: std::time::Duration::from_secs(l.hello_timeout_seconds),
        frame_timeout: std::time::Duration::from_secs(l.frame_timeout_seconds),
        max_connections_per_uid: l.max_connections_per_uid,
        max_connections: l.max_connections,
        refusal_audit_interval: std::time::Duration::from_secs(l.refusal_audit_interval_seconds),
        peer_pidfd: l.peer_pidfd,
    };

    Ok(SwitchConfig {
        path: PathBuf::new(),
        metrics_textfile,
        metrics_interval: std::time::Duration::from_secs(raw.metrics_interval_seconds),
        socket: resolve(base, raw.socket),
        socket_group,
        limits,
        #[cfg(feature = "grid")]
        grid,
        glexec,
        allowed_pilots,
        gridmap,
        audit_log,
        state_dir,
        min_uid: raw.min_uid,
        node_name,
        max_envelope_validity_seconds: raw.max_envelope_validity_seconds,
        vos,
        authz,
        sandbox: SandboxSettings {
            scratch_root,
            tmp_size_bytes: s.tmp_size_bytes,
            pids_max: s.pids_max,
            network: s.network,
            ipc_fallback: s.ipc_fallback,
            env_allowlist: s.env_allowlist,
            nofile: s.nofile,
            core_bytes: s.core_bytes,
            output_limit_bytes: s.output_limit_bytes,
            allow_user_namespaces: s.allow_user_namespaces,
            warm_stages: s.warm_stages,
            stage_exe: None,
        },
    })
}

/// The kernel's host name (uname's nodename), the default node name.
fn detect_node_name() -> Result<String, String> {
    nix::unistd::gethostname()
        .map_err(|e| e.to_string())
        .and_then(|h| {
            h.into_string()
                .map_err(|h| format!("'{}' is not UTF-8", h.to_string_lossy()))
        })
        .map_err(|e| {
            format!("not set and the kernel's host name cannot be used ({e}); set node_name in switch.toml")
        })
}

/// Checks every `[authz]` file loads now (the helper follows them live afterwards).
fn validate_authz(a: RawAuthz, base: &Path) -> Result<AuthzConfig, KeyErr> {
    use crate::policy::{DnBans, FqanBans, Load, VoBans};
    let bad = |key: &str, what: String| (key.to_string(), what);
    fn check<T: Load>(key: &str, p: &Path) -> Result<(), KeyErr> {
        let bytes = std::fs::read(p).map_err(|e| {
            (
                key.to_string(),
                format!("cannot read {}: {e}; create the file (an empty list is fine) or remove the key", p.display()),
            )
        })?;
        T::load(&p.display().to_string(), &bytes)
            .map(|_| ())
            .map_err(|e| (key.to_string(), e.to_string()))
    }
    let list = |key: &str, v: Vec<PathBuf>| -> Vec<(String, PathBuf)> {
        v.into_iter()
            .enumerate()
            .map(|(i, p)| (format!("authz.{key}[{i}]"), resolve(base, p)))
            .collect()
    };
    let mut cfg = AuthzConfig {
        lease_ttl_seconds: a.lease_ttl_seconds,
        ..Default::default()
    };
    for (key, p) in list("ban_users", a.ban_users) {
        check::<DnBans>(&key, &p)?;
        cfg.ban_users.push(p);
    }
    for (key, p) in list("ban_fqans", a.ban_fqans) {
        check::<FqanBans>(&key, &p)?;
        cfg.ban_fqans.push(p);
    }
    for (key, p) in list("ban_vos", a.ban_vos) {
        check::<VoBans>(&key, &p)?;
        cfg.ban_vos.push(p);
    }
    if let Some(p) = a.site_policy.map(|p| resolve(base, p)) {
        crate::policy::Policy::load(&p).map_err(|e| bad("authz.site_policy", e.to_string()))?;
        cfg.site_policy = Some(p);
    }
    if let Some(p) = a.groupmap.map(|p| resolve(base, p)) {
        Gridmap::load(&p).map_err(|e| bad("authz.groupmap", e.to_string()))?;
        cfg.groupmap = Some(p);
    }
    if let Some(p) = a.gridmapdir.map(|p| resolve(base, p)) {
        if !p.is_dir() {
            return Err(bad(
                "authz.gridmapdir",
                format!(
                    "{} is not a directory; create it with one empty file per pool account (e.g. pool001)",
                    p.display()
                ),
            ));
        }
        cfg.gridmapdir = Some(p);
    }
    if let Some(p) = a.lcmaps_groupmapfile.map(|p| resolve(base, p)) {
        if cfg.gridmapdir.is_none() {
            return Err(bad(
                "authz.lcmaps_groupmapfile",
                "names pool leases, but authz.gridmapdir is not set; set it or remove this".into(),
            ));
        }
        crate::switch::leases::Groupmapfile::load(&p)
            .map_err(|e| bad("authz.lcmaps_groupmapfile", e.to_string()))?;
        cfg.lcmaps_groupmapfile = Some(p);
    }
    if cfg.lease_ttl_seconds == 0 {
        return Err(bad(
            "authz.lease_ttl_seconds",
            "0 would expire every lease at once; use e.g. 604800 (7 days)".into(),
        ));
    }
    Ok(cfg)
}

/// Creates `dir` (and missing parents) 0700 if it does not exist; checks it is a directory.
fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        return Err(format!(
            "{} exists but is not a directory; remove it or choose another path",
            dir.display()
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create directory {}: {e}; create it (mode 0700, owned by root) or fix the path", dir.display()))
}
