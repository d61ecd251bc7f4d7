//! LCMAPS itself, for the lease-compatibility tests: a test CA made with the openssl CLI, a VOMS
//! server certificate and vomsdir, proxies with VOMS ACs made by `voms-proxy-fake`, an lcmaps.db
//! (verify-proxy, then VOMS local group + VOMS pool account, or the DN pool account), and a
//! mapper calling `lcmaps_return_account_from_pem` through Python ctypes. Real pool accounts and
//! their unix groups are made with groupadd/useradd and removed when [`PoolAccounts`] drops.
//! Needs Debian's liblcmaps0, lcmaps-plugins-verify-proxy, lcmaps-plugins-voms,
//! lcmaps-plugins-basic-poolaccount, voms-clients, openssl and python3 (scripts/test.sh installs
//! them). Fails, never skips, when one is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The test CA's and every owner's DN prefix.
pub const DN_BASE: &str = "/DC=org/DC=mupilot-demo";
const VOMS_DN: &str = "/DC=org/DC=mupilot-demo/CN=voms.mupilot-demo.org";
const CA_DN: &str = "/DC=org/DC=mupilot-demo/CN=mupilot LCMAPS test CA";

/// The Debian packages the tests need; named in the failure when one is missing.
const NEEDED: [&str; 7] = [
    "liblcmaps0",
    "lcmaps-plugins-verify-proxy",
    "lcmaps-plugins-voms",
    "lcmaps-plugins-basic-poolaccount",
    "voms-clients",
    "openssl",
    "python3",
];

/// Calls lcmaps_return_account_from_pem on the PEM file argv[1] and prints the mapped account
/// and the lease (poolindex), or exits 1. liblcmaps.so.0 is loaded RTLD_GLOBAL first: the
/// plugins it dlopens resolve their symbols (lcmaps_cntArgs, ...) against it.
const MAPPER: &str = r#"import ctypes, pwd, sys
class Account(ctypes.Structure):
    _fields_ = [("uid", ctypes.c_uint), ("pgid_list", ctypes.POINTER(ctypes.c_uint)),
                ("npgid", ctypes.c_int), ("sgid_list", ctypes.POINTER(ctypes.c_uint)),
                ("nsgid", ctypes.c_int), ("poolindex", ctypes.c_char_p)]
ctypes.CDLL("liblcmaps.so.0", mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL("liblcmaps_return_account_from_pem.so.0")
pem = open(sys.argv[1], "rb").read()
acct = Account()
if lib.lcmaps_account_info_init(ctypes.byref(acct)) != 0:
    sys.exit("lcmaps_account_info_init failed")
rc = lib.lcmaps_return_account_from_pem(ctypes.c_char_p(pem), -1, ctypes.byref(acct))
if rc != 0:
    sys.exit("lcmaps_return_account_from_pem returned %d" % rc)
print(pwd.getpwuid(acct.uid).pw_name)
print(acct.poolindex.decode())
"#;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pool accounts (`<prefix>01`, ...) whose primary group is `group`, removed on drop.
pub struct PoolAccounts {
    pub names: Vec<String>,
    group: String,
}

impl PoolAccounts {
    pub fn create(prefix: &str, group: &str, n: usize) -> PoolAccounts {
        let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i:02}")).collect();
        for a in &names {
            let _ = Command::new("userdel")
                .arg(a)
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("groupdel")
            .arg(group)
            .stderr(Stdio::null())
            .status();
        run(Command::new("groupadd").arg(group));
        let accounts = PoolAccounts {
            names: names.clone(),
            group: group.to_string(),
        };
        for a in &names {
            run(Command::new("useradd")
                .args(["--no-create-home", "--home-dir", "/nonexistent"])
                .args(["--shell", "/usr/sbin/nologin", "--gid", group, a]));
        }
        accounts
    }
}

impl Drop for PoolAccounts {
    fn drop(&mut self) {
        for a in &self.names {
            let _ = Command::new("userdel").arg(a).status();
        }
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

/// A CA, a VOMS server for VO `demo`, a gridmapdir and an lcmaps.db in a temporary directory.
pub struct Lcmaps {
    dir: tempfile::TempDir,
}

impl Lcmaps {
    /// `voms_map`: FQAN -> pool lines for voms_poolaccount; `group_map`: FQAN -> unix group
    /// lines for voms_localgroup; `dn_map`: DN -> pool lines for poolaccount.
    pub fn new(voms_map: &str, group_map: &str, dn_map: &str) -> Lcmaps {
        for package in NEEDED {
            let st = Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", package])
                .output()
                .expect("dpkg-query runs");
            assert!(
                st.stdout == b"installed",
                "package {package} is not installed: apt-get install {package} (scripts/test.sh installs it)"
            );
        }
        let l = Lcmaps {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["certs", "vomsdir/demo", "gridmapdir", "users"] {
            std::fs::create_dir_all(l.path(d)).unwrap();
        }
        l.ca();
        l.issue("voms", VOMS_DN);
        std::fs::write(
            l.path("vomsdir/demo/voms.mupilot-demo.org.lsc"),
            format!("{VOMS_DN}\n{CA_DN}\n"),
        )
        .unwrap();
        std::fs::write(l.path("voms-mapfile"), voms_map).unwrap();
        std::fs::write(l.path("groupmapfile"), group_map).unwrap();
        std::fs::write(l.path("grid-mapfile"), dn_map).unwrap();
        std::fs::write(l.path("mapper.py"), MAPPER).unwrap();
        let p = |n: &str| l.path(n).display().to_string();
        // As lcmaps.db.ex ships it, plus -do_not_use_secondary_gids: the lease carries the
        // primary group only (docs/site-admin.md, "Sharing a gridmapdir with LCMAPS").
        let db = format!(
            r#"path = /usr/lib/lcmaps
verifyproxy = "lcmaps_verify_proxy.mod"
              "-certdir {certs}"
vomslocalgroup = "lcmaps_voms_localgroup.mod"
                 "-groupmapfile {groupmap}"
                 "-mapmin 0"
vomspoolaccount = "lcmaps_voms_poolaccount.mod"
                  "-gridmapfile {vomsmap}"
                  "-gridmapdir {gridmapdir}"
                  "-do_not_use_secondary_gids"
poolaccount = "lcmaps_poolaccount.mod"
              "-gridmapfile {dnmap}"
              "-gridmapdir {gridmapdir}"

voms:
verifyproxy -> vomslocalgroup
vomslocalgroup -> vomspoolaccount

dn:
verifyproxy -> poolaccount
"#,
            certs = p("certs"),
            groupmap = p("groupmapfile"),
            vomsmap = p("voms-mapfile"),
            dnmap = p("grid-mapfile"),
            gridmapdir = p("gridmapdir"),
        );
        std::fs::write(l.path("lcmaps.db"), db).unwrap();
        l
    }

    /// LCMAPS's default lcmaps.db: `voms_poolaccount` without `-do_not_use_secondary_gids`, so
    /// the lease carries the primary and then the secondary groups voms_localgroup mapped.
    pub fn with_secondary_gids(self) -> Lcmaps {
        let db = std::fs::read_to_string(self.path("lcmaps.db")).unwrap();
        let db = db.replace("                  \"-do_not_use_secondary_gids\"\n", "");
        assert!(!db.contains("secondary"), "{db}");
        std::fs::write(self.path("lcmaps.db"), db).unwrap();
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn gridmapdir(&self) -> PathBuf {
        self.path("gridmapdir")
    }

    /// Adds one empty file per account to the gridmapdir.
    pub fn add_pool(&self, accounts: &PoolAccounts) {
        for a in &accounts.names {
            std::fs::write(self.gridmapdir().join(a), b"").unwrap();
        }
    }

    fn ca(&self) {
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .arg("-keyout")
            .arg(self.path("ca.key"))
            .arg("-out")
            .arg(self.path("ca.pem"))
            .args(["-subj", CA_DN])
            .args(["-addext", "basicConstraints=critical,CA:true"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
        let hash = run(Command::new("openssl")
            .args(["x509", "-hash", "-noout", "-in"])
            .arg(self.path("ca.pem")));
        let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
        std::fs::copy(
            self.path("ca.pem"),
            self.path("certs").join(format!("{hash}.0")),
        )
        .unwrap();
        std::fs::write(
            self.path("ext.cnf"),
            "[ee]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        )
        .unwrap();
    }

    /// An end-entity certificate `<name>.pem` with key `<name>.key` (0600), signed by the CA.
    fn issue(&self, name: &str, dn: &str) {
        let key = self.path(&format!("{name}.key"));
        let csr = self.path(&format!("{name}.csr"));
        run(Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args(["-utf8", "-subj", dn]));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(self.path("ca.pem"))
            .arg("-CAkey")
            .arg(self.path("ca.key"))
            .arg("-out")
            .arg(self.path(&format!("{name}.pem")))
            .arg("-extfile")
            .arg(self.path("ext.cnf"))
            .args(["-extensions", "ee"]));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A proxy of `<DN_BASE>/CN=<cn>` with a VOMS AC of VO `demo` holding `fqans` in order.
    pub fn proxy(&self, cn: &str, fqans: &[&str]) -> PathBuf {
        let name = format!("users/{cn}");
        self.issue(&name, &format!("{DN_BASE}/CN={cn}"));
        let out = self.path(&format!("users/{cn}.proxy"));
        let mut cmd = Command::new("voms-proxy-fake");
        cmd.env("X509_CERT_DIR", self.path("certs"))
            .arg("-cert")
            .arg(self.path(&format!("{name}.pem")))
            .arg("-key")
            .arg(self.path(&format!("{name}.key")))
            .arg("-hostcert")
            .arg(self.path("voms.pem"))
            .arg("-hostkey")
            .arg(self.path("voms.key"))
            .args(["-voms", "demo", "-uri", "voms.mupilot-demo.org:15000"])
            .args(["-bits", "1024", "-rfc", "-out"])
            .arg(&out);
        for f in fqans {
            cmd.args(["-fqan", f]);
        }
        run(&mut cmd);
        out
    }

    /// Maps `proxy` through LCMAPS with the lcmaps.db policy `policy` ("voms" or "dn"): the
    /// account and the lease name (poolindex), or LCMAPS's log when it refused.
    pub fn map(&self, policy: &str, proxy: &Path) -> Result<(String, String), String> {
        let log = self.path("lcmaps.log");
        let _ = std::fs::remove_file(&log);
        let out = Command::new("python3")
            .arg(self.path("mapper.py"))
            .arg(proxy)
            .env("LCMAPS_DB_FILE", self.path("lcmaps.db"))
            .env("LCMAPS_POLICY_NAME", policy)
            .env("LCMAPS_LOG_FILE", &log)
            .env("LCMAPS_DEBUG_LEVEL", "5")
            .env("X509_CERT_DIR", self.path("certs"))
            .env("X509_VOMS_DIR", self.path("vomsdir"))
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs");
        if !out.status.success() {
            return Err(format!(
                "{}\n--- lcmaps.log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let account = lines.next().unwrap_or_default().to_string();
        let lease = lines.next().unwrap_or_default().to_string();
        Ok((account, lease))
    }
}
