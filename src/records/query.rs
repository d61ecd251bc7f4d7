//! Queries over one log or a rotated set (oldest file first): who held an account at a
//! time, which records match filters, which payloads started and never ended.
//!
//! Fast by construction: lines are found by substring search (memchr's memmem) over large
//! read buffers before any JSON is parsed, and only the fields a query needs are parsed,
//! borrowed from the buffer. Read-only; results never depend on the chain being intact
//! (verification is a separate question).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};

pub use super::lost::lost_record;
use super::schema::{needle, Event};
use super::{parse_record_time, RecordError};

const CHUNK: usize = 16 << 20;

/// Calls `f` with every line of `paths` (in order) that contains one of `needles`, or with
/// every line when `needles` is empty. Lines are passed without their newline.
pub fn scan_lines(
    paths: &[PathBuf],
    needles: &[Vec<u8>],
    mut f: impl FnMut(&[u8]),
) -> Result<(), RecordError> {
    scan_from(paths, needles, CHUNK, Pos::default(), |_, l| f(l))
}

/// Where a line starts: index into the file list and byte offset in that file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    file: usize,
    offset: u64,
}

#[cfg(test)]
fn scan_chunked(
    paths: &[PathBuf],
    needles: &[Vec<u8>],
    chunk: usize,
    mut f: impl FnMut(&[u8]),
) -> Result<(), RecordError> {
    scan_from(paths, needles, chunk, Pos::default(), |_, l| f(l))
}

/// [`scan_lines`] starting at line position `from`, telling `f` where each line starts.
fn scan_from(
    paths: &[PathBuf],
    needles: &[Vec<u8>],
    chunk: usize,
    from: Pos,
    mut f: impl FnMut(Pos, &[u8]),
) -> Result<(), RecordError> {
    let finders: Vec<Finder> = needles.iter().map(Finder::new).collect();
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 4096);
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for (idx, path) in paths.iter().enumerate().skip(from.file) {
        let read_err = |source| RecordError::Read {
            path: path.clone(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let mut base = 0u64;
        if idx == from.file && from.offset > 0 {
            use std::io::{Seek, SeekFrom};
            base = file.seek(SeekFrom::Start(from.offset)).map_err(read_err)?;
        }
        buf.clear();
        let mut eof = false;
        while !eof {
            let old = buf.len();
            buf.resize(old + chunk, 0);
            let n = read_full(&mut file, &mut buf[old..]).map_err(read_err)?;
            buf.truncate(old + n);
            eof = n == 0;
            // Process whole lines only; keep the partial last line for the next read.
            let end = if eof {
                buf.len()
            } else {
                match memchr::memrchr(b'\n', &buf) {
                    Some(i) => i + 1,
                    None => continue,
                }
            };
            let region = &buf[..end];
            let at = |off: usize| Pos {
                file: idx,
                offset: base + off as u64,
            };
            if finders.is_empty() {
                let mut off = 0;
                for line in region.split(|&b| b == b'\n') {
                    if !line.is_empty() {
                        f(at(off), line);
                    }
                    off += line.len() + 1;
                }
            } else {
                hits.clear();
                for finder in &finders {
                    let mut pos = 0;
                    while let Some(i) = finder.find(&region[pos..]) {
                        let at = pos + i;
                        let start = memchr::memrchr(b'\n', &region[..at]).map_or(0, |j| j + 1);
                        let stop =
                            memchr::memchr(b'\n', &region[at..]).map_or(region.len(), |j| at + j);
                        hits.push((start, stop));
                        pos = stop;
                        if pos >= region.len() {
                            break;
                        }
                    }
                }
                if finders.len() > 1 {
                    hits.sort_unstable();
                    hits.dedup();
                }
                for &(s, e) in &hits {
                    f(at(s), &region[s..e]);
                }
            }
            buf.drain(..end);
            base += end as u64;
        }
    }
    Ok(())
}

fn read_full(file: &mut File, out: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < out.len() {
        match file.read(&mut out[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The needle that finds `"key":<json value>` in a compact JSON line.
fn field_needle(key: &str, value: &serde_json::Value) -> Vec<u8> {
    format!("\"{key}\":{value}").into_bytes()
}

/// The fields queries look at, borrowed from the line (owned only when a string has escapes).
/// Helper audit records and pilot trace records share these names.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RecordView<'a> {
    pub seq: Option<u64>,
    #[serde(borrow)]
    pub time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub host: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub pilot_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub pilot_dn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub batch_job_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub payload_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub owner_dn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub vo: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub fqans: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow)]
    pub account: Option<Cow<'a, str>>,
    pub uid: Option<u32>,
    #[serde(borrow)]
    pub start: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub end: Option<Cow<'a, str>>,
}

impl RecordView<'_> {
    fn event(&self) -> &str {
        self.event.as_deref().unwrap_or("")
    }
    fn time(&self) -> Option<DateTime<Utc>> {
        parse_record_time(self.time.as_deref()?)
    }
    fn is_end(&self) -> bool {
        Event::from_name(self.event()).is_some_and(Event::closes_payload)
    }
}

fn owned(c: &Option<Cow<'_, str>>) -> Option<String> {
    c.as_ref().map(|s| s.to_string())
}

/// Whose account: by uid or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Uid(u32),
    Account(String),
}

impl Subject {
    fn needle(&self) -> Vec<u8> {
        match self {
            Subject::Uid(u) => field_needle("uid", &(*u).into()),
            Subject::Account(a) => field_needle("account", &a.as_str().into()),
        }
    }
    fn matches(&self, v: &RecordView) -> bool {
        match self {
            Subject::Uid(u) => v.uid == Some(*u),
            Subject::Account(a) => v.account.as_deref() == Some(a.as_str()),
        }
    }
}

/// One payload's hold on an account: from its `start` record to its `end` (or `lost`) record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holding {
    pub payload_id: String,
    pub owner_dn: Option<String>,
    pub vo: Option<String>,
    pub fqans: Vec<String>,
    pub account: Option<String>,
    pub uid: Option<u32>,
    pub host: Option<String>,
    pub pilot_id: Option<String>,
    pub pilot_dn: Option<String>,
    pub batch_job_id: Option<String>,
    /// When the payload started (RFC 3339).
    pub start: String,
    /// When it ended; `None` while it runs (or if its end was never recorded).
    pub end: Option<String>,
    /// `end` or `lost`.
    pub end_event: Option<String>,
    #[serde(skip)]
    start_t: DateTime<Utc>,
    #[serde(skip)]
    end_t: Option<DateTime<Utc>>,
    /// Where its start record is, so a search for its end can begin there.
    #[serde(skip)]
    pos: Pos,
}

impl Holding {
    fn from_start(v: &RecordView, start_t: DateTime<Utc>) -> Option<Holding> {
        Some(Holding {
            payload_id: v.payload_id.as_deref()?.to_string(),
            owner_dn: owned(&v.owner_dn),
            vo: owned(&v.vo),
            fqans: v.fqans.iter().flatten().map(|s| s.to_string()).collect(),
            account: owned(&v.account),
            uid: v.uid,
            host: owned(&v.host),
            pilot_id: owned(&v.pilot_id),
            pilot_dn: owned(&v.pilot_dn),
            batch_job_id: owned(&v.batch_job_id),
            start: start_t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            end: None,
            end_event: None,
            start_t,
            end_t: None,
            pos: Pos::default(),
        })
    }

    fn close(&mut self, v: &RecordView) {
        let t = v
            .end
            .as_deref()
            .and_then(parse_record_time)
            .or_else(|| v.time());
        if let Some(t) = t {
            self.end_t = Some(t);
            self.end = Some(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            self.end_event = owned(&v.event);
        }
    }

    fn held_at(&self, at: DateTime<Utc>) -> bool {
        self.start_t <= at && self.end_t.is_none_or(|e| e >= at)
    }
}

fn start_time(v: &RecordView) -> Option<DateTime<Utc>> {
    v.start
        .as_deref()
        .and_then(parse_record_time)
        .or_else(|| v.time())
}

/// Starts in log order, with their matching ends.
#[derive(Default)]
struct Spans {
    spans: Vec<Holding>,
    open: HashMap<String, Vec<usize>>,
}

impl Spans {
    fn start(&mut self, v: &RecordView, pos: Pos) {
        if let Some(mut h) = start_time(v).and_then(|t| Holding::from_start(v, t)) {
            h.pos = pos;
            self.open
                .entry(h.payload_id.clone())
                .or_default()
                .push(self.spans.len());
            self.spans.push(h);
        }
    }
    fn end(&mut self, v: &RecordView) {
        let Some(id) = v.payload_id.as_deref() else {
            return;
        };
        if let Some(idxs) = self.open.get_mut(id) {
            if let Some(i) = idxs.pop() {
                self.spans[i].close(v);
            }
            if idxs.is_empty() {
                self.open.remove(id);
            }
        }
    }
}

/// Who held the account `subject` at `at`: every payload whose start is at or before `at`
/// and whose end is at or after it (or not recorded). Empty when nobody did.
pub fn who(
    paths: &[PathBuf],
    subject: &Subject,
    at: DateTime<Utc>,
) -> Result<Vec<Holding>, RecordError> {
    let mut spans = Spans::default();
    // Pass 1: every record naming the account (start and end records both carry it).
    scan_from(
        paths,
        &[subject.needle()],
        CHUNK,
        Pos::default(),
        |pos, line| {
            let Ok(v) = serde_json::from_slice::<RecordView>(line) else {
                return;
            };
            if !subject.matches(&v) {
                return;
            }
            if v.event() == Event::Start.name() {
                spans.start(&v, pos);
            } else if v.is_end() {
                spans.end(&v);
            }
        },
    )?;
    // Pass 2, only if needed: ends that do not repeat the account (found by payload id),
    // searched from the earliest such start on (usually near the end of the log).
    let mut from: Option<Pos> = None;
    let mut unresolved: Vec<Vec<u8>> = Vec::new();
    for (id, idxs) in &spans.open {
        let early: Vec<Pos> = idxs
            .iter()
            .filter(|&&i| spans.spans[i].start_t <= at)
            .map(|&i| spans.spans[i].pos)
            .collect();
        if let Some(p) = early.into_iter().min() {
            from = Some(from.map_or(p, |f| f.min(p)));
            unresolved.push(field_needle("payload_id", &id.as_str().into()));
        }
    }
    if let Some(from) = from {
        let mut late = Spans::default();
        std::mem::swap(&mut late, &mut spans);
        scan_from(paths, &unresolved, CHUNK, from, |_, line| {
            let Ok(v) = serde_json::from_slice::<RecordView>(line) else {
                return;
            };
            if v.is_end() && !subject.matches(&v) {
                late.end(&v);
            }
        })?;
        spans = late;
    }
    Ok(spans.spans.into_iter().filter(|h| h.held_at(at)).collect())
}

/// What `list` selects. Every set field must match; times compare with the record's `time`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub owner_dn: Option<String>,
    pub payload_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// The records (raw lines, in log order) that match `filter`. With `owner_dn`, records of
/// that owner's payloads that do not repeat the DN (e.g. a `kill` or `signal`) are included.
pub fn list_lines(paths: &[PathBuf], filter: &Filter) -> Result<Vec<String>, RecordError> {
    let mut needles = Vec::new();
    if let Some(id) = &filter.payload_id {
        needles.push(field_needle("payload_id", &id.as_str().into()));
    } else if let Some(dn) = &filter.owner_dn {
        needles.push(field_needle("owner_dn", &dn.as_str().into()));
        for ev in [Event::End, Event::Lost, Event::Kill, Event::Signal] {
            needles.push(field_needle("event", &ev.name().into()));
        }
    }
    let mut owner_payloads: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let owner_needle = needles
        .first()
        .cloned()
        .filter(|_| filter.payload_id.is_none());
    scan_lines(paths, &needles, |line| {
        // Cheap rejection of the many end/kill lines of other owners before parsing.
        if let Some(n) = &owner_needle {
            if memchr::memmem::find(line, n).is_none() {
                if memchr::memmem::find(line, needle::OWNER_DN).is_some() {
                    return;
                }
                match raw_str_field(line, needle::PAYLOAD_ID_STR) {
                    Some(id) if !owner_payloads.contains(id) => return,
                    _ => {}
                }
            }
        }
        let Ok(v) = serde_json::from_slice::<RecordView>(line) else {
            return;
        };
        if let Some(id) = &filter.payload_id {
            if v.payload_id.as_deref() != Some(id.as_str()) {
                return;
            }
        }
        if let Some(dn) = &filter.owner_dn {
            let pid = v.payload_id.as_deref();
            match v.owner_dn.as_deref() {
                Some(d) if d == dn => {
                    if let Some(p) = pid {
                        owner_payloads.insert(p.to_string());
                    }
                }
                Some(_) => return,
                None if pid.is_some_and(|p| owner_payloads.contains(p)) => {}
                None => return,
            }
        }
        if filter.since.is_some() || filter.until.is_some() {
            let Some(t) = v.time() else { return };
            if filter.since.is_some_and(|s| t < s) || filter.until.is_some_and(|u| t > u) {
                return;
            }
        }
        out.push(String::from_utf8_lossy(line).into_owned());
    })?;
    Ok(out)
}

/// The records that match `filter`, parsed.
pub fn list(paths: &[PathBuf], filter: &Filter) -> Result<Vec<serde_json::Value>, RecordError> {
    Ok(list_lines(paths, filter)?
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// `start` records with no later `end` or `lost` record of the same payload id: the payloads
/// a crashed helper (or pilot) left without an end. Used at startup to write `lost` records.
pub fn open_starts(paths: &[PathBuf]) -> Result<Vec<serde_json::Value>, RecordError> {
    let needles: Vec<Vec<u8>> = [Event::Start, Event::End, Event::Lost]
        .iter()
        .map(|e| field_needle("event", &e.name().into()))
        .collect();
    // Only positions are kept while scanning (half the log are starts); the few open ones
    // are read back at the end.
    let mut open: Vec<Option<Pos>> = Vec::new();
    let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
    scan_from(paths, &needles, CHUNK, Pos::default(), |pos, line| {
        let Some((is_start, id)) = event_and_id(line) else {
            return;
        };
        if is_start {
            by_id.entry(id.into_owned()).or_default().push(open.len());
            open.push(Some(pos));
        } else if let Some(i) = by_id.get_mut(id.as_ref()).and_then(|v| v.pop()) {
            open[i] = None;
        }
    })?;
    open.into_iter()
        .flatten()
        .map(|pos| read_line_at(paths, pos))
        .filter_map(|r| match r {
            Ok(l) => serde_json::from_slice(&l).ok().map(Ok),
            Err(e) => Some(Err(e)),
        })
        .collect()
}

/// Whether a line is a start (else an end or lost) and its payload id, found without a full
/// parse: in a compact JSON line written by the chain writer, `"key":"` with unescaped
/// quotes can only be a key, never the inside of a string value.
fn event_and_id(line: &[u8]) -> Option<(bool, Cow<'_, str>)> {
    let has = |n: &[u8]| memchr::memmem::find(line, n).is_some();
    let is_start = has(needle::START);
    if !is_start && !has(needle::END) && !has(needle::LOST) {
        return None;
    }
    if let Some(id) = raw_str_field(line, needle::PAYLOAD_ID_STR) {
        return Some((is_start, Cow::Borrowed(id)));
    }
    // Escapes in the id, or no id where expected: parse properly.
    let v: RecordView = serde_json::from_slice(line).ok()?;
    let id = v.payload_id?.into_owned();
    match v.event.as_deref().and_then(Event::from_name) {
        Some(Event::Start) => Some((true, Cow::Owned(id))),
        Some(e) if e.closes_payload() => Some((false, Cow::Owned(id))),
        _ => None,
    }
}

/// The value of the string field whose `"key":"` is `key`, when it has no escapes (ids never
/// do); `None` when absent or escaped (callers then parse the line).
fn raw_str_field<'a>(line: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let k = memchr::memmem::find(line, key)?;
    let rest = &line[k + key.len()..];
    let e = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[e] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..e]).ok()
}

/// Reads the line that starts at `pos`.
fn read_line_at(paths: &[PathBuf], pos: Pos) -> Result<Vec<u8>, RecordError> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    let path = &paths[pos.file];
    let read_err = |source| RecordError::Read {
        path: path.clone(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    f.seek(SeekFrom::Start(pos.offset)).map_err(read_err)?;
    let mut line = Vec::new();
    BufReader::new(f)
        .read_until(b'\n', &mut line)
        .map_err(read_err)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}

/// The files of a log given on a command line: with `all`, every file of the rotated chain of
/// `log` oldest first (see [`super::rotate::chain_files`]); otherwise just `log`.
pub fn log_files(log: &Path, all: bool) -> Result<Vec<PathBuf>, RecordError> {
    if all {
        super::rotate::chain_files(log)
    } else {
        Ok(vec![log.to_path_buf()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines cut by read-buffer boundaries are still found whole, at every buffer size.
    #[test]
    fn scan_finds_whole_lines_across_buffer_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let lines: Vec<String> = (0..40)
            .map(|i| format!("{{\"uid\":{},\"n\":\"{}\"}}", 51000 + i % 3, "x".repeat(i)))
            .collect();
        // The last line has no newline (a torn tail): it is still passed on.
        std::fs::write(&p, lines.join("\n")).unwrap();
        let files = vec![p];
        let want_all: Vec<&str> = lines.iter().map(String::as_str).collect();
        let want_hits: Vec<&str> = want_all
            .iter()
            .copied()
            .filter(|l| l.contains("\"uid\":51001") || l.contains("\"n\":\"xxxxx\""))
            .collect();
        let needles = vec![b"\"uid\":51001".to_vec(), b"\"n\":\"xxxxx\"".to_vec()];
        for chunk in [1usize, 2, 7, 13, 64, 1000, CHUNK] {
            let mut all = Vec::new();
            scan_chunked(&files, &[], chunk, |l| {
                all.push(String::from_utf8(l.to_vec()).unwrap())
            })
            .unwrap();
            assert_eq!(all, want_all, "chunk {chunk}");
            let mut hits = Vec::new();
            scan_chunked(&files, &needles, chunk, |l| {
                hits.push(String::from_utf8(l.to_vec()).unwrap())
            })
            .unwrap();
            assert_eq!(hits, want_hits, "chunk {chunk}");
        }
    }

    #[test]
    fn event_and_id_without_a_full_parse() {
        let f = |l: &str| event_and_id(l.as_bytes()).map(|(s, id)| (s, id.into_owned()));
        assert_eq!(
            f(r#"{"seq":1,"event":"start","payload_id":"p-1","reason":"x"}"#),
            Some((true, "p-1".into()))
        );
        assert_eq!(
            f(r#"{"seq":2,"payload_id":"p-1","event":"lost"}"#),
            Some((false, "p-1".into()))
        );
        // An escaped id falls back to a real parse.
        assert_eq!(
            f(r#"{"event":"end","payload_id":"p\"2"}"#),
            Some((false, "p\"2".into()))
        );
        // Text inside a string value is never taken for a key.
        assert_eq!(
            f(r#"{"event":"denied","reason":"\"event\":\"start\""}"#),
            None
        );
        assert_eq!(f(r#"{"event":"signal","payload_id":"p"}"#), None);
    }
}
