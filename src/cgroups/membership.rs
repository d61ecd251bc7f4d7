//! A process's cgroups as `/proc/PID/cgroup` lists them: one [`Membership`] per hierarchy.
//!
//! Pure parsing; reads no file. Shared by the helper (where a pilot's payloads go) and the
//! pilot's slot discovery (which limits bind it).

/// One line of `/proc/PID/cgroup`: `hierarchy-id:controller-list:path`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// The v1 hierarchy's controllers (`cpu,cpuacct` gives two; `name=systemd` one); empty
    /// for the unified (v2) hierarchy's `0::/path`.
    pub controllers: Vec<String>,
    /// The cgroup's path relative to the hierarchy's root, as the kernel prints it.
    pub path: String,
}

impl Membership {
    /// Parses one line; `None` when it is not `id:controllers:/path`.
    pub fn parse(line: &str) -> Option<Membership> {
        let mut parts = line.splitn(3, ':');
        let (_id, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        if !path.starts_with('/') {
            return None;
        }
        Some(Membership {
            controllers: list
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
            path: path.to_owned(),
        })
    }

    /// The unified hierarchy's line (`0::/path`).
    pub fn is_unified(&self) -> bool {
        self.controllers.is_empty()
    }

    /// Whether this hierarchy holds `controller`.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The controller list as the kernel printed it (`cpu,cpuacct`).
    pub fn list(&self) -> String {
        self.controllers.join(",")
    }
}

/// Every line of a `/proc/PID/cgroup` text: the memberships, and the lines that are not one
/// (blank lines are neither).
pub fn parse_all(text: &str) -> (Vec<Membership>, Vec<&str>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match Membership::parse(line) {
            Some(m) => ok.push(m),
            None => bad.push(line),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_v2_and_bad_lines() {
        let (ok, bad) =
            parse_all("2:cpu,cpuacct:/job\n1:name=systemd:/\n\n0::/a b\ngarbage\n3:x:rel\n");
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(ok[0].list(), "cpu,cpuacct");
        assert!(ok[0].has("cpuacct") && !ok[0].is_unified());
        assert_eq!(ok[1].controllers, ["name=systemd"]);
        assert!(ok[2].is_unified());
        assert_eq!(ok[2].path, "/a b");
        assert_eq!(bad, ["garbage", "3:x:rel"]);
    }
}
