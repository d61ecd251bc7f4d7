//! `mupilot-switch check-config`'s site checks: what a loaded [`SwitchConfig`] does not prove
//! by parsing. The directories payloads and records live in have the modes the helper needs
//! (the scratch root traversable by the payload accounts and writable by root only, the audit
//! and state directories root-only), and every pool the maps name has accounts.
//!
//! Reads only: it never creates, chmods or looks into a payload's files, and the helper's
//! launch path does not call it (it runs as `ExecStartPre=` and by hand).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::config::SwitchConfig;
use super::gridmap::{Gridmap, Mapping};

/// A config that parses but would not work: the file, the key, the value, what is wrong, the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub key: String,
    pub value: String,
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: key '{}' = {}: {}; fix: {}",
            self.file.display(),
            self.key,
            self.value,
            self.what,
            self.fix
        )
    }
}

/// Every problem of `cfg`, in the order of the file's keys; empty when the config is usable.
pub fn problems(cfg: &SwitchConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    out.extend(root_only(cfg, "audit_log", dir_of(&cfg.audit_log)));
    if cfg.audit_log.exists() {
        out.extend(root_only(cfg, "audit_log", &cfg.audit_log));
    }
    out.extend(root_only(cfg, "state_dir", &cfg.state_dir));
    out.extend(scratch_root(cfg));
    out.extend(pools(cfg));
    out.extend(glexec(cfg));
    out
}

/// The gLExec entry enabled without the `[grid]` table it verifies proxies with: every call
/// would be refused (202), so the site hears it here.
fn glexec(cfg: &SwitchConfig) -> Option<Problem> {
    #[cfg(feature = "grid")]
    let has_grid = cfg.grid.is_some();
    #[cfg(not(feature = "grid"))]
    let has_grid = false;
    match &cfg.glexec {
        Some(g) if g.enabled && !has_grid => Some(problem(
            cfg,
            "glexec.enabled",
            Path::new("true"),
            "the gLExec entry verifies callers' proxies against [grid], which is not configured (or this helper was built without grid support), so it would refuse every call".into(),
            "add a [grid] table (cert_dir, vomsdir; docs/site-admin.md \"Grid credentials\") or set glexec.enabled = false".into(),
        )),
        _ => None,
    }
}

fn dir_of(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

fn problem(cfg: &SwitchConfig, key: &str, value: &Path, what: String, fix: String) -> Problem {
    Problem {
        file: cfg.path.clone(),
        key: key.to_owned(),
        value: value.display().to_string(),
        what,
        fix,
    }
}

/// The audit log, the replay cache and the lease metadata are root's alone: a payload account
/// that could read them would learn other owners' DNs; one that could write them, rewrite history.
fn root_only(cfg: &SwitchConfig, key: &str, path: &Path) -> Option<Problem> {
    let m = std::fs::symlink_metadata(path).ok()?;
    let mode = m.mode() & 0o7777;
    let fix = if m.is_dir() {
        format!("chown root:root {0} && chmod 0700 {0}", path.display())
    } else {
        format!("chown root:root {0} && chmod 0600 {0}", path.display())
    };
    if m.uid() != 0 {
        return Some(problem(
            cfg,
            key,
            path,
            format!("{} is owned by uid {}, not root", path.display(), m.uid()),
            fix,
        ));
    }
    (mode & 0o077 != 0).then(|| {
        problem(
            cfg,
            key,
            path,
            format!(
                "{} has mode {mode:04o}: other accounts can reach the records in it",
                path.display()
            ),
            fix,
        )
    })
}

/// Every payload chdirs into `<scratch_root>/<payload id>` as its account, so each directory
/// on the way must be searchable by that account (o+x), and none may be writable by anyone but
/// root: whoever can write a component can swap it for a symlink under the helper, which
/// creates, chowns and removes directories there as root.
fn scratch_root(cfg: &SwitchConfig) -> Vec<Problem> {
    const KEY: &str = "sandbox.scratch_root";
    let root = &cfg.sandbox.scratch_root;
    let fix_path = format!(
        "set {KEY} to a directory outside every root-only directory, e.g. {}",
        super::config::DEFAULT_SCRATCH_ROOT
    );
    let mut out = Vec::new();
    for private in [&cfg.state_dir, &dir_of(&cfg.audit_log).to_path_buf()] {
        if root.starts_with(private) {
            out.push(problem(
                cfg,
                KEY,
                root,
                format!(
                    "is inside {}, a directory that must stay root-only (0700): payload accounts cannot reach their scratch directory (\"chdir to scratch: Permission denied\")",
                    private.display()
                ),
                fix_path.clone(),
            ));
            return out;
        }
    }
    for dir in root.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let is_root = dir == root.as_path();
        // The scratch root itself must not be a symlink; its parents are followed like the
        // kernel does when the payload resolves the path.
        let meta = if is_root {
            std::fs::symlink_metadata(dir)
        } else {
            std::fs::metadata(dir)
        };
        let m = match meta {
            Ok(m) => m,
            // Missing: the helper creates it (0711 root) at the first launch.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => {
                out.push(problem(
                    cfg,
                    KEY,
                    root,
                    format!("cannot inspect {}: {e}", dir.display()),
                    "run check-config as root".into(),
                ));
                break;
            }
        };
        let mode = m.mode() & 0o7777;
        let at = format!(
            "{} (mode {mode:04o}, uid {}, gid {})",
            dir.display(),
            m.uid(),
            m.gid()
        );
        if !m.is_dir() {
            out.push(problem(
                cfg,
                KEY,
                root,
                format!("{at} is not a directory"),
                format!("remove it, or {fix_path}"),
            ));
            break;
        }
        if mode & 0o001 == 0 {
            out.push(problem(
                cfg,
                KEY,
                root,
                format!("{at} is not searchable by the payload accounts, so every payload fails with \"chdir to scratch: Permission denied\""),
                format!("chmod o+x {}, or {fix_path}", dir.display()),
            ));
        }
        // A sticky directory (like /var/tmp) lets others create names but not replace root's.
        let sticky_ok = mode & 0o1000 != 0 && !is_root;
        let writable = m.uid() != 0
            || (mode & 0o020 != 0 && m.gid() != 0)
            || (mode & 0o002 != 0 && !sticky_ok);
        if writable {
            out.push(problem(
                cfg,
                KEY,
                root,
                format!("{at} can be written by an account other than root, which could replace the payloads' scratch directories"),
                format!("chown root:root {0} && chmod go-w {0}, or {fix_path}", dir.display()),
            ));
        }
    }
    out
}

/// Every pool (`.prefix`) the grid-mapfile or the group map names needs a gridmapdir with at
/// least one account file whose account exists; otherwise each owner mapped there is denied.
fn pools(cfg: &SwitchConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut maps = vec![("gridmap", cfg.gridmap.clone())];
    if let Some(g) = &cfg.authz.groupmap {
        maps.push(("authz.groupmap", g.clone()));
    }
    for (key, path) in maps {
        // Load already parsed both; a file changed since is reported like load would.
        let map = match Gridmap::load(&path) {
            Ok(m) => m,
            Err(e) => {
                out.push(problem(
                    cfg,
                    key,
                    &path,
                    e.to_string(),
                    "fix the file".into(),
                ));
                continue;
            }
        };
        for entry in &map.entries {
            let Some(first) = entry.accounts.first() else {
                continue;
            };
            let Mapping::Pool(prefix) = Mapping::from_account(first) else {
                continue;
            };
            let at = format!(
                "{} line {} maps \"{}\" to pool '.{prefix}'",
                path.display(),
                entry.line,
                entry.dn
            );
            let Some(dir) = &cfg.authz.gridmapdir else {
                out.push(problem(
                    cfg,
                    key,
                    &path,
                    format!("{at}, but no authz.gridmapdir is configured"),
                    format!("set authz.gridmapdir and create one empty file per pool account in it (e.g. {prefix}001)"),
                ));
                continue;
            };
            let (files, usable) = pool_accounts(dir, &prefix);
            if usable == 0 {
                out.push(problem(
                    cfg,
                    key,
                    &path,
                    format!(
                        "{at}, but {} holds {files} file(s) named {prefix} and digits (as leasing counts them) and none is an existing account",
                        dir.display()
                    ),
                    format!("useradd {prefix}001 && touch {}/{prefix}001 (one account and one empty file per pool member)", dir.display()),
                ));
            }
        }
    }
    out
}

/// How many account files of pool `prefix` (the prefix and digits, as leasing counts them) the
/// gridmapdir holds, and how many name an account.
fn pool_accounts(dir: &Path, prefix: &str) -> (usize, usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| crate::switch::leases::is_pool_account(n, prefix))
        .collect();
    let usable = names
        .iter()
        .filter(|n| matches!(nix::unistd::User::from_name(n), Ok(Some(_))))
        .count();
    (names.len(), usable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A loaded config in `dir`: `gridmap` as the grid-mapfile, `authz` lines, the scratch root.
    fn config(dir: &Path, gridmap: &str, authz: &str, scratch: &Path) -> SwitchConfig {
        let key = crate::protocol::VoSigningKey::generate();
        std::fs::write(dir.join("vo.pub"), key.verifying_key().to_pem()).unwrap();
        std::fs::write(dir.join("grid-mapfile"), gridmap).unwrap();
        let p = dir.join("switch.toml");
        std::fs::write(
            &p,
            format!(
                "allowed_pilots = [\"root\"]\ngridmap = \"grid-mapfile\"\naudit_log = \"log/audit.jsonl\"\n\
                 state_dir = \"state\"\n[[vo]]\nname = \"demo\"\npublic_key = \"vo.pub\"\n\
                 [authz]\n{authz}\n[sandbox]\nscratch_root = \"{}\"\n",
                scratch.display()
            ),
        )
        .unwrap();
        SwitchConfig::load(&p).unwrap()
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory outside /tmp (private per payload, so refused as a scratch parent).
    fn var_lib_dir(mode: u32) -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix("mupilot-test-check-")
            .tempdir_in("/var/lib")
            .unwrap();
        chmod(d.path(), mode);
        d
    }

    const MAP: &str = "\"/DC=org/CN=a\" nobody\n";

    #[test]
    fn glexec_without_grid_is_named_with_the_fix() {
        let dir = var_lib_dir(0o755);
        let scratch = dir.path().join("scratch");
        let on = "\n[glexec]\nenabled = true\nvos = [\"demo\"]";
        let c = config(dir.path(), MAP, on, &scratch);
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        let msg = p[0].to_string();
        assert!(
            msg.contains("key 'glexec.enabled'") && msg.contains("add a [grid] table"),
            "{msg}"
        );
        let off = "\n[glexec]\nenabled = false\nvos = [\"demo\"]";
        assert!(problems(&config(dir.path(), MAP, off, &scratch)).is_empty());
    }

    #[test]
    fn scratch_inside_the_state_dir_is_named_with_the_fix() {
        let dir = var_lib_dir(0o755);
        let c = config(dir.path(), MAP, "", &dir.path().join("state/scratch"));
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        let msg = p[0].to_string();
        assert!(
            msg.contains("switch.toml: key 'sandbox.scratch_root'"),
            "{msg}"
        );
        assert!(
            msg.contains("root-only") && msg.contains("chdir to scratch"),
            "{msg}"
        );
        assert!(msg.contains("e.g. /var/spool/mupilot"), "{msg}");
    }

    #[test]
    fn scratch_parents_must_be_searchable_and_root_writable_only() {
        let dir = tempfile::tempdir().unwrap();
        // Outside /tmp (private per payload), like a real scratch root; tempdirs are 0700.
        let parent = var_lib_dir(0o700);
        let root = parent.path().join("scratch");
        let c = config(dir.path(), MAP, "", &root);
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].what.contains("not searchable") && p[0].what.contains("mode 0700"),
            "{p:?}"
        );
        assert!(
            p[0].fix
                .contains(&format!("chmod o+x {}", parent.path().display())),
            "{p:?}"
        );

        chmod(parent.path(), 0o711);
        assert_eq!(problems(&c), vec![]);

        // Group-writable by a group other than root, or owned by an account: replaceable.
        std::fs::create_dir(&root).unwrap();
        chmod(&root, 0o771);
        std::os::unix::fs::chown(&root, Some(0), Some(4242)).unwrap();
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].what.contains("written by an account other than root"),
            "{p:?}"
        );
        chmod(&root, 0o711);
        std::os::unix::fs::chown(&root, Some(4242), Some(0)).unwrap();
        assert_eq!(problems(&c).len(), 1);
        std::os::unix::fs::chown(&root, Some(0), Some(0)).unwrap();
        assert_eq!(problems(&c), vec![]);

        // A symlink as the scratch root is refused (the helper would follow it as root).
        std::fs::remove_dir(&root).unwrap();
        std::os::unix::fs::symlink("/var/lib", &root).unwrap();
        let p = problems(&c);
        assert!(
            p.iter().any(|p| p.what.contains("is not a directory")),
            "{p:?}"
        );
    }

    #[test]
    fn audit_and_state_dirs_must_be_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = var_lib_dir(0o755);
        let c = config(dir.path(), MAP, "", &scratch.path().join("s"));
        assert_eq!(problems(&c), vec![]);
        chmod(&dir.path().join("log"), 0o755);
        chmod(&dir.path().join("state"), 0o750);
        let p = problems(&c);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            (p[0].key.as_str(), p[1].key.as_str()),
            ("audit_log", "state_dir")
        );
        assert!(
            p[0].what.contains("mode 0755") && p[0].fix.contains("chmod 0700"),
            "{p:?}"
        );
        std::fs::write(&c.audit_log, "").unwrap();
        chmod(&dir.path().join("log"), 0o700);
        chmod(&dir.path().join("state"), 0o700);
        chmod(&c.audit_log, 0o644);
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].fix.contains("chmod 0600"), "{p:?}");
    }

    #[test]
    fn pools_need_a_gridmapdir_with_existing_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = var_lib_dir(0o755);
        let s = scratch.path().join("s");
        let map = format!("{MAP}\"/DC=org/CN=p\" .nobod\n");
        let c = config(dir.path(), &map, "", &s);
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].what
                .contains("line 2 maps \"/DC=org/CN=p\" to pool '.nobod'"),
            "{p:?}"
        );
        assert!(p[0].what.contains("no authz.gridmapdir"), "{p:?}");

        let gmd = dir.path().join("gmd");
        std::fs::create_dir(&gmd).unwrap();
        std::fs::write(gmd.join("nobod777"), "").unwrap();
        // `nobody` exists on every host but is no account of pool `nobod` (prefix and digits
        // only, as leasing counts them): the pool is still empty.
        std::fs::write(gmd.join("nobody"), "").unwrap();
        let c = config(dir.path(), &map, "gridmapdir = \"gmd\"", &s);
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].what.contains(
                "holds 1 file(s) named nobod and digits (as leasing counts them) and none is an existing account"
            ),
            "{p:?}"
        );
        assert!(p[0].fix.contains("useradd nobod001"), "{p:?}");

        // A real account of the pool: no problem.
        let map = format!("{MAP}\"/DC=org/CN=p\" .mptchk\n");
        let _ = std::process::Command::new("userdel")
            .arg("mptchk001")
            .output();
        let st = std::process::Command::new("useradd")
            .args([
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "mptchk001",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "useradd mptchk001 (the test runs as root)");
        struct Gone;
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::process::Command::new("userdel")
                    .arg("mptchk001")
                    .status();
            }
        }
        let _gone = Gone;
        std::fs::write(gmd.join("mptchk001"), "").unwrap();
        let c = config(dir.path(), &map, "gridmapdir = \"gmd\"", &s);
        assert_eq!(problems(&c), vec![]);

        // The group map is checked the same way.
        std::fs::write(dir.path().join("groupmap"), "\"/demo\" .chkempty\n").unwrap();
        let c = config(
            dir.path(),
            &map,
            "gridmapdir = \"gmd\"\ngroupmap = \"groupmap\"",
            &s,
        );
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "authz.groupmap");
    }
}
