//! The pilot's client of the VO server's HTTPS API (P9: mutual TLS with the pilot's own
//! certificate, the server checked against the configured CAs).
//!
//! Holds the [`ServerApi`] seam the agent is written against and its real implementation.
//! Transient failures (connection errors, timeouts, 5xx) are retried with backoff; 4xx answers
//! are returned at once with the server's own message. It never talks to the helper.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::protocol::api::{ApiError, MatchRequest, MatchResponse, StatusAck, StatusReport, Work};
use crate::protocol::delegation::{IssuedProxy, ProxyCsr};

/// Errors talking to the VO server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("VO server {url} unreachable after {attempts} attempts: {why}")]
    Unreachable {
        url: String,
        attempts: u32,
        why: String,
    },
    #[error("VO server refused {url}: HTTP {status} {code}: {message}")]
    Refused {
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("VO server answer to {url} is not what the pilot expects: {why}")]
    BadAnswer { url: String, why: String },
}

impl ClientError {
    /// True for errors a later attempt may not see (network, 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// What the agent needs from the VO server. Futures are `Send` so calls can run on spawned
/// tasks while the agent keeps handling helper events and signals.
pub trait ServerApi: Send + Sync + 'static {
    /// `POST /v1/match`: work that fits, or `None`.
    fn match_work(
        &self,
        req: MatchRequest,
    ) -> impl Future<Output = Result<Option<Work>, ClientError>> + Send;
    /// `POST /v1/payloads/{id}/status`.
    fn report(
        &self,
        payload_id: String,
        report: StatusReport,
    ) -> impl Future<Output = Result<StatusAck, ClientError>> + Send;
    /// `PUT /v1/payloads/{id}/output` with a tar.gz body.
    fn upload(
        &self,
        payload_id: String,
        archive: Vec<u8>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `POST /v1/payloads/{id}/proxy`: a proxy for the key the helper made (its CSR).
    fn issue_proxy(
        &self,
        payload_id: String,
        csr: ProxyCsr,
    ) -> impl Future<Output = Result<IssuedProxy, ClientError>> + Send;
}

/// Retry schedule for transient failures.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub attempts: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 5,
            first: Duration::from_millis(500),
            max: Duration::from_secs(8),
        }
    }
}

/// The real server client.
#[derive(Clone)]
pub struct HttpsServer {
    http: reqwest::Client,
    base: String,
    backoff: Backoff,
}

impl HttpsServer {
    /// Loads the pilot's certificate, key and CAs (failing with the file named) and builds a
    /// keep-alive mTLS client for `base_url`.
    pub fn new(
        base_url: &str,
        cert: &Path,
        key: &Path,
        ca: &Path,
    ) -> Result<Self, crate::tls::TlsError> {
        Ok(HttpsServer {
            http: crate::tls::https_client(cert, key, ca)?,
            base: base_url.trim_end_matches('/').to_string(),
            backoff: Backoff::default(),
        })
    }

    /// Replaces the retry schedule (tests use a short one).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sends the request `build` makes, retrying transient failures; returns the body of a
    /// 2xx answer.
    async fn send(
        &self,
        url: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, ClientError> {
        let mut delay = self.backoff.first;
        let mut last_why = String::new();
        for attempt in 1..=self.backoff.attempts.max(1) {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.backoff.max);
            }
            let resp = match build().send().await {
                Ok(r) => r,
                Err(e) => {
                    last_why = error_chain(&e);
                    tracing::warn!(url, attempt, error = %last_why, "VO server request failed; retrying");
                    continue;
                }
            };
            let status = resp.status();
            let body = match resp.bytes().await {
                Ok(b) => b.to_vec(),
                Err(e) => {
                    last_why = error_chain(&e);
                    continue;
                }
            };
            if status.is_success() {
                return Ok(body);
            }
            let (code, message) = match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    String::new(),
                    String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                ),
            };
            if status.is_server_error() {
                last_why = format!("HTTP {} {code}: {message}", status.as_u16());
                tracing::warn!(url, attempt, error = %last_why, "VO server error; retrying");
                continue;
            }
            return Err(ClientError::Refused {
                url: url.to_string(),
                status: status.as_u16(),
                code,
                message,
            });
        }
        Err(ClientError::Unreachable {
            url: url.to_string(),
            attempts: self.backoff.attempts.max(1),
            why: last_why,
        })
    }

    fn json<T: for<'de> serde::Deserialize<'de>>(url: &str, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer {
            url: url.to_string(),
            why: e.to_string(),
        })
    }
}

/// An error with its sources, so "connection refused" or a certificate problem is visible.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl ServerApi for HttpsServer {
    async fn match_work(&self, req: MatchRequest) -> Result<Option<Work>, ClientError> {
        let url = format!("{}/v1/match", self.base);
        let body = self.send(&url, || self.http.post(&url).json(&req)).await?;
        Ok(Self::json::<MatchResponse>(&url, &body)?.work)
    }

    async fn report(
        &self,
        payload_id: String,
        report: StatusReport,
    ) -> Result<StatusAck, ClientError> {
        let url = format!("{}/v1/payloads/{payload_id}/status", self.base);
        let body = self
            .send(&url, || self.http.post(&url).json(&report))
            .await?;
        if body.is_empty() {
            return Ok(StatusAck::default());
        }
        Self::json(&url, &body)
    }

    async fn upload(&self, payload_id: String, archive: Vec<u8>) -> Result<(), ClientError> {
        let url = format!("{}/v1/payloads/{payload_id}/output", self.base);
        self.send(&url, || {
            self.http
                .put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/gzip")
                .body(archive.clone())
        })
        .await?;
        Ok(())
    }

    async fn issue_proxy(
        &self,
        payload_id: String,
        csr: ProxyCsr,
    ) -> Result<IssuedProxy, ClientError> {
        let url = format!("{}/v1/payloads/{payload_id}/proxy", self.base);
        let body = self.send(&url, || self.http.post(&url).json(&csr)).await?;
        Self::json(&url, &body)
    }
}
