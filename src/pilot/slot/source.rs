//! What one source (a batch system, machine/job features, a cgroup, the host, overrides)
//! said about the slot, and the helper every source uses to record a malformed value.
//! No source logic lives here.

use serde_json::{Map, Value};

/// The values one source gave. Fields a source does not know stay None.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Finding {
    /// Source name as shown in `sources` and `chosen` ("slurm", "cgroup", "host", …).
    pub name: &'static str,
    /// True for batch systems: they also name the batch system and the job id.
    pub batch: bool,
    /// The batch job id.
    pub job_id: Option<String>,
    /// Cores this source grants this node.
    pub cores: Option<u32>,
    /// Memory in bytes this source grants.
    pub memory_bytes: Option<u64>,
    /// Unix time this source ends the slot.
    pub deadline_unix: Option<i64>,
    /// Extra facts worth showing (raw limits, which variable or file gave a value).
    pub detail: Map<String, Value>,
}

impl Finding {
    /// An empty finding for `name`.
    pub fn new(name: &'static str, batch: bool) -> Finding {
        Finding {
            name,
            batch,
            ..Finding::default()
        }
    }

    /// Lowers the cores to `v` (a source with two bounds keeps the tighter one).
    pub fn lower_cores(&mut self, v: u32) {
        self.cores = Some(self.cores.map_or(v, |c| c.min(v)));
    }

    /// Lowers the memory to `v`.
    pub fn lower_memory(&mut self, v: u64) {
        self.memory_bytes = Some(self.memory_bytes.map_or(v, |c| c.min(v)));
    }

    /// Brings the deadline forward to `v`.
    pub fn lower_deadline(&mut self, v: i64) {
        self.deadline_unix = Some(self.deadline_unix.map_or(v, |c| c.min(v)));
    }

    /// Records an extra fact.
    pub fn note(&mut self, key: &str, value: impl Into<Value>) {
        self.detail.insert(key.to_string(), value.into());
    }

    /// True when the source gave nothing usable (such findings are left out of the report).
    pub fn is_empty(&self) -> bool {
        self.job_id.is_none()
            && self.cores.is_none()
            && self.memory_bytes.is_none()
            && self.deadline_unix.is_none()
            && self.detail.is_empty()
    }

    /// The object shown under `sources.<name>`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(id) = &self.job_id {
            m.insert("job_id".into(), id.clone().into());
        }
        if let Some(c) = self.cores {
            m.insert("cores".into(), c.into());
        }
        if let Some(b) = self.memory_bytes {
            m.insert("memory_bytes".into(), b.into());
        }
        if let Some(d) = self.deadline_unix {
            m.insert("deadline_unix".into(), d.into());
        }
        for (k, v) in &self.detail {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// The list of ignored malformed values; every entry names source, variable or file, value.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records that `what` (a variable, file or command field) of `source` held `value`,
    /// which `why` (e.g. "is not a whole number"), so it was ignored.
    pub fn bad(&mut self, source: &str, what: &str, value: &str, why: &str) {
        let mut v: String = value.trim().chars().take(120).collect();
        if value.trim().chars().count() > 120 {
            v.push('…');
        }
        self.0
            .push(format!("{source}: {what} = {v:?} {why}; ignored"));
    }

    /// Records a failure that has no single value (a command that failed, an unreadable file).
    pub fn say(&mut self, source: &str, text: impl AsRef<str>) {
        self.0.push(format!("{source}: {}", text.as_ref()));
    }

    /// Parses every variable of `vars` that is set with `f`, records each malformed one (a
    /// fallback variable that is not needed is still checked: an ignored value is always
    /// reported), and returns the first good value with its variable's name.
    pub fn first_of<T>(
        &mut self,
        env: &super::env::Env,
        source: &str,
        vars: &[&'static str],
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Option<(&'static str, T)> {
        let mut first = None;
        for var in vars {
            if let Some(v) = env.var(var) {
                if let Some(t) = self.parse(source, var, v, &f) {
                    first = first.or(Some((*var, t)));
                }
            }
        }
        first
    }

    /// Parses `value` with `f`; on error records it and returns None.
    pub fn parse<T>(
        &mut self,
        source: &str,
        what: &str,
        value: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match f(value) {
            Ok(v) => Some(v),
            Err(why) => {
                self.bad(source, what, value, &why);
                None
            }
        }
    }
}
