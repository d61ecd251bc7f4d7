//! The server's Prometheus metrics and the plain-HTTP listener that serves them
//! (server.toml `metrics_listen`, off when absent). Holds counters and histograms the API
//! handlers update, and computes the queue gauges from the store at scrape time. Encoded by
//! `prometheus-client` (OpenMetrics text); never hand-formatted. Serves `/metrics` only: no
//! payload, DN or pilot id ever appears in a metric, so the listener needs no client
//! certificate (see docs/vo-operator.md "Metrics").

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::store::Store;
use crate::protocol::api::PayloadState;

/// A pilot counts as seen this long after its last match request.
pub const PILOTS_SEEN_WINDOW: Duration = Duration::from_secs(600);
/// At most this many pilot ids are remembered for `pilots_seen` (64 bytes each); a pilot
/// certificate inventing ids cannot make the server grow without bound.
const PILOTS_SEEN_MAX: usize = 100_000;

/// Every payload state, so a state with no payload is exported as 0 instead of vanishing.
const STATES: [PayloadState; 8] = [
    PayloadState::Queued,
    PayloadState::Matched,
    PayloadState::Running,
    PayloadState::Done,
    PayloadState::Failed,
    PayloadState::Denied,
    PayloadState::Cancelled,
    PayloadState::Lost,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VoState {
    vo: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vo {
    vo: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

/// How a match request ended.
#[derive(Clone, Copy, Debug)]
pub enum MatchResult {
    Work,
    NoWork,
    Error,
}

/// The server's metrics. Cheap to update from handlers (atomics); the registry is only
/// walked at scrape time.
pub struct Metrics {
    registry: Registry,
    payloads: Family<VoState, Gauge>,
    matches: Family<Vo, Counter>,
    match_requests: Family<Outcome, Counter>,
    submits: Family<Outcome, Counter>,
    submit_seconds: Histogram,
    match_seconds: Histogram,
    pilots_seen_gauge: Gauge,
    gate_refusals: Family<Outcome, Counter>,
    /// pilot id -> last match request.
    pilots_seen: Mutex<HashMap<String, Instant>>,
    /// One scrape at a time: the payload gauges are cleared and refilled per scrape.
    scrape: Mutex<()>,
}

/// 1 ms .. ~16 s in 15 doubling steps: a match is a few ms of SQLite and signing, a submit
/// with a large bundle writes it to disk first.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mupilot_server");
        let payloads = Family::<VoState, Gauge>::default();
        registry.register(
            "payloads",
            "Payloads by VO and state (queue depth is state=\"queued\")",
            payloads.clone(),
        );
        let matches = Family::<Vo, Counter>::default();
        registry.register(
            "matches",
            "Payloads handed to a pilot (rate() of it is matches per second)",
            matches.clone(),
        );
        let match_requests = Family::<Outcome, Counter>::default();
        registry.register(
            "match_requests",
            "Match requests by result (work, none, error)",
            match_requests.clone(),
        );
        let submits = Family::<Outcome, Counter>::default();
        registry.register(
            "submits",
            "Submissions by result (accepted, refused)",
            submits.clone(),
        );
        let submit_seconds = Histogram::new(latency_buckets());
        registry.register(
            "submit_duration_seconds",
            "Time to answer a submission",
            submit_seconds.clone(),
        );
        let match_seconds = Histogram::new(latency_buckets());
        registry.register(
            "match_duration_seconds",
            "Time to answer a match request",
            match_seconds.clone(),
        );
        let pilots_seen_gauge = Gauge::default();
        registry.register(
            "pilots_seen",
            "Distinct pilot ids that asked for work in the last 10 minutes or hold a matched or running payload",
            pilots_seen_gauge.clone(),
        );
        let gate_refusals = Family::<Outcome, Counter>::default();
        registry.register(
            "gate_refusals",
            "Requests refused before their handler (rate_limited, unavailable: the request log cannot be written, not_authorized, bad_request)",
            gate_refusals.clone(),
        );
        Metrics {
            gate_refusals,
            registry,
            payloads,
            matches,
            match_requests,
            submits,
            submit_seconds,
            match_seconds,
            pilots_seen_gauge,
            pilots_seen: Mutex::new(HashMap::new()),
            scrape: Mutex::new(()),
        }
    }

    /// The portal gate refused a request with `status` (429, 503, 403, 400).
    pub fn gate_refused(&self, status: u16) {
        let result = match status {
            429 => "rate_limited",
            503 => "unavailable",
            403 => "not_authorized",
            _ => "bad_request",
        };
        self.gate_refusals.get_or_create(&Outcome { result }).inc();
    }

    /// A submission was answered after `elapsed`.
    pub fn submitted(&self, accepted: bool, elapsed: Duration) {
        let result = if accepted { "accepted" } else { "refused" };
        self.submits.get_or_create(&Outcome { result }).inc();
        self.submit_seconds.observe(elapsed.as_secs_f64());
    }

    /// A match request from `pilot_id` (None when it was malformed) was answered after
    /// `elapsed`; `vo` is the matched payload's VO when work was handed out.
    pub fn matched(
        &self,
        pilot_id: Option<&str>,
        vo: Option<&str>,
        result: MatchResult,
        elapsed: Duration,
    ) {
        let result_label = match result {
            MatchResult::Work => "work",
            MatchResult::NoWork => "none",
            MatchResult::Error => "error",
        };
        self.match_requests
            .get_or_create(&Outcome {
                result: result_label,
            })
            .inc();
        self.match_seconds.observe(elapsed.as_secs_f64());
        if let Some(vo) = vo {
            self.matches.get_or_create(&Vo { vo: vo.to_string() }).inc();
        }
        if let Some(id) = pilot_id {
            self.saw_pilot(id, Instant::now());
        }
    }

    fn saw_pilot(&self, pilot_id: &str, now: Instant) {
        let mut seen = self.pilots_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = seen.get_mut(pilot_id) {
            *t = now;
            return;
        }
        if seen.len() >= PILOTS_SEEN_MAX {
            seen.retain(|_, t| now.duration_since(*t) < PILOTS_SEEN_WINDOW);
            if seen.len() >= PILOTS_SEEN_MAX {
                return;
            }
        }
        seen.insert(pilot_id.to_string(), now);
    }

    /// The metrics in the OpenMetrics text format, the gauges read from `store` now.
    pub fn scrape(&self, store: &Store) -> Result<String, String> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let counts = store.count_by_state().map_err(|e| e.to_string())?;
        let busy = store.busy_pilots().map_err(|e| e.to_string())?;
        self.payloads.clear();
        let vos: HashSet<&str> = counts.iter().map(|(vo, _, _)| vo.as_str()).collect();
        for vo in vos {
            for s in STATES {
                self.payloads
                    .get_or_create(&VoState {
                        vo: vo.to_string(),
                        state: s.as_str().to_string(),
                    })
                    .set(0);
            }
        }
        for (vo, state, n) in &counts {
            self.payloads
                .get_or_create(&VoState {
                    vo: vo.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        let now = Instant::now();
        let pilots = {
            let mut seen = self.pilots_seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, t| now.duration_since(*t) < PILOTS_SEEN_WINDOW);
            let mut all: HashSet<&str> = seen.keys().map(String::as_str).collect();
            all.extend(busy.iter().map(String::as_str));
            all.len()
        };
        self.pilots_seen_gauge.set(pilots as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| format!("encoding metrics: {e}"))?;
        Ok(out)
    }
}

/// What the metrics listener shares.
struct MetricsState {
    metrics: Arc<Metrics>,
    store: Arc<Store>,
}

/// The OpenMetrics text content type (Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics_page(State(st): State<Arc<MetricsState>>) -> Response {
    let st2 = st.clone();
    let res = tokio::task::spawn_blocking(move || st2.metrics.scrape(&st2.store)).await;
    match res {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "metrics scrape failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scrape failed: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("scrape worker failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves `GET /metrics` on `listener` (plain HTTP) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics_page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state(Arc::new(MetricsState { metrics, store }));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pilots_seen_is_bounded_and_forgets_after_the_window() {
        let m = Metrics::new();
        let t0 = Instant::now();
        m.saw_pilot("a", t0);
        m.saw_pilot("a", t0);
        m.saw_pilot("b", t0);
        assert_eq!(m.pilots_seen.lock().unwrap().len(), 2);
        {
            let mut seen = m.pilots_seen.lock().unwrap();
            for i in 0..PILOTS_SEEN_MAX {
                seen.insert(format!("p{i}"), t0);
            }
        }
        m.saw_pilot("late", t0 + Duration::from_secs(1));
        let seen = m.pilots_seen.lock().unwrap();
        assert!(seen.len() <= PILOTS_SEEN_MAX + 2);
        assert!(
            !seen.contains_key("late"),
            "over the cap nothing new is added"
        );
        drop(seen);
        // After the window, the full map is pruned and the new pilot fits.
        m.saw_pilot("later", t0 + PILOTS_SEEN_WINDOW + Duration::from_secs(1));
        let seen = m.pilots_seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen.contains_key("later"));
    }
}
