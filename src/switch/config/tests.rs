//! switch.toml: good files load, each bad key is named with its fix.

use super::*;

fn write_setup(dir: &Path, body: &str) -> PathBuf {
    let key = crate::protocol::VoSigningKey::generate();
    std::fs::write(dir.join("vo.pub"), key.verifying_key().to_pem()).unwrap();
    std::fs::write(dir.join("grid-mapfile"), "\"/DC=org/CN=a\" nobody\n").unwrap();
    let p = dir.join("switch.toml");
    std::fs::write(&p, body).unwrap();
    p
}

const GOOD: &str = r#"
allowed_pilots = ["root", 4242]
gridmap = "grid-mapfile"
audit_log = "log/audit.jsonl"
state_dir = "state"
[[vo]]
name = "demo"
public_key = "vo.pub"
[sandbox]
network = "none"
scratch_root = "/var/lib/mupilot-test-swd-unit/scratch"
"#;

#[test]
fn good_config_resolves_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_setup(dir.path(), GOOD);
    let c = SwitchConfig::load(&p).unwrap();
    assert_eq!(c.sandbox.warm_stages, 2);
    assert_eq!(c.gridmap, dir.path().join("grid-mapfile"));
    assert_eq!(c.allowed_uids(), [0, 4242].into_iter().collect());
    assert!(dir.path().join("log").is_dir());
    assert_eq!(
        c.sandbox.scratch_root,
        Path::new("/var/lib/mupilot-test-swd-unit/scratch")
    );
    let p = write_setup(
        dir.path(),
        &GOOD.replace("/var/lib/mupilot-test-swd-unit/scratch", "scratch"),
    );
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("key 'sandbox.scratch_root'"), "{e}");
    assert_eq!(c.sandbox.network, NetworkMode::None);
    assert_eq!(c.sandbox.ipc_fallback, IpcFallback::Pasta, "the default");
    for (text, want) in [
        ("loopback", IpcFallback::Loopback),
        ("refuse", IpcFallback::Refuse),
        ("pasta", IpcFallback::Pasta),
    ] {
        let p = write_setup(dir.path(), &format!("{GOOD}ipc_fallback = \"{text}\"\n"));
        let l = SwitchConfig::load(&p).unwrap();
        assert_eq!(l.sandbox.ipc_fallback, want);
    }
    let p = write_setup(
        dir.path(),
        &GOOD.replace("network = \"none\"", "network = \"pasta\""),
    );
    let l = SwitchConfig::load(&p).unwrap();
    assert_eq!(l.sandbox.network, NetworkMode::Pasta);
    assert_eq!(c.min_uid, 1000);
    assert!(c.vo("demo").is_some());
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(c.node_name, host);
    assert_eq!(c.max_envelope_validity_seconds, 3600);
}

#[test]
fn no_sandbox_table_means_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let body = GOOD.split("[sandbox]").next().unwrap();
    let c = SwitchConfig::load(&write_setup(dir.path(), body)).unwrap();
    assert_eq!(c.sandbox.scratch_root, Path::new(DEFAULT_SCRATCH_ROOT));
    assert_eq!(c.sandbox.tmp_size_bytes, 256 << 20);
    assert_eq!((c.sandbox.pids_max, c.sandbox.nofile), (4096, 4096));
    assert_eq!(c.sandbox.warm_stages, 2);
    assert!(c.sandbox.allow_user_namespaces);
}

#[test]
fn unknown_key_names_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_setup(dir.path(), &GOOD.replace("state_dir", "stat_dir"));
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("switch.toml: line 5"), "{e}");
    assert!(e.contains("stat_dir"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_setup(
        dir.path(),
        &GOOD.replace("\"root\"", "\"no-such-user-swd\""),
    );
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("key 'allowed_pilots[0]'") && e.contains("no-such-user-swd"),
        "{e}"
    );

    let p = write_setup(dir.path(), &GOOD.replace("vo.pub", "missing.pub"));
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("key 'vo[0].public_key'") && e.contains("missing.pub"),
        "{e}"
    );

    let p = write_setup(dir.path(), &format!("min_uid = 0\n{GOOD}"));
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("key 'min_uid'"), "{e}");

    let p = write_setup(dir.path(), &format!("{GOOD}warm_stages = 64\n"));
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("key 'sandbox.warm_stages'") && e.contains("64 is more than 16"),
        "{e}"
    );
    let p = write_setup(dir.path(), &format!("node_name = \"wn 1\"\n{GOOD}"));
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("key 'node_name'") && e.contains("'wn 1'"), "{e}");
    let p = write_setup(
        dir.path(),
        &format!("node_name = \"wn042.example.org\"\n{GOOD}"),
    );
    assert_eq!(
        SwitchConfig::load(&p).unwrap().node_name,
        "wn042.example.org"
    );
    let p = write_setup(
        dir.path(),
        &format!("max_envelope_validity_seconds = 100000\n{GOOD}"),
    );
    let e = SwitchConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("key 'max_envelope_validity_seconds'") && e.contains("100000"),
        "{e}"
    );

    let p = write_setup(dir.path(), &format!("{GOOD}warm_stages = 0\n"));
    assert_eq!(SwitchConfig::load(&p).unwrap().sandbox.warm_stages, 0);
}

#[cfg(feature = "grid")]
#[test]
fn grid_table_is_optional_and_its_paths_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let c = SwitchConfig::load(&write_setup(dir.path(), GOOD)).unwrap();
    assert!(c.grid.is_none(), "no [grid] table: no grid credentials");

    std::fs::create_dir_all(dir.path().join("certificates")).unwrap();
    std::fs::create_dir_all(dir.path().join("vomsdir")).unwrap();
    let body = format!("{GOOD}[grid]\ncert_dir = \"certificates\"\nvomsdir = \"vomsdir\"\n");
    let c = SwitchConfig::load(&write_setup(dir.path(), &body)).unwrap();
    let g = c.grid.expect("[grid] loaded");
    assert_eq!(g.cert_dir, dir.path().join("certificates"));
    assert_eq!(g.vomsdir, dir.path().join("vomsdir"));

    let body = format!("{GOOD}[grid]\ncert_dir = \"missing\"\nvomsdir = \"vomsdir\"\n");
    let e = SwitchConfig::load(&write_setup(dir.path(), &body))
        .unwrap_err()
        .to_string();
    assert!(e.contains("grid.cert_dir") && e.contains("missing"), "{e}");
}
